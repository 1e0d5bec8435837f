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

For the CUDA part it also decides what torch.utils.cpp_extension would get wrong on a machine
with nvcc and no visible GPU (a build container, CI): the CUDA toolkit where the nvcc on PATH is
a link or a wrapper script (prepare_cuda_home), and the architectures to compile for
(cuda_arch_list: sm_80, sm_90 and sm_100 unless TORCH_CUDA_ARCH_LIST says otherwise). A CUDA
build that cannot work stops with CudaBuildError, whose message names the fix.

setup.py loads this file by path, so it must import without torch and without fused_ls.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

CPU_SOURCES = ("ops.cpp", "cpu/smoothed_xent_cpu.cpp", "cpu/slice_passes_cpu.cpp", "cpu/compensated_add_cpu.cpp")
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


# Compiled for when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, each where the nvcc
# has it (the first CUDA release that does): Ampere (A100), Hopper (H100, H200), Blackwell
# (B200). The newest is embedded as PTX too, which the driver compiles for a later GPU.
DEFAULT_CUDA_ARCHS = (("8.0", (11, 0)), ("9.0", (11, 8)), ("10.0", (12, 8)))

NO_CUDA_HINT = "or set FUSED_LS_NO_CUDA=1 to build the CPU kernels only"


class CudaBuildError(RuntimeError):
    """A CUDA build that cannot work here; the message names the fix."""


class CudaPlan(NamedTuple):
    why_not: str | None  # None: build the CUDA kernels; else why only the C++ ones are built
    nvcc_flags: list[str]  # NVCC_FLAGS, and -gencode flags where fused_ls chose the architectures
    archs: str  # what the CUDA kernels are compiled for, in words


