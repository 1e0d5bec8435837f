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
    z_loss_denominator: str = "weight",
    softcap: float | None = None,
    logit_scale: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    return_lse: bool = False,
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
        convention: how eps is spread; with y the transformed logits, logp = log_softmax(y),
            w the class weights (1 without ``weight``), per row:

            * "uniform" (PyTorch): every class gets eps/V, the true class 1-eps+eps/V:
              ``loss = (1-eps) w_t (-logp_t) + eps/V * sum_c w_c (-logp_c)``
            * "others" (fairseq): the true class gets exactly 1-eps, every other eps/(V-1):
              ``loss = (1-eps) w_t (-logp_t) + eps/(V-1) * sum_{c != t} w_c (-logp_c)``
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
        ``target`` for ``reduction="none"``; with ``return_lse``, the pair (loss, lse).

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
    if process_group is not None:
        from fused_ls.parallel import smoothed_xent_vocab_parallel

        if recompute_backward or z_loss_denominator != "weight":
            raise ValueError("recompute_backward and z_loss_denominator are not available with process_group")
        return smoothed_xent_vocab_parallel(
            logits, target, label_smoothing, process_group=process_group, weight=weight,
            ignore_index=ignore_index, reduction=reduction, convention=convention, z_loss=z_loss,
            softcap=softcap, logit_scale=logit_scale, normalizer=normalizer, return_lse=return_lse,
            inplace_backward=inplace_backward, vocab_start=vocab_start, vocab_size=vocab_size, backend=backend,
        )
    if vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start and vocab_size describe a slice of the classes: they need process_group")
    _check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap, logit_scale,
                     ignore_index=ignore_index, z_loss_denominator=z_loss_denominator, normalizer=normalizer,
                     backend=backend, inplace_backward=inplace_backward, recompute_backward=recompute_backward)
    softcap = _effective_softcap(softcap)
    _check_targets(target, logits.shape[-1], ignore_index)
    weight, normalizer = z_loss_per_token(target, weight, ignore_index, reduction, normalizer, z_loss,
                                          z_loss_denominator)
    name = _backend_for(backend, logits)
    if name == "torch":
        if inplace_backward and _is_functorch_wrapped(logits):
            raise ValueError("inplace_backward cannot run under torch.func transforms (vmap, grad, ...)")
        if inplace_backward:
            raise ValueError("inplace_backward needs a fused backend ('triton' or 'native'), not 'torch'")
        # Autograd differentiates the eager formulation, which rounds its gradient once anyway.
        return smoothed_xent_reference(
            logits, target, label_smoothing, weight=weight, ignore_index=ignore_index, reduction=reduction,
            convention=convention, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            normalizer=normalizer, return_lse=return_lse,
        )
    if inplace_backward and not (torch.is_grad_enabled() and logits.requires_grad):
        inplace_backward = False  # no gradient will be read (eval, no_grad): keep the logits intact
    if inplace_backward:
        check_inplace_allowed(logits)

    V = logits.shape[-1]
    logits2d = logits.reshape(-1, V)
    if logits2d.stride(-1) != 1 and V > 1:
        logits2d = logits2d.contiguous()  # the kernels read rows with unit stride
    target1d = target.reshape(-1)
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad_scale = _gradient_scale(target1d, weight, ignore_index, reduction, normalizer, V, acc_dtype)
    if weight is not None and weight.dtype != torch.float64:
        weight = weight.float()
    row_args = (float(label_smoothing), convention == "others", int(ignore_index), float(z_loss),
                float(softcap or 0.0), float(logit_scale))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (logits, grad_scale)):
        mode = "inplace" if inplace_backward else "recompute" if recompute_backward else "saved"
        loss, lse = _FusedSmoothedXent.apply(logits2d, target1d, weight, grad_scale, reduction, row_args, mode,
                                                 name)
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
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    count = valid.sum(dtype=acc_dtype)
    weight_sum = _target_weight_sum(target, valid, weight, acc_dtype)
    # Every row ignored: nothing is scaled (the mean is 0 either way).
    ratio = torch.where(count != 0, count / weight_sum, 1.0)
    return weight.to(acc_dtype) * ratio, count


def _backend_for(backend: str, logits: torch.Tensor) -> str:
    """The backend name for these logits. Under torch.func transforms (vmap, grad) only the
    eager formulation composes: "auto" takes it, an explicit fused backend is refused."""
    name = backends.resolve(backend, logits.device)
    if name != "torch" and _is_functorch_wrapped(logits):
        if backend not in (None, "auto"):
            raise ValueError(f"backend {backend!r} cannot run under torch.func transforms (vmap, grad, ...): "
                             "use backend='torch' or 'auto'")
        return "torch"
    return name


