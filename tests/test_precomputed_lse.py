"""A caller-supplied lse (precomputed_lse) replaces the kernels' own statistics: with the row's
true lse the results are smoothed_xent's, and with any lse L they are those of L, checked
against the formula written out in float64:

    loss = sum_c q_c (L - y_c) + z L^2,   dloss/dx_c = ((A + 2 z L) exp(y_c - L) - q_c) * dy/dx_c

(q_c the target mass of class c, A their sum), on every backend, mode and launch.
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_ls import smoothed_xent, smoothed_xent_reference
from fused_ls.backends import row_ops
from oracle import GRAD_TOL, LOSS_TOL, loss_and_grad, masses
from test_native import _run_emulated, emulated_cuda  # noqa: F401  (a fixture)


def given_lse_truth(x, target, lse, eps, *, weight=None, z_loss=0.0, softcap=0.0, ignore_index=-100):
    """(loss rows, gradient of their sum) in float64 for the lse `lse` given, uniform convention."""
    x = x.double()
    N, V = x.shape
    k_s, k_t = masses(eps, V)
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    y = x if not softcap else softcap * torch.tanh(x / softcap)
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long()
    q = k_s * w.expand(N, V).clone()
    q[torch.arange(N), t] += k_t * w[t]
    L = lse.double().unsqueeze(1)
    distance = torch.where(q != 0, q * (L - y), 0.0)
    loss = distance.sum(1) + z_loss * L.squeeze(1) ** 2
    A = q.sum(1, keepdim=True)
    grad = (A + 2 * z_loss * L) * torch.exp(y - L) - q
    if softcap:
        grad = grad * (1 - (y / softcap) ** 2)
    loss = torch.where(valid, loss, 0.0)
    grad = torch.where(valid.unsqueeze(1), grad, 0.0)
    return loss, grad


FEATURES = {
    "plain": {},
    "weight": {"weight": True},
    "softcap and z-loss": {"softcap": 4.0, "z_loss": 1e-2},
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("V", [37, 5000])  # one chunk; several chunks of the given-lse kernel
def test_the_row_ops_use_the_lse_given(backend, device, feature, V):
    """Op level, with an lse off the true one by a different amount in each row: the results
    follow the lse given, and it comes back as the op's lse."""
    options = dict(FEATURES[feature])
    N = 6
    logits = torch.randn(N, V, device=device)
    logits[1, :3] = -math.inf  # masked classes
    target = torch.randint(0, V, (N,), device=device)
    target[2] = -100
    weight = torch.rand(V, device=device) + 0.5 if options.pop("weight", False) else None
    softcap, z_loss = options.get("softcap", 0.0), options.get("z_loss", 0.0)
    y = logits.double() if not softcap else softcap * torch.tanh(logits.double() / softcap)
    given = (torch.logsumexp(y, 1) + torch.linspace(-0.3, 0.3, N, dtype=torch.float64)).float()
    true_loss, true_grad = given_lse_truth(logits.cpu(), target.cpu(), given.cpu(), 0.1, z_loss=z_loss,
                                           softcap=softcap, weight=None if weight is None else weight.cpu())
    ops = row_ops(backend)
    args = (*masses(0.1, V), -100, z_loss, softcap, 1.0)
    loss, lse, grad = ops.rows(logits, target, weight, torch.ones((), device=device), *args, None, given)
    loss_only, lse_only = ops.rows_loss(logits, target, weight, *args, None, given)
    torch.testing.assert_close(lse, given, rtol=0, atol=0)
    torch.testing.assert_close(lse_only, given, rtol=0, atol=0)
    for got in (loss, loss_only):
        torch.testing.assert_close(got.double().cpu(), true_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double().cpu(), true_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["saved", "inplace", "recompute", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_true_lse_given_back_gives_smoothed_xents_numbers(fused_backend, device, mode, dtype):
    """The intended use: the lse of an earlier pass over the same logits (return_lse), in every
    autograd mode; the float64 oracle judges the loss and the gradient."""
    N, V = 7, 300
    logits = (torch.randn(N, V, device=device) * 3).to(dtype)
    target = torch.randint(0, V, (N,), device=device)
    target[4] = -100
    kwargs = dict(z_loss=1e-3, backend=fused_backend)
    with torch.no_grad():
        _, lse = smoothed_xent(logits, target, 0.1, return_lse=True, **kwargs)
    want_loss, want_grad = loss_and_grad(smoothed_xent_reference, logits.double(), target, 0.1, z_loss=1e-3)
    x = logits.clone().requires_grad_(mode != "no_grad")
    source = x * 1.0 if mode == "inplace" else x
    with torch.set_grad_enabled(mode != "no_grad"):
        loss = smoothed_xent(source, target, 0.1, precomputed_lse=lse, inplace_backward=mode == "inplace",
                             recompute_backward=mode == "recompute", **kwargs)
        if mode != "no_grad":
            loss.backward()
    torch.testing.assert_close(loss.double(), want_loss, rtol=LOSS_TOL[dtype][0] * 5, atol=LOSS_TOL[dtype][1] * 5)
    if mode != "no_grad":
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(x.grad.double(), want_grad, rtol=rtol, atol=atol * 10)


def test_precomputed_lse_with_predictions_and_leading_dimensions(fused_backend, device):
    logits = torch.randn(2, 3, 50, device=device)
    target = torch.randint(0, 50, (2, 3), device=device)
    lse = torch.logsumexp(logits, -1)
    out = smoothed_xent(logits, target, 0.1, precomputed_lse=lse, reduction="none", return_predictions=True,
                        return_lse=True, backend=fused_backend)
    torch.testing.assert_close(out.predictions, logits.argmax(-1), rtol=0, atol=0)
    torch.testing.assert_close(out.lse, lse, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, smoothed_xent(logits, target, 0.1, reduction="none", backend=fused_backend),
                               rtol=2e-5, atol=2e-5)


def test_a_precomputed_lse_of_the_wrong_shape_or_device_is_refused(device):
    logits = torch.randn(4, 9, device=device)
    target = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="shape of target"):
        smoothed_xent(logits, target, precomputed_lse=torch.zeros(5, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        smoothed_xent(logits, target, precomputed_lse=torch.zeros(4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="precomputed_lse"):
        smoothed_xent(logits, target, process_group=object(), precomputed_lse=torch.zeros(4, device=device))


@pytest.mark.parametrize("dtype, V, blocks", [(torch.float32, 1000, 1), (torch.bfloat16, 5003, 3),
                                              (torch.float64, 301, 1)])
def test_the_cuda_kernels_use_the_lse_given(emulated_cuda, dtype, V, blocks):
    """The native CUDA kernels on the CPU (tests/cuda_host_emulation.cpp), one block a row and a
    row split over blocks; grad_scale 0.5 and softcap as the emulation harness passes them."""
    N = 4
    logits = torch.randn(N, V).to(dtype)
    target = torch.randint(0, V, (N,))
    target[1] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y = 3.0 * torch.tanh(logits.double() / 3.0)
    given = (torch.logsumexp(y, 1) + 0.25).to(acc)
    loss, lse, grad = _run_emulated(emulated_cuda, logits, target, None, 0.1, blocks, softcap=3.0,
                                    precomputed_lse=given)
    true_loss, true_grad = given_lse_truth(logits, target, given, 0.1, softcap=3.0)
    torch.testing.assert_close(lse, given, rtol=0, atol=0)
    torch.testing.assert_close(loss.double(), true_loss, rtol=2e-5, atol=2e-5)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), 0.5 * true_grad, rtol=rtol, atol=atol * 10)


def test_expanded_logits_int32_targets_and_an_expanded_lse(fused_backend, device):
    """What users pass: one row of logits broadcast to every target (stride 0), int32 targets,
    the lse of that row expanded to the targets' shape; and a column slice of wider logits."""
    row = torch.randn(1, 40, device=device)
    row[0, :4] = -math.inf  # a masked part of the vocabulary
    logits = row.expand(6, 40)
    target = torch.randint(4, 40, (6,), device=device, dtype=torch.int32)
    lse = torch.logsumexp(row, -1).expand(6)
    out = smoothed_xent(logits, target, 0.1, precomputed_lse=lse, return_predictions=True, backend=fused_backend)
    want = smoothed_xent_reference(logits.double(), target.long(), 0.1)
    torch.testing.assert_close(out.loss.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.predictions, logits.argmax(-1), rtol=0, atol=0)
    wide = torch.randn(5, 60, device=device, requires_grad=True)
    sliced = wide[:, 7:47]  # a view: row stride 60
    target = torch.randint(0, 40, (5,), device=device)
    loss = smoothed_xent(sliced, target, 0.1, precomputed_lse=torch.logsumexp(sliced.detach(), -1),
                         backend=fused_backend)
    loss.backward()
    want_loss, want_grad = loss_and_grad(smoothed_xent_reference, sliced.detach().double(), target, 0.1)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(wide.grad[:, 7:47].double(), want_grad, rtol=1e-5, atol=1e-7)
    assert not wide.grad[:, :7].any() and not wide.grad[:, 47:].any()
