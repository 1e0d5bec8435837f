"""Fused label-smoothed cross-entropy in Triton: loss, lse and gradient in one launch.

The maths, per row of V logits x with target t (t == ignore_index: loss 0, grad 0)
---------------------------------------------------------------------------------
    u   = logit_scale * x
    y   = softcap * tanh(u / softcap)            (y = u without softcap)
    m   = max_c y_c,   s = sum_c exp(y_c - m),   lse = m + log s,   p_c = exp((y_c - m) - log s)

The smoothed target gives class c the mass  q_c = k_s w_c + k_t w_t [c == t]  where w are
the class weights (all 1 without `weight`), and
    uniform (PyTorch):  k_s = eps/V,      k_t = 1 - eps
    others  (fairseq):  k_s = eps/(V-1),  k_t = 1 - eps - eps/(V-1)
so with W = sum_c w_c the total mass is A = k_s W + k_t w_t (1 without weights), and

    loss = sum_c q_c (lse - y_c) + z lse^2
         = A log s + k_s D + q_t (m - y_t) + z lse^2,    D = sum_{c != t, w_c != 0} w_c (m - y_c)
    dloss/dy_c = (A + 2 z lse) p_c - k_s w_c - k_t w_t [c == t]
    dloss/dx_c = dloss/dy_c * logit_scale * (1 - (y_c / softcap)^2)     (no last factor without softcap)

Every term of D is >= 0 and is formed as a difference to the row's max before it is
summed, so nothing large is subtracted and adding a constant to every logit changes the
loss by rounding only (m W - sum w y would cancel catastrophically for large logits). The
streamed path keeps D relative to its running max r, moving it when the max rises:
D <- D + W_seen (r_new - r_old) + sum_chunk w_c (r_new - y_c), where W_seen counts only
the finite logits seen so far. p_c is formed from y_c - m for the same reason. The
gradient is computed in fp32 (fp64 for fp64 logits), multiplied by `grad_scale` (a scalar,
or one value per row: an upstream gradient folded in) and rounded once to the logits'
dtype: the true class's p_t - k_t never passes through bf16. Float64 logits (for
gradcheck) accumulate in float64, but Triton passes the float scalars (k_s, k_t, z_loss, ...)
as float32, so such results carry their rounding, about 1e-8 relative.

A logit of -inf (a masked class) has p_c = 0, and its term q_c (lse - y_c) is +inf when
q_c > 0 and exactly 0 when q_c == 0, never 0 * inf = NaN: with eps = 0 a masked non-target
class costs nothing (as in F.cross_entropy), a masked class of weight 0 costs nothing
(PyTorch gives NaN there), and a masked target gives +inf unless q_t is 0 (eps = 1 with
"others": k_t = -k_s). Hence the true class is left out of D and carries its whole mass
q_t = (k_s + k_t) w_t in its own term, k_s D and q_t (m - y_t) are dropped when their mass
is 0, and lanes of weight 0 are left out of D. The gradient stays finite. A row whose
logits are all -inf has no finite max and gives NaN, as in PyTorch.

A target outside [0, V) that is not ignore_index is never dereferenced: y_t is picked out
of the row by comparison, its loss is NaN and its gradient row is 0.

Memory traffic per row (b = bytes per logit)
--------------------------------------------
    V <= single-block limit:  read V*b, write V*b (+ V*4 for weights, cached across rows)
    larger rows:              read 2*V*b (the second pass re-reads the row, mostly from L2),
                              write V*b
Nothing else of size V is written: the loss and lse are 4 bytes per row. The loss-only op
(WRITE_GRAD=False, for a forward that needs no gradient) stops after pass 1: read V*b, no
write of size V, and no gradient buffer allocated.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fused_ls._row_op import define_row_ops

# Rows up to this many logits are held in registers and read once; longer rows are
# streamed twice in chunks of CHUNKED_BLOCK. A whole row of 16384 does not fit: at 16 or 32
# warps ptxas spills 40 to 100 bytes a thread (tests/triton_targets.py), so 8 warps hold at
# most 8192. Tests lower both to reach the chunked path at sizes the interpreter can run.
MAX_SINGLE_BLOCK = 8192
CHUNKED_BLOCK = 8192


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    u = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(a) = 1 - 2 / (exp(2a) + 1): finite for every a, exact at +-inf.
        u = softcap * (1.0 - 2.0 / (tl.exp(2.0 * u / softcap) + 1.0))
    return u


@triton.jit
def _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap,
                HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """(mask, transformed logits, class weights) for the lanes `offs` of one row."""
    mask = offs < V
    y = _transform(tl.load(logits_row + offs, mask=mask, other=0.0).to(ACC), logit_scale, softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs.to(tl.int64) * stride_weight, mask=mask, other=0.0).to(ACC)
    else:
        w = 1.0
    return mask, y, w


@triton.jit
def _distance_sum(y, w, mask, offs, t, ref, HAS_WEIGHT: tl.constexpr):
    """(sum of w (ref - y), sum of w over finite y) over the lanes that carry weight, the
    true class t excepted (its whole mass is applied apart).

    A lane of weight 0 adds exactly 0 even where y is -inf; a finite lane adds w (ref - y) >= 0
    for ref >= y, so the sum never cancels."""
    keep = mask & (offs != t)
    if HAS_WEIGHT:
        keep = keep & (w != 0.0)
    d = tl.sum(w * tl.where(keep, ref - y, 0.0), axis=0)
    w_finite = tl.sum(tl.where(keep & (y > -float("inf")), w, 0.0), axis=0)
    return d, w_finite


@triton.jit
def _to_output(g, out_ty: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr):
    """Round the fp32 gradient once, to nearest-even, into the output dtype."""
    if EMULATE_RTNE_BF16:
        # Triton's CPU interpreter truncates fp32 -> bf16 where GPUs round to nearest even;
        # round the bits here so that tests under the interpreter see the GPU's numbers.
        bits = g.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        g = bits.to(tl.float32, bitcast=True)
    return g.to(out_ty)


@triton.jit
def _row_gradient(y, w, offs, t, p_coef, k_s, true_mass, m, log_s, grad_scale, logit_scale, softcap,
                  HAS_SOFTCAP: tl.constexpr):
    # y - m first: exact for nearby large logits, where y - lse would carry lse's rounding.
    p = tl.exp((y - m) - log_s)
    g = p_coef * p - k_s * w - tl.where(offs == t, true_mass, 0.0)
    dydx = logit_scale
    if HAS_SOFTCAP:
        c = y / softcap
        dydx = logit_scale * (1.0 - c * c)
    return g * (dydx * grad_scale)


@triton.jit
def smoothed_xent_fwd_kernel(
    logits_ptr,        # (N, V) any float dtype, unit stride along V
    grad_ptr,          # (N, V) gradient out, logits' dtype; may be logits_ptr itself (in place); unused without WRITE_GRAD
    target_ptr,        # (N,) int32 or int64, any stride (0 for one target broadcast to every row)
    weight_ptr,        # (V,) class weights, any stride; read only when HAS_WEIGHT
    weight_sum_ptr,    # 0-d, sum of the class weights, read only when HAS_WEIGHT
    grad_scale_ptr,    # (N,) multiplies row i's gradient, any stride (0 for a scalar); read only with WRITE_GRAD
    loss_ptr,          # (N,) per-row loss out
    lse_ptr,           # (N,) per-row logsumexp of the transformed logits out
    stride_logits_row, stride_grad_row, stride_target, stride_weight, stride_grad_scale,
    V, ignore_index,
    k_s, k_t,          # smoothing mass per unit of class weight; extra mass on the true class
    z_loss, softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr, ACC: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # False: the loss and lse only (pass 1), no gradient
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    grad_row = grad_ptr + row * stride_grad_row
    t = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
        w_t = tl.load(weight_ptr + t * stride_weight, mask=in_range & ~ignored, other=0.0).to(ACC)
    else:
        weight_sum = V * 1.0
        w_t = 1.0
    offs0 = tl.arange(0, BLOCK)

    # Pass 1: max, sum of exp, D = sum of w (m - y) over c != t, and y_t.
    if SINGLE_PASS:
        mask, y, w = _load_chunk(logits_row, weight_ptr, stride_weight, offs0, V, logit_scale, softcap,
                                 HAS_SOFTCAP, HAS_WEIGHT, ACC)
        y_masked = tl.where(mask, y, -float("inf"))
        m = tl.max(y_masked, axis=0)
        # A finite reference: a row of -inf only would give -inf - -inf = NaN in every lane.
        r = tl.where(m == -float("inf"), 0.0, m)
        s = tl.sum(tl.exp(y_masked - r), axis=0)
        d, _ = _distance_sum(y, w, mask, offs0, t, r, HAS_WEIGHT)
        y_t = tl.sum(tl.where(offs0 == t, y, 0.0), axis=0)
    else:
        # Streamed with a running max m and its finite stand-in r; s and d are kept
        # relative to r and moved whenever it rises.
        m = tl.full((), -float("inf"), ACC)
        r = tl.zeros((), ACC)
        s = tl.zeros((), ACC)
        d = tl.zeros((), ACC)
        w_seen = tl.zeros((), ACC)
        y_t = tl.zeros((), ACC)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            mask, yc, wc = _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap,
                                       HAS_SOFTCAP, HAS_WEIGHT, ACC)
            yc_masked = tl.where(mask, yc, -float("inf"))
            m_new = tl.maximum(m, tl.max(yc_masked, axis=0))
            r_new = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - r_new) + tl.sum(tl.exp(yc_masked - r_new), axis=0)
            d_chunk, w_chunk = _distance_sum(yc, wc, mask, offs, t, r_new, HAS_WEIGHT)
            # w_seen counts finite lanes only, whose reference was the true max, so r_new >= r.
            d = d + w_seen * (r_new - r) + d_chunk
            w_seen += w_chunk
            m = m_new
            r = r_new
            y_t += tl.sum(tl.where(offs == t, yc, 0.0), axis=0)

    log_s = tl.log(s)
    lse = m + log_s
    true_mass = k_t * w_t
    total_mass = k_s * weight_sum + true_mass
    # A term whose mass is 0 is exactly 0, even when its distance is +inf (a masked class).
    q_t = (k_s + k_t) * w_t
    smooth_term = k_s * tl.where(k_s != 0.0, d, 0.0)
    true_term = q_t * tl.where(q_t != 0.0, m - y_t, 0.0)
    loss = total_mass * log_s + smooth_term + true_term + z_loss * lse * lse
    # An ignored row and a row with an out-of-range target get a zero gradient.
    active = in_range & ~ignored
    p_coef = tl.where(active, total_mass + 2.0 * z_loss * lse, 0.0)
    k_s_row = tl.where(active, k_s, 0.0)
    true_mass = tl.where(active, true_mass, 0.0)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    # Pass 2: the gradient, rounded once to the output dtype.
    if WRITE_GRAD:
        # Zero, not the scale, on rows without a gradient: a NaN or inf scale (a mean over a
        # zero denominator) must not turn their 0 into NaN.
        grad_scale = tl.where(active, tl.load(grad_scale_ptr + row * stride_grad_scale).to(ACC), 0.0)
        if SINGLE_PASS:
            g = _row_gradient(y, w, offs0, t, p_coef, k_s_row, true_mass, m, log_s, grad_scale, logit_scale,
                              softcap, HAS_SOFTCAP)
            tl.store(grad_row + offs0, _to_output(g, grad_ptr.dtype.element_ty, EMULATE_RTNE_BF16), mask=mask)
        else:
            for start in range(0, V, BLOCK):
                offs = start + offs0
                mask, yc, wc = _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap,
                                           HAS_SOFTCAP, HAS_WEIGHT, ACC)
                g = _row_gradient(yc, wc, offs, t, p_coef, k_s_row, true_mass, m, log_s, grad_scale, logit_scale,
                                  softcap, HAS_SOFTCAP)
                tl.store(grad_row + offs, _to_output(g, grad_ptr.dtype.element_ty, EMULATE_RTNE_BF16), mask=mask)


@triton.jit
def scale_rows_kernel(
    grad_ptr,          # (N, V) gradient, scaled in place
    scale_ptr,         # (N,) per-row scale, any stride (0 for a broadcast scalar)
    stride_grad_row, stride_scale,
    V,
    BLOCK: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + row * stride_scale).to(tl.float32)
    # The usual upstream gradient of a scalar loss is exactly 1: decide on the device,
    # without a host sync, that there is nothing to do, and skip the memory traffic.
    if scale != 1.0:
        mask = col < V
        ptrs = grad_ptr + row * stride_grad_row + col
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, _to_output(g * scale, grad_ptr.dtype.element_ty, EMULATE_RTNE_BF16), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _launch_config(V: int, dtype: torch.dtype) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_PASS, num_warps) for a row of V logits."""
    if V <= MAX_SINGLE_BLOCK:
        block = max(triton.next_power_of_2(V), 16)
        single = True
    else:
        block = CHUNKED_BLOCK
        single = False
    num_warps = 4 if block <= 2048 else 8
    return block, single, num_warps


