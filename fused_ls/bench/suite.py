"""One case, every provider, every mode: check, time, memory, ratios. Used by the CLI.

Order within a case: the copy baseline; the eager reference (loss and gradient, kept for
the checks); then per provider a check against it and, only if that passes, the timing
(and on CUDA the memory) of each mode; on the CPU the memory of every (provider, mode) in
one subprocess at the end. A provider that fails its check or raises is reported with its
error and not timed; the other providers go on.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch

from fused_ls.bench.cases import Case, make_inputs, release_inputs
from fused_ls.bench.measure import (CUDA_MEMORY_METHOD, CopyWorkload, bytes_moved, cuda_peak_extra, gbps, median,
                                    peak_extra_memory, time_workload)
from fused_ls.bench.workloads import LABEL_SMOOTHING, LossWorkload, check_against

LOSS_BUILDER = "fused_ls.bench.workloads:loss_workload"


def units_per_case(n_providers: int, n_modes: int, device: torch.device, memory: bool) -> int:
    """Progress units run_case reports: the copy, each (provider, mode), the CPU memory subprocess."""
    return 1 + n_providers * n_modes + (1 if memory and device.type != "cuda" else 0)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:500]


def run_case(case: Case, providers: list[str], modes: list[str], device: torch.device, *, seed: int,
             warmup: int, repeats: int, memory: bool = True,
             progress: Callable[[str], None] = lambda label: None) -> tuple[dict, list[dict]]:
    """(the copy baseline, one result per (provider, mode)) for `case` on `device`."""
    logits, target = make_inputs(case, str(device), seed)

    copy = CopyWorkload(logits)
    copy_ms = median(time_workload(copy, device, warmup, repeats))
    del copy
    copy_result = {"case": case.name, "rows": case.rows, "classes": case.classes, "dtype": case.dtype,
                   "bytes": bytes_moved(case, "fwd+bwd"), "median_ms": copy_ms,
                   "gbps": gbps(bytes_moved(case, "fwd+bwd"), copy_ms)}
    progress(f"{case.name} copy")

    results: list[dict] = []
    reference = LossWorkload("eager", logits, target, LABEL_SMOOTHING).loss_and_grad()
    for name in providers:
        base = {"case": case.name, "rows": case.rows, "classes": case.classes, "dtype": case.dtype, "provider": name}
        try:
            workload = LossWorkload(name, logits, target, LABEL_SMOOTHING)
            check = check_against(workload, reference, case.dtype)
            error = None if check["ok"] else "result differs from eager beyond tolerance: not timed"
        except Exception as exc:
            workload, check, error = None, None, _error(exc)
        for mode in modes:
            result = dict(base, mode=mode, bytes=bytes_moved(case, mode), check=check, error=error, median_ms=None,
                          times_ms=None, gbps=None, peak_extra_bytes=None, memory_method=None)
            if error is None:
                try:
                    step = workload.mode(mode)
                    times = time_workload(step, device, warmup, repeats)
                    result.update(median_ms=median(times), times_ms=times, gbps=gbps(result["bytes"], median(times)))
                    if memory and device.type == "cuda":
                        result.update(peak_extra_bytes=cuda_peak_extra(step, device), memory_method=CUDA_MEMORY_METHOD)
                except Exception as exc:
                    result["error"] = _error(exc)
                    _release(device)
            results.append(result)
            progress(f"{case.name} {name} {mode}")
        workload = None
        _release(device)
    reference = None
    _release(device)

    if memory and device.type != "cuda":
        measured = [r for r in results if r["error"] is None]
        jobs = [(LOSS_BUILDER, {"provider": r["provider"], "case": case.name, "mode": r["mode"], "device": "cpu",
                                "seed": seed}) for r in measured]
        release_inputs()
        del logits, target
        _release(device)
        for result, reading in zip(measured, peak_extra_memory(device, jobs)):
            result.update(peak_extra_bytes=reading["bytes"], memory_method=reading["method"])
            if reading["error"]:
                result["memory_error"] = reading["error"]
        progress(f"{case.name} memory")
    release_inputs()

    add_ratios(results, copy_result, case)
    return copy_result, results


def add_ratios(results: list[dict], copy_result: dict | None, case: Case) -> None:
    """Speed-up and memory ratio against eager (same case and mode), fraction of the copy
    bandwidth, and peak extra memory in units of the logits' size."""
    eager = {r["mode"]: r for r in results if r["provider"] == "eager" and r["median_ms"]}
    for r in results:
        ref = eager.get(r["mode"])
        r["speedup_vs_eager"] = ref["median_ms"] / r["median_ms"] if ref and r["median_ms"] else None
        mem, ref_mem = r["peak_extra_bytes"], ref and ref["peak_extra_bytes"]
        r["memory_vs_eager"] = mem / ref_mem if mem is not None and ref_mem else None
        r["peak_extra_vs_logits"] = mem / case.logits_bytes if mem is not None else None
        r["copy_gbps"] = copy_result["gbps"] if copy_result else None
        r["pct_of_copy"] = 100 * r["gbps"] / r["copy_gbps"] if r["gbps"] and r["copy_gbps"] else None
