"""Float64 oracles and per-dtype tolerances shared by the test modules.

Low-precision inputs are judged against the truth computed in float64 from the *same*
rounded inputs, and must be no worse than eager PyTorch's own low-precision result
(apple/ml-cross-entropy states its tolerances the same way), plus a margin of one
rounding of the output.
"""

from __future__ import annotations

import torch

from fused_ls import smoothed_xent_reference
from fused_ls.conventions import smoothing_masses


def masses(eps: float, V: int, others: bool = False) -> tuple[float, float]:
    """(k_s, k_t), the row op's two mass arguments, of eps in one of the two conventions."""
    return smoothing_masses("others" if others else "uniform", eps, V)


# (rtol, atol) of a float32-accumulated result against the float64 truth.
LOSS_TOL = {
    torch.float64: (1e-7, 1e-7),  # fused kernels take float scalars (eps/V, ...) as float32
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),  # computed in fp32 from bf16 inputs: only the sum's rounding
    torch.float16: (2e-5, 2e-5),
}
# The gradient is rounded once to the logits' dtype: half an ulp relative, plus a floor
# for values near zero.
GRAD_TOL = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-5, 1e-7),
    torch.bfloat16: (2**-8, 1e-6),
    torch.float16: (2**-11, 1e-7),
}


def loss_and_grad(fn, logits: torch.Tensor, *args, upstream=None, **kwargs):
    """Run fn(logits, ...) and backward; return (loss, grad of logits) detached."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    if upstream is None:
        upstream = torch.ones_like(loss)
    loss.backward(upstream)
    return loss.detach(), x.grad.detach()


def truth(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, *, upstream=None, **kwargs):
    """Loss and gradient in float64 from exactly the given (possibly rounded) logits."""
    weight = kwargs.pop("weight", None)
    if weight is not None:
        kwargs["weight"] = weight.double()
    normalizer = kwargs.pop("normalizer", None)
    if isinstance(normalizer, torch.Tensor):
        kwargs["normalizer"] = normalizer.detach().double()
    elif normalizer is not None:
        kwargs["normalizer"] = normalizer
    return loss_and_grad(
        smoothed_xent_reference, logits.double(), target, label_smoothing,
        upstream=None if upstream is None else upstream.double(), **kwargs,
    )


# Triton passes float scalars (the masses k_s, k_t, ...) as float32 even for float64 logits:
# a mass of order 1 is off by up to 2^-24, and so is the gradient element it enters.
TRITON_FLOAT64_GRAD_ATOL = 6e-8


def softcapped_grad_atol(dtype, weight=None, logit_scale=1.0):
    """The gradient's absolute tolerance where a softcap saturates: its derivative 1 - (y/softcap)^2
    is computed in the accumulation dtype from y, which carries a few units in the last place of
    softcap, so the factor is off by up to about 8 ulp of 1 however small it is; the row's class
    mass (up to max(weight)) and logit_scale multiply that error."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mass = 1.0 if weight is None else float(weight.max())
    return max(GRAD_TOL[dtype][1], 8 * torch.finfo(acc).eps * mass * abs(logit_scale))


def assert_matches_truth(loss, grad, true_loss, true_grad, dtype, backend=None, grad_atol=None):
    """`grad_atol`: a larger absolute floor for the gradient where the inputs call for one
    (softcapped_grad_atol)."""
    rtol, atol = LOSS_TOL[dtype]
    torch.testing.assert_close(loss.double(), true_loss, rtol=rtol, atol=atol)
    rtol, atol = GRAD_TOL[dtype]
    if backend == "triton" and dtype == torch.float64:
        atol = TRITON_FLOAT64_GRAD_ATOL
    if grad_atol is not None:
        atol = max(atol, grad_atol)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), true_grad, rtol=rtol, atol=atol)
