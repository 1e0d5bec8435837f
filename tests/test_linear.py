"""smoothed_linear_xent against the materialised path (hidden @ weight.T + bias, then the
float64 reference), on every backend that runs on the test device."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from test_no_host_sync import cpu_target_check_allowed  # noqa: F401  (the shared fixture)

from fused_ls import SmoothedLinearCrossEntropyLoss, smoothed_linear_xent, smoothed_xent_reference
from fused_ls import linear as linear_module
from fused_ls.linear import MIN_CHUNK_ROWS, default_chunk_size

# Triton passes float scalars (eps/V, z_loss, ...) as float32, so fused float64 results carry
# their rounding, about 1e-8 relative to the loss, more where p_c - q_c cancels; the GEMMs and
# the chunked sums add nothing visible in float64.
F64_TOL = {"rtol": 1e-6, "atol": 1e-7}
EAGER_F64_TOL = {"rtol": 1e-10, "atol": 1e-12}


def _f64_tol(backend):
    return EAGER_F64_TOL if backend == "torch" else F64_TOL

FEATURES = {
    "defaults": {},
    "class_weight": {"class_weight": "random"},
    "ignore_index_5": {"ignore_index": 5},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "others_convention": {"convention": "others"},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "logit_scale": {"logit_scale": 0.7},
    "normalizer": {"normalizer": 7.0},
    "no_smoothing": {"label_smoothing": 0.0},
    "everything": {
        "class_weight": "random", "convention": "others", "z_loss": 1e-3, "softcap": 4.0,
        "logit_scale": 1.3, "normalizer": torch.tensor(5.0), "label_smoothing": 0.2,
    },
}


def _head(tokens_shape, H, V, dtype, device, *, bias=True, ignore_index=-100, ignore_fraction=0.25):
    hidden = torch.randn(*tokens_shape, H, dtype=torch.float64).to(dtype=dtype, device=device)
    weight = (torch.randn(V, H, dtype=torch.float64) / math.sqrt(H) * 2).to(dtype=dtype, device=device)
    b = (torch.randn(V, dtype=torch.float64) * 0.5).to(dtype=dtype, device=device) if bias else None
    target = torch.randint(0, V, tokens_shape, device=device)
    target[torch.rand(tokens_shape, device=device) < ignore_fraction] = ignore_index
    return hidden, weight, b, target


def _resolve(kwargs, V, device):
    kwargs = dict(kwargs)
    if kwargs.get("class_weight") == "random":
        kwargs["class_weight"] = torch.rand(V, dtype=torch.float64, device=device) + 0.1
    return kwargs


def _losses_and_grads(fn, hidden, weight, bias, target, upstream=None, **kwargs):
    """fn(hidden, weight, target, bias, ...) and the gradients of its loss for hidden, weight, bias."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], target, leaves[2] if bias is not None else None, **kwargs)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype))
    return loss.detach(), lse, grads


def _materialised(hidden, weight, target, bias=None, label_smoothing=0.1, *, class_weight=None, **kwargs):
    """The oracle: the logits in full, then the eager reference, in float64."""
    for key in ("chunk_size", "backend"):
        kwargs.pop(key, None)
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if isinstance(kwargs.get("normalizer"), torch.Tensor):
        kwargs["normalizer"] = kwargs["normalizer"].double()
    return smoothed_xent_reference(logits, target, label_smoothing, weight=class_weight, **kwargs)


def _upstream(reduction, target):
    """A non-trivial upstream gradient: 0.7 for a scalar loss, random per token for 'none'."""
    if reduction == "none":
        return torch.randn(target.shape, dtype=torch.float64, device=target.device)
    return torch.tensor(0.7, dtype=torch.float64, device=target.device)


