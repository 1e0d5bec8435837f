"""The two label-smoothing conventions as masses, shared by every kernel launcher.

The smoothed target gives class c the mass  k_s * w_c + k_t * w_t * [c == t]:
    uniform (PyTorch, Szegedy et al. 2016):  k_s = eps / V,        k_t = 1 - eps
    others  (fairseq):                       k_s = eps / (V - 1),  k_t = 1 - eps - eps / (V - 1)
Without class weights both sum to 1 and the true class gets 1 - eps + eps/V or exactly
1 - eps respectively.
"""

from __future__ import annotations


def smoothing_masses(label_smoothing: float, num_classes: int, smooth_others: bool) -> tuple[float, float]:
    if smooth_others:
        k_s = label_smoothing / (num_classes - 1) if num_classes > 1 else 0.0
        return k_s, 1.0 - label_smoothing - k_s
    return label_smoothing / num_classes, 1.0 - label_smoothing
