"""smoothed_xent against float64 oracles, on every backend that runs on the test device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import GRAD_TOL, LOSS_TOL, TRITON_FLOAT64_GRAD_ATOL, assert_matches_truth, loss_and_grad, softcapped_grad_atol, truth

from fused_ls import SmoothedCrossEntropyLoss, smoothed_xent, smoothed_xent_reference

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _inputs(n, V, dtype, device, *, scale=3.0, ignore_fraction=0.0, ignore_index=-100):
    logits = (torch.randn(n, V, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    target = torch.randint(0, V, (n,), device=device)
    if ignore_fraction:
        target[torch.rand(n, device=device) < ignore_fraction] = ignore_index
    return logits, target


# ----------------------------------------------------------------------------- PyTorch's numbers


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_matches_pytorch_cross_entropy_in_float64(backend, device, reduction, with_weight, eps):
    logits, target = _inputs(12, 37, torch.float64, device, ignore_fraction=0.25)
    weight = torch.rand(37, dtype=torch.float64, device=device) + 0.1 if with_weight else None
    ours, ours_grad = loss_and_grad(
        smoothed_xent, logits, target, eps, weight=weight, reduction=reduction, backend=backend
    )
    theirs, theirs_grad = loss_and_grad(
        F.cross_entropy, logits, target, weight=weight, reduction=reduction, label_smoothing=eps
    )
    # Triton passes float scalars (eps/V, 1-eps, ...) as float32, so a fused float64 result
    # carries their rounding: about 1e-8 relative per term. A gradient element where p_t and
    # 1-eps nearly cancel keeps the absolute error of fp32(1-eps), up to 0.9 * 2^-24 * scale
    # (2.7e-9 seen at scale 1/9), so the absolute tolerance of the fused backends is that bound.
    tol = 1e-10 if backend == "torch" else 1e-7
    grad_atol = 1e-12 if backend == "torch" else TRITON_FLOAT64_GRAD_ATOL
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=tol, atol=grad_atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_dtype_is_as_close_to_the_truth_as_its_rounding_allows(backend, device, dtype, reduction):
    logits, target = _inputs(16, 203, dtype, device, ignore_fraction=0.2)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction=reduction, backend=backend)
    assert loss.dtype == torch.float32
    true_loss, true_grad = truth(logits, target, 0.1, reduction=reduction)
    assert_matches_truth(loss, grad, true_loss, true_grad, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_is_no_worse_than_eager_pytorch(fused_backend, device, dtype):
    logits, target = _inputs(32, 1000, dtype, device, scale=8.0)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend=fused_backend)
    eager_loss, eager_grad = loss_and_grad(F.cross_entropy, logits, target, label_smoothing=0.1)
    true_loss, true_grad = truth(logits, target, 0.1)
    assert (loss.double() - true_loss).abs() <= (eager_loss.double() - true_loss).abs() + LOSS_TOL[dtype][1]
    ours_err = (grad.double() - true_grad).abs().max()
    eager_err = (eager_grad.double() - true_grad).abs().max()
    assert ours_err <= eager_err + GRAD_TOL[dtype][1], (ours_err, eager_err)


# ----------------------------------------------------------------------------- every feature


FEATURES = {
    "plain": {},
    "others": {"convention": "others"},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "logit_scale": {"logit_scale": 0.7},
    "normalizer": {"normalizer": 37.0},
    "everything": {
        "convention": "others", "z_loss": 3e-3, "softcap": 4.0, "logit_scale": 1.3, "ignore_index": 5,
    },
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_each_feature_matches_the_float64_reference(backend, device, feature, dtype):
    kwargs = dict(FEATURES[feature])
    ignore_index = kwargs.get("ignore_index", -100)
    logits, target = _inputs(9, 130, dtype, device, ignore_fraction=0.3, ignore_index=ignore_index)
    weight = torch.rand(130, device=device) + 0.5
    for w in (None, weight):
        loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.2, weight=w, backend=backend, **kwargs)
        true_loss, true_grad = truth(logits, target, 0.2, weight=w, **kwargs)
        capped = softcapped_grad_atol(dtype, w, kwargs.get("logit_scale", 1.0)) if "softcap" in kwargs else None
        assert_matches_truth(loss, grad, true_loss, true_grad, dtype, backend, grad_atol=capped)


def test_others_convention_gives_true_class_exactly_one_minus_eps(device):
    # The reference itself, checked against the explicit fairseq target distribution.
    V, eps = 11, 0.3
    logits, target = _inputs(6, V, torch.float64, device)
    q = torch.full((6, V), eps / (V - 1), dtype=torch.float64, device=device)
    q.scatter_(1, target.unsqueeze(1), 1 - eps)
    expected = -(q * logits.log_softmax(-1)).sum(-1)
    ours = smoothed_xent_reference(logits, target, eps, convention="others", reduction="none")
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_z_loss_softcap_and_scale_follow_their_definitions(device):
    # The reference's transforms, checked by hand: cap * tanh(scale * x / cap), + z * lse^2.
    logits, target = _inputs(5, 9, torch.float64, device)
    y = 3.0 * torch.tanh(0.5 * logits / 3.0)
    lse = torch.logsumexp(y, -1)
    expected = F.cross_entropy(y, target, label_smoothing=0.1, reduction="none") + 0.01 * lse**2
    ours = smoothed_xent_reference(
        logits, target, 0.1, softcap=3.0, logit_scale=0.5, z_loss=0.01, reduction="none"
    )
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_return_lse_gives_logsumexp_of_transformed_logits(backend, device):
    logits, target = _inputs(2 * 3, 50, torch.float32, device)
    logits, target = logits.view(2, 3, 50), target.view(2, 3)
    loss, lse = smoothed_xent(logits, target, softcap=5.0, logit_scale=2.0, return_lse=True, backend=backend)
    assert lse.shape == (2, 3) and lse.dtype == torch.float32 and not lse.requires_grad
    expected = torch.logsumexp(5.0 * torch.tanh(2.0 * logits.double() / 5.0), -1)
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upstream_gradient_scales_each_row(backend, device, reduction):
    logits, target = _inputs(8, 40, torch.float32, device, ignore_fraction=0.2)
    if reduction == "none":
        upstream = torch.randn(8, device=device)
    else:
        upstream = torch.tensor(-2.5, device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction=reduction, upstream=upstream, backend=backend)
    true_loss, true_grad = truth(logits, target, 0.1, reduction=reduction, upstream=upstream)
    assert_matches_truth(loss, grad, true_loss, true_grad, torch.float32)


def test_stride_zero_upstream_gradient_is_accepted(backend, device):
    logits, target = _inputs(6, 33, torch.float32, device)
    upstream = torch.tensor(3.0, device=device).expand(6)
    assert upstream.stride() == (0,)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction="none", upstream=upstream, backend=backend)
    _, true_grad = truth(logits, target, 0.1, reduction="none", upstream=upstream)
    torch.testing.assert_close(grad.double(), true_grad, rtol=1e-5, atol=1e-7)


def test_normalizer_tensor_replaces_the_token_count(backend, device):
    logits, target = _inputs(10, 20, torch.float32, device, ignore_fraction=0.3)
    global_count = torch.tensor(123.0, device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, normalizer=global_count, backend=backend)
    summed, summed_grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction="sum", backend=backend)
    torch.testing.assert_close(loss, summed / 123.0)
    torch.testing.assert_close(grad, summed_grad / 123.0)


def test_backward_twice_with_retain_graph_gives_the_same_gradient(backend, device):
    logits, target = _inputs(4, 30, torch.float32, device)
    x = logits.clone().requires_grad_(True)
    loss = smoothed_xent(x, target, 0.1, reduction="none", backend=backend)
    upstream = torch.randn(4, device=device)
    (first,) = torch.autograd.grad(loss, x, upstream, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, upstream)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_module_equals_the_function(backend, device):
    logits, target = _inputs(7, 25, torch.float32, device)
    weight = torch.rand(25, device=device)
    module = SmoothedCrossEntropyLoss(0.15, weight=weight, z_loss=1e-3, backend=backend)
    assert "label_smoothing=0.15" in repr(module)
    torch.testing.assert_close(
        module(logits, target), smoothed_xent(logits, target, 0.15, weight=weight, z_loss=1e-3, backend=backend)
    )


# ----------------------------------------------------------------------------- edge cases


def test_equal_logits_give_log_v(backend, device):
    V = 1000
    logits = torch.full((3, V), 0.37, device=device)
    target = torch.tensor([0, 17, V - 1], device=device)
    loss = smoothed_xent(logits, target, 0.1, reduction="none", backend=backend)
    torch.testing.assert_close(loss.double(), torch.full((3,), math.log(V), dtype=torch.float64, device=device))


@pytest.mark.parametrize("convention", ["uniform", "others"])
def test_adding_a_constant_to_every_logit_changes_nothing(backend, device, convention):
    logits, target = _inputs(6, 77, torch.float32, device)
    base, base_grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction="none", convention=convention, backend=backend)
    shifted, shifted_grad = loss_and_grad(smoothed_xent, logits + 100.0, target, 0.1, reduction="none", convention=convention, backend=backend)
    torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shifted_grad, base_grad, rtol=1e-4, atol=1e-6)


def test_targets_at_the_first_and_last_class(backend, device):
    logits, _ = _inputs(4, 129, torch.float32, device)
    target = torch.tensor([0, 128, 0, 128], device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend=backend)
    true_loss, true_grad = truth(logits, target, 0.1)
    assert_matches_truth(loss, grad, true_loss, true_grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradient(backend, device, reduction):
    logits, _ = _inputs(5, 31, torch.float32, device)
    target = torch.full((5,), -100, device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction=reduction, backend=backend)
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_no_row_ignored_equals_pytorch(backend, device):
    logits, target = _inputs(8, 64, torch.float64, device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend=backend)
    ref, ref_grad = loss_and_grad(F.cross_entropy, logits, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_returns_what_pytorch_returns(backend, device, reduction):
    logits = torch.randn(0, 10, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    ours = smoothed_xent(logits, target, 0.1, reduction=reduction, backend=backend)
    theirs = F.cross_entropy(logits, target, label_smoothing=0.1, reduction=reduction)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.float(), theirs.float(), equal_nan=True)
    ours.sum().backward()
    assert logits.grad.shape == (0, 10)


def test_transposed_and_strided_logits(backend, device):
    base = torch.randn(40, 12, device=device)
    transposed = base.t()  # (12, 40), unit stride along rows, not along classes
    padded = torch.randn(12, 64, device=device)[:, 5:45]  # row stride 64, V = 40
    target = torch.randint(0, 40, (12,), device=device)
    for logits in (transposed, padded):
        loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend=backend)
        true_loss, true_grad = truth(logits, target, 0.1)
        assert_matches_truth(loss, grad, true_loss, true_grad, torch.float32)


def test_three_d_logits_like_an_lm(backend, device):
    logits = torch.randn(2, 5, 97, device=device)
    target = torch.randint(0, 97, (2, 5), device=device)
    target[0, :2] = -100
    for reduction in ("mean", "none"):
        loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction=reduction, backend=backend)
        true_loss, true_grad = truth(logits.view(10, 97), target.view(10), 0.1, reduction=reduction)
        assert loss.shape == (() if reduction == "mean" else (2, 5))
        assert_matches_truth(loss.view(-1) if reduction == "none" else loss, grad.view(10, 97), true_loss, true_grad, torch.float32)


@pytest.mark.parametrize("V", [2, 3, 100, 1000, 4099])
def test_vocabulary_sizes_that_are_not_powers_of_two(backend, device, V):
    logits, target = _inputs(3, V, torch.float32, device)
    for convention in ("uniform", "others"):
        loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, convention=convention, softcap=7.0, backend=backend)
        true_loss, true_grad = truth(logits, target, 0.1, convention=convention, softcap=7.0)
        assert_matches_truth(loss, grad, true_loss, true_grad, torch.float32)


def test_int32_targets_equal_int64(backend, device):
    logits, target = _inputs(6, 19, torch.float32, device)
    torch.testing.assert_close(
        smoothed_xent(logits, target.int(), backend=backend), smoothed_xent(logits, target, backend=backend)
    )


def test_softcap_masks_lanes_past_the_vocabulary(backend, device):
    # Masked lanes loaded as -inf become -cap after tanh: they must not add probability mass.
    V = 37  # not a multiple of any block
    logits = torch.full((2, V), -50.0, device=device)
    target = torch.tensor([3, 36], device=device)
    loss = smoothed_xent(logits, target, 0.0, softcap=1.0, reduction="none", backend=backend)
    torch.testing.assert_close(loss.double(), torch.full((2,), math.log(V), dtype=torch.float64, device=device))


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_in_float64_with_every_feature(backend, device, reduction):
    logits = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 6, -1, 3, 2], device=device)
    weight = torch.rand(7, dtype=torch.float64, device=device) + 0.5

    def fn(x):
        return smoothed_xent(
            x, target, 0.2, weight=weight, ignore_index=-1, reduction=reduction, convention="others",
            z_loss=0.05, softcap=2.0, logit_scale=1.5, backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def test_a_million_classes(backend, device):
    V = 1_000_003
    logits = torch.randn(2, V, device=device) * 2
    target = torch.tensor([V - 1, 12345], device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, backend=backend)
    true_loss, true_grad = truth(logits, target, 0.1)
    assert_matches_truth(loss, grad, true_loss, true_grad, torch.float32)
