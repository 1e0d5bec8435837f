"""What real users pass and do, on every backend: masked vocabularies, strided tensors,
second derivatives, in-place misuse, compiled cold starts, and the argument edge cases.

Each test compares with a float64 oracle (PyTorch's own F.cross_entropy where the two
definitions agree, else tests/oracle.py) or states an exact property.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from oracle import loss_and_grad, truth

from fused_ls import SmoothedCrossEntropyLoss, SmoothedLinearCrossEntropyLoss, smoothed_linear_xent, smoothed_xent

INF = math.inf


def _masked_logits(device, n=5, V=23, dtype=torch.float32):
    logits = torch.randn(n, V, device=device, dtype=torch.float64) * 2
    logits[0, 3] = -INF  # one masked class
    logits[1, 10:] = -INF  # the padded tail of a vocabulary
    logits[2, :7] = -INF
    return logits.to(dtype)


# ----------------------------------------------------------------------------- masked vocabularies


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_masked_classes_give_pytorchs_loss_and_a_finite_gradient(backend, device, eps):
    logits = _masked_logits(device)
    target = torch.tensor([0, 4, 12, 22, -100], device=device)
    loss, grad = loss_and_grad(smoothed_xent, logits, target, eps, reduction="none", backend=backend)
    x = logits.double().requires_grad_(True)
    expected = F.cross_entropy(x, target, label_smoothing=eps, reduction="none")
    expected.sum().backward()
    # eps = 0: masked classes cost nothing, every loss is finite; eps > 0: a masked class with
    # mass eps/V makes that row's loss inf, as in PyTorch. Never NaN.
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-5, atol=2e-5)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-5, atol=1e-7)


def test_a_masked_target_gives_inf_not_nan(backend, device):
    logits = torch.randn(3, 17, device=device)
    logits[1, 5] = -INF
    target = torch.tensor([0, 5, 16], device=device)
    for eps in (0.0, 0.1):
        loss = smoothed_xent(logits, target, eps, reduction="none", backend=backend)
        expected = F.cross_entropy(logits.double(), target, label_smoothing=eps, reduction="none")
        assert loss[1] == INF
        torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)


def test_a_masked_class_of_weight_zero_adds_nothing(backend, device):
    # The one deliberate difference: PyTorch multiplies -inf by the weight 0 and gives NaN.
    logits = torch.randn(2, 9, device=device)
    logits[:, 4] = -INF
    weight = torch.rand(9, device=device) + 0.5
    weight[4] = 0.0
    target = torch.tensor([1, 8], device=device)
    loss = smoothed_xent(logits, target, 0.1, weight=weight, reduction="none", backend=backend)
    kept = [c for c in range(9) if c != 4]
    logp = torch.log_softmax(logits[:, kept].double(), dim=1)  # class 4 has probability 0
    w = weight[kept].double()
    nll_target = -logp[[0, 1], [1, 7]]
    expected = 0.9 * weight[target].double() * nll_target + 0.1 / 9 * -(logp * w).sum(1)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)


def test_masked_classes_through_the_linear_head(backend, device):
    hidden = torch.randn(6, 5, device=device)
    weight = torch.randn(19, 5, device=device)
    bias = torch.zeros(19, device=device)
    bias[12:] = -INF  # a padded vocabulary masked through the bias
    target = torch.randint(0, 12, (6,), device=device)
    loss = smoothed_linear_xent(hidden, weight, target, bias, 0.0, reduction="none", backend=backend)
    expected = F.cross_entropy(F.linear(hidden, weight, bias).double(), target, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- strides


def test_strided_and_expanded_targets_and_weights_are_read_with_their_strides(backend, device):
    N, V = 6, 21
    logits = torch.randn(N, V, device=device)
    targets = torch.randint(0, V, (N, 3), device=device)
    target = targets[:, 1]  # a column: stride 3
    weights = torch.rand(2 * V, device=device) + 0.2
    for weight in (weights[::2], torch.full((), 0.7, device=device).expand(V)):
        for tgt in (target, target.to(torch.int32), targets[0, 0].expand(N)):
            loss, grad = loss_and_grad(smoothed_xent, logits, tgt, 0.1, weight=weight, backend=backend)
            true_loss, true_grad = truth(logits, tgt.contiguous(), 0.1, weight=weight.contiguous())
            torch.testing.assert_close(loss.double(), true_loss, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(grad.double(), true_grad, rtol=1e-5, atol=1e-7)


def test_the_linear_head_reads_strided_targets_and_class_weights(backend, device):
    hidden = torch.randn(7, 4, device=device, dtype=torch.float64)
    weight = torch.randn(13, 4, device=device, dtype=torch.float64)
    target = torch.randint(0, 13, (7, 2), device=device)[:, 1]
    class_weight = (torch.rand(26, device=device, dtype=torch.float64) + 0.3)[::2]
    loss = smoothed_linear_xent(hidden, weight, target, None, 0.1, class_weight=class_weight, backend=backend)
    expected = F.cross_entropy(hidden @ weight.t(), target, weight=class_weight, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-7)


# ----------------------------------------------------------------------------- precision


def test_float32_loss_is_shift_invariant(backend, device):
    logits = torch.randn(4, 300, device=device)
    target = torch.randint(0, 300, (4,), device=device)
    shifted = logits + 1e4  # exactly representable shifts of fp32 values near 1e4
    loss = smoothed_xent(shifted, target, 0.1, reduction="none", backend=backend)
    expected = F.cross_entropy(shifted.double(), target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def _half_ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 8)  # bf16 keeps 8 significant bits


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_recompute_backward_rounds_the_bf16_gradient_once(fused_backend, device, reduction):
    N, V = 8, 300
    logits = (torch.randn(N, V, device=device) * 3).to(torch.bfloat16)
    target = torch.randint(0, V, (N,), device=device)
    if reduction == "none":
        upstream = torch.rand(N, device=device) * 3 + 0.1  # per-token weights
    else:
        upstream = torch.tensor(0.37, device=device)  # a loss divided by accumulation steps
    _, true_grad = truth(logits, target, 0.1, reduction=reduction, upstream=upstream)
    # An fp32 value rounded once is within half an ulp of the truth, plus the fp32 error of
    # its terms, (p_c + q_c) times the row's scale, to a few ulps.
    p = torch.softmax(logits.double(), dim=-1)
    q = torch.full_like(p, 0.1 / V)
    q[torch.arange(N), target] += 0.9
    row_scale = upstream.double() if reduction == "none" else upstream.double().expand(N) / N
    bound = _half_ulp_bf16(true_grad) + 2.0**-21 * (p + q) * row_scale.unsqueeze(1)

    def elements_off(**mode):
        _, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, reduction=reduction, upstream=upstream,
                                backend=fused_backend, **mode)
        return int(((grad.double() - true_grad).abs() > bound).sum())

    assert elements_off(recompute_backward=True) == 0
    # The default rounds the gradient, then rounds it again times the upstream gradient: the
    # same check catches that, so it can fail.
    assert elements_off() > 0


def test_recompute_backward_gives_the_saved_gradient_for_an_upstream_of_one(fused_backend, device):
    logits = torch.randn(5, 40, device=device).to(torch.bfloat16)
    target = torch.randint(0, 40, (5,), device=device)
    kwargs = dict(weight=torch.rand(40, device=device) + 0.5, z_loss=1e-3, softcap=4.0, backend=fused_backend)
    loss_a, grad_a = loss_and_grad(smoothed_xent, logits, target, 0.1, **kwargs)
    loss_b, grad_b = loss_and_grad(smoothed_xent, logits, target, 0.1, recompute_backward=True, **kwargs)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)


def test_recompute_backward_refuses_inplace(fused_backend, device):
    logits = torch.randn(2, 5, device=device, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="exclude each other"):
        smoothed_xent(logits, torch.zeros(2, dtype=torch.long, device=device), inplace_backward=True,
                      recompute_backward=True, backend=fused_backend)


# ----------------------------------------------------------------------------- second derivatives


def _gradient_penalty(loss_fn, x):
    (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    return grad.square().sum()


def test_a_second_derivative_through_a_fused_backend_raises(fused_backend, device):
    # Refused when the graph of the gradient is asked for: its penalty would otherwise be
    # silently differentiated as if the fused gradient were a constant.
    x = torch.randn(3, 11, device=device, requires_grad=True)
    target = torch.randint(0, 11, (3,), device=device)
    with pytest.raises(RuntimeError, match="cannot differentiate it again"):
        _gradient_penalty(lambda x: smoothed_xent(x, target, 0.1, backend=fused_backend), x)


def test_the_eager_backend_is_twice_differentiable(device):
    x = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 6, -100], device=device)
    kwargs = dict(z_loss=1e-2, softcap=3.0, logit_scale=1.3, convention="others", backend="torch")
    assert torch.autograd.gradgradcheck(lambda x: smoothed_xent(x, target, 0.2, **kwargs), (x,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_second_derivative_through_the_fused_linear_head_raises(fused_backend, device, reduction):
    hidden = torch.randn(4, 3, device=device, requires_grad=True)
    weight = torch.randn(9, 3, device=device)
    target = torch.randint(0, 9, (4,), device=device)
    with pytest.raises(RuntimeError, match="cannot differentiate it again"):
        _gradient_penalty(
            lambda h: smoothed_linear_xent(h, weight, target, reduction=reduction, backend=fused_backend).sum(), hidden)


# ----------------------------------------------------------------------------- in place


@pytest.mark.parametrize("shape, make_view", [
    pytest.param((27,), lambda p: p.view(3, 9), id="view"),
    pytest.param((3, 12), lambda p: p[:, :9], id="column_slice"),
    pytest.param((3, 9), lambda p: p.reshape(3, 9), id="reshape"),
])
def test_inplace_refuses_a_view_of_a_parameter(fused_backend, device, shape, make_view):
    param = torch.nn.Parameter(torch.randn(shape, device=device))
    before = param.detach().clone()
    with pytest.raises(ValueError, match="leaf tensor"):
        smoothed_xent(make_view(param), torch.zeros(3, dtype=torch.long, device=device), inplace_backward=True,
                      backend=fused_backend)
    assert torch.equal(param.detach(), before)


@pytest.mark.parametrize("share", [
    pytest.param(lambda x: x[:1].expand(4, 10), id="expanded"),
    pytest.param(lambda x: x.reshape(-1)[:20].unfold(0, 10, 3)[:4], id="unfolded"),  # strides (3, 1)
])
def test_inplace_refuses_logits_whose_elements_share_memory(fused_backend, device, share):
    x = torch.randn(4, 10, device=device, requires_grad=True)
    logits = share(x * 1.0)  # an op output, viewed so that rows overlap
    with pytest.raises(ValueError, match="do not share memory"):
        smoothed_xent(logits, torch.tensor([0, 1, 2, 3], device=device), inplace_backward=True, backend=fused_backend)


def test_an_ignored_row_gets_no_gradient_whatever_its_upstream(backend, device):
    for mode in ({}, {"recompute_backward": True}, {"inplace_backward": True}):
        if backend == "torch" and mode.get("inplace_backward"):
            continue
        leaf = torch.randn(3, 6, device=device, requires_grad=True)
        loss = smoothed_xent(leaf * 1.0, torch.tensor([1, -100, 2], device=device), 0.1, reduction="none",
                             backend=backend, **mode)
        loss.backward(torch.tensor([1.0, math.inf, 0.5], device=device))
        assert torch.all(leaf.grad[1] == 0) and torch.isfinite(leaf.grad).all(), mode


# ----------------------------------------------------------------------------- compilation


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environment, timeout=600)


def _subprocess_env(backend: str) -> dict:
    return {"TRITON_INTERPRET": "1"} if backend == "triton" and not torch.cuda.is_available() else {}


def test_a_compiled_call_can_be_the_first_call_of_a_process(backend, device):
    result = _run_python(f"""
        import torch
        from fused_ls import smoothed_xent
        step = torch.compile(smoothed_xent, fullgraph=True)
        x = torch.randn(6, 20, device="{device}", requires_grad=True)
        t = torch.randint(0, 20, (6,), device="{device}")
        loss = step(x, t, 0.1, backend="{backend}")
        loss.backward()
        expected = torch.nn.functional.cross_entropy(x.double(), t, label_smoothing=0.1)
        torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)
        print("ok")
    """, **_subprocess_env(backend))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_dynamic_shapes_compile_once_for_every_batch_size(backend, device):
    torch._dynamo.reset()
    compiled = []

    def counting(gm, inputs):
        compiled.append(gm)
        return gm.forward

    step = torch.compile(smoothed_xent, fullgraph=True, dynamic=True, backend=counting)
    for n in (8, 5, 13):
        logits = torch.randn(n, 24, device=device)
        target = torch.randint(0, 24, (n,), device=device)
        loss, grad = loss_and_grad(step, logits, target, 0.1, z_loss=1e-3, backend=backend)
        true_loss, true_grad = truth(logits, target, 0.1, z_loss=1e-3)
        torch.testing.assert_close(loss.double(), true_loss, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(grad.double(), true_grad, rtol=1e-5, atol=1e-7)
    assert len(compiled) == 1  # the row count stays symbolic; the class count is part of the masses


def test_the_first_call_does_not_import_the_compiler(backend, device):
    result = _run_python(f"""
        import sys, torch
        from fused_ls import smoothed_xent
        x = torch.randn(4, 9, device="{device}", requires_grad=True)
        smoothed_xent(x, torch.tensor([0, 1, 2, -100], device="{device}"), backend="{backend}").backward()
        with torch.no_grad():
            smoothed_xent(x, torch.tensor([0, 1, 2, 3], device="{device}"), backend="{backend}")
        print("dynamo imported:", "torch._dynamo" in sys.modules)
    """, **_subprocess_env(backend))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dynamo imported: False" in result.stdout


# ----------------------------------------------------------------------------- arguments


def test_an_ignore_index_beyond_int32_ignores_no_int32_target(backend, device):
    logits = torch.randn(5, 12, device=device)
    target = torch.tensor([0, 3, 0, 11, 7], device=device, dtype=torch.int32)
    ignore_index = -(2**40)  # wraps to 0 if compared in int32
    loss, grad = loss_and_grad(smoothed_xent, logits, target, 0.1, ignore_index=ignore_index, backend=backend)
    true_loss, true_grad = truth(logits, target.long(), 0.1)
    torch.testing.assert_close(loss.double(), true_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), true_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ignore_index", [2.5, None, "x"])
def test_a_non_integer_ignore_index_is_refused(backend, device, ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        smoothed_xent(torch.randn(2, 4, device=device), torch.tensor([0, 1], device=device), 0.1,
                      ignore_index=ignore_index, backend=backend)


def test_a_weighted_mean_whose_weights_sum_to_zero_is_nan_as_in_pytorch(backend, device):
    logits = torch.randn(3, 6, device=device, requires_grad=True)
    target = torch.tensor([1, 2, 2], device=device)
    weight = torch.ones(6, device=device)
    weight[[1, 2]] = 0.0
    loss = smoothed_xent(logits, target, 0.1, weight=weight, backend=backend)
    assert torch.isnan(F.cross_entropy(logits.detach(), target, weight=weight, label_smoothing=0.1))
    assert torch.isnan(loss)


def test_every_row_ignored_still_gives_zero_with_weights(backend, device):
    logits = torch.randn(3, 6, device=device, requires_grad=True)
    target = torch.full((3,), -100, device=device)
    loss = smoothed_xent(logits, target, 0.1, weight=torch.rand(6, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_class_weights_that_require_grad_are_refused_as_in_pytorch(backend, device):
    weight = torch.rand(6, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="pass weight.detach"):
        smoothed_xent(torch.randn(3, 6, device=device), torch.tensor([0, 1, 2], device=device), weight=weight,
                      backend=backend)
    # under no_grad nothing can be differentiated: accepted
    with torch.no_grad():
        smoothed_xent(torch.randn(3, 6, device=device), torch.tensor([0, 1, 2], device=device), weight=weight,
                      backend=backend)


def test_a_normalizer_that_requires_grad_is_differentiated(backend, device):
    logits = torch.randn(4, 10, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 2, -100, 9], device=device)
    normalizer = torch.tensor(2.5, device=device, dtype=torch.float64, requires_grad=True)
    smoothed_xent(logits, target, 0.1, normalizer=normalizer, z_loss=1e-3, backend=backend).backward()
    # d(sum / n)/dn = -sum / n^2
    row_sum = smoothed_xent(logits.detach(), target, 0.1, reduction="sum", z_loss=1e-3, backend="torch")
    torch.testing.assert_close(normalizer.grad, -row_sum / 2.5**2, rtol=1e-7, atol=1e-9)


def test_the_modules_check_their_tensors_and_exclusive_options_when_built():
    with pytest.raises(TypeError, match="1-D"):
        SmoothedCrossEntropyLoss(0.1, weight=torch.ones(2, 3))
    with pytest.raises(ValueError, match="exclude each other"):
        SmoothedCrossEntropyLoss(0.1, inplace_backward=True, recompute_backward=True)
    with pytest.raises(TypeError, match="1-D"):
        SmoothedLinearCrossEntropyLoss(0.1, class_weight=torch.ones(2, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        SmoothedLinearCrossEntropyLoss(0.1, chunk_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SmoothedLinearCrossEntropyLoss(0.1, inplace_backward=True)


def test_a_malformed_normalizer_is_refused_on_every_backend(backend, device):
    logits, target = torch.randn(2, 4, device=device), torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="0-d tensor"):
        smoothed_xent(logits, target, normalizer=torch.tensor([3.0, 4.0], device=device), backend=backend)
    with pytest.raises(TypeError, match="normalizer must be a number"):
        smoothed_xent(logits, target, normalizer="3", backend=backend)


def test_the_linear_head_under_vmap_says_what_to_use(device):
    hidden, weight = torch.randn(3, 4, 5, device=device), torch.randn(7, 5, device=device)
    target = torch.randint(0, 7, (3, 4), device=device)
    with pytest.raises(ValueError, match="torch.func transforms"):
        torch.vmap(lambda h, t: smoothed_linear_xent(h, weight, t))(hidden, target)


def test_the_module_refuses_class_weights_in_the_label_smoothing_slot():
    with pytest.raises(TypeError, match="pass class weights as weight="):
        SmoothedCrossEntropyLoss(torch.ones(5))


@pytest.mark.parametrize("kwargs, error", [
    (dict(reduction="avg"), ValueError),
    (dict(convention="fairseq"), ValueError),
    (dict(ignore_index=None), TypeError),
    (dict(softcap=-1.0), ValueError),
    (dict(z_loss=math.nan), ValueError),
    (dict(label_smoothin=0.1), TypeError),
    (dict(backend="bogus"), ValueError),
    (dict(z_loss_denominator="x"), ValueError),
    (dict(normalizer="3"), TypeError),
    (dict(normalizer=torch.ones(2)), ValueError),
])
@pytest.mark.parametrize("module", [SmoothedCrossEntropyLoss, SmoothedLinearCrossEntropyLoss])
def test_the_modules_check_their_arguments_when_built(module, kwargs, error):
    with pytest.raises(error):
        module(0.1, **kwargs)


def test_pytorchs_class_dimension_layout_gets_a_hint(backend, device):
    logits = torch.randn(2, 7, 5, device=device)  # (N, C, d1) as F.cross_entropy takes it
    target = torch.randint(0, 7, (2, 5), device=device)
    with pytest.raises(ValueError, match=r"movedim\(1, -1\)"):
        smoothed_xent(logits, target, backend=backend)
    moved = smoothed_xent(logits.movedim(1, -1), target, 0.1, backend=backend)
    torch.testing.assert_close(moved.double(), F.cross_entropy(logits.double(), target, label_smoothing=0.1),
                               rtol=2e-5, atol=2e-5)


def test_an_infinite_softcap_caps_nothing(backend, device):
    logits = torch.randn(3, 8, device=device)
    target = torch.randint(0, 8, (3,), device=device)
    capped = smoothed_xent(logits, target, 0.1, softcap=INF, backend=backend)
    plain = smoothed_xent(logits, target, 0.1, backend=backend)
    assert torch.isfinite(capped) and torch.equal(capped, plain)


def test_meta_tensors_on_the_native_backend_get_a_clear_error():
    from fused_ls import available_backends

    if "native" not in available_backends("cpu"):
        pytest.skip("no native extension")
    with pytest.raises(RuntimeError, match="not on meta tensors"):
        smoothed_xent(torch.randn(2, 4, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
                      backend="native")


def test_meta_tensors_give_output_shapes_with_auto(device):
    loss = smoothed_xent(torch.randn(2, 4, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"),
                         reduction="none")
    assert loss.device.type == "meta" and loss.shape == (2,)


def test_vmap_runs_with_auto_and_matches_the_unbatched_loss(device):
    logits = torch.randn(3, 4, 9, device=device)
    target = torch.randint(0, 9, (3, 4), device=device)
    batched = torch.vmap(lambda x, t: smoothed_xent(x, t, 0.1))(logits, target)
    one_by_one = torch.stack([smoothed_xent(x, t, 0.1) for x, t in zip(logits, target)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-6, atol=1e-6)


def test_vmap_with_an_explicit_fused_backend_says_to_use_torch(fused_backend, device):
    logits = torch.randn(3, 4, 9, device=device)
    target = torch.randint(0, 9, (3, 4), device=device)
    with pytest.raises(ValueError, match="use backend='torch'"):
        torch.vmap(lambda x, t: smoothed_xent(x, t, 0.1, backend=fused_backend))(logits, target)


@pytest.mark.parametrize("head", [False, True])
def test_z_loss_over_tokens_gives_liger_kernels_weighted_mean(backend, device, head):
    N, V, H = 7, 15, 4
    hidden = torch.randn(N, H, device=device, dtype=torch.float64)
    lm_head = torch.randn(V, H, device=device, dtype=torch.float64)
    logits = hidden @ lm_head.t()
    target = torch.randint(0, V, (N,), device=device)
    target[2] = -100
    weight = torch.rand(V, device=device, dtype=torch.float64) + 0.2
    z = 0.01
    kwargs = dict(weight=weight, z_loss=z, z_loss_denominator="tokens", backend=backend)
    if head:
        kwargs["class_weight"] = kwargs.pop("weight")
        loss = smoothed_linear_xent(hidden, lm_head, target, None, 0.1, **kwargs)
    else:
        loss = smoothed_xent(logits, target, 0.1, **kwargs)
    valid = target != -100
    cross_entropy = F.cross_entropy(logits, target, weight=weight, label_smoothing=0.1)  # over the weight sum
    z_term = z * torch.logsumexp(logits[valid], dim=1).square().mean()  # over the tokens
    torch.testing.assert_close(loss, cross_entropy + z_term, rtol=1e-7, atol=1e-8)
    default = smoothed_xent(logits, target, 0.1, weight=weight, z_loss=z, backend=backend)
    weight_sum = weight[target[valid]].sum()
    torch.testing.assert_close(default, cross_entropy + z_term * valid.sum() / weight_sum, rtol=1e-7, atol=1e-8)
