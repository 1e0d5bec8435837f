"""Hugging Face transformers: label-smoothed losses for Trainer and for causal LMs.

Two levels, same numbers as transformers' own label smoothing:

1. The loss only. With ``TrainingArguments(label_smoothing_factor=eps)`` the Trainer computes
   its loss with ``transformers.trainer_pt_utils.LabelSmoother``, which materialises
   ``log_softmax`` of the logits (in the logits' dtype) and a float32 sum over them: two extra
   passes and two tensors of the logits' size. ``use_smoothed_xent(trainer)`` (or
   ``compute_loss_func=SmoothedXentLabelSmoother(eps, shift_labels=True)``) computes it with
   smoothed_xent instead. The model still materialises its (B, T, V) logits.

2. The LM head too. ``use_fused_linear_head(model_or_trainer)`` makes a causal LM compute its
   training loss from the hidden states with smoothed_linear_xent, so the (B, T, V) logits,
   the largest tensor of a training step, never exist; see use_fused_linear_head and
   docs/huggingface.md.

SmoothedXentLabelSmoother
-------------------------
The loss equals ``LabelSmoother``'s (the "uniform" smoothing of ``F.cross_entropy``), with the
same denominator: ``num_items_in_batch`` when the Trainer passes it (the token count of the
whole accumulated batch, so gradient accumulation gives the full-batch mean), else the
micro-batch's non-ignored labels. ``shift_labels=True`` for causal language models (position i
predicts label i+1), False for classification heads, as the Trainer itself decides for the
first form. Deliberate differences, all where LabelSmoother gives a wrong or no answer:

* bf16/fp16 logits: computed in float32 (LabelSmoother takes log_softmax in the logits' dtype),
  so the loss is closer to the float64 truth; the loss is float32.
* A micro-batch whose labels are all ``ignore_index`` gives 0 with a zero gradient, not NaN.
* A negative label other than ``ignore_index`` raises on CPU (NaN loss on CUDA), where
  LabelSmoother silently treats it as class 0; labels on another device than the logits
  (pipeline / ``device_map`` models) are moved to them, as transformers' own causal-LM loss does.

transformers is imported only by use_fused_linear_head (to recognise causal LMs); the smoother
works with any version whose Trainer calls ``label_smoother(outputs, labels, shift_labels=...,
num_items_in_batch=...)`` (older ones omit ``num_items_in_batch``) or
``compute_loss_func(outputs, labels, num_items_in_batch=...)`` (4.46 and later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from fused_ls.functional import smoothed_xent
from fused_ls.linear import smoothed_linear_xent

__all__ = [
    "FusedLinearHead", "SmoothedXentLabelSmoother", "remove_fused_linear_head", "use_fused_linear_head",
    "use_smoothed_xent",
]


class SmoothedXentLabelSmoother:
    """Drop-in for ``transformers.trainer_pt_utils.LabelSmoother``, computed by smoothed_xent.

    Args:
        epsilon: the label smoothing factor.
        ignore_index: the label of positions that do not count (padding, prompt tokens).
        shift_labels: the default when the caller does not say: True for causal LMs. The
            Trainer says so itself when it calls a label smoother, not a ``compute_loss_func``.
        inplace_backward: write the gradient into the model's logits (no memory beyond them);
            only while training (grad enabled), so evaluation logits are never overwritten.
        **smoothed_xent_kwargs: passed on (``backend``, ``z_loss``, ...); anything but the
            defaults departs from LabelSmoother's numbers on purpose.
    """

    def __init__(self, epsilon: float = 0.1, ignore_index: int = -100, *, shift_labels: bool = False,
                 inplace_backward: bool = False, **smoothed_xent_kwargs: Any):
        self.epsilon = epsilon
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.inplace_backward = inplace_backward
        self.smoothed_xent_kwargs = smoothed_xent_kwargs

    def __call__(self, model_output, labels: torch.Tensor, shift_labels: bool | None = None,
                 num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("SmoothedXentLabelSmoother needs labels: the batch has no 'labels' entry")
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        labels = labels.to(logits.device, non_blocking=True)
        if labels.dim() == logits.dim() and labels.shape[-1] == 1:
            labels = labels.squeeze(-1)  # LabelSmoother accepts (..., 1) labels too
        if self.shift_labels if shift_labels is None else shift_labels:
            # Position i predicts label i+1. Shifting the labels (the last position of each
            # sequence gets ignore_index) rather than slicing the logits avoids copying them
            # and keeps the model's own logits tensor, which inplace_backward can overwrite.
            labels = F.pad(labels[..., 1:], (0, 1), value=self.ignore_index)
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.dim() > 0:
            # nn.DataParallel: the Trainer repeats the one global count per replica.
            num_items_in_batch = num_items_in_batch.reshape(-1)[0]
        inplace = self.inplace_backward and torch.is_grad_enabled() and logits.requires_grad
        return smoothed_xent(
            logits, labels, self.epsilon, ignore_index=self.ignore_index, normalizer=num_items_in_batch,
            inplace_backward=inplace, **self.smoothed_xent_kwargs,
        )

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.smoothed_xent_kwargs.items())
        return (f"{type(self).__name__}(epsilon={self.epsilon}, ignore_index={self.ignore_index}, "
                f"shift_labels={self.shift_labels}, inplace_backward={self.inplace_backward}{extra})")


def use_smoothed_xent(trainer, **kwargs: Any):
    """Make ``trainer`` compute its label-smoothed loss with smoothed_xent; returns ``trainer``.

    Replaces the ``LabelSmoother`` that ``Trainer`` builds when ``label_smoothing_factor`` is
    set, keeping its epsilon and ignore_index; the Trainer still decides per model whether to
    shift the labels (causal LMs) and passes the global token count under gradient
    accumulation. Without label smoothing (or for multi-label classification, where the
    Trainer turns it off) there is no smoother and nothing changes: the model computes its
    own loss. ``kwargs`` go to :class:`SmoothedXentLabelSmoother` (``inplace_backward``,
    ``backend``, ...).
    """
    smoother = getattr(trainer, "label_smoother", None)
    if smoother is not None:
        trainer.label_smoother = SmoothedXentLabelSmoother(smoother.epsilon, smoother.ignore_index, **kwargs)
    return trainer


# ----------------------------------------------------------------------------- the fused LM head

# smoothed_linear_xent's keywords a user may set through use_fused_linear_head. The rest are the
# model's (softcap, logit_scale: found by the probe), the Trainer's (normalizer: its
# num_items_in_batch) or fixed by what a causal LM's loss is (reduction="mean", no class weights).
_HEAD_KEYWORDS = frozenset({"convention", "z_loss", "z_loss_denominator", "chunk_size", "grad_accumulation", "backend"})
# Those of them smoothed_xent also takes: the loss of a forward without gradients, from the logits.
_LOGITS_KEYWORDS = frozenset({"convention", "z_loss", "z_loss_denominator", "backend"})


class _Missing:
    """'Nothing was there', one object even in copies of a patched model (copy and pickle
    keep a module global by name), so that ``is _MISSING`` holds in them too."""

    def __reduce__(self):
        return "_MISSING"

    def __repr__(self):
        return "_MISSING"


_MISSING = _Missing()


@dataclasses.dataclass
class FusedLinearHead:
    """What ``use_fused_linear_head`` installed on a model: ``model.fused_ls_head``.

    ``logit_scale`` and ``softcap`` are how the model turns its ``lm_head`` output into logits
    (``softcap * tanh(logit_scale * x / softcap)``, Gemma 2's final-logit softcapping, Granite's
    and Cohere's logit scaling), as read from its config and checked on the model itself.
    """

    label_smoothing: float
    ignore_index: int
    logit_scale: float
    softcap: float | None
    options: dict
    # How the model was before: restored by remove_fused_linear_head.
    previous_forward: Any = dataclasses.field(default=_MISSING, repr=False)
    previous_accepts_loss_kwargs: Any = dataclasses.field(default=_MISSING, repr=False)
    labels_position: int | None = dataclasses.field(default=None, repr=False)
    warned_unlabelled_training: bool = dataclasses.field(default=False, repr=False)


def use_fused_linear_head(model_or_trainer, label_smoothing: float | None = None, *, ignore_index: int = -100,
                          **options: Any):
    """Make a causal LM compute its training loss from the hidden states; returns the argument.

    With labels and gradients enabled, the patched ``model(input_ids, labels=labels, ...)`` runs
    the model's own forward up to its ``lm_head``, then computes transformers' causal-LM loss,
    label-smoothed, with :func:`fused_ls.smoothed_linear_xent` from ``lm_head``'s input: the
    (B, T, V) logits are never materialised, and ``outputs.logits`` is None. The loss is the
    mean over the shifted labels that are not ``ignore_index``, or their sum over
    ``num_items_in_batch`` when that is passed (the Trainer does, under gradient accumulation),
    as ``model.loss_function`` computes it; a final-logit softcap or logit scale of the model is
    applied chunk by chunk. Gradients reach every parameter, a tied embedding included.

    Without labels (inference, ``generate``) the forward is the model's own, untouched. With
    labels but no gradients (evaluation), the model's logits are computed and returned as
    before, and the loss is computed from them with the same smoothing.

    Args:
        model_or_trainer: a causal LM (a model of transformers' ``AutoModelForCausalLM``
            mapping whose output embeddings are an ``nn.Linear``), patched in place; or a
            ``Trainer``, whose model is patched and whose ``LabelSmoother`` is removed, so
            that the model's loss is the only smoothing and the Trainer passes
            ``num_items_in_batch`` to it.
        label_smoothing: eps. For a Trainer, None takes ``args.label_smoothing_factor``; a
            different value from a non-zero factor is refused (it would be two smoothings).
            For a model, None means 0: the plain cross-entropy, still without the logits.
        ignore_index: the label of positions that do not count.
        **options: for smoothed_linear_xent: ``chunk_size``, ``grad_accumulation``,
            ``backend``, ``convention``, ``z_loss``, ``z_loss_denominator``.

    The patch is an instance attribute ``forward`` that wraps the previous one (the class's,
    or a hook's) and ``model.fused_ls_head`` (a :class:`FusedLinearHead`); patching again
    replaces the settings; :func:`remove_fused_linear_head` undoes it. Checked when patching,
    on one token through the model: that its forward calls ``lm_head`` once, as a module, and
    that what it does to ``lm_head``'s output before returning it is the logit scale and
    softcap read from its config (anything else, such as slicing a padded vocabulary or adding
    a bias, is refused with a ValueError rather than computed wrongly).
    """
    if isinstance(model_or_trainer, torch.nn.Module):
        eps = 0.0 if label_smoothing is None else label_smoothing
        _patch_model(model_or_trainer, eps, ignore_index, options)
        return model_or_trainer
    if not (hasattr(model_or_trainer, "model") and hasattr(model_or_trainer, "args")):
        raise TypeError(f"use_fused_linear_head takes a transformers model or a Trainer, "
                        f"got {type(model_or_trainer).__name__}")
    trainer = model_or_trainer
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError("this Trainer has a compute_loss_func: it takes the labels away from the model and "
                         "computes the loss from the logits, so the fused head could not run; drop one of them")
    smoother = getattr(trainer, "label_smoother", None)
    factor = 0.0 if smoother is None else float(smoother.epsilon)
    if label_smoothing is not None and factor and not math.isclose(label_smoothing, factor):
        raise ValueError(f"label_smoothing={label_smoothing} differs from the Trainer's label_smoothing_factor "
                         f"{factor}; pass one of them (label_smoothing=None takes the Trainer's)")
    eps = factor if label_smoothing is None else label_smoothing
    if smoother is not None and "ignore_index" not in options and ignore_index == -100:
        ignore_index = smoother.ignore_index
    _patch_model(trainer.model, eps, ignore_index, options)
    if "_fused_ls_previous" not in trainer.__dict__:
        trainer._fused_ls_previous = (smoother, getattr(trainer, "model_accepts_loss_kwargs", _MISSING))
    # The model computes the one smoothing; the Trainer gives it the labels and its global token
    # count (num_items_in_batch) and then leaves the loss unscaled under gradient accumulation.
    trainer.label_smoother = None
    trainer.model_accepts_loss_kwargs = True
    return trainer


def remove_fused_linear_head(model_or_trainer):
    """Undo :func:`use_fused_linear_head`: the model's previous forward, and for a Trainer its
    label smoother; returns the argument. A model that is not patched is returned as it is."""
    trainer = None if isinstance(model_or_trainer, torch.nn.Module) else model_or_trainer
    model = model_or_trainer if trainer is None else trainer.model
    _unpatch_model(model)
    if trainer is not None and "_fused_ls_previous" in trainer.__dict__:
        smoother, accepts = trainer.__dict__.pop("_fused_ls_previous")
        trainer.label_smoother = smoother
        if accepts is _MISSING:
            del trainer.model_accepts_loss_kwargs
        else:
            trainer.model_accepts_loss_kwargs = accepts
    return model_or_trainer


def _patch_model(model, eps: float, ignore_index: int, options: dict) -> None:
    unknown = set(options) - _HEAD_KEYWORDS
    if unknown:
        raise TypeError(f"use_fused_linear_head got unexpected keyword arguments {sorted(unknown)}; "
                        f"it takes label_smoothing, ignore_index and {sorted(_HEAD_KEYWORDS)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {eps!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    _check_causal_lm(model)
    _unpatch_model(model)
    head = _linear_head(model)
    logit_scale, softcap = _probe_logit_transform(model, head)
    forward_params = [p for p in inspect.signature(type(model).forward).parameters.values()][1:]
    names = [p.name for p in forward_params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    state = FusedLinearHead(
        label_smoothing=float(eps), ignore_index=ignore_index, logit_scale=logit_scale, softcap=softcap,
        options=dict(options), previous_forward=model.__dict__.get("forward", _MISSING),
        previous_accepts_loss_kwargs=model.__dict__.get("accepts_loss_kwargs", _MISSING),
        labels_position=names.index("labels") if "labels" in names else None,
    )
    model.fused_ls_head = state
    model.forward = types.MethodType(_fused_forward_function(type(model)), model)
    # The Trainer passes num_items_in_batch to a model that says it takes loss keywords.
    model.accepts_loss_kwargs = True


def _unpatch_model(model) -> None:
    state = model.__dict__.get("fused_ls_head")
    if state is None:
        return
    for name, previous in (("forward", state.previous_forward), ("accepts_loss_kwargs", state.previous_accepts_loss_kwargs)):
        if previous is _MISSING:
            model.__dict__.pop(name, None)
        else:
            setattr(model, name, previous)
    del model.fused_ls_head


def _check_causal_lm(model) -> None:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:  # pragma: no cover  (the hf extra installs it)
        raise ImportError("use_fused_linear_head needs transformers: pip install 'fused_ls[hf]'") from exc
    causal = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    if not any(cls.__name__ in causal for cls in type(model).__mro__):  # subclasses of one too
        raise ValueError(
            f"use_fused_linear_head needs a causal LM of transformers' AutoModelForCausalLM mapping (its loss "
            f"shifts the labels by one position), got {type(model).__name__}"
        )


def _linear_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(
            f"use_fused_linear_head needs the model's output embeddings to be a plain nn.Linear (weight (V, H), "
            f"optional bias); {type(model).__name__}'s are {type(head).__name__} (quantized or adapted heads "
            f"compute something else)"
        )
    return head


@contextlib.contextmanager
def _head_replaced(head: torch.nn.Module, stand_in):
    """Run with ``head``'s own computation replaced by ``stand_in(hidden)``.

    Module hooks still run around it. accelerate's hooks (``device_map``, offloading) replace
    ``forward`` and call ``_old_forward``: the stand-in replaces the innermost one, so their
    device moves and weight loading still happen before it reads the weight.
    """
    name = "_old_forward" if "_old_forward" in head.__dict__ else "forward"
    previous = head.__dict__.get(name, _MISSING)
    setattr(head, name, stand_in)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(head, name)
        else:
            setattr(head, name, previous)


def _previous_forward(model, state: FusedLinearHead):
    if state.previous_forward is _MISSING:
        return types.MethodType(type(model).forward, model)
    return state.previous_forward


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _transform_candidates(config) -> list[tuple[float, float | None]]:
    """(logit_scale, softcap) pairs a config may ask for, most specific first.

    Read from the config attributes transformers' causal LMs apply to lm_head's output:
    ``final_logit_softcapping`` (Gemma 2/3, as T * tanh(x / T)), ``logits_scaling`` (Granite,
    x / s), ``logit_scale`` (Cohere, x * s) and ``output_multiplier`` (x * m before the softcap).
    The probe decides which, if any, the model really applies.
    """
    text = _text_config(config)
    caps = [None]
    cap = getattr(text, "final_logit_softcapping", None)
    if _positive_number(cap):
        caps.insert(0, float(cap))
    scales = [1.0]
    for name, invert in (("logits_scaling", True), ("logit_scale", False), ("output_multiplier", False)):
        value = getattr(text, name, None)
        if _positive_number(value):
            scales.insert(0, 1.0 / value if invert else float(value))
    return [(scale, cap) for cap in caps for scale in scales]


def _probe_logit_transform(model, head) -> tuple[float, float | None]:
    """How the model turns lm_head's output into its logits, checked on the model itself.

    One token goes through the model with lm_head standing in for a known row of V values
    spanning [-64, 64]; the logits the model returns must be that row, or a candidate
    (logit_scale, softcap) of the config applied to it. So the fused path computes what the
    model computes, or the patch is refused.
    """
    V = head.weight.shape[0]
    probe = torch.linspace(-64.0, 64.0, V).to(device=head.weight.device, dtype=head.weight.dtype)
    calls = []

    def stand_in(hidden, *args, **kwargs):
        calls.append(tuple(hidden.shape))
        return probe.expand(*hidden.shape[:-1], V).clone()

    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else head.weight.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), _head_replaced(head, stand_in):
            out = model.forward(input_ids=token, use_cache=False, return_dict=True)
    except Exception as exc:
        raise ValueError(
            f"use_fused_linear_head could not run {type(model).__name__} on one token to check how it turns "
            f"lm_head's output into logits ({type(exc).__name__}: {exc}); a model on the meta device or one "
            f"whose forward needs more than input_ids cannot be patched"
        ) from exc
    name = type(model).__name__
    if len(calls) != 1:
        raise ValueError(f"{name}'s forward called its lm_head {len(calls)} times, not once: the fused head "
                         f"supports models whose logits are one lm_head(hidden_states)")
    logits = getattr(out, "logits", None)
    if logits is None or tuple(logits.shape) != (1, 1, V):
        raise ValueError(f"{name} returns logits of shape {None if logits is None else tuple(logits.shape)} from "
                         f"an lm_head output of shape (1, 1, {V}): it changes the vocabulary after lm_head "
                         f"(a padded vocabulary sliced?), which the fused head cannot follow")
    x, y = probe.double(), logits.reshape(V).double()
    ulp = max(torch.finfo(probe.dtype).eps, torch.finfo(logits.dtype).eps)
    for scale, cap in _transform_candidates(model.config):
        z = x * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        # Each candidate is at most four rounded operations (scale, divide, tanh, multiply) on
        # values no larger than |x * scale|: 16 ulp of that bounds their rounding; a wrong
        # candidate misses by a good fraction of the value at the ends of the probe.
        if bool(((y - z).abs() <= 16 * ulp * (z.abs() + (x * scale).abs() + 1)).all()):
            return scale, cap
    raise ValueError(
        f"{name} transforms lm_head's output into logits in a way the fused head does not know (neither "
        f"identity nor the logit scale / final softcap of its config): at x = {probe[0].item()} it returns "
        f"{y[0].item()}, at x = {probe[-1].item()} {y[-1].item()}"
    )


@functools.lru_cache(maxsize=None)
def _fused_forward_function(cls):
    """The patched forward for models of class ``cls``: a function of (self, ...) carrying
    ``cls.forward``'s signature (Trainer and generate read it), state read from ``self``,
    so that copying the model copies a working patch."""

    @functools.wraps(cls.forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, args, kwargs)

    return forward


def _fused_forward(model, args: tuple, kwargs: dict):
    state: FusedLinearHead = model.fused_ls_head
    inner = _previous_forward(model, state)
    labels = kwargs.get("labels")
    position = state.labels_position
    if labels is None and position is not None and len(args) > position:
        labels = args[position]
    shift_labels = kwargs.get("shift_labels")
    if labels is None and shift_labels is None:
        if torch.is_grad_enabled() and model.training and not state.warned_unlabelled_training:
            state.warned_unlabelled_training = True
            warnings.warn(
                f"{type(model).__name__} has the fused linear head but ran a training forward without labels: "
                f"its logits were materialised and any loss is computed elsewhere. A Trainer with "
                f"label_smoothing_factor or compute_loss_func takes the labels away from the model: pass the "
                f"Trainer to use_fused_linear_head instead of the model", stacklevel=3,
            )
        return inner(*args, **kwargs)

    kwargs = dict(kwargs)
    kwargs.pop("labels", None)
    kwargs.pop("shift_labels", None)
    if position is not None and len(args) > position:
        args = args[:position] + (None,) + args[position + 1:]
    count = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if shift_labels is None:
        # Position i predicts label i+1, as transformers' ForCausalLMLoss: the last position of each
        # sequence gets ignore_index.
        targets = F.pad(labels[..., 1:], (0, 1), value=state.ignore_index)
    else:
        targets = shift_labels  # already shifted by the collator (padding-free, context parallel)
    normalizer = _normalizer(count)

    if not torch.is_grad_enabled():
        # Evaluation: the logits are wanted (metrics, predictions); the loss is read from them.
        out = inner(*args, return_dict=True, **kwargs)
        logits = out.logits
        keywords = {k: v for k, v in state.options.items() if k in _LOGITS_KEYWORDS}
        loss = smoothed_xent(
            logits, _targets_for(targets, logits.shape[:-1], logits.device), state.label_smoothing,
            ignore_index=state.ignore_index, normalizer=_on(normalizer, logits.device), **keywords,
        )
        out = _with(out, loss=loss)
    else:
        head = _linear_head(model)
        losses = []

        def stand_in(hidden, *unused_args, **unused_kwargs):
            losses.append(smoothed_linear_xent(
                hidden, head.weight, _targets_for(targets, hidden.shape[:-1], hidden.device), head.bias,
                state.label_smoothing, ignore_index=state.ignore_index, softcap=state.softcap,
                logit_scale=state.logit_scale, normalizer=_on(normalizer, hidden.device), **state.options,
            ))
            # Zero classes: whatever the model does to its logits next costs nothing.
            return hidden.new_empty(*hidden.shape[:-1], 0)

        with _head_replaced(head, stand_in):
            out = inner(*args, return_dict=True, **kwargs)
        if len(losses) != 1:
            raise RuntimeError(f"{type(model).__name__}'s forward called lm_head {len(losses)} times with labels")
        out = _with(out, loss=losses[0], logits=None)
    return out if return_dict else out.to_tuple()


def _targets_for(targets: torch.Tensor, shape, device) -> torch.Tensor:
    if tuple(targets.shape) != tuple(shape):
        raise ValueError(
            f"labels of shape {tuple(targets.shape)} do not match the {tuple(shape)} positions the model "
            f"computes logits for (logits_to_keep / num_logits_to_keep must be 0 when training with labels)"
        )
    return targets.to(device, non_blocking=True)


def _normalizer(count):
    if isinstance(count, torch.Tensor) and count.dim() > 0:
        # nn.DataParallel: the Trainer repeats the one global count per replica.
        count = count.reshape(-1)[0]
    return count


def _on(normalizer, device):
    return normalizer.to(device, non_blocking=True) if isinstance(normalizer, torch.Tensor) else normalizer


def _with(out, **fields):
    """A copy of the model output with some fields replaced (a field set to None is dropped from
    its dict and tuple views, which setting the attribute would not do)."""
    values = dict(out.items())
    values.update(fields)
    return type(out)(**values)
