"""use_fused_linear_head: a causal LM's training loss from its hidden states, checked against the
stock model.

The oracle is the unpatched model's own logits under ``F.cross_entropy(..., label_smoothing=eps)``
on the shifted labels, in float64 (what the Trainer's LabelSmoother and transformers'
ForCausalLMLoss compute), and whole Trainer runs with the stock LabelSmoother. Tiny models of
each family are built from configs (no download): Llama, Qwen2, Qwen3, Mistral, Gemma 2 and
Gemma 3 (final-logit softcap), GPT-2 and Gemma (tied embeddings), Phi (an lm_head bias) and
Granite (a logit scale). Batches have prompt and padding labels (-100).
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

from fused_ls.integrations.huggingface import FusedLinearHead, remove_fused_linear_head, use_fused_linear_head

transformers = pytest.importorskip("transformers")

EPS = 0.1
VOCAB = 320
SOFTCAP = 0.25  # small enough that the tiny models' logits (|x| up to ~0.5) feel it
LOGITS_SCALING = 4.0  # Granite divides by it; a power of two, exact in float32


def _decoder(config_name, **extra):
    def make():
        config_class = getattr(transformers, config_name, None)
        if config_class is None:  # families newer than the installed transformers
            pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
        return config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    return make


FAMILIES = {
    "llama": _decoder("LlamaConfig"),
    "qwen2": _decoder("Qwen2Config"),
    "qwen3": _decoder("Qwen3Config", head_dim=8),
    "mistral": _decoder("MistralConfig"),
    "gemma2": _decoder("Gemma2Config", head_dim=8, final_logit_softcapping=SOFTCAP),
    "gemma3": _decoder("Gemma3TextConfig", head_dim=8, final_logit_softcapping=SOFTCAP),
    "granite": _decoder("GraniteConfig", logits_scaling=LOGITS_SCALING),
    "phi": lambda: transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}
TRANSFORMED = {"gemma2", "gemma3", "granite"}  # families whose logits are not lm_head's output


def _model(family, device, dtype=torch.float64):
    config = FAMILIES[family]()
    for name in list(config.to_dict()):  # deterministic training forward: no dropout anywhere
        if "dropout" in name or "pdrop" in name:
            setattr(config, name, 0.0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.to(device, dtype).train()


def _batch(device, B=3, T=12):
    """Right-padded sequences whose prompt tokens and padding are ignored (label -100)."""
    input_ids = torch.randint(0, VOCAB, (B, T), device=device)
    attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    labels = input_ids.clone()
    for row, (prompt, length) in enumerate([(2, T), (4, T - 3), (0, T - 5)][:B]):
        labels[row, :prompt] = -100
        labels[row, length:] = -100
        attention_mask[row, length:] = 0
    return input_ids, attention_mask, labels


def _shifted(labels):
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def _reference_loss(logits, labels, count):
    """transformers' causal-LM loss with label smoothing, in the logits' dtype (float64 here)."""
    target = _shifted(labels).flatten()
    total = F.cross_entropy(logits.flatten(0, 1), target, label_smoothing=EPS, reduction="sum")
    return total / (int((target != -100).sum()) if count is None else float(count))


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _tolerances(backend):
    # float64 models. The eager backend computes in float64 throughout: every loss and gradient
    # entry is a sum of at most a few thousand float64 products (V = 320 classes, 36 tokens, H = 32,
    # 2 layers back), so it differs from the oracle's order of summation by well under 1e4 ulp
    # (2e-12) of the largest entry; 1e-10 leaves a 50x margin. The fused kernels take their float
    # scalars (eps/V, 1 - eps) in float32 (docs/api.md): a relative error up to 2^-24 (6e-8) in
    # the smoothing masses, which reaches the loss as 6e-8 of its smoothing term and every
    # gradient linearly: 1e-7 for the loss, 1e-6 of each tensor's largest entry for gradients.
    return (1e-10, 1e-10) if backend == "torch" else (1e-7, 1e-6)


def _count(kind, labels, device):
    if kind is None:
        return None
    n = int((_shifted(labels) != -100).sum()) * 3  # as if two more micro-batches were accumulated
    return torch.tensor(n, device=device) if kind == "tensor" else n


def _check_against_stock(family, backend, count_kind, device):
    model = _model(family, device)
    input_ids, attention_mask, labels = _batch(device)
    count = _count(count_kind, labels, device)
    params = list(model.parameters())
    head = model.get_output_embeddings()
    head_outputs = []
    head.register_forward_hook(lambda module, args, output: head_outputs.append(output))

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    reference = _reference_loss(logits, labels, count)
    reference_grads = _grads(reference, params)
    loss_tol, grad_tol = _tolerances(backend)
    if family in TRANSFORMED:  # ignoring the softcap or scale would fail the comparison below, 10 times over
        untransformed = _reference_loss(head_outputs[-1].detach(), labels, count)
        assert abs(float(untransformed - reference.detach())) > 10 * loss_tol * (1 + float(reference.detach()))

    use_fused_linear_head(model, EPS, backend=backend)
    kwargs = {} if count is None else {"num_items_in_batch": count}
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    assert out.logits is None
    assert head_outputs[-1].shape == (*input_ids.shape, 0), "lm_head computed logits"
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, reference, rtol=loss_tol, atol=loss_tol)
    for p, g, r in zip(params, _grads(out.loss, params), reference_grads):
        torch.testing.assert_close(g, r, rtol=grad_tol, atol=grad_tol * max(float(r.abs().max()), 1e-6),
                                   msg=lambda m: f"gradient of a {tuple(p.shape)} parameter: {m}")


@pytest.mark.parametrize("count_kind", [None, "tensor"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_every_gradient_equal_the_stock_models_smoothed_cross_entropy(family, count_kind, device):
    # The eager backend: float64 throughout, so the tightest check of the wiring in every family.
    _check_against_stock(family, "torch", count_kind, device)


@pytest.mark.parametrize("count_kind", ["int"])
def test_every_backend_gives_the_stock_loss_and_gradients(backend, count_kind, device):
    _check_against_stock("gemma2", backend, count_kind, device)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_without_labels_logits_and_generate_are_the_models_own(family, device):
    model = _model(family, device).eval()
    input_ids, attention_mask, labels = _batch(device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        generated = model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
        use_fused_linear_head(model, EPS)
        patched = model(input_ids=input_ids, attention_mask=attention_mask)
        assert torch.equal(patched.logits, logits)
        assert torch.equal(model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False), generated)
        # Evaluation with labels: the model's logits as before, the loss read from them.
        evaluated = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.equal(evaluated.logits, logits)
    loss_tol, _ = _tolerances("native")  # the default backend: a fused kernel where one runs
    torch.testing.assert_close(evaluated.loss, _reference_loss(logits, labels, None), rtol=loss_tol, atol=loss_tol)


def test_the_patch_is_visible_reversible_and_keeps_the_signature(device):
    model = _model("llama", device)
    cls_signature = inspect.signature(model.forward)
    assert use_fused_linear_head(model, EPS, chunk_size=8) is model
    assert isinstance(model.fused_ls_head, FusedLinearHead)
    assert model.fused_ls_head.options == {"chunk_size": 8}
    assert "forward" in model.__dict__ and model.accepts_loss_kwargs is True
    assert inspect.signature(model.forward) == cls_signature  # what Trainer and generate inspect
    use_fused_linear_head(model, 0.2)  # patching again replaces the settings
    assert model.fused_ls_head.label_smoothing == 0.2 and model.fused_ls_head.options == {}
    assert remove_fused_linear_head(model) is model
    assert "forward" not in model.__dict__ and "accepts_loss_kwargs" not in model.__dict__
    assert not hasattr(model, "fused_ls_head")
    input_ids, _, labels = _batch(device)
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_a_copied_model_computes_with_its_own_weights(device):
    model = use_fused_linear_head(_model("gpt2", device), EPS)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_output_embeddings().weight.mul_(3.0)
    input_ids, _, labels = _batch(device)
    mine, theirs = model(input_ids=input_ids, labels=labels).loss, clone(input_ids=input_ids, labels=labels).loss
    assert float(mine.detach() - theirs.detach()) != 0.0
    with torch.no_grad():
        reference = _reference_loss(remove_fused_linear_head(clone)(input_ids=input_ids).logits, labels, None)
    torch.testing.assert_close(theirs, reference, rtol=1e-7, atol=1e-7)  # the fused kernels' float32 scalars


def test_a_training_forward_without_labels_warns_once(device):
    model = use_fused_linear_head(_model("llama", device), EPS)
    input_ids, _, _ = _batch(device)
    with pytest.warns(UserWarning, match="pass the Trainer to use_fused_linear_head"):
        model(input_ids=input_ids)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=input_ids)


class _ShiftedLogitsLlama(transformers.LlamaForCausalLM):
    """A model doing something to its logits that the fused head does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits + 1.0
        return out


