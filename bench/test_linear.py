"""The fused linear head against the materialised path and torch's F.linear_cross_entropy.

    pytest bench/test_linear.py -s                      the target cases (heavy on a CPU)
    FUSED_LS_BENCH_LINEAR_SHAPES=1024x1024x32064 FUSED_LS_BENCH_LINEAR_DTYPES=bf16 \
        pytest bench/test_linear.py -s --bench-rounds 3  a scaled case
    FUSED_LS_BENCH_LINEAR_OUT=linear.md ...             also write the table there

One step = forward + backward for hidden and weight, mean loss, label_smoothing 0.1, no
bias, every target valid. Per case and provider: median time (pytest-benchmark), peak
extra memory, and a check against the materialised path (norm-wise relative difference
of the loss and both gradients). "Peak extra" is the step's peak above the inputs
(bench/conftest's peak_memory: RSS in a fresh subprocess on the CPU, the caching allocator
on CUDA) minus the gradients every provider returns (dL/dh and dL/dW in the inputs' dtype),
so it counts what a provider needs beyond its inputs and its outputs. The providers, the
step, the check and the memory builder are in fused_ls.bench.linear_head.

pytest-benchmark times one provider after another, so a change in the machine's load between
two tests falls on one provider only. test_linear_head_in_turns therefore times every provider
of a case again, taking turns round by round (fused_ls.bench.measure.time_interleaved, as
`python -m fused_ls bench` does): its second table is the one to read the time ratios from on
a shared machine. Select one kind with -k "in_turns" or -k "not in_turns".

The targets, read off the tables printed at the end: fused_ls's peak extra at most 1/8
of the materialised path's and no more than torch's; its time no worse than the materialised
path's and better than torch's. Benchmarks report; they do not assert speed.
"""

from __future__ import annotations

import os

import pytest

from fused_ls.bench.linear_head import BUILDER, PROVIDERS, TOLERANCE, HeadCase, HeadWorkload, relative_difference
from fused_ls.bench.measure import median, time_interleaved

SHAPES = os.environ.get("FUSED_LS_BENCH_LINEAR_SHAPES", "4096x1024x128256,8192x512x32000").split(",")
DTYPE_NAMES = os.environ.get("FUSED_LS_BENCH_LINEAR_DTYPES", "fp32,bf16").split(",")
CASES = [HeadCase.parse(shape, dtype) for shape in SHAPES for dtype in DTYPE_NAMES]
REFERENCE = "materialised"


class _Results:
    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = {}
        self.turns: dict[tuple[str, str], float | str] = {}  # median seconds in turns, or why none
        self.reference: tuple[str, tuple] | None = None
        self.env: dict = {}


@pytest.fixture(scope="module")
def results():
    store = _Results()
    yield store
    tables = [_table(store.rows, store.env)] if store.rows or not store.turns else []
    if store.turns:
        tables.append(_turns_table(store.turns, store.env))
    table = "\n\n".join(tables)
    print("\n" + table)
    out = os.environ.get("FUSED_LS_BENCH_LINEAR_OUT")
    if out:
        with open(out, "w") as f:
            f.write(table + "\n")


# (conftest parametrises fixtures named case/provider for smoothed_xent: these are head_*)
@pytest.mark.parametrize("head_provider", list(PROVIDERS))
@pytest.mark.parametrize("head_case", CASES, ids=[c.name for c in CASES])
def test_linear_head(benchmark, head_case, head_provider, bench_device, bench_seed, run_benchmark, record_env, peak_memory,
                     bench_memory_enabled, bench_environment, results):
    case, provider = head_case, head_provider
    why_not = PROVIDERS[provider].unavailable_reason(bench_device)
    if why_not:
        pytest.skip(why_not)
    benchmark.group = f"linear {case.name}"
    workload = HeadWorkload(provider, case, bench_device, bench_seed)

    check = None
    if provider == REFERENCE:
        results.reference = None  # free the previous case's gradients first
        results.reference = (case.name, workload.step())
    elif PROVIDERS[provider].label_smoothing == PROVIDERS[REFERENCE].label_smoothing and results.reference \
            and results.reference[0] == case.name:
        check = relative_difference(workload.step(), results.reference[1])
        assert check <= TOLERANCE[case.dtype], f"{provider} differs from {REFERENCE} on {case.name}: {check:.2e}"

    ms = run_benchmark(workload)
    workload = None
    info = {"case": case.name, "provider": provider, "description": PROVIDERS[provider].description,
            "median_ms": ms, "check_rel_diff": check}
    if bench_memory_enabled:
        peak = peak_memory(BUILDER, provider=provider, tokens=case.tokens, hidden=case.hidden,
                           vocab=case.vocab, dtype=case.dtype, device=str(bench_device), seed=bench_seed)
        info["peak_bytes"] = peak
        info["peak_extra_bytes"] = max(0, peak - case.gradient_bytes)
    info["logits_bytes"] = case.logits_bytes
    results.rows[(case.name, provider)] = info
    record_env(info)
    results.env = bench_environment


