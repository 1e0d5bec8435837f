"""Loading the native extension: the C++ CPU kernel, and the CUDA kernel where it was built.

`load()` imports fused_ls._C, built by setup.py. When the package was installed without it
(no torch or no compiler at install time, or a _C built against another torch), the first
call builds it just in time with torch.utils.cpp_extension.load and ninja into a cache
directory ($FUSED_LS_CACHE_DIR, default ~/.cache/fused_ls/<python-torch-device tag>) and
says so in one line; later processes load the cached build. FUSED_LS_NO_JIT=1 turns the
just-in-time build off. Whatever fails, the package still imports and the other backends work.

This module declares the row ops fused_ls::smoothed_xent_rows, smoothed_xent_rows_ and
smoothed_xent_rows_loss (the contract and their fakes: fused_ls/_row_op.py) and vocabulary
parallelism's slice passes (fused_ls/_slice_op.py); importing the extension registers their CPU
and CUDA kernels, and a CPU kernel for fused_ls::compensated_add_
(fused_ls/linear.py).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from fused_ls._row_op import define_row_ops
from fused_ls._slice_op import define_slice_ops

ROW_OPS = define_row_ops("")
# Vocabulary parallelism's slice passes, registered from C++ (csrc/slice_ops.h) for the CPU and CUDA.
SLICE_OPS = define_slice_ops("")

JIT_NAME = "fused_ls_C"
# Must match kRowOpContract in csrc/ops.cpp.
ROW_OP_CONTRACT = b"fused_ls row-op contract 5: masses as floats, slice passes, argmax, given lse"

# (module or None, why not); filled once per process by load().
_STATE: dict[str, tuple[ModuleType | None, str]] = {}


def load() -> tuple[bool, str]:
    """(True, "") once the extension is loaded and its ops registered, else (False, why)."""
    if "native" not in _STATE:
        module, why = _import_or_build()
        _STATE["native"] = (module, why)
    module, why = _STATE["native"]
    return module is not None, why


def has_cuda() -> bool:
    """Whether the loaded extension has the CUDA kernel."""
    return load()[0] and bool(_STATE["native"][0].WITH_CUDA)


def cpu_kernel_isa() -> str:
    """The CPU kernel variant this process runs: "DEFAULT", "AVX2" or "AVX512"."""
    ok, why = load()
    if not ok:
        raise RuntimeError(why)
    return _STATE["native"][0].cpu_kernel_isa()


def _import_or_build() -> tuple[ModuleType | None, str]:
    stale = _stale_extension()
    if stale:
        installed_error = stale
    else:
        try:
            return importlib.import_module("fused_ls._C"), ""
        except ImportError as exc:
            installed_error = f"fused_ls._C is not importable ({exc})"
    if os.environ.get("FUSED_LS_NO_JIT") == "1":
        return None, f"{installed_error}, and FUSED_LS_NO_JIT=1 turns off the just-in-time build"
    try:
        return _build_just_in_time(), ""
    except Exception as exc:  # noqa: BLE001  (no compiler, no ninja, a compile error: the other backends still work)
        return None, f"{installed_error}, and the just-in-time build failed ({type(exc).__name__}: {exc})"


def _stale_extension() -> str:
    """Why the installed fused_ls._C must not be imported ("" if it may): one built from older
    sources registers kernels for other schemas, and the dispatcher would abort the process."""
    try:
        spec = importlib.util.find_spec("fused_ls._C")
    except (ImportError, ValueError):
        return ""
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return ""
    with open(spec.origin, "rb") as binary:
        if ROW_OP_CONTRACT in binary.read():
            return ""
    return (f"{spec.origin} was built from older sources than this fused_ls (rebuild it: pip install "
            "--no-build-isolation -e . in the repository, or reinstall the package)")


def cache_dir(with_cuda: bool) -> Path:
    root = os.environ.get("FUSED_LS_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fused_ls"
    device = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{device}".replace("+", "_")
    return Path(root) / tag


def _build_just_in_time() -> ModuleType:
    from fused_ls import _native_build as build

    if build.cxx_compiler() is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')} is not on PATH)")
    cuda = build.cuda_build_plan()  # first: it may set CUDA_HOME, which cpp_extension reads on import
    from torch.utils.cpp_extension import load as load_extension

    csrc = build.csrc_dir()
    with_cuda = cuda.why_not is None
    sources = [csrc / name for name in build.CPU_SOURCES]
    if with_cuda:
        sources += [csrc / name for name in build.CUDA_SOURCES]
    directory = cache_dir(with_cuda)
    directory.mkdir(parents=True, exist_ok=True)

    stamp = directory / "sources.sha256"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(csrc.rglob("*")) if p.is_file())).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest):
        what = f"C++ and CUDA kernels (CUDA for {cuda.archs})" if with_cuda else f"C++ kernels (no CUDA: {cuda.why_not})"
        print(f"fused_ls: fused_ls._C is not installed; building its {what} just in time into {directory} "
              "(once, about a minute)", file=sys.stderr, flush=True)
    objects = build.compile_cpu_kernels(directory / "cpu_kernels")
    cflags = [*build.CXX_FLAGS, *build.isa_defines(build.kernel_isas())]
    if with_cuda:
        cflags.append("-DFUSED_LS_WITH_CUDA")
    module = load_extension(
        name=JIT_NAME,
        sources=[str(p) for p in sources],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda.nvcc_flags,
        extra_ldflags=objects,
        build_directory=str(directory),
        with_cuda=with_cuda,
        verbose=False,
    )
    stamp.write_text(digest)
    return module
