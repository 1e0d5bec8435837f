"""Fixtures for `pytest bench` (pytest-benchmark): devices, cases, providers, timing, memory.

Every benchmark module in bench/ can use these. What is measured and how (cases, providers,
workloads, timing in turns, memory, checks) is imported from fused_ls.bench, the same code
`python -m fused_ls bench` runs; this folder adds pytest-benchmark's front end only.

Options (pytest bench --help, group "fused_ls bench"):
    --bench-device cpu|cuda      default: cuda if available
    --bench-full                 the whole table instead of the representative default set
    --bench-shapes 4096x32000,1024x128256:bf16   default: the device's set (fused_ls.bench.cases)
    --bench-dtypes fp32,bf16     dtypes for shapes that name none
    --bench-providers eager,native,...           default: every registered provider
    --bench-modes fwd+bwd,fwd    default: both; eval: under torch.no_grad()
    --bench-rounds N             timed rounds (median reported); default 5 cpu, 10 cuda
                                 (fused_ls.bench.measure.default_rounds)
    --bench-no-memory            skip peak-memory measurements

Fixtures for other modules:
    bench_device                 torch.device the benchmarks run on
    case, provider, mode         parametrised by the options above (a test that names them
                                 gets one run per value; unavailable providers are skipped
                                 with the reason)
    bench_seed                   inputs' seed for this session (printed)
    run_benchmark(workload)      times prepare()/step() with benchmark.pedantic (prepare
                                 untimed, CUDA synchronised), returns the median in ms
    record_env(extra=None)       writes device, versions and date (+ extra) into
                                 benchmark.extra_info
    peak_memory(builder, **kw)   peak extra bytes of a workload built by the importable
                                 'module:function' builder (CPU: in a fresh subprocess)
"""

from __future__ import annotations

import os

import pytest
import torch

from fused_ls.bench.cases import select_cases, split_names
from fused_ls.bench.measure import default_rounds, environment, peak_extra_memory
from fused_ls.bench.workload import as_workload
from fused_ls.bench.xent import DEFAULT_MODES, PROVIDERS, select_providers


def pytest_addoption(parser):
    group = parser.getgroup("fused_ls bench")
    group.addoption("--bench-device", choices=("cpu", "cuda"), help="device to benchmark on")
    group.addoption("--bench-full", action="store_true", help="the whole table (default: the representative set)")
    group.addoption("--bench-shapes", help="ROWSxCLASSES[:dtype],... (default: the device's set)")
    group.addoption("--bench-dtypes", help="dtypes for shapes that name none, e.g. fp32,bf16")
    group.addoption("--bench-providers", help=f"subset of {','.join(PROVIDERS)}")
    group.addoption("--bench-modes", default=",".join(DEFAULT_MODES), help="subset of fwd+bwd,fwd,eval")
    group.addoption("--bench-rounds", type=int, help="timed rounds per benchmark")
    group.addoption("--bench-no-memory", action="store_true", help="skip peak-memory measurements")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device = _device(config)
    # case outermost and provider innermost, so eager runs first within each case and mode
    if "case" in metafunc.fixturenames:
        cases = select_cases(device, config.getoption("--bench-shapes"), config.getoption("--bench-dtypes"),
                             full=config.getoption("--bench-full"))
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", split_names(config.getoption("--bench-modes")))
    if "provider" in metafunc.fixturenames:
        runnable, skipped = select_providers(device, split_names(config.getoption("--bench-providers")))
        params = [name if name in runnable else pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {skipped[name]}"))
                  for name in (split_names(config.getoption("--bench-providers")) or list(PROVIDERS))]
        metafunc.parametrize("provider", params)


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"bench inputs seed {seed}")
    return seed


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_device) -> tuple[int, int]:
    """(warm-up rounds, timed rounds)."""
    warmup, rounds = default_rounds(bench_device)
    return warmup, pytestconfig.getoption("--bench-rounds") or rounds


@pytest.fixture(scope="session")
def bench_memory_enabled(pytestconfig) -> bool:
    return not pytestconfig.getoption("--bench-no-memory")


@pytest.fixture(scope="session")
def bench_environment(bench_device) -> dict:
    return environment(bench_device)


@pytest.fixture
def record_env(benchmark, bench_environment):
    """record_env(extra=None): device, versions, date (and `extra`) into benchmark.extra_info."""

    def record(extra: dict | None = None) -> None:
        benchmark.extra_info.update(bench_environment)
        if extra:
            benchmark.extra_info.update(extra)

    return record


@pytest.fixture
def run_benchmark(benchmark, bench_device, bench_rounds):
    """run_benchmark(workload) -> median ms (None with --benchmark-disable).

    `workload` has step() and optionally prepare(); prepare() runs untimed before every
    round; on CUDA both are followed by a synchronisation so the timer sees the device work."""
    warmup, rounds = bench_rounds
    cuda = bench_device.type == "cuda"

    def run(workload) -> float | None:
        workload = as_workload(workload)

        def setup():
            workload.prepare()
            if cuda:
                torch.cuda.synchronize(bench_device)

        def step():
            workload.step()
            if cuda:
                torch.cuda.synchronize(bench_device)

        benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if benchmark.disabled or benchmark.stats is None:
            return None
        return benchmark.stats.stats.median * 1e3

    return run


@pytest.fixture
def peak_memory(bench_device):
    """peak_memory(builder, **kwargs) -> peak extra bytes of the workload the importable
    'module:function' builder returns for kwargs (see fused_ls.bench.measure.peak_extra_memory)."""

    def measure(builder: str, **kwargs) -> int:
        (reading,) = peak_extra_memory(bench_device, [(builder, kwargs)])
        if reading["error"]:
            raise RuntimeError(f"memory of {builder}({kwargs}): {reading['error']}")
        return reading["bytes"]

    return measure
