"""Vocabulary parallelism's two passes over a slice of the classes: the contract every backend
implements, written once (the row op's counterpart for fused_ls.parallel).

    slice_stats(logits, column, owned, weight?, k_s, k_t, softcap, logit_scale)
        -> (row_max, log_sum, loss)       m_r, log s_r and L_r = sum_c q_c (lse_r - y_c) per row
    slice_grad(logits, column, weight?, row_max, log_sum, p_coef, smooth_coef, true_coef,
               softcap, logit_scale) -> grad
    slice_grad_inplace: the same, the gradient written over `logits`

`logits` (N, V_r) is this rank's slice, unit stride along it, V_r >= 1; `column` (N,) int64 is
each row's target within the slice where `owned` (N,) bool says the target lies in it, and any
class of the slice elsewhere; `weight` (V_r,) the slice's class weights. The statistics pass
gives the true class its mass k_t w_t only where owned; a slice whose logits are all -inf has
m_r = log s_r = -inf and L_r = 0. The gradient pass takes the row's global m and log s and its
per-row coefficients (the mean's scale and logit_scale folded in), and writes

    g_c = (p_coef exp(y_c - m - log s) - smooth_coef w_c - true_coef [c == column]) * (1 - (y_c / softcap)^2)

rounded once to the logits' dtype; a row whose coefficients are all 0 gets zeros. Outputs and
per-row inputs are float32 (float64 for float64 logits). The maths: docs/vocab-parallel.md.

A backend's SliceOps are these three callables. The fused ones are torch.library ops
(`define_slice_ops`): native registers its CPU and CUDA kernels from C++ (csrc/slice_ops.h),
Triton its own (fused_ls/triton/slice_passes.py); "torch" is fused_ls.eager's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fused_ls._library import define_op

_GRAD_ARGUMENTS = ("Tensor column, Tensor? weight, Tensor row_max, Tensor log_sum, Tensor p_coef, Tensor smooth_coef, "
                   "Tensor true_coef, float softcap, float logit_scale")


@dataclass(frozen=True)
class SliceOps:
    name: str
    stats: Callable
    grad: Callable
    grad_inplace: Callable


def statistics_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return tuple(logits.new_empty(logits.shape[0], dtype=dtype) for _ in range(3))


def _fake_stats(logits, *args):
    return statistics_outputs(logits)


def _fake_grad(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _fake_grad_inplace(logits, *args):
    return None


def define_slice_ops(suffix: str, *, stats: Callable | None = None, grad_out: Callable | None = None) -> SliceOps:
    """Define fused_ls::smoothed_xent_slice_stats{suffix}, smoothed_xent_slice_grad{suffix} and
    smoothed_xent_slice_grad{suffix}_.

    `stats` and `grad_out(grad, logits, ...)` implement them for every device. Without them the
    ops are declared for the kernels that C++ registers (csrc/slice_ops.h)."""
    name = suffix.lstrip("_") or "native"
    stats_impl = grad_impl = grad_inplace_impl = None
    if stats is not None:
        stats_impl = stats

        def grad_impl(logits, *args):
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
            grad_out(grad, logits, *args)
            return grad

        def grad_inplace_impl(logits, *args):
            grad_out(logits, logits, *args)

    def define(schema, implementation, fake, mutated=()):
        return define_op(schema, default=implementation, fake=fake, mutated=mutated if implementation else ())

    return SliceOps(
        name,
        define(f"smoothed_xent_slice_stats{suffix}(Tensor logits, Tensor column, Tensor owned, Tensor? weight, "
               "float k_s, float k_t, float softcap, float logit_scale) -> (Tensor row_max, Tensor log_sum, Tensor loss)",
               stats_impl, _fake_stats),
        define(f"smoothed_xent_slice_grad{suffix}(Tensor logits, {_GRAD_ARGUMENTS}) -> Tensor", grad_impl, _fake_grad),
        define(f"smoothed_xent_slice_grad{suffix}_(Tensor(a!) logits, {_GRAD_ARGUMENTS}) -> ()", grad_inplace_impl,
               _fake_grad_inplace, mutated=(0,)),
    )
