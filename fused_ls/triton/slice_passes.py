"""Vocabulary parallelism's two passes over this rank's slice of the classes, in Triton.

The contract (fused_ls/_slice_op.py) and the maths (docs/vocab-parallel.md): per row of the
slice's V_r logits, with y, w, k_s, k_t as in fused_ls/triton/smoothed_xent.py,

    statistics:  m_r = max y,  log s_r = log sum exp(y - m_r),
                 L_r = (k_s W_r + k_t w_t) log s_r + k_s D + (k_s + k_t) w_t (m_r - y_t)
                 (w_t = 0 where the row's target is not in the slice; D as in the row kernel)
    gradient:    g_c = (p_coef exp((y_c - m) - log s) - smooth_coef w_c - true_coef [c == column])
                       * (1 - (y_c / softcap)^2)
                 with the row's global m and log s, gathered between the two passes.

Memory traffic per row (b = bytes per logit): the statistics pass reads V_r*b and writes 12
bytes; the gradient pass reads V_r*b and writes V_r*b (in place: into the lines it read). The
collective between them is what a single device's row kernel does not need, so the slice is read
twice: 3b a logit against one device's 2b for rows it holds on chip, 3b for its streamed ones.
A row whose coefficients are all 0 (ignored) is written as zeros without being read.

One program a row, streaming chunks of CHUNK_BYTES. The accesses are 16 bytes wide where Triton
can prove it (V_r and the row stride multiples of 16 elements, as a tensor-parallel split of a
padded vocabulary gives); the row kernel's aligned body (ALIGN) is not used here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_ls._slice_op import define_slice_ops, statistics_outputs
from fused_ls.triton.smoothed_xent import (_emulate_rtne, _fold, _load_chunk, _row_gradient, _row_loss, _to_output,
                                           _transform)

# Bytes of logits a program holds at once: 4096 2-byte logits, the row kernel's streamed chunk
# (about 100 registers a thread at 8 warps). Tests lower it to reach several chunks.
CHUNK_BYTES = 8192


@triton.jit
def slice_stats_kernel(
    logits_ptr,        # (N, V) this rank's slice, unit stride along V
    column_ptr,        # (N,) int64: the target's class in the slice where owned
    owned_ptr,         # (N,) bool
    weight_ptr,        # (V,) class weights, read only when HAS_WEIGHT
    weight_sum_ptr,    # 0-d, their sum, read only when HAS_WEIGHT
    row_max_ptr, log_sum_ptr, loss_ptr,  # (N,) out
    stride_logits_row, stride_column, stride_owned, stride_weight,
    V, k_s, k_t, softcap, inv_softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    column = tl.load(column_ptr + row * stride_column)
    in_slice = (column >= 0) & (column < V)
    # An out-of-range column is never dereferenced (the contract forbids it): not owned.
    owned = (tl.load(owned_ptr + row * stride_owned) != 0) & in_slice
    column = tl.where(in_slice, column, 0)
    t_lane = tl.where(owned, column, -1).to(tl.int32)
    if HAS_WEIGHT:
        weight_sum = tl.load(weight_sum_ptr).to(ACC)
        w_t = tl.load(weight_ptr + column * stride_weight, mask=owned, other=0.0).to(ACC)
    else:
        weight_sum = V * 1.0
        w_t = tl.where(owned, 1.0, 0.0).to(ACC)
    x_t = tl.load(logits_row + column, mask=owned, other=0.0)
    y_t = tl.where(owned, _transform(x_t.to(ACC), logit_scale, softcap, inv_softcap, HAS_SOFTCAP), 0.0)

    offs0 = tl.arange(0, BLOCK)
    m = tl.full((), -float("inf"), ACC)
    r = tl.zeros((), ACC)
    s = tl.zeros((), ACC)
    d = tl.zeros((), ACC)
    w_seen = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        mask, y, w = _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap, inv_softcap,
                                 HAS_SOFTCAP, HAS_WEIGHT, ACC, "")
        m, r, s, d, w_seen = _fold(m, r, s, d, w_seen, y, w, mask, offs, t_lane, HAS_WEIGHT)
    # Every row counts here (the ranks' combination zeroes the ignored ones): in range, not ignored.
    loss, lse, log_s, p_coef, k_s_row, true_mass = _row_loss(m, s, d, y_t, w_t, weight_sum, k_s, k_t, 0.0,
                                                             column >= 0, column < 0)
    # A slice of -inf logits only: m_r = log s_r = -inf and no loss of its own (the ranks'
    # combination adds its whole share).
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_s)
    tl.store(loss_ptr + row, tl.where(m == -float("inf"), 0.0, loss))


@triton.jit
def slice_grad_kernel(
    logits_ptr,        # (N, V) this rank's slice, unit stride along V
    grad_ptr,          # (N, V) out, logits' dtype; may be logits_ptr (in place)
    column_ptr,        # (N,) int64
    weight_ptr,        # (V,) read only when HAS_WEIGHT
    row_max_ptr, log_sum_ptr, p_coef_ptr, smooth_coef_ptr, true_coef_ptr,  # (N,) each, any stride
    stride_logits_row, stride_grad_row, stride_column, stride_weight,
    stride_row_max, stride_log_sum, stride_p_coef, stride_smooth_coef, stride_true_coef,
    V, softcap, inv_softcap, logit_scale,
    HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    EMULATE_RTNE_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    grad_row = grad_ptr + row * stride_grad_row
    out_ty: tl.constexpr = grad_ptr.dtype.element_ty
    m = tl.load(row_max_ptr + row * stride_row_max).to(ACC)
    log_s = tl.load(log_sum_ptr + row * stride_log_sum).to(ACC)
    p_coef = tl.load(p_coef_ptr + row * stride_p_coef).to(ACC)
    smooth_coef = tl.load(smooth_coef_ptr + row * stride_smooth_coef).to(ACC)
    true_coef = tl.load(true_coef_ptr + row * stride_true_coef).to(ACC)
    column = tl.load(column_ptr + row * stride_column)
    t_lane = tl.where((column >= 0) & (column < V), column, -1).to(tl.int32)
    offs0 = tl.arange(0, BLOCK)
    if (p_coef != 0.0) | (smooth_coef != 0.0) | (true_coef != 0.0):
        for start in range(0, V, BLOCK):
            offs = start + offs0
            mask, y, w = _load_chunk(logits_row, weight_ptr, stride_weight, offs, V, logit_scale, softcap, inv_softcap,
                                     HAS_SOFTCAP, HAS_WEIGHT, ACC, "")
            # logit_scale is in the coefficients: the softcap factor alone multiplies here.
            g = _row_gradient(y, w, offs, t_lane, p_coef, smooth_coef, true_coef, m, log_s, 1.0, 1.0, inv_softcap,
                              HAS_SOFTCAP)
            tl.store(grad_row + offs, _to_output(g, out_ty, EMULATE_RTNE_BF16), mask=mask)
    else:
        # A row without a gradient (ignored): zeros, its logits unread.
        zeros = tl.zeros((BLOCK,), out_ty)
        for start in range(0, V, BLOCK):
            offs = start + offs0
            tl.store(grad_row + offs, zeros, mask=offs < V)


# ----------------------------------------------------------------------------- launchers


def chunk_elements(V: int, dtype: torch.dtype) -> int:
    return max(16, min(triton.next_power_of_2(V), CHUNK_BYTES // dtype.itemsize))


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def _accumulator(logits: torch.Tensor):
    return tl.float64 if logits.dtype == torch.float64 else tl.float32


def _check(logits: torch.Tensor, column: torch.Tensor, weight: torch.Tensor | None, per_row=()) -> None:
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"fused_ls: logits must be 2-D float32/bfloat16/float16/float64, got {logits.dtype} "
                         f"of shape {tuple(logits.shape)}")
    N, V = logits.shape
    if V < 1 or (V > 1 and logits.stride(1) != 1):
        raise ValueError(f"fused_ls: a slice needs at least one class of unit stride, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if column.shape != (N,) or column.dtype != torch.int64:
        raise ValueError(f"fused_ls: column must be int64 of shape ({N},), got {column.dtype} of shape "
                         f"{tuple(column.shape)}")
    if weight is not None and (weight.shape != (V,) or not weight.is_floating_point()):
        raise ValueError(f"fused_ls: weight must be floating point of shape ({V},), got {tuple(weight.shape)}")
    for name, tensor in (("column", column), ("weight", weight), *per_row):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"fused_ls: {name} is on {tensor.device}, logits on {logits.device}")
        if name not in ("column", "weight") and tensor.shape != (N,):
            raise ValueError(f"fused_ls: {name} must have shape ({N},), got {tuple(tensor.shape)}")


def _stats(logits, column, owned, weight, k_s, k_t, softcap, logit_scale):
    _check(logits, column, weight, (("owned", owned),))
    row_max, log_sum, loss = statistics_outputs(logits)
    N, V = logits.shape
    if N == 0:
        return row_max, log_sum, loss
    acc_dtype = loss.dtype
    weight_sum = None
    if weight is not None:
        weight = weight.to(acc_dtype)
        weight_sum = weight.sum()
    block = chunk_elements(V, logits.dtype)
    slice_stats_kernel[(N,)](
        logits, column, owned, weight if weight is not None else loss, weight_sum if weight is not None else loss,
        row_max, log_sum, loss,
        logits.stride(0), column.stride(0), owned.stride(0), weight.stride(0) if weight is not None else 0,
        V, k_s, k_t, softcap if softcap > 0 else 1.0, 1.0 / softcap if softcap > 0 else 1.0, logit_scale,
        HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap > 0, BLOCK=block, ACC=_accumulator(logits),
        num_warps=_warps(block),
    )
    return row_max, log_sum, loss


def _grad_out(grad, logits, column, weight, row_max, log_sum, p_coef, smooth_coef, true_coef, softcap, logit_scale):
    per_row = (("row_max", row_max), ("log_sum", log_sum), ("p_coef", p_coef), ("smooth_coef", smooth_coef),
               ("true_coef", true_coef))
    _check(logits, column, weight, per_row)
    N, V = logits.shape
    if N == 0:
        return
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if weight is not None:
        weight = weight.to(acc_dtype)
    block = chunk_elements(V, logits.dtype)
    slice_grad_kernel[(N,)](
        logits, grad, column, weight if weight is not None else row_max,
        row_max, log_sum, p_coef, smooth_coef, true_coef,
        logits.stride(0), grad.stride(0), column.stride(0), weight.stride(0) if weight is not None else 0,
        *(t.stride(0) for _, t in per_row),
        V, softcap if softcap > 0 else 1.0, 1.0 / softcap if softcap > 0 else 1.0, logit_scale,
        HAS_WEIGHT=weight is not None, HAS_SOFTCAP=softcap > 0, BLOCK=block, ACC=_accumulator(logits),
        EMULATE_RTNE_BF16=_emulate_rtne(grad), num_warps=_warps(block),
    )


SLICE_OPS = define_slice_ops("_triton", stats=_stats, grad_out=_grad_out)
