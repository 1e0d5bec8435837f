"""Peak extra resident memory of CPU workloads, measured in a fresh subprocess.

Why a subprocess: the resident set of the benchmarking process carries everything it did
before (earlier cases, compiled code, freed pages glibc kept), so its peak says little.
A fresh interpreter imports the builder, makes the inputs, runs one warm-up step (thread
pools, compilation, first-touch of library state), and then for the measured step:

    before = VmRSS                      inputs and everything warm are resident by now
    write "5" to /proc/self/clear_refs  resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
    step()
    extra  = VmHWM - before             pages touched beyond the inputs at the high point

glibc is told to serve every allocation of 64 KiB or more with its own mmap
(MALLOC_MMAP_THRESHOLD_), so freed buffers leave the resident set at once and one job's
memory is not reused by the next: several jobs share one subprocess. Counted are pages
actually touched, which is what a tensor costs once it is written.

Child protocol: a JSON list of [builder, kwargs] on stdin; one line per job on stdout,
"RSS-RESULT {json}".
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys

from fused_ls.bench.workload import as_workload, resolve_builder

METHOD = ("peak RSS (VmHWM) of one step in a fresh subprocess minus RSS just before it, after a warm-up "
          "step; the peak reset through /proc/self/clear_refs; glibc mmap threshold 64 KiB")
_MARK = "RSS-RESULT "


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_jobs(jobs: list[tuple[str, dict]], timeout_s: float = 900) -> list[dict]:
    """Run the jobs in one fresh interpreter; one {"bytes", "method", "error"} per job."""
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if os.path.isdir(p))
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    payload = json.dumps([[builder, kwargs] for builder, kwargs in jobs])
    failed = lambda why: [{"bytes": None, "method": METHOD, "error": why} for _ in jobs]
    try:
        proc = subprocess.run([sys.executable, "-m", "fused_ls.bench.rss"], input=payload, env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return failed(f"memory subprocess exceeded {timeout_s:.0f} s")
    results = [json.loads(line[len(_MARK):]) for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if len(results) != len(jobs):
        tail = (proc.stderr or proc.stdout)[-2000:]
        return results + failed(f"memory subprocess exited {proc.returncode} after {len(results)} job(s): {tail}")[len(results):]
    return results


def _measure_one(builder: str, kwargs: dict) -> dict:
    workload = as_workload(resolve_builder(builder)(**kwargs))
    workload.prepare()
    workload.step()
    gc.collect()
    workload.prepare()
    before = _status_kib("VmRSS")
    _reset_peak()
    result = workload.step()
    peak = _status_kib("VmHWM")
    del result, workload
    gc.collect()
    return {"bytes": max(0, peak - before) * 1024, "method": METHOD, "error": None}


def _child() -> int:
    jobs = json.loads(sys.stdin.read())
    try:
        _reset_peak()
    except OSError as exc:
        why = f"cannot reset the peak RSS (/proc/self/clear_refs: {exc})"
        for _ in jobs:
            print(_MARK + json.dumps({"bytes": None, "method": METHOD, "error": why}), flush=True)
        return 0
    for builder, kwargs in jobs:
        try:
            result = _measure_one(builder, kwargs)
        except Exception as exc:  # noqa: BLE001  (reported; the next job still runs)
            result = {"bytes": None, "method": METHOD, "error": f"{type(exc).__name__}: {exc}"}
        print(_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