def _is_cuda_home(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def _nvcc_top(nvcc: str) -> Path | None:
    """The toolkit folder that nvcc itself reports (TOP= of a dry run): found through wrapper scripts."""
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                              capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    return Path(os.path.realpath(match.group(1).strip())) if match else None


def resolve_cuda_home(environ=None) -> str | None:
    """The CUDA toolkit of the nvcc on PATH where torch's guess of it would be wrong, else None.

    torch.utils.cpp_extension, when imported, takes $CUDA_HOME, else $CUDA_PATH, else the folder
    above the folder of `which nvcc`, else /usr/local/cuda. Where nvcc on PATH is a link or a
    wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc), that guess is
    /usr/local, with no CUDA headers. Here the link is resolved (and a script asked where its
    toolkit is): the first folder with bin/nvcc and include/cuda_runtime.h. None where CUDA_HOME
    or CUDA_PATH is set, there is no nvcc on PATH, torch's guess has the headers, or nothing does.
    """
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_HOME") or environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is None:
        return None
    if _is_cuda_home(Path(os.path.dirname(os.path.dirname(nvcc)))):  # torch's guess, as torch makes it
        return None
    resolved = Path(os.path.realpath(nvcc)).parent.parent
    if _is_cuda_home(resolved):
        return str(resolved)
    top = _nvcc_top(nvcc)
    if top is not None and _is_cuda_home(top):
        return str(top)
    return None


def prepare_cuda_home() -> str | None:
    """Set CUDA_HOME to resolve_cuda_home()'s answer, if any, and return it.

    Call it before torch.utils.cpp_extension is imported (it reads CUDA_HOME then); where it
    already was, with a CUDA torch, its CUDA_HOME is corrected too.
    """
    home = resolve_cuda_home()
    if home is None:
        return None
    os.environ["CUDA_HOME"] = home
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is not None and cpp_extension.CUDA_HOME is not None:
        cpp_extension.CUDA_HOME = home
    return home


def nvcc_version(nvcc: str | os.PathLike) -> tuple[int, int] | None:
    """(major, minor) of `nvcc --version`'s release, or None where it does not say."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_arch_list(nvcc: tuple[int, int] | None, gpu_count: int, user_list: str | None) -> list[str] | None:
    """The architectures to compile for ("9.0", "10.0+PTX"), or None where torch's choice stands.

    torch's: the user's TORCH_CUDA_ARCH_LIST (`user_list`), or without one those of the visible
    GPUs; with neither, torch fails (IndexError), so fused_ls chooses DEFAULT_CUDA_ARCHS, those
    this nvcc (its version `nvcc`) can compile for.
    """
    user_list = (user_list or "").strip()
    if gpu_count > 0 or (user_list and user_list != "native"):
        return None
    if user_list == "native":
        raise CudaBuildError(
            "TORCH_CUDA_ARCH_LIST=native needs a visible GPU, and none is: set TORCH_CUDA_ARCH_LIST to the GPUs' "
            "architectures (e.g. '9.0' for an H100), or unset it to build for sm_80, sm_90 and sm_100, " + NO_CUDA_HINT)
    if nvcc is None:
        raise CudaBuildError(
            "no GPU is visible and nvcc's version is unknown, so fused_ls cannot choose the architectures: "
            "set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0;10.0'), " + NO_CUDA_HINT)
    archs = [arch for arch, first_release in DEFAULT_CUDA_ARCHS if nvcc >= first_release]
    if not archs:
        raise CudaBuildError(
            f"nvcc {nvcc[0]}.{nvcc[1]} cannot compile for sm_80 or any later GPU: install CUDA 11.8 or newer "
            "(the version torch was built with) and set CUDA_HOME to it, " + NO_CUDA_HINT)
    archs[-1] += "+PTX"
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc's flags for architectures as TORCH_CUDA_ARCH_LIST names them, as torch writes them."""
    flags = []
    for arch in archs:
        num = arch.split("+")[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def check_cuda_toolkit(home: str | os.PathLike, version: tuple[int, int] | None, torch_cuda: str) -> None:
    """Raise CudaBuildError where the toolkit at `home` (nvcc `version`) cannot build for a torch
    built with CUDA `torch_cuda`: another major version (as torch checks it), or no headers."""
    home = Path(home)
    if version is not None and str(version[0]) != torch_cuda.split(".")[0]:
        major = torch_cuda.split(".")[0]
        raise CudaBuildError(
            f"nvcc {version[0]}.{version[1]} ({home / 'bin' / 'nvcc'}) cannot build for this torch, which was built "
            f"with CUDA {torch_cuda}: install a CUDA {major}.x toolkit and set CUDA_HOME to it, or install a torch "
            f"built for CUDA {version[0]}.x, " + NO_CUDA_HINT)
    if not (home / "include" / "cuda_runtime.h").is_file():
        raise CudaBuildError(
            f"no CUDA headers: {home / 'include' / 'cuda_runtime.h'} does not exist: set CUDA_HOME to the CUDA "
            "toolkit's folder (the one with bin/nvcc and include/cuda_runtime.h) or install the toolkit's "
            "headers, " + NO_CUDA_HINT)


def cuda_build_plan() -> CudaPlan:
    """Whether and how the CUDA kernels are built here; CudaBuildError where they cannot be.

    Only C++ (why_not says why) with FUSED_LS_NO_CUDA=1, a torch without CUDA, or no nvcc at all.
    Call it before torch.utils.cpp_extension is imported: it sets CUDA_HOME (prepare_cuda_home).
    """
    if os.environ.get("FUSED_LS_NO_CUDA") == "1":
        return CudaPlan("FUSED_LS_NO_CUDA=1", [], "")
    import torch

    if torch.version.cuda is None:
        return CudaPlan(f"torch {torch.__version__} has no CUDA", [], "")
    set_by_user = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    prepare_cuda_home()
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return CudaPlan(f"no nvcc (not on PATH, no CUDA_HOME, no /usr/local/cuda); for the CUDA kernels install the "
                        f"CUDA {torch.version.cuda} toolkit and set CUDA_HOME", [], "")
    nvcc = Path(home) / "bin" / "nvcc"
    if not nvcc.exists():
        if set_by_user:
            raise CudaBuildError(f"{nvcc} does not exist: set CUDA_HOME to a CUDA {torch.version.cuda} toolkit "
                                 "(the folder with bin/nvcc), " + NO_CUDA_HINT)
        return CudaPlan(f"no nvcc ({nvcc} does not exist); for the CUDA kernels set CUDA_HOME", [], "")
    version = nvcc_version(nvcc)
    check_cuda_toolkit(home, version, torch.version.cuda)
    user_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    archs = cuda_arch_list(version, torch.cuda.device_count(), user_list)
    if archs is None:
        where = f"TORCH_CUDA_ARCH_LIST={user_list}" if user_list and user_list.strip() != "native" else "the visible GPUs"
        return CudaPlan(None, list(NVCC_FLAGS), f"the architectures of {where}")
    names = ["sm_" + arch.split("+")[0].replace(".", "") for arch in archs]
    named = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return CudaPlan(None, [*NVCC_FLAGS, *gencode_flags(archs)],
                    f"{named} with PTX for later GPUs, as no GPU is visible; TORCH_CUDA_ARCH_LIST chooses others")


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
