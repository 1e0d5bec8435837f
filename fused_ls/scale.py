"""The backward of smoothed_xent: scale the saved gradient by the upstream gradient, in place.

The forward already folded the mean's 1/normaliser into the gradient, so for the usual
`loss.backward()` the upstream gradient is exactly 1 and this is a no-op. On CUDA the
Triton kernel decides that on the device (no host sync) and moves no bytes; elsewhere it
is one multiply, computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fused_ls::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i, :] *= scale[i]; `scale` has one entry per row (stride 0 for a scalar)."""
    grad.mul_(scale.unsqueeze(1))


@scale_rows_.register_fake
def _(grad, scale):
    return None


@scale_rows_.register_kernel("cpu")
def _(grad, scale):
    # Reading CPU scales is no device sync: skip the whole pass over the gradient (as much
    # memory traffic as the fused op itself) when every scale is exactly 1.
    if not bool((scale == 1).all()):
        grad.mul_(scale.unsqueeze(1))


@scale_rows_.register_kernel("cuda")
def _(grad, scale):
    try:
        from fused_ls.triton.smoothed_xent import scale_rows_ as triton_scale_rows_
    except Exception:  # no working Triton: the plain multiply is still right
        grad.mul_(scale.unsqueeze(1))
        return
    triton_scale_rows_(grad, scale)
