"""What every entry point shares, below all of them: argument checks, the per-row options,
the mean's denominator folded into the gradient, and the reduction.

`functional`, `linear` and `parallel` import this module; it imports none of them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fused_ls import backends
from fused_ls._row_op import RowOptions
from fused_ls.conventions import check_convention, smoothing_masses

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("none", "mean", "sum")
Z_LOSS_DENOMINATORS = ("weight", "tokens")

# Keywords of smoothed_xent that its options check covers (the modules take them too).
OPTION_KEYWORDS = frozenset({
    "ignore_index", "reduction", "convention", "z_loss", "softcap", "logit_scale", "z_loss_denominator",
    "normalizer", "backend", "inplace_backward", "recompute_backward",
})


def row_options(convention, label_smoothing, num_classes, ignore_index, z_loss, softcap, logit_scale) -> RowOptions:
    """The options of a checked call; `num_classes` is the global V (a slice's too)."""
    k_s, k_t = smoothing_masses(convention, float(label_smoothing), num_classes)
    return RowOptions(float(k_s), float(k_t), int(ignore_index), float(z_loss), float(softcap or 0.0),
                      float(logit_scale))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs (exact checks), float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- checks


def check_options(label_smoothing, *, ignore_index=-100, reduction="mean", convention="uniform", z_loss=0.0,
                  softcap=None, logit_scale=1.0, z_loss_denominator="weight", normalizer=None, backend="auto",
                  inplace_backward=False, recompute_backward=False):
    """The options that need no tensor at hand (also run by the modules' constructors)."""
    if backend not in ("auto", None) + backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + backends.BACKENDS}")
    if z_loss_denominator not in Z_LOSS_DENOMINATORS:
        raise ValueError(f"z_loss_denominator must be one of {Z_LOSS_DENOMINATORS}, got {z_loss_denominator!r}")
    if inplace_backward and recompute_backward:
        raise ValueError("inplace_backward and recompute_backward exclude each other: the recomputing backward "
                         "needs the logits intact")
    check_normalizer(normalizer)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) and not is_symbolic_number(
            label_smoothing):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if ignore_index is None or isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"ignore_index must be an int (as in F.cross_entropy), got {ignore_index!r}; "
            "to ignore nothing, pass a value no target takes, such as the default -100"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_convention(convention)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    for name, value in (("z_loss", z_loss), ("logit_scale", logit_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not is_symbolic_number(value):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not abs(value) < math.inf:  # not math.isfinite: a symbolic float under dynamic=True
            raise ValueError(f"{name} must be finite, got {value}")


def check_normalizer(normalizer) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if not normalizer.is_floating_point() and normalizer.dtype not in INDEX_DTYPES:
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) and not is_symbolic_number(
            normalizer):
        raise TypeError(f"normalizer must be a number, a 0-d tensor or None, got {type(normalizer).__name__}")


def is_symbolic_number(value) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat))


def effective_softcap(softcap):
    """An infinite cap caps nothing: the same as None (tanh(y / inf) * inf would be NaN)."""
    return None if softcap is not None and softcap == math.inf else softcap


def check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap, logit_scale,
                    num_classes=None, ignore_index=-100, **options):
    """`num_classes`: the global V when `logits` hold a slice of the classes (fused_ls.parallel)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"logits must have a class dimension of size >= 1, got shape {tuple(logits.shape)}")
    if num_classes is None:
        num_classes = logits.shape[-1]
    if num_classes < 1:
        raise ValueError(f"logits must have a class dimension of size >= 1, got shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        hint = ""
        if logits.dim() >= 3 and tuple(target.shape) == tuple(logits.shape[:1] + logits.shape[2:]):
            hint = (" (this looks like F.cross_entropy's (N, C, d1, ...) layout: the classes must be the last "
                    "dimension here, so pass logits.movedim(1, -1))")
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits shape without its last dim "
            f"{tuple(logits.shape[:-1])}{hint}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != logits.shape[-1]:
            raise ValueError(f"weight must be a 1-D tensor of {logits.shape[-1]} class weights")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "the class weights require grad, but the loss is not differentiable with respect to them "
                "(as in F.cross_entropy): pass weight.detach()"
            )
    check_options(label_smoothing, ignore_index=ignore_index, reduction=reduction, convention=convention,
                  z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, **options)
    check_convention(convention, num_classes)


def check_predictions_allowed(module_keywords: dict) -> None:
    """A module's keywords, checked when it is built: no predictions over a split vocabulary."""
    wanted = module_keywords.get("return_accuracy") or module_keywords.get("return_predictions")
    if wanted and module_keywords.get("process_group") is not None:
        raise ValueError("return_accuracy and return_predictions are not available with process_group")


def check_precomputed_lse(precomputed_lse, target, logits) -> None:
    if precomputed_lse is None:
        return
    if not isinstance(precomputed_lse, torch.Tensor) or not precomputed_lse.is_floating_point():
        what = getattr(precomputed_lse, "dtype", precomputed_lse)
        raise TypeError(f"precomputed_lse must be a floating-point tensor, got {what!r}")
    if tuple(precomputed_lse.shape) != tuple(target.shape):
        raise ValueError(f"precomputed_lse must have the shape of target {tuple(target.shape)}, got "
                         f"{tuple(precomputed_lse.shape)}")
    if precomputed_lse.device != logits.device:
        raise ValueError(f"precomputed_lse is on {precomputed_lse.device} but logits are on {logits.device}")


def check_targets(target, V, ignore_index):
    """Raise for an out-of-range target when that costs no device sync (CPU, eager)."""
    if (target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0
            or is_functorch_wrapped(target)):
        return
    bad = not_ignored(target, ignore_index) & ((target < 0) | (target >= V))
    if bad.any():
        first = int(target[bad][0])
        raise IndexError(f"target {first} is out of range for {V} classes (and is not ignore_index={ignore_index})")