def _assert_matches_materialised(hidden, weight, bias, target, backend, **kwargs):
    tol = _f64_tol(backend)
    upstream = _upstream(kwargs.get("reduction", "mean"), target)
    ours, our_lse, our_grads = _losses_and_grads(smoothed_linear_xent, hidden, weight, bias, target, upstream,
                                                 backend=backend, **kwargs)
    theirs, their_lse, their_grads = _losses_and_grads(_materialised, hidden, weight, bias, target, upstream, **kwargs)
    torch.testing.assert_close(ours.double(), theirs, **tol)
    if kwargs.get("return_lse"):
        torch.testing.assert_close(our_lse.double(), their_lse, **tol)
    for name, ours_g, theirs_g in zip(("hidden", "weight", "bias"), our_grads, their_grads):
        assert ours_g.dtype == hidden.dtype, name
        torch.testing.assert_close(ours_g.double(), theirs_g, **tol, msg=lambda m, n=name: f"grad of {n}: {m}")


# ----------------------------------------------------------------------------- every feature


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_matches_the_materialised_path_in_float64(backend, device, feature, with_bias):
    kwargs = _resolve(FEATURES[feature], 37, device)
    ignore_index = kwargs.get("ignore_index", -100)
    # 11 tokens in chunks of 4: the last chunk is short.
    hidden, weight, bias, target = _head((11,), 6, 37, torch.float64, device, bias=with_bias, ignore_index=ignore_index)
    _assert_matches_materialised(hidden, weight, bias, target, backend, chunk_size=4, return_lse=True, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_three_dimensional_hidden_states_keep_their_token_shape(backend, device, reduction):
    hidden, weight, bias, target = _head((2, 5), 6, 29, torch.float64, device)
    _assert_matches_materialised(hidden, weight, bias, target, backend, chunk_size=3, reduction=reduction,
                                 return_lse=True)
    loss, lse = smoothed_linear_xent(hidden, weight, target, bias, reduction=reduction, return_lse=True,
                                     backend=backend)
    assert lse.shape == (2, 5)
    assert loss.shape == ((2, 5) if reduction == "none" else ())


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 64])
def test_any_chunk_size_gives_the_same_result(backend, device, chunk_size):
    hidden, weight, bias, target = _head((11,), 5, 23, torch.float64, device)
    _assert_matches_materialised(hidden, weight, bias, target, backend, chunk_size=chunk_size)