def _is_functorch_wrapped(tensor: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and not torch.compiler.is_compiling() and check(tensor))


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
        unknown = set(kwargs) - _MODULE_KEYWORDS
        if unknown:
            raise TypeError(f"SmoothedCrossEntropyLoss got unexpected keyword arguments {sorted(unknown)}")
        weight = kwargs.pop("weight", None)
        if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1):
            raise TypeError(f"weight must be a 1-D tensor of class weights or None, got {getattr(weight, 'shape', weight)!r}")
        _check_options(label_smoothing, **{k: v for k, v in kwargs.items() if k in _OPTION_KEYWORDS})
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
    def forward(ctx, logits, target, weight, grad_scale, reduction, row_args, mode, backend):
        ops = backends.fused_ops(backend)
        ctx.mode, ctx.reduction, ctx.backend, ctx.row_args = mode, reduction, backend, row_args
        if mode == "inplace":
            loss_rows, lse = ops.rows_inplace(logits, target, weight, grad_scale, *row_args)
            grad = logits
            # The native op's dispatcher entry does not move the version counter itself; an op
            # that saved the logits for its backward must see that they were overwritten.
            torch.autograd.graph.increment_version(logits)
        elif mode == "recompute":
            loss_rows, lse = ops.rows_loss(logits, target, weight, *row_args)
            grad = None
        else:
            loss_rows, lse, grad = ops.rows(logits, target, weight, grad_scale, *row_args)
        loss = _reduce_rows(loss_rows, reduction, grad_scale)
        if mode == "recompute":
            ctx.save_for_backward(logits, target, weight, grad_scale)
        elif reduction == "none":
            ctx.save_for_backward(grad, target)  # to give rows without a gradient no upstream
        else:
            ctx.save_for_backward(grad)
        ctx.loss_sum = loss_rows.sum() if reduction == "mean" and ctx.needs_input_grad[3] else None
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        refuse_create_graph("smoothed_xent")
        if ctx.mode == "recompute":
            logits, target, weight, grad_scale = ctx.saved_tensors
            row_scale = (grad_scale * grad_loss.to(grad_scale.dtype)).reshape(-1)
            _, _, grad = backends.fused_ops(ctx.backend).rows(logits, target, weight, row_scale, *ctx.row_args)
        else:
            grad, *target = ctx.saved_tensors
            if target:
                # An ignored row's gradient is 0 whatever its upstream (inf included), as in PyTorch.
                ignore_index, V = ctx.row_args[2], grad.shape[1]
                has_gradient = not_ignored(target[0], ignore_index) & (target[0] >= 0) & (target[0] < V)
                grad_loss = torch.where(has_gradient, grad_loss, 0.0)
            grad = _scale_saved_gradient(grad, grad_loss)
        grad_grad_scale = None
        if ctx.loss_sum is not None:
            grad_grad_scale = (ctx.loss_sum * grad_loss).to(grad_loss.dtype)
        return grad, None, None, grad_grad_scale, None, None, None, None


def refuse_create_graph(what: str) -> None:
    """Called first in a fused backward: a fused kernel's gradient is a saved tensor, not a
    graph of ops, so a backward that records a graph (create_graph=True, for a second
    derivative) would silently treat it as a constant. Refused with the way out."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{what}: the fused backends compute the gradient in their fused pass and cannot differentiate "
            "it again (create_graph=True, double backward, a gradient penalty); use backend='torch' for that"
        )


def check_inplace_allowed(logits: torch.Tensor) -> None:
    """Autograd's rules for an in-place write, checked before the kernel overwrites `logits`
    with their gradient: never a leaf that requires grad, nor a view of one (a slice or
    reshape of a parameter), whose data the write would destroy; and never elements that
    share memory (expanded or unfolded logits), whose gradients would overwrite each other."""
    base = logits._base if logits._base is not None else logits
    if base.is_leaf and base.requires_grad:
        what = "a leaf tensor" if base is logits else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward would overwrite {what} that requires grad; "
            "use it on logits produced by an op (for example the LM head)"
        )
    if _elements_overlap(logits):
        raise ValueError(
            f"inplace_backward needs logits whose elements do not share memory (got shape {tuple(logits.shape)}, "
            f"strides {logits.stride()}: expanded or unfolded); call .contiguous() first or drop inplace_backward"
        )


def _elements_overlap(tensor: torch.Tensor) -> bool:
    """Whether two elements of `tensor` share memory: exact for any strides, where
    torch._debug_has_internal_overlap answers "cannot tell" for unfolded views."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)
    span = 0  # the largest offset reachable with the dimensions of smaller stride
    for stride, size in dims:
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


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
    """0-d factor folded into the gradient: 1/denominator for a mean, else 1 (see mean_scale)."""
    device = target.device
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    valid = not_ignored(target, ignore_index)
    count = valid.sum(dtype=dtype)
    if normalizer is not None:
        denom = _normalizer_tensor(normalizer, dtype, device)
    elif weight is None:
        denom = count
    else:
        denom = _target_weight_sum(target, valid, weight.detach(), dtype)
    return mean_scale(count, denom)


