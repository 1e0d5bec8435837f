"""Benchmarks of smoothed_xent against what people use now: one implementation, two front ends.

    python -m fused_ls bench        the report (fused_ls.bench.cli): table, JSON, PNG
    pytest bench                    the same measurements through pytest-benchmark (bench/)

Layout, each piece used by both front ends:
    cases.py      what is measured: N x V logits of one dtype, the default sets per device
    workloads.py  who is measured: the providers (eager, torch.compile, fused_ls backends,
                  in place, Liger), one step of each, and the check against eager
    measure.py    how: median time, byte count and bandwidth, peak extra memory, environment
    rss.py        peak resident memory of a CPU workload, in a clean subprocess
    report.py     the table, the JSON document and the plot
"""
