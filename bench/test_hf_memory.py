"""Peak memory of a Hugging Face causal LM's training step: the stock model against fused_ls.

    pytest bench/test_hf_memory.py -s       2-layer Llama, hidden 256, V = 128256, 1 x 2048 tokens

Memory only, no timing. The variants (labelsmoother, hf_loss, smoothed_xent, fused_head), the
step and the builder are in fused_ls.bench.hf_memory, whose command line
(`python -m fused_ls.bench.hf_memory`) gives the same figures with medians over fresh
interpreters. The target: fused_head's peak at most 1/3 of labelsmoother's (the stock Trainer
with label_smoothing_factor), read off the table printed at the end.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from fused_ls.bench.hf_memory import VARIANTS  # noqa: E402

SHAPE = dict(vocab=128256, hidden=256, layers=2, batch=1, tokens=2048)
LOGITS_BYTES = SHAPE["batch"] * SHAPE["tokens"] * SHAPE["vocab"] * 4
_peaks: dict[str, int] = {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_training_step_peak_memory(variant, bench_device, bench_seed, peak_memory):
    if bench_device.type != "cpu":
        pytest.skip("the Hugging Face memory benchmark measures the CPU step (resident memory)")
    _peaks[variant] = peak_memory("fused_ls.bench.hf_memory:build", variant=variant, seed=bench_seed, **SHAPE)


def test_hf_memory_table(bench_environment):
    if not _peaks:
        pytest.skip("no variant was measured")
    env = bench_environment
    print(f"\n{env.get('date')}; {env.get('device_name')}, torch {env.get('torch')}; "
          f"{SHAPE['layers']}-layer Llama, V = {SHAPE['vocab']}, {SHAPE['tokens']} tokens, float32")
    print("| variant | peak extra MiB | x the logits | / labelsmoother |")
    print("|---|---:|---:|---:|")
    base = _peaks.get("labelsmoother")
    for variant, peak in _peaks.items():
        ratio = f"{peak / base:.2f}" if base else "-"
        print(f"| {variant} | {peak / 2**20:.0f} | {peak / LOGITS_BYTES:.2f} | {ratio} |")
