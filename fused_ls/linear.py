"""smoothed_linear_xent: the LM head and the smoothed cross-entropy, without holding the logits.

The maths
---------
For token i with hidden state h_i (H), the logits are x_i = W h_i + b (V). The fused row op
of every backend (fused_ls.backends; maths in fused_ls/triton/smoothed_xent.py) turns a block
of rows of x into the per-row loss, the lse and, written over x in place,
g_i = grad_scale * dloss_i/dx_i. The chain rule then gives

    dL/dh_i = g_i W                    (1 x H per token)
    dL/dW   = sum_i g_i^T h_i          (V x H, summed over tokens)
    dL/db   = sum_i g_i                (V)

so a chunk of C tokens needs only its own C x V logits: compute them, turn them into g in
place, spend g on the three products, and let the next chunk reuse the buffer. The mean's
denominator (fused_ls._core.gradient_scale) depends on the targets alone, so it is
known before the first chunk and folded into g: the forward finishes every gradient, and
the backward of a scalar loss only multiplies them by the upstream gradient (1 in
training), in place.

reduction="none" is the exception: there the upstream gradient u_i differs per row and
dL/dW = sum_i u_i g_i^T h_i mixes the rows, so it cannot be recovered from a saved sum and
saving every g_i would be holding the logits. Its forward keeps only the inputs and its
backward recomputes the logits chunk by chunk, scaled by u_i (one GEMM more: 4 instead of
3), which also lets it run any number of times.

The smoothing term is linear in the logits, sum_c w_c x_c = h . (sum_c w_c W_c) + sum_c w_c b_c,
but this module does not use that: the row op gathers sum_c w_c y_c in the same pass that
finds the lse (no extra traffic), a softcap makes y non-linear in x, and for bf16 PyTorch's
numbers come from the rounded logits, which the row op sees and the identity would not.

Precision
---------
The logits of a chunk are a GEMM in the inputs' dtype (fp32 accumulation inside, rounded
once, as ``F.linear`` does). The row op computes in fp32 and rounds g once. dL/dh is one
GEMM over the whole vocabulary per token, exactly as in the materialised path.

dL/dW sums one product per chunk. In fp32 and fp64 the GEMM adds it into dL/dW itself. For
bf16 and fp16 inputs the sum is carried as a compensated pair: dL/dW in the inputs' dtype,
always the running sum rounded once, plus a bf16 buffer holding what that rounding left out
(hi + lo, 16 or more significant bits). Each update is computed in fp32
(total = hi + lo + product; hi = round(total); lo = round(total - hi)), so the error the
accumulation adds is below 2^-18 of the sum per chunk, and dL/dW ends as the running sum
rounded once: what an fp32 accumulator rounded at the end gives, at half its memory
(2VH bytes instead of 4VH) and with no final conversion pass. Each chunk's product comes
in fp32 from the GEMM on CUDA (``torch.mm(out_dtype=)``); on the CPU, which has no such
GEMM, it is rounded once to the inputs' dtype first. dL/db is summed in fp32 (V floats).

Split over ranks
----------------
With process_group, rank r holds rows [start_r, start_r + V_r) of W and b, and the same h and
targets as every other rank. Each chunk's logits give the rank its slice's row statistics;
fused_ls.parallel gathers them (one all-gather per chunk, 16 bytes per row per rank) and
turns them into the global lse and the gradient coefficients, so the chunk's slice of g is
formed from the logits already in hand, exactly as on one device, and spent on
dL/dW_r = g_r^T h and dL/db_r. dL/dh = sum_r g_r W_r is summed by one all-reduce at the end
(or left to the caller: reduce_hidden_grad=False). A first sweep of statistics, one gather
and a recomputing second sweep would save the per-chunk gathers at the price of a fourth
GEMM, a third more FLOPs than the gathers' latency costs (docs/vocab-parallel.md).

Work, memory and traffic per step (N tokens, C per chunk, b bytes per element)
-----------------------------------------------------------------------------
    flops:   3 x 2NVH, as the materialised path (forward, dL/dh, dL/dW); 4 x for "none"
    held:    one C x V logits buffer in the inputs' dtype; for bf16/fp16 also the bf16
             compensation of dL/dW (2VH bytes) and one product slab of SLAB_ELEMENTS. The materialised path holds about 3 NVb (logits, their
             log-softmax and their gradient).
    traffic: per chunk W is read twice (forward and dL/dh GEMMs) and the dL/dW sum read and
             written once, so chunks of fewer than a few hundred rows leave the GEMMs
             memory-bound on a GPU; default_chunk_size never goes below MIN_CHUNK_ROWS
             unless N does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from fused_ls import _core, backends, parallel
from fused_ls._autograd import refuse_create_graph, scale_saved_gradient
from fused_ls._core import accumulation_dtype, prediction_buffer, reduce_rows, with_predictions
from fused_ls._library import define_op

# Below this many rows a chunk's GEMMs (M = C) re-read W for little work: per chunk they do
# 6*C*V*H flops against about 4*V*H bytes of W and 8*V*H of the dL/dW sum (bf16), so 256
# rows give ~130 flops per byte (an H100/H200 needs ~300 for full bf16 speed, a CPU far
# less). Larger chunks trade memory for that; the floor keeps the head's memory at about 1/8
# of the materialised path at 4096 x 1024 x 128256 in bf16.
MIN_CHUNK_ROWS = 256
# Elements of one dL/dW product slab in the compensated path: its scratch is the product
# (bf16 on the CPU, 4 MiB; fp32 on CUDA, 16 MiB), small next to the 2VH-byte residual (the
# eager fallback adds an fp32 temporary of the slab). Per slab the update is one op (a native
# pass on the CPU, a Triton pass on CUDA); larger slabs were no faster on the CPU.
SLAB_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 22}
GRAD_ACCUMULATIONS = ("fp32", "weight_dtype")
# smoothed_xent's options less the two about the logits buffer, which the head owns.
_HEAD_OPTIONS = _core.OPTION_KEYWORDS - {"inplace_backward", "recompute_backward"}
_MODULE_KEYWORDS = _HEAD_OPTIONS | {"class_weight", "return_lse", "return_accuracy", "return_predictions",
                                    "chunk_size", "grad_accumulation", "process_group", "vocab_start", "vocab_size",
                                    "reduce_hidden_grad"}


def default_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk: the largest power of two no larger than N*H/V (logits no larger than
    the hidden states, torch's and Liger's rule of thumb) or N/16 (a sixteenth of the logits),
    but at least MIN_CHUNK_ROWS, and at most N.

    Both bounds scale with what the caller already holds; the floor and the N/16 term keep
    the GEMMs efficient and the number of passes over dL/dW at 16 or fewer. For LLM heads
    (V >> H) at 4096 tokens the floor wins: 256 x V logits.
    """
    def pow2_floor(x: int) -> int:
        return 1 << max(x.bit_length() - 1, 0)

    chunk = max(MIN_CHUNK_ROWS, pow2_floor(num_tokens * hidden_size // max(vocab_size, 1)), pow2_floor(num_tokens // 16))
    return max(1, min(num_tokens, chunk))


def smoothed_linear_xent(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
    *,
    class_weight: torch.Tensor | None = None,
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
    chunk_size: int | None = None,
    grad_accumulation: str = "fp32",
    backend: str = "auto",
    process_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    reduce_hidden_grad: bool = True,
):
    r"""Smoothed cross-entropy of ``hidden @ weight.T + bias``, never holding more than a chunk of it.

    Gives the numbers of ``smoothed_xent(F.linear(hidden, weight, bias), target, ...)`` and
    the gradients for ``hidden``, ``weight`` and ``bias``, with one ``chunk_size x V`` logits
    buffer instead of the ``N x V`` logits, their log-softmax and their gradient.

    Args:
        hidden: (..., H) float32, bfloat16 or float16 (float64 for checks), any leading dims.
        weight: (V, H) in ``hidden``'s dtype, as ``nn.Linear.weight`` / an LM head.
        target: (...) int64 or int32 class indices, the shape of ``hidden`` without H.
        bias: optional (V,) in ``hidden``'s dtype.
        label_smoothing: eps in [0, 1].
        class_weight: optional (V,) class weights: ``smoothed_xent``'s ``weight=``, renamed
            because ``weight`` here is the LM head. Not differentiated.
        ignore_index, reduction, convention, z_loss, z_loss_denominator, softcap, logit_scale,
            normalizer, return_lse, return_accuracy, return_predictions, backend: as in
            :func:`fused_ls.smoothed_xent`; the predictions come from each chunk's pass over its
            logits, which no other read follows.
        chunk_size: tokens per chunk; default :func:`default_chunk_size` (at least 256 tokens,
            or all of them). Smaller saves memory; larger re-reads ``weight`` and re-writes
            its gradient less often.
        grad_accumulation: how the gradients of a bfloat16/float16 ``weight`` are summed over
            the chunks (float32/float64 weights are summed in their own dtype either way):

            * "fp32" (default): with fp32 arithmetic, as a compensated pair (the gradient,
              always the running sum rounded once, plus a bf16 buffer of what that rounding
              left out: 2VH bytes), so the result is what an fp32 accumulator rounded at the
              end gives. One extra pass over the pair per chunk.
            * "weight_dtype": the GEMM adds every chunk into the gradient itself (fp32 inside
              the GEMM, one rounding per chunk): no extra memory and no extra pass, the
              gradient rounded once per chunk. What torch's chunked
              ``F.linear_cross_entropy`` ("compact") and Liger-Kernel do by default.
        process_group: a torch.distributed group over which the LM head is split by output
            rows (Megatron's vocabulary-parallel head): each rank passes its slice ``(V_r, H)``
            of ``weight`` (and ``(V_r,)`` of ``bias`` and ``class_weight``), holding classes
            ``[vocab_start, vocab_start + V_r)`` in rank order, and the same ``hidden``,
            ``target`` and ``normalizer`` as every other rank. Every rank gets the loss of one
            device holding the whole head, the gradients of its slices, and (see
            ``reduce_hidden_grad``) the gradient of ``hidden``. ``chunk_size`` must be the same
            on every rank. See docs/vocab-parallel.md.
        vocab_start, vocab_size: with ``process_group``, this rank's first class and the global
            number of classes, as in :func:`fused_ls.smoothed_xent`; if omitted, gathered once
            per group and local size (one host sync).
        reduce_hidden_grad: with ``process_group``: True (default) all-reduces the gradient of
            ``hidden`` over the group, so that every rank holds the single-device gradient; False
            leaves each rank its partial product ``dL/dlogits_r @ weight_r``, for a caller whose
            own autograd already sums it over the ranks (Megatron's
            ``copy_to_tensor_model_parallel_region``, or a sequence-parallel gather whose
            backward reduce-scatters): summing it twice would multiply it by the group size.

    Returns:
        As :func:`fused_ls.smoothed_xent`: the loss in float32 (float64 for float64 inputs),
        with ``return_lse`` alone the pair (loss, per-token lse of the transformed logits), and
        with ``return_accuracy`` or ``return_predictions`` a ``SmoothedXentOutput``.

    The gradient of ``bias`` is summed in float32. The forward computes every gradient, so it costs
    about three GEMMs (four for ``reduction="none"``, whose backward recomputes the logits);
    with no gradient needed it is one GEMM. A mean over rows that are all ignored is 0 with
    zero gradients, as in ``smoothed_xent``. Under ``torch.autocast`` the inputs are cast to
    the autocast dtype first, as ``F.linear`` would.
    """
    if process_group is not None:
        if return_accuracy or return_predictions:
            raise ValueError("return_accuracy and return_predictions are not available with process_group")
        return _vocab_parallel_head(
            hidden, weight, target, bias, label_smoothing, class_weight=class_weight, ignore_index=ignore_index,
            reduction=reduction, convention=convention, z_loss=z_loss, z_loss_denominator=z_loss_denominator,
            softcap=softcap, logit_scale=logit_scale, normalizer=normalizer, return_lse=return_lse,
            chunk_size=chunk_size, grad_accumulation=grad_accumulation, backend=backend, group=process_group,
            vocab_start=vocab_start, vocab_size=vocab_size, reduce_hidden_grad=reduce_hidden_grad,
        )
    if vocab_start is not None or vocab_size is not None or reduce_hidden_grad is not True:
        raise ValueError("vocab_start, vocab_size and reduce_hidden_grad describe a head split over ranks: "
                         "they need process_group")
    _check_head(hidden, weight, bias, class_weight, chunk_size, grad_accumulation)
    V, H = weight.shape
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    # A zero-byte stand-in with the logits' shape, dtype and device lets smoothed_xent's
    # checks speak for the arguments the two functions share.
    logits_like = hidden.new_empty(()).expand(*hidden.shape[:-1], V)
    _core.check_arguments(logits_like, target, label_smoothing, class_weight, reduction, convention,
                          z_loss, softcap, logit_scale, ignore_index=ignore_index,
                          z_loss_denominator=z_loss_denominator, normalizer=normalizer, backend=backend)
    if _core.is_functorch_wrapped(hidden) or _core.is_functorch_wrapped(weight):
        raise ValueError("smoothed_linear_xent cannot run under torch.func transforms (vmap, grad, ...); "
                         "use smoothed_xent(F.linear(hidden, weight, bias), target, backend='torch') there")
    softcap = _core.effective_softcap(softcap)
    _core.check_targets(target, V, ignore_index)  # CPU only
    class_weight, normalizer = _core.z_loss_per_token(target, class_weight, ignore_index, reduction, normalizer,
                                                      z_loss, z_loss_denominator)
    name = backends.resolve(backend, hidden.device)

    hidden2d = hidden.reshape(-1, H)
    target1d = target.reshape(-1)
    grad_scale = _core.gradient_scale(target1d, class_weight, ignore_index, reduction, normalizer,
                                      accumulation_dtype(hidden.dtype))
    if class_weight is not None and class_weight.dtype != torch.float64:
        class_weight = class_weight.float()
    chunk = chunk_size if chunk_size is not None else default_chunk_size(hidden2d.shape[0], H, V)
    options = _core.row_options(convention, label_smoothing, V, ignore_index, z_loss, softcap, logit_scale)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    predict = return_accuracy or return_predictions
    loss, lse, predicted = _LinearSmoothedXent.apply(hidden2d, weight, bias, target1d, class_weight, grad_scale,
                                                     reduction, (chunk, name, grad_accumulation), options, needs,
                                                     predict)
    if reduction == "none":
        loss = loss.view(target.shape)
    lse = lse.view(target.shape)
    if predict:
        return with_predictions(loss, lse if return_lse else None, predicted.view(target.shape), target,
                                ignore_index, return_accuracy, return_predictions)
    if return_lse:
        return loss, lse
    return loss


class SmoothedLinearCrossEntropyLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`smoothed_linear_xent`: ``loss(hidden, weight, target, bias=None)``.

    Takes the same keyword arguments, checked when the module is built; ``class_weight`` is
    kept as a buffer.
    """

    def __init__(self, label_smoothing: float = 0.1, **kwargs):
        super().__init__()
        if isinstance(label_smoothing, torch.Tensor):
            raise TypeError("SmoothedLinearCrossEntropyLoss's first argument is label_smoothing (a float); "
                            "pass class weights as class_weight=...")
        unknown = set(kwargs) - _MODULE_KEYWORDS
        if unknown:
            raise TypeError(f"SmoothedLinearCrossEntropyLoss got unexpected keyword arguments {sorted(unknown)}")
        _core.check_options(label_smoothing, **{k: v for k, v in kwargs.items() if k in _HEAD_OPTIONS})
        _core.check_predictions_allowed(kwargs)
        class_weight = kwargs.get("class_weight")
        if class_weight is not None and (not isinstance(class_weight, torch.Tensor) or class_weight.dim() != 1):
            raise TypeError(f"class_weight must be a 1-D tensor or None, got {getattr(class_weight, 'shape', class_weight)!r}")
        _check_plan(kwargs.get("chunk_size"), kwargs.get("grad_accumulation", GRAD_ACCUMULATIONS[0]))
        self.register_buffer("class_weight", kwargs.pop("class_weight", None))
        self.label_smoothing = label_smoothing
        self.kwargs = kwargs

    def forward(self, hidden, weight, target, bias=None):
        return smoothed_linear_xent(hidden, weight, target, bias, self.label_smoothing,
                                    class_weight=self.class_weight, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([f"label_smoothing={self.label_smoothing}"] + [f"{k}={v!r}" for k, v in self.kwargs.items()])


class _LinearSmoothedXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, grad_scale, reduction, plan, options, needs,
                predict):
        need_hidden, need_weight, need_bias = needs
        ctx.setup = (plan, options)
        ctx.reduction = reduction
        # Each token's argmax, from the chunks' row ops; an empty tensor when not asked for.
        predicted = prediction_buffer(hidden, predict)
        if reduction == "none":
            # The per-row upstream gradient arrives only in backward: recompute there.
            loss_rows, lse, *_ = _sweep(hidden, weight, bias, target, class_weight, grad_scale, None,
                                        plan, options, False, False, False, predicted)
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, grad_scale)
            return _non_differentiable_outputs(ctx, hidden, loss_rows, lse, predicted)
        loss_rows, lse, grad_hidden, grad_weight, grad_bias = _sweep(
            hidden, weight, bias, target, class_weight, grad_scale, None,
            plan, options, need_hidden, need_weight, need_bias, predicted,
        )
        loss = reduce_rows(loss_rows, reduction, grad_scale)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        # A tensor normalizer is differentiated: d mean / d grad_scale is the sum of the row losses.
        ctx.loss_sum = loss_rows.sum() if reduction == "mean" and ctx.needs_input_grad[5] else None
        return _non_differentiable_outputs(ctx, hidden, loss, lse, predicted)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_predicted):
        refuse_create_graph("smoothed_linear_xent")
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.reduction == "none":
            hidden, weight, bias, target, class_weight, grad_scale = ctx.saved_tensors
            plan, options = ctx.setup
            row_scale = grad_scale * grad_loss.reshape(-1).to(accumulation_dtype(hidden.dtype))
            _, _, grad_hidden, grad_weight, grad_bias = _sweep(
                hidden, weight, bias, target, class_weight, grad_scale, row_scale,
                plan, options, need_hidden, need_weight, need_bias,
            )
        else:
            grad_hidden, grad_weight, grad_bias = (
                scale_saved_gradient(g, grad_loss) if need else None
                for g, need in zip(ctx.saved_tensors, (need_hidden, need_weight, need_bias))
            )
        loss_sum = getattr(ctx, "loss_sum", None)
        grad_grad_scale = None if loss_sum is None else loss_sum * grad_loss
        return grad_hidden, grad_weight, grad_bias, None, None, grad_grad_scale, None, None, None, None, None


def _non_differentiable_outputs(ctx, hidden, loss, lse, predicted):
    """(loss, lse, predicted), the last an empty int64 tensor when no argmax was asked for."""
    if predicted is None:
        predicted = hidden.new_empty(0, dtype=torch.int64)
    ctx.mark_non_differentiable(lse, predicted)
    return loss, lse, predicted


def _sweep(hidden, weight, bias, target, class_weight, grad_scale, row_scale, plan, options,
           need_hidden, need_weight, need_bias, predicted=None):
    """One pass over the token chunks: (loss_rows, lse, dL/dh, dL/dW, dL/db), each gradient
    None unless asked for. `row_scale` (N,), if given, multiplies each row's gradient;
    `plan` is (tokens per chunk, backend name, grad_accumulation); `predicted`, an (N,) int64
    buffer or None, gets each row's argmax."""
    chunk, backend, grad_accumulation = plan
    N, H = hidden.shape
    V = weight.shape[0]
    acc_dtype = accumulation_dtype(hidden.dtype)
    # With no gradient asked for (evaluation, and the forward of reduction="none"), the
    # loss-only row op: the logits are read once and nothing is written over them.
    loss_only = row_scale is None and not (need_hidden or need_weight or need_bias)
    ops = backends.row_ops(backend)
    rows_op = ops.rows_loss if loss_only else ops.rows_inplace
    compiling = torch.compiler.is_compiling()
    # dL/db is V floats: summed in fp32 (fp64) whatever the inputs' dtype.
    bias_acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_hidden = _empty(N, H, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = _WeightGradient(weight, grad_accumulation) if need_weight else None
    grad_bias = torch.zeros(V, dtype=bias_acc_dtype, device=weight.device) if need_bias else None
    # One buffer reused by every chunk (the last may be shorter). Under torch.compile each
    # chunk gets its own tensor and the compiler plans the memory.
    buffer = None if compiling else _empty(min(chunk, N), V, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.t()
    losses, lses = [], []
    with _no_autocast(hidden.device.type):
        for start in range(0, N, chunk):
            stop = min(start + chunk, N)
            h = hidden[start:stop]
            if buffer is None:
                logits = torch.mm(h, weight_t) if bias is None else torch.addmm(bias, h, weight_t)
            else:
                logits = buffer[: stop - start]
                if bias is None:
                    torch.mm(h, weight_t, out=logits)
                else:
                    torch.addmm(bias, h, weight_t, out=logits)
            chunk_predicted = None if predicted is None else predicted[start:stop]
            if loss_only:
                loss_rows, lse = rows_op(logits, target[start:stop], class_weight, *options, chunk_predicted)
            else:
                # A per-row upstream gradient is folded into the row op's scale, so that each
                # gradient element is rounded once.
                scale = grad_scale if row_scale is None else row_scale[start:stop]
                loss_rows, lse = rows_op(logits, target[start:stop], class_weight, scale, *options, chunk_predicted)
            losses.append(loss_rows)
            lses.append(lse)
            grad = logits  # the row op wrote g over the logits (unless loss_only: nothing reads it)
            if need_hidden:
                if buffer is None:
                    grad_hidden[start:stop] = torch.mm(grad, weight)
                else:
                    torch.mm(grad, weight, out=grad_hidden[start:stop])
            if need_weight:
                grad_weight.add_transposed_product(grad, h)
            if need_bias:
                grad_bias += grad.sum(0, dtype=bias_acc_dtype)
    del buffer
    if grad_weight is not None:
        grad_weight = grad_weight.result()
    if grad_bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    if N == 0:
        empty = hidden.new_empty(0, dtype=acc_dtype)
        return empty, empty.clone(), grad_hidden, grad_weight, grad_bias
    return torch.cat(losses), torch.cat(lses), grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- the head split over ranks


class _ParallelHead(NamedTuple):
    """What every chunk of the vocabulary-parallel sweep needs besides the tensors."""

    chunk: int
    grad_accumulation: str
    group: object
    vocab_start: int
    vocab_size: int
    options: _core.RowOptions
    reduction: str
    reduce_hidden_grad: bool
    backend: str  # resolved: its slice passes reduce each chunk of logits and write its gradient


def _vocab_parallel_head(hidden, weight, target, bias, label_smoothing, *, class_weight, ignore_index, reduction,
                         convention, z_loss, z_loss_denominator, softcap, logit_scale, normalizer, return_lse,
                         chunk_size, grad_accumulation, backend, group, vocab_start, vocab_size, reduce_hidden_grad):
    """smoothed_linear_xent with the head's rows split over `group` (docs/vocab-parallel.md)."""
    if z_loss_denominator != "weight":
        raise ValueError("z_loss_denominator='tokens' is not available with process_group")
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be True or False, got {reduce_hidden_grad!r}")
    _check_head(hidden, weight, bias, class_weight, chunk_size, grad_accumulation, min_classes=0)
    local_size, H = weight.shape
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    start, V = parallel.vocab_slice(group, local_size, vocab_start, vocab_size, hidden.device)
    logits_like = hidden.new_empty(()).expand(*hidden.shape[:-1], local_size)
    _core.check_arguments(logits_like, target, label_smoothing, class_weight, reduction, convention, z_loss, softcap,
                          logit_scale, num_classes=V, ignore_index=ignore_index, normalizer=normalizer,
                          backend=backend)
    if _core.is_functorch_wrapped(hidden) or _core.is_functorch_wrapped(weight):
        raise ValueError("smoothed_linear_xent cannot run under torch.func transforms (vmap, grad, ...)")
    softcap = _core.effective_softcap(softcap)
    _core.check_targets(target, V, ignore_index)  # CPU only

    acc_dtype = accumulation_dtype(hidden.dtype)
    hidden2d = hidden.reshape(-1, H)
    target1d = target.reshape(-1)
    if class_weight is not None:
        class_weight = class_weight.to(acc_dtype)
    if reduction == "mean":
        # The mean's denominator is folded into every chunk's gradient, so it is needed before
        # the first chunk. Only the sum of the targets' class weights is not known locally:
        # one all-gather of one number per rank.
        weight_of_targets = None
        if class_weight is not None and normalizer is None:
            weight_of_targets = parallel.target_weight_sum(target1d, ignore_index, class_weight, start, V, group,
                                                           acc_dtype)
        if normalizer is not None:
            normalizer = _core.normalizer_tensor(normalizer, acc_dtype, hidden.device)
        grad_scale = _core.mean_gradient_scale(_core.not_ignored(target1d, ignore_index), normalizer,
                                               weight_of_targets, acc_dtype)
    else:
        grad_scale = torch.ones((), dtype=acc_dtype, device=hidden.device)
    # Every rank must cut the tokens into the same chunks (one gather each): the default is
    # computed from the largest slice, ceil(V / world), not from this rank's own.
    world = dist.get_world_size(group)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(hidden2d.shape[0], H, -(-V // world))
    options = _core.row_options(convention, label_smoothing, V, ignore_index, z_loss, softcap, logit_scale)
    head = _ParallelHead(chunk, grad_accumulation, group, start, V, options, reduction, reduce_hidden_grad,
                         backends.resolve(backend, hidden.device))
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    loss, lse = _VocabParallelLinearSmoothedXent.apply(hidden2d, weight, bias, target1d, class_weight, grad_scale,
                                                       head, needs)
    if reduction == "none":
        loss = loss.view(target.shape)
    if return_lse:
        return loss, lse.view(target.shape)
    return loss


class _VocabParallelLinearSmoothedXent(torch.autograd.Function):
    """As _LinearSmoothedXent: the forward finishes every gradient (a scalar loss) or keeps the
    inputs and the global row statistics for a recomputing backward ("none")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, grad_scale, head: _ParallelHead, needs):
        ctx.head = head
        ctx.loss_sum = None
        if head.reduction == "none":
            # The per-row upstream gradient arrives only in backward: recompute the logits there,
            # from the global statistics gathered now (no collective but the hidden all-reduce).
            stats, *_ = _parallel_sweep(hidden, weight, bias, target, class_weight, None, None, head,
                                        False, False, False)
            ctx.save_for_backward(hidden, weight, bias, target, class_weight, *stats)
            ctx.mark_non_differentiable(stats.lse)
            return stats.loss_rows, stats.lse
        stats, grad_hidden, grad_weight, grad_bias = _parallel_sweep(
            hidden, weight, bias, target, class_weight, grad_scale, None, head, *needs)
        loss = reduce_rows(stats.loss_rows, head.reduction, grad_scale)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.loss_sum = stats.loss_rows.sum() if head.reduction == "mean" and ctx.needs_input_grad[5] else None
        ctx.mark_non_differentiable(stats.lse)
        return loss, stats.lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        refuse_create_graph("smoothed_linear_xent (vocabulary parallel)")
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        head = ctx.head
        if head.reduction == "none":
            hidden, weight, bias, target, class_weight, *stats = ctx.saved_tensors
            row_scale = grad_loss.reshape(-1).to(accumulation_dtype(hidden.dtype))
            _, grad_hidden, grad_weight, grad_bias = _parallel_sweep(
                hidden, weight, bias, target, class_weight, row_scale, parallel.RowStatistics(*stats), head,
                need_hidden, need_weight, need_bias,
            )
        else:
            grad_hidden, grad_weight, grad_bias = (
                scale_saved_gradient(g, grad_loss) if need else None
                for g, need in zip(ctx.saved_tensors, (need_hidden, need_weight, need_bias))
            )
        grad_grad_scale = None if ctx.loss_sum is None else ctx.loss_sum * grad_loss
        return grad_hidden, grad_weight, grad_bias, None, None, grad_grad_scale, None, None


def _parallel_sweep(hidden, weight, bias, target, class_weight, row_scale, saved, head: _ParallelHead,
                    need_hidden, need_weight, need_bias):
    """One pass over the token chunks with this rank's slice of the head: (row statistics,
    dL/dh, dL/dW_r, dL/db_r), each gradient None unless asked for.

    Without `saved`, each chunk's logits are reduced to their statistics and gathered (one
    all-gather per chunk) before its gradient is formed from the same logits; with `saved`
    (the statistics of an earlier sweep), no collective but the hidden gradient's all-reduce.
    `row_scale` (0-d, or one per row) multiplies each row's gradient."""
    N, H = hidden.shape
    local_size = weight.shape[0]
    options = head.options
    acc_dtype = accumulation_dtype(hidden.dtype)
    rows = parallel.slice_targets(target, options.ignore_index, head.vocab_start, local_size, head.vocab_size)
    need_grad = need_hidden or need_weight or need_bias
    if saved is None:
        saved = parallel.RowStatistics(*(hidden.new_empty(N, dtype=acc_dtype) for _ in range(5)),
                                       weight_sum=hidden.new_zeros((), dtype=acc_dtype))
        gather = True
    else:
        gather = False
    bias_acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_hidden = _empty(N, H, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = _WeightGradient(weight, head.grad_accumulation) if need_weight else None
    grad_bias = torch.zeros(local_size, dtype=bias_acc_dtype, device=weight.device) if need_bias else None
    compiling = torch.compiler.is_compiling()
    buffer = None if compiling else _empty(min(head.chunk, N), local_size, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.t()
    with _no_autocast(hidden.device.type):
        for start in range(0, N, head.chunk):
            block = slice(start, min(start + head.chunk, N))
            h = hidden[block]
            if buffer is None:
                logits = torch.mm(h, weight_t) if bias is None else torch.addmm(bias, h, weight_t)
            else:
                logits = buffer[: h.shape[0]]
                if bias is None:
                    torch.mm(h, weight_t, out=logits)
                else:
                    torch.addmm(bias, h, weight_t, out=logits)
            if gather:
                stats = parallel.row_statistics(logits, class_weight, rows[block], options, head.group, head.backend)
                for kept, new in zip(saved[:5], stats[:5]):
                    kept[block] = new
                saved.weight_sum.copy_(stats.weight_sum)
            else:
                stats = parallel.RowStatistics(*(t[block] for t in saved[:5]), weight_sum=saved.weight_sum)
            if not need_grad:
                continue
            scale = row_scale if row_scale.dim() == 0 else row_scale[block]
            grad = parallel.write_gradient(logits, class_weight, rows[block], stats, scale, options, inplace=True,
                                           backend=head.backend)
            if need_hidden:
                if buffer is None:
                    grad_hidden[block] = torch.mm(grad, weight)
                else:
                    torch.mm(grad, weight, out=grad_hidden[block])
            if need_weight:
                grad_weight.add_transposed_product(grad, h)
            if need_bias:
                grad_bias += grad.sum(0, dtype=bias_acc_dtype)
    del buffer
    if grad_hidden is not None and head.reduce_hidden_grad:
        dist.all_reduce(grad_hidden, group=head.group)  # sum_r dL/dlogits_r @ W_r: the whole gradient
    if grad_weight is not None:
        grad_weight = grad_weight.result()
    if grad_bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return saved, grad_hidden, grad_weight, grad_bias


class _WeightGradient:
    """dL/dW = sum over chunks of grad_chunk.T @ h_chunk, summed as `grad_accumulation` says."""

    def __init__(self, weight: torch.Tensor, grad_accumulation: str):
        V, H = weight.shape
        self.sum = _empty(V, H, dtype=weight.dtype, device=weight.device)
        self.started = False
        self.compensated = grad_accumulation == "fp32" and weight.dtype not in (torch.float32, torch.float64)
        if self.compensated:
            # What rounding the running sum to bf16/fp16 left out; bf16 for its fp32 range,
            # so that the residual of an fp16 sum never underflows.
            self.residual = _empty(V, H, dtype=torch.bfloat16, device=weight.device)
            device = weight.device.type
            self.slab_rows = max(1, SLAB_ELEMENTS.get(device, SLAB_ELEMENTS["cuda"]) // max(H, 1))
            self.fp32_product = device == "cuda"
            # On the CPU a fresh product per slab would be a fresh mmap, its every page faulted
            # in again (a quarter of the update's time at 4096 x 1024 x 128256): one buffer is
            # reused instead. CUDA's caching allocator reuses blocks by itself, and under
            # torch.compile the compiler plans the memory.
            self.product_buffer = None
            if not self.fp32_product and not torch.compiler.is_compiling():
                self.product_buffer = _empty(min(self.slab_rows, V), H, dtype=weight.dtype, device=weight.device)

    def add_transposed_product(self, grad: torch.Tensor, h: torch.Tensor) -> None:
        """sum += grad.T @ h for one chunk: grad (C, V) and h (C, H)."""
        if not self.compensated:
            # The GEMM adds into dL/dW itself (fp32 inside, one rounding per chunk in bf16).
            if self.started:
                self.sum.addmm_(grad.t(), h)
            else:
                torch.mm(grad.t(), h, out=self.sum)
            self.started = True
            return
        # No GEMM here both reads bf16 and adds into an fp32 C on every device (addmm's
        # out_dtype is CUDA-only and fails under torch.compile: pytorch#163880), so the
        # product is made in slabs of the vocabulary and folded into the pair.
        V = self.sum.shape[0]
        for v0 in range(0, V, self.slab_rows):
            rows = slice(v0, v0 + self.slab_rows)
            g_slab = grad[:, rows].t()
            if self.fp32_product:
                product = torch.mm(g_slab, h, out_dtype=torch.float32)
            elif self.product_buffer is not None:
                # The CPU's bf16 GEMM rounds each chunk's product once.
                product = torch.mm(g_slab, h, out=self.product_buffer[: g_slab.shape[0]])
            else:
                product = torch.mm(g_slab, h)
            torch.ops.fused_ls.compensated_add_(self.sum[rows], self.residual[rows], product, not self.started)
        self.started = True

    def result(self) -> torch.Tensor:
        if not self.started:  # no tokens at all
            self.sum.zero_()
        return self.sum


def _compensated_add_cuda(hi, lo, product, first):
    try:
        from fused_ls.triton.linear import compensated_add_ as triton_compensated_add_
    except Exception:  # noqa: BLE001  (a broken Triton install must not break training: eager is right)
        _eager_compensated_add(hi, lo, product, first)
        return
    triton_compensated_add_(hi, lo, product, first)


def _eager_compensated_add(hi, lo, product, first):
    total = product.to(torch.float32, copy=True)  # a scratch copy: the op must not write `product`
    if not first:
        total += hi
        total += lo
    hi.copy_(total)  # rounded once
    total -= hi  # exact: hi is total's nearest neighbour in its dtype
    lo.copy_(total)


# (hi, lo) += product, elementwise: hi the running sum rounded to its dtype, lo (bf16) what
# that rounding left out, computed in fp32; with `first`, hi and lo are overwritten. The eager
# definition serves wherever no faster kernel is registered: the native extension registers a
# CPU kernel (csrc/cpu/compensated_add_kernel.cpp) and CUDA runs the Triton one, both bit for
# bit the eager numbers (tests/test_native.py, tests/test_linear.py).
compensated_add_ = define_op(
    "compensated_add_(Tensor(a!) hi, Tensor(b!) lo, Tensor product, bool first) -> ()",
    default=_eager_compensated_add,
    fake=lambda hi, lo, product, first: None,
    kernels={"CUDA": _compensated_add_cuda},
    mutated=(0, 1),
)


def _empty(*shape, dtype, device) -> torch.Tensor:
    """Every buffer whose contents the sweep must write before reading (tests poison it)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _no_autocast(device_type: str):
    # The inputs are already in their compute dtype; autocast would round the fp32 accumulation.
    return torch.autocast(device_type, enabled=False)


def _check_head(hidden, weight, bias, class_weight, chunk_size, grad_accumulation, min_classes=1):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be tensors")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have a feature dimension (..., H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < min_classes:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]} and V >= {min_classes}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias must be a tensor of shape ({V},), got {getattr(bias, 'shape', type(bias))}")
        if bias.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    if class_weight is not None and (
        not isinstance(class_weight, torch.Tensor) or class_weight.dim() != 1 or class_weight.shape[0] != V
    ):
        raise ValueError(f"class_weight must be a 1-D tensor of {V} class weights")
    _check_plan(chunk_size, grad_accumulation)


def _check_plan(chunk_size, grad_accumulation):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if grad_accumulation not in GRAD_ACCUMULATIONS:
        raise ValueError(f"grad_accumulation must be one of {GRAD_ACCUMULATIONS}, got {grad_accumulation!r}")
