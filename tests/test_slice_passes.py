"""Vocabulary parallelism's slice passes (fused_ls/_slice_op.py) on every backend, against their
defining formulas in float64.

test_parallel.py checks what they add up to across ranks; here each pass alone, on the inputs
that reach its branches: class weights, softcap with logit_scale, targets inside and outside the
slice, masked (-inf) classes and wholly masked rows, rows whose coefficients are all 0, strided
and expanded per-row inputs, in place, and output buffers poisoned before the call.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from conftest import ALL_BACKENDS
from oracle import GRAD_TOL, LOSS_TOL, TRITON_FLOAT64_GRAD_ATOL, softcapped_grad_atol
from test_native import _SCALAR_KIND, emulated_cuda  # noqa: F401  (a fixture)

import fused_ls.triton.slice_passes as triton_slice_passes
from fused_ls import backends
from fused_ls._slice_op import SliceOps, statistics_outputs

# Every backend that runs here, and the native CUDA kernels run on the CPU by
# tests/cuda_host_emulation.cpp.
EMULATED = "cuda_emulated"


class _SliceProblem(ctypes.Structure):
    """ctypes mirror of fused_ls::SliceProblem (csrc/smoothed_xent.h)."""

    _fields_ = [
        ("dtype", ctypes.c_int), ("logits", ctypes.c_void_p), ("logits_row_stride", ctypes.c_int64),
        ("grad", ctypes.c_void_p), ("grad_row_stride", ctypes.c_int64), ("column", ctypes.c_void_p),
        ("owned", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("weight_sum", ctypes.c_void_p),
        ("row_max", ctypes.c_void_p), ("log_sum", ctypes.c_void_p), ("loss", ctypes.c_void_p),
        ("p_coef", ctypes.c_void_p), ("smooth_coef", ctypes.c_void_p), ("true_coef", ctypes.c_void_p),
        ("num_rows", ctypes.c_int64), ("num_classes", ctypes.c_int64), ("k_s", ctypes.c_double),
        ("k_t", ctypes.c_double), ("softcap", ctypes.c_double), ("logit_scale", ctypes.c_double),
    ]


def _emulated_slice_ops(lib) -> SliceOps:
    """The CUDA launchers behind SliceOps' signatures, outputs poisoned with NaN first."""

    def pointer(t):
        return None if t is None else t.data_ptr()

    def problem(logits, column, weight, **fields):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        w = None if weight is None else weight.to(acc).contiguous()
        kept = [column.contiguous(), w, None if w is None else w.sum()]
        kept += [fields[k] for k in fields if isinstance(fields[k], torch.Tensor)]
        values = {k: pointer(v) if isinstance(v, torch.Tensor) or v is None else v for k, v in fields.items()}
        return _SliceProblem(dtype=_SCALAR_KIND[logits.dtype], logits=logits.data_ptr(),
                             logits_row_stride=logits.stride(0), column=kept[0].data_ptr(), weight=pointer(w),
                             weight_sum=pointer(kept[2]), num_rows=logits.shape[0], num_classes=logits.shape[1],
                             **values), kept

    def stats(logits, column, owned, weight, k_s, k_t, softcap, logit_scale):
        row_max, log_sum, loss = (t.fill_(math.nan) for t in statistics_outputs(logits))
        owned = owned.contiguous()
        p, kept = problem(logits, column, weight, owned=owned, row_max=row_max, log_sum=log_sum, loss=loss, k_s=k_s,
                          k_t=k_t, softcap=softcap, logit_scale=logit_scale)
        assert lib.fused_ls_emulated_slice_statistics(ctypes.byref(p)) == 0
        return row_max, log_sum, loss

    def grad_out(grad, logits, column, weight, *per_row_and_scalars):
        *per_row, softcap, logit_scale = per_row_and_scalars
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        row_max, log_sum, p_coef, smooth_coef, true_coef = (t.to(acc).contiguous() for t in per_row)
        p, kept = problem(logits, column, weight, grad=grad, grad_row_stride=grad.stride(0), row_max=row_max,
                          log_sum=log_sum, p_coef=p_coef, smooth_coef=smooth_coef, true_coef=true_coef,
                          softcap=softcap, logit_scale=logit_scale)
        assert lib.fused_ls_emulated_slice_gradient(ctypes.byref(p)) == 0

    def grad(logits, *args):
        out = torch.full_like(logits, math.nan, memory_format=torch.contiguous_format)
        grad_out(out, logits, *args)
        return out

    def grad_inplace(logits, *args):
        grad_out(logits, logits, *args)

    return SliceOps(EMULATED, stats, grad, grad_inplace)


