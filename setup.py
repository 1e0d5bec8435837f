"""Builds fused_ls and, when torch is importable at build time, its native extension fused_ls._C.

    pip install --no-build-isolation -e .

compiles the C++ CPU kernels always, and the CUDA kernels too when torch has CUDA and nvcc
is present (FUSED_LS_NO_CUDA=1 skips them): for the visible GPUs, for TORCH_CUDA_ARCH_LIST, or
with no GPU visible for sm_80, sm_90 and sm_100. A CUDA build that cannot work (nvcc of
another CUDA major version than torch's, no CUDA headers) stops with a message naming the fix.
With no torch or no C++ compiler at build time
the pure-Python package still installs, and fused_ls builds the extension just in time on
first use (fused_ls/native.py). The sources also ship inside the package, as fused_ls/_csrc,
for that just-in-time build. How the parts are compiled: fused_ls/_native_build.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _build_helpers():
    # By path: importing the fused_ls package itself while building it would need torch.
    spec = importlib.util.spec_from_file_location("_fused_ls_native_build", ROOT / "fused_ls" / "_native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_extension() -> dict:
    """setup() keywords for fused_ls._C, or {} when it cannot be built here."""
    if os.environ.get("FUSED_LS_NO_NATIVE") == "1":
        print("fused_ls: FUSED_LS_NO_NATIVE=1, installing without the native extension")
        return {}
    if importlib.util.find_spec("torch") is None:
        print("fused_ls: torch is not importable at build time; the native extension will be built on first use")
        return {}
    build = _build_helpers()
    if build.cxx_compiler() is None:
        print("fused_ls: no C++ compiler found; installing without the native extension")
        return {}
    try:
        cuda = build.cuda_build_plan()  # first: it may set CUDA_HOME, which cpp_extension reads on import
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        print(f"fused_ls: torch is not importable at build time ({exc}); the native extension will be built on first use")
        return {}
    except build.CudaBuildError as exc:
        sys.exit(f"fused_ls: cannot build the CUDA kernels: {exc}")

    isas = build.kernel_isas()
    cxx_flags = [*build.CXX_FLAGS, *build.isa_defines(isas)]
    sources = [f"csrc/{name}" for name in build.CPU_SOURCES]
    if cuda.why_not is None:
        print(f"fused_ls: building the C++ and CUDA kernels (CUDA for {cuda.archs})")
        sources += [f"csrc/{name}" for name in build.CUDA_SOURCES]
        extension = CUDAExtension(
            "fused_ls._C", sources,
            extra_compile_args={"cxx": [*cxx_flags, "-DFUSED_LS_WITH_CUDA"], "nvcc": cuda.nvcc_flags},
        )
    else:
        print(f"fused_ls: building the C++ kernels (CPU kernel for {', '.join(isas)}); no CUDA: {cuda.why_not}")
        extension = CppExtension("fused_ls._C", sources, extra_compile_args={"cxx": cxx_flags})

    class BuildNativeExtension(BuildExtension):
        def build_extension(self, ext):
            objects = build.compile_cpu_kernels(Path(self.build_temp) / "fused_ls_cpu_kernels", verbose=bool(self.verbose))
            ext.extra_objects = [*objects, *(ext.extra_objects or [])]
            super().build_extension(ext)

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildNativeExtension}}


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as fused_ls/_csrc (an editable install reads csrc/)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "fused_ls" / "_csrc"
        for source in (ROOT / "csrc").rglob("*"):
            if source.suffix in (".h", ".cpp", ".cu"):
                destination = target / source.relative_to(ROOT / "csrc")
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)


native = _native_extension()
setup(cmdclass={"build_py": BuildPyWithSources, **native.pop("cmdclass", {})}, **native)