def test_bad_models_and_arguments_are_refused_with_a_reason(device, tmp_path):
    with pytest.raises(ValueError, match="transforms lm_head's output"):
        use_fused_linear_head(_ShiftedLogitsLlama(FAMILIES["llama"]()), EPS)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="causal LM"):
        use_fused_linear_head(bert, EPS)
    model = _model("llama", device)
    with pytest.raises(TypeError, match="unexpected keyword"):
        use_fused_linear_head(model, EPS, softcap=30.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        use_fused_linear_head(model, 1.5)
    with pytest.raises(TypeError, match="model or a Trainer"):
        use_fused_linear_head(object(), EPS)
    use_fused_linear_head(model, EPS)
    input_ids, _, labels = _batch(device)
    keep = "logits_to_keep" if "logits_to_keep" in inspect.signature(model.forward).parameters else "num_logits_to_keep"
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, labels=labels, **{keep: 1})
    trainer = transformers.Trainer(model=model, args=_training_args(tmp_path))
    with pytest.raises(ValueError, match="differs from the Trainer's label_smoothing_factor"):
        use_fused_linear_head(trainer, 0.2)
    trainer = transformers.Trainer(model=model, args=_training_args(tmp_path), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="compute_loss_func"):
        use_fused_linear_head(trainer)


