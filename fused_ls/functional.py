"""smoothed_xent: argument checks, the reduction, the autograd.Function, backend choice.

Layers, from the bottom: a kernel (fused_ls/triton, csrc/) -> a torch.library op that
returns per-row losses, lse and the already-normalised gradient -> the autograd.Function
below, which reduces and, in backward, only scales that saved gradient -> smoothed_xent.
"""

from __future__ import annotations

import math

import torch

from fused_ls import backends
from fused_ls.reference import CONVENTIONS, REDUCTIONS, smoothed_xent_reference

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TARGET_DTYPES = (torch.int64, torch.int32)


def smoothed_xent(
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
    inplace_backward: bool = False,
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
):
    r"""Label-smoothed cross-entropy, forward and backward fused into one pass over the logits.

    A drop-in for ``F.cross_entropy(logits, target, weight, ignore_index=..., reduction=...,
    label_smoothing=eps)`` with class-index targets: with the defaults it gives PyTorch's numbers.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 for checks), any leading dims.
        target: (...) int64 or int32 class indices in [0, V), or ``ignore_index``.
        label_smoothing: eps in [0, 1].
        weight: optional (V,) class weights, as in ``F.cross_entropy``. Not differentiated.
        ignore_index: target value whose rows contribute nothing (loss 0, gradient 0).
        reduction: "mean", "sum" or "none".
        convention: how eps is spread; with y the transformed logits, logp = log_softmax(y),
            w the class weights (1 without ``weight``), per row:

            * "uniform" (PyTorch): every class gets eps/V, the true class 1-eps+eps/V:
              ``loss = (1-eps) w_t (-logp_t) + eps/V * sum_c w_c (-logp_c)``
            * "others" (fairseq): the true class gets exactly 1-eps, every other eps/(V-1):
              ``loss = (1-eps) w_t (-logp_t) + eps/(V-1) * sum_{c != t} w_c (-logp_c)``
        z_loss: adds ``z_loss * lse(y)^2`` to every non-ignored row (PaLM), unweighted.
        softcap: if set, ``y = softcap * tanh(logit_scale * x / softcap)`` (Gemma 2).
        logit_scale: multiplies the logits before everything else.
        normalizer: the denominator of ``reduction="mean"`` (a float or a 0-d tensor), so that
            micro-batches and ranks can share one global token count. Default: the number of
            non-ignored targets, or the sum of their class weights, as PyTorch does.
        return_lse: also return the per-row logsumexp of y (shape of ``target``, float32, not
            differentiable).
        inplace_backward: write the gradient into ``logits`` instead of a new buffer: no memory
            beyond the logits. ``logits`` is overwritten by the forward; an op that saved it for
            its own backward then raises autograd's usual in-place error. Use it when the logits
            are consumed only by this loss (the LM-head output). Not for a leaf tensor. Ignored
            when no gradient is needed (``torch.no_grad()``, logits that do not require grad).
        process_group: a torch.distributed group over which the vocabulary is split: each
            rank passes its slice (..., V_local) of the logits and the global targets, and gets
            the loss and gradient slice that one device holding the whole vocabulary would
            give (see fused_ls.parallel).
        vocab_start, vocab_size: with ``process_group``, this rank's first class and the
            global number of classes; if omitted, gathered once per group and local size.
        backend: "auto", "triton", "native" or "torch" (see fused_ls.backends).

    Returns:
        The loss in float32 (float64 for float64 logits): a 0-d tensor, or the shape of
        ``target`` for ``reduction="none"``; with ``return_lse``, the pair (loss, lse).

    A mean over rows that are all ignored is 0 with a zero gradient, not PyTorch's NaN: a
    fully padded micro-batch must not poison a training run. An empty batch gives PyTorch's
    NaN. On CUDA an out-of-range target is never read: its row's loss is NaN (so the mean is
    NaN) and its gradient 0; on the CPU it raises an IndexError.
    """
    if process_group is not None:
        from fused_ls.parallel import smoothed_xent_vocab_parallel

        return smoothed_xent_vocab_parallel(
            logits, target, label_smoothing, process_group=process_group, weight=weight,
            ignore_index=ignore_index, reduction=reduction, convention=convention, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, normalizer=normalizer, return_lse=return_lse,
            inplace_backward=inplace_backward, vocab_start=vocab_start, vocab_size=vocab_size, backend=backend,
        )
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start and vocab_size describe a slice of the classes: they need process_group")
    _check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap, logit_scale)
    _check_targets(target, logits.shape[-1], ignore_index)
    name = backends.resolve(backend, logits.device)
    if name == "torch":
        if inplace_backward:
            raise ValueError("inplace_backward needs a fused backend ('triton' or 'native'), not 'torch'")
        return smoothed_xent_reference(
            logits, target, label_smoothing, weight=weight, ignore_index=ignore_index, reduction=reduction,
            convention=convention, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            normalizer=normalizer, return_lse=return_lse,
        )
    if inplace_backward and not (torch.is_grad_enabled() and logits.requires_grad):
        inplace_backward = False  # no gradient will be read (eval, no_grad): keep the logits intact
    if inplace_backward and logits.is_leaf:
        raise ValueError(
            "inplace_backward would overwrite a leaf tensor that requires grad; "
            "use it on logits produced by an op (for example the LM head)"
        )

    V = logits.shape[-1]
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()  # the kernels read rows with unit stride
    target1d = target.reshape(-1)
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad_scale = _gradient_scale(target1d, weight, ignore_index, reduction, normalizer, V, acc_dtype)
    if weight is not None and weight.dtype != torch.float64:
        weight = weight.float()
    row_args = (float(label_smoothing), convention == "others", int(ignore_index), float(z_loss),
                float(softcap or 0.0), float(logit_scale))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (logits, weight, grad_scale)):
        # (class weights and a tensor normalizer are not differentiated, but a loss built
        # from them keeps its graph, as in PyTorch)
        loss, lse = _FusedSmoothedXent.apply(logits2d, target1d, weight, grad_scale, reduction, *row_args,
                                             inplace_backward, name)
    else:
        # No gradient can be asked for (evaluation, no_grad): the loss-only op reads the
        # logits once and neither allocates nor writes a gradient.
        loss_rows, lse = backends.fused_ops(name).rows_loss(logits2d, target1d, weight, *row_args)
        loss = _reduce_rows(loss_rows, reduction, grad_scale)
    if reduction == "none":
        loss = loss.view(target.shape)
    if return_lse:
        return loss, lse.view(target.shape)
    return loss


class SmoothedCrossEntropyLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`smoothed_xent`, taking the same keyword arguments."""

    def __init__(self, label_smoothing: float = 0.1, **kwargs):
        super().__init__()
        weight = kwargs.pop("weight", None)
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing
        self.kwargs = kwargs

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return smoothed_xent(logits, target, self.label_smoothing, weight=self.weight, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([f"label_smoothing={self.label_smoothing}"] + [f"{k}={v!r}" for k, v in self.kwargs.items()])


class _FusedSmoothedXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, grad_scale, reduction, label_smoothing, smooth_others,
                ignore_index, z_loss, softcap, logit_scale, inplace, backend):
        ops = backends.fused_ops(backend)
        args = (target, weight, grad_scale, label_smoothing, smooth_others, ignore_index, z_loss, softcap, logit_scale)
        if inplace:
            loss_rows, lse = ops.rows_inplace(logits, *args)
            grad = logits
        else:
            loss_rows, lse, grad = ops.rows(logits, *args)
        loss = _reduce_rows(loss_rows, reduction, grad_scale)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        (grad,) = ctx.saved_tensors
        return (_scale_saved_gradient(grad, grad_loss),) + (None,) * 12


def _reduce_rows(loss_rows: torch.Tensor, reduction: str, grad_scale: torch.Tensor) -> torch.Tensor:
    """The per-row losses reduced; for a mean, `grad_scale` is 1/denominator (0 when every row
    is ignored: a zero loss, not NaN)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    if loss_rows.shape[0] == 0:
        return loss_rows.sum() / 0.0  # PyTorch's mean of an empty batch
    return loss_rows.sum() * grad_scale


def _scale_saved_gradient(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """The backward of a loss whose forward saved its gradient: scale row i by grad_loss[i]."""
    n = grad.shape[0]
    scale_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32  # no fp64 -> fp32 rounding
    row_scale = grad_loss.reshape(-1).expand(n).to(scale_dtype)  # stride 0 unless "none"
    if _backward_may_run_again():
        return (grad * row_scale.unsqueeze(1)).to(grad.dtype)
    # The saved gradient is ours alone and this backward is its last use: scale it in
    # place, which on CUDA costs nothing when the upstream gradient is exactly 1.
    torch.ops.fused_ls.scale_rows_(grad, row_scale)
    return grad


def _backward_may_run_again() -> bool:
    """True when the saved gradient must survive this backward (retain_graph, gradcheck)."""
    if torch.compiler.is_compiling():
        return True  # traced once for every later call; the compiler re-inplaces if it can
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def _gradient_scale(target, weight, ignore_index, reduction, normalizer, V, dtype) -> torch.Tensor:
    """0-d factor folded into the gradient: 1/denominator for a mean, else 1."""
    device = target.device
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if normalizer is not None:
        denom = _normalizer_tensor(normalizer, dtype, device)
    else:
        valid = target != ignore_index
        if weight is None:
            denom = valid.sum(dtype=dtype)
        else:
            safe_target = torch.where(valid & (target >= 0) & (target < V), target, torch.zeros_like(target))
            denom = (weight.to(dtype)[safe_target] * valid).sum()
    return torch.where(denom != 0, denom.reciprocal(), torch.zeros_like(denom))


def _normalizer_tensor(normalizer, dtype, device) -> torch.Tensor:
    """`normalizer` as a 0-d tensor on `device`, with no host sync."""
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        return normalizer.to(device=device, dtype=dtype)  # keep it on the logits' device: no copy
    # torch.full passes the number to a fill kernel; torch.as_tensor would copy it from host
    # memory, a synchronising copy on CUDA that also breaks CUDA graph capture.
    return torch.full((), float(normalizer), dtype=dtype, device=device)


def _check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap, logit_scale,
                     num_classes=None):
    """`num_classes`: the global V when `logits` hold a slice of the classes (fused_ls.parallel)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"logits must have a class dimension of size >= 1, got shape {tuple(logits.shape)}")
    if num_classes is None:
        num_classes = logits.shape[-1]
    if num_classes < 1:
        raise ValueError(f"logits must have a class dimension of size >= 1, got shape {tuple(logits.shape)}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits shape without its last dim "
            f"{tuple(logits.shape[:-1])}"
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
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if convention == "others" and num_classes < 2:
        raise ValueError("convention='others' needs at least 2 classes")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    for name, value in (("z_loss", z_loss), ("logit_scale", logit_scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


def _check_targets(target, V, ignore_index):
    """Raise for an out-of-range target when that costs no device sync (CPU, eager)."""
    if target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bad.any():
        first = int(target[bad][0])
        raise IndexError(f"target {first} is out of range for {V} classes (and is not ignore_index={ignore_index})")
