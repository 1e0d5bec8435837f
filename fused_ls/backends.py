"""Which kernels can run here, and which one a call uses.

Choice order: the `backend=` argument, else the FUSED_LS_BACKEND environment variable,
else "auto": Triton for CUDA tensors, the native C++/CUDA extension next, eager PyTorch
last. An explicit choice that cannot run raises and says what is missing.

Every backend is a RowOps (fused_ls._row_op): the row op's three variants with one
contract. The fused ones are torch.library ops; "torch" is the same contract in eager
PyTorch (fused_ls.eager).
"""

from __future__ import annotations

import os

import torch

from fused_ls._row_op import RowOps
from fused_ls._slice_op import SliceOps
from fused_ls.eager import EAGER_ROW_OPS, EAGER_SLICE_OPS

BACKENDS = ("triton", "native", "torch")

# Probed once per process. A plain dict rather than functools.cache, because torch.compile
# traces through dict look-ups but warns about (and re-runs) cached functions.
_STATUS: dict[str, tuple[RowOps | None, str]] = {}


def _triton_status() -> tuple[RowOps | None, str]:
    if "triton" not in _STATUS:
        _STATUS["triton"] = _probe_triton()
    return _STATUS["triton"]


def _native_status() -> tuple[RowOps | None, str]:
    if "native" not in _STATUS:
        _STATUS["native"] = _probe_native()
    return _STATUS["native"]


def _probe_triton() -> tuple[RowOps | None, str]:
    try:
        import triton  # noqa: F401

        from fused_ls.triton.smoothed_xent import ROW_OPS
    except Exception as exc:  # a broken Triton install must not break the package
        return None, f"Triton could not be imported ({type(exc).__name__}: {exc})"
    return ROW_OPS, ""


def _probe_native() -> tuple[RowOps | None, str]:
    from fused_ls import native

    ok, why = native.load()
    if not ok:
        return None, why
    return native.ROW_OPS, ""


def _triton_runs_on(device_type: str) -> bool:
    return device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _native_runs_on(device_type: str) -> bool:
    from fused_ls import native

    return device_type == "cpu" or (device_type == "cuda" and native.has_cuda())


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backend names usable for tensors on `device` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = []
    if _triton_status()[0] is not None and _triton_runs_on(device.type):
        names.append("triton")
    if _native_status()[0] is not None and _native_runs_on(device.type):
        names.append("native")
    names.append("torch")
    return names


def resolve(backend: str | None, device: torch.device) -> str:
    """The backend a call on `device` uses; raises if an explicit choice cannot run."""
    choice = backend if backend not in (None, "auto") else os.environ.get("FUSED_LS_BACKEND", "auto")
    return _resolve(choice, device.type)


def _resolve(choice: str, device_type: str) -> str:
    if choice == "auto":
        if device_type == "cuda" and _triton_status()[0] is not None:
            return "triton"
        if _native_status()[0] is not None and _native_runs_on(device_type):
            return "native"
        return "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {choice!r}; expected one of {('auto',) + BACKENDS}")
    if choice == "triton":
        ops, why = _triton_status()
        if ops is None:
            raise RuntimeError(f"backend 'triton' is unavailable: {why}")
        if not _triton_runs_on(device_type):
            raise RuntimeError(
                f"backend 'triton' cannot run on {device_type} tensors: it needs CUDA tensors "
                "(or TRITON_INTERPRET=1 set before triton is imported, for testing)"
            )
    elif choice == "native":
        ops, why = _native_status()
        if ops is None:
            raise RuntimeError(f"backend 'native' is unavailable: {why}")
        if not _native_runs_on(device_type):
            if device_type == "cuda":
                raise RuntimeError("backend 'native' was built without CUDA and cannot run on cuda tensors")
            raise RuntimeError(f"backend 'native' runs on cpu and cuda tensors, not on {device_type} tensors")
    return choice


# The probe imports Triton or the native extension on first use, which torch.compile cannot
# trace: marked as a constant result, it runs once, eagerly, while a graph is traced, so a
# compiled call can be a process's first. This is the attribute that
# torch.compiler.assume_constant_result sets; setting it directly keeps torch._dynamo from
# being imported with fused_ls (seconds of start-up for every script).
_resolve._dynamo_marked_constant = True


def row_ops(backend: str) -> RowOps:
    """The ops of a backend name that `resolve` returned."""
    if backend == "torch":
        return EAGER_ROW_OPS
    status = _triton_status() if backend == "triton" else _native_status()
    return status[0]


def slice_ops(backend: str) -> SliceOps:
    """Vocabulary parallelism's slice passes (fused_ls._slice_op) of a backend name that
    `resolve` returned."""
    if backend == "torch":
        return EAGER_SLICE_OPS
    if backend == "native":
        from fused_ls import native

        return native.SLICE_OPS
    from fused_ls.triton.slice_passes import SLICE_OPS

    return SLICE_OPS
