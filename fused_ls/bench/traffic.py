"""A DRAM-traffic model of the Triton launches: bytes per logit, rows in flight against L2,
and bytes in flight per SM against what the memory system needs, for a GPU's published figures.

    python -m fused_ls.bench.traffic [--resources sm90.json]   # the table of docs/traffic-model.md

Two bounds, each a fraction of the copy bandwidth (y.copy_(x) moves 2b bytes per logit: one
read, one write):
- traffic: 2b / (the DRAM bytes the launch moves per logit). A second read of a row costs DRAM
  traffic unless the rows in flight fit 3/4 of L2.
- latency (Little's law): bytes in flight per SM / (bandwidth x latency / SMs). A streamed or
  persistent program over chunks of 4096 2-byte logits issues each chunk's load one chunk ahead
  of its use, so two chunks are in flight (at most the row); other chunked programs have one chunk
  in flight; a row or segment held in registers is in flight whole.
The prediction is the smaller. Resident programs per SM come from the registers that ptxas
reports (tests/triton_targets.py --json), without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    l2_bytes: int
    bandwidth: float  # bytes/s, the vendor's peak
    latency: float  # s, a loaded DRAM access (an assumption; see docs/traffic-model.md)


# Published figures: NVIDIA H100 SXM5 and H200 SXM datasheets (132 SMs, 50 MB L2, 3.35 and
# 4.8 TB/s). The latency is an assumption: about 600 ns for a DRAM access under load.
GPUS = {
    "H100": Gpu("H100 SXM", 132, 50 * 2**20, 3.35e12, 600e-9),
    "H200": Gpu("H200 SXM", 132, 50 * 2**20, 4.8e12, 600e-9),
}
VOCABULARIES = (32000, 50257, 128256, 151936, 256000)
ROWS = 16384
L2_SHARE = 0.75  # what a launch may count on; the rest serves weights and other traffic


@dataclass(frozen=True)
class Launch:
    kind: str  # single, streamed, persistent, split
    block: int
    num_warps: int
    programs_per_sm: int = 0  # persistent and split: programs an SM (0: persistent sized to L2)

    @property
    def name(self) -> str:
        name = f"{self.kind}-b{self.block}-w{self.num_warps}"
        if self.kind in ("persistent", "split"):
            name += f"-p{self.programs_per_sm}" if self.programs_per_sm else "-l2"
        return name


def predict(launch: Launch, resident_per_sm: int, gpu: Gpu, N: int, V: int, b: int) -> dict:
    """The model's numbers for one launch on rows (N, V) of b-byte logits."""
    row_bytes = V * b
    l2 = L2_SHARE * gpu.l2_bytes
    resident = max(1, resident_per_sm)
    if launch.kind == "persistent":
        programs = gpu.sms * launch.programs_per_sm if launch.programs_per_sm else max(1, int(l2 // row_bytes))
        programs = min(programs, gpu.sms * resident, N)
        rows_in_flight = programs
        active_per_sm = programs / gpu.sms
    elif launch.kind == "split":
        segments = math.ceil(V / launch.block)
        programs = max(segments, (gpu.sms * min(launch.programs_per_sm, resident) // segments) * segments)
        rows_in_flight = programs // segments
        active_per_sm = programs / gpu.sms
    else:
        rows_in_flight = min(N, gpu.sms * resident)
        active_per_sm = rows_in_flight / gpu.sms
    if launch.kind in ("single", "split"):
        read = b  # the row, or its segment, stays in registers between the two uses
    else:
        read = b if rows_in_flight * row_bytes <= l2 else 2 * b
    dram = read + b  # and the gradient written once
    traffic = 2 * b / dram
    chunks_ahead = 2 if launch.kind in ("streamed", "persistent") and b == 2 and launch.block <= 4096 else 1
    in_flight = active_per_sm * min(chunks_ahead * launch.block, V) * b
    needed = gpu.bandwidth * gpu.latency / gpu.sms
    latency = min(1.0, in_flight / needed)
    return {
        "launch": launch.name, "bytes_per_logit": dram, "rows_in_flight": rows_in_flight,
        "l2_fit": rows_in_flight * row_bytes <= l2, "traffic": traffic, "in_flight_kib": in_flight / 1024,
        "latency": latency, "predicted": min(traffic, latency),
    }


def resident_from(resources: list[dict]) -> dict[str, int]:
    """Launch name -> resident programs per SM, from tests/triton_targets.py's rows (bf16,
    with a gradient, no weights, no softcap)."""
    table = {}
    for row in resources:
        text = row["kernel"]
        if not text.startswith(("smoothed_xent_fwd_kernel bf16", "smoothed_xent_split_kernel bf16")):
            continue
        flags = dict(re.findall(r"(\w+)=(\w+)", text))
        if flags.get("HAS_WEIGHT") != "0" or flags.get("HAS_SOFTCAP") != "0" or flags.get("WRITE_GRAD") != "1":
            continue
        if "split" in text:
            kind = "split"
        elif flags.get("SINGLE_PASS") == "1":
            kind = "single"
        else:
            kind = "persistent" if flags.get("PERSISTENT") == "1" else "streamed"
        key = (kind, int(flags["BLOCK"]), int(flags["warps"]))
        table[key] = min(table.get(key, 99), row["programs_per_sm"])
    return table


def launches_for(V: int) -> list[Launch]:
    """The candidates of fused_ls.triton.smoothed_xent for rows of V (long rows only)."""
    launches = [Launch("streamed", 4096, 8), Launch("streamed", 2048, 4), Launch("streamed", 8192, 16)]
    launches += [Launch("persistent", 4096, 8, p) for p in (1, 2, 0)]
    launches += [Launch("persistent", 8192, 16, p) for p in (1, 0)]
    launches += [Launch("split", 8192, 8, 1), Launch("split", 4096, 8, 2)]
    if V <= 8192:
        launches.insert(0, Launch("single", 1 << (V - 1).bit_length(), 8))
    return launches


def table(resident: dict, rows: int = ROWS, b: int = 2) -> str:
    lines = ["| GPU | V | launch | bytes/logit | rows in flight | fits L2 | KiB in flight/SM | traffic | latency | predicted |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|---:|"]
    for gpu in GPUS.values():
        for V in VOCABULARIES:
            for launch in launches_for(V):
                programs = resident.get((launch.kind, launch.block, launch.num_warps), 1)
                p = predict(launch, programs, gpu, rows, V, b)
                lines.append(f"| {gpu.name} | {V} | {p['launch']} | {p['bytes_per_logit']} | {p['rows_in_flight']} | "
                             f"{'yes' if p['l2_fit'] else 'no'} | {p['in_flight_kib']:.0f} | {p['traffic']:.0%} | "
                             f"{p['latency']:.0%} | {p['predicted']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=Path, help="tests/triton_targets.py --json output (sm_90)")
    args = parser.parse_args()
    resident = resident_from(json.loads(args.resources.read_text())) if args.resources else {}
    print(table(resident))


if __name__ == "__main__":
    main()
