"""smoothed_xent against eager, torch.compile and Liger: time, bandwidth, memory (pytest-benchmark).

    pytest bench                                   the device's default cases, every provider
    pytest bench -k "native and fwd+bwd"           a subset
    pytest bench --benchmark-json=out.json         everything below lands in extra_info

Each benchmark's extra_info: the case, bytes moved, GB/s, % of the copy bandwidth, peak
extra memory, speed-up and memory ratio against eager (same case and mode, measured
earlier in the session), the correctness check against eager, device, versions and date.
Ratios need eager (and test_copy) selected too.
"""

from __future__ import annotations

import pytest

from fused_ls.bench.cases import make_inputs, split_names
from fused_ls.bench.measure import bytes_moved, gbps, peak_extra_memory
from fused_ls.bench.suite import LOSS_BUILDER, ratios
from fused_ls.bench.workload import CopyWorkload
from fused_ls.bench.xent import LABEL_SMOOTHING, LossWorkload, check_against, select_providers


class _Session:
    """What one benchmark leaves for later ones: the copy bandwidth and eager's figures per
    case, the eager reference of the current case, checks and memory readings."""

    def __init__(self):
        self.copy_gbps: dict[str, float] = {}
        self.eager: dict[tuple[str, str], dict] = {}
        self.reference: tuple[str, tuple] | None = None
        self.checks: dict[tuple[str, str], dict] = {}
        self.memory: dict[str, dict[tuple[str, str], dict]] = {}


@pytest.fixture(scope="session")
def session_store() -> _Session:
    return _Session()


def test_copy(benchmark, case, bench_device, bench_seed, run_benchmark, record_env, session_store):
    """The ceiling: y.copy_(x) on the logits moves exactly the fused step's bytes."""
    logits, _ = make_inputs(case, str(bench_device), bench_seed)
    benchmark.group = f"{case.name} fwd+bwd"
    ms = run_benchmark(CopyWorkload(logits))
    nbytes = bytes_moved(case, "fwd+bwd")
    info = {"case": case.name, "provider": "copy", "bytes": nbytes, "median_ms": ms, "gbps": gbps(nbytes, ms)}
    if ms:
        session_store.copy_gbps[case.name] = info["gbps"]
    record_env(info)


def _memory(case, bench_device, bench_seed, pytestconfig, store) -> dict:
    """Peak extra memory of every selected (provider, mode) of the case, measured at its
    first use: on the CPU one subprocess for the whole case."""
    if case.name not in store.memory:
        providers, _ = select_providers(bench_device, split_names(pytestconfig.getoption("--bench-providers")))
        modes = split_names(pytestconfig.getoption("--bench-modes"))
        keys = [(p, m) for p in providers for m in modes]
        jobs = [(LOSS_BUILDER, {"provider": p, "case": case.name, "mode": m, "device": str(bench_device),
                                "seed": bench_seed}) for p, m in keys]
        store.memory = {case.name: dict(zip(keys, peak_extra_memory(bench_device, jobs)))}
    return store.memory[case.name]


def test_loss(benchmark, case, mode, provider, bench_device, bench_seed, run_benchmark, record_env, session_store,
              bench_memory_enabled, pytestconfig):
    logits, target = make_inputs(case, str(bench_device), bench_seed)
    store = session_store
    if store.reference is None or store.reference[0] != case.name:
        store.reference = None  # free the previous case's gradient first
        store.reference = (case.name, LossWorkload("eager", logits, target, LABEL_SMOOTHING).loss_and_grad())
    workload = LossWorkload(provider, logits, target, LABEL_SMOOTHING)
    if (case.name, provider) not in store.checks:
        store.checks[(case.name, provider)] = check_against(workload, store.reference[1], case.dtype)
    check = store.checks[(case.name, provider)]
    assert check["ok"], f"{provider} differs from eager on {case.name}: {check}"

    benchmark.group = f"{case.name} {mode}"
    ms = run_benchmark(workload.mode(mode))
    workload = None
    nbytes = bytes_moved(case, mode)
    info = {"case": case.name, "rows": case.rows, "classes": case.classes, "dtype": case.dtype, "mode": mode,
            "provider": provider, "label_smoothing": LABEL_SMOOTHING, "bytes": nbytes, "median_ms": ms,
            "gbps": gbps(nbytes, ms), "check": check}
    if bench_memory_enabled:
        reading = _memory(case, bench_device, bench_seed, pytestconfig, store)[(provider, mode)]
        info.update(peak_extra_bytes=reading["bytes"], memory_method=reading["method"], memory_error=reading["error"])
    if provider == "eager":
        store.eager[(case.name, mode)] = info
    info.update(ratios(info, store.eager.get((case.name, mode)), store.copy_gbps.get(case.name), case.logits_bytes))
    record_env(info)
