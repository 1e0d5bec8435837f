"""python -m fused_ls bench: time and memory of smoothed_xent against eager PyTorch and others.

By default a representative run of about a minute on a 2-core CPU (two cases, every
provider that runs here); --full runs the whole table. Every provider's loss and gradient
are checked against eager before it is timed. The table's rows are printed as each case
is measured, with ratios against eager; bench.json, bench.md and bench.png go into --out.
The exit status is 1 if any check failed or any provider raised.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from fused_ls.bench import report
from fused_ls.bench.cases import CPU_DEFAULT, CPU_FULL, CUDA_DEFAULT, CUDA_FULL, select_cases, split_names
from fused_ls.bench.measure import copy_ceiling, default_rounds, environment, memory_method
from fused_ls.bench.suite import run_case, units_per_case
from fused_ls.bench.xent import DEFAULT_MODES, LABEL_SMOOTHING, MODES, PROVIDERS, select_providers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_ls bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(f"Default set on CPU: {', '.join(CPU_DEFAULT)}; with --full: {', '.join(CPU_FULL)}.\n"
                f"Default set on CUDA: {', '.join(CUDA_DEFAULT)}; with --full: 16384 x {{32000, 50257, 128256, "
                f"256000}} and 256 x 1000000, bf16 then fp32 ({len(CUDA_FULL)} cases)."))
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--full", action="store_true",
                   help="the whole table (several minutes on a CPU) instead of the representative default set")
    p.add_argument("--shapes", help="comma-separated ROWSxCLASSES[:dtype], e.g. 4096x32000,1024x128256:bf16 "
                   "(replaces the default set)")
    p.add_argument("--dtypes", help="comma-separated dtypes (fp32, bf16, fp16) for shapes that name none")
    p.add_argument("--providers", help=f"comma-separated, from {','.join(PROVIDERS)} (default: all that can run)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma-separated, from fwd+bwd,fwd,eval (default: fwd+bwd,fwd)")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement, median reported (default: 5 cpu, 10 cuda)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 1 cpu, 3 cuda)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--seed", type=int, help="inputs' seed (default: fresh, recorded in the JSON)")
    p.add_argument("--budget-s", type=float, help="start no new case after this many seconds; results so far are kept")
    p.add_argument("--out", default=os.path.join("bench", "out"), help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--no-plot", action="store_true", help="do not write bench.png")
    p.add_argument("--list", action="store_true", help="list the providers and whether they can run here, then exit")
    return p


class _LogProgress:
    """One line per finished step, for logs (no terminal, or no tqdm): a hang shows where."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()

    def set_description(self, text: str) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.label = text

    def update(self, n: int = 1) -> None:
        self.done += n
        print(f"[{self.done}/{self.total} {time.monotonic() - self.started:6.1f}s] {self.label}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int):
    """A tqdm bar on stderr when it is a terminal, else one log line per step; either has
    write(text), which prints a line of the table on stdout at once (above the bar)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _LogProgress(total)
    if not sys.stderr.isatty():
        return _LogProgress(total)
    bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def write(text: str) -> None:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()

    bar.write = write
    return bar


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    try:
        providers, skipped = select_providers(device, split_names(args.providers))
        cases = select_cases(device, args.shapes, args.dtypes, full=args.full)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for name, provider in PROVIDERS.items():
            why = provider.unavailable_reason(device)
            print(f"{name:16} {'runs' if why is None else 'not here'}: {provider.description}"
                  + ("" if why is None else f" [{why}]"))
        return 0
    modes = split_names(args.modes)
    if not modes or any(m not in MODES for m in modes):
        print(f"error: --modes must be a subset of {','.join(MODES)}", file=sys.stderr)
        return 2
    default_warmup, default_repeats = default_rounds(device)
    warmup = args.warmup if args.warmup is not None else default_warmup
    repeats = args.repeats if args.repeats is not None else default_repeats
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    memory = not args.no_memory
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, f"bench.{ext}") for ext in ("json", "md", "png")}

    doc = {
        "schema": report.SCHEMA,
        "command": "python -m fused_ls bench" + ("" if not argv else " " + shlex.join(argv)),
        "env": environment(device),
        "settings": {"device": device.type, "providers": providers, "modes": modes, "cases": [c.name for c in cases],
                     "full": args.full, "repeats": repeats, "warmup": warmup, "seed": seed,
                     "label_smoothing": LABEL_SMOOTHING, "reduction": "mean", "memory": memory},
        "memory_method": memory_method(device) if memory else None,
        "skipped_providers": skipped,
        "skipped_cases": [],
        "copy_ceiling": None,
        "copy": [],
        "results": [],
        "complete": False,
    }
    for name, why in skipped.items():
        print(f"not run: {name}: {why}", file=sys.stderr)
    if not providers:
        print("error: no provider can run here", file=sys.stderr)
        return 2

    started = time.monotonic()
    bar = _progress_bar(sum(units_per_case(len(providers), len(modes), device, memory) for _ in cases))
    widths = report.text_widths(doc["settings"]["cases"], providers)

    def progress(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    status = 0
    try:
        # over the largest case's logits, within 16 MiB (beyond the caches) .. 2 GiB (CUDA) / 256 MiB (CPU)
        largest = max(c.logits_bytes for c in cases)
        doc["copy_ceiling"] = copy_ceiling(device, min(max(largest, 16 << 20), (2 << 30) if device.type == "cuda" else (256 << 20)))
        bar.write(report.header(doc) + "\n\n" + report.text_header(widths))
        for k, case in enumerate(cases):
            if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                doc["skipped_cases"] = [c.name for c in cases[k:]]
                print(f"\ntime budget of {args.budget_s:.0f} s spent: skipping {doc['skipped_cases']}", file=sys.stderr)
                break
            bar.set_description(case.name)
            copy_result, results = run_case(case, providers, modes, device, seed=seed + k, warmup=warmup,
                                            repeats=repeats, memory=memory, progress=progress)
            if copy_result is not None:
                doc["copy"].append(copy_result)
            doc["results"] += results
            report.write_json(paths["json"], doc)  # after every case: an interrupted run keeps what it measured
            case_rows = report.table_rows({"copy": [copy_result] if copy_result else [], "results": results})
            bar.write("\n".join(report.format_text_row(row, widths) for row in case_rows))
        doc["complete"] = not doc["skipped_cases"]
    except KeyboardInterrupt:
        print("\ninterrupted: writing what was measured", file=sys.stderr)
        status = 130
    finally:
        bar.close()
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    report.write_json(paths["json"], doc)
    report.write_atomic(paths["md"], report.markdown(doc))
    wrote = [paths["json"], paths["md"]]
    if not args.no_plot and report.plot(doc, paths["png"]):
        wrote.append(paths["png"])
    if doc["skipped_cases"]:
        print("\ncases skipped (time budget): " + ", ".join(doc["skipped_cases"]))
    failed = [f"{r['case']} {r['provider']} {r['mode']}: {r['error']}" for r in doc["results"] if r["error"]]
    if failed:
        print("\nproblems:\n  " + "\n  ".join(failed))
    print(f"\n{len(doc['results'])} results in {doc['elapsed_s']:.0f} s"
          + ("" if args.full or args.shapes else "; --full for the whole table") + "; wrote " + ", ".join(wrote),
          flush=True)
    return status or (1 if failed else 0)
