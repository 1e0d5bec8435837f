"""The fused linear head's benchmark: its providers, one step of each, the check between them,
and the workload builder the memory subprocess imports ('fused_ls.bench.linear_head:build').
The pytest-benchmark front end is bench/test_linear.py.

Every provider maps (hidden (N, H), weight (V, H), target (N,)) to a mean label-smoothed loss;
one step is the forward and the backward for hidden and weight (no bias: LM heads have none).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fused_ls import smoothed_linear_xent
from fused_ls.bench.cases import DTYPES
from fused_ls.bench.xent import LABEL_SMOOTHING, liger_unavailable, relative_error

# Largest norm-wise relative difference from the materialised path that passes the check.
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}


@dataclass(frozen=True)
class HeadProvider:
    name: str
    description: str
    label_smoothing: float  # what the provider is run with
    unavailable_reason: Callable[[torch.device], str | None]
    make: Callable[[], Callable]  # () -> loss(hidden, weight, target)


def _always(device):
    return None


def _materialised():
    return lambda h, w, t: F.cross_entropy(F.linear(h, w), t, label_smoothing=LABEL_SMOOTHING)


def _torch_lce_unavailable(device):
    return None if hasattr(F, "linear_cross_entropy") else f"torch {torch.__version__} has no F.linear_cross_entropy"


def _torch_lce():
    return lambda h, w, t: F.linear_cross_entropy(h, w, t, label_smoothing=LABEL_SMOOTHING)


def _torch_lce_chunked_unavailable(device):
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy"
    return None


def _torch_lce_chunked():
    # torch's chunked path takes only label_smoothing == 0 (with 0.1 it warns and falls back
    # to the materialised path), so it runs the easier, unsmoothed loss here.
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, t: F.linear_cross_entropy(h, w, t, label_smoothing=0.0, options=options)


def _fused_ls(grad_accumulation: str):
    def make():
        return lambda h, w, t: smoothed_linear_xent(h, w, t, label_smoothing=LABEL_SMOOTHING,
                                                    grad_accumulation=grad_accumulation)

    return make


def _liger_unavailable(device):
    return liger_unavailable(device, _liger_class)


def _liger_class():
    return importlib.import_module("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss


def _liger():
    loss = _liger_class()(label_smoothing=LABEL_SMOOTHING)
    return lambda h, w, t: loss(w, h, t)


PROVIDERS = {
    p.name: p
    for p in (
        HeadProvider("materialised", "F.cross_entropy(F.linear(h, W), label_smoothing=0.1), eager", LABEL_SMOOTHING,
                 _always, _materialised),
        HeadProvider("torch-lce", "F.linear_cross_entropy(h, W, t, label_smoothing=0.1) (options=None)", LABEL_SMOOTHING,
                 _torch_lce_unavailable, _torch_lce),
        HeadProvider("torch-lce-chunked", "F.linear_cross_entropy(..., label_smoothing=0.0, "
                 "options=LinearCrossEntropyOptions()): its chunked path refuses eps != 0", 0.0,
                 _torch_lce_chunked_unavailable, _torch_lce_chunked),
        HeadProvider("fused_ls", "fused_ls.smoothed_linear_xent(h, W, t, label_smoothing=0.1): backend auto, "
                 "default chunks, grad_accumulation='fp32'", LABEL_SMOOTHING, _always, _fused_ls("fp32")),
        HeadProvider("fused_ls-weight_dtype", "the same with grad_accumulation='weight_dtype' (differs from "
                 "'fp32' only for bf16/fp16)", LABEL_SMOOTHING, _always, _fused_ls("weight_dtype")),
        HeadProvider("liger-flce", "Liger-Kernel LigerFusedLinearCrossEntropyLoss(label_smoothing=0.1)", LABEL_SMOOTHING,
                 _liger_unavailable, _liger),
    )
}


@dataclass(frozen=True)
class HeadCase:
    tokens: int
    hidden: int
    vocab: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.tokens}x{self.hidden}x{self.vocab}:{self.dtype}"

    @property
    def logits_bytes(self) -> int:
        return self.tokens * self.vocab * DTYPES[self.dtype].itemsize

    @property
    def gradient_bytes(self) -> int:
        """dL/dh and dL/dW, in the inputs' dtype: what every provider must hand back."""
        return (self.tokens + self.vocab) * self.hidden * DTYPES[self.dtype].itemsize

    @classmethod
    def parse(cls, text: str, dtype: str) -> HeadCase:
        tokens, hidden, vocab = (int(x) for x in text.lower().split("x"))
        return cls(tokens, hidden, vocab, dtype)


class HeadWorkload:
    """One forward + backward (hidden and weight) of a provider on fixed random inputs."""

    def __init__(self, provider: str, case: HeadCase, device: torch.device, seed: int):
        gen = torch.Generator(device=device).manual_seed(seed)
        dtype = DTYPES[case.dtype]
        self.hidden = torch.randn(case.tokens, case.hidden, device=device, generator=gen).to(dtype)
        self.hidden.requires_grad_(True)
        weight = torch.randn(case.vocab, case.hidden, device=device, generator=gen)
        self.weight = weight.mul_(case.hidden**-0.5).to(dtype).requires_grad_(True)
        del weight
        self.target = torch.randint(0, case.vocab, (case.tokens,), device=device, generator=gen)
        self.loss_fn = PROVIDERS[provider].make()

    def prepare(self) -> None:
        pass

    def step(self):
        loss = self.loss_fn(self.hidden, self.weight, self.target)
        grad_hidden, grad_weight = torch.autograd.grad(loss, (self.hidden, self.weight))
        return loss.detach(), grad_hidden, grad_weight


BUILDER = "fused_ls.bench.linear_head:build"


def build(provider: str, tokens: int, hidden: int, vocab: int, dtype: str, device: str, seed: int) -> HeadWorkload:
    """The memory subprocess's entry point (BUILDER)."""
    return HeadWorkload(provider, HeadCase(tokens, hidden, vocab, dtype), torch.device(device), seed)


def relative_difference(result, reference) -> float:
    """Largest norm-wise relative difference over (loss, dL/dh, dL/dW) (NaN if any has a NaN)."""
    errors = [relative_error(ours.reshape(1, -1), theirs.reshape(1, -1)) if ours.dim() == 0
              else relative_error(ours, theirs) for ours, theirs in zip(result, reference)]
    return max(errors, key=lambda e: float("inf") if e != e else e)
