"""fused_ls: label-smoothed cross-entropy, forward and backward in one fused pass.

    from fused_ls import smoothed_xent
    loss = smoothed_xent(logits, target, label_smoothing=0.1)
"""

from fused_ls.backends import available_backends
from fused_ls.functional import SmoothedCrossEntropyLoss, SmoothedXentOutput, smoothed_xent, tune
from fused_ls.linear import SmoothedLinearCrossEntropyLoss, smoothed_linear_xent
from fused_ls.reference import smoothed_xent_reference

from fused_ls._version import __version__

__all__ = [
    "smoothed_xent", "SmoothedCrossEntropyLoss", "smoothed_linear_xent", "SmoothedLinearCrossEntropyLoss",
    "SmoothedXentOutput", "available_backends", "smoothed_xent_reference", "tune", "__version__",
]
