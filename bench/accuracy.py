"""Worst error of each backend against the float64 truth, per dtype, beside eager PyTorch's.

    python bench/accuracy.py [--device cuda] [--rows 256] [--vocab 32000] [--trials 5]

The truth is computed in float64 from the same (rounded) logits. "eager" is
F.cross_entropy(label_smoothing=0.1) run in the input dtype, the error users accept today.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from fused_ls import available_backends, smoothed_xent, smoothed_xent_reference


def _loss_and_grad(fn, logits, target, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    loss.backward()
    return loss.detach().double(), x.grad.double()


def measure(device: str, rows: int, vocab: int, trials: int) -> list[dict]:
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        worst: dict[str, list[float]] = {}
        for _ in range(trials):
            logits = (torch.randn(rows, vocab, device=device) * 4).to(dtype)
            target = torch.randint(0, vocab, (rows,), device=device)
            target[::7] = -100
            true_loss, true_grad = _loss_and_grad(smoothed_xent_reference, logits.double(), target, label_smoothing=0.1)
            runs = {"eager": lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1)}
            for name in available_backends(device):
                runs[name] = lambda x, t, name=name: smoothed_xent(x, t, 0.1, backend=name)
            for name, fn in runs.items():
                loss, grad = _loss_and_grad(fn, logits, target)
                err = [(loss - true_loss).abs().item(), (grad - true_grad).abs().max().item()]
                prev = worst.setdefault(name, [0.0, 0.0])
                worst[name] = [max(a, b) for a, b in zip(prev, err)]
        for name, (loss_err, grad_err) in worst.items():
            results.append({"dtype": str(dtype).removeprefix("torch."), "impl": name,
                            "max_abs_loss_err": loss_err, "max_abs_grad_err": grad_err})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = measure(args.device, args.rows, args.vocab, args.trials)
    print(f"{'dtype':9} {'impl':7} {'max |loss err|':>15} {'max |grad err|':>15}   ({args.rows}x{args.vocab}, {args.device}, "
          f"{args.trials} draws, vs float64)")
    for r in rows:
        print(f"{r['dtype']:9} {r['impl']:7} {r['max_abs_loss_err']:15.3e} {r['max_abs_grad_err']:15.3e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