@pytest.fixture(params=ALL_BACKENDS + [EMULATED])
def slice_backend(request):
    """(name, SliceOps) of every backend that runs here, the emulated CUDA kernels included."""
    if request.param == EMULATED:
        return EMULATED, _emulated_slice_ops(request.getfixturevalue("emulated_cuda"))
    return request.param, backends.slice_ops(request.param)

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _tolerance(table, dtype, backend):
    """float64 sums in another order, except that Triton takes float scalars as float32."""
    if dtype == torch.float64 and backend != "triton":
        return 1e-10, 1e-12
    rtol, atol = table[dtype]
    if dtype == torch.float64 and table is GRAD_TOL:
        atol = TRITON_FLOAT64_GRAD_ATOL
    return rtol, atol


def _transform(x, logit_scale, softcap):
    u = x.double() * logit_scale
    return softcap * torch.tanh(u / softcap) if softcap else u


def _inputs(dtype, V, weighted, masked, n=9):
    logits = (torch.randn(n, V, dtype=torch.float64) * 3).to(dtype)
    if masked:
        logits[0] = -math.inf  # a wholly masked row
        logits[1:, ::3] = -math.inf  # masked classes
    owned = torch.rand(n) < 0.6
    column = torch.randint(0, V, (n,))
    weight = torch.rand(V, dtype=torch.float64) + 0.1 if weighted else None
    if weighted:
        weight[1] = 0.0  # a class of weight 0 adds nothing, even where its logit is -inf
    return logits, column, owned, weight


def _true_statistics(logits, column, owned, weight, k_s, k_t, softcap, logit_scale):
    y = _transform(logits, logit_scale, softcap)
    n, V = y.shape
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    row_max = y.amax(dim=1)
    log_sum = torch.stack([torch.log(torch.exp(row - m).sum()) if m > -math.inf else torch.tensor(-math.inf, dtype=torch.float64)
                           for row, m in zip(y, row_max)])
    loss = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        if row_max[i] == -math.inf:
            continue
        mass = k_s * w.clone()
        if owned[i]:
            mass[column[i]] += k_t * w[column[i]]
        lse = row_max[i] + log_sum[i]
        terms = torch.where(mass != 0, mass * (lse - y[i]), 0.0)
        loss[i] = terms.sum()
    return row_max, log_sum, loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "masked"])
