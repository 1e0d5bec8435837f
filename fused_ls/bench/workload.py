"""What the timing and memory helpers measure: a workload, and how one is named for a subprocess.

A workload is any object with `prepare()` (untimed, before every step) and `step()` (the
timed part). measure.py times workloads and measures their memory on CUDA; rss.py measures
their memory on the CPU in a fresh subprocess, which builds each workload from a builder
named 'module:function' (resolve_builder) and its keyword arguments.

This module imports nothing from fused_ls, so every other bench module can import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch


class Workload(Protocol):
    def prepare(self) -> None: ...
    def step(self) -> object: ...


class CallableWorkload:
    """A plain callable as a workload (nothing to prepare)."""

    def __init__(self, step: Callable[[], object], prepare: Callable[[], None] | None = None):
        self.step = step
        self.prepare = prepare or (lambda: None)


def as_workload(obj) -> Workload:
    """`obj` itself if it has step(), else the callable wrapped as a workload."""
    return obj if hasattr(obj, "step") else CallableWorkload(obj)


def resolve_builder(spec: str) -> Callable:
    """The function a 'module:function' builder names, imported."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"builder {spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


class CopyWorkload:
    """y.copy_(x) over a tensor like the logits: the bandwidth a memory-bound step can hope for."""

    def __init__(self, like: torch.Tensor):
        self.x = like
        self.y = torch.empty_like(like)

    def prepare(self) -> None:
        pass

    def step(self) -> torch.Tensor:
        return self.y.copy_(self.x)
