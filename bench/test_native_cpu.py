"""The native CPU kernel's targets: against eager PyTorch and torch.compile, in one table.

    pytest bench/test_native_cpu.py                      the table prints at the end
    pytest bench/test_native_cpu.py --bench-rounds 9     more timed rounds per provider

Cases: 4096x32000 fp32, 1024x128256 bf16 and 16384x8192 fp32, forward+backward
(`loss.backward()` included), with 2 threads. Per case, eager F.cross_entropy(label_smoothing=0.1),
its torch.compile, native, native in place (inplace_backward=True) and y.copy_(x) on the same
logits take turns round by round (fused_ls.bench.measure.time_interleaved), so that other jobs
on the machine slow them alike; medians of --bench-rounds (default 5) after a warm-up round.
Peak extra resident memory of each, inputs excluded, in a fresh subprocess (fused_ls.bench.rss).
Each provider is checked against eager before it is timed (fused_ls.bench.workloads).

The table states the CPU targets and whether this run met them:
    native          >= 3.5x eager, >= 1.8x torch.compile, peak extra <= 1.05x the logits
    native in place >= 10x eager, <= 1.3x the copy's time, peak extra <= 2% of the logits
Benchmarks are not tests: nothing fails on a missed target. Results land in
benchmark.extra_info (--benchmark-json) and in bench/out/native_cpu.md and .json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fused_ls.bench.cases import Case, make_inputs, release_inputs
from fused_ls.bench.measure import environment
from fused_ls.bench.suite import run_case
from fused_ls.bench.xent import LABEL_SMOOTHING, LossWorkload, select_providers

CASES = [Case(4096, 32000, "fp32"), Case(1024, 128256, "bf16"), Case(16384, 8192, "fp32")]
PROVIDERS = ["eager", "compile", "native", "native-inplace"]
THREADS = 2
OUT = Path(__file__).resolve().parent / "out"

# (label, provider, what is compared, target, "min" or "max")
TARGETS = [
    ("native vs eager", "native", "speedup_vs_eager", 3.5, "min"),
    ("native vs compile", "native", "speedup_vs_compile", 1.8, "min"),
    ("native peak extra / logits", "native", "peak_extra_vs_logits", 1.05, "max"),
    ("in place vs eager", "native-inplace", "speedup_vs_eager", 10.0, "min"),
    ("in place time / copy time", "native-inplace", "time_vs_copy", 1.3, "max"),
    ("in place peak extra / logits", "native-inplace", "peak_extra_vs_logits", 0.02, "max"),
]


@pytest.fixture(scope="module")
def table(request):
    """Rows collected by the tests, printed (and written to bench/out/) after the last one."""
    rows: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield rows
    torch.set_num_threads(threads)
    if rows:
        text = format_table(rows, environment("cpu") | {"torch_threads": THREADS})
        OUT.mkdir(exist_ok=True)
        (OUT / "native_cpu.md").write_text(text)
        (OUT / "native_cpu.json").write_text(json.dumps(rows, indent=1, default=str))
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("")
            for line in text.splitlines():
                reporter.write_line(line)


# Not named `case`: bench/conftest.py parametrises that name with the device's default set.
@pytest.mark.parametrize("target_case", CASES, ids=[c.name for c in CASES])
def test_native_cpu_against_eager_and_compile(target_case, benchmark, bench_device, bench_seed, bench_rounds,
                                              bench_memory_enabled, run_benchmark, record_env, table):
    if bench_device.type != "cpu":
        pytest.skip("the native CPU targets' table is a CPU benchmark: run it with --bench-device cpu")
    case = target_case
    runnable, skipped = select_providers(torch.device("cpu"), PROVIDERS)
    if "native" not in runnable:
        pytest.skip(skipped["native"])
    warmup, rounds = bench_rounds
    copy, results = run_case(case, runnable, ["fwd+bwd"], torch.device("cpu"), seed=bench_seed, warmup=warmup,
                             repeats=rounds, memory=bench_memory_enabled)
    row = summarise(case, copy, {r["provider"]: r for r in results})
    table.append(row)

    # pytest-benchmark's own statistics: the native step, timed once more on its own.
    logits, target = make_inputs(case, "cpu", bench_seed)
    benchmark.group = f"native CPU targets: {case.name} fwd+bwd"
    run_benchmark(LossWorkload("native", logits, target, LABEL_SMOOTHING).mode("fwd+bwd"))
    logits = target = None
    release_inputs()
    record_env(row)


def summarise(case: Case, copy: dict | None, by_provider: dict[str, dict]) -> dict:
    """One table row: times, memory, ratios and the target verdicts of one case."""
    row = {"case": case.name, "logits_mb": case.logits_bytes / 2**20, "copy_ms": copy and copy["median_ms"],
           "rounds": len(by_provider["native"]["times_ms"] or [])}
    for name, r in by_provider.items():
        row[name] = {key: r.get(key) for key in ("median_ms", "times_ms", "peak_extra_bytes", "peak_extra_vs_logits",
                                                  "speedup_vs_eager", "error", "memory_error")}
    compile_ms = by_provider.get("compile", {}).get("median_ms")
    for name in ("native", "native-inplace"):
        ms = row[name]["median_ms"]
        row[name]["speedup_vs_compile"] = compile_ms / ms if compile_ms and ms else None
        row[name]["time_vs_copy"] = ms / row["copy_ms"] if ms and row["copy_ms"] else None
    row["targets"] = []
    for label, provider, key, target, sense in TARGETS:
        value = row.get(provider, {}).get(key)
        met = None if value is None else (value >= target if sense == "min" else value <= target)
        row["targets"].append({"target": label, "value": value, "bound": target, "sense": sense, "met": met})
    return row


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mem(value) -> str:  # in units of the logits; in place must stay under 0.02
    return "-" if value is None else f"{value:.3f}x"


def format_table(rows: list[dict], env: dict) -> str:
    lines = [
        "## Native CPU kernel, forward+backward, against its targets",
        "",
        (f"{env['cpu']}, {env['cpu_count']} cores, {THREADS} threads; torch {env['torch']}, Python {env['python']}; "
         f"fused_ls {env['fused_ls']} ({env.get('git_commit') or 'no git'}); {env['date']}. Medians of "
         f"{rows[0]['rounds']} rounds taken in turns with the copy; peak extra RSS in a fresh subprocess "
         "(x logits)."),
        "",
        ("| case | eager ms | compile ms | native ms | in place ms | copy ms | native vs eager | vs compile "
         "| in place vs eager | in place / copy | eager mem | native mem | in place mem |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:

        def get(provider, key, r=r):
            return r.get(provider, {}).get(key)

        lines.append(
            f"| {r['case']} | {_ms(get('eager', 'median_ms'))} | {_ms(get('compile', 'median_ms'))} "
            f"| {_ms(get('native', 'median_ms'))} | {_ms(get('native-inplace', 'median_ms'))} | {_ms(r['copy_ms'])} "
            f"| {_x(get('native', 'speedup_vs_eager'))} | {_x(get('native', 'speedup_vs_compile'))} "
            f"| {_x(get('native-inplace', 'speedup_vs_eager'))} | {_x(get('native-inplace', 'time_vs_copy'))} "
            f"| {_mem(get('eager', 'peak_extra_vs_logits'))} | {_mem(get('native', 'peak_extra_vs_logits'))} "
            f"| {_mem(get('native-inplace', 'peak_extra_vs_logits'))} |"
        )
    lines += ["", "| target | " + " | ".join(r["case"] for r in rows) + " |",
              "| --- |" + " ---: |" * len(rows)]
    for i, (label, _, _, bound, sense) in enumerate(TARGETS):
        cells = []
        for r in rows:
            t = r["targets"][i]
            cells.append("-" if t["value"] is None else f"{t['value']:.3g} {'met' if t['met'] else 'MISSED'}")
        lines.append(f"| {label} {'>=' if sense == 'min' else '<='} {bound} | " + " | ".join(cells) + " |")
    errors = [f"{r['case']} {p}: {r[p]['error'] or r[p]['memory_error']}" for r in rows for p in PROVIDERS
              if p in r and (r[p]["error"] or r[p]["memory_error"])]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"
