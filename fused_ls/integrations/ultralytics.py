"""Ultralytics YOLO classification: label smoothing that reaches the loss, computed by smoothed_xent.

Ultralytics' classification criterion (``ultralytics.utils.loss.v8ClassificationLoss``) is
plain ``F.cross_entropy``: in every 8.x release checked (8.0.0, 8.3.0, 8.3.37, 8.3.38, 8.3.253,
8.4.190) a ``label_smoothing`` training argument never reaches it; up to 8.3.37 the key is
accepted and ignored, from 8.3.38 on it is dropped with a deprecation warning. Here the same
training runs on fused_ls.smoothed_xent instead, through Ultralytics' own extension point,
``YOLO.train(trainer=...)``:

    from ultralytics import YOLO
    from fused_ls.integrations.ultralytics import smoothed_xent_trainer

    YOLO("yolo11n-cls.yaml").train(data="path/to/images", epochs=10,
                                   trainer=smoothed_xent_trainer(0.1, convention="others"))

``convention="others"`` puts exactly 1 - eps on the true class and eps/(C-1) on each other
one (fairseq); ``"uniform"`` is PyTorch's ``F.cross_entropy(..., label_smoothing=eps)``.

How: the trainer's ``get_model`` gives the ``ClassificationModel`` a ``criterion`` of ours.
``BaseModel.loss`` only builds its own criterion when ``criterion`` is None, so both the
training step (``model(batch)``) and the validator (``ema_model.loss(batch, preds)``, the EMA
being a deep copy made after ``get_model``) use it: the logged validation loss is the
smoothed loss too. The model itself stays a plain ``ClassificationModel``, and checkpoints
are saved without the criterion, so ``best.pt`` loads wherever Ultralytics does, without
fused_ls.

The criterion returns what the installed Ultralytics' own criterion returns: ``(loss, loss_items)``
with the batch-mean loss (classification does not scale it by the batch size), ``loss_items``
a detached tensor up to 8.3 and a ``{"loss": ...}`` dict from 8.4. It finds out which by
calling the stock criterion once on a 1x2 batch, not by parsing version numbers.

Ultralytics is imported only when a trainer or criterion is made, never by ``import fused_ls``.
This module does not change Ultralytics' network behaviour; for an offline run set
``YOLO_OFFLINE=true`` before importing ultralytics and train with ``plots=False`` (see
docs/ultralytics.md). Multi-GPU DDP training is refused: Ultralytics starts each DDP process
from a generated script that rebuilds the trainer from its registered arguments, which
cannot carry the smoothing settings.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fused_ls.functional import smoothed_xent

__all__ = ["SmoothedClassificationLoss", "smoothed_xent_trainer", "stock_loss_items_format"]

_CONVENTIONS = ("uniform", "others")


def _check_settings(label_smoothing: float, convention: str) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:  # NaN fails this too
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")


@functools.cache
def stock_loss_items_format() -> tuple[str, ...] | None:
    """The loss-item names of the installed Ultralytics' classification criterion: a tuple of dict
    keys (8.4: ``("loss",)``), or None when it returns a bare tensor (8.3 and before)."""
    from ultralytics.utils.loss import v8ClassificationLoss

    _, items = v8ClassificationLoss()(torch.zeros(1, 2), {"cls": torch.zeros(1, dtype=torch.long)})
    return tuple(items) if isinstance(items, dict) else None


class SmoothedClassificationLoss:
    """An Ultralytics classification criterion: ``(preds, batch) -> (loss, loss_items)`` by smoothed_xent.

    Args:
        label_smoothing: eps in [0, 1].
        convention: "others" (the true class gets exactly 1 - eps) or "uniform" (PyTorch's).
        **smoothed_xent_kwargs: passed on to smoothed_xent (``backend``, ``weight``, ``z_loss``...).

    ``preds`` is the logits (training mode) or the head's ``(probabilities, logits)`` pair
    (evaluation mode); ``batch["cls"]`` the class indices. The loss is the batch mean, as in
    Ultralytics' own criterion.
    """

    def __init__(self, label_smoothing: float = 0.1, convention: str = "others", **smoothed_xent_kwargs: Any):
        _check_settings(label_smoothing, convention)
        for key in ("reduction", "target", "input", "logits"):
            if key in smoothed_xent_kwargs:
                raise TypeError(f"SmoothedClassificationLoss sets {key!r} itself; it cannot be passed")
        self.label_smoothing = float(label_smoothing)
        self.convention = convention
        self.smoothed_xent_kwargs = smoothed_xent_kwargs
        self.item_names = stock_loss_items_format()

    def __call__(self, preds, batch: dict[str, torch.Tensor]):
        logits = preds[1] if isinstance(preds, (list, tuple)) else preds
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"expected (batch, classes) logits from the classification head, got {got}")
        target = batch["cls"].to(logits.device).long()
        loss = smoothed_xent(logits, target, self.label_smoothing, convention=self.convention,
                             reduction="mean", **self.smoothed_xent_kwargs)
        detached = loss.detach()
        if self.item_names is None:
            return loss, detached
        return loss, {name: detached for name in self.item_names}

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.smoothed_xent_kwargs.items())
        return (f"SmoothedClassificationLoss(label_smoothing={self.label_smoothing}, "
                f"convention={self.convention!r}{extra})")


def smoothed_xent_trainer(label_smoothing: float = 0.1, convention: str = "others", **smoothed_xent_kwargs: Any):
    """A ``ClassificationTrainer`` subclass that trains and validates with ``SmoothedClassificationLoss``.

    Pass it to ``YOLO(...).train(trainer=...)``, or build it directly with
    ``smoothed_xent_trainer(0.1)(overrides={"model": ..., "data": ...}).train()``.
    """
    _check_settings(label_smoothing, convention)
    from ultralytics.models.yolo.classify import ClassificationTrainer

    def make_criterion() -> SmoothedClassificationLoss:
        return SmoothedClassificationLoss(label_smoothing, convention, **smoothed_xent_kwargs)

    make_criterion()  # bad keywords fail here, not at the first batch

    class SmoothedXentClassificationTrainer(ClassificationTrainer):
        smoothing = {"label_smoothing": float(label_smoothing), "convention": convention, **smoothed_xent_kwargs}

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if getattr(self, "world_size", 1) > 1:
                raise ValueError(
                    "smoothed_xent_trainer trains on one device: Ultralytics runs multi-GPU training in new "
                    "processes built from its own arguments, which cannot carry the label-smoothing settings"
                )

        def get_model(self, cfg=None, weights=None, verbose: bool = True):
            model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
            model.criterion = make_criterion()
            return model

        def save_model(self):
            # 8.4 leaves the criterion out of checkpoints itself, 8.3 pickles it: keep fused_ls
            # out of the file either way, so that it loads without fused_ls installed.
            ema = getattr(getattr(self, "ema", None), "ema", None)
            criterion = getattr(ema, "criterion", None)
            if criterion is not None:
                ema.criterion = None
            try:
                return super().save_model()
            finally:
                if criterion is not None:
                    ema.criterion = criterion

    SmoothedXentClassificationTrainer.__qualname__ = SmoothedXentClassificationTrainer.__name__
    return SmoothedXentClassificationTrainer
