"""The linear head's compensated dL/dW update on CUDA: (hi, lo) += product in one pass.

Per element, with hi the running sum in the weight's dtype (bf16/fp16) and lo, in bf16,
what rounding it left out (see fused_ls/linear.py):

    total = product + hi + lo          fp32; lo <= half an ulp of hi, so this is exact to 2^-24
    hi    = round_to_nearest(total)    the running sum, rounded once
    lo    = round_bf16(total - hi)     total - hi is exact in fp32 (hi is total's nearest neighbour)

Memory traffic per element: read the fp32 product (4 B), hi and lo (2 + 2 B); write hi and
lo (2 + 2 B): 12 B, against 4 B to read and 4 B to write an fp32 accumulator's element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_ls.triton.smoothed_xent import _emulate_rtne, _to_output

BLOCK = 2048


@triton.jit
def compensated_add_kernel(
    hi_ptr,        # (n,) running sum, bf16 or fp16, updated in place
    lo_ptr,        # (n,) bf16 residual of hi, updated in place
    product_ptr,   # (n,) the chunk's product, any float dtype
    n,
    FIRST: tl.constexpr,  # hi and lo hold garbage: start the sum from the product
    BLOCK: tl.constexpr,
    EMULATE_RTNE_HI: tl.constexpr, EMULATE_RTNE_LO: tl.constexpr,  # bf16 rounding under the interpreter
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    total = tl.load(product_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if not FIRST:
        total += tl.load(hi_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(lo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hi = _to_output(total, hi_ptr.dtype.element_ty, EMULATE_RTNE_HI)
    lo = _to_output(total - hi.to(tl.float32), lo_ptr.dtype.element_ty, EMULATE_RTNE_LO)
    tl.store(hi_ptr + offs, hi, mask=mask)
    tl.store(lo_ptr + offs, lo, mask=mask)


def compensated_add_(hi: torch.Tensor, lo: torch.Tensor, product: torch.Tensor, first: bool) -> None:
    """(hi, lo) += product elementwise; all three contiguous and of one shape."""
    n = hi.numel()
    if n == 0:
        return
    compensated_add_kernel[(triton.cdiv(n, BLOCK),)](
        hi, lo, product, n, FIRST=first, BLOCK=BLOCK,
        EMULATE_RTNE_HI=_emulate_rtne(hi), EMULATE_RTNE_LO=_emulate_rtne(lo),
    )
