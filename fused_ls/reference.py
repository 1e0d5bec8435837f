"""The eager PyTorch formulation: the test oracle and the last-resort backend "torch".

It is written from the definition of the smoothed target distribution, with no
shared algebra with the fused kernels, so that it can catch their mistakes. It
materialises log-probabilities (N x V floats) and lets autograd differentiate
it; nothing here is meant to be fast.

Per row, with y the transformed logits (logit_scale, then softcap), logp =
log_softmax(y), w the class weights (all ones without `weight`) and t the target:

    uniform (PyTorch):  loss = (1-eps) w_t (-logp_t) + eps/V     * sum_c   w_c (-logp_c)
    others (fairseq):   loss = (1-eps) w_t (-logp_t) + eps/(V-1) * sum_c!=t w_c (-logp_c)
    plus z_loss * lse(y)^2 for every row that is not ignored.

Reductions: "none" gives the per-row losses (0 for ignored rows); "sum" their sum;
"mean" their sum divided by `normalizer` when given, else by sum_i w_{t_i} over
rows that are not ignored (the count of such rows without weights). A mean over
zero such rows is 0, with a zero gradient; an empty batch gives NaN as PyTorch does.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")
CONVENTIONS = ("uniform", "others")


def transform_logits(logits: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    y = logits * logit_scale if logit_scale != 1.0 else logits
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y


def smoothed_xent_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.1,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    convention: str = "uniform",
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Eager smoothed cross-entropy; computes in float32 (float64 if given float64)."""
    V = logits.shape[-1]
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    y = transform_logits(logits.reshape(-1, V).to(compute_dtype), logit_scale, softcap)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(y, dim=-1)
    logp = y - lse.unsqueeze(-1)

    w = torch.ones(V, dtype=compute_dtype, device=y.device) if weight is None else weight.to(compute_dtype)
    w_t = w[safe_t] * valid.to(compute_dtype)
    nll_t = -logp.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    nll_all = -(logp * w).sum(-1)
    eps = label_smoothing
    if convention == "uniform":
        smooth = eps / V * nll_all
    else:
        smooth = eps / (V - 1) * (nll_all - w[safe_t] * nll_t)
    per_row = (1 - eps) * w_t * nll_t + smooth + z_loss * lse.square()
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))

    if reduction == "none":
        loss = per_row.reshape(target.shape)
    elif reduction == "sum":
        loss = per_row.sum()
    else:
        if t.numel() == 0:
            loss = per_row.sum() / 0.0
        else:
            if normalizer is None:
                denom = w_t.sum()
            elif isinstance(normalizer, torch.Tensor):
                denom = normalizer.to(device=y.device, dtype=compute_dtype)
            else:  # a fill kernel, not torch.as_tensor's synchronising host-to-device copy
                denom = torch.full((), float(normalizer), dtype=compute_dtype, device=y.device)
            loss = per_row.sum() / torch.where(denom != 0, denom, torch.ones_like(denom)) * (denom != 0)
    if return_lse:
        return loss, lse.detach().reshape(target.shape)
    return loss
