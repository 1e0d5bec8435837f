"""The backward of smoothed_xent: scale the saved gradient by the upstream gradient, in place.

The forward already folded the mean's 1/normaliser into the gradient, so for the usual
`loss.backward()` the upstream gradient is exactly 1 and this is a no-op. On CUDA the
Triton kernel decides that on the device (no host sync) and moves no bytes; elsewhere it
is one multiply, computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch

from fused_ls._library import define_op


def _multiply(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i, :] *= scale[i]; `scale` has one entry per row (stride 0 for a scalar)."""
    grad.mul_(scale.unsqueeze(1))


def _multiply_cpu(grad: torch.Tensor, scale: torch.Tensor) -> None:
    # Reading CPU scales is no device sync: skip the whole pass over the gradient (as much
    # memory traffic as the fused op itself) when every scale is exactly 1.
    if not bool((scale == 1).all()):
        _multiply(grad, scale)


def _multiply_cuda(grad: torch.Tensor, scale: torch.Tensor) -> None:
    try:
        from fused_ls.triton.smoothed_xent import scale_rows_ as triton_scale_rows_
    except Exception:  # noqa: BLE001  (no working Triton: the plain multiply is still right)
        _multiply(grad, scale)
        return
    triton_scale_rows_(grad, scale)


scale_rows_ = define_op(
    "scale_rows_(Tensor(a!) grad, Tensor scale) -> ()",
    default=_multiply,
    fake=lambda grad, scale: None,
    kernels={"CPU": _multiply_cpu, "CUDA": _multiply_cuda},
    mutated=(0,),
)
