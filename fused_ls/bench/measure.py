"""How a workload is measured: median time, bytes moved, peak extra memory, environment.

Time: `warmup` untimed steps, then `repeats` timed ones; the median is reported. On CUDA
each step sits between two events on the current stream (the untimed prepare() before the
first event), on the CPU between two perf_counter() reads.

Bytes: the least traffic the job needs, written out so that GB/s can be compared with a
copy: forward+backward reads the logits once and writes their gradient once (2 N V b);
the forward alone reads the logits once (N V b). A copy y.copy_(x) of the logits moves
exactly the forward+backward bytes, so copy time / step time is the fraction of the
copy bandwidth reached.

Peak extra memory: what a step allocates beyond its inputs at its high point.
  CUDA: torch.cuda.max_memory_allocated() during the step minus memory_allocated() before
        it (inputs, and the copy an overwriting provider works on, are allocated before).
  CPU:  peak resident set size of the step in a fresh subprocess minus its resident size
        just before the step (after one warm-up step); see rss.py.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time

import torch

import fused_ls
from fused_ls.bench import rss
from fused_ls.bench.cases import Case
from fused_ls.bench.workload import CopyWorkload, Workload, as_workload, resolve_builder


CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() during one step minus memory_allocated() before it"


def default_rounds(device: torch.device | str) -> tuple[int, int]:
    """(untimed warm-up steps, timed repeats) when none are asked for: both front ends use these."""
    return (3, 10) if torch.device(device).type == "cuda" else (1, 5)


def memory_method(device: torch.device | str) -> str:
    """How peak extra memory is measured on `device`, in words (recorded with the results)."""
    return CUDA_MEMORY_METHOD if torch.device(device).type == "cuda" else rss.METHOD


def bytes_moved(case: Case, mode: str) -> int:
    """Read the logits once (+ write the gradient once for fwd+bwd)."""
    return case.logits_bytes * (2 if mode == "fwd+bwd" else 1)


def gbps(nbytes: int, milliseconds: float | None) -> float | None:
    return None if not milliseconds else nbytes / (milliseconds * 1e-3) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_workload(workload: Workload, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` timed steps, after `warmup` untimed ones."""
    times, failed = time_interleaved({"workload": workload}, device, warmup, repeats)
    if failed:
        raise failed["workload"]
    return times["workload"]


def time_interleaved(workloads: dict[str, Workload], device: torch.device, warmup: int,
                     repeats: int) -> tuple[dict[str, list[float]], dict[str, Exception]]:
    """({name: milliseconds of each timed step}, {name: the exception it raised}).

    The workloads take turns: each round runs every workload once, in an order rotated from
    round to round, so that a change in the machine's load (other jobs on a shared CPU,
    clocks) falls on all of them alike and their ratios stay fair. A workload that raises
    is dropped from the rounds; the others go on."""
    workloads = {name: as_workload(w) for name, w in workloads.items()}
    names = list(workloads)
    if not names:
        return {}, {}
    failed: dict[str, Exception] = {}
    pending: list[tuple[str, object, object]] = []  # (name, start, end): events on CUDA, seconds on CPU
    cuda = device.type == "cuda"
    for rnd in range(-warmup, repeats):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            workload = workloads[name]
            try:
                workload.prepare()
                if rnd < 0:
                    workload.step()
                elif cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    workload.step()
                    end.record()
                    pending.append((name, start, end))
                else:
                    begin = time.perf_counter()
                    workload.step()
                    pending.append((name, begin, time.perf_counter()))
            except Exception as exc:  # noqa: BLE001  (one failing workload must not stop the others)
                failed[name] = exc
        if rnd == -1:
            _sync(device)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names if name not in failed}
    for name, start, end in pending:
        if name in times:
            times[name].append(start.elapsed_time(end) if cuda else (end - start) * 1e3)
    return times, failed


def median(values: list[float]) -> float:
    return statistics.median(values)


def cuda_peak_extra(workload: Workload, device: torch.device) -> int:
    """Bytes the allocator's peak rose above what was allocated before the step."""
    workload = as_workload(workload)
    workload.prepare()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = workload.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - before


def peak_extra_memory(device: torch.device | str, jobs: list[tuple[str, dict]], timeout_s: float = 900) -> list[dict]:
    """Peak extra memory of each job, a builder named 'module:function' and its keyword
    arguments; the builder returns a workload (or a plain callable) holding its inputs.

    CUDA: built and measured here, one after another. CPU: all jobs in one fresh
    subprocess (rss.py), which must be able to import the builder.
    Each result: {"bytes": int or None, "method": str, "error": str or None}."""
    device = torch.device(device)
    if device.type != "cuda":
        return rss.measure_jobs(jobs, timeout_s=timeout_s)
    results = []
    for builder, kwargs in jobs:
        try:
            workload = as_workload(resolve_builder(builder)(**kwargs))
            workload.prepare()
            workload.step()  # warm-up: compilation, autotuning and workspaces stay out
            results.append({"bytes": cuda_peak_extra(workload, device), "method": CUDA_MEMORY_METHOD, "error": None})
        except Exception as exc:  # noqa: BLE001  (one broken job must not lose the others)
            results.append({"bytes": None, "method": CUDA_MEMORY_METHOD, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            workload = None
            gc.collect()
            torch.cuda.empty_cache()
    return results


def copy_ceiling(device: torch.device, nbytes: int, warmup: int = 3, repeats: int = 10) -> dict:
    """Copy bandwidth over a buffer of `nbytes` (read + write counted), random data."""
    x = torch.randn(nbytes // 4, device=device)
    times = time_workload(CopyWorkload(x), device, warmup, repeats)
    ms = median(times)
    return {"bytes_per_copy": 2 * x.numel() * 4, "median_ms": ms, "gbps": gbps(2 * x.numel() * 4, ms),
            "what": "y.copy_(x), float32, bytes read + bytes written"}


# ----------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    # bench/gpu.sh runs an installed copy, outside the checkout: it passes the commit on.
    if os.environ.get("FUSED_LS_GIT_COMMIT"):
        return os.environ["FUSED_LS_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device | str) -> dict:
    """Machine, versions and date, for every result (JSON and pytest-benchmark extra_info)."""
    device = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fused_ls": fused_ls.__version__,
        "fused_ls_backends": fused_ls.available_backends(device),
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "git_commit": _git_commit(),
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "FUSED_LS_BACKEND", "OMP_NUM_THREADS") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_multiprocessors": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        })
    return env