def _target_weight_sum(target, valid, weight, dtype) -> torch.Tensor:
    """sum of the class weights of the non-ignored targets; an out-of-range target (a NaN row
    on CUDA) is never used as an index."""
    V = weight.shape[0]
    safe_target = torch.where(valid & (target >= 0) & (target < V), target, torch.zeros_like(target))
    return (weight.to(dtype)[safe_target] * valid).sum()


def mean_scale(count: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """1/denom for a mean over `count` non-ignored rows: 0 when there are none (every row
    ignored: the loss is 0, not NaN), NaN when there are some but denom is 0 (PyTorch's 0/0)."""
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    scale = torch.where(denom != 0, safe.reciprocal(), math.nan)
    return torch.where(count != 0, scale, torch.zeros_like(scale))


def not_ignored(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """target != ignore_index, also when ignore_index does not fit the target's dtype (an
    int32 target compared with -2**40 would see the index wrapped to int32)."""
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def _normalizer_tensor(normalizer, dtype, device) -> torch.Tensor:
    """`normalizer` as a 0-d tensor on `device`, with no host sync."""
    _check_normalizer(normalizer)
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(device=device, dtype=dtype)  # keep it on the logits' device: no copy
    # torch.full passes the number to a fill kernel; torch.as_tensor would copy it from host
    # memory, a synchronising copy on CUDA that also breaks CUDA graph capture.
    return torch.full((), float(normalizer), dtype=dtype, device=device)


Z_LOSS_DENOMINATORS = ("weight", "tokens")

# Keywords of smoothed_xent that SmoothedCrossEntropyLoss takes, and those _check_options checks.
_OPTION_KEYWORDS = {
    "ignore_index", "reduction", "convention", "z_loss", "softcap", "logit_scale", "z_loss_denominator",
    "normalizer", "backend", "inplace_backward", "recompute_backward",
}
_MODULE_KEYWORDS = _OPTION_KEYWORDS | {"weight", "return_lse", "process_group", "vocab_start", "vocab_size"}
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_options(label_smoothing, *, ignore_index=-100, reduction="mean", convention="uniform", z_loss=0.0,
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
    _check_normalizer(normalizer)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) and not _is_symbolic_number(
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
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    for name, value in (("z_loss", z_loss), ("logit_scale", logit_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_symbolic_number(value):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not abs(value) < math.inf:  # not math.isfinite: a symbolic float under dynamic=True
            raise ValueError(f"{name} must be finite, got {value}")


def _check_normalizer(normalizer) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if not normalizer.is_floating_point() and normalizer.dtype not in _INDEX_DTYPES:
            raise TypeError(f"normalizer must be a real number, got a {normalizer.dtype} tensor")
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) and not _is_symbolic_number(
            normalizer):
        raise TypeError(f"normalizer must be a number, a 0-d tensor or None, got {type(normalizer).__name__}")


def _is_symbolic_number(value) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat))


def _effective_softcap(softcap):
    """An infinite cap caps nothing: the same as None (tanh(y / inf) * inf would be NaN)."""
    return None if softcap is not None and softcap == math.inf else softcap


def _check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap, logit_scale,
                     num_classes=None, ignore_index=-100, **options):
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
    _check_options(label_smoothing, ignore_index=ignore_index, reduction=reduction, convention=convention,
                   z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, **options)
    if convention == "others" and num_classes < 2:
        raise ValueError("convention='others' needs at least 2 classes")


def _check_targets(target, V, ignore_index):
    """Raise for an out-of-range target when that costs no device sync (CPU, eager)."""
    if (target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0
            or _is_functorch_wrapped(target)):
        return
    bad = not_ignored(target, ignore_index) & ((target < 0) | (target >= V))
    if bad.any():
        first = int(target[bad][0])
        raise IndexError(f"target {first} is out of range for {V} classes (and is not ignore_index={ignore_index})")
