"""inplace_backward=True: the gradient lands in the logits buffer, and misuse is caught."""

from __future__ import annotations

import pytest
import torch
from fused_ls import smoothed_xent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_gives_the_out_of_place_gradient_in_the_logits_buffer(fused_backend, device, dtype, reduction):
    h = torch.randn(6, 8, device=device, requires_grad=True)
    proj = torch.randn(8, 45, device=device)
    target = torch.randint(0, 45, (6,), device=device)
    target[0] = -100

    logits = (h @ proj).to(dtype)  # an op output consumed only by the loss
    storage = logits.data_ptr()
    loss = smoothed_xent(logits, target, 0.1, reduction=reduction, inplace_backward=True, backend=fused_backend)
    loss.sum().backward()

    expected = smoothed_xent(
        (h.detach() @ proj).to(dtype).requires_grad_(), target, 0.1, reduction=reduction, backend=fused_backend
    )
    torch.testing.assert_close(loss, expected)
    assert logits.data_ptr() == storage
    h_ref = h.detach().clone().requires_grad_(True)
    smoothed_xent((h_ref @ proj).to(dtype), target, 0.1, reduction=reduction, backend=fused_backend).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_inplace_raises_when_another_op_saved_the_logits(fused_backend, device):
    x = torch.randn(4, 30, device=device, requires_grad=True)
    logits = torch.exp(x)  # exp saves its output for its backward
    target = torch.randint(0, 30, (4,), device=device)
    loss = smoothed_xent(logits, target, inplace_backward=True, backend=fused_backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_refuses_a_leaf_that_requires_grad(fused_backend, device):
    logits = torch.randn(3, 9, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="would overwrite a leaf tensor"):
        smoothed_xent(logits, torch.zeros(3, dtype=torch.long, device=device), inplace_backward=True, backend=fused_backend)


def test_inplace_needs_a_fused_backend(device):
    with pytest.raises(ValueError, match="inplace_backward needs a fused backend"):
        smoothed_xent(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), inplace_backward=True, backend="torch")


def test_inplace_leaves_the_logits_intact_when_no_gradient_is_needed(fused_backend, device):
    logits = torch.randn(4, 12, device=device)
    target = torch.randint(0, 12, (4,), device=device)
    before = logits.clone()
    with torch.no_grad():
        loss = smoothed_xent(logits.requires_grad_(), target, inplace_backward=True, backend=fused_backend)
    logits.requires_grad_(False)
    loss_without_grad = smoothed_xent(logits, target, inplace_backward=True, backend=fused_backend)
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss, loss_without_grad)
