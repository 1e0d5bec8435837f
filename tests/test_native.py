"""What only the native backend has: its build, its CPU kernel's own paths, its CUDA kernel.

The behaviour every backend shares (numbers, features, edge cases, in place, compile) is
tested once for all of them, "native" included, by the parametrised suites. Here:
  * the extension is there wherever a C++ compiler is, and coexists with the Triton ops;
  * the CPU op passes opcheck for the dtypes and layouts the generic test does not use, and
    gradcheck on rows long enough to span several of its chunks;
  * every instruction-set variant of the CPU kernel gives the same numbers;
  * masked (-inf) classes and rows past 2^31 logits (slow);
  * a grad_scale of one entry per row, and the zero-mass rule for masked classes, on the CPU op
    and on the emulated CUDA kernels alike, and float32 shift invariance;
  * the CUDA sources compile with nvcc for sm_80 and sm_90 (no GPU needed), and their
    kernels give the float64 oracle's numbers when run on the CPU by tests/cuda_host_emulation.cpp;
  * on a GPU (marker `gpu`), the CUDA kernel against the oracle.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracle import GRAD_TOL, LOSS_TOL, assert_matches_truth, loss_and_grad, masses, softcapped_grad_atol, truth

from fused_ls import _native_build, native, smoothed_xent, smoothed_xent_reference

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

needs_native = pytest.mark.skipif(not native.load()[0], reason=f"native extension unavailable: {native.load()[1]}")


def _rows_op():
    return torch.ops.fused_ls.smoothed_xent_rows


def _rows_inplace_op():
    return torch.ops.fused_ls.smoothed_xent_rows_


# ----------------------------------------------------------------------------- the build


def test_the_extension_loads_wherever_a_compiler_is():
    # CI has a compiler: a broken build must fail here, not quietly drop the backend.
    if _native_build.cxx_compiler() is None and not native.load()[0]:
        pytest.skip("no C++ compiler and no prebuilt fused_ls._C")
    ok, why = native.load()
    assert ok, why
    assert native.cpu_kernel_isa() in ("DEFAULT", "AVX2", "AVX512")


@needs_native
@pytest.mark.parametrize("first", ["native", "triton"])
def test_native_and_triton_ops_share_the_namespace_in_either_import_order(first):
    pytest.importorskip("triton")
    imports = {
        "native": "from fused_ls import native; assert native.load()[0], native.load()[1]",
        "triton": "import fused_ls.triton.smoothed_xent",
    }
    second = "triton" if first == "native" else "native"
    script = "\n".join([
        "import torch",
        imports[first],
        imports[second],
        "x = torch.randn(3, 11); t = torch.tensor([0, 10, 4]); s = torch.tensor(1.0)",
        "args = (t, None, s, 0.1 / 11, 0.9, -100, 0.0, 0.0, 1.0)",
        "a = torch.ops.fused_ls.smoothed_xent_rows(x, *args)",
        "b = torch.ops.fused_ls.smoothed_xent_rows_triton(x, *args)",
        "torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)",
    ])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT, timeout=300)


# ----------------------------------------------------------------------------- the CPU op


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_opcheck_of_the_cpu_op_for_each_dtype_and_a_strided_batch(dtype):
    base = torch.randn(4, 2 * 2048 + 45, dtype=dtype)
    logits = base[:, 3:-2]  # row stride != V, unaligned start: the kernel's general path
    V = logits.shape[1]
    target = torch.tensor([0, V - 1, -100, 7], dtype=torch.int32)
    weight = torch.rand(V, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    grad_scale = torch.tensor(0.25, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    args = (target, weight, grad_scale, *masses(0.1, V), -100, 1e-3, 3.0, 1.1)
    torch.library.opcheck(_rows_op(), (logits, *args))
    torch.library.opcheck(_rows_inplace_op(), (logits.clone(), *args))


@needs_native
def test_gradcheck_in_float64_on_rows_spanning_several_chunks():
    # The CPU kernel works in chunks of 2048 logits; 4133 = two whole chunks and a ragged one.
    logits = torch.randn(2, 4133, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([4132, 2050])
    weight = torch.rand(4133, dtype=torch.float64) + 0.5

    def fn(x):
        return smoothed_xent(x, target, 0.2, weight=weight, convention="others", z_loss=0.05, softcap=2.0,
                             logit_scale=1.5, backend="native")

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, fast_mode=True)


def _isa_script(capability: str) -> str:
    return "\n".join([
        "import os, torch",
        "from fused_ls import native",
        "native.load()",
        "torch.manual_seed(0)",
        "x = torch.randn(6, 5003) * 4; t = torch.tensor([0, 5002, -100, 17, 4000, 2048])",
        "w = torch.rand(5003) + 0.5; s = torch.tensor(0.5)",
        "out = [torch.ops.fused_ls.smoothed_xent_rows(x.to(dt), t, w, s, 0.1 / 5002, 0.9 - 0.1 / 5002, -100, 1e-2, c, 1.3)",
        "       for dt in (torch.float32, torch.bfloat16) for c in (0.0, 5.0)]",
        f"torch.save((native.cpu_kernel_isa(), out), os.environ['RESULT_{capability}'])",
    ])


@needs_native
def test_every_instruction_set_variant_gives_the_same_numbers(tmp_path):
    compiled = native._STATE["native"][0].CPU_KERNEL_ISAS.split(",")
    ladder = ("default", "avx2", "avx512")
    machine = torch.backends.cpu.get_cpu_capability().lower()  # what this CPU runs
    results = {}
    for capability in ladder:
        path = tmp_path / f"{capability}.pt"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, f"RESULT_{capability}": str(path)}
        subprocess.run([sys.executable, "-c", _isa_script(capability)], check=True, env=env, cwd=ROOT, timeout=300)
        results[capability] = torch.load(path)
    # Each run takes the best variant compiled in that both the request and the CPU allow: torch
    # passes ATEN_CPU_CAPABILITY=avx512 on as given even where the CPU has no AVX-512 (many AMD
    # EPYCs), and running that variant there would die of SIGILL.
    for capability, (isa, _) in results.items():
        allowed = ladder[: min(ladder.index(capability), ladder.index(machine) if machine in ladder else 0) + 1]
        expected = [c.upper() for c in allowed if c.upper() in compiled or c == "default"][-1]
        assert isa == expected, (capability, machine, compiled)
    reference = results["default"][1]
    for capability, (_, out) in results.items():
        for (loss, lse, grad), (ref_loss, ref_lse, ref_grad) in zip(out, reference):
            torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=2e-6, msg=capability)
            torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6, msg=capability)
            tol = GRAD_TOL[grad.dtype]  # one rounding of the gradient apart at most
            torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=2 * tol[0], atol=2 * tol[1], msg=capability)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_classes_at_minus_infinity_behave_as_in_pytorch(dtype):
    # Whole chunks of -inf (a vocabulary padded and masked): exact zeros, no NaN.
    V = 5000
    logits = (torch.randn(3, V) * 2).to(dtype)
    logits[:, 100:4500] = float("-inf")
    target = torch.tensor([5, 4999, 60])
    for eps in (0.0, 0.1):
        ours = smoothed_xent(logits, target, eps, reduction="none", backend="native")
        theirs = F.cross_entropy(logits.double(), target, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=2e-5)  # finite, or inf for eps > 0
    _, grad = loss_and_grad(smoothed_xent, logits, target, 0.0, backend="native")
    _, true_grad = truth(logits, target, 0.0)
    assert (grad[:, 100:4500] == 0).all()
    torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=GRAD_TOL[dtype][1])


@needs_native
def test_a_nan_logit_makes_its_row_nan_and_only_its_row():
    logits = torch.randn(3, 3000)
    logits[1, 2500] = float("nan")
    loss, lse, grad = _rows_op()(logits, torch.tensor([1, 2, 3]), None, torch.tensor(1.0), *masses(0.1, 3000), -100, 0.0, 0.0,
                                  1.0)
    assert loss[1].isnan() and lse[1].isnan() and grad[1].isnan().all()
    assert loss[[0, 2]].isfinite().all() and grad[[0, 2]].isfinite().all()


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@needs_native
@pytest.mark.slow
def test_rows_past_two_to_the_31_logits_in_bfloat16():
    # 16,760 x 128,256 bf16 logits = 2.149e9 elements (4.3 GB), gradient written in place.
    # Random rows at the start, straddling element 2^31 and at the end are checked against
    # the oracle; the zero rows between must give log V. An int32 offset would wrap.
    N, V = 16_760, 128_256
    assert N * V > 2**31
    if _available_memory_bytes() < 6 * 2**30:
        pytest.skip("needs about 5 GB of free memory")
    straddling = 2**31 // V
    checked = [0, straddling, straddling + 1, N - 1]
    logits = torch.zeros(N, V, dtype=torch.bfloat16)
    originals = (torch.randn(len(checked), V) * 3).to(torch.bfloat16)
    logits[checked] = originals
    target = torch.randint(0, V, (N,))
    loss, lse = _rows_inplace_op()(logits, target, None, torch.tensor(1.0), *masses(0.1, V), -100, 0.0, 0.0, 1.0)
    for i, row in enumerate(checked):
        true_loss, true_grad = truth(originals[i : i + 1], target[row : row + 1], 0.1, reduction="none")
        assert_matches_truth(loss[row : row + 1], logits[row : row + 1], true_loss, true_grad, torch.bfloat16)
        torch.testing.assert_close(lse[row], torch.logsumexp(originals[i].float(), 0), rtol=1e-5, atol=1e-5)
    plain = torch.ones(N, dtype=torch.bool)
    plain[checked] = False
    torch.testing.assert_close(loss[plain], torch.full_like(loss[plain], math.log(V)), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the CUDA sources


def _cuda_homes() -> list[Path]:
    homes = [Path(os.environ[var]) for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    homes.append(Path("/usr/local/cuda"))
    on_path = shutil.which("nvcc")
    if on_path:
        homes.append(Path(on_path).resolve().parent.parent)
    return homes


def _nvcc() -> str | None:
    """CUDA_HOME's nvcc, else /usr/local/cuda's, else the one on PATH."""
    for home in _cuda_homes():
        if (home / "bin" / "nvcc").exists():
            return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def _require_nvcc() -> str:
    nvcc = _nvcc()
    if nvcc is None:
        if os.environ.get("FUSED_LS_REQUIRE_NVCC") == "1":
            pytest.fail("FUSED_LS_REQUIRE_NVCC=1 but no nvcc on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin")
        pytest.skip("no nvcc (CI sets FUSED_LS_REQUIRE_NVCC=1 to make this a failure)")
    return nvcc


# Torch's own nvcc flags for extensions, so that what compiles here compiles in a torch build.
TORCH_LIKE_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_100"])
def test_cuda_sources_compile_with_nvcc_without_spills(arch, tmp_path):
    nvcc = _require_nvcc()
    sources = sorted(CSRC.glob("cuda/*.cu"))
    assert sources, "no CUDA sources found"
    for source in sources:
        cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Werror", "all-warnings", "-Xptxas", "-v",
               *TORCH_LIKE_NVCC_FLAGS, str(source), "-o", str(tmp_path / f"{source.stem}.o")]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
        assert spills, result.stderr[-3000:]  # ptxas reported every kernel
        assert all(stores == loads == "0" for stores, loads in spills), result.stderr[-6000:]


@pytest.fixture(scope="module")
def emulated_cuda(tmp_path_factory):
    """The CUDA launcher, compiled for the host by tests/cuda_host_emulation.cpp (ctypes)."""
    _require_nvcc()
    include = next((home / "include" for home in _cuda_homes() if (home / "include" / "cuda_runtime.h").exists()), None)
    cxx = _native_build.cxx_compiler()
    if cxx is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers")
    harness = Path(__file__).with_name("cuda_host_emulation.cpp")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [harness, *sorted(CSRC.rglob("*.h")), *CSRC.glob("cuda/*.cu")]))
    library = tmp_path_factory.mktemp("cuda_emulation") / f"emulation_{digest.hexdigest()[:12]}.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{include}", str(harness), "-o", str(library), "-lpthread"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    return ctypes.CDLL(str(library))


class _RowsProblem(ctypes.Structure):
    """ctypes mirror of fused_ls::RowsProblem (csrc/smoothed_xent.h)."""

    _fields_ = [
        ("dtype", ctypes.c_int), ("logits", ctypes.c_void_p), ("logits_row_stride", ctypes.c_int64),
        ("grad", ctypes.c_void_p), ("grad_row_stride", ctypes.c_int64), ("target", ctypes.c_void_p),
        ("weight", ctypes.c_void_p), ("weight_sum", ctypes.c_void_p), ("grad_scale", ctypes.c_void_p),
        ("grad_scale_row_stride", ctypes.c_int64), ("loss", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("num_rows", ctypes.c_int64),
        ("num_classes", ctypes.c_int64), ("ignore_index", ctypes.c_int64), ("k_s", ctypes.c_double),
        ("k_t", ctypes.c_double), ("z_loss", ctypes.c_double), ("softcap", ctypes.c_double),
        ("logit_scale", ctypes.c_double), ("predicted", ctypes.c_void_p), ("precomputed_lse", ctypes.c_void_p),
    ]


_SCALAR_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def _run_emulated(lib, logits, target, weight, eps, blocks_per_row, *, inplace=False, others=False, z_loss=0.0,
                  softcap=0.0, logit_scale=1.0, grad_scale=0.5, ignore_index=-100, loss_only=False, predicted=None,
                  precomputed_lse=None):
    """What the CUDA op would return, buffers poisoned with NaN as csrc/op_common.h prepares them;
    with `loss_only`, what the loss-only op would (no gradient, grad None); `predicted`, an (N,)
    int64 buffer for each row's argmax, or None; `precomputed_lse`, each row's lse from the caller
    (in the accumulator's dtype), or None. `grad_scale`: a
    number (one scale, row stride 0) or a tensor of one scale per row (row stride 1)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    N, V = logits.shape
    target = target.long().contiguous()
    w = None if weight is None else weight.to(acc).contiguous()
    w_sum = None if weight is None else weight.sum(dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32).to(acc)
    per_row = isinstance(grad_scale, torch.Tensor)
    scale = grad_scale.to(acc).contiguous() if per_row else torch.tensor(grad_scale, dtype=acc)
    assert not per_row or scale.shape == (N,)
    loss = torch.full((N,), math.nan, dtype=acc)
    lse = torch.full((N,), math.nan, dtype=acc)
    grad = None if loss_only else logits if inplace else torch.full((N, V), math.nan, dtype=logits.dtype)
    k_s, k_t = masses(eps, V, others)
    problem = _RowsProblem(
        _SCALAR_KIND[logits.dtype], logits.data_ptr(), logits.stride(0), None if grad is None else grad.data_ptr(),
        0 if grad is None else grad.stride(0), target.data_ptr(), None if w is None else w.data_ptr(),
        None if w_sum is None else w_sum.data_ptr(), None if grad is None else scale.data_ptr(), 1 if per_row else 0,
        loss.data_ptr(), lse.data_ptr(), N, V, ignore_index, k_s, k_t, z_loss, softcap, logit_scale,
        None if predicted is None else predicted.data_ptr(),
        None if precomputed_lse is None else precomputed_lse.data_ptr(),
    )
    lib.fused_ls_emulated_workspace_bytes.restype = ctypes.c_ulong
    workspace = torch.empty(max(lib.fused_ls_emulated_workspace_bytes(ctypes.byref(problem), blocks_per_row), 1), dtype=torch.uint8)
    status = lib.fused_ls_emulated_cuda_rows(ctypes.byref(problem), blocks_per_row, ctypes.c_void_p(workspace.data_ptr()))
    assert status == 0, f"launch returned cudaError {status}"
    return loss, lse, grad


EVERY_FEATURE = {"others": True, "z_loss": 1e-2, "softcap": 2.5, "logit_scale": 1.3}

EMULATED_CASES = {
    # name: (dtype, V, row padding, blocks per row, in place, weighted, features)
    "fp32 16-byte loads": (torch.float32, 1000, 0, 1, False, False, {}),
    "bf16 16-byte loads, every feature": (torch.bfloat16, 3000, 8, 1, False, True, EVERY_FEATURE),
    "fp16 unaligned rows": (torch.float16, 999, 3, 1, False, False, {}),
    "fp32 row split over 3 blocks, in place": (torch.float32, 5000, 0, 3, True, True, EVERY_FEATURE),
    "bf16 ragged split over 4 blocks": (torch.bfloat16, 5003, 1, 4, False, False, {}),
    "fp64 every feature": (torch.float64, 301, 0, 1, False, True, EVERY_FEATURE),
}


@pytest.mark.parametrize("case", list(EMULATED_CASES))
def test_cuda_kernels_run_on_the_cpu_match_the_oracle(emulated_cuda, case):
    dtype, V, pad, blocks, inplace, weighted, features = EMULATED_CASES[case]
    N = 5
    base = (torch.randn(N, V + pad, dtype=torch.float64) * 3).to(dtype)
    logits = base[:, :V]
    target = torch.randint(0, V, (N,))
    target[1], target[2], target[3] = -100, V - 1, 0
    weight = torch.rand(V, dtype=torch.float64) + 0.5 if weighted else None
    kwargs = {"convention": "others" if features.get("others") else "uniform", "z_loss": features.get("z_loss", 0.0),
              "softcap": features.get("softcap"), "logit_scale": features.get("logit_scale", 1.0)}
    true_loss, true_grad = truth(logits, target, 0.1, weight=weight, reduction="sum", **kwargs)
    true_rows = smoothed_xent_reference(logits.double(), target, 0.1, weight=weight, reduction="none", **kwargs)
    loss, _, grad = _run_emulated(
        emulated_cuda, logits.clone() if not inplace else logits, target,
        None if weight is None else (weight if dtype == torch.float64 else weight.float()), 0.1, blocks,
        inplace=inplace, others=features.get("others", False), z_loss=kwargs["z_loss"],
        softcap=features.get("softcap", 0.0), logit_scale=kwargs["logit_scale"], grad_scale=1.0,
    )
    torch.testing.assert_close(loss.double(), true_rows, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    torch.testing.assert_close(loss.double().sum(), true_loss, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    assert grad.dtype == dtype
    atol = softcapped_grad_atol(dtype, weight, kwargs["logit_scale"]) if kwargs["softcap"] else GRAD_TOL[dtype][1]
    torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=atol)
    assert (grad[1] == 0).all() and loss[1] == 0  # the ignored row


@pytest.mark.parametrize("case", list(EMULATED_CASES))
def test_cuda_loss_only_kernels_give_the_full_kernels_loss_and_lse_and_write_nothing_else(emulated_cuda, case):
    dtype, V, pad, blocks, _, weighted, features = EMULATED_CASES[case]
    N = 5
    logits = (torch.randn(N, V + pad, dtype=torch.float64) * 3).to(dtype)[:, :V]
    before = logits.clone()
    target = torch.randint(0, V, (N,))
    target[1], target[2], target[4] = -100, V - 1, V + 7  # ignored, last class, out of range
    weight = (torch.rand(V, dtype=torch.float64) + 0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)
    kwargs = {"others": features.get("others", False), "z_loss": features.get("z_loss", 0.0),
              "softcap": features.get("softcap", 0.0), "logit_scale": features.get("logit_scale", 1.0)}
    weight = weight if weighted else None
    full_loss, full_lse, _ = _run_emulated(emulated_cuda, logits.clone(), target, weight, 0.1, blocks, **kwargs)
    loss, lse, grad = _run_emulated(emulated_cuda, logits, target, weight, 0.1, blocks, loss_only=True, **kwargs)
    assert grad is None
    torch.testing.assert_close(loss, full_loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=0)
    assert torch.equal(logits, before)


def test_cuda_kernel_never_reads_an_out_of_range_target(emulated_cuda):
    # The target's row is the last of the buffer, so an index of V + 10**6 would fault here.
    logits = torch.randn(2, 777)
    target = torch.tensor([3, 777 + 10**6])
    loss, lse, grad = _run_emulated(emulated_cuda, logits, target, None, 0.1, 1)
    assert loss[1].isnan() and (grad[1] == 0).all()
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))
    assert loss[0].isfinite()


