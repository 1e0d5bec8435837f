"""fused_ls.integrations.huggingface against transformers' own label-smoothed loss.

The oracle is ``transformers.trainer_pt_utils.LabelSmoother``, the class Trainer uses when
``label_smoothing_factor`` is set. Tiny models are built from configs (no download): a
Llama and a GPT-2 causal LM, and a BERT sequence classifier. The loss and every gradient
must equal LabelSmoother's, with and without the Trainer's ``num_items_in_batch``; then
whole Trainer runs (gradient accumulation, padded batches) must end at the same weights.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from fused_ls.integrations.huggingface import SmoothedXentLabelSmoother, use_smoothed_xent

transformers = pytest.importorskip("transformers")
from transformers.trainer_pt_utils import LabelSmoother

EPS = 0.1
VOCAB, LABELS = 96, 7
LABEL_SMOOTHER_TAKES_COUNT = "num_items_in_batch" in inspect.signature(LabelSmoother.__call__).parameters


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert_classifier():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


CAUSAL_LMS = {"llama": _llama, "gpt2": _gpt2}


def _causal_batch(device, B=3, T=12):
    """Right-padded sequences whose prompt tokens and padding are ignored (label -100)."""
    input_ids = torch.randint(1, VOCAB, (B, T), device=device)
    attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    labels = input_ids.clone()
    for row, (prompt, length) in enumerate([(2, T), (4, T - 3), (0, T - 5)][:B]):
        labels[row, :prompt] = -100
        labels[row, length:] = -100
        attention_mask[row, length:] = 0
    return input_ids, attention_mask, labels


def _loss_and_grads(loss_fn, outputs, params, labels, **call_kwargs):
    loss = loss_fn(outputs, labels, **call_kwargs)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    grads = torch.autograd.grad(loss, [logits] + params, retain_graph=True)
    return loss.detach(), grads


def _count_kwargs(count, labels, shifted):
    if count is None:
        return {}
    if not LABEL_SMOOTHER_TAKES_COUNT:
        pytest.skip("this transformers' LabelSmoother has no num_items_in_batch")
    n = int(((labels[..., 1:] if shifted else labels) != -100).sum()) * 3  # three micro-batches' worth
    return {"num_items_in_batch": torch.tensor(n, device=labels.device) if count == "tensor" else n}


def _assert_same(ours, theirs):
    # Float64 models, so that a mismatch cannot hide in float32 rounding. The Triton kernel
    # takes eps/V as a float32 scalar (relative error ~6e-8), and backpropagation sums terms
    # that cancel: gradients are compared to 1e-6 of each tensor's largest entry (1e-12 for
    # tensors whose true gradient is 0, like GPT-2's attention key bias, and holds only noise).
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    assert loss.dtype == ref_loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-9)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=max(1e-6 * float(r.abs().max()), 1e-12))


@pytest.mark.parametrize("count", [None, "tensor", "int"])
@pytest.mark.parametrize("model_name", list(CAUSAL_LMS))
def test_causal_lm_loss_and_gradients_equal_label_smoother(backend, device, model_name, count):
    model = CAUSAL_LMS[model_name]().to(device, torch.float64)
    input_ids, attention_mask, labels = _causal_batch(device)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    params = list(model.parameters())
    kwargs = dict(shift_labels=True, **_count_kwargs(count, labels, shifted=True))
    theirs = _loss_and_grads(LabelSmoother(epsilon=EPS), outputs, params, labels, **kwargs)
    ours = _loss_and_grads(SmoothedXentLabelSmoother(EPS, backend=backend), outputs, params, labels, **kwargs)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("count", [None, "tensor"])
def test_sequence_classification_loss_and_gradients_equal_label_smoother(backend, device, count):
    model = _bert_classifier().to(device, torch.float64).eval()
    input_ids = torch.randint(1, VOCAB, (6, 9), device=device)
    labels = torch.randint(0, LABELS, (6,), device=device)
    labels[2] = -100
    outputs = model(input_ids=input_ids)
    params = list(model.parameters())
    kwargs = _count_kwargs(count, labels, shifted=False)
    theirs = _loss_and_grads(LabelSmoother(epsilon=EPS), outputs, params, labels, **kwargs)
    ours = _loss_and_grads(SmoothedXentLabelSmoother(EPS, backend=backend), outputs, params, labels, **kwargs)
    _assert_same(ours, theirs)


def test_tuple_outputs_and_column_labels_are_read_like_label_smoother(backend, device):
    logits = torch.randn(5, LABELS, device=device, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, LABELS, (5, 1), device=device)
    theirs = _loss_and_grads(LabelSmoother(epsilon=EPS), (logits,), [], labels)
    ours = _loss_and_grads(SmoothedXentLabelSmoother(EPS, backend=backend), (logits,), [], labels)
    _assert_same(ours, theirs)


def test_inplace_backward_gives_the_same_gradients_and_spares_evaluation_logits(fused_backend, device):
    model = _llama().to(device)
    input_ids, attention_mask, labels = _causal_batch(device)
    smoother = SmoothedXentLabelSmoother(EPS, backend=fused_backend, inplace_backward=True)
    loss = smoother(model(input_ids=input_ids, attention_mask=attention_mask), labels, shift_labels=True)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    LabelSmoother(epsilon=EPS)(model(input_ids=input_ids, attention_mask=attention_mask), labels, shift_labels=True).backward()
    for g, r in zip(ours, [p.grad for p in model.parameters()]):  # float32: 1e-5 of the largest entry
        torch.testing.assert_close(g, r, rtol=1e-5, atol=max(1e-5 * float(r.abs().max()), 1e-9))
    with torch.no_grad():  # evaluation: the logits handed to compute_metrics stay logits
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        kept = outputs.logits.clone()
        smoother(outputs, labels, shift_labels=True)
    torch.testing.assert_close(outputs.logits, kept, rtol=0, atol=0)


def test_low_precision_logits_are_no_further_from_the_truth_than_label_smoother(backend, device):
    logits = (torch.randn(4, 16, 1000, device=device) * 4).bfloat16()
    labels = torch.randint(0, 1000, (4, 16), device=device)
    truth = LabelSmoother(epsilon=EPS)((logits.double(),), labels, shift_labels=True)
    theirs = LabelSmoother(epsilon=EPS)((logits,), labels, shift_labels=True)
    ours = SmoothedXentLabelSmoother(EPS, backend=backend)((logits,), labels, shift_labels=True)
    assert ours.dtype == torch.float32
    assert abs(ours.double() - truth) <= abs(theirs.double() - truth) + 1e-6
    torch.testing.assert_close(ours.double(), truth, rtol=2e-5, atol=2e-5)


def test_all_labels_ignored_gives_zero_loss_not_nan(backend, device):
    logits = torch.randn(2, 5, VOCAB, device=device, requires_grad=True)
    labels = torch.full((2, 5), -100, device=device)
    assert LabelSmoother(epsilon=EPS)((logits,), labels, shift_labels=True).isnan()  # the documented difference
    loss = SmoothedXentLabelSmoother(EPS, backend=backend)((logits,), labels, shift_labels=True)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_use_smoothed_xent_keeps_the_trainer_without_label_smoothing_unchanged(tmp_path):
    trainer = transformers.Trainer(model=_llama(), args=_training_args(tmp_path, label_smoothing_factor=0.0))
    assert use_smoothed_xent(trainer) is trainer and trainer.label_smoother is None


# ----------------------------------------------------------------------------- whole Trainer runs


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _causal_rows(n=8, T=12):
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, T + 1, ()))  # padding varies: micro-batch token counts differ
        ids = torch.randint(1, VOCAB, (T,))
        mask = (torch.arange(T) < length).long()
        labels = torch.where(mask.bool(), ids, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _classification_rows(n=8, T=9):
    return [{"input_ids": torch.randint(1, VOCAB, (T,)), "labels": torch.randint(0, LABELS, ())} for _ in range(n)]


def _training_args(tmp_path, **overrides):
    kwargs = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 2, "learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant",
        "label_smoothing_factor": EPS, "use_cpu": not torch.cuda.is_available(), "report_to": "none",
        "save_strategy": "no", "logging_steps": 1, "remove_unused_columns": False, "seed": 1234,
    }
    return transformers.TrainingArguments(**{**kwargs, **overrides})


TRAINER_CASES = {"llama causal LM": (_llama, _causal_rows, True), "bert classifier": (_bert_classifier, _classification_rows, False)}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_with_smoothed_xent_ends_at_label_smoothers_weights(case, tmp_path, monkeypatch):
    make_model, make_rows, causal = TRAINER_CASES[case]
    model, rows = make_model(), make_rows()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _training_args(tmp_path)

    def train(trainer):
        trainer.train()
        return {n: p.detach().cpu() for n, p in trainer.model.named_parameters()}, trainer.state.log_history

    reference, ref_log = train(transformers.Trainer(model=copy.deepcopy(model), args=args, train_dataset=_Rows(rows)))
    assert any(not torch.equal(reference[n], initial[n]) for n in initial), "training changed nothing"

    from fused_ls.integrations import huggingface

    normalizers = []
    original = huggingface.smoothed_xent

    def counting_smoothed_xent(*args, **kwargs):
        normalizers.append(kwargs.get("normalizer"))
        return original(*args, **kwargs)

    monkeypatch.setattr(huggingface, "smoothed_xent", counting_smoothed_xent)
    patched = use_smoothed_xent(transformers.Trainer(model=copy.deepcopy(model), args=args, train_dataset=_Rows(rows)))
    assert isinstance(patched.label_smoother, SmoothedXentLabelSmoother)
    variants = {
        "use_smoothed_xent": patched,
        "compute_loss_func": transformers.Trainer(
            model=copy.deepcopy(model), args=args, train_dataset=_Rows(rows),
            compute_loss_func=SmoothedXentLabelSmoother(EPS, shift_labels=causal),
        ),
    }
    for name, trainer in variants.items():
        normalizers.clear()
        weights, log = train(trainer)
        # 2 optimizer steps x 2 accumulated micro-batches, each divided by the step's token count.
        assert len(normalizers) == 4, f"{name}: smoothed_xent ran {len(normalizers)} times, not 4"
        assert all(n is not None for n in normalizers), f"{name}: no global token count reached the loss"
        for n, w in weights.items():
            torch.testing.assert_close(w, reference[n], rtol=1e-5, atol=1e-7, msg=f"{name}: {n} differs")
        ref_losses = [entry["loss"] for entry in ref_log if "loss" in entry]
        assert [entry["loss"] for entry in log if "loss" in entry] == pytest.approx(ref_losses, rel=1e-5), name
