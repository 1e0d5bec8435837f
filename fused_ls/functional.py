"""smoothed_xent: the public function, its module, and the autograd.Function of the fused path.

Layers, from the bottom: a kernel (fused_ls/triton, csrc/) -> the row op (fused_ls/_row_op.py),
which returns per-row losses, lse and the already-normalised gradient -> the autograd.Function
below, which reduces and, in backward, only scales that saved gradient -> smoothed_xent.
Argument checks, the mean's denominator and the reduction live in fused_ls._core; the
backward helpers in fused_ls._autograd.
"""

from __future__ import annotations

import sys

import torch

from fused_ls import _core, backends
from fused_ls._autograd import check_inplace_allowed, refuse_create_graph, scale_saved_gradient
from fused_ls._core import (SmoothedXentOutput, accumulation_dtype, not_ignored, prediction_buffer, reduce_rows,
                            with_predictions)
from fused_ls.eager import transform
from fused_ls.reference import smoothed_xent_reference


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
    z_loss_denominator: str = "weight",
    softcap: float | None = None,
    logit_scale: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    return_lse: bool = False,
    return_accuracy: bool = False,
    return_predictions: bool = False,
    precomputed_lse: torch.Tensor | None = None,
    inplace_backward: bool = False,
    recompute_backward: bool = False,
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
        weight: optional (V,) class weights, as in ``F.cross_entropy``. Like PyTorch, a weight
            that requires grad is refused (detach it): the loss is not differentiated by it.
        ignore_index: the int target value whose rows contribute nothing (loss 0, gradient 0).
        reduction: "mean", "sum" or "none".
        convention: how eps is spread over the classes, a key of fused_ls.conventions.CONVENTIONS:
            "uniform" (PyTorch: every class eps/V, the true class 1-eps+eps/V) or "others"
            (fairseq: the true class exactly 1-eps, every other eps/(V-1)).
        z_loss: adds ``z_loss * lse(y)^2`` to every non-ignored row (PaLM), unweighted.
        z_loss_denominator: what a weighted mean divides the z-loss by. "weight" (default): the
            sum of the targets' class weights, like the rest of the loss. "tokens": the count of
            non-ignored targets, as Liger-Kernel does. The two differ only with ``weight``, a
            mean and no ``normalizer``.
        softcap: if set, ``y = softcap * tanh(logit_scale * x / softcap)`` (Gemma 2); ``inf`` is
            the same as None.
        logit_scale: multiplies the logits before everything else.
        normalizer: the denominator of ``reduction="mean"`` (a float or a 0-d tensor), so that
            micro-batches and ranks can share one global token count. Default: the number of
            non-ignored targets, or the sum of their class weights, as PyTorch does. A tensor
            normalizer that requires grad is differentiated, on every backend.
        return_lse: also return the per-row logsumexp of y (shape of ``target``, float32, not
            differentiable).
        return_accuracy: also return the token accuracy: the share of the targets that are not
            ``ignore_index`` whose class is the row's prediction (0-d float32; 0 when every
            target is ignored, as for the loss), unweighted. Taken in the pass that reads the
            logits anyway: no extra read of them on any fused backend.
        return_predictions: also return each row's prediction (shape of ``target``, int64): the
            first class of largest y, the logits as the loss sees them (after ``logit_scale``
            and ``softcap``), as ``argmax`` takes it; class 0 for a row of -inf only, and any
            class for a row holding NaN.
        precomputed_lse: each row's logsumexp of y (shape of ``target``), from a previous pass
            over the same logits (``return_lse`` gives it), as flash-attention's
            ``precomputed_lse``. The fused backends use it in place of their own: a row's loss
            and gradient need no max or sum first, so the Triton kernel reads every row once
            where its streamed launch reads it twice. It is trusted, not checked: the loss and
            gradient are those of the lse given, and it is not differentiated (the gradient
            is the logits' total one, for the lse of these logits). ``backend="torch"``
            computes its own.
        inplace_backward: write the gradient into ``logits`` instead of a new buffer: no memory
            beyond the logits. ``logits`` is overwritten by the forward; an op that saved it for
            its own backward then raises autograd's usual in-place error. Use it when the logits
            are consumed only by this loss (the LM-head output). Autograd's rules for in-place
            ops apply: not for a leaf that requires grad, nor a view of one. Ignored when no
            gradient is needed (``torch.no_grad()``, logits that do not require grad).
        recompute_backward: compute the gradient in the backward instead of the forward: the
            forward reads the logits once and writes nothing, the backward reads them again
            and writes the gradient with the upstream gradient already folded in, so the
            gradient is rounded to the logits' dtype exactly once for any upstream gradient
            (per-token weights of ``reduction="none"``, a loss divided by accumulation steps).
            By default the forward writes the gradient and the backward scales it, which in
            bf16/fp16 rounds twice unless the upstream gradient is exactly 1. Memory is the
            same (the logits are kept instead of the gradient); one more read of the logits.
        process_group: a torch.distributed group over which the vocabulary is split: each
            rank passes its slice (..., V_local) of the logits and the global targets, and gets
            the loss and gradient slice that one device holding the whole vocabulary would
            give (see fused_ls.parallel).
        vocab_start, vocab_size: with ``process_group``, this rank's first class and the
            global number of classes; if omitted, gathered once per group and local size.
        backend: "auto", "triton", "native" or "torch" (see fused_ls.backends).

    Returns:
        The loss in float32 (float64 for float64 logits): a 0-d tensor, or the shape of
        ``target`` for ``reduction="none"``; with ``return_lse`` alone, the pair (loss, lse);
        with ``return_accuracy`` or ``return_predictions``, a :class:`SmoothedXentOutput`
        (loss, lse, accuracy, predictions) holding None where not asked for.

    A mean over rows that are all ignored is 0 with a zero gradient, not PyTorch's NaN: a
    fully padded micro-batch must not poison a training run. An empty batch, and a zero
    denominator with some row not ignored (class weights summing to 0, ``normalizer=0``), give
    PyTorch's NaN. On CUDA an
    out-of-range target is never read: its row's loss is NaN (so the mean is NaN) and its
    gradient 0; on the CPU it raises an IndexError. The fused backends compute the gradient
    in one fused pass and do not differentiate it again: a backward through them with
    ``create_graph=True`` (a second derivative, a gradient penalty) raises; use
    ``backend="torch"`` for that.
    """
    if process_group is not None or _is_dtensor(logits):
        from fused_ls.parallel import smoothed_xent_vocab_parallel

        if (recompute_backward or z_loss_denominator != "weight" or return_accuracy or return_predictions
                or precomputed_lse is not None):
            raise ValueError("recompute_backward, z_loss_denominator, return_accuracy, return_predictions and "
                             "precomputed_lse are not available with process_group or class-sharded DTensor logits")
        return smoothed_xent_vocab_parallel(
            logits, target, label_smoothing, process_group=process_group, weight=weight,
            ignore_index=ignore_index, reduction=reduction, convention=convention, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, normalizer=normalizer, return_lse=return_lse,
            inplace_backward=inplace_backward, vocab_start=vocab_start, vocab_size=vocab_size, backend=backend,
        )
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start and vocab_size describe a slice of the classes: they need process_group")
    _core.check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap,
                          logit_scale, ignore_index=ignore_index, z_loss_denominator=z_loss_denominator,
                          normalizer=normalizer, backend=backend, inplace_backward=inplace_backward,
                          recompute_backward=recompute_backward)
    softcap = _core.effective_softcap(softcap)
    _core.check_targets(target, logits.shape[-1], ignore_index)
    _core.check_precomputed_lse(precomputed_lse, target, logits)
    weight, normalizer = _core.z_loss_per_token(target, weight, ignore_index, reduction, normalizer, z_loss,
                                                z_loss_denominator)
    name = _backend_for(backend, logits)
    if name == "torch":
        if inplace_backward and _core.is_functorch_wrapped(logits):
            raise ValueError("inplace_backward cannot run under torch.func transforms (vmap, grad, ...)")
        if inplace_backward:
            raise ValueError("inplace_backward needs a fused backend ('triton' or 'native'), not 'torch'")
        # Autograd differentiates the eager formulation (not the eager row op): twice if asked
        # (a gradient penalty), and under torch.func transforms. It rounds its gradient once anyway.
        out = smoothed_xent_reference(
            logits, target, label_smoothing, weight=weight, ignore_index=ignore_index, reduction=reduction,
            convention=convention, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            normalizer=normalizer, return_lse=return_lse,
        )
        if not (return_accuracy or return_predictions):
            return out
        loss, lse = out if return_lse else (out, None)
        with torch.no_grad():
            y = transform(logits.detach().to(accumulation_dtype(logits.dtype)), float(logit_scale), softcap or 0.0)
            predicted = y.argmax(dim=-1)
        return with_predictions(loss, lse, predicted, target, ignore_index, return_accuracy, return_predictions)
    if inplace_backward and not (torch.is_grad_enabled() and logits.requires_grad):
        inplace_backward = False  # no gradient will be read (eval, no_grad): keep the logits intact
    if inplace_backward:
        check_inplace_allowed(logits)

    V = logits.shape[-1]
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1 and V > 1:
        logits2d = logits2d.contiguous()  # the kernels read rows with unit stride
    target1d = target.reshape(-1)
    grad_scale = _core.gradient_scale(target1d, weight, ignore_index, reduction, normalizer,
                                      accumulation_dtype(logits.dtype))
    if weight is not None and weight.dtype != torch.float64:
        weight = weight.float()
    options = _core.row_options(convention, label_smoothing, V, ignore_index, z_loss, softcap, logit_scale)
    predict = return_accuracy or return_predictions
    given_lse = None
    if precomputed_lse is not None:
        given_lse = precomputed_lse.detach().reshape(-1).to(accumulation_dtype(logits.dtype)).contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (logits, grad_scale)):
        mode = "inplace" if inplace_backward else "recompute" if recompute_backward else "saved"
        loss, lse, predicted = _FusedSmoothedXent.apply(logits2d, target1d, weight, grad_scale, reduction, options,
                                                        mode, name, predict, given_lse)
    else:
        # No gradient can be asked for (evaluation, no_grad): the loss-only op reads the
        # logits once and neither allocates nor writes a gradient.
        predicted = prediction_buffer(logits2d, predict)
        loss_rows, lse = backends.row_ops(name).rows_loss(logits2d, target1d, weight, *options, predicted, given_lse)
        loss = reduce_rows(loss_rows, reduction, grad_scale)
    if reduction == "none":
        loss = loss.view(target.shape)
    lse = lse.view(target.shape)
    if predict:
        return with_predictions(loss, lse if return_lse else None, predicted.view(target.shape), target,
                                ignore_index, return_accuracy, return_predictions)
    if return_lse:
        return loss, lse
    return loss


def _is_dtensor(tensor) -> bool:
    # DTensor logits (sharded on the classes) take the vocabulary-parallel path; with
    # torch.distributed.tensor never imported, no DTensor exists and the check is free.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _backend_for(backend: str, logits: torch.Tensor) -> str:
    """The backend name for these logits. Under torch.func transforms (vmap, grad) only the
    eager formulation composes: "auto" takes it, an explicit fused backend is refused."""
    name = backends.resolve(backend, logits.device)
    if name != "torch" and _core.is_functorch_wrapped(logits):
        if backend not in (None, "auto"):
            raise ValueError(f"backend {backend!r} cannot run under torch.func transforms (vmap, grad, ...): "
                             "use backend='torch' or 'auto'")
        return "torch"
    return name


def tune(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.1, **kwargs) -> None:
    """Tune the Triton launches for inputs like these now, before a CUDA graph is captured.

    Runs smoothed_xent's forward (with and without a gradient) and backward once on `logits`
    and `target` (left unchanged) with the given keyword arguments. Tuning times candidate
    launches and syncs with the host, so it never runs during capture: a launch not tuned
    beforehand is the default one there. Elsewhere the first call tunes by itself.
    """
    with torch.enable_grad():
        x = logits.detach().requires_grad_(True)
        out = smoothed_xent(x, target, label_smoothing, **{k: v for k, v in kwargs.items() if k != "inplace_backward"})
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward(torch.ones_like(loss))
    with torch.no_grad():
        smoothed_xent(logits.detach(), target, label_smoothing, **kwargs)


class SmoothedCrossEntropyLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`smoothed_xent`, taking the same keyword arguments.

    The arguments are checked here, when the module is built, not at its first call.
    """

    def __init__(self, label_smoothing: float = 0.1, **kwargs):
        super().__init__()
        if isinstance(label_smoothing, torch.Tensor):
            raise TypeError(
                "SmoothedCrossEntropyLoss's first argument is label_smoothing (a float); pass class weights "
                "as weight=..., unlike nn.CrossEntropyLoss(weight)"
            )
        unknown = set(kwargs) - MODULE_KEYWORDS
        if unknown:
            raise TypeError(f"SmoothedCrossEntropyLoss got unexpected keyword arguments {sorted(unknown)}")
        weight = kwargs.pop("weight", None)
        if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1):
            raise TypeError(f"weight must be a 1-D tensor of class weights or None, got {getattr(weight, 'shape', weight)!r}")
        _core.check_options(label_smoothing, **{k: v for k, v in kwargs.items() if k in _core.OPTION_KEYWORDS})
        _core.check_predictions_allowed(kwargs)
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing
        self.kwargs = kwargs

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        return smoothed_xent(logits, target, self.label_smoothing, weight=self.weight, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([f"label_smoothing={self.label_smoothing}"] + [f"{k}={v!r}" for k, v in self.kwargs.items()])


class _FusedSmoothedXent(torch.autograd.Function):
    """The fused row op under autograd, in one of three modes:

    * "saved": the forward writes the gradient (already divided by the mean's denominator)
      and the backward scales it by the upstream gradient.
    * "inplace": the same, with the gradient written over the logits (checked beforehand by
      check_inplace_allowed); their version counter moves, so an op that saved them raises
      autograd's usual in-place error.
    * "recompute": the forward writes no gradient; the backward computes it from the saved
      logits with the upstream gradient folded into the per-row scale, rounded once.

    A tensor normalizer is differentiated through `grad_scale`: d mean / d grad_scale is the
    sum of the row losses. The gradient itself is not differentiated again.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, grad_scale, reduction, options, mode, backend, predict, given_lse):
        ops = backends.row_ops(backend)
        ctx.mode, ctx.reduction, ctx.backend, ctx.options = mode, reduction, backend, options
        # Each row's argmax, from the same pass; an empty tensor when not asked for.
        predicted = prediction_buffer(logits, predict)
        if mode == "inplace":
            loss_rows, lse = ops.rows_inplace(logits, target, weight, grad_scale, *options, predicted, given_lse)
            grad = logits
            # The native op's dispatcher entry does not move the version counter itself; an op
            # that saved the logits for its backward must see that they were overwritten.
            torch.autograd.graph.increment_version(logits)
        elif mode == "recompute":
            loss_rows, lse = ops.rows_loss(logits, target, weight, *options, predicted, given_lse)
            grad = None
        else:
            loss_rows, lse, grad = ops.rows(logits, target, weight, grad_scale, *options, predicted, given_lse)
        loss = reduce_rows(loss_rows, reduction, grad_scale)
        if mode == "recompute":
            ctx.save_for_backward(logits, target, weight, grad_scale, given_lse)
        elif reduction == "none":
            ctx.save_for_backward(grad, target)  # to give rows without a gradient no upstream
        else:
            ctx.save_for_backward(grad)
        ctx.loss_sum = loss_rows.sum() if reduction == "mean" and ctx.needs_input_grad[3] else None
        if predicted is None:
            predicted = logits.new_empty(0, dtype=torch.int64)
        ctx.mark_non_differentiable(lse, predicted)
        return loss, lse, predicted

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_predicted):
        refuse_create_graph("smoothed_xent")
        if ctx.mode == "recompute":
            logits, target, weight, grad_scale, given_lse = ctx.saved_tensors
            row_scale = (grad_scale * grad_loss.to(grad_scale.dtype)).reshape(-1)
            _, _, grad = backends.row_ops(ctx.backend).rows(logits, target, weight, row_scale, *ctx.options, None,
                                                            given_lse)
        else:
            grad, *target = ctx.saved_tensors
            if target:
                # An ignored row's gradient is 0 whatever its upstream (inf included), as in PyTorch.
                V = grad.shape[1]
                has_gradient = not_ignored(target[0], ctx.options.ignore_index) & (target[0] >= 0) & (target[0] < V)
                grad_loss = torch.where(has_gradient, grad_loss, 0.0)
            grad = scale_saved_gradient(grad, grad_loss)
        grad_grad_scale = None
        if ctx.loss_sum is not None:
            grad_grad_scale = (ctx.loss_sum * grad_loss).to(grad_loss.dtype)
        return grad, None, None, grad_grad_scale, None, None, None, None, None, None


# Keywords SmoothedCrossEntropyLoss takes: the options, and the tensors and layout it holds.
MODULE_KEYWORDS = _core.OPTION_KEYWORDS | {"weight", "return_lse", "return_accuracy", "return_predictions",
                                           "process_group", "vocab_start", "vocab_size"}
