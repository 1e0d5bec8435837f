"""The row op in eager PyTorch: the "torch" backend's RowOps, and the passes over a slice of
the classes that vocabulary parallelism runs on every rank.

The same contract and the same algebra as the fused kernels (fused_ls._row_op,
docs/maths.md), written with PyTorch ops: the portable fallback of the linear head and the
local passes of fused_ls.parallel. The test oracle is fused_ls.reference, which shares none
of this algebra. Rows are processed in blocks that bound the float32 temporaries.
"""

from __future__ import annotations

import math

import torch

from fused_ls._row_op import RowOptions, allocating_row_ops, check_row_op_arguments, class_weight_sum
from fused_ls._slice_op import SliceOps, statistics_outputs

# Rows are processed in blocks of at most this many logits, which bounds the float32
# temporaries (about three blocks live at once: 3 x 128 MiB) whatever the batch.
ROW_CHUNK_ELEMENTS = 1 << 25


def row_blocks(n_rows: int, row_length: int) -> list[slice]:
    if row_length == 0:
        return []
    step = max(1, ROW_CHUNK_ELEMENTS // row_length)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def transform(x: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    """y = softcap * tanh(logit_scale * x / softcap), or logit_scale * x for softcap 0; a new tensor."""
    y = x * logit_scale
    if softcap:
        y = torch.tanh(y.div_(softcap)).mul_(softcap)
    return y


def slice_statistics(x, weight, column, owned, w_t, weight_sum, options, *, out_max, out_log_sum, out_loss,
                     out_argmax=None):
    """m_r, log s_r and L_r = sum_c q_c (lse_r - y_c) for a block of rows over a slice of the
    classes (the whole row on one device). `column` is each row's target within the slice
    (any value where not `owned`), `w_t` its class weight (0 where not owned), `weight_sum`
    the slice's sum of class weights; `out_argmax`, if given, gets each row's first class of
    largest y."""
    y = transform(x.to(out_max.dtype), options.logit_scale, options.softcap)
    if out_argmax is not None:
        out_argmax.copy_(y.argmax(dim=1))  # the first of equal maxima, as the kernels take it
    row_max = y.amax(dim=1, keepdim=True)
    # A slice whose logits are all -inf (a masked part of the vocabulary) is centred on 0,
    # not on its max: -inf - -inf would be NaN.
    finite_max = torch.where(row_max > -math.inf, row_max, 0.0)
    distance = finite_max - y  # m_r - y_c >= 0, +inf for a masked class
    del y
    log_sum_exp = distance.neg().exp_().sum(dim=1).log_()  # log s_r, so lse_r = m_r + log s_r
    out_max.copy_(row_max.squeeze(1))
    out_log_sum.copy_(log_sum_exp)
    k_s, k_t = options.k_s, options.k_t
    # L_r = Q_r log s_r + k_s sum_{c != t} w_c (m_r - y_c) + (k_s + k_t) w_t (m_r - y_t): the true
    # class carries its whole mass in its own term, and a class of mass 0 adds 0, also where
    # its logit is -inf (never 0 * inf); one of mass > 0 adds inf there, as on one device.
    loss = (k_s * weight_sum + k_t * w_t) * log_sum_exp
    target_distance = distance.gather(1, column.unsqueeze(1)).squeeze(1)
    if k_s != 0:
        if weight is not None:
            distance = torch.where(weight != 0, distance * weight, 0.0)
        kept = torch.where(owned, 0.0, distance.gather(1, column.unsqueeze(1)).squeeze(1))
        distance.scatter_(1, column.unsqueeze(1), kept.unsqueeze(1))  # the owned true class left out
        loss += k_s * distance.sum(dim=1)
    true_mass = (k_s + k_t) * w_t
    loss += torch.where(owned & (true_mass != 0), true_mass * target_distance, 0.0)
    # An all-masked slice has no finite lse_r: vocabulary parallelism adds its whole share,
    # Q_r (lse - lse_r), when the ranks' statistics are combined.
    out_loss.copy_(torch.where(row_max.squeeze(1) > -math.inf, loss, 0.0))


def slice_gradient(x, weight, column, row_max, log_sum, p_coef, smooth_coef, true_coef, options, *, out):
    """d(loss)/dx for a block of rows over a slice of the classes, rounded once into `out`:
    p_c * p_coef - w_c * smooth_coef - [c == column] * true_coef, times dy/dx's softcap factor
    (logit_scale and any upstream gradient are in the coefficients). `out` may be `x`."""
    y = transform(x.to(log_sum.dtype), options.logit_scale, options.softcap)
    # p = exp((y - m) - log s): y - m is exact for nearby large logits, y - lse is not.
    grad = torch.exp((y - row_max.unsqueeze(1)).sub_(log_sum.unsqueeze(1)))
    grad.mul_(p_coef.unsqueeze(1))
    if weight is not None:
        grad.addr_(smooth_coef, weight, alpha=-1.0)
    else:
        grad.sub_(smooth_coef.unsqueeze(1))
    grad.scatter_add_(1, column.unsqueeze(1), -true_coef.unsqueeze(1))
    if options.softcap:
        # dy/du = 1 - (y / softcap)^2; y is a fresh tensor here, free to reuse.
        grad.mul_(y.div_(options.softcap).square_().neg_().add_(1.0))
    out.copy_(grad)


def _run_out(logits, target, weight, grad_scale, grad, loss, lse, k_s, k_t, ignore_index, z_loss, softcap, logit_scale,
             predicted=None, precomputed_lse=None):
    """The row op's contract on one device: the whole row is one slice."""
    options = RowOptions(k_s, k_t, ignore_index, z_loss, softcap, logit_scale)
    check_row_op_arguments(logits, target, weight, grad_scale, options.k_s, options.k_t, options.softcap, predicted,
                           precomputed_lse)
    n_rows, V = logits.shape
    acc = loss.dtype
    target = target.long()
    valid = target != options.ignore_index  # in int64: an ignore_index beyond int32 matches no int32 target
    active = valid & (target >= 0) & (target < V)
    column = torch.where(active, target, torch.zeros_like(target))  # never an index out of range
    if weight is not None:
        weight_sum = class_weight_sum(weight, logits.dtype).to(acc)
        weight = weight.to(acc)
        w_t = weight[column] * active
    else:
        w_t = active.to(acc)
        weight_sum = float(V)
    row_max, log_sum = torch.empty_like(loss), torch.empty_like(loss)
    for rows in row_blocks(n_rows, V):
        slice_statistics(logits[rows], weight, column[rows], active[rows], w_t[rows], weight_sum, options,
                         out_max=row_max[rows], out_log_sum=log_sum[rows], out_loss=loss[rows],
                         out_argmax=None if predicted is None else predicted[rows])
    lse.copy_(row_max + log_sum)
    if precomputed_lse is not None:
        # The caller's lse in place of this one: every distance lse - y_c moves by the same
        # amount, so the loss by the row's whole mass times it; p is taken against it.
        given = precomputed_lse.to(acc)
        total_mass = options.k_s * weight_sum + options.k_t * w_t
        loss.add_(torch.where(active, total_mass * (given - lse), 0.0))
        row_max, log_sum = given, torch.zeros_like(given)
        lse.copy_(given)
    finite = row_max > -math.inf  # a row of -inf logits: NaN, as in PyTorch
    loss.copy_(torch.where(finite, loss + options.z_loss * lse.square(), math.nan))
    loss.copy_(torch.where(valid, torch.where(active, loss, math.nan), 0.0))
    if grad is None:
        return
    row_factor = torch.where(active, grad_scale.to(acc).reshape(-1).expand(n_rows) * options.logit_scale, 0.0)
    p_coef = (options.k_s * weight_sum + options.k_t * w_t + 2.0 * options.z_loss * lse) * row_factor
    smooth_coef = options.k_s * row_factor
    true_coef = options.k_t * w_t * row_factor
    for rows in row_blocks(n_rows, V):
        slice_gradient(logits[rows], weight, column[rows], row_max[rows], log_sum[rows], p_coef[rows],
                       smooth_coef[rows], true_coef[rows], options, out=grad[rows])
    # A row without a gradient is 0, also where a row of -inf logits made p NaN.
    grad.masked_fill_(~active.unsqueeze(1), 0.0)


EAGER_ROW_OPS = allocating_row_ops("torch", _run_out)


# ----------------------------------------------------------------------------- the slice passes' contract
# (fused_ls._slice_op): the passes above over every row, in blocks.


def eager_slice_stats(logits, column, owned, weight, k_s, k_t, softcap, logit_scale):
    n_rows, V = logits.shape
    row_max, log_sum, loss = statistics_outputs(logits)
    acc = loss.dtype
    options = RowOptions(k_s, k_t, 0, 0.0, softcap, logit_scale)
    if weight is not None:
        weight = weight.to(acc)
        weight_sum = weight.sum()
        w_t = weight[column] * owned
    else:
        weight_sum = float(V)
        w_t = owned.to(acc)
    for rows in row_blocks(n_rows, V):
        slice_statistics(logits[rows], weight, column[rows], owned[rows], w_t[rows], weight_sum, options,
                         out_max=row_max[rows], out_log_sum=log_sum[rows], out_loss=loss[rows])
    return row_max, log_sum, loss


def eager_slice_grad_out(grad, logits, column, weight, row_max, log_sum, p_coef, smooth_coef, true_coef, softcap,
                         logit_scale):
    n_rows, V = logits.shape
    acc = row_max.dtype
    options = RowOptions(0.0, 0.0, 0, 0.0, softcap, logit_scale)
    if weight is not None:
        weight = weight.to(acc)
    coefficients = [c.to(acc).expand(n_rows) for c in (p_coef, smooth_coef, true_coef)]
    for rows in row_blocks(n_rows, V):
        slice_gradient(logits[rows], weight, column[rows], row_max[rows], log_sum[rows],
                       *(c[rows] for c in coefficients), options, out=grad[rows])
    # A row without a gradient is 0, also where a row of -inf logits made p NaN.
    without = (coefficients[0] == 0) & (coefficients[1] == 0) & (coefficients[2] == 0)
    grad.masked_fill_(without.unsqueeze(1), 0.0)


def _eager_slice_grad(logits, *args):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    eager_slice_grad_out(grad, logits, *args)
    return grad


def _eager_slice_grad_inplace(logits, *args):
    eager_slice_grad_out(logits, logits, *args)


EAGER_SLICE_OPS = SliceOps("torch", eager_slice_stats, _eager_slice_grad, _eager_slice_grad_inplace)
