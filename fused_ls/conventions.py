"""The label-smoothing conventions, each decided here once as two masses.

A convention turns (eps, V) into the masses (k_s, k_t) of the smoothed target: class c of a
row with target t gets  k_s * w_c + k_t * w_t * [c == t]  (w the class weights, all 1
without them). Every kernel, op schema and eager pass takes those two floats and nothing
else about the convention, so adding one touches this table, the independent reference
(fused_ls/reference.py), the README's table and the tests. The maths: docs/maths.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Convention:
    masses: Callable[[float, int], tuple[float, float]]  # (eps, V) -> (k_s, k_t)
    min_classes: int  # the smallest V for which the masses are defined
    summary: str


CONVENTIONS: dict[str, Convention] = {
    # PyTorch (Szegedy et al. 2016): every class eps/V, the true class 1 - eps + eps/V.
    "uniform": Convention(lambda eps, V: (eps / V, 1.0 - eps), 1,
                          "every class eps/V, the true class 1-eps+eps/V (PyTorch)"),
    # fairseq: the true class exactly 1 - eps, every other class eps/(V-1).
    "others": Convention(lambda eps, V: (eps / (V - 1), 1.0 - eps - eps / (V - 1)), 2,
                         "the true class exactly 1-eps, every other class eps/(V-1) (fairseq)"),
}


def check_convention(convention: str, num_classes: int | None = None) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    least = CONVENTIONS[convention].min_classes
    if num_classes is not None and num_classes < least:
        raise ValueError(f"convention={convention!r} needs at least {least} classes, got {num_classes}")


def smoothing_masses(convention: str, label_smoothing: float, num_classes: int) -> tuple[float, float]:
    """(k_s, k_t) of `convention` for eps = label_smoothing and V = num_classes."""
    check_convention(convention, num_classes)
    return CONVENTIONS[convention].masses(label_smoothing, num_classes)
