"""A forward that needs no gradient (evaluation, no_grad, inference_mode) runs the loss-only
row op: the same loss and lse as training, and no gradient allocated or written."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS
from oracle import masses
from torch.utils._python_dispatch import TorchDispatchMode

from fused_ls import backends, smoothed_linear_xent, smoothed_xent

GRADIENT_OPS = ("smoothed_xent_rows", "smoothed_xent_rows_", "smoothed_xent_rows_triton",
                "smoothed_xent_rows_triton_")
LOSS_ONLY_OPS = ("smoothed_xent_rows_loss", "smoothed_xent_rows_loss_triton")


class _FusedOpLog(TorchDispatchMode):
    """The fused_ls row ops a region calls, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_ls":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


FEATURES = {
    "plain": {},
    "every feature": {"convention": "others", "z_loss": 1e-2, "softcap": 3.0, "logit_scale": 1.3},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_loss_only_op_gives_the_full_ops_loss_and_lse_bit_for_bit(fused_backend, device, dtype, weighted, feature):
    ops = backends.row_ops(fused_backend)
    V = 333
    logits = (torch.randn(6, V, device=device) * 4).to(dtype)
    target = torch.randint(0, V, (6,), device=device)
    target[1], target[2] = -100, V - 1
    weight = torch.rand(V, device=device) + 0.5 if weighted else None
    f = {"convention": "uniform", "z_loss": 0.0, "softcap": None, "logit_scale": 1.0, **FEATURES[feature]}
    row_args = (*masses(0.1, V, f["convention"] == "others"), -100, f["z_loss"], f["softcap"] or 0.0, f["logit_scale"])
    before = logits.clone()
    loss, lse = ops.rows_loss(logits, target, weight, *row_args)
    full_loss, full_lse, _ = ops.rows(logits, target, weight, torch.tensor(1.0, device=device), *row_args)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=0)
    assert loss[1] == 0 and torch.isfinite(loss).all()
    assert torch.equal(logits, before)


def test_loss_only_op_on_a_few_long_rows_gives_the_full_ops_loss_and_lse(fused_backend, device):
    # 70000 logits: Triton's streamed two-pass rows; on a GPU the native op splits each of
    # these few rows over several blocks.
    ops = backends.row_ops(fused_backend)
    V = 70_000
    logits = (torch.randn(3, V, device=device) * 5).to(torch.bfloat16)
    target = torch.tensor([5, V - 1, -100], device=device)
    row_args = (*masses(0.1, V), -100, 1e-4, 0.0, 1.0)
    loss, lse = ops.rows_loss(logits, target, None, *row_args)
    full_loss, full_lse, _ = ops.rows(logits, target, None, torch.tensor(1.0, device=device), *row_args)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=0)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "logits without grad"])
def test_evaluation_calls_only_the_loss_only_op(fused_backend, device, context):
    logits = torch.randn(5, 77, device=device, requires_grad=context != "logits without grad")
    target = torch.randint(0, 77, (5,), device=device)
    region = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with region(), _FusedOpLog() as log:
        smoothed_xent(logits, target, 0.1, backend=fused_backend)
        smoothed_xent(logits, target, 0.1, backend=fused_backend, reduction="none")
    assert log.names and set(log.names) <= set(LOSS_ONLY_OPS), log.names
    with _FusedOpLog() as log:  # training still computes the gradient in the forward
        smoothed_xent(logits.detach().requires_grad_(), target, 0.1, backend=fused_backend)
    assert set(log.names) & set(GRADIENT_OPS), log.names


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_evaluation_gives_the_training_loss(backend, device, reduction):
    logits = torch.randn(7, 50, device=device, dtype=torch.float64) * 3
    target = torch.randint(0, 50, (7,), device=device)
    target[3] = -100
    weight = torch.rand(50, device=device, dtype=torch.float64) + 0.5
    kwargs = {"weight": weight, "reduction": reduction, "z_loss": 1e-3, "backend": backend, "return_lse": True}
    train_loss, train_lse = smoothed_xent(logits.clone().requires_grad_(), target, 0.1, **kwargs)
    with torch.no_grad():
        eval_loss, eval_lse = smoothed_xent(logits, target, 0.1, **kwargs)
    torch.testing.assert_close(eval_loss, train_loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(eval_lse, train_lse, rtol=0, atol=0)


def test_evaluation_keeps_the_all_ignored_and_empty_batch_conventions(fused_backend, device):
    logits = torch.randn(4, 9, device=device)
    with torch.no_grad():
        every_ignored = smoothed_xent(logits, torch.full((4,), -100, device=device), 0.1, backend=fused_backend)
        empty = smoothed_xent(logits[:0], torch.zeros(0, dtype=torch.long, device=device), 0.1, backend=fused_backend)
    assert every_ignored.item() == 0.0
    assert empty.isnan().item()


@pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend here")
def test_the_linear_heads_evaluation_and_reduction_none_forward_use_the_loss_only_op(fused_backend, device):
    hidden = torch.randn(40, 16, device=device, requires_grad=True)
    weight = torch.randn(90, 16, device=device, requires_grad=True)
    target = torch.randint(0, 90, (40,), device=device)
    kwargs = {"chunk_size": 16, "backend": fused_backend}
    with torch.no_grad(), _FusedOpLog() as log:
        eval_loss = smoothed_linear_xent(hidden, weight, target, **kwargs)
    assert log.names and set(log.names) <= set(LOSS_ONLY_OPS), log.names
    with _FusedOpLog() as log:
        per_token = smoothed_linear_xent(hidden, weight, target, reduction="none", **kwargs)
    assert log.names and set(log.names) <= set(LOSS_ONLY_OPS), log.names
    train_loss = smoothed_linear_xent(hidden, weight, target, **kwargs)
    torch.testing.assert_close(eval_loss, train_loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(per_token.mean(), train_loss, rtol=1e-6, atol=1e-6)


def test_a_normalizer_that_requires_grad_keeps_the_training_path_and_gets_its_gradient(fused_backend, device):
    logits = torch.randn(5, 30, device=device)
    target = torch.randint(0, 30, (5,), device=device)
    normalizer = torch.tensor(4.0, device=device, requires_grad=True)
    with _FusedOpLog() as log:
        loss = smoothed_xent(logits, target, 0.1, normalizer=normalizer, backend=fused_backend)
    assert set(log.names) & set(GRADIENT_OPS), log.names
    loss.backward()
    row_sum = smoothed_xent(logits, target, 0.1, reduction="sum", backend=fused_backend)
    torch.testing.assert_close(normalizer.grad, -row_sum / 16.0, rtol=1e-6, atol=1e-7)
