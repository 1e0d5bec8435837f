"""Fused label-smoothed cross-entropy in Triton: loss, lse and gradient in one launch.

The maths (derivation, numerics, masked classes): docs/maths.md. Per row of V logits x with
target t, y = softcap * tanh(logit_scale * x / softcap), m = max y, s = sum exp(y - m),
lse = m + log s, and with the masses k_s, k_t of the convention (q_c = k_s w_c + k_t w_t [c == t]):

    loss = A log s + k_s D + (k_s + k_t) w_t (m - y_t) + z lse^2,   A = k_s W + k_t w_t,
           D = sum_{c != t, w_c != 0} w_c (m - y_c)    (kept against a running max when streamed)
    dloss/dx_c = ((A + 2 z lse) p_c - k_s w_c - k_t w_t [c == t]) * grad_scale_row
                 * logit_scale * (1 - (y_c / softcap)^2)

computed in fp32 (fp64 for fp64 logits) and rounded once to the logits' dtype. A term of mass 0
is exactly 0 even at a logit of -inf; an ignored row gets loss 0 and gradient 0, an out-of-range
target is never dereferenced (loss NaN, gradient 0). Float64 logits accumulate in float64, but
Triton passes the float scalars (k_s, k_t, ...) as float32: about 1e-8 relative.

Memory traffic per row (b = bytes per logit; docs/traffic-model.md counts it per launch)
--------------------------------------------------------------------------------------
    single (row in registers):   read V*b, write V*b (+ V*4 for weights, cached across rows)
    streamed:                    read 2*V*b (the second read from L2 only if the rows in flight
                                 fit it), write V*b
    persistent (L2 hints):       read V*b from DRAM and V*b from L2, write V*b, when the rows in
                                 flight fit 3/4 of L2
    ignored row:                 read V*b once (its lse), write V*b zeros, no second read
    lse given (precomputed_lse): read V*b once, write V*b (given_lse_kernel)
Nothing else of size V is written: the loss and lse are 4 bytes per row. The loss-only op
(WRITE_GRAD=False) stops after pass 1: read V*b, no write of size V, no gradient allocated.
With PREDICT pass 1 also keeps the first class of the running max (a compare and a min per chunk,
8 bytes written per row): each row's argmax, with no further read.
Every access of a chunk is 16 bytes wide, whatever V: where Triton cannot prove it (V or the row
stride not a multiple of 16 elements, V = 50257 say) the fused kernel splits each row into a
16-byte-aligned body and fewer than 16 bytes of scalar edges on each side (ALIGN, aligned_body).
Streamed and persistent programs over 8 KiB chunks of 2-byte logits load each chunk one chunk
ahead of its use (LOAD_AHEAD): two chunks in flight a program, as a 16 KiB chunk has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fused_ls._row_op import check_row_op_arguments, class_weight_sum, define_row_ops
from fused_ls.triton import tuning

# By default rows up to this many logits are held in registers and read once; longer rows
# are streamed twice in chunks of CHUNKED_BLOCK (2-byte logits; half as many of 4 bytes). At 8 warps 8192 logits fit; 16384 fit 16
# warps only without weights and softcap (ptxas spills otherwise: tests/triton_targets.py).
# Chunks of 4096 at 8 warps need about 100 registers a thread (8192 needed 234, one program
# an SM). Tests lower both to reach the streamed path at sizes the interpreter can run.
MAX_SINGLE_BLOCK = 8192
CHUNKED_BLOCK = 4096
GIVEN_LSE_CHUNK_BYTES = 8192  # the logits a given-lse program holds at once, as a streamed chunk


@triton.jit
def _transform(x, logit_scale, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr):
    u = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(a) = 1 - 2 / (exp(2a) + 1): finite for every a, exact at +-inf; one exp and one
        # division per element (inv_softcap is 1/softcap, computed once on the host).
        u = softcap * (1.0 - 2.0 / (tl.exp(2.0 * u / softcap) + 1.0))
    return u


@triton.jit
def _load_chunk(logits_row, weight_ptr, stride_weight, offs, length, logit_scale, softcap, inv_softcap,
                HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, EVICTION: tl.constexpr):
    """(mask, transformed logits, class weights) for the lanes `offs` < `length` of a stretch
    of a row that starts at `logits_row` (and its class weights at `weight_ptr`)."""
    x = tl.load(logits_row + offs, mask=offs < length, other=0.0, eviction_policy=EVICTION)
    return _chunk_of(x, weight_ptr, stride_weight, offs, length, logit_scale, softcap, inv_softcap,
                     HAS_SOFTCAP, HAS_WEIGHT, ACC)


@triton.jit
def _chunk_of(x, weight_ptr, stride_weight, offs, length, logit_scale, softcap, inv_softcap,
              HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """(mask, transformed logits, class weights) of the logits `x` loaded from lanes `offs`."""
    mask = offs < length
    y = _transform(x.to(ACC), logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs.to(tl.int64) * stride_weight, mask=mask, other=0.0).to(ACC)
    else:
        w = 1.0
    return mask, y, w


@triton.jit
def _load_edges(logits_row, weight_ptr, stride_weight, head, tail_start, V, logit_scale, softcap, inv_softcap,
                VEC: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """(classes, mask, transformed logits, class weights) of the classes outside a row's aligned
    body: lanes 0..VEC-1 the `head` classes before it, lanes VEC..2VEC-1 those from `tail_start`."""
    lanes = tl.arange(0, 2 * VEC)
    cls = tl.where(lanes < VEC, lanes, tail_start + lanes - VEC)
    mask = tl.where(lanes < VEC, lanes < head, cls < V)
    x = tl.load(logits_row + cls, mask=mask, other=0.0)
    y = _transform(x.to(ACC), logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cls.to(tl.int64) * stride_weight, mask=mask, other=0.0).to(ACC)
    else:
        w = 1.0
    return cls, mask, y, w


@triton.jit
def _fold(m, r, s, d, w_seen, y, w, mask, lanes, t_lane, HAS_WEIGHT: tl.constexpr):
    """The running statistics of a row with one more stretch of it folded in: the max m and
    its finite stand-in r, and s, d kept relative to r, moved whenever it rises."""
    y_masked = tl.where(mask, y, -float("inf"))
    m_new = tl.maximum(m, tl.max(y_masked, axis=0))
    # A finite reference: a row of -inf only would give -inf - -inf = NaN in every lane.
    r_new = tl.where(m_new == -float("inf"), 0.0, m_new)
    s = s * tl.exp(m - r_new) + tl.sum(tl.exp(y_masked - r_new), axis=0)
    d_chunk, w_chunk = _distance_sum(y, w, mask, lanes, t_lane, r_new, HAS_WEIGHT)
    # w_seen counts finite lanes only, whose reference was the true max, so r_new >= r.
    d = d + w_seen * (r_new - r) + d_chunk
    w_seen += w_chunk
    return m_new, r_new, s, d, w_seen


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


# The first class at a row's max, before any class is seen (and where a NaN max matches none).
_NO_CLASS = tl.constexpr(2147483647)


@triton.jit
def _fold_argmax(best_class, m_before, m, y, mask, classes):
    """The first class holding the row's running max, with one more stretch folded in: `m` is
    the max after it (from _fold), `m_before` the max before. Stretches may come out of class
    order (the aligned body's edges are folded first), so a tie keeps the smaller class. Starts
    at _NO_CLASS; a row of -inf only ends at its smallest class, 0, as torch.argmax gives."""
    here = tl.min(tl.where(mask & (y == m), classes, _NO_CLASS), axis=0)
    return tl.where(m > m_before, here, tl.minimum(best_class, here))


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
def _row_gradient(y, w, offs, t, p_coef, k_s, true_mass, m, log_s, grad_scale, logit_scale, inv_softcap,
                  HAS_SOFTCAP: tl.constexpr):
    # y - m first: exact for nearby large logits, where y - lse would carry lse's rounding.
    p = tl.exp((y - m) - log_s)
    g = p_coef * p - k_s * w - tl.where(offs == t, true_mass, 0.0)
    dydx = logit_scale
    if HAS_SOFTCAP:
        c = y * inv_softcap
        dydx = logit_scale * (1.0 - c * c)
    return g * (dydx * grad_scale)


@triton.jit
def _row_loss(m, s, d, y_t, w_t, weight_sum, k_s, k_t, z_loss, in_range, ignored):
    """(loss, lse, log s, p_coef, k_s, k_t w_t) of a row from its statistics; the last three are
    0 on a row without a gradient (ignored, or a target out of range)."""
    log_s = tl.log(s)
    lse = m + log_s
    true_mass = k_t * w_t
    total_mass = k_s * weight_sum + true_mass
    # A term whose mass is 0 is exactly 0, even when its distance is +inf (a masked class).
    q_t = (k_s + k_t) * w_t
    smooth_term = k_s * tl.where(k_s != 0.0, d, 0.0)
    true_term = q_t * tl.where(q_t != 0.0, m - y_t, 0.0)
    loss = total_mass * log_s + smooth_term + true_term + z_loss * lse * lse
    active = in_range & ~ignored
    p_coef = tl.where(active, total_mass + 2.0 * z_loss * lse, 0.0)
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    return loss, lse, log_s, p_coef, tl.where(active, k_s, 0.0), tl.where(active, true_mass, 0.0)


@triton.jit
def _one_row(
    row, logits_ptr, grad_ptr, target_ptr, weight_ptr, weight_sum_ptr, grad_scale_ptr, loss_ptr, lse_ptr,
    predicted_ptr, stride_logits_row, stride_grad_row, stride_target, stride_weight, stride_grad_scale,
    V, ignore_index, k_s, k_t, z_loss, softcap, inv_softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr,
    ACC: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr, WRITE_GRAD: tl.constexpr, L2_HINTS: tl.constexpr,
    ALIGN: tl.constexpr, PREDICT: tl.constexpr,
):
    logits_row = logits_ptr + row * stride_logits_row
    grad_row = grad_ptr + row * stride_grad_row
    t = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    # The target's lane, compared with int32 lane offsets (an int64 compare would widen every
    # lane's offset to 64 bits); -1, a lane no row has, for an ignored or out-of-range target.
    t_lane = tl.where(in_range, t, -1).to(tl.int32)
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
        w_t = tl.load(weight_ptr + t * stride_weight, mask=in_range & ~ignored, other=0.0).to(ACC)
    else:
        weight_sum = V * 1.0
        w_t = 1.0
    # The target's logit, read on its own: one element, from a row that is read anyway, where
    # picking it out of every chunk would cost each lane a compare and a sum in the loop.
    x_t = tl.load(logits_row + tl.where(in_range, t, 0), mask=in_range, other=0.0)
    y_t = _transform(x_t.to(ACC), logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
    offs0 = tl.arange(0, BLOCK)
    # The body: the classes read in BLOCK-lane chunks. With ALIGN (rows whose starts are not all
    # 16 bytes apart, V = 50257 say) it is the row's 16-byte-aligned middle, of a whole number
    # of vectors, so that every chunk is read and written with 16-byte accesses; the few classes
    # before and after it (fewer than VEC each) are the edges, one small scalar block.
    if ALIGN:
        VEC: tl.constexpr = 16 // (logits_ptr.dtype.element_ty.primitive_bitwidth // 8)
        head = tl.minimum(((VEC - (row * stride_logits_row) % VEC) % VEC).to(tl.int32), V)
        body_len = tl.multiple_of((V - head) // VEC * VEC, VEC)
        logits_body = logits_ptr + tl.multiple_of(row * stride_logits_row + head, VEC)
        grad_body = grad_ptr + tl.multiple_of(row * stride_grad_row + head, VEC)
        weight_body = weight_ptr + head.to(tl.int64) * stride_weight
        t_body = t_lane - head  # the target's lane in the body (negative: not in it)
    else:
        head = 0
        body_len = V
        logits_body = logits_row
        grad_body = grad_row
        weight_body = weight_ptr
        t_body = t_lane
    # With L2_HINTS the first read asks L2 to keep the row for the second, which then lets
    # it go: the persistent schedule keeps the rows in flight within L2, so the second read
    # costs no DRAM traffic.
    FIRST_READ: tl.constexpr = "evict_last" if L2_HINTS and WRITE_GRAD else ""
    # Streamed chunks of 8 KiB (4096 2-byte logits): each chunk's load is issued one chunk ahead of
    # its use, so that two are in flight a program, the bytes a GPU's DRAM latency asks for
    # (docs/traffic-model.md). A 16 KiB chunk (8192 2-byte or 4096 4-byte logits) already carries
    # them, and the registers for a second one spill at 16 warps (sm_100, sm_90).
    LOAD_AHEAD: tl.constexpr = (logits_ptr.dtype.element_ty.primitive_bitwidth == 16) and (BLOCK <= 4096)
    SECOND_READ: tl.constexpr = "evict_first" if L2_HINTS else ""

    # Pass 1: max, sum of exp and D = sum of w (m - y) over c != t, folded stretch by stretch.
    m = tl.full((), -float("inf"), ACC)
    r = tl.zeros((), ACC)
    s = tl.zeros((), ACC)
    d = tl.zeros((), ACC)
    w_seen = tl.zeros((), ACC)
    # With PREDICT, the row's argmax: the first class holding its running max.
    best_class = tl.full((), _NO_CLASS, tl.int32)
    if ALIGN:
        cls_e, mask_e, y_e, w_e = _load_edges(logits_row, weight_ptr, stride_weight, head, head + body_len, V,
                                              logit_scale, softcap, inv_softcap, VEC, HAS_SOFTCAP, HAS_WEIGHT, ACC)
        m_before = m
        m, r, s, d, w_seen = _fold(m, r, s, d, w_seen, y_e, w_e, mask_e, cls_e, t_lane, HAS_WEIGHT)
        if PREDICT:
            best_class = _fold_argmax(best_class, m_before, m, y_e, mask_e, cls_e)
    if SINGLE_PASS:
        # The whole body in registers, kept for the gradient: the row is read once.
        mask, y, w = _load_chunk(logits_body, weight_body, stride_weight, offs0, body_len, logit_scale, softcap,
                                 inv_softcap, HAS_SOFTCAP, HAS_WEIGHT, ACC, "")
        m_before = m
        m, r, s, d, w_seen = _fold(m, r, s, d, w_seen, y, w, mask, offs0, t_body, HAS_WEIGHT)
        if PREDICT:
            best_class = _fold_argmax(best_class, m_before, m, y, mask, offs0 + head)
    else:
        if LOAD_AHEAD:
            x_next = tl.load(logits_body + offs0, mask=offs0 < body_len, other=0.0, eviction_policy=FIRST_READ)
        for start in range(0, body_len, BLOCK):
            offs = start + offs0
            if LOAD_AHEAD:
                x = x_next
                x_next = tl.load(logits_body + BLOCK + offs, mask=BLOCK + offs < body_len, other=0.0,
                                 eviction_policy=FIRST_READ)
                mask, yc, wc = _chunk_of(x, weight_body, stride_weight, offs, body_len, logit_scale, softcap,
                                         inv_softcap, HAS_SOFTCAP, HAS_WEIGHT, ACC)
            else:
                mask, yc, wc = _load_chunk(logits_body, weight_body, stride_weight, offs, body_len, logit_scale,
                                           softcap, inv_softcap, HAS_SOFTCAP, HAS_WEIGHT, ACC, FIRST_READ)
            m_before = m
            m, r, s, d, w_seen = _fold(m, r, s, d, w_seen, yc, wc, mask, offs, t_body, HAS_WEIGHT)
            if PREDICT:
                best_class = _fold_argmax(best_class, m_before, m, yc, mask, offs + head)

    loss, lse, log_s, p_coef, k_s_row, true_mass = _row_loss(m, s, d, y_t, w_t, weight_sum, k_s, k_t, z_loss,
                                                             in_range, ignored)
    # An ignored row and a row with an out-of-range target get a zero gradient.
    active = in_range & ~ignored
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if PREDICT:  # 0 where a NaN max matched no class
        tl.store(predicted_ptr + row, tl.where(best_class < V, best_class, 0).to(tl.int64))

    # Pass 2: the gradient, rounded once to the output dtype.
    if WRITE_GRAD:
        out_ty: tl.constexpr = grad_ptr.dtype.element_ty
        # Zero, not the scale, on rows without a gradient: a NaN or inf scale (a mean over a
        # zero denominator) must not turn their 0 into NaN.
        grad_scale = tl.where(active, tl.load(grad_scale_ptr + row * stride_grad_scale).to(ACC), 0.0)
        if ALIGN:
            g_e = _row_gradient(y_e, w_e, cls_e, t_lane, p_coef, k_s_row, true_mass, m, log_s, grad_scale,
                                logit_scale, inv_softcap, HAS_SOFTCAP)
            g_e = tl.where(active, g_e, 0.0)
            tl.store(grad_row + cls_e, _to_output(g_e, out_ty, EMULATE_RTNE_BF16), mask=mask_e)
        if SINGLE_PASS:
            g = _row_gradient(y, w, offs0, t_body, p_coef, k_s_row, true_mass, m, log_s, grad_scale, logit_scale,
                              inv_softcap, HAS_SOFTCAP)
            g = tl.where(active, g, 0.0)  # also where a row of -inf made p NaN
            tl.store(grad_body + offs0, _to_output(g, out_ty, EMULATE_RTNE_BF16), mask=mask)
        elif active:
            if LOAD_AHEAD:
                x_next = tl.load(logits_body + offs0, mask=offs0 < body_len, other=0.0, eviction_policy=SECOND_READ)
            for start in range(0, body_len, BLOCK):
                offs = start + offs0
                if LOAD_AHEAD:
                    x = x_next
                    x_next = tl.load(logits_body + BLOCK + offs, mask=BLOCK + offs < body_len, other=0.0,
                                     eviction_policy=SECOND_READ)
                    mask, yc, wc = _chunk_of(x, weight_body, stride_weight, offs, body_len, logit_scale, softcap,
                                             inv_softcap, HAS_SOFTCAP, HAS_WEIGHT, ACC)
                else:
                    mask, yc, wc = _load_chunk(logits_body, weight_body, stride_weight, offs, body_len, logit_scale,
                                               softcap, inv_softcap, HAS_SOFTCAP, HAS_WEIGHT, ACC, SECOND_READ)
                g = _row_gradient(yc, wc, offs, t_body, p_coef, k_s_row, true_mass, m, log_s, grad_scale,
                                  logit_scale, inv_softcap, HAS_SOFTCAP)
                tl.store(grad_body + offs, _to_output(g, out_ty, EMULATE_RTNE_BF16), mask=mask)
        else:
            # An ignored row: its gradient is 0, and its logits need not be read again.
            zeros = tl.zeros((BLOCK,), out_ty)
            for start in range(0, body_len, BLOCK):
                offs = start + offs0
                tl.store(grad_body + offs, zeros, mask=offs < body_len)


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
    predicted_ptr,     # (N,) int64 per-row argmax out, written only with PREDICT
    stride_logits_row, stride_grad_row, stride_target, stride_weight, stride_grad_scale,
    N, V, ignore_index,
    k_s, k_t,          # smoothing mass per unit of class weight; extra mass on the true class
    z_loss, softcap, inv_softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_PASS: tl.constexpr, ACC: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # False: the loss and lse only (pass 1), no gradient
    PERSISTENT: tl.constexpr,  # a grid smaller than N, each program taking every num_programs-th row
    L2_HINTS: tl.constexpr,    # cache-eviction hints that keep a row in L2 between its two reads
    ALIGN: tl.constexpr,       # rows not all 16-byte aligned: an aligned body and scalar edges (_one_row)
    PREDICT: tl.constexpr,     # also each row's argmax (the first class of largest y)
):
    if PERSISTENT:
        for row in range(tl.program_id(0), N, tl.num_programs(0)):
            _one_row(tl.cast(row, tl.int64), logits_ptr, grad_ptr, target_ptr, weight_ptr, weight_sum_ptr,
                     grad_scale_ptr, loss_ptr, lse_ptr, predicted_ptr, stride_logits_row, stride_grad_row,
                     stride_target, stride_weight, stride_grad_scale, V, ignore_index, k_s, k_t, z_loss, softcap,
                     inv_softcap, logit_scale,
                     HAS_WEIGHT, HAS_SOFTCAP, BLOCK, SINGLE_PASS, ACC, EMULATE_RTNE_BF16, WRITE_GRAD, L2_HINTS, ALIGN,
                     PREDICT)
    else:
        _one_row(tl.program_id(0).to(tl.int64), logits_ptr, grad_ptr, target_ptr, weight_ptr, weight_sum_ptr,
                 grad_scale_ptr, loss_ptr, lse_ptr, predicted_ptr, stride_logits_row, stride_grad_row, stride_target,
                 stride_weight, stride_grad_scale, V, ignore_index, k_s, k_t, z_loss, softcap, inv_softcap,
                 logit_scale,
                 HAS_WEIGHT, HAS_SOFTCAP, BLOCK, SINGLE_PASS, ACC, EMULATE_RTNE_BF16, WRITE_GRAD, L2_HINTS, ALIGN,
                 PREDICT)


# Partials a segment publishes for its row: r (its finite max stand-in), m (its max), s = sum
# exp(y - r), d = sum w (r - y) over c != t, w_seen = sum of w over its finite lanes, y_t, and
# the first class at its max m.
_PARTIALS = tl.constexpr(8)  # padded to a power of two


@triton.jit
def smoothed_xent_split_kernel(
    logits_ptr, grad_ptr, target_ptr, weight_ptr, weight_sum_ptr, grad_scale_ptr, loss_ptr, lse_ptr, predicted_ptr,
    partials_ptr,      # (N, SEGMENTS, _PARTIALS) float32/64 scratch
    arrivals_ptr,      # (N,) int32, zero before the launch: segments of the row that published
    stride_logits_row, stride_grad_row, stride_target, stride_weight, stride_grad_scale,
    N, V, ignore_index, k_s, k_t, z_loss, softcap, inv_softcap, logit_scale,
    SEGMENTS,          # segments a row has (the grid is a multiple of it)
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr,
    SEGMENTS_POW2: tl.constexpr, ACC: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr, WRITE_GRAD: tl.constexpr,
    PHASE: tl.constexpr,  # 0: one cooperative launch; 1 then 2: two launches (the interpreter's split-phase mode)
    PREDICT: tl.constexpr,
):
    """Each row split into SEGMENTS segments of BLOCK logits, one program a segment, every
    segment held in registers from its read to its gradient: the logits are read from DRAM
    once. The programs of a row exchange their partials through `partials_ptr` and wait on
    `arrivals_ptr`, so all of them must be resident at once: a cooperative launch of a grid
    that is a multiple of SEGMENTS, each program taking the items p, p + grid, ... in turn
    (the programs of one row always work on it in the same turn, so no wait can deadlock)."""
    offs0 = tl.arange(0, BLOCK)
    parts = tl.arange(0, _PARTIALS)
    for item in range(tl.program_id(0), N * SEGMENTS, tl.num_programs(0)):
        row = tl.cast(item // SEGMENTS, tl.int64)
        segment = item % SEGMENTS
        logits_row = logits_ptr + row * stride_logits_row
        t = tl.load(target_ptr + row * stride_target).to(tl.int64)
        ignored = t == ignore_index
        in_range = (t >= 0) & (t < V)
        t_lane = tl.where(in_range, t, -1).to(tl.int32)
        offs = segment * BLOCK + offs0
        mask, y, w = _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap, inv_softcap,
                                 HAS_SOFTCAP, HAS_WEIGHT, ACC, "")
        row_partials = partials_ptr + row * (SEGMENTS * _PARTIALS)
        if PHASE != 2:
            y_masked = tl.where(mask, y, -float("inf"))
            m_j = tl.max(y_masked, axis=0)
            r_j = tl.where(m_j == -float("inf"), 0.0, m_j)
            s_j = tl.sum(tl.exp(y_masked - r_j), axis=0)
            d_j, w_seen_j = _distance_sum(y, w, mask, offs, t_lane, r_j, HAS_WEIGHT)
            y_t_j = tl.sum(tl.where(offs == t_lane, y, 0.0), axis=0)
            published = tl.where(parts == 0, r_j, tl.where(parts == 1, m_j, tl.where(parts == 2, s_j, tl.where(
                parts == 3, d_j, tl.where(parts == 4, w_seen_j, y_t_j)))))
            if PREDICT:
                # The segment's first class at its max, exact in the partials' float (the
                # launcher keeps V below 2^24 with PREDICT).
                at_j = tl.min(tl.where(mask & (y_masked == m_j), offs, _NO_CLASS), axis=0).to(ACC)
                published = tl.where(parts == 6, at_j, published)
                tl.store(row_partials + segment * _PARTIALS + parts, published, mask=parts < 7)
            else:
                tl.store(row_partials + segment * _PARTIALS + parts, published, mask=parts < 6)
            # Every thread's stores are done before the one release that announces them.
            tl.debug_barrier()
            tl.atomic_add(arrivals_ptr + row, 1, sem="release", scope="gpu")
        if PHASE != 1:
            if PHASE == 0:
                arrived = tl.atomic_add(arrivals_ptr + row, 0, sem="acquire", scope="gpu")
                while arrived < SEGMENTS:
                    arrived = tl.atomic_add(arrivals_ptr + row, 0, sem="acquire", scope="gpu")
                tl.debug_barrier()
            # The row's statistics from its segments' partials, the same in every program.
            seg = tl.arange(0, SEGMENTS_POW2)
            seg_mask = seg < SEGMENTS
            base = row_partials + seg * _PARTIALS
            r_all = tl.load(base + 0, mask=seg_mask, other=0.0, volatile=True)
            m_all = tl.load(base + 1, mask=seg_mask, other=-float("inf"), volatile=True)
            s_all = tl.load(base + 2, mask=seg_mask, other=0.0, volatile=True)
            d_all = tl.load(base + 3, mask=seg_mask, other=0.0, volatile=True)
            w_all = tl.load(base + 4, mask=seg_mask, other=0.0, volatile=True)
            y_t = tl.sum(tl.load(base + 5, mask=seg_mask, other=0.0, volatile=True), axis=0)
            m = tl.max(m_all, axis=0)
            r = tl.where(m == -float("inf"), 0.0, m)
            s = tl.sum(s_all * tl.exp(r_all - r), axis=0)
            # d_j was taken against r_j <= r: each finite lane of weight w moves by w (r - r_j).
            d = tl.sum(d_all + tl.where(w_all != 0.0, w_all * (r - r_all), 0.0), axis=0)
            if HAS_WEIGHT:
                weight_sum = tl.load(weight_sum_ptr).to(ACC)
                w_t = tl.load(weight_ptr + t * stride_weight, mask=in_range & ~ignored, other=0.0).to(ACC)
            else:
                weight_sum = V * 1.0
                w_t = 1.0
            loss, lse, log_s, p_coef, k_s_row, true_mass = _row_loss(m, s, d, y_t, w_t, weight_sum, k_s, k_t,
                                                                     z_loss, in_range, ignored)
            active = in_range & ~ignored
            if segment == 0:
                tl.store(loss_ptr + row, loss)
                tl.store(lse_ptr + row, lse)
                if PREDICT:
                    # The first segment holding the row's max, and its first class there.
                    at_all = tl.load(base + 6, mask=seg_mask & (m_all == m), other=float("inf"), volatile=True)
                    first = tl.min(at_all, axis=0)
                    tl.store(predicted_ptr + row, tl.where(first < V, first, 0.0).to(tl.int64))  # 0 for a NaN max
            if WRITE_GRAD:
                grad_scale = tl.where(active, tl.load(grad_scale_ptr + row * stride_grad_scale).to(ACC), 0.0)
                g = _row_gradient(y, w, offs, t_lane, p_coef, k_s_row, true_mass, m, log_s, grad_scale, logit_scale,
                                  inv_softcap, HAS_SOFTCAP)
                g = tl.where(active, g, 0.0)  # also where a row of -inf made p NaN
                tl.store(grad_ptr + row * stride_grad_row + offs, _to_output(g, grad_ptr.dtype.element_ty,
                                                                             EMULATE_RTNE_BF16), mask=mask)


# The row op when a previous pass already has each row's lse (precomputed_lse): with lse known,
# p_c = exp(y_c - lse) needs no max or sum first, so every chunk of a row is finished the moment
# it is read, and a row is read once whatever V (read V*b, write V*b; the streamed launch reads
# 2 V*b). The loss is taken as k_s sum_{c != t} w_c (lse - y_c) + (k_s + k_t) w_t (lse - y_t)
# + z lse^2: for the row's true lse every distance is >= 0, so the sum never cancels. The
# caller's lse is trusted: the results are those of the lse given. One program a row, streaming
# chunks of GIVEN_LSE_CHUNK_BYTES.
@triton.jit
def given_lse_kernel(
    logits_ptr,        # (N, V) unit stride along V
    grad_ptr,          # (N, V) out, logits' dtype; may be logits_ptr (in place); unused without WRITE_GRAD
    target_ptr,        # (N,) int32 or int64, any stride
    weight_ptr,        # (V,) class weights, read only when HAS_WEIGHT
    weight_sum_ptr,    # 0-d, their sum, read only when HAS_WEIGHT
    grad_scale_ptr,    # (N,) any stride (0 for one scale); read only with WRITE_GRAD
    given_lse_ptr,     # (N,) the caller's lse, any stride
    loss_ptr, lse_ptr,  # (N,) out
    predicted_ptr,     # (N,) int64 out, written only with PREDICT
    stride_logits_row, stride_grad_row, stride_target, stride_weight, stride_grad_scale, stride_given_lse,
    V, ignore_index, k_s, k_t, z_loss, softcap, inv_softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    EMULATE_RTNE_BF16: tl.constexpr, WRITE_GRAD: tl.constexpr, PREDICT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    grad_row = grad_ptr + row * stride_grad_row
    t = tl.load(target_ptr + row * stride_target).to(tl.int64)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    active = in_range & ~ignored
    t_lane = tl.where(in_range, t, -1).to(tl.int32)
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
        w_t = tl.load(weight_ptr + t * stride_weight, mask=active, other=0.0).to(ACC)
    else:
        weight_sum = V * 1.0
        w_t = 1.0
    x_t = tl.load(logits_row + tl.where(in_range, t, 0), mask=in_range, other=0.0)
    y_t = _transform(x_t.to(ACC), logit_scale, softcap, inv_softcap, HAS_SOFTCAP)
    lse = tl.load(given_lse_ptr + row * stride_given_lse).to(ACC)
    # The row's statistics as m = lse, s = 1 (log s = 0) and no smoothing sum yet: every term
    # but the smoothing sum, and the gradient's coefficients.
    one = tl.full((), 1.0, ACC)
    loss, lse, log_s, p_coef, k_s_row, true_mass = _row_loss(lse, one, 0.0 * one, y_t, w_t, weight_sum, k_s, k_t,
                                                             z_loss, in_range, ignored)
    if WRITE_GRAD:
        out_ty: tl.constexpr = grad_ptr.dtype.element_ty
        grad_scale = tl.where(active, tl.load(grad_scale_ptr + row * stride_grad_scale).to(ACC), 0.0)
    offs0 = tl.arange(0, BLOCK)
    d = tl.zeros((), ACC)
    running_max = tl.full((), -float("inf"), ACC)
    best_class = tl.full((), _NO_CLASS, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        mask, y, w = _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap, inv_softcap,
                                 HAS_SOFTCAP, HAS_WEIGHT, ACC, "")
        d_chunk, _ = _distance_sum(y, w, mask, offs, t_lane, lse, HAS_WEIGHT)
        d += d_chunk
        if PREDICT:
            max_before = running_max
            running_max = tl.maximum(running_max, tl.max(tl.where(mask, y, -float("inf")), axis=0))
            best_class = _fold_argmax(best_class, max_before, running_max, y, mask, offs)
        if WRITE_GRAD:
            g = _row_gradient(y, w, offs, t_lane, p_coef, k_s_row, true_mass, lse, log_s, grad_scale, logit_scale,
                              inv_softcap, HAS_SOFTCAP)
            g = tl.where(active, g, 0.0)
            tl.store(grad_row + offs, _to_output(g, out_ty, EMULATE_RTNE_BF16), mask=mask)
    # A term of mass 0 is exactly 0, even at a distance of +inf (a masked class).
    loss = tl.where(active, loss + k_s * tl.where(k_s != 0.0, d, 0.0), loss)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if PREDICT:  # 0 for a row of -inf only, or where a NaN max matched no class
        tl.store(predicted_ptr + row, tl.where(best_class < V, best_class, 0).to(tl.int64))


@triton.jit
def scale_rows_kernel(
    grad_ptr,          # (N, V) gradient, scaled in place
    scale_ptr,         # (N,) per-row scale, any stride (0 for a broadcast scalar)
    stride_grad_row, stride_scale,
    V,
    BLOCK: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + row * stride_scale).to(ACC)
    # The usual upstream gradient of a scalar loss is exactly 1: decide on the device,
    # without a host sync, that there is nothing to do, and skip the memory traffic.
    if scale != 1.0:
        mask = col < V
        ptrs = grad_ptr + row * stride_grad_row + col
        g = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
        tl.store(ptrs, _to_output(g * scale, grad_ptr.dtype.element_ty, EMULATE_RTNE_BF16), mask=mask)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class LaunchConfig:
    """One way to launch the kernel on rows of V logits.

    single:     the whole row in registers (BLOCK >= V): one read, one write.
    streamed:   one program per row, two passes over chunks of BLOCK.
    persistent: the streamed passes in `programs` programs (programs_per_sm a streaming
                multiprocessor, or rows sized to fit L2), each taking every programs-th row,
                with eviction hints, so that the rows in flight stay in L2 between their two
                reads.
    split:      each row split into segments of BLOCK held in registers by the programs of a
                cooperative grid that exchange their partials: one read from DRAM, one write.
                Its programs wait on one another, so it is offered only where it has run on
                a real GPU (VALIDATED_SPLIT_GPUS) or FUSED_LS_UNVALIDATED_LAUNCHES=1 asks.
    """

    kind: str
    block: int  # logits a program holds at once; for the streamed kinds, counted at 2 bytes
    num_warps: int
    programs_per_sm: int = 0  # persistent: programs per SM (0: sized to L2)

    def elements(self, dtype: torch.dtype) -> int:
        """Logits a program holds at once: a chunk of 4-byte logits is half as long as one of
        2-byte logits, the same bytes and the same registers."""
        if self.kind == "single":
            return self.block
        return max(16, self.block * 2 // dtype.itemsize)

    @property
    def name(self) -> str:
        name = f"{self.kind}-b{self.block}-w{self.num_warps}"
        if self.kind == "persistent":
            name += f"-p{self.programs_per_sm}" if self.programs_per_sm else "-l2"
        elif self.kind == "split":
            name += f"-p{self.programs_per_sm}"
        return name


# GPUs (torch.cuda.get_device_name) on which the split launch has run and matched the
# streamed one: it is a tuning candidate there by default. It grows when a GPU is at hand.
VALIDATED_SPLIT_GPUS: tuple[str, ...] = ()


def split_launch_allowed(device: torch.device) -> bool:
    if os.environ.get("FUSED_LS_UNVALIDATED_LAUNCHES") == "1":
        return True
    return device.type == "cuda" and torch.cuda.get_device_name(device) in VALIDATED_SPLIT_GPUS


def _single_block(V: int) -> int:
    return max(triton.next_power_of_2(V), 16)


def default_config(V: int, dtype: torch.dtype) -> LaunchConfig:
    """The launch used where nothing was tuned (the CPU interpreter, CUDA-graph capture,
    FUSED_LS_AUTOTUNE=0): a row in registers where it fits, else the streamed passes."""
    if V <= MAX_SINGLE_BLOCK:
        block = _single_block(V)
        return LaunchConfig("single", block, 4 if block <= 2048 else 8)
    return LaunchConfig("streamed", CHUNKED_BLOCK, 8 if CHUNKED_BLOCK >= 4096 else 4)


def candidate_configs(V: int, dtype: torch.dtype, has_weight: bool, has_softcap: bool,
                      split: bool = False, predict: bool = False) -> list[LaunchConfig]:
    """Every launch the tuner may choose for these rows, the default first; `split` adds the
    cooperative ones. Each compiles without register spills for sm_80, sm_90 and sm_100
    (tests/triton_targets.py checks), also with `predict` (each row's argmax): its registers
    spill at 16 warps (64 a thread), so those launches are left out then."""
    default = default_config(V, dtype)
    if V <= MAX_SINGLE_BLOCK:
        return [default]
    configs = [default]
    if V <= 2 * MAX_SINGLE_BLOCK and not (has_weight or has_softcap):
        # 16384 logits in registers fit 16 warps only without weights or a softcap.
        configs.append(LaunchConfig("single", _single_block(V), 16))
    for block, warps in ((2048, 4), (8192, 16)):
        configs.append(LaunchConfig("streamed", block, warps))
    for programs_per_sm in (1, 2, 0):
        configs.append(LaunchConfig("persistent", 4096, 8, programs_per_sm))
    # Twice the bytes in flight a program, for rows so long that few fit L2 at once.
    for programs_per_sm in (1, 0):
        configs.append(LaunchConfig("persistent", 8192, 16, programs_per_sm))
    if split:
        configs += [LaunchConfig("split", 8192, 8, 1), LaunchConfig("split", 4096, 8, 2)]
    if predict:
        configs = [config for config in configs if config.num_warps < 16]
    return list(dict.fromkeys(configs))


# A stand-in GPU for the interpreter, so that tests run the persistent loop over several rows.
_INTERPRETED_DEVICE = (4, 1 << 20)  # (SMs, L2 bytes)
_DEVICE_SHAPES: dict[int, tuple[int, int]] = {}


def device_shape(device: torch.device) -> tuple[int, int]:
    """(streaming multiprocessors, L2 bytes) of the logits' device."""
    if device.type != "cuda":
        return _INTERPRETED_DEVICE
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_SHAPES:
        properties = torch.cuda.get_device_properties(index)
        _DEVICE_SHAPES[index] = (properties.multi_processor_count, getattr(properties, "L2_cache_size", 50 << 20))
    return _DEVICE_SHAPES[index]


def grid_size(config: LaunchConfig, N: int, V: int, dtype: torch.dtype, device: torch.device) -> int:
    if config.kind not in ("persistent", "split"):
        return N
    sms, l2_bytes = device_shape(device)
    if config.kind == "split":
        # A multiple of the segments a row has, all resident at once; at most one turn of items.
        segments = triton.cdiv(V, config.elements(dtype))
        return max(segments, min(N * segments, (sms * config.programs_per_sm // segments) * segments))
    if config.programs_per_sm:
        programs = sms * config.programs_per_sm
    else:
        # Rows in flight that fill at most 3/4 of L2 (the rest: weights, other traffic).
        programs = max(1, (3 * l2_bytes // 4) // max(1, V * dtype.itemsize))
    return max(1, min(N, programs))


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
    predicted_out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> None:
    """Launch the fused kernel, writing into the given buffers (grad_out may be logits;
    predicted_out, an (N,) int64 buffer, gets each row's argmax when given).

    target (N,) and weight (V,) may have any stride, 0 included. grad_scale holds one
    element (0-d or (1,)) scaling every row, or N (any stride) scaling row i by
    grad_scale[i]. With grad_out None (and grad_scale None) only the loss and lse are
    computed. `config` None: default_config."""
    N, V = logits.shape
    if N == 0:
        return
    if config is None:
        config = default_config(V, logits.dtype)
    if config.kind == "split" and predicted_out is not None and V > 1 << 24:
        config = default_config(V, logits.dtype)  # the split's partials hold a class exactly below 2^24
    if config.kind == "split":
        _launch_split(logits, target, weight, weight_sum, grad_scale, grad_out, loss_out, lse_out, k_s, k_t,
                      ignore_index, z_loss, softcap, logit_scale, config, predicted_out=predicted_out)
        return
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    has_weight = weight is not None
    write_grad = grad_out is not None
    stride_grad_scale = _grad_scale_stride(grad_scale, N) if write_grad else 0
    unused = loss_out  # a valid pointer for the arguments a launch never reads
    persistent = config.kind == "persistent"
    grid = (grid_size(config, N, V, logits.dtype, logits.device),)
    smoothed_xent_fwd_kernel[grid](
        logits, grad_out if write_grad else logits, target,
        weight if has_weight else unused, weight_sum if has_weight else unused,
        grad_scale if write_grad else unused, loss_out, lse_out,
        predicted_out if predicted_out is not None else unused,
        logits.stride(0), grad_out.stride(0) if write_grad else 0,
        target.stride(0), weight.stride(0) if has_weight else 0, stride_grad_scale,
        N, V, ignore_index,
        k_s, k_t, z_loss, softcap if softcap > 0 else 1.0, 1.0 / softcap if softcap > 0 else 1.0, logit_scale,
        HAS_WEIGHT=has_weight, HAS_SOFTCAP=softcap > 0,
        BLOCK=config.elements(logits.dtype), SINGLE_PASS=config.kind == "single", ACC=acc,
        EMULATE_RTNE_BF16=write_grad and _emulate_rtne(grad_out),
        WRITE_GRAD=write_grad, PERSISTENT=persistent, L2_HINTS=persistent,
        ALIGN=aligned_body(logits, grad_out), PREDICT=predicted_out is not None, num_warps=config.num_warps,
    )


def aligned_body(logits: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """Whether the kernel should read each row as a 16-byte-aligned body plus scalar edges.

    Triton proves 16-byte accesses itself only when V and the row strides are multiples of 16
    elements; otherwise (V = 50257, V = 1000 in bf16, a padded row stride) every access would
    be scalar. The body needs 16-byte-aligned tensors, and logits and gradient rows at the same
    offset from a 16-byte boundary, so that one split of a row serves both."""
    size = logits.element_size()
    vec = 16 // size
    tensors = (logits,) if grad is None else (logits, grad)
    if all(t.shape[1] % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors):
        return False  # Triton's own specialisation already gives 16-byte accesses
    if any(t.data_ptr() % 16 for t in tensors):
        return False
    return grad is None or logits.shape[0] <= 1 or (grad.stride(0) - logits.stride(0)) % vec == 0


def _launch_split(logits, target, weight, weight_sum, grad_scale, grad_out, loss_out, lse_out, k_s, k_t,
                  ignore_index, z_loss, softcap, logit_scale, config: LaunchConfig, phases=None,
                  predicted_out=None) -> None:
    N, V = logits.shape
    block = config.elements(logits.dtype)
    segments = triton.cdiv(V, block)
    grid = grid_size(config, N, V, logits.dtype, logits.device)
    if grid < segments:
        raise ValueError(f"fused_ls: a row of {segments} segments needs {segments} resident programs")
    has_weight = weight is not None
    write_grad = grad_out is not None
    unused = loss_out
    partials = loss_out.new_empty(N, segments, _PARTIALS)
    arrivals = torch.zeros(N, dtype=torch.int32, device=logits.device)
    # The interpreter runs programs one after another, where a wait would never end: there
    # the statistics and the gradient are two launches (the second reads the logits again).
    if phases is None:
        phases = (0,) if logits.is_cuda else (1, 2)
    for phase in phases:
        options = {"launch_cooperative_grid": True} if phase == 0 else {}
        smoothed_xent_split_kernel[(grid,)](
            logits, grad_out if write_grad else logits, target,
            weight if has_weight else unused, weight_sum if has_weight else unused,
            grad_scale if write_grad else unused, loss_out, lse_out,
            predicted_out if predicted_out is not None else unused, partials, arrivals,
            logits.stride(0), grad_out.stride(0) if write_grad else 0,
            target.stride(0), weight.stride(0) if has_weight else 0,
            _grad_scale_stride(grad_scale, N) if write_grad else 0,
            N, V, ignore_index, k_s, k_t, z_loss, softcap if softcap > 0 else 1.0,
            1.0 / softcap if softcap > 0 else 1.0, logit_scale,
            segments, HAS_WEIGHT=has_weight, HAS_SOFTCAP=softcap > 0, BLOCK=block,
            SEGMENTS_POW2=triton.next_power_of_2(segments), ACC=tl.float64 if logits.dtype == torch.float64 else tl.float32,
            EMULATE_RTNE_BF16=write_grad and _emulate_rtne(grad_out), WRITE_GRAD=write_grad, PHASE=phase,
            PREDICT=predicted_out is not None, num_warps=config.num_warps, **options,
        )


def given_lse_rows_out(logits, target, weight, weight_sum, grad_scale, grad, loss, lse, given_lse, k_s, k_t,
                       ignore_index, z_loss, softcap, logit_scale, predicted=None) -> None:
    """Launch given_lse_kernel into the given buffers (grad None: the loss-only op)."""
    N, V = logits.shape
    if N == 0:
        return
    block = max(16, min(triton.next_power_of_2(V), GIVEN_LSE_CHUNK_BYTES // logits.dtype.itemsize))
    write_grad = grad is not None
    unused = loss
    given_lse_kernel[(N,)](
        logits, grad if write_grad else logits, target,
        weight if weight is not None else unused, weight_sum if weight is not None else unused,
        grad_scale if write_grad else unused, given_lse, loss, lse,
        predicted if predicted is not None else unused,
        logits.stride(0), grad.stride(0) if write_grad else 0, target.stride(0),
        weight.stride(0) if weight is not None else 0,
        _grad_scale_stride(grad_scale, N) if write_grad else 0, given_lse.stride(0),
        V, ignore_index, k_s, k_t, z_loss, softcap if softcap > 0 else 1.0, 1.0 / softcap if softcap > 0 else 1.0,
        logit_scale,
        HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap > 0, BLOCK=block,
        ACC=tl.float64 if logits.dtype == torch.float64 else tl.float32,
        EMULATE_RTNE_BF16=write_grad and _emulate_rtne(grad), WRITE_GRAD=write_grad, PREDICT=predicted is not None,
        num_warps=8 if block >= 4096 else 4,
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
    if V > 1 and grad.stride(1) != 1:
        raise ValueError(f"fused_ls: scale_rows_ reads rows of unit stride, got strides {grad.stride()}")
    block = min(triton.next_power_of_2(V), 4096)
    scale_rows_kernel[(N, triton.cdiv(V, block))](grad, scale, grad.stride(0), scale.stride(0), V,
                                                       BLOCK=block, EMULATE_RTNE_BF16=_emulate_rtne(grad),
                                                       ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32)


def _emulate_rtne(out: torch.Tensor) -> bool:
    return out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- registration
# The row op's contract (fused_ls/_row_op.py) under its own names, so that the native ops can
# be loaded at once; fused_ls/backends.py picks a backend by name, never by device.


def _run_out(logits, target, weight, grad_scale, grad, loss, lse, k_s, k_t, ignore_index, z_loss, softcap,
             logit_scale, predicted=None, precomputed_lse=None):
    check_row_op_arguments(logits, target, weight, grad_scale, k_s, k_t, softcap, predicted, precomputed_lse)
    weight_sum = None
    if weight is not None:
        weight_sum = class_weight_sum(weight, logits.dtype)
    args = (k_s, k_t, ignore_index, z_loss, softcap, logit_scale)
    if precomputed_lse is not None:
        given_lse_rows_out(logits, target, weight, weight_sum, grad_scale, grad, loss, lse,
                           precomputed_lse.to(loss.dtype), *args, predicted=predicted)
        return
    config = _chosen_launch(logits, target, weight, weight_sum, grad_scale, grad, args, predict=predicted is not None)
    smoothed_xent_rows_out(logits, target, weight, weight_sum, grad_scale, grad, loss, lse, *args,
                           predicted_out=predicted, config=config)


def _chosen_launch(logits, target, weight, weight_sum, grad_scale, grad, args, predict=False) -> LaunchConfig:
    """The tuned launch for these rows (fused_ls/triton/tuning.py), the default where only
    one candidate exists."""
    N, V = logits.shape
    softcap = args[4]
    if N == 0:
        return default_config(V, logits.dtype)  # nothing to launch, nothing to learn
    # A decided launch is one dict look-up per call (a pin or FUSED_LS_AUTOTUNE=0 is read anew).
    settings = (os.environ.get("FUSED_LS_TRITON_LAUNCH"), os.environ.get("FUSED_LS_AUTOTUNE"),
                os.environ.get("FUSED_LS_UNVALIDATED_LAUNCHES"))
    memo_key = (logits.device, V, logits.dtype, weight is not None, softcap > 0, grad is not None, predict, settings)
    if memo_key in _DECIDED:
        return _DECIDED[memo_key]
    candidates = candidate_configs(V, logits.dtype, weight is not None, softcap > 0,
                                   split=split_launch_allowed(logits.device), predict=predict)
    if len(candidates) == 1 and not os.environ.get("FUSED_LS_TRITON_LAUNCH"):
        return candidates[0]
    by_name = {config.name: config for config in candidates}
    features = (weight is not None, softcap > 0, grad is not None, "split" if candidates[-1].kind == "split" else "")
    if predict:  # a key of its own, as its candidates; the keys tuned before it stay as they were
        features += ("predict",)
    key = tuning.tuning_key(logits.device, V, logits.dtype, features)
    rows = tuning.trial_rows(N, V, device_shape(logits.device)[0])
    per_row_scale = grad_scale is not None and grad_scale.numel() == N and N > 1

    def trial(name):
        # Scratch outputs on the first rows: the caller's buffers (and in-place logits) are
        # never written by a trial.
        head = logits[:rows]
        loss, lse = head.new_empty(rows, dtype=lse_dtype(logits)), head.new_empty(rows, dtype=lse_dtype(logits))
        scratch = None if grad is None else torch.empty_like(head, memory_format=torch.contiguous_format)
        scale = grad_scale[:rows] if per_row_scale else grad_scale
        predicted = head.new_empty(rows, dtype=torch.int64) if predict else None
        smoothed_xent_rows_out(head, target[:rows], weight, weight_sum, scale, scratch, loss, lse, *args,
                               predicted_out=predicted, config=by_name[name])
        return loss, lse, scratch, predicted

    chosen = by_name[tuning.choose(key, list(by_name), trial, may_tune=_may_tune(logits))]
    if key in tuning.decided():  # tuned now or before: final (an untuned default, as during capture, is not)
        _DECIDED[memo_key] = chosen
    return chosen


# (device, V, dtype, features, settings) -> the launch decided for them in this process.
_DECIDED: dict[tuple, LaunchConfig] = {}
tuning._FORGET_HOOKS.append(_DECIDED.clear)


def _may_tune(logits: torch.Tensor) -> bool:
    """Timing syncs with the host: only on a GPU, and never while a CUDA graph is captured."""
    return logits.is_cuda and not torch.cuda.is_current_stream_capturing()


def lse_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


ROW_OPS = define_row_ops("_triton", _run_out)