def test_a_chunk_whose_targets_are_all_ignored_contributes_nothing(backend, device):
    hidden, weight, bias, target = _head((12,), 6, 31, torch.float64, device, ignore_fraction=0.0)
    target[4:8] = -100  # exactly the second chunk of 4
    _assert_matches_materialised(hidden, weight, bias, target, backend, chunk_size=4)
    h = hidden.clone().requires_grad_(True)
    loss = smoothed_linear_xent(h, weight, target, bias, reduction="none", chunk_size=4, backend=backend)
    loss.sum().backward()
    assert torch.all(loss[4:8] == 0)
    assert torch.all(h.grad[4:8] == 0)
    assert torch.all(h.grad[:4].abs().sum(1) > 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_target_ignored_gives_zero_loss_and_zero_gradients(backend, device, reduction):
    hidden, weight, bias, target = _head((9,), 4, 13, torch.float32, device, ignore_fraction=1.0)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = smoothed_linear_xent(leaves[0], leaves[1], target, leaves[2], reduction=reduction, chunk_size=4,
                                backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    for leaf in leaves:
        assert torch.all(leaf.grad == 0)


def test_an_empty_batch_gives_pytorchs_nan_mean_and_zero_gradients(backend, device):
    hidden, weight, bias, target = _head((0,), 4, 13, torch.float32, device)
    w = weight.clone().requires_grad_(True)
    loss = smoothed_linear_xent(hidden, w, target, bias, backend=backend)
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.all(w.grad == 0)
    assert smoothed_linear_xent(hidden, weight, target, bias, reduction="sum", backend=backend).item() == 0.0


def test_buffers_poisoned_with_nan_are_fully_overwritten(backend, device, monkeypatch):
    real_empty = linear_module._empty

    def poisoned(*shape, dtype, device):
        return real_empty(*shape, dtype=dtype, device=device).fill_(float("nan"))

    monkeypatch.setattr(linear_module, "_empty", poisoned)
    hidden, weight, bias, target = _head((10,), 6, 19, torch.float64, device)
    for reduction in ("mean", "none"):
        _assert_matches_materialised(hidden, weight, bias, target, backend, chunk_size=4, reduction=reduction)


@pytest.mark.parametrize("grad_accumulation", ["fp32", "weight_dtype"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_holds_one_chunk_of_logits_at_a_time(device, monkeypatch, dtype, grad_accumulation):
    allocated = []
    real_empty = linear_module._empty

    def recording(*shape, dtype, device):
        allocated.append((shape, dtype))
        return real_empty(*shape, dtype=dtype, device=device)

    monkeypatch.setattr(linear_module, "_empty", recording)
    hidden, weight, bias, target = _head((40,), 8, 50, dtype, device)
    w = weight.clone().requires_grad_(True)
    smoothed_linear_xent(hidden.requires_grad_(True), w, target, bias, chunk_size=16,
                         grad_accumulation=grad_accumulation).backward()
    # one 16 x 50 logits chunk, dL/dh, dL/dW and, compensated in low precision, dL/dW's residual
    # (and on the CPU the buffer of one product slab, here all 50 rows of the vocabulary)
    expected = [((16, 50), dtype), ((40, 8), dtype), ((50, 8), dtype)]
    if dtype != torch.float32 and grad_accumulation == "fp32":
        expected.append(((50, 8), torch.bfloat16))
        if device.type == "cpu":
            expected.append(((50, 8), dtype))
    assert sorted(allocated, key=str) == sorted(expected, key=str)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_no_worse_than_the_materialised_low_precision_path(backend, device, dtype):
    """Error against the float64 truth from the same rounded inputs: at most twice eager
    PyTorch's own (F.linear and the reference in `dtype`), plus one rounding of the output."""
    # chunks of 16 x 200 logits: the fp32 dL/dW accumulation runs in slabs of 133 and 67 classes
    hidden, weight, bias, target = _head((48,), 24, 200, dtype, device)
    upstream = _upstream("mean", target)
    ours = _losses_and_grads(smoothed_linear_xent, hidden, weight, bias, target, upstream, chunk_size=16,
                             backend=backend)
    eager = _losses_and_grads(lambda h, w, t, b: smoothed_xent_reference(F.linear(h, w, b), t, 0.1),
                              hidden, weight, bias, target, upstream)
    truth = _losses_and_grads(_materialised, hidden, weight, bias, target, upstream)
    ulp = torch.finfo(dtype).eps
    pairs = [("loss", ours[0], eager[0], truth[0])] + [
        (f"grad of {n}", o, e, t) for n, o, e, t in zip(("hidden", "weight", "bias"), ours[2], eager[2], truth[2])
    ]
    for name, o, e, t in pairs:
        assert o.dtype == (torch.float32 if name == "loss" else dtype), name
        our_err = (o.double() - t).abs().max().item()
        eager_err = (e.double() - t).abs().max().item()
        assert our_err <= 2 * eager_err + ulp * t.abs().max().item(), (name, our_err, eager_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_over_many_chunks_is_rounded_about_once(backend, device, dtype):
    """256 one-token chunks: summed in `dtype`, dL/dW would be rounded 256 times (several
    times eager's error); the compensated sum keeps it at eager's level."""
    hidden, weight, _bias, target = _head((256,), 8, 32, dtype, device, bias=False, ignore_fraction=0.0)
    ours = _losses_and_grads(smoothed_linear_xent, hidden, weight, None, target, chunk_size=1, backend=backend)[2][1]
    eager = _losses_and_grads(lambda h, w, t, b: smoothed_xent_reference(F.linear(h, w), t, 0.1),
                              hidden, weight, None, target)[2][1]
    truth = _losses_and_grads(_materialised, hidden, weight, None, target)[2][1]
    scale = truth.abs().max().item()
    our_err = (ours.double() - truth).abs().max().item() / scale
    eager_err = (eager.double() - truth).abs().max().item() / scale
    assert our_err <= eager_err + torch.finfo(dtype).eps / 2, (our_err, eager_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_dtype_accumulation_rounds_dL_dW_once_per_chunk(backend, device, dtype):
    """grad_accumulation='weight_dtype': the GEMM adds each of the 4 chunks into dL/dW in
    `dtype`; every other gradient is as with the default."""
    hidden, weight, bias, target = _head((64,), 16, 96, dtype, device)
    kwargs = {"chunk_size": 16, "backend": backend}
    fast = _losses_and_grads(smoothed_linear_xent, hidden, weight, bias, target, grad_accumulation="weight_dtype",
                             **kwargs)
    exact = _losses_and_grads(smoothed_linear_xent, hidden, weight, bias, target, **kwargs)
    truth = _losses_and_grads(_materialised, hidden, weight, bias, target)
    torch.testing.assert_close(fast[0], exact[0], rtol=0, atol=0)
    for name, i in (("hidden", 0), ("bias", 2)):
        torch.testing.assert_close(fast[2][i], exact[2][i], rtol=0, atol=0, msg=name)
    scale = truth[2][1].abs().max().item()
    exact_err = (exact[2][1].double() - truth[2][1]).abs().max().item() / scale
    fast_err = (fast[2][1].double() - truth[2][1]).abs().max().item() / scale
    assert fast_err <= exact_err + 4 * torch.finfo(dtype).eps / 2, (fast_err, exact_err)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compensated_update_keeps_the_sum_in_the_pair(device, dtype, first):
    """(hi, lo) += product: hi is the new sum rounded to nearest, hi + lo carries the rest."""
    n = 3000
    hi = torch.randn(n, device=device).to(dtype)
    lo = (torch.randn(n, device=device) * hi.float().abs() * 2**-10).to(torch.bfloat16)
    product = torch.randn(n, device=device) * torch.logspace(-6, 2, n, device=device)
    exact = product.double() + (0 if first else hi.double() + lo.double())
    torch.ops.fused_ls.compensated_add_(hi, lo, product, first)
    # hi is exact's nearest neighbour in `dtype` (to within the fp32 sum's own rounding)
    inf = torch.full_like(hi, float("inf"))
    spacing = torch.maximum(torch.nextafter(hi, inf).double() - hi.double(), hi.double() - torch.nextafter(hi, -inf).double())
    assert torch.all((hi.double() - exact).abs() <= 0.5 * spacing * (1 + 2**-10))
    # 16 significant bits or more, down to fp16's subnormals (where hi itself has fewer)
    floor = torch.finfo(dtype).smallest_normal * 2**-16
    torch.testing.assert_close(hi.double() + lo.double(), exact, rtol=2**-16, atol=floor)


def test_triton_compensated_update_matches_the_eager_one(device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA, or its interpreter")
    pytest.importorskip("triton")
    from fused_ls.triton.linear import compensated_add_ as triton_update

    for dtype in (torch.bfloat16, torch.float16):
        for first in (True, False):
            hi = torch.randn(5000, device=device).to(dtype)
            lo = (torch.randn(5000, device=device) * 1e-3).to(torch.bfloat16)
            product = torch.randn(5000, device=device)
            ours_hi, ours_lo, eager_hi, eager_lo = hi.clone(), lo.clone(), hi.clone(), lo.clone()
            triton_update(ours_hi, ours_lo, product, first)
            linear_module._eager_compensated_add(eager_hi, eager_lo, product, first)
            torch.testing.assert_close(ours_hi, eager_hi, rtol=0, atol=0)
            torch.testing.assert_close(ours_lo, eager_lo, rtol=0, atol=0)


def test_opcheck_passes_for_the_compensated_update(device):
    hi = torch.randn(4, 9, device=device).to(torch.bfloat16)
    lo = torch.zeros(4, 9, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fused_ls.compensated_add_, (hi, lo, torch.randn(4, 9, device=device), False))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_in_float64(backend, device, reduction):
    hidden, weight, bias, target = _head((4,), 2, 5, torch.float64, device, ignore_fraction=0.2)
    class_weight = torch.rand(5, dtype=torch.float64, device=device) + 0.5

    def fn(h, w, b):
        return smoothed_linear_xent(h, w, target, b, 0.1, class_weight=class_weight, reduction=reduction,
                                    z_loss=1e-2, softcap=3.0, chunk_size=2, backend=backend)

    inputs = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    # Triton's float32 scalars make its float64 function smooth but slightly off the reference;
    # gradcheck compares the op with its own finite differences, so the defaults apply.
    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- autograd behaviour


def test_scalar_upstream_gradients_scale_every_gradient(backend, device):
    hidden, weight, bias, target = _head((7,), 4, 11, torch.float64, device)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    (3.0 * smoothed_linear_xent(leaves[0], leaves[1], target, leaves[2], chunk_size=3, backend=backend)).backward()
    expected = torch.autograd.grad(3.0 * _materialised(hidden.requires_grad_(), weight.requires_grad_(), target,
                                                       bias.requires_grad_()), (hidden, weight, bias))
    for leaf, e in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, e, **_f64_tol(backend))


def test_reduction_none_accepts_a_stride_zero_upstream_gradient(backend, device):
    hidden, weight, bias, target = _head((7,), 4, 11, torch.float64, device)
    w = weight.clone().requires_grad_(True)
    loss = smoothed_linear_xent(hidden, w, target, bias, reduction="none", chunk_size=3, backend=backend)
    loss.backward(torch.tensor(2.0, dtype=loss.dtype, device=device).expand_as(loss))
    ww = weight.clone().requires_grad_(True)
    (2.0 * _materialised(hidden, ww, target, bias, reduction="none").sum()).backward()
    torch.testing.assert_close(w.grad, ww.grad, **_f64_tol(backend))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_can_run_twice_with_retain_graph(backend, device, reduction):
    hidden, weight, bias, target = _head((7,), 4, 11, torch.float64, device)
    w = weight.clone().requires_grad_(True)
    loss = smoothed_linear_xent(hidden, w, target, bias, reduction=reduction, chunk_size=3, backend=backend).sum()
    loss.backward(torch.tensor(2.0, dtype=loss.dtype, device=device), retain_graph=True)
    first = w.grad.clone()
    ww = weight.clone().requires_grad_(True)
    (2.0 * _materialised(hidden, ww, target, bias, reduction=reduction).sum()).backward()
    torch.testing.assert_close(first, ww.grad, **_f64_tol(backend))
    loss.backward()
    torch.testing.assert_close(w.grad, 1.5 * first)


def test_only_the_gradients_asked_for_are_computed(backend, device):
    hidden, weight, bias, target = _head((7,), 4, 11, torch.float64, device)
    h = hidden.clone().requires_grad_(True)
    loss = smoothed_linear_xent(h, weight, target, bias, chunk_size=3, backend=backend)
    loss.backward()
    expected = torch.autograd.grad(_materialised(hidden.requires_grad_(), weight, target, bias), hidden)[0]
    torch.testing.assert_close(h.grad, expected, **_f64_tol(backend))
    with torch.no_grad():
        no_grad_loss = smoothed_linear_xent(h, weight, target, bias, chunk_size=3, backend=backend)
    assert not no_grad_loss.requires_grad
    torch.testing.assert_close(no_grad_loss, loss.detach())


def test_inference_mode_gives_the_same_loss(backend, device):
    hidden, weight, bias, target = _head((7,), 4, 11, torch.float32, device)
    expected = _materialised(hidden, weight, target, bias).float()
    with torch.inference_mode():
        loss = smoothed_linear_xent(hidden, weight, target, bias, chunk_size=3, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_head_in_the_autocast_dtype(backend, device):
    hidden, weight, bias, target = _head((8,), 16, 40, torch.float32, device)
    w = weight.clone().requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = smoothed_linear_xent(hidden, w, target, bias, chunk_size=3, backend=backend)
    loss.backward()
    assert w.grad.dtype == torch.float32
    rounded = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    expected = _materialised(rounded[0], rounded[1], target, rounded[2])
    torch.testing.assert_close(loss.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_with_fullgraph_and_matches_eager(fused_backend, device, dtype):
    torch._dynamo.reset()
    hidden, _weight, _bias, target = _head((9,), 8, 30, dtype, device)
    head = torch.nn.Linear(8, 30).to(device=device, dtype=dtype)

    def step(hidden, target):
        return smoothed_linear_xent(hidden, head.weight, target, head.bias, z_loss=1e-3, chunk_size=4,
                                    backend=fused_backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(hidden, target).backward()
    compiled_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    step(hidden, target).backward()
    for c, e in zip(compiled_grads, [p.grad for p in head.parameters()]):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_and_backward_never_sync(backend, device, reduction, dtype, cpu_target_check_allowed):  # noqa: F811
    hidden, weight, bias, target = _head((10,), 8, 30, dtype, device)
    kwargs = {"reduction": reduction, "normalizer": torch.tensor(7.0, device=device), "chunk_size": 4,
              "class_weight": torch.rand(30, device=device), "backend": backend}
    upstream = _upstream(reduction, target)
    _losses_and_grads(smoothed_linear_xent, hidden, weight, bias, target, upstream, **kwargs)  # warm-up
    with cpu_target_check_allowed():
        loss, _, grads = _losses_and_grads(smoothed_linear_xent, hidden, weight, bias, target, upstream, **kwargs)
    kwargs.pop("backend")
    expected = _losses_and_grads(_materialised, hidden, weight, bias, target, upstream, **kwargs)
    # The guarded run did the real work: norm-wise, it agrees with the materialised path.
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for ours, theirs in zip((loss, *grads), (expected[0], *expected[2])):
        ours, theirs = ours.double(), theirs.double()
        assert (ours - theirs).norm() <= rtol * theirs.norm()


def test_module_matches_the_function(backend, device):
    hidden, weight, bias, target = _head((7,), 4, 11, torch.float64, device)
    class_weight = torch.rand(11, dtype=torch.float64, device=device)
    module = SmoothedLinearCrossEntropyLoss(0.2, class_weight=class_weight, z_loss=1e-3, backend=backend)
    assert "z_loss=0.001" in repr(module)
    torch.testing.assert_close(
        module(hidden, weight, target, bias),
        smoothed_linear_xent(hidden, weight, target, bias, 0.2, class_weight=class_weight, z_loss=1e-3,
                             backend=backend),
    )


# ----------------------------------------------------------------------------- chunk size and bad input


def test_default_chunk_size_scales_with_the_inputs_above_a_floor():
    assert default_chunk_size(4096, 1024, 128256) == MIN_CHUNK_ROWS == 256
    assert default_chunk_size(8192, 512, 32000) == 512  # a sixteenth of the tokens
    assert default_chunk_size(100, 512, 32000) == 100  # never more than the tokens
    assert default_chunk_size(0, 512, 32000) == 1
    big = default_chunk_size(1 << 20, 4096, 1000)  # few classes: chunk logits <= the hidden states
    assert big * 1000 <= (1 << 20) * 4096 and big > (1 << 20) // 16


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight must be"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "same dtype"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias must be"),
        (lambda a: a.update(bias=a["bias"].double()), TypeError, "same dtype"),
        (lambda a: a.update(class_weight=torch.ones(5)), ValueError, "class_weight"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda a: a.update(grad_accumulation="bf16"), ValueError, "grad_accumulation"),
        (lambda a: a.update(target=a["target"][:-1]), ValueError, "target shape"),
        (lambda a: a.update(target=a["target"].float()), TypeError, "target"),
        (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
        (lambda a: a.update(label_smoothing=1.5), ValueError, "label_smoothing"),
    ],
)
def test_bad_input_raises_a_clear_error(change, error, match):
    hidden, weight, bias, target = _head((6,), 4, 9, torch.float32, "cpu")
    args = {"hidden": hidden, "weight": weight, "target": target, "bias": bias}
    change(args)
    with pytest.raises(error, match=match):
        smoothed_linear_xent(**args)


def test_out_of_range_target_raises_on_the_cpu():
    hidden, weight, bias, target = _head((6,), 4, 9, torch.float32, "cpu")
    target[2] = 9
    with pytest.raises(IndexError, match="out of range"):
        smoothed_linear_xent(hidden, weight, target, bias)
