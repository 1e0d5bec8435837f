"""Peak memory of one training step of a Hugging Face causal LM on the CPU, stock against fused.

    python -m fused_ls.bench.hf_memory                 # 2-layer Llama, V = 128256, 1 x 2048 tokens
    python -m fused_ls.bench.hf_memory --repeats 5 --hidden 512 --json out.json

One step is the forward and backward of a training step (the optimizer is left out: it is the
same for every variant), label smoothing 0.1, float32, with the parameters' gradients freed
before it (``zero_grad(set_to_none=True)``, the default), so that they count. The variants:

    labelsmoother   the stock model returns its (B, T, V) logits and transformers' LabelSmoother
                    computes the loss: what Trainer(label_smoothing_factor=0.1) runs
    hf_loss         the stock model computes its own loss from labels= (no smoothing: transformers'
                    causal-LM loss has none): the plain Trainer without label smoothing
    smoothed_xent   the logits as stock, the loss by fused_ls's SmoothedXentLabelSmoother
                    (use_smoothed_xent(trainer))
    fused_head      use_fused_linear_head(model): the loss from lm_head's input by
                    smoothed_linear_xent; the logits never exist

Each measurement is a fresh interpreter (fused_ls.bench.rss): the model and batch are built,
one warm-up step runs, then the peak resident set of the measured step beyond what was
resident before it is read. Medians over --repeats fresh interpreters per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

EPS = 0.1
VARIANTS = ("labelsmoother", "hf_loss", "smoothed_xent", "fused_head")


class _TrainingStep:
    """A tiny-depth Llama with a full-size vocabulary and one batch; step() is forward + backward."""

    def __init__(self, variant: str, vocab: int, hidden: int, layers: int, batch: int, tokens: int, seed: int):
        import transformers

        from fused_ls.integrations.huggingface import SmoothedXentLabelSmoother, use_fused_linear_head

        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
            max_position_embeddings=tokens,
        )
        self.model = transformers.LlamaForCausalLM(config).train()
        self.input_ids = torch.randint(0, vocab, (batch, tokens))
        self.labels = self.input_ids.clone()
        self.labels[:, : tokens // 8] = -100  # a prompt that does not count, as in fine-tuning
        self.variant = variant
        if variant == "fused_head":
            use_fused_linear_head(self.model, EPS)
        elif variant == "labelsmoother":
            from transformers.trainer_pt_utils import LabelSmoother

            self.smoother = LabelSmoother(epsilon=EPS)
        elif variant == "smoothed_xent":
            self.smoother = SmoothedXentLabelSmoother(EPS)

    def prepare(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.variant in ("fused_head", "hf_loss"):
            loss = self.model(input_ids=self.input_ids, labels=self.labels).loss
        else:  # as Trainer does with a label smoother: the model gets no labels
            outputs = self.model(input_ids=self.input_ids)
            loss = self.smoother(outputs, self.labels, shift_labels=True)
        loss.backward()


def build(variant: str, vocab: int, hidden: int, layers: int, batch: int, tokens: int, seed: int = 0):
    """Builder for the memory subprocess (fused_ls.bench.rss)."""
    return _TrainingStep(variant, vocab, hidden, layers, batch, tokens, seed)


def main(argv=None) -> int:
    from fused_ls.bench import rss
    from fused_ls.bench.measure import _version, environment

    parser = argparse.ArgumentParser(prog="python -m fused_ls.bench.hf_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    shape = dict(vocab=args.vocab, hidden=args.hidden, layers=args.layers, batch=args.batch, tokens=args.tokens)
    logits_bytes = args.batch * args.tokens * args.vocab * 4
    env = environment("cpu")
    env["transformers"] = _version("transformers")
    print(f"{args.layers}-layer Llama, hidden {args.hidden}, V = {args.vocab}, {args.batch} x {args.tokens} tokens, "
          f"float32, label smoothing {EPS}: peak extra RSS of one forward+backward, median of {args.repeats} fresh "
          f"interpreters (the logits alone are {logits_bytes / 2**20:.0f} MiB)")
    print(f"torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}, {env['torch_threads']} threads")
    results = {}
    for variant in args.variants:
        samples = []
        for seed in range(args.repeats):
            (result,) = rss.measure_jobs([("fused_ls.bench.hf_memory:build", {"variant": variant, "seed": seed, **shape})])
            if result["error"]:
                print(f"{variant}: {result['error']}", file=sys.stderr)
                return 1
            samples.append(result["bytes"])
        results[variant] = {"median_bytes": statistics.median(samples), "samples_bytes": samples}
        median = results[variant]["median_bytes"]
        print(f"  {variant:14s} {median / 2**20:8.0f} MiB  ({median / logits_bytes:.2f} x the logits; "
              f"samples {', '.join(f'{s / 2**20:.0f}' for s in samples)} MiB)", flush=True)
    if "labelsmoother" in results and "fused_head" in results:
        ratio = results["fused_head"]["median_bytes"] / results["labelsmoother"]["median_bytes"]
        print(f"fused_head / labelsmoother: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "label_smoothing": EPS, "method": rss.METHOD, "environment": env,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
