"""Benchmarks of smoothed_xent and the fused linear head against what people use now.

Where benchmark code lives (the rule, also in bench/README.md):
    fused_ls/bench/   everything that measures: cases, providers, workloads, timing, memory,
                      checks, report. It ships with the package, so `python -m fused_ls bench`
                      works from any install.
    bench/            the pytest-benchmark front end only: conftest.py (options, fixtures)
                      and test_*.py modules that import what they measure from here and add
                      pytest-benchmark's statistics and their own tables; plus bench/gpu.sh,
                      the README and the committed results. Nothing there times or measures
                      memory by itself.

Two front ends, one implementation:
    python -m fused_ls bench        the report (cli.py): table, JSON, markdown, PNG
    pytest bench                    pytest-benchmark (bench/conftest.py, bench/test_*.py)

Modules, each importing only modules listed before it (so no import cycle; this file imports none):
    workload.py     the workload interface (prepare/step), builders named 'module:function'
                    for the memory subprocess, the copy baseline
    cases.py        what is measured: N x V logits of one dtype; the default and --full sets
    rss.py          peak resident memory of CPU workloads, in a fresh subprocess
    measure.py      how: median time (providers taking turns), bytes and bandwidth, peak
                    extra memory (CUDA allocator, or rss.py), the environment
    report.py       the text table (printed row by row), markdown, the JSON document, the plot
    xent.py         who, for smoothed_xent: the providers (eager, torch.compile, fused_ls
                    backends, in place, Liger), one step of each, the check against eager
    linear_head.py  who, for the fused linear head: the materialised path, torch's
                    F.linear_cross_entropy, fused_ls, Liger (front end: bench/test_linear.py)
    suite.py        one case, every provider and mode: check, time, memory, ratios
    cli.py          python -m fused_ls bench
    hf_memory.py    peak memory of a Hugging Face causal LM's training step, stock against the
                    fused head (python -m fused_ls.bench.hf_memory; front end bench/test_hf_memory.py)
    traffic.py      the GPU memory-traffic model of each Triton launch (docs/traffic-model.md)
"""
