"""The benchmark's outputs: a text table, a markdown table, the JSON document and the plot."""

from __future__ import annotations

import json
import os
import tempfile

SCHEMA = "fused_ls.bench/1"
# fused_ls.bench.workloads.MODES, in table order (this module does not import torch)
MODES = ("fwd+bwd", "fwd", "eval")

COLUMNS = ("case", "mode", "provider", "median ms", "GB/s", "% copy", "speed-up", "extra MB", "extra/logits",
           "mem/eager", "check")


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _gbps(value) -> str:
    return _num(value, ".1f" if value is not None and value < 100 else ".0f")


def _check_cell(r: dict) -> str:
    check = r.get("check")
    if r["provider"] == "eager":
        return "reference"
    if check is None:
        return "error"
    err = max(check["loss_rel_err"], check["grad_rel_err"])
    return f"{'ok' if check['ok'] else 'FAIL'} {err:.0e}"


def table_rows(doc: dict, modes: tuple[str, ...] = MODES) -> list[list[str]]:
    copies = {c["case"]: c for c in doc["copy"]}
    rows = []
    for case in dict.fromkeys(r["case"] for r in doc["results"]):
        for mode in dict.fromkeys(r["mode"] for r in doc["results"] if r["case"] == case and r["mode"] in modes):
            if mode == "fwd+bwd" and case in copies:
                c = copies[case]
                rows.append([case, "", "copy y.copy_(x)", _num(c["median_ms"], ".2f"), _gbps(c["gbps"]),
                             "100", "", "", "", "", ""])
            for r in doc["results"]:
                if r["case"] != case or r["mode"] != mode:
                    continue
                if r["median_ms"] is None:
                    rows.append([case, mode, r["provider"], "-", "-", "-", "-", "-", "-", "-",
                                 _check_cell(r) if r.get("check") else "error"])
                    continue
                mem = r["peak_extra_bytes"]
                rows.append([
                    case, mode, r["provider"], _num(r["median_ms"], ".2f"), _gbps(r["gbps"]),
                    _num(r["pct_of_copy"], ".0f"), _num(r["speedup_vs_eager"], ".2f") + ("x" if r["speedup_vs_eager"] else ""),
                    _num(None if mem is None else mem / 2**20, ".0f"), _num(r["peak_extra_vs_logits"], ".2f"),
                    _num(r["memory_vs_eager"], ".2f"), _check_cell(r),
                ])
    return rows


# Least width of each column of the text table, so that rows printed as they are measured
# (before the later cases' figures are known) line up with the header printed first.
_MIN_WIDTHS = (0, len("fwd+bwd"), len("copy y.copy_(x)"), 9, 5, 6, 8, 8, 12, 9, len("FAIL 1e-01"))


def text_widths(case_names: list[str], providers: list[str], rows: list[list[str]] = ()) -> list[int]:
    """Column widths for the text table: the headers, the cases' and providers' names, the
    least widths above, and any `rows` already formatted."""
    widths = [max(len(c), w) for c, w in zip(COLUMNS, _MIN_WIDTHS)]
    widths[0] = max([widths[0], *map(len, case_names)])
    widths[2] = max([widths[2], *map(len, providers)])
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    return widths


def format_text_row(row: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()


def text_header(widths: list[int]) -> str:
    return format_text_row(list(COLUMNS), widths) + "\n" + "  ".join("-" * w for w in widths)


def text_table(doc: dict) -> str:
    rows = table_rows(doc)
    widths = text_widths(doc["settings"]["cases"], doc["settings"]["providers"], rows)
    return "\n".join([text_header(widths)] + [format_text_row(row, widths) for row in rows])


def markdown_table(doc: dict, modes: tuple[str, ...] = MODES) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(doc, modes)]
    return "\n".join(lines)


