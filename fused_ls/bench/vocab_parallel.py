"""Time per training step of vocabulary parallelism on the CPU: 2 gloo ranks against 1 process.

    python -m fused_ls.bench.vocab_parallel                      # 4096 x 32768 float32, 2 ranks
    python -m fused_ls.bench.vocab_parallel --rows 2048 --vocab 50304 --repeats 15 --json out.json

One step is smoothed_xent's forward and backward (label smoothing 0.1, mean) on the whole
(rows, vocab) logits in one process with one thread, and on each rank's half of the classes in
`--world` gloo processes with one thread each (`process_group=`, the slices' offsets passed so
that no step gathers them). The same global shape either way: the ratio parallel / single says
what splitting the classes buys, the collective included. Each backend's slice passes are timed
in the same run ("native": the C++ CPU kernels; "torch": the eager PyTorch passes).
Every rank times its steps between barriers; a step's time is the slowest rank's. Medians over
--repeats steps after --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch

EPS = 0.1


def _inputs(rows: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    target = torch.randint(0, vocab, (rows,), generator=generator)
    return logits, target


def _time_steps(step, warmup: int, repeats: int, barrier=lambda: None) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        barrier()
        start = time.perf_counter()
        step()
        barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def single_process(rows: int, vocab: int, backend: str, warmup: int, repeats: int, seed: int) -> float:
    """Median seconds of one step on the whole vocabulary, one thread."""
    from fused_ls import smoothed_xent

    torch.set_num_threads(1)
    logits, target = _inputs(rows, vocab, seed)
    logits.requires_grad_(True)

    def step():
        logits.grad = None
        smoothed_xent(logits, target, EPS, backend=backend).backward()

    return statistics.median(_time_steps(step, warmup, repeats))


def _rank(rank: int, world: int, store: str, rows: int, vocab: int, backends: list[str], warmup: int, repeats: int,
          seed: int, out: str) -> None:
    import torch.distributed as dist

    from fused_ls import smoothed_xent

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    full, target = _inputs(rows, vocab, seed)
    per_rank = -(-vocab // world)
    start = min(rank * per_rank, vocab)
    stop = min(start + per_rank, vocab)
    logits = full[:, start:stop].clone().requires_grad_(True)
    del full
    results = {}
    for backend in backends:
        def step():
            logits.grad = None
            loss = smoothed_xent(logits, target, EPS, process_group=dist.group.WORLD, vocab_start=start,
                                 vocab_size=vocab, backend=backend)
            loss.backward()

        results[backend] = _time_steps(step, warmup, repeats, barrier=dist.barrier)
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def vocab_parallel(rows: int, vocab: int, world: int, backends: list[str], warmup: int, repeats: int,
                   seed: int) -> dict[str, float]:
    """Median seconds of one step with the classes split over `world` gloo ranks, per backend:
    each step's slowest rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(_rank, args=(world, os.path.join(directory, "store"), rows, vocab, backends, warmup,
                                        repeats, seed, directory), nprocs=world, join=True, start_method="spawn")
        ranks = []
        for rank in range(world):
            with open(os.path.join(directory, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return {backend: statistics.median(max(times) for times in zip(*(r[backend] for r in ranks)))
            for backend in backends}


def measure(rows: int = 4096, vocab: int = 32768, world: int = 2, backends=("native", "torch"), warmup: int = 2,
            repeats: int = 9, seed: int = 0) -> dict:
    from fused_ls import available_backends

    usable = [b for b in backends if b in available_backends("cpu")]
    single = {backend: single_process(rows, vocab, backend, warmup, repeats, seed) for backend in usable}
    parallel = vocab_parallel(rows, vocab, world, usable, warmup, repeats, seed)
    return {
        "rows": rows, "vocab": vocab, "world": world, "dtype": "float32", "repeats": repeats,
        "single_s": single, "parallel_s": parallel,
        "ratio": {b: parallel[b] / single[b] for b in usable},
        "parallel_over_native_single": {b: parallel[b] / single[usable[0]] for b in usable},
    }


def table(result: dict) -> str:
    lines = [f"{result['rows']} x {result['vocab']} float32, forward + backward, {result['world']} gloo ranks x 1 thread "
             f"against 1 process x 1 thread; medians of {result['repeats']} steps",
             "", "| slice passes | 1 process, s | vocab-parallel, s | parallel / single |", "|---|---:|---:|---:|"]
    for backend, single in result["single_s"].items():
        parallel = result["parallel_s"][backend]
        lines.append(f"| {backend} | {single:.3f} | {parallel:.3f} | {parallel / single:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["native", "torch"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = measure(args.rows, args.vocab, args.world, args.backends, args.warmup, args.repeats, args.seed)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