def is_functorch_wrapped(tensor: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and not torch.compiler.is_compiling() and check(tensor))


# ----------------------------------------------------------------------------- the mean and the reduction


def not_ignored(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """target != ignore_index, also when ignore_index does not fit the target's dtype (an
    int32 target compared with -2**40 would see the index wrapped to int32)."""
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def normalizer_tensor(normalizer, dtype, device) -> torch.Tensor:
    """`normalizer` as a 0-d tensor on `device`, with no host sync."""
    check_normalizer(normalizer)
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(device=device, dtype=dtype)  # keep it on the logits' device: no copy
    # torch.full passes the number to a fill kernel; torch.as_tensor would copy it from host
    # memory, a synchronising copy on CUDA that also breaks CUDA graph capture.
    return torch.full((), float(normalizer), dtype=dtype, device=device)


def mean_scale(count: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """1/denom for a mean over `count` non-ignored rows: 0 when there are none (every row
    ignored: the loss is 0, not NaN), NaN when there are some but denom is 0 (PyTorch's 0/0)."""
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    scale = torch.where(denom != 0, safe.reciprocal(), math.nan)
    return torch.where(count != 0, scale, torch.zeros_like(scale))


def target_weight_sum(target, valid, weight, dtype) -> torch.Tensor:
    """sum of the class weights of the non-ignored targets; an out-of-range target (a NaN row
    on CUDA) is never used as an index."""
    V = weight.shape[0]
    safe_target = torch.where(valid & (target >= 0) & (target < V), target, torch.zeros_like(target))
    return (weight.to(dtype)[safe_target] * valid).sum()


def gradient_scale(target, weight, ignore_index, reduction, normalizer, dtype) -> torch.Tensor:
    """0-d factor folded into the gradient: 1/denominator for a mean, else 1 (see mean_scale)."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=target.device)
    valid = not_ignored(target, ignore_index)
    weight_of_targets = None
    if weight is not None and normalizer is None:
        weight_of_targets = target_weight_sum(target, valid, weight.detach(), dtype)
    return mean_gradient_scale(valid, normalizer, weight_of_targets, dtype)


def mean_gradient_scale(valid, normalizer, weight_of_targets, dtype) -> torch.Tensor:
    """1/denominator of a mean over the rows where `valid`: `normalizer` if given, else the sum
    of the targets' class weights if given, else the count of valid rows (see mean_scale)."""
    count = valid.sum(dtype=dtype)
    if normalizer is not None:
        denom = normalizer_tensor(normalizer, dtype, valid.device)
    elif weight_of_targets is not None:
        denom = weight_of_targets
    else:
        denom = count
    return mean_scale(count, denom)


def z_loss_per_token(target, weight, ignore_index, reduction, normalizer, z_loss, z_loss_denominator):
    """(weight, normalizer) that make a weighted mean divide its z-loss by the token count.

    The smoothed cross-entropy of a row is linear in the class weights and its z-loss does not
    depend on them, so with the weights scaled by n / W (n non-ignored targets, W the sum of
    their weights) and the mean divided by n, sum_i (w_t,i CE_i + z lse_i^2) becomes
    sum_i w_t,i CE_i / W + z sum_i lse_i^2 / n: Liger-Kernel's number, through the same kernels.
    """
    if z_loss_denominator == "weight" or weight is None or reduction != "mean" or z_loss == 0:
        return weight, normalizer
    if normalizer is not None:
        raise ValueError("z_loss_denominator='tokens' divides by the count of non-ignored targets: "
                         "it cannot be combined with normalizer")
    target = target.reshape(-1)
    valid = not_ignored(target, ignore_index)
    acc_dtype = accumulation_dtype(weight.dtype)
    count = valid.sum(dtype=acc_dtype)
    weight_sum = target_weight_sum(target, valid, weight, acc_dtype)
    # Every row ignored: nothing is scaled (the mean is 0 either way).
    ratio = torch.where(count != 0, count / weight_sum, 1.0)
    return weight.to(acc_dtype) * ratio, count


class SmoothedXentOutput(NamedTuple):
    """What smoothed_xent and smoothed_linear_xent return with ``return_accuracy`` or
    ``return_predictions``; the fields not asked for are None."""

    loss: torch.Tensor
    lse: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


def prediction_buffer(rows: torch.Tensor, predict: bool) -> torch.Tensor | None:
    """The (N,) int64 buffer a row op writes each row's argmax into, or None."""
    return rows.new_empty(rows.shape[0], dtype=torch.int64) if predict else None


def with_predictions(loss, lse, predicted, target, ignore_index, return_accuracy, return_predictions):
    """The SmoothedXentOutput of a call; `predicted` is shaped like `target`."""
    accuracy = token_accuracy(predicted, target, ignore_index) if return_accuracy else None
    return SmoothedXentOutput(loss, lse, accuracy, predicted if return_predictions else None)


def token_accuracy(predicted: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """0-d float32: the share of the non-ignored targets that equal their row's prediction; 0
    when every target is ignored (a fully padded micro-batch logs 0, not NaN, as its loss)."""
    valid = not_ignored(target, ignore_index)
    correct = ((predicted == target) & valid).sum(dtype=torch.float32)
    count = valid.sum(dtype=torch.float32)
    return correct / count.clamp_min(1.0)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, grad_scale: torch.Tensor) -> torch.Tensor:
    """The per-row losses reduced; for a mean, `grad_scale` is 1/denominator (0 when every row
    is ignored: a zero loss, not NaN)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    if loss_rows.shape[0] == 0:
        return loss_rows.sum() / 0.0  # PyTorch's mean of an empty batch
    return loss_rows.sum() * grad_scale
