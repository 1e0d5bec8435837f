"""Compile every Triton kernel configuration our launchers choose for real NVIDIA GPUs, with no GPU.

    python tests/triton_targets.py [--arch 80 90 100] [--json OUT]

A stand-in driver reports a CUDA target; a JIT cache hook catches each launch the launchers
make (their real choice of block, warps and specialisation, from CPU tensors of the right
shapes) and stops it before anything runs; each caught configuration is then compiled by
Triton's full pipeline for each architecture, and the bundled ptxas reports its registers,
spills and shared memory. Exits 1 on a compile error or a spill of more than SPILL_LIMIT
bytes a thread. Run it without TRITON_INTERPRET (the interpreter replaces the compiler).

`--markdown OUT` writes the resource table (registers, spills, shared memory, warps, resident
programs per SM) that docs/traffic-model.md reads its occupancy from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# ptxas keeps 8-warp programs within 128 registers (two resident an SM) and then parks a few
# 4-byte values in local memory, which stays in L1; the amount moves with the architecture
# and with unrelated code. A handful of such slots is its trade-off, not register pressure
# out of hand: more than this many bytes a thread fails.
SPILL_LIMIT = 16

# Vocabulary sizes that reach each launcher configuration, LLM vocabularies included.
VOCABULARIES = (1000, 4096, 16384, 32000, 50257, 128256, 256000)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _ReportedTarget:
    """Just enough of a Triton driver to say which GPU to compile for."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def caught_launches(vocabularies=VOCABULARIES, dtypes=DTYPES) -> list[dict]:
    """The (kernel, signature, constants, options) of every launch the launchers and the tuner
    can make: every candidate launch for each vocabulary, dtype and feature set."""
    from fused_ls.triton import linear as linear_kernels
    from fused_ls.triton import smoothed_xent as row_kernels

    launches: dict[str, dict] = {}

    def catch(*, key, repr, fn, compile, **_):
        launches.setdefault(str(key), {"fn": fn.jit_function, "repr": describe(fn.jit_function, compile), **compile})
        return True  # compiled by us below, for every architecture; nothing is launched

    knobs.runtime.jit_cache_hook = catch
    try:
        for dtype in dtypes:
            for V in vocabularies:
                logits = torch.empty(2, V, dtype=dtype)
                target = torch.zeros(2, dtype=torch.int64)
                rows = torch.empty(2, dtype=torch.float32)
                one = torch.ones((), dtype=torch.float32)
                for weight in (None, torch.ones(V)):
                    weight_sum = None if weight is None else one
                    for softcap in (0.0, 30.0):
                        for config, predicted in itertools.chain(
                                ((c, None) for c in row_kernels.candidate_configs(
                                    V, dtype, weight is not None, softcap > 0, split=True)),
                                ((c, torch.empty(2, dtype=torch.int64)) for c in row_kernels.candidate_configs(
                                    V, dtype, weight is not None, softcap > 0, split=True, predict=True))):
                            for grad in (torch.empty_like(logits), None):
                                args = (logits, target, weight, weight_sum, one if grad is not None else None, grad,
                                        rows, rows.clone(), 0.1 / V, 0.9, -100, 0.0, softcap, 1.0)
                                if config.kind == "split":  # the one cooperative launch a GPU makes
                                    row_kernels._launch_split(*args, config, phases=(0,), predicted_out=predicted)
                                else:
                                    row_kernels.smoothed_xent_rows_out(*args, predicted_out=predicted, config=config)
                        for grad, predicted in itertools.product((torch.empty_like(logits), None),
                                                                 (None, torch.empty(2, dtype=torch.int64))):
                            row_kernels.given_lse_rows_out(logits, target, weight, weight_sum,
                                                           one if grad is not None else None, grad, rows,
                                                           rows.clone(), rows.clone(), 0.1 / V, 0.9, -100, 0.0,
                                                           softcap, 1.0, predicted=predicted)
                row_kernels.scale_rows_(logits, torch.ones(2))
            linear_kernels.compensated_add_(torch.empty(4096, dtype=dtype), torch.empty(4096, dtype=torch.bfloat16),
                                            torch.empty(4096), False)
    finally:
        knobs.runtime.jit_cache_hook = None
    return list(launches.values())


