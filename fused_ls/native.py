"""Loading the native extension fused_ls._C (C++ CPU kernel, CUDA kernel when built)."""

from __future__ import annotations

import functools


@functools.cache
def load() -> tuple[bool, str]:
    """(True, "") once fused_ls._C is loaded and its ops registered, else (False, why)."""
    try:
        from fused_ls import _C  # noqa: F401
    except ImportError as exc:
        return False, f"the extension fused_ls._C is not built ({exc})"
    return True, ""


def has_cuda() -> bool:
    return False