# ----------------------------------------------------------------------------- whole Trainer runs


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _rows(n=8, T=12):
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, T + 1, ()))  # padding varies: micro-batch token counts differ
        ids = torch.randint(0, VOCAB, (T,))
        mask = (torch.arange(T) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def _training_args(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 2, "max_steps": 2, "learning_rate": 0.5, "optim": "sgd",
        "lr_scheduler_type": "constant", "label_smoothing_factor": EPS, "use_cpu": not torch.cuda.is_available(),
        "report_to": "none", "save_strategy": "no", "remove_unused_columns": False, "seed": 1234,
    }
    return transformers.TrainingArguments(**{**kwargs, **overrides})


def test_trainer_with_the_fused_head_ends_at_label_smoothers_weights(tmp_path):
    model = _model("llama", "cpu")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows, eval_rows = _rows(), _rows(4)
    args = _training_args(tmp_path)

    def run(trainer):
        trainer.train()
        metrics = trainer.evaluate(_Rows(eval_rows))
        return {n: p.detach().cpu() for n, p in trainer.model.named_parameters()}, metrics["eval_loss"]

    # The reference takes each accumulated batch in one micro-batch: the full-batch mean, whatever
    # the Trainer version (4.46's stock LabelSmoother under accumulation sums the micro-batches'
    # means, twice the gradient, where the fused head divides by the Trainer's token count).
    one_batch = _training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    stock = transformers.Trainer(model=copy.deepcopy(model), args=one_batch, train_dataset=_Rows(rows))
    reference, reference_eval = run(stock)
    fused = use_fused_linear_head(transformers.Trainer(model=copy.deepcopy(model), args=args, train_dataset=_Rows(rows)))
    assert fused.label_smoother is None and fused.model.fused_ls_head.label_smoothing == EPS
    weights, eval_loss = run(fused)
    # Float64 models and plain SGD: a weight's change is lr times its summed gradient. The stock
    # LabelSmoother sums its smoothing term in float32, so its gradients carry relative errors of
    # about 2^-24 and its loss one of at most V * 2^-24 (2e-5) of the smoothing term; the fused
    # kernels take float32 scalars (1e-7). The changes must agree to 1e-6 of the largest one.
    # Teeth: a missing or doubled smoothing, or a per-micro-batch mean instead of the Trainer's
    # token count over both accumulated micro-batches, moves them by far more.
    for n, w in weights.items():
        change, reference_change = w - initial[n], reference[n] - initial[n]
        torch.testing.assert_close(change, reference_change, rtol=1e-6,
                                   atol=1e-6 * max(float(reference_change.abs().max()), 1e-12), msg=n)
    assert eval_loss == pytest.approx(reference_eval, rel=1e-5)
    remove_fused_linear_head(fused)
    assert type(fused.label_smoother) is type(stock.label_smoother) and fused.label_smoother.epsilon == EPS
    assert "forward" not in fused.model.__dict__
