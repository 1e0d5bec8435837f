"""Hugging Face transformers: make ``Trainer``'s label smoothing run on smoothed_xent.

With ``TrainingArguments(label_smoothing_factor=eps)`` the Trainer computes its loss with
``transformers.trainer_pt_utils.LabelSmoother``, which materialises ``log_softmax`` of the
logits (in the logits' dtype) and a float32 sum over them: two extra passes and two tensors
of the logits' size. Two ways to swap in the fused loss, same numbers:

    from fused_ls.integrations.huggingface import use_smoothed_xent
    trainer = use_smoothed_xent(Trainer(model, args, ...))   # replaces trainer.label_smoother

or, through Trainer's own extension point (it then ignores ``label_smoothing_factor``):

    from fused_ls.integrations.huggingface import SmoothedXentLabelSmoother
    trainer = Trainer(model, args, ..., compute_loss_func=SmoothedXentLabelSmoother(0.1, shift_labels=True))

``shift_labels=True`` for causal language models (position i predicts label i+1), False for
classification heads, as the Trainer itself decides for the first form.

The loss equals ``LabelSmoother``'s (the "uniform" smoothing of ``F.cross_entropy``), with the
same denominator: ``num_items_in_batch`` when the Trainer passes it (the token count of the
whole accumulated batch, so gradient accumulation gives the full-batch mean), else the
micro-batch's non-ignored labels. Deliberate differences, all where LabelSmoother gives a
wrong or no answer:

* bf16/fp16 logits: computed in float32 (LabelSmoother takes log_softmax in the logits' dtype),
  so the loss is closer to the float64 truth; the loss is float32.
* A micro-batch whose labels are all ``ignore_index`` gives 0 with a zero gradient, not NaN.
* A negative label other than ``ignore_index`` raises on CPU (NaN loss on CUDA), where
  LabelSmoother silently treats it as class 0; labels on another device than the logits
  (pipeline / ``device_map`` models) are moved to them, as transformers' own causal-LM loss does.

transformers is not imported here: this module works with any version whose Trainer calls
``label_smoother(outputs, labels, shift_labels=..., num_items_in_batch=...)`` (older ones
omit ``num_items_in_batch``) or ``compute_loss_func(outputs, labels, num_items_in_batch=...)``
(4.46 and later).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fused_ls.functional import smoothed_xent

__all__ = ["SmoothedXentLabelSmoother", "use_smoothed_xent"]


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