def smoothed_xent_rows_out(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    loss_out: torch.Tensor,
    lse_out: torch.Tensor,
    k_s: float,
    k_t: float,
    ignore_index: int,
    z_loss: float,
    softcap: float,
    logit_scale: float,
) -> None:
    """Launch the fused kernel, writing into the given buffers (grad_out may be logits).

    target (N,) and weight (V,) may have any stride, 0 included. grad_scale holds one
    element (0-d or (1,)) scaling every row, or N (any stride) scaling row i by
    grad_scale[i]. With grad_out None (and grad_scale None) only the loss and lse are
    computed."""
    N, V = logits.shape
    if N == 0:
        return
    block, single, num_warps = _launch_config(V, logits.dtype)
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    has_weight = weight is not None
    write_grad = grad_out is not None
    stride_grad_scale = _grad_scale_stride(grad_scale, N) if write_grad else 0
    unused = loss_out  # a valid pointer for the arguments a launch never reads
    smoothed_xent_fwd_kernel[(N,)](
        logits, grad_out if write_grad else logits, target,
        weight if has_weight else unused, weight_sum if has_weight else unused,
        grad_scale if write_grad else unused, loss_out, lse_out,
        logits.stride(0), grad_out.stride(0) if write_grad else 0,
        target.stride(0), weight.stride(0) if has_weight else 0, stride_grad_scale,
        V, ignore_index,
        k_s, k_t, z_loss, softcap if softcap > 0 else 1.0, logit_scale,
        HAS_WEIGHT=has_weight, HAS_SOFTCAP=softcap > 0,
        BLOCK=block, SINGLE_PASS=single, ACC=acc, EMULATE_RTNE_BF16=write_grad and _emulate_rtne(grad_out),
        WRITE_GRAD=write_grad, num_warps=num_warps,
    )