def describe(fn, compile: dict) -> str:
    """The kernel, its logits' element type, its constexpr choices and its warps."""
    names = fn.arg_names
    element = compile["signature"].get(names[0], "?").lstrip("*")
    flags = []
    for (index, *_), value in compile["constants"].items():
        name = names[index]
        if name.isupper() and name != "ACC":
            flags.append(f"{name}={int(value) if isinstance(value, bool) else value}")
    return f"{fn.__name__} {element} {' '.join(flags)} warps={compile['num_warps']}"


# Resident programs per SM that the registers, threads and shared memory allow (sm_80 to
# sm_100: 64K registers, 2048 threads, 32 blocks; registers allocated per warp in units of 256).
def programs_per_sm(registers: int, num_warps: int, shared_bytes: int, shared_per_sm: int = 227 * 1024) -> int:
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    limits = [65536 // (per_warp * num_warps), 2048 // (32 * num_warps), 32]
    if shared_bytes:
        limits.append(shared_per_sm // shared_bytes)
    return min(limits)


def resources(ptx: str, arch: int) -> dict:
    """Registers, spills and shared memory of one kernel, from ptxas -v."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        ptxas = nvidia.get_ptxas(arch).path
    except TypeError:  # Triton versions whose get_ptxas takes no architecture
        ptxas = nvidia.get_ptxas().path
    gpu_name = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)  # sm_90a where Triton chose it
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", str(source), "-o", str(Path(tmp) / "k.o")],
                                capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    text = result.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {
        # Global accesses in the PTX by width: 16-byte vectors, and the 2-byte scalars that mean a
        # bf16/fp16 row is read element by element (beyond the target's logit and the edges of an aligned
        # row, one load and one store).
        "wide_accesses": len(re.findall(r"\b(?:ld|st)\.global(?:\.[\w:]+)*\.v4\.b32\b", ptx)),
        "b16_accesses": len(re.findall(r"\b(?:ld|st)\.global(?:\.[\w:]+)*\.b16\b", ptx)),
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared_bytes": number(r"(\d+) bytes smem"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90, 100])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--vocabularies", type=int, nargs="+", default=list(VOCABULARIES))
    parser.add_argument("--dtypes", nargs="+", default=[str(d).replace("torch.", "") for d in DTYPES])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2

    rows, failures = [], []
    for arch in args.arch:
        triton.runtime.driver.set_active(_ReportedTarget(arch))
        for launch in caught_launches(args.vocabularies, [getattr(torch, d) for d in args.dtypes]):
            options = {k: launch[k] for k in ("num_warps", "num_ctas", "num_stages", "launch_cooperative_grid")
                       if k in launch}
            name = launch["repr"]
            try:
                source = ASTSource(launch["fn"], launch["signature"], launch["constants"], launch["configs"][0])
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                row = {"arch": arch, "kernel": name, "num_warps": options["num_warps"],
                       **resources(compiled.asm["ptx"], arch)}
                row["programs_per_sm"] = programs_per_sm(row["registers"], row["num_warps"], row["shared_bytes"])
            except Exception as exc:  # noqa: BLE001  (every failure is reported, then the exit code says so)
                failures.append(f"sm_{arch} {name}: {type(exc).__name__}: {str(exc)[:500]}")
                continue
            rows.append(row)
            if row["spill_stores"] > SPILL_LIMIT or row["spill_loads"] > SPILL_LIMIT:
                failures.append(f"sm_{arch} {name}: spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    for row in rows:
        print(f"sm_{row['arch']:<4} regs {row['registers']:>3}  spills {row['spill_stores']:>4}/{row['spill_loads']:<4} "
              f"smem {row['shared_bytes']:>6}  per SM {row['programs_per_sm']:>2}  {row['kernel'][:150]}")
    print(f"{len(rows)} kernel configurations compiled for sm_{', sm_'.join(map(str, args.arch))}; "
          f"{len(failures)} failures")
    for failure in failures:
        print("FAILED", failure)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        lines = ["| arch | kernel | registers | spill bytes (stored/loaded) | shared bytes | programs per SM |",
                 "|---|---|---:|---:|---:|---:|"]
        lines += [f"| sm_{r['arch']} | {r['kernel']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                  f"{r['shared_bytes']} | {r['programs_per_sm']} |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