@pytest.mark.parametrize("head_case", CASES, ids=[c.name for c in CASES])
def test_linear_head_in_turns(head_case, bench_device, bench_seed, bench_rounds, bench_environment, results):
    """Every available provider of one case, timed in turns (warm-up rounds, then timed ones)."""
    available = [name for name, p in PROVIDERS.items() if not p.unavailable_reason(bench_device)]
    workloads = {name: HeadWorkload(name, head_case, bench_device, bench_seed) for name in available}
    warmup, rounds = bench_rounds
    times, failed = time_interleaved(workloads, bench_device, warmup, rounds)
    workloads = None
    for name in available:
        if name in failed:
            results.turns[(head_case.name, name)] = f"failed: {type(failed[name]).__name__}"
        else:
            results.turns[(head_case.name, name)] = median(times[name]) / 1e3
    results.env = bench_environment
    assert not failed, failed


def _turns_table(turns: dict[tuple[str, str], float | str], env: dict) -> str:
    lines = [
        f"In turns (the providers of a case alternating, round by round; {env.get('date')}, commit "
        f"{env.get('git_commit')}):",
        "",
        "| case | provider | median s in turns | vs materialised | vs torch-lce-chunked |",
        "|---|---|---:|---:|---:|",
    ]
    for (case, provider), seconds in turns.items():
        if isinstance(seconds, str):
            lines.append(f"| {case} | {provider} | {seconds} | - | - |")
            continue
        cells = []
        for other in (REFERENCE, "torch-lce-chunked"):
            base = turns.get((case, other))
            cells.append(f"{seconds / base:.2f}x" if isinstance(base, float) and base else "-")
        lines.append(f"| {case} | {provider} | {seconds:.3g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _table(rows: dict[tuple[str, str], dict], env: dict) -> str:
    if not rows:
        return "(no linear-head results)"
    header = (f"{env.get('date')}; {env.get('device_name')} ({env.get('device')}, {env.get('torch_threads')} "
              f"threads); torch {env.get('torch')}, triton {env.get('triton')}, fused_ls {env.get('fused_ls')} "
              f"(backends {env.get('fused_ls_backends')}), commit {env.get('git_commit')}")
    columns = ("| case | provider | median s | vs materialised | vs torch-lce-chunked | peak extra MiB "
               "| extra / materialised's | extra / torch-chunked's | check vs materialised |")
    lines = [
        header,
        "",
        columns,
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (case, provider), info in rows.items():
        ref = rows.get((case, REFERENCE), {})
        chunked = rows.get((case, "torch-lce-chunked"), {})

        def ratio(key, other, info=info):
            a, b = info.get(key), other.get(key)
            return f"{a / b:.2f}x" if a is not None and b else "-"

        seconds = "-" if info["median_ms"] is None else f"{info['median_ms'] / 1e3:.2f}"
        extra = info.get("peak_extra_bytes")
        extra_mib = "-" if extra is None else f"{extra / 2**20:.0f}"
        check = info["check_rel_diff"]
        verdict = "reference" if provider == REFERENCE else ("eps=0: n/a" if check is None else f"ok {check:.1e}")
        lines.append(
            f"| {case} | {provider} | {seconds} | {ratio('median_ms', ref)} | {ratio('median_ms', chunked)} "
            f"| {extra_mib} | {ratio('peak_extra_bytes', ref)} | {ratio('peak_extra_bytes', chunked)} | {verdict} |"
        )
    return "\n".join(lines)
