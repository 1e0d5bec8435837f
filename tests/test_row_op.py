"""The row op's contract (fused_ls/_row_op.py), held by every backend's RowOps alike: the
fused ones and the eager "torch" one that the linear head and vocabulary parallelism use."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKENDS
from oracle import GRAD_TOL, LOSS_TOL, TRITON_FLOAT64_GRAD_ATOL, masses, truth

from fused_ls import backends
from fused_ls.conventions import CONVENTIONS, smoothing_masses


@pytest.fixture(params=ALL_BACKENDS)
def row_backend(request):
    return request.param


def _inputs(device, dtype, V=37, N=8):
    """What callers really pass: a target that is a column of a matrix (stride 2) in int32,
    an ignored row, an out-of-range target, class weights with a stride, masked classes, and an
    ignored row whose logits are all -inf (padding)."""
    logits = (torch.randn(N, V, dtype=torch.float64, device=device) * 3).to(dtype)
    logits[3, 5:11] = -math.inf  # a masked part of the vocabulary
    logits[7] = -math.inf
    targets = torch.randint(0, V, (N, 2), device=device, dtype=torch.int32)
    target = targets[:, 1]
    target[1], target[2], target[4], target[7] = -100, V - 1, 0, -100
    weight = (torch.rand(2 * V, dtype=torch.float64, device=device) + 0.5).float()[::2]
    weight[5:11] = 0.0  # masked classes of weight 0 cost nothing even with smoothing
    return logits, target, weight


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_backend_gives_the_oracles_rows_and_gradient(row_backend, device, dtype, convention):
    logits, target, weight = _inputs(device, dtype)
    N, V = logits.shape
    options = (*smoothing_masses(convention, 0.1, V), -100, 1e-2, 4.0, 1.3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor([0.5, 2.0, -1.0, 3.0, 0.0, 1e-3, 7.0, 1.0], dtype=acc, device=device)
    kwargs = {"convention": convention, "z_loss": 1e-2, "softcap": 4.0, "logit_scale": 1.3, "weight": weight}
    true_rows, true_grad = truth(logits, target.long(), 0.1, reduction="none", upstream=scale, **kwargs)
    true_lse = torch.logsumexp(4.0 * torch.tanh(1.3 * logits.double() / 4.0), dim=1)
    true_grad[7] = 0.0  # the oracle's NaN for a row of -inf; an ignored row's gradient is 0 by contract
    true_rows[7] = 0.0
    ops = backends.row_ops(row_backend)

    loss, lse, grad = ops.rows(logits, target, weight, scale, *options)
    inplace = logits.clone()
    loss_inplace, lse_inplace = ops.rows_inplace(inplace, target, weight, scale, *options)
    loss_only, lse_only = ops.rows_loss(logits, target, weight, *options)

    torch.testing.assert_close(loss.double(), true_rows, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    torch.testing.assert_close(lse.double(), true_lse, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    assert (grad[7] == 0).all() and loss[7] == 0
    assert grad.dtype == dtype and grad.shape == logits.shape
    atol = GRAD_TOL[dtype][1] * 8  # the gradient of a row of scale 7: up to 7 times the unit-scale error
    if row_backend == "triton" and dtype == torch.float64:
        atol = max(atol, 8 * TRITON_FLOAT64_GRAD_ATOL)
    torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=atol)
    assert (grad[1] == 0).all() and (grad[4] == 0).all()  # the ignored row; the row of scale 0
    # The three variants are one computation: the same rows, bit for bit.
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0)
    torch.testing.assert_close(loss_only, loss, rtol=0, atol=0)
    torch.testing.assert_close(lse_only, lse, rtol=0, atol=0)
    torch.testing.assert_close(lse_inplace, lse, rtol=0, atol=0)
    torch.testing.assert_close(inplace, grad, rtol=0, atol=0)


def test_every_backend_gives_an_out_of_range_target_a_nan_loss_and_no_gradient(row_backend, device):
    # Under the Python checks (which refuse it on the CPU): the row is never dereferenced.
    logits = torch.randn(3, 16, device=device)
    target = torch.tensor([2, 16 + (1 << 20), -100], device=device)
    one = torch.ones((), device=device)
    loss, lse, grad = backends.row_ops(row_backend).rows(logits, target, None, one, *masses(0.1, 16), -100, 0.0,
                                                         0.0, 1.0)
    assert loss[1].isnan() and loss[0].isfinite() and loss[2] == 0
    assert (grad[1] == 0).all() and (grad[2] == 0).all() and grad[0].isfinite().all()
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))


def test_every_backend_refuses_to_write_a_gradient_over_rows_that_share_memory(row_backend, device):
    logits = torch.randn(1, 16, device=device).expand(4, 16)
    target = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="single memory location|share memory"):
        backends.row_ops(row_backend).rows_inplace(logits, target, None, torch.ones((), device=device),
                                                   *masses(0.1, 16), -100, 0.0, 0.0, 1.0)


def test_a_python_implemented_row_op_refuses_what_it_cannot_read(device):
    # Triton and the eager op check the contract as the native op does: never a wrong number.
    logits = torch.randn(4, 10, device=device)
    target = torch.zeros(4, dtype=torch.long, device=device)
    one = torch.ones((), device=device)
    options = (*masses(0.1, 10), -100, 0.0, 0.0, 1.0)
    for name in [b for b in ALL_BACKENDS if b != "native"]:
        ops = backends.row_ops(name)
        with pytest.raises(ValueError, match="unit stride"):
            ops.rows(torch.randn(10, 4, device=device).t(), target, None, one, *options)
        with pytest.raises(ValueError, match="weight"):
            ops.rows(logits, target, torch.ones(9, device=device), one, *options)
        with pytest.raises(ValueError, match="target"):
            ops.rows(logits, target.float(), None, one, *options)
        with pytest.raises(ValueError, match="masses"):
            ops.rows(logits, target, None, one, -0.1, 1.0, -100, 0.0, 0.0, 1.0)
