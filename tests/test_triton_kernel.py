"""The Triton kernel's own paths: the chunked two-pass row, written buffers, the row scale."""

from __future__ import annotations

import pytest
import torch
from oracle import assert_matches_truth, loss_and_grad, masses, softcapped_grad_atol, truth

from fused_ls import available_backends, smoothed_xent

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="Triton cannot run here")


@pytest.fixture
def kernel():
    from fused_ls.triton import smoothed_xent as kernel_module

    return kernel_module


@pytest.fixture
def chunked_rows(kernel, monkeypatch):
    """Send every row through the two-pass chunked path, with 4 to 5 chunks per row."""
    monkeypatch.setattr(kernel, "MAX_SINGLE_BLOCK", 32)
    monkeypatch.setattr(kernel, "CHUNKED_BLOCK", 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_rows_match_the_truth_with_every_feature(chunked_rows, device, dtype):
    V = 291  # 4 full chunks and a partial one
    logits = (torch.randn(4, V, device=device) * 4).to(dtype)
    target = torch.tensor([0, V - 1, -100, 130], device=device)
    weight = torch.rand(V, device=device) + 0.5
    kwargs = dict(weight=weight, convention="others", z_loss=1e-3, softcap=3.0, logit_scale=1.2)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend="triton", **kwargs)
    true_loss, true_grad = truth(logits, target, 0.1, **kwargs)
    assert_matches_truth(loss, grad, true_loss, true_grad, dtype, grad_atol=softcapped_grad_atol(dtype, weight, 1.2))


def test_chunked_rows_are_shift_invariant(chunked_rows, device):
    logits = torch.randn(3, 200, device=device)
    target = torch.randint(0, 200, (3,), device=device)
    base = smoothed_xent(logits, target, 0.1, reduction="none", backend="triton")
    shifted = smoothed_xent(logits + 1000.0, target, 0.1, reduction="none", backend="triton")
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-3)


def test_every_element_of_poisoned_buffers_is_written(kernel, device):
    N, V = 5, 77
    logits = torch.randn(N, V, device=device)
    target = torch.tensor([3, -100, 76, 0, 12], device=device)
    grad = torch.full((N, V), float("nan"), device=device)
    loss = torch.full((N,), float("nan"), device=device)
    lse = torch.full((N,), float("nan"), device=device)
    one = torch.ones((), device=device)
    kernel.smoothed_xent_rows_out(logits, target, None, None, one, grad, loss, lse, 0.1 / V, 0.9, -100, 0.0, 0.0, 1.0)
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all() and torch.isfinite(lse).all()
    true_loss, true_grad = truth(logits, target, 0.1, reduction="sum")
    torch.testing.assert_close(loss.sum().double(), true_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), true_grad, rtol=1e-5, atol=1e-7)


def test_poisoned_gradient_rows_past_a_padded_stride_stay_untouched(kernel, device):
    # The gradient buffer's rows are longer than V: the kernel writes exactly V per row.
    N, V = 3, 50
    logits = torch.randn(N, V, device=device)
    target = torch.randint(0, V, (N,), device=device)
    storage = torch.full((N, 64), float("nan"), device=device)
    grad = storage[:, :V]
    loss, lse = torch.empty(N, device=device), torch.empty(N, device=device)
    one = torch.ones((), device=device)
    kernel.smoothed_xent_rows_out(logits, target, None, None, one, grad, loss, lse, 0.1 / V, 0.9, -100, 0.0, 0.0, 1.0)
    assert torch.isfinite(grad).all() and torch.isnan(storage[:, V:]).all()


def test_row_scale_multiplies_each_row_and_skips_exact_ones(kernel, device):
    grad = torch.randn(4, 300, device=device)
    expected = grad * torch.tensor([2.0, 1.0, -0.5, 0.0], device=device).unsqueeze(1)
    kernel.scale_rows_(grad, torch.tensor([2.0, 1.0, -0.5, 0.0], device=device))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_row_scale_accepts_a_broadcast_scalar(kernel, device):
    grad = torch.randn(3, 10, device=device, dtype=torch.bfloat16)
    expected = (grad.float() * 3.0).bfloat16()
    kernel.scale_rows_(grad, torch.tensor(3.0, device=device).expand(3))
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_kernel_handles_a_large_vocabulary_in_one_row(device):
    # 70k classes: past the single-block limit, so the real chunked configuration runs.
    V = 70_000
    logits = torch.randn(1, V, device=device)
    target = torch.tensor([V - 2], device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend="triton")
    true_loss, true_grad = truth(logits, target, 0.1)
    assert_matches_truth(loss, grad, true_loss, true_grad, torch.float32)


def test_chunked_loss_only_rows_give_the_full_kernels_loss_and_lse(chunked_rows, device):
    from fused_ls.backends import row_ops

    ops = row_ops("triton")
    V = 291
    logits = torch.randn(5, V, device=device) * 4
    target = torch.tensor([0, V - 1, -100, 130, V + 3], device=device)  # the last out of range
    weight = torch.rand(V, device=device) + 0.5
    row_args = (*masses(0.1, V, True), -100, 1e-3, 3.0, 1.2)
    loss, lse = ops.rows_loss(logits, target, weight, *row_args)
    full_loss, full_lse, _ = ops.rows(logits, target, weight, torch.tensor(1.0, device=device), *row_args)
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=0)
    assert loss[4].isnan() and loss[2] == 0
