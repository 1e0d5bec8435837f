"""One case, every provider, every mode: check, time, memory, ratios. Used by the CLI and by
bench/test_native_cpu.py; bench/test_smoothed_xent.py derives its ratios with `ratios`.

Order within a case: the eager reference (loss and gradient); each provider checked
against it (one that fails or raises is reported with its error and not timed); then per
mode all checked providers, and for fwd+bwd the copy baseline, timed taking turns (see
measure.time_interleaved: on a shared machine their ratios stay fair); on CUDA the memory
of each (provider, mode) after its timing, on the CPU in one subprocess at the end.
Providers that overwrite their input share one scratch copy of the logits.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from fused_ls.bench.cases import Case, make_inputs, release_inputs
from fused_ls.bench.measure import (
    CUDA_MEMORY_METHOD,
    bytes_moved,
    cuda_peak_extra,
    gbps,
    median,
    peak_extra_memory,
    time_interleaved,
)
from fused_ls.bench.workload import CopyWorkload
from fused_ls.bench.xent import LABEL_SMOOTHING, PROVIDERS, LossWorkload, check_against

LOSS_BUILDER = "fused_ls.bench.xent:loss_workload"
_COPY = "copy"


def units_per_case(n_providers: int, n_modes: int, device: torch.device, memory: bool) -> int:
    """Progress units run_case reports: each provider's check, each mode's timing, and the
    CPU memory subprocess."""
    return n_providers + n_modes + (1 if memory and device.type != "cuda" else 0)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:500]


def run_case(case: Case, providers: list[str], modes: list[str], device: torch.device, *, seed: int,
             warmup: int, repeats: int, memory: bool = True,
             progress: Callable[[str], None] = lambda label: None) -> tuple[dict | None, list[dict]]:
    """(the copy baseline, one result per (provider, mode)) for `case` on `device`."""
    logits, target = make_inputs(case, str(device), seed)

    reference = LossWorkload("eager", logits, target, LABEL_SMOOTHING).loss_and_grad()
    scratch = logits.clone() if any(PROVIDERS[name].overwrites_input for name in providers) else None
    workloads: dict[str, LossWorkload] = {}
    checks: dict[str, dict | None] = {}
    errors: dict[str, str] = {}
    for name in providers:
        try:
            workload = LossWorkload(name, logits, target, LABEL_SMOOTHING, scratch=scratch)
            checks[name] = check_against(workload, reference, case.dtype)
            if checks[name]["ok"]:
                workloads[name] = workload
            else:
                errors[name] = "result differs from eager beyond tolerance: not timed"
        except Exception as exc:  # noqa: BLE001  (a provider that raises is reported, the others go on)
            checks[name], errors[name] = None, _error(exc)
            _release(device)
        workload = None
        progress(f"{case.name} {name} check")
    reference = None
    _release(device)

    results: list[dict] = []
    copy_result = None
    for mode in modes:
        contenders = {name: w.mode(mode) for name, w in workloads.items()}
        if mode == "fwd+bwd":  # the copy moves exactly the fwd+bwd bytes: the ceiling, timed alongside
            contenders[_COPY] = CopyWorkload(logits)
        times, failed = time_interleaved(contenders, device, warmup, repeats)
        if _COPY in times:
            ms = median(times[_COPY])
            copy_result = {"case": case.name, "rows": case.rows, "classes": case.classes, "dtype": case.dtype,
                           "bytes": bytes_moved(case, mode), "median_ms": ms, "gbps": gbps(bytes_moved(case, mode), ms)}
        contenders.pop(_COPY, None)
        for name in providers:
            result = {"case": case.name, "rows": case.rows, "classes": case.classes, "dtype": case.dtype,
                      "provider": name, "mode": mode, "bytes": bytes_moved(case, mode), "check": checks[name],
                      "error": errors.get(name) or (_error(failed[name]) if name in failed else None),
                      "median_ms": None, "times_ms": None, "gbps": None, "peak_extra_bytes": None,
                      "memory_method": None}
            if name in times:
                ms = median(times[name])
                result.update(median_ms=ms, times_ms=times[name], gbps=gbps(result["bytes"], ms))
                if memory and device.type == "cuda":
                    try:
                        result.update(peak_extra_bytes=cuda_peak_extra(contenders[name], device),
                                      memory_method=CUDA_MEMORY_METHOD)
                    except Exception as exc:  # noqa: BLE001  (reported beside the timing)
                        result["memory_error"] = _error(exc)
                        _release(device)
            results.append(result)
        contenders = None
        _release(device)
        progress(f"{case.name} {mode}")
    workloads = scratch = None
    _release(device)

    if memory and device.type != "cuda":
        measured = [r for r in results if r["median_ms"] is not None]
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
    """`ratios` for every result of one case, against eager's result of the same mode."""
    eager = {r["mode"]: r for r in results if r["provider"] == "eager" and r["median_ms"]}
    for r in results:
        r.update(ratios(r, eager.get(r["mode"]), copy_result and copy_result["gbps"], case.logits_bytes))


def ratios(result: dict, eager: dict | None, copy_gbps: float | None, logits_bytes: int) -> dict:
    """Speed-up and memory ratio against `eager` (the same case and mode), fraction of the
    copy bandwidth, and peak extra memory in units of the logits' size. `result` and `eager`
    hold median_ms, gbps and peak_extra_bytes (each may be None)."""
    ms, mem = result.get("median_ms"), result.get("peak_extra_bytes")
    ref_ms = eager and eager.get("median_ms")
    ref_mem = eager and eager.get("peak_extra_bytes")
    return {
        "speedup_vs_eager": ref_ms / ms if ref_ms and ms else None,
        "memory_vs_eager": mem / ref_mem if mem is not None and ref_mem else None,
        "peak_extra_vs_logits": mem / logits_bytes if mem is not None else None,
        "copy_gbps": copy_gbps,
        "pct_of_copy": 100 * result["gbps"] / copy_gbps if result.get("gbps") and copy_gbps else None,
    }
