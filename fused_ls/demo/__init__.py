"""The demo: label smoothing's promised effects on calibration and label noise, measured on Fashion-MNIST.

    python -m fused_ls demo            # defaults: the over-confident preset, about a minute on a CPU
    python -m fused_ls demo --help

Modules: idx (reading the IDX files), experiment (one training run and its metrics),
report (table, sentences, JSON, reliability diagram), cli (the command line).
"""

from fused_ls.demo.cli import main

__all__ = ["main"]
