"""The row op: the one contract every backend implements, written once.

    rows(logits, target, weight?, grad_scale, k_s, k_t, ignore_index, z_loss, softcap, logit_scale,
         predicted?, precomputed_lse?) -> (loss_rows, lse, grad)
    rows_inplace: the same, with the gradient written over `logits` -> (loss_rows, lse)
    rows_loss: the same without grad_scale: the loss and lse only, no gradient allocated or
        written (a forward that needs no gradient: evaluation, no_grad, a recomputing forward)

`logits` (N, V) has unit stride along V; `target` (N,) int64/int32 and `weight` (V,) are read
with their strides; `grad_scale` holds one element (every row's gradient times it) or N (row
i's times entry i: an upstream gradient folded in before the single rounding). loss_rows and
lse are (N,) float32 (float64 for float64 logits); grad has the logits' dtype. `predicted`, if
given, is an (N,) int64 buffer that receives each row's argmax: the first class holding the
largest y (the logits after logit_scale and softcap, the ones the loss sees), taken in the
pass that reads the row anyway; a row of -inf only gives 0 and a row holding NaN any class.
`precomputed_lse`, if given, is an (N,) float tensor of each row's lse (of y), from a previous
pass: the op uses it in place of its own (and returns it as lse), so a row's loss and gradient
need no max or sum first; the results are those of the lse given. The class
weights' sum W is taken in float64 when the logits or the weights are float64, else float32
(`class_weight_sum`; the C++ kernels follow the same rule). Ignored rows:
loss 0, gradient 0; a target outside [0, V) is never dereferenced: loss NaN, gradient 0. The
scalars are RowOptions (fused_ls._core), the convention already turned into the masses k_s and
k_t (fused_ls.conventions). The maths: docs/maths.md.

A backend is a RowOps: three callables with these signatures. The fused backends are
torch.library ops (`define_row_ops`), one schema and one fake for all; "torch" is the same
contract in eager PyTorch (fused_ls.eager).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from fused_ls._library import define_op

_ARGUMENTS = ("Tensor target, Tensor? weight, {grad_scale}float k_s, float k_t, int ignore_index, float z_loss, "
              "float softcap, float logit_scale, Tensor(b!)? predicted=None, Tensor? precomputed_lse=None")


class RowOptions(NamedTuple):
    """The scalars of one row op call, in the schema's order: `op(..., *options)`.

    A NamedTuple: immutable, and traced by torch.compile as the tuple it is."""

    k_s: float  # smoothing mass per unit of class weight (fused_ls.conventions)
    k_t: float  # the true class's extra mass
    ignore_index: int
    z_loss: float
    softcap: float  # 0.0: no softcap
    logit_scale: float


@dataclass(frozen=True)
class RowOps:
    name: str
    rows: Callable
    rows_inplace: Callable
    rows_loss: Callable


def row_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) loss and lse buffers of a call (float64 for float64 logits, else float32)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = logits.shape[0]
    return logits.new_empty(n, dtype=dtype), logits.new_empty(n, dtype=dtype)


def class_weight_sum(weight: torch.Tensor, logits_dtype: torch.dtype) -> torch.Tensor:
    """0-d sum of the class weights, in float64 if either operand is float64, else float32."""
    wide = torch.float64 in (weight.dtype, logits_dtype)
    return weight.sum(dtype=torch.float64 if wide else torch.float32)


def elements_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` may share memory. Exact for the layouts views make
    (expand, unfold, slicing); for interleaved strides it errs towards "overlap", the safe side
    for a write. torch._debug_has_internal_overlap answers "cannot tell" for unfolded views,
    and torch.compile cannot trace it."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)
    span = 0  # the largest offset reachable with the dimensions of smaller stride
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def check_row_op_arguments(logits, target, weight, grad_scale, k_s, k_t, softcap, predicted=None,
                           precomputed_lse=None) -> None:
    """The contract's checks for the ops implemented in Python (the native ones check in
    csrc/op_common.h): a wrong layout or size must raise, never read out of bounds."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"fused_ls: logits must be 2-D float32/bfloat16/float16/float64, got {logits.dtype} "
                         f"of shape {tuple(logits.shape)}")
    N, V = logits.shape
    if V > 1 and logits.stride(1) != 1:
        raise ValueError(f"fused_ls: logits must have unit stride along the classes, got strides {logits.stride()}")
    if target.shape != (N,) or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_ls: target must be int64 or int32 of shape ({N},), got {target.dtype} "
                         f"of shape {tuple(target.shape)}")
    if weight is not None and (weight.shape != (V,) or not weight.is_floating_point()):
        raise ValueError(f"fused_ls: weight must be floating point of shape ({V},), got {weight.dtype} "
                         f"of shape {tuple(weight.shape)}")
    if grad_scale is not None and not (grad_scale.numel() == 1 and grad_scale.dim() <= 1 or grad_scale.shape == (N,)):
        raise ValueError(f"fused_ls: grad_scale must hold one element or {N}, got shape {tuple(grad_scale.shape)}")
    if predicted is not None and (predicted.shape != (N,) or predicted.dtype != torch.int64
                                  or not predicted.is_contiguous()):
        raise ValueError(f"fused_ls: predicted must be a contiguous int64 buffer of shape ({N},), got "
                         f"{predicted.dtype} of shape {tuple(predicted.shape)}")
    if precomputed_lse is not None and (precomputed_lse.shape != (N,) or not precomputed_lse.is_floating_point()):
        raise ValueError(f"fused_ls: precomputed_lse must be floating point of shape ({N},), got "
                         f"{precomputed_lse.dtype} of shape {tuple(precomputed_lse.shape)}")
    for name, tensor in (("target", target), ("weight", weight), ("grad_scale", grad_scale),
                         ("predicted", predicted), ("precomputed_lse", precomputed_lse)):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(f"fused_ls: {name} is on {tensor.device}, logits on {logits.device}")
    if not (abs(k_s) < float("inf") and abs(k_t) < float("inf") and k_s >= 0) or softcap < 0:
        raise ValueError(f"fused_ls: the masses must be finite with k_s >= 0 and softcap >= 0, got k_s={k_s}, "
                         f"k_t={k_t}, softcap={softcap}")


