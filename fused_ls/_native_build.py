"""How the native extension is built, in one place for setup.py and the just-in-time build.

The extension has three parts:
  * csrc/ops.cpp and csrc/cpu/smoothed_xent_cpu.cpp, compiled the usual way (BuildExtension
    or torch.utils.cpp_extension.load);
  * the CPU kernels csrc/cpu/*_kernel.cpp (CPU_KERNELS), compiled here once per x86 instruction
    set (DEFAULT, AVX2, AVX512) with that set's flags, as ATen builds its own kernels: the
    extension then picks one at run time, so it never needs -march=native and runs on any
    x86-64 CPU. Neither setuptools nor cpp_extension.load takes per-file flags, hence this step;
  * with a CUDA torch and nvcc, csrc/cuda/*.cu (plain CUDA, no torch headers) and the torch
    wrapper csrc/cuda/smoothed_xent_cuda.cpp.

setup.py loads this file by path, so it must import without torch and without fused_ls.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

CPU_SOURCES = ("ops.cpp", "cpu/smoothed_xent_cpu.cpp", "cpu/compensated_add_cpu.cpp")
CUDA_SOURCES = ("cuda/smoothed_xent_kernel.cu", "cuda/smoothed_xent_cuda.cpp")
# Compiled once per instruction set; the headers they include (hashed into the objects' names).
CPU_KERNELS = ("cpu/smoothed_xent_kernel.cpp", "cpu/compensated_add_kernel.cpp")
CPU_KERNEL_HEADERS = ("smoothed_xent.h", "cpu/smoothed_xent_kernel.h", "cpu/compensated_add_kernel.h", "cpu/vec_io.h")

# The flags of each instruction set (those ATen's kernels use, plus what every CPU of the set
# has). The extension selects a variant from at::get_cpu_capability(), which requires
# avx512f/bw/vl/dq and fma for AVX512, avx2 and fma for AVX2.
X86_ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
}

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]


def csrc_dir() -> Path:
    """The C++/CUDA sources: csrc/ of a source checkout, or the copy a wheel installs."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the fused_ls C++ sources (csrc/) are not next to {package}")


def cxx_compiler() -> str | None:
    """The C++ compiler setuptools and torch would use, if there is one."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cxx_std_flag(cxx: str) -> str:
    """-std=c++20, as torch >= 2.10 builds extensions, unless the compiler lacks it (gcc < 10)."""
    probe = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-fsyntax-only", os.devnull],
                           capture_output=True, check=False)
    return "-std=c++20" if probe.returncode == 0 else "-std=c++17"


def kernel_isas() -> list[str]:
    """The instruction sets to compile the CPU kernel for on this platform."""
    if sys.platform != "win32" and platform.machine().lower() in ("x86_64", "amd64"):
        return list(X86_ISA_FLAGS)
    return ["DEFAULT"]


def isa_defines(isas: list[str]) -> list[str]:
    """Flags that tell the rest of the extension which kernel variants are linked in."""
    return [f"-DFUSED_LS_CPU_{isa}" for isa in isas if isa != "DEFAULT"]


def cuda_build_reason() -> str | None:
    """None when the CUDA kernels can be built here, else why not."""
    if os.environ.get("FUSED_LS_NO_CUDA") == "1":
        return "FUSED_LS_NO_CUDA=1"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
    if not nvcc.exists():
        return f"{nvcc} does not exist"
    return None


def compile_cpu_kernels(build_dir: str | os.PathLike, *, verbose: bool = False) -> list[str]:
    """Compile the CPU kernels once per instruction set into build_dir; return the objects.

    Up-to-date objects (named by a hash of sources, flags, compiler and torch) are reused.
    The DEFAULT object comes first: where the variants share an inline function (from c10,
    say), the linker keeps the first copy it sees, which must run on every CPU.
    """
    import torch
    from torch.utils.cpp_extension import include_paths

    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler: {os.environ.get('CXX', 'c++')} is not on PATH")
    csrc = csrc_dir()
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    common = [
        *CXX_FLAGS, "-fPIC", cxx_std_flag(cxx),
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in include_paths()), f"-I{csrc}",
    ]
    digest = hashlib.sha256()
    for name in (*CPU_KERNELS, *CPU_KERNEL_HEADERS):
        digest.update((csrc / name).read_bytes())
    digest.update(" ".join([cxx, torch.__version__, *common]).encode())

    jobs = []
    for isa in kernel_isas():
        flags = [*common, f"-DCPU_CAPABILITY={isa}", *([f"-DCPU_CAPABILITY_{isa}"] if isa != "DEFAULT" else [])]
        flags += X86_ISA_FLAGS.get(isa, [])
        tag = hashlib.sha256(digest.digest() + " ".join(flags).encode()).hexdigest()[:16]
        for kernel in CPU_KERNELS:
            obj = build_dir / f"{Path(kernel).stem}_{isa}_{tag}.o"
            if obj.exists():
                jobs.append((obj, None, None))
                continue
            tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
            cmd = [cxx, *flags, "-c", str(csrc / kernel), "-o", str(tmp)]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            jobs.append((obj, tmp, proc))

    failures = []
    for obj, tmp, proc in jobs:
        if proc is None:
            continue
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{obj.name}:\n{output}")
            tmp.unlink(missing_ok=True)
        else:
            os.replace(tmp, obj)  # atomic: concurrent builds never see half an object
            if verbose and output:
                print(output, file=sys.stderr)
    if failures:
        raise RuntimeError("compiling the fused_ls CPU kernels failed:\n" + "\n".join(failures))
    return [str(obj) for obj, _, _ in jobs]
