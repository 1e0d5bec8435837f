"""The ops are proper torch.library citizens: opcheck passes and torch.compile traces them whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_ls import smoothed_xent
from oracle import masses

from fused_ls.backends import row_ops


def _op_args(device, dtype=torch.float32, weight=True):
    logits = torch.randn(5, 33, device=device, dtype=dtype)
    target = torch.tensor([0, 32, -100, 7, 1], device=device)
    w = torch.rand(33, device=device) if weight else None
    return logits, target, w, torch.tensor(0.25, device=device), *masses(0.1, 33, True), -100, 1e-3, 3.0, 1.1


@pytest.mark.parametrize("weight", [False, True])
def test_opcheck_passes_for_the_row_op(fused_backend, device, weight):
    torch.library.opcheck(row_ops(fused_backend).rows, _op_args(device, weight=weight))


def test_opcheck_passes_for_the_inplace_row_op(fused_backend, device):
    torch.library.opcheck(row_ops(fused_backend).rows_inplace, _op_args(device))


@pytest.mark.parametrize("weight", [False, True])
def test_opcheck_passes_for_the_loss_only_row_op(fused_backend, device, weight):
    logits, target, w, _grad_scale, *row_args = _op_args(device, weight=weight)
    torch.library.opcheck(row_ops(fused_backend).rows_loss, (logits, target, w, *row_args))


def test_compiled_evaluation_has_no_graph_break(fused_backend, device):
    logits = torch.randn(6, 40, device=device)
    target = torch.randint(0, 40, (6,), device=device)

    @torch.compile(backend="eager", fullgraph=True)
    def evaluate(x, t):
        with torch.no_grad():
            return smoothed_xent(x, t, 0.1, backend=fused_backend)

    torch.testing.assert_close(evaluate(logits, target), smoothed_xent(logits, target, 0.1, backend=fused_backend))


def test_opcheck_passes_for_the_row_scale_op(device):
    torch.library.opcheck(torch.ops.fused_ls.scale_rows_, (torch.randn(4, 9, device=device), torch.randn(4, device=device)))


def test_compiled_forward_and_loss_has_no_graph_break(backend, device):
    torch._dynamo.reset()
    model = torch.nn.Linear(16, 50).to(device)
    x = torch.randn(8, 16, device=device)
    target = torch.randint(0, 50, (8,), device=device)
    target[1] = -100

    def forward_and_loss(x, target):
        return smoothed_xent(model(x), target, 0.1, z_loss=1e-4, backend=backend)

    compiled = torch.compile(forward_and_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(x, target)
    loss.backward()  # runs the backward graph that AOTAutograd compiled with the forward
    compiled_grad = model.weight.grad.clone()
    model.zero_grad()
    expected = F.cross_entropy(model(x), target, label_smoothing=0.1) + 1e-4 * (
        torch.logsumexp(model(x), -1)[target != -100] ** 2
    ).sum() / (target != -100).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, model.weight.grad, rtol=1e-4, atol=1e-6)


def test_inductor_compiles_a_step_with_the_fused_op(fused_backend, device):
    torch._dynamo.reset()
    logits = torch.randn(6, 40, device=device, requires_grad=True)
    target = torch.randint(0, 40, (6,), device=device)

    @torch.compile(fullgraph=True)
    def loss_fn(logits, target):
        return smoothed_xent(logits * 2.0, target, 0.1, backend=fused_backend)

    loss = loss_fn(logits, target)
    loss.backward()
    ref = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(ref * 2.0, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)