def test_statistics_pass_matches_its_definition(slice_backend, device, dtype, weighted, softcap, masked, monkeypatch):
    backend, ops = slice_backend
    monkeypatch.setattr(triton_slice_passes, "CHUNK_BYTES", 64)  # several chunks a row
    logits, column, owned, weight = _inputs(dtype, 37, weighted, masked)
    k_s, k_t, logit_scale = 0.1 / 50, 0.9, 1.3
    row_max, log_sum, loss = ops.stats(logits.to(device), column.to(device), owned.to(device),
                                       None if weight is None else weight.to(device), k_s, k_t, softcap, logit_scale)
    true_max, true_log_sum, true_loss = _true_statistics(logits, column, owned, weight, k_s, k_t, softcap, logit_scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert row_max.dtype == log_sum.dtype == loss.dtype == acc
    rtol, atol = _tolerance(LOSS_TOL, dtype, backend)
    torch.testing.assert_close(row_max.cpu().double(), true_max, rtol=rtol, atol=atol)
    torch.testing.assert_close(log_sum.cpu().double(), true_log_sum, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss.cpu().double(), true_loss, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("softcap", [0.0, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
def test_gradient_pass_matches_its_definition(slice_backend, device, dtype, weighted, softcap, inplace, monkeypatch):
    backend, ops = slice_backend
    monkeypatch.setattr(triton_slice_passes, "CHUNK_BYTES", 64)
    n, V = 9, 37
    logits, column, _, weight = _inputs(dtype, V, weighted, masked=False, n=n)
    logits[1, 5] = -math.inf  # a masked class: p = 0, the gradient -smooth w
    logit_scale = 0.7
    y = _transform(logits, logit_scale, softcap)
    # The global statistics of a row wider than this slice: m above the slice's max, s above its sum.
    row_max = y.amax(dim=1) + torch.rand(n, dtype=torch.float64)
    log_sum = torch.log(torch.exp(y - row_max[:, None]).sum(dim=1) + 2.0)
    p_coef = torch.rand(n, dtype=torch.float64) + 0.5
    true_coef = torch.where(torch.rand(n) < 0.5, 0.9 * p_coef, 0.0)
    smooth_value = 0.002
    p_coef[2] = true_coef[2] = 0.0  # row 2 has no gradient (ignored): zeros, whatever its logits
    logits[2] = math.nan
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    smooth_coef = torch.full((n,), smooth_value, dtype=torch.float64)
    smooth_coef[2] = 0.0

    w = torch.ones(V, dtype=torch.float64) if weight is None else weight
    p = torch.exp((y - row_max[:, None]) - log_sum[:, None])
    expected = p_coef[:, None] * p - smooth_coef[:, None] * w
    expected[torch.arange(n), column] -= true_coef
    if softcap:
        expected = expected * (1 - (y / softcap) ** 2)
    expected[2] = 0.0

    x = logits.to(device)
    # Per-row inputs as callers may pass them: log_sum a strided view.
    per_row = (row_max.to(acc), torch.stack([log_sum, log_sum], 1).to(acc)[:, 0], p_coef.to(acc),
               smooth_coef.to(acc), true_coef.to(acc))
    per_row = tuple(t.to(device) for t in per_row)
    args = (column.to(device), None if weight is None else weight.to(device), *per_row, softcap, logit_scale)
    if inplace:
        result = ops.grad_inplace(x, *args)
        assert result is None
        grad = x
    else:
        grad = ops.grad(x, *args)
        assert grad.data_ptr() != x.data_ptr()
    assert grad.dtype == dtype and grad.shape == (n, V)
    rtol, atol = _tolerance(GRAD_TOL, dtype, backend)
    if softcap:
        atol = max(atol, softcapped_grad_atol(dtype, weight, logit_scale) * float(p_coef.max()))
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=rtol, atol=atol)


def test_expanded_smoothing_coefficient_is_read_per_row(slice_backend, device):
    backend, ops = slice_backend
    n, V = 5, 24
    logits = torch.randn(n, V, device=device)
    column = torch.randint(0, V, (n,), device=device)
    stats = torch.zeros(n, device=device), torch.full((n,), 50.0, device=device)  # p = e^(y - 50): about 0
    p_coef = torch.ones(n, device=device)
    smooth = torch.full((), 0.25, device=device).expand(n)  # stride 0
    grad = ops.grad(logits, column, None, *stats, p_coef, smooth,
                                            torch.zeros(n, device=device), 0.0, 1.0)
    torch.testing.assert_close(grad, torch.full((n, V), -0.25, device=device), rtol=0, atol=1e-6)


def test_gradient_pass_overwrites_every_element_of_a_poisoned_buffer(fused_backend, device):
    n, V = 6, 40
    logits = torch.randn(n, V, device=device)
    poisoned = torch.full((n, V), math.nan, device=device)
    poisoned.copy_(logits)  # the in-place pass's input: every element is rewritten
    column = torch.randint(0, V, (n,), device=device)
    row_max = logits.amax(1)
    log_sum = torch.logsumexp(logits - row_max[:, None], 1)
    coefs = torch.ones(n, device=device), torch.full((n,), 0.01, device=device), torch.zeros(n, device=device)
    coefs[0][3] = 0.0
    coefs[1][3] = 0.0  # row 3: zeros
    backends.slice_ops(fused_backend).grad_inplace(poisoned, column, None, row_max, log_sum, *coefs, 0.0, 1.0)
    expected = torch.softmax(logits, 1) - 0.01
    expected[3] = 0.0
    torch.testing.assert_close(poisoned, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["column_out_of_range", "column_int32", "short_coefficients"])
def test_native_slice_passes_reject_bad_arguments(bad):
    if backends._native_status()[0] is None:
        pytest.skip("the native extension is not built")
    ops = backends.slice_ops("native")
    logits = torch.randn(4, 10)
    column = torch.tensor([0, 3, 9, 2])
    coef = torch.ones(4)
    if bad == "column_out_of_range":
        column[2] = 10
    elif bad == "column_int32":
        column = column.int()
    with pytest.raises(RuntimeError, match="column|p_coef"):
        if bad == "short_coefficients":
            ops.grad(logits, column, None, coef, coef, coef[:3], coef, coef, 0.0, 1.0)
        else:
            ops.stats(logits, column, torch.ones(4, dtype=torch.bool), None, 0.01, 0.9, 0.0, 1.0)