def header(doc: dict) -> str:
    env, s = doc["env"], doc["settings"]
    versions = f"torch {env['torch']}, triton {env['triton']}, fused_ls {env['fused_ls']}"
    if env.get("liger_kernel"):
        versions += f", liger-kernel {env['liger_kernel']}"
    where = env["device_name"] + (f" (CUDA {env.get('cuda')})" if env["device"] == "cuda" else
                                  f", {env['torch_threads']} threads")
    lines = [f"{where}; {versions}; {env['date']}",
             (f"median of {s['repeats']} after {s['warmup']} warm-up; label_smoothing={s['label_smoothing']}, "
              "mean reduction; GB/s = (read logits once + write gradient once) / time, fwd and eval: read once")]
    if doc.get("copy_ceiling"):
        c = doc["copy_ceiling"]
        lines.append(f"copy ceiling: {c['gbps']:.1f} GB/s ({c['what']}, {c['bytes_per_copy'] / 2**20:.0f} MiB moved)")
    by_reason: dict[str, list[str]] = {}
    for name, why in doc.get("skipped_providers", {}).items():
        by_reason.setdefault(why, []).append(name)
    lines += [f"not run: {', '.join(names)}: {why}" for why, names in by_reason.items()]
    if doc.get("skipped_cases"):
        lines.append("cases skipped (time budget): " + ", ".join(doc["skipped_cases"]))
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    text = ["# fused_ls benchmark", "", "```", f"{doc['command']}", "```", ""]
    text += [line + "  " for line in header(doc).splitlines()]
    text += ["", markdown_table(doc), "",
             ("speed-up and mem/eager: eager time / time and extra memory / eager's, same case and mode; "
              "% copy: GB/s against y.copy_(x) on the same logits; extra: peak memory beyond the inputs "
              f"({doc['memory_method']}).")]
    return "\n".join(text) + "\n"


def write_atomic(path: str, text: str | bytes) -> None:
    """Write through a temporary file, so an interrupted run never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a report file should have
    os.replace(tmp, path)


def write_json(path: str, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=1) + "\n")


def plot(doc: dict, path: str) -> bool:
    """Time per logit and peak extra memory (in logits' sizes) against V, one line per
    provider, one row of panels per dtype, for fwd+bwd (the headline; fwd when that is all
    there is). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    results = [r for r in doc["results"] if r["median_ms"] is not None]
    modes = {r["mode"] for r in results}
    mode = next((m for m in MODES if m in modes), "fwd+bwd")
    panels = list(dict.fromkeys((r["dtype"], mode) for r in results if r["mode"] == mode))
    if not panels:
        return False
    providers = list(dict.fromkeys(r["provider"] for r in results))
    colours = {p: f"C{i}" for i, p in enumerate(providers)}
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.3 * len(panels)), squeeze=False)
    for (dtype, mode), (ax_time, ax_mem) in zip(panels, axes):
        for provider in providers:
            points = sorted((r["classes"], r["median_ms"] * 1e6 / (r["rows"] * r["classes"]), r["peak_extra_vs_logits"])
                            for r in results if (r["dtype"], r["mode"], r["provider"]) == (dtype, mode, provider))
            if not points:
                continue
            style = {"marker": "o", "color": colours[provider], "label": provider,
                     "linestyle": "--" if provider.endswith("inplace") else "-"}
            ax_time.plot([p[0] for p in points], [p[1] for p in points], **style)
            mem_points = [p for p in points if p[2] is not None]
            if mem_points:
                ax_mem.plot([p[0] for p in mem_points], [p[2] for p in mem_points], **style)
        if mode == "fwd+bwd":
            copies = sorted((c["classes"], c["median_ms"] * 1e6 / (c["rows"] * c["classes"]))
                            for c in doc["copy"] if c["dtype"] == dtype)
            if copies:
                ax_time.plot([c[0] for c in copies], [c[1] for c in copies], color="black", linestyle=":",
                             marker="x", label="copy (y.copy_(x))")
        shapes = ", ".join(sorted({r["case"].split(":")[0] for r in results if (r["dtype"], r["mode"]) == (dtype, mode)},
                                  key=lambda s: int(s.split("x")[1])))
        ax_time.set_title(f"{dtype} {mode}: time ({shapes})", fontsize=9)
        ax_time.set_ylabel("ns per logit (median, log scale)")
        ax_mem.set_title(f"{dtype} {mode}: peak extra memory", fontsize=9)
        ax_mem.set_ylabel("x logits size")
        for ax in (ax_time, ax_mem):
            ax.set_xscale("log")
            ax.set_xlabel("vocabulary size V")
            ax.grid(True, which="both", alpha=0.3)
        ax_time.set_yscale("log")  # ratios between providers read as distances
        ax_time.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_time.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax_time.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_mem.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=8)
    env = doc["env"]
    fig.suptitle(f"fused_ls bench: {env['device_name']}, torch {env['torch']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