def _grad_scale_stride(grad_scale: torch.Tensor, num_rows: int) -> int:
    """The kernel's row stride into grad_scale: 0 for one value shared by every row."""
    if grad_scale.numel() == 1 and grad_scale.dim() <= 1:
        return 0
    if grad_scale.dim() == 1 and grad_scale.shape[0] == num_rows:
        return grad_scale.stride(0)
    raise ValueError(
        f"fused_ls: grad_scale must hold one element or one per row ({num_rows}), got shape {tuple(grad_scale.shape)}"
    )


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i, :] *= scale[i] in place; rows whose scale is exactly 1 are not touched."""
    N, V = grad.shape
    if N == 0 or V == 0:
        return
    block = min(triton.next_power_of_2(V), 4096)
    scale_rows_kernel[(N, triton.cdiv(V, block))](grad, scale, grad.stride(0), scale.stride(0), V,
                                                       BLOCK=block, EMULATE_RTNE_BF16=_emulate_rtne(grad))


def _emulate_rtne(out: torch.Tensor) -> bool:
    return out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- registration
# The row op's contract (fused_ls/_row_op.py) under its own names, so that the native ops can
# be loaded at once; fused_ls/backends.py picks a backend by name, never by device.


def _run_out(logits, target, weight, grad_scale, grad, loss, lse, k_s, k_t, ignore_index, z_loss, softcap,
             logit_scale):
    weight_sum = None
    if weight is not None:
        weight_sum = weight.sum(dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32)
    smoothed_xent_rows_out(logits, target, weight, weight_sum, grad_scale, grad, loss, lse,
                           k_s, k_t, ignore_index, z_loss, softcap, logit_scale)


ROW_OPS = define_row_ops("_triton", _run_out)