def _fake_rows(logits, *args):
    loss, lse = row_outputs(logits)
    return loss, lse, torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_row_outputs(logits, *args):
    return row_outputs(logits)


def define_row_ops(suffix: str, run_out: Callable | None = None) -> RowOps:
    """Define fused_ls::smoothed_xent_rows{suffix}, smoothed_xent_rows{suffix}_ and
    smoothed_xent_rows_loss{suffix}.

    `run_out(logits, target, weight, grad_scale, grad, loss, lse, *options, predicted,
    precomputed_lse)` computes into the given buffers (grad and grad_scale None for the loss
    only; grad may be `logits`; predicted None when no argmax is asked for, precomputed_lse None
    when no lse is given) and serves every device. Without it the ops are declared for the kernels that the native
    extension registers from C++ when it loads."""
    with_scale = _ARGUMENTS.format(grad_scale="Tensor grad_scale, ")
    without_scale = _ARGUMENTS.format(grad_scale="")
    name = suffix.lstrip("_") or "native"
    rows = rows_inplace = rows_loss = None
    if run_out is not None:
        implementations = allocating_row_ops(name, run_out)
        rows, rows_inplace, rows_loss = (implementations.rows, implementations.rows_inplace,
                                         implementations.rows_loss)
    return RowOps(
        name,
        define_op(f"smoothed_xent_rows{suffix}(Tensor logits, {with_scale}) -> (Tensor loss, Tensor lse, Tensor grad)",
                  default=rows, fake=_fake_rows),
        define_op(f"smoothed_xent_rows{suffix}_(Tensor(a!) logits, {with_scale}) -> (Tensor loss, Tensor lse)",
                  default=rows_inplace, fake=_fake_row_outputs, mutated=(0,) if run_out is not None else ()),
        define_op(f"smoothed_xent_rows_loss{suffix}(Tensor logits, {without_scale}) -> (Tensor loss, Tensor lse)",
                  default=rows_loss, fake=_fake_row_outputs),
    )


def allocating_row_ops(name: str, run_out: Callable) -> RowOps:
    """The three variants over one `run_out`, each allocating its outputs."""

    def rows(logits, target, weight, grad_scale, *options, predicted=None, precomputed_lse=None):
        options, predicted, precomputed_lse = _split_trailing(options, predicted, precomputed_lse)
        loss, lse = row_outputs(logits)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        run_out(logits, target, weight, grad_scale, grad, loss, lse, *options, predicted, precomputed_lse)
        return loss, lse, grad

    def rows_inplace(logits, target, weight, grad_scale, *options, predicted=None, precomputed_lse=None):
        options, predicted, precomputed_lse = _split_trailing(options, predicted, precomputed_lse)
        # Rows that share memory would each write the gradient of the others' logits.
        if elements_overlap(logits):
            raise RuntimeError(
                "fused_ls: inplace_backward needs logits whose rows do not share memory "
                f"(got shape {tuple(logits.shape)}, strides {logits.stride()}); "
                "call .contiguous() first or drop inplace_backward"
            )
        loss, lse = row_outputs(logits)
        run_out(logits, target, weight, grad_scale, logits, loss, lse, *options, predicted, precomputed_lse)
        return loss, lse

    def rows_loss(logits, target, weight, *options, predicted=None, precomputed_lse=None):
        options, predicted, precomputed_lse = _split_trailing(options, predicted, precomputed_lse)
        loss, lse = row_outputs(logits)
        run_out(logits, target, weight, None, None, loss, lse, *options, predicted, precomputed_lse)
        return loss, lse

    return RowOps(name, rows, rows_inplace, rows_loss)


def _split_trailing(options: tuple, predicted, precomputed_lse):
    """The RowOptions, the predicted buffer and the precomputed lse, which the dispatcher may
    pass by position."""
    n = len(RowOptions._fields)
    trailing = options[n:] + (predicted, precomputed_lse)[len(options) - n:]
    return options[:n], trailing[0], trailing[1]