# ------------------------------------- per-row grad_scale and masked (-inf) classes, CPU and CUDA
#
# "cpu" is the CPU op; "cuda" and "cuda split" are the CUDA kernels run on the CPU by
# tests/cuda_host_emulation.cpp, one block per row and a row split over 3 blocks (the path a GPU
# takes for few long rows), with every output buffer poisoned with NaN beforehand.

KERNELS = ["cpu", "cuda", "cuda split"]


def _kernel_rows(request, kernel, logits, target, weight, eps, grad_scale, *, others=False, inplace=False, **features):
    """(loss rows, lse, gradient) of one of KERNELS; grad_scale a number or one per row."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    if kernel == "cpu":
        if not native.load()[0]:
            pytest.skip(f"native extension unavailable: {native.load()[1]}")
        scale = grad_scale.to(acc) if isinstance(grad_scale, torch.Tensor) else torch.tensor(grad_scale, dtype=acc)
        args = (target, w, scale, *masses(eps, logits.shape[1], others), -100, features.get("z_loss", 0.0),
                features.get("softcap", 0.0), features.get("logit_scale", 1.0))
        if not inplace:
            return _rows_op()(logits, *args)
        grad = logits.clone()
        loss, lse = _rows_inplace_op()(grad, *args)
        return loss, lse, grad
    lib = request.getfixturevalue("emulated_cuda")
    blocks = 3 if kernel == "cuda split" else 1
    x = logits.clone()
    return _run_emulated(lib, x, target, w, eps, blocks, inplace=inplace, others=others, grad_scale=grad_scale,
                         **features)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_per_row_grad_scale_multiplies_each_rows_gradient_by_its_own_entry(request, kernel, dtype):
    # A 1-D grad_scale of N entries: row i's gradient times entry i (0, negative, tiny and large
    # included), rounded once, against the float64 oracle with the same per-row upstream gradient;
    # the loss rows do not depend on it. 4136 classes: two whole CPU chunks and a ragged one, and
    # rows that keep the CUDA kernel's 16-byte loads aligned.
    N, V = 6, 4136
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    target = torch.tensor([0, V - 1, -100, 2050, 17, 4000])
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    scale = torch.tensor([0.5, -2.0, 3.25, 0.0, 1e-3, 7.0], dtype=acc)
    features = {"z_loss": 1e-2, "softcap": 2.5, "logit_scale": 1.3}
    kwargs = {"convention": "others", "z_loss": 1e-2, "softcap": 2.5, "logit_scale": 1.3}
    true_rows, true_grad = truth(logits, target, 0.1, weight=weight, reduction="none", upstream=scale, **kwargs)
    # A saturated softcap's derivative 1 - tanh^2 carries an absolute error of a few units in the last
    # place of 1, times the class mass (up to max(weight)) and logit_scale; the row's scale multiplies it.
    per_unit_atol = max(GRAD_TOL[dtype][1], 4 * torch.finfo(acc).eps * float(weight.max()) * 1.3)
    for inplace in (False, True):
        loss, _, grad = _kernel_rows(request, kernel, logits, target, weight, 0.1, scale, others=True,
                                     inplace=inplace, **features)
        torch.testing.assert_close(loss.double(), true_rows, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
        assert grad.dtype == dtype
        for row, row_scale in enumerate(scale.tolist()):
            torch.testing.assert_close(grad[row].double(), true_grad[row], rtol=GRAD_TOL[dtype][0],
                                       atol=per_unit_atol * max(1.0, abs(row_scale)))
        assert (grad[2] == 0).all() and (grad[3] == 0).all()  # the ignored row; the row of scale 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_per_row_grad_scale_of_equal_entries_gives_exactly_the_single_scales_gradient(request, kernel):
    # One scale read with row stride 0 and N copies of it read with stride 1: the same bits.
    logits = torch.randn(4, 5003) * 3
    target = torch.tensor([0, 5002, 2048, -100])
    weight = torch.rand(5003) + 0.5
    single = _kernel_rows(request, kernel, logits, target, weight, 0.1, 0.375)
    per_row = _kernel_rows(request, kernel, logits, target, weight, 0.1, torch.full((4,), 0.375))
    for a, b in zip(single, per_row):
        assert torch.equal(a, b)


@needs_native
def test_cpu_op_takes_a_per_row_grad_scale_of_any_stride_including_an_expanded_one():
    N, V = 5, 3000
    logits = torch.randn(N, V) * 3
    target = torch.tensor([1, 2999, -100, 2048, 7])

    def run(scale):
        return _rows_op()(logits, target, None, scale, *masses(0.1, logits.shape[1]), -100, 0.0, 0.0, 1.0)

    reference = run(torch.tensor(0.75))
    expanded = torch.tensor(0.75, dtype=torch.float64).expand(N)  # stride 0, and float64
    assert expanded.stride() == (0,)
    for same in (torch.tensor([0.75]), expanded, torch.full((N,), 0.75)):
        for a, b in zip(run(same), reference):
            assert torch.equal(a, b)
    strided = (torch.randn(2 * N) * 2)[::2]
    assert strided.stride() == (2,)
    loss, _, grad = run(strided)
    _, _, contiguous_grad = run(strided.contiguous())
    assert torch.equal(grad, contiguous_grad)
    true_loss, true_grad = truth(logits, target, 0.1, reduction="none", upstream=strided)
    torch.testing.assert_close(loss.double(), true_loss, rtol=LOSS_TOL[torch.float32][0], atol=LOSS_TOL[torch.float32][1])
    torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[torch.float32][0], atol=GRAD_TOL[torch.float32][1])
    args = (target, None, expanded, *masses(0.1, logits.shape[1]), -100, 0.0, 0.0, 1.0)
    torch.library.opcheck(_rows_op(), (logits, *args))
    torch.library.opcheck(_rows_inplace_op(), (logits.clone(), *args))


@needs_native
@pytest.mark.parametrize("shape", [(4,), (6,), (0,), (5, 1), (1, 1), (1, 5)])
def test_a_grad_scale_neither_one_element_nor_one_per_row_is_a_clear_error(shape):
    logits = torch.randn(5, 40)
    before = logits.clone()
    target = torch.tensor([0, 1, 2, 3, 4])
    expected = (r"grad_scale must have one element \(shape \(\) or \(1,\)\) or one per row of logits "
                rf"\(shape \(5,\)\), got shape \[{', '.join(map(str, shape))}\]")
    with pytest.raises(RuntimeError, match=expected):
        _rows_op()(logits, target, None, torch.ones(shape), *masses(0.1, logits.shape[1]), -100, 0.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match=expected):
        _rows_inplace_op()(logits, target, None, torch.ones(shape), *masses(0.1, logits.shape[1]), -100, 0.0, 0.0, 1.0)
    assert torch.equal(logits, before)  # checked before anything is written
    one_row = _rows_op()(logits[:1], target[:1], None, torch.ones(1), *masses(0.1, logits.shape[1]), -100, 0.0, 0.0, 1.0)  # (1,) = (N,)
    assert one_row[2].isfinite().all()


def _zero_mass_oracle(logits, target, eps, *, weight=None, others=False, upstream=None):
    """Float64 loss rows and gradient (rows times `upstream`) by the stated rule: class c's term
    q_c (lse - y_c), q_c = k_s w_c + k_t w_t [c == t], is +inf where q_c > 0 and y_c = -inf,
    and exactly 0 where q_c = 0; ignored rows (-100) have loss 0 and gradient 0."""
    y = logits.double()
    N, V = y.shape
    k_s, k_t = masses(eps, V, others)
    w = torch.ones(V, dtype=torch.float64) if weight is None else weight.double()
    valid = target != -100
    t = torch.where(valid, target, 0)
    q = (k_s * w).expand(N, V).clone()
    q[torch.arange(N), t] += k_t * w[t]
    lse = torch.logsumexp(y, 1, keepdim=True)
    loss = torch.where(q != 0, q * (lse - y), 0.0).sum(1)
    grad = q.sum(1, keepdim=True) * torch.exp(y - lse) - q
    if upstream is not None:
        grad = grad * upstream.double()[:, None]
    return torch.where(valid, loss, 0.0), torch.where(valid[:, None], grad, 0.0)


def _masked_batch(dtype):
    """Rows of 5000 classes with -inf entries, and class weights that are 0 on 100:4500."""
    V = 5000
    logits = (torch.randn(8, V, dtype=torch.float64) * 3).to(dtype)
    inf = float("-inf")
    logits[0, 7] = inf                          # one class
    logits[1, 11] = inf                         # the target
    logits[2, 100:4500] = inf                   # a run spanning whole 2048-logit chunks
    logits[3, 100:4500] = inf                   # the same, the target inside it
    logits[4, :2100] = inf                      # the first class and the whole first chunk
    logits[5, :4321] = logits[5, 4322:] = inf   # all but the target
    logits[6, 50:60] = inf                      # an ignored row
    target = torch.tensor([3, 11, 5, 200, 4000, 4321, -100, 4999])  # row 7: no -inf, the control
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    weight[100:4500] = 0.0
    return logits, target, weight


MASKED_SETTINGS = {
    # name: (eps, "others" convention, class weights)
    "eps 0": (0.0, False, False),
    "eps 0.1": (0.1, False, False),
    "eps 1": (1.0, False, False),
    "eps 0.1, weight 0 on masked classes": (0.1, False, True),
    "eps 1, others, weight 0 on masked classes": (1.0, True, True),
    "eps 1, others": (1.0, True, False),
}


@pytest.mark.parametrize("setting", list(MASKED_SETTINGS))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_classes_cost_inf_with_mass_and_nothing_without_never_nan(request, kernel, dtype, setting):
    # y_c = -inf: probability 0, a finite gradient, and a loss term of +inf when its target mass
    # q_c > 0 (any masked class with eps > 0, a masked target with k_t w_t > 0) or exactly 0 when
    # q_c = 0 (eps 0, class weight 0, or the target at eps 1 in the 'others' convention).
    eps, others, weighted = MASKED_SETTINGS[setting]
    logits, target, weight = _masked_batch(dtype)
    weight = weight if weighted else None
    upstream = torch.linspace(0.5, 2.0, len(target))
    loss, lse, grad = _kernel_rows(request, kernel, logits, target, weight, eps, upstream, others=others)
    true_loss, true_grad = _zero_mass_oracle(logits, target, eps, weight=weight, others=others, upstream=upstream)
    assert not loss.isnan().any() and not lse.isnan().any() and grad.isfinite().all()
    assert torch.equal(loss.isinf(), true_loss.isinf()), (loss, true_loss)
    torch.testing.assert_close(loss.double(), true_loss, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=GRAD_TOL[dtype][1])
    if weight is None and not others and eps < 1:  # PyTorch's own answer, finite or inf (at eps 1
        # it has 0 * inf = NaN for a masked target)
        theirs = F.cross_entropy(logits.double(), target, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(loss.double(), theirs, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1])
    # What the rule gives here, spelled out.
    finite_rows = {0.0: [0, 2, 4, 5, 6, 7], 0.1: [6, 7], 1.0: [6, 7]}[eps]
    if weighted:  # weight 0 on 100:4500 frees rows 2 and 3 (target 200 inside it) of their masks
        finite_rows = sorted({*finite_rows, 2, 3} if eps > 0 else {*finite_rows, 3})
    if others and eps == 1.0:  # the target's mass is 0: a masked target costs nothing
        finite_rows = sorted({*finite_rows, 1} | ({3} if weighted else set()))
    assert loss[finite_rows].isfinite().all() and loss[[r for r in range(8) if r not in finite_rows]].isinf().all()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("masked", [False, True])
def test_float32_loss_is_shift_invariant_to_a_relative_1e_7(request, kernel, masked):
    # logits + 1e4 in float32: everything large cancels before it is summed, so the loss rows
    # stay within a few float32 roundings of the float64 truth of the same logits; also with the
    # first 2100 classes masked at weight 0 (no finite first logit to take differences from).
    V = 5000
    logits = (torch.randn(4, V, dtype=torch.float64) * 3 + 1e4).float()
    target = torch.tensor([0, V - 1, 2500, 4096])
    weight = torch.rand(V) + 0.5
    if masked:
        logits[:, :2100] = float("-inf")
        weight[:2100] = 0.0
        target[0] = 2100
    loss, lse, grad = _kernel_rows(request, kernel, logits, target, weight, 0.1, 1.0)
    true_loss, true_grad = _zero_mass_oracle(logits, target, 0.1, weight=weight)
    relative = ((loss.double() - true_loss) / true_loss).abs().max().item()
    assert relative < 5e-7, relative
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=2e-7, atol=0)
    torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[torch.float32][0],
                               atol=GRAD_TOL[torch.float32][1])


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 50_257), (3, 256_000), (7, 1001)])
def test_cuda_kernel_matches_the_oracle_on_a_gpu(dtype, shape):
    if not native.has_cuda():
        pytest.skip("the native extension was built without CUDA")
    N, V = shape
    logits = (torch.randn(N, V, device="cuda") * 3).to(dtype)
    target = torch.randint(0, V, (N,), device="cuda")
    target[0] = -100
    for inplace in (False, True):
        kwargs = {"z_loss": 1e-3, "softcap": 20.0, "reduction": "sum"}
        x = logits.clone()
        if inplace:
            x = x.requires_grad_() * 1  # a non-leaf, overwritten with its gradient
            loss = smoothed_xent(x, target, 0.1, inplace_backward=True, backend="native", **kwargs)
            loss.backward()
            grad = x
        else:
            loss, grad = loss_and_grad(smoothed_xent, x, target, 0.1, backend="native", **kwargs)
        true_loss, true_grad = truth(logits, target, 0.1, **kwargs)
        rtol, atol = LOSS_TOL[dtype]
        torch.testing.assert_close(loss.double(), true_loss, rtol=rtol * 10, atol=atol * N)
        rtol, atol = GRAD_TOL[dtype]
        torch.testing.assert_close(grad.detach().double(), true_grad, rtol=rtol, atol=atol)


# ------------------------------------------- the CPU kernel of the linear head's dL/dW update


def _compensated_update_cases(seed: int):
    """(hi, lo, product, first): every dtype pair the CPU kernel takes, lengths with and without
    a vector tail and past one parallel task (65536), and inf, fp16 overflow, NaN and zero."""
    g = torch.Generator().manual_seed(seed)
    for hi_dtype in (torch.bfloat16, torch.float16):
        for product_dtype in (torch.bfloat16, torch.float16, torch.float32):
            for n in (1, 31, 32, 33, 4099, 70001):
                for first in (True, False):
                    hi = (torch.randn(n, generator=g) * 300).to(hi_dtype)
                    lo = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
                    product = (torch.randn(n, generator=g) * torch.logspace(-8, 4, n)).to(product_dtype)
                    special = torch.tensor([float("inf"), 65504.0, float("nan"), 0.0, -65504.0])[:n]
                    product[: special.numel()] = special.to(product_dtype)
                    yield hi, lo, product, first


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@needs_native
def test_cpu_compensated_update_is_bit_for_bit_the_eager_definition():
    from fused_ls import linear

    assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_ls::compensated_add_", "CPU")
    seed = int(torch.randint(0, 2**31, ()))
    for hi, lo, product, first in _compensated_update_cases(seed):
        ours_hi, ours_lo, eager_hi, eager_lo = hi.clone(), lo.clone(), hi.clone(), lo.clone()
        torch.ops.fused_ls.compensated_add_(ours_hi, ours_lo, product, first)
        linear._eager_compensated_add(eager_hi, eager_lo, product, first)
        where = f"{hi.dtype} += {product.dtype}, n={hi.numel()}, first={first}, cases seed {seed}"
        assert _same_bits(ours_hi, eager_hi), where
        assert _same_bits(ours_lo, eager_lo), where


@needs_native
def test_cpu_compensated_update_takes_any_layout_and_dtype_through_its_general_path():
    from fused_ls import linear

    hi = torch.randn(40, 64).to(torch.bfloat16)[:, ::2]  # strided
    lo = (torch.randn(32, 40) * 1e-3).to(torch.bfloat16).t()
    product = torch.randn(40, 32, dtype=torch.float64)
    expected_hi, expected_lo = hi.clone(), lo.clone()
    linear._eager_compensated_add(expected_hi, expected_lo, product, False)
    torch.ops.fused_ls.compensated_add_(hi, lo, product, False)  # the strided views, in place
    assert _same_bits(hi, expected_hi) and _same_bits(lo, expected_lo)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.fused_ls.compensated_add_(hi, lo, product[:, :5], False)


def _compensated_isa_script() -> str:
    return "\n".join([
        "import os, sys, torch",
        "sys.path.insert(0, 'tests')",
        "from fused_ls import linear, native",
        "from test_native import _compensated_update_cases, _same_bits",
        "assert native.load()[0], native.load()[1]",
        "for hi, lo, product, first in _compensated_update_cases(seed=1):",
        "    a, b, c, d = hi.clone(), lo.clone(), hi.clone(), lo.clone()",
        "    torch.ops.fused_ls.compensated_add_(a, b, product, first)",
        "    linear._eager_compensated_add(c, d, product, first)",
        "    assert _same_bits(a, c) and _same_bits(b, d), (hi.dtype, product.dtype, hi.numel(), first)",
        "print(native.cpu_kernel_isa())",
    ])


@needs_native
def test_every_instruction_set_variant_of_the_compensated_update_is_bit_for_bit_eager():
    compiled = native._STATE["native"][0].CPU_KERNEL_ISAS.split(",")
    for capability in ("default", "avx2", "avx512"):
        if capability.upper() not in compiled:
            continue
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        result = subprocess.run([sys.executable, "-c", _compensated_isa_script()], check=True, env=env, cwd=ROOT,
                                timeout=300, capture_output=True, text=True)
        # ATEN_CPU_CAPABILITY can only lower torch's choice: a CPU without AVX512 runs AVX2.
        order, best = ("default", "avx2", "avx512"), torch.backends.cpu.get_cpu_capability().lower()
        supported = order[: order.index(best) + 1] if best in order else ("default",)
        if capability in supported:
            assert result.stdout.strip() == capability.upper(), result.stdout


@needs_native
def test_an_extension_built_for_another_row_op_contract_is_not_imported(tmp_path):
    # An extension left over from older sources would register kernels for other schemas, and
    # the dispatcher would abort the whole process: it is recognised in the file, never imported.
    script = "\n".join([
        "import os",
        "from fused_ls import native",
        "native.ROW_OP_CONTRACT = b'fused_ls row-op contract 0'",
        "ok, why = native.load()",
        "assert not ok and 'built from older sources' in why and 'FUSED_LS_NO_JIT' in why, why",
        "import sys; assert 'fused_ls._C' not in sys.modules",
        "print('refused')",
    ])
    env = {**os.environ, "FUSED_LS_NO_JIT": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "refused" in result.stdout, result.stderr
