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
zero such rows is 0, with a zero gradient; an empty batch, and a zero denominator with
some row not ignored (class weights that sum to 0 there), give NaN as PyTorch does.

A class whose target mass is 0 adds nothing to the loss, also when its logit is -inf (a
masked vocabulary): with label_smoothing=0 masked classes cost nothing, as in
F.cross_entropy; with eps > 0 a masked class of weight > 0 makes the loss inf, as there.
"""

from __future__ import annotations

import math

import torch


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
    valid = t != ignore_index  # in int64: an ignore_index beyond int32 matches no int32 target
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    # log p = (y - m) - log s with m the row's max: shift-invariant (y - lse would cancel for
    # large logits). m is a constant to autograd, which then differentiates logsumexp exactly
    # as without the shift (log_softmax's own fp32 backward is less accurate at a million
    # classes).
    row_max = y.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max > -math.inf, row_max, 0.0)  # a row of -inf: no shift, not NaN
    centred = y - row_max
    log_s = torch.logsumexp(centred, dim=-1)
    logp = centred - log_s.unsqueeze(-1)
    lse = row_max.squeeze(-1) + log_s

    w = torch.ones(V, dtype=compute_dtype, device=y.device) if weight is None else weight.to(compute_dtype)
    w_t = w[safe_t] * valid.to(compute_dtype)
    eps = label_smoothing
    # The smoothing mass of each class (the true class's 1-eps on top for "uniform"; none of it
    # for "others"). A class of mass 0 adds 0 even where its logit is -inf (a masked
    # vocabulary), never 0 * inf.
    if convention == "uniform":
        smooth_mass = (eps / V) * w.expand(y.shape[0], V)
    else:
        smooth_mass = (eps / (V - 1)) * w.expand(y.shape[0], V)
        smooth_mass = smooth_mass.scatter(1, safe_t.unsqueeze(1), 0.0)
    smooth = torch.where(smooth_mass != 0, smooth_mass * -logp, 0.0).sum(-1)
    true_mass = (1 - eps) * w_t
    nll_t = -logp.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    true_term = torch.where(true_mass != 0, true_mass * nll_t, 0.0)
    per_row = true_term + smooth + z_loss * lse.square()
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
            # No non-ignored row: 0, not NaN. Some, but a zero denominator: PyTorch's NaN.
            safe = torch.where(denom != 0, denom, torch.ones_like(denom))
            scale = torch.where(valid.any(), torch.where(denom != 0, 1 / safe, math.nan), 0.0)
            loss = per_row.sum() * scale
    if return_lse:
        return loss, lse.detach().reshape(target.shape)
    return loss
