"""The Triton kernel on inputs that are legal but unusual: strided and broadcast target,
weight and gradient scale, masked (-inf) logits, and large logits in fp32.

Launcher-level tests write into NaN-filled buffers, so an element the kernel forgets to
write shows up as a mismatch. Each runs through the single-block path and the streamed
two-pass path (lowered limits, several chunks per row)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import GRAD_TOL, LOSS_TOL, masses

from fused_ls import available_backends, smoothed_xent

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="Triton cannot run here")

INF = float("inf")


@pytest.fixture
def kernel():
    from fused_ls.triton import smoothed_xent as kernel_module

    return kernel_module


@pytest.fixture(params=["single_block", "streamed"])
def path(request, kernel, monkeypatch):
    """Both row paths: at V <= 32 the single block; otherwise chunks of 16 (streamed)."""
    if request.param == "streamed":
        monkeypatch.setattr(kernel, "MAX_SINGLE_BLOCK", 16)
        monkeypatch.setattr(kernel, "CHUNKED_BLOCK", 16)
    return request.param


def launch(kernel, logits, target, eps, *, weight=None, grad_scale=None, others=False, write_grad=True,
           ignore_index=-100):
    """Run the launcher into NaN-filled buffers; (loss, lse, grad or None)."""
    N, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    k_s, k_t = masses(eps, V, others)
    weight_sum = weight.sum(dtype=acc) if weight is not None else None
    grad = torch.full_like(logits, float("nan")) if write_grad else None
    if write_grad and grad_scale is None:
        grad_scale = torch.ones((), dtype=acc, device=logits.device)
    loss = torch.full((N,), float("nan"), dtype=acc, device=logits.device)
    lse = torch.full_like(loss, float("nan"))
    kernel.smoothed_xent_rows_out(logits, target, weight, weight_sum, grad_scale if write_grad else None, grad,
                                  loss, lse, k_s, k_t, ignore_index, 0.0, 0.0, 1.0)
    return loss, lse, grad


def oracle(logits, target, eps, *, weight=None, others=False, ignore_index=-100):
    """Float64 (loss, lse, grad) with the kernel's semantics: a class of zero target mass
    adds exactly 0 to the loss even where its logit is -inf."""
    y = logits.double()
    N, V = y.shape
    k_s, k_t = masses(eps, V, others)
    w = weight.double() if weight is not None else torch.ones(V, dtype=torch.float64, device=y.device)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    q = k_s * w + k_t * w[t].unsqueeze(1) * F.one_hot(t, V).double()
    lse = torch.logsumexp(y, 1, keepdim=True)
    loss = torch.where(q != 0, q * (lse - y), 0.0).sum(1)
    grad = q.sum(1, keepdim=True) * torch.exp(y - lse) - q
    return torch.where(valid, loss, 0.0), lse.squeeze(1), torch.where(valid.unsqueeze(1), grad, 0.0)


def assert_close_to(got, want, dtype=torch.float32):
    (loss, lse, grad), (true_loss, true_lse, true_grad) = got, want
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), true_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.double(), true_lse, rtol=rtol, atol=atol)
    if grad is not None:
        assert torch.isfinite(grad).all()
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad.double(), true_grad, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- strides


@pytest.mark.parametrize("write_grad", [True, False])
def test_column_slice_target_and_strided_weight_are_read_with_their_strides(kernel, path, device, write_grad):
    N, V = 4, 40
    logits = torch.randn(N, V, device=device) * 3
    tt = torch.randint(0, V, (N, 3), device=device)
    target = tt[:, 1]  # stride 3
    weight = (torch.rand(2 * V, device=device) + 0.5)[::2]  # stride 2
    assert target.stride(0) == 3 and weight.stride(0) == 2
    got = launch(kernel, logits, target, 0.1, weight=weight, write_grad=write_grad)
    assert_close_to(got, oracle(logits, target, 0.1, weight=weight))


def test_expanded_target_and_weight_with_stride_zero_match_their_copies(kernel, path, device):
    N, V = 3, 40
    logits = torch.randn(N, V, device=device)
    target = torch.tensor(7, device=device).expand(N)
    weight = torch.tensor(0.7, device=device).expand(V)
    assert target.stride(0) == 0 and weight.stride(0) == 0
    got = launch(kernel, logits, target, 0.2, weight=weight, others=True)
    assert_close_to(got, oracle(logits, target.contiguous(), 0.2, weight=weight.contiguous(), others=True))


def test_strided_target_and_weight_through_the_public_function(device):
    N, V = 4, 24
    logits = torch.randn(N, V, device=device)
    target = torch.randint(0, V, (N, 2), device=device)[:, 1]
    weight = (torch.rand(3 * V, device=device) + 0.5)[::3]
    x = logits.clone().requires_grad_(True)
    loss = smoothed_xent(x, target, 0.1, weight=weight, reduction="sum", backend="triton")
    loss.backward()
    true_loss, _, true_grad = oracle(logits, target, 0.1, weight=weight)
    torch.testing.assert_close(loss.double(), true_loss.sum(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), true_grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- gradient scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_grad_scale_gives_each_row_the_scalar_launch_of_its_own_scale(kernel, path, device, dtype):
    # Row i with grad_scale[i] must equal, bit for bit, a launch with the scalar grad_scale[i]:
    # the scale is folded in before the single rounding, whatever its stride.
    N, V = 3, 40
    logits = (torch.randn(N, V, device=device) * 3).to(dtype)
    target = torch.randint(0, V, (N,), device=device)
    scales = torch.tensor([0.25, -3.0, 1.0 / 3.0], device=device)
    layouts = {
        "contiguous": scales,
        "strided": torch.stack([scales, torch.full_like(scales, float("nan"))], 1).reshape(-1)[::2],
    }
    for name, grad_scale in layouts.items():
        _, _, grad = launch(kernel, logits, target, 0.1, grad_scale=grad_scale)
        for i in range(N):
            _, _, row_grad = launch(kernel, logits, target, 0.1, grad_scale=scales[i].clone())
            torch.testing.assert_close(grad[i], row_grad[i], rtol=0, atol=0, msg=f"{name} row {i}")
    _, _, true_grad = oracle(logits, target, 0.1)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), true_grad * scales.double().unsqueeze(1), rtol=rtol, atol=atol * 3)


def test_scalar_grad_scale_as_0d_1_element_and_expanded_tensor_agree(kernel, path, device):
    N, V = 3, 40
    logits = torch.randn(N, V, device=device)
    target = torch.randint(0, V, (N,), device=device)
    s = torch.tensor(0.375, device=device)
    grads = [launch(kernel, logits, target, 0.1, grad_scale=g)[2] for g in (s, s.reshape(1), s.expand(N))]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=0)
    _, _, true_grad = oracle(logits, target, 0.1)
    torch.testing.assert_close(grads[0].double(), true_grad * 0.375, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad_scale", [float("nan"), float("inf")])
def test_rows_without_gradient_stay_zero_under_a_nan_or_inf_grad_scale(kernel, path, device, bad_scale):
    # A mean over a zero denominator scales by NaN (or 1/0): the ignored and out-of-range
    # rows' gradient is still exactly 0, the others' is not finite.
    N, V = 3, 40
    logits = torch.randn(N, V, device=device)
    target = torch.tensor([-100, V + 5, 3], device=device)
    grad_scale = torch.tensor([bad_scale, bad_scale, 1.0], device=device)
    for scale in (grad_scale, grad_scale[0].clone()):
        loss, _, grad = launch(kernel, logits, target, 0.1, grad_scale=scale)
        assert (grad[:2] == 0).all()
        assert loss[0] == 0 and loss[1].isnan()
    assert not torch.isfinite(grad[2]).any()


def test_grad_scale_of_the_wrong_length_is_refused(kernel, device):
    logits = torch.randn(3, 8, device=device)
    target = torch.zeros(3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="grad_scale"):
        launch(kernel, logits, target, 0.1, grad_scale=torch.ones(2, device=device))


# ----------------------------------------------------------------------------- masked logits


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_single_masked_logits_match_float64_cross_entropy(kernel, path, device, eps):
    N, V = 4, 40
    logits = torch.randn(N, V, device=device) * 2
    target = torch.tensor([0, 5, 39, 20], device=device)
    logits[0, 3] = -INF
    logits[1, [0, 1, 2, 39]] = -INF
    logits[2, 38] = -INF
    got = launch(kernel, logits, target, eps)
    x = logits.double().requires_grad_(True)
    true_loss = F.cross_entropy(x, target, reduction="none", label_smoothing=eps)
    true_loss.sum().backward()
    # eps = 0: a masked non-target class costs nothing; eps > 0 gives it mass, hence +inf.
    assert torch.isfinite(got[0][:3]).all() == (eps == 0)
    assert_close_to(got, (true_loss.detach(), torch.logsumexp(x.detach(), 1), x.grad))


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_whole_masked_chunks_in_the_streamed_path_stay_finite(kernel, device, monkeypatch, eps):
    # Chunks of 16 over V = 70: the first chunk of row 0, a middle one of row 1 and the
    # partial last chunk of row 2 are all -inf.
    monkeypatch.setattr(kernel, "MAX_SINGLE_BLOCK", 16)
    monkeypatch.setattr(kernel, "CHUNKED_BLOCK", 16)
    N, V = 3, 70
    logits = torch.randn(N, V, device=device) * 2 + 5
    logits[0, :16] = -INF
    logits[1, 32:48] = -INF
    logits[2, 64:] = -INF
    target = torch.tensor([20, 0, 63], device=device)
    # The masked classes carry no weight, so every row's loss is finite at any eps.
    weight = torch.rand(V, device=device) + 0.5
    masked = torch.zeros(V, dtype=torch.bool, device=device)
    masked[:16] = masked[32:48] = masked[64:] = True
    weight[masked] = 0.0
    got = launch(kernel, logits, target, eps, weight=weight)
    want = oracle(logits, target, eps, weight=weight)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert_close_to(got, want)
    if eps == 0.0:  # without weights, F.cross_entropy says the same
        unweighted = launch(kernel, logits, target, 0.0)
        x = logits.double().requires_grad_(True)
        true_loss = F.cross_entropy(x, target, reduction="none")
        true_loss.sum().backward()
        assert_close_to(unweighted, (true_loss.detach(), torch.logsumexp(x.detach(), 1), x.grad))


@pytest.mark.parametrize("others", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_masked_target_gives_infinite_loss_and_finite_gradient(kernel, path, device, eps, others):
    N, V = 3, 40
    logits = torch.randn(N, V, device=device)
    target = torch.tensor([4, 33, 0], device=device)
    logits[0, 4] = -INF
    logits[1, 33] = -INF
    logits[1, 0:20] = -INF  # with a whole chunk too
    loss, lse, grad = launch(kernel, logits, target, eps, others=others)
    # "others" at eps = 1 gives the true class no mass (k_t = -k_s): its -inf then costs nothing.
    true_class_has_mass = not (others and eps == 1.0)
    assert (loss[0] == INF) == true_class_has_mass and not loss.isnan().any()
    assert loss[1] == INF and torch.isfinite(loss[2])
    assert_close_to((loss, lse, grad), oracle(logits, target, eps, others=others))


def test_masked_class_of_zero_weight_costs_nothing_with_smoothing(kernel, path, device):
    # PyTorch gives 0 * inf = NaN here; the kernel gives the class's zero mass exactly 0.
    N, V = 2, 40
    logits = torch.randn(N, V, device=device)
    logits[:, 10] = -INF
    weight = torch.rand(V, device=device) + 0.5
    weight[10] = 0.0
    target = torch.tensor([1, 2], device=device)
    got = launch(kernel, logits, target, 0.1, weight=weight)
    assert torch.isfinite(got[0]).all()
    assert_close_to(got, oracle(logits, target, 0.1, weight=weight))


# ----------------------------------------------------------------------------- large logits


@pytest.mark.parametrize("others", [False, True])
def test_fp32_loss_is_shift_invariant_at_logits_near_1e4(kernel, path, device, others):
    N, V = 4, 40
    logits = torch.randn(N, V, device=device) * 3 + 1e4  # fp32: the truth is of these exact values
    target = torch.randint(0, V, (N,), device=device)
    weight = torch.rand(V, device=device) + 0.5
    loss, lse, grad = launch(kernel, logits, target, 0.1, weight=weight, others=others)
    true_loss, true_lse, true_grad = oracle(logits, target, 0.1, weight=weight, others=others)
    torch.testing.assert_close(loss.double(), true_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(lse.double(), true_lse, rtol=1e-7, atol=0)
    # p is formed from y - max, which is exact here, not from y - lse, which carries lse's rounding.
    torch.testing.assert_close(grad.double(), true_grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- in place


def test_inplace_refuses_logits_whose_rows_share_memory(device):
    from fused_ls.backends import row_ops

    V = 16
    logits = torch.randn(1, V, device=device).expand(4, V)
    target = torch.zeros(4, dtype=torch.long, device=device)
    one = torch.ones((), device=device)
    with pytest.raises(RuntimeError, match="rows do not share memory"):
        row_ops("triton").rows_inplace(logits, target, None, one, *masses(0.1, V), -100, 0.0, 0.0, 1.0)


def test_inplace_accepts_rows_past_a_padded_stride(device):
    from fused_ls.backends import row_ops

    N, V = 3, 16
    storage = torch.randn(N, 24, device=device)
    logits = storage[:, :V]
    target = torch.randint(0, V, (N,), device=device)
    one = torch.ones((), device=device)
    ops = row_ops("triton")
    loss, _, grad = ops.rows(logits, target, None, one, *masses(0.1, V), -100, 0.0, 0.0, 1.0)
    tail = storage[:, V:].clone()
    loss_inplace, _ = ops.rows_inplace(logits, target, None, one, *masses(0.1, V), -100, 0.0, 0.0, 1.0)
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0)
    torch.testing.assert_close(logits, grad, rtol=0, atol=0)
    torch.testing.assert_close(storage[:, V:], tail, rtol=0, atol=0)
