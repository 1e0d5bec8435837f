"""The smoothed_xent benchmark's providers, one step of each, and the check of each against eager.

A provider turns (logits, target) into a mean label-smoothed loss whose backward sends the
logits' gradient upstream. The logits reach it as the output of an op (_LogitsSource, a
stand-in for the LM head), as in training: that is what lets the in-place variants run,
and where the gradient arrives, whoever computed it. Providers that overwrite their input
(fused_ls in place, Liger) work on a scratch copy of the logits (their own, or one shared
by the providers of a case), restored by `prepare()` outside the timed step.

A provider's step in one mode (LossWorkload.mode) is a workload (workload.py): prepare()
untimed, step() timed, so measure.py and rss.py take it as it is. loss_workload builds one by
name, for the memory subprocess.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fused_ls import backends, smoothed_xent
from fused_ls.bench.cases import Case, make_inputs

LABEL_SMOOTHING = 0.1
# fwd+bwd: a training step (the headline); fwd: its forward alone, the logits requiring grad;
# eval: the forward under torch.no_grad(), as in evaluation (fused_ls runs its loss-only op).
MODES = ("fwd+bwd", "fwd", "eval")
DEFAULT_MODES = ("fwd+bwd", "fwd")

# Largest norm-wise relative difference from eager (loss and gradient) that passes; eager is
# itself rounded to the case's dtype, so the bound is a few of that dtype's rounding units.
TOLERANCE = {"fp64": 1e-10, "fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    overwrites_input: bool  # writes its gradient into the logits it is given
    unavailable_reason: Callable[[torch.device], str | None]  # None when it can run on the device
    make_loss: Callable[[float], LossFn]  # label_smoothing -> loss function


PROVIDERS: dict[str, Provider] = {}  # in table order, eager first


def register(provider: Provider) -> Provider:
    PROVIDERS[provider.name] = provider
    return provider


def _always(device: torch.device) -> str | None:
    return None


def _eager_loss(label_smoothing: float) -> LossFn:
    def loss(logits, target):
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    return loss


def _compiled_loss(label_smoothing: float) -> LossFn:
    # A fresh compilation for every workload: per-shape specialisation as in training, and
    # dynamo's recompile limit (after which it silently runs eager) is never reached.
    torch._dynamo.reset()
    return torch.compile(_eager_loss(label_smoothing), dynamic=False, fullgraph=True)


def _fused_unavailable(backend: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if backend == "triton":
            if device.type != "cuda":
                return "Triton kernels need a CUDA device (the CPU interpreter is for tests, its timings mean nothing)"
            if os.environ.get("TRITON_INTERPRET") == "1":
                return "TRITON_INTERPRET=1 is set: Triton would run in its interpreter; unset it to benchmark"
        try:
            backends.resolve(backend, device)
        except RuntimeError as exc:
            return str(exc)
        return None

    return reason


def _fused_loss(backend: str, inplace: bool, accuracy: bool = False) -> Callable[[float], LossFn]:
    def make(label_smoothing: float) -> LossFn:
        def loss(logits, target):
            out = smoothed_xent(logits, target, label_smoothing, backend=backend, inplace_backward=inplace,
                                return_accuracy=accuracy)
            return out.loss if accuracy else out

        return loss

    return make


def _liger_module():
    try:
        return importlib.import_module("liger_kernel.transformers.cross_entropy").LigerCrossEntropyLoss
    except ImportError:  # older layouts export it from the package only
        return importlib.import_module("liger_kernel.transformers").LigerCrossEntropyLoss


def liger_unavailable(device: torch.device, load: Callable[[], object] = _liger_module) -> str | None:
    """Why a Liger-Kernel provider cannot run on `device` (None if it can); `load` imports
    the Liger class the provider uses."""
    if device.type != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set"
    try:
        load()
    except Exception as exc:  # noqa: BLE001  (any broken install means: not available)
        return f"liger_kernel is not importable ({type(exc).__name__}: {exc})"
    return None


def _liger_loss(label_smoothing: float) -> LossFn:
    return _liger_module()(label_smoothing=label_smoothing)


register(Provider("eager", "F.cross_entropy(label_smoothing=0.1), eager PyTorch", False, _always, _eager_loss))
register(Provider("compile", "torch.compile(F.cross_entropy), fullgraph, static shapes", False, _always, _compiled_loss))
for _backend in ("triton", "native"):
    register(Provider(_backend, f"fused_ls.smoothed_xent(backend={_backend!r})", False,
                      _fused_unavailable(_backend), _fused_loss(_backend, inplace=False)))
    register(Provider(f"{_backend}-inplace", f"fused_ls.smoothed_xent(backend={_backend!r}, inplace_backward=True)",
                      True, _fused_unavailable(_backend), _fused_loss(_backend, inplace=True)))
    register(Provider(f"{_backend}-accuracy", f"fused_ls.smoothed_xent(backend={_backend!r}, return_accuracy=True)",
                      False, _fused_unavailable(_backend), _fused_loss(_backend, inplace=False, accuracy=True)))

def _pinned_triton_loss(launch: str) -> Callable[[float], LossFn]:
    """One Triton launch, pinned (FUSED_LS_TRITON_LAUNCH) instead of tuned; the split launches
    are allowed for the measurement (FUSED_LS_UNVALIDATED_LAUNCHES)."""
    def make(label_smoothing: float) -> LossFn:
        def loss(logits, target):
            saved = {k: os.environ.get(k) for k in ("FUSED_LS_TRITON_LAUNCH", "FUSED_LS_UNVALIDATED_LAUNCHES")}
            os.environ.update(FUSED_LS_TRITON_LAUNCH=launch, FUSED_LS_UNVALIDATED_LAUNCHES="1")
            try:
                return smoothed_xent(logits, target, label_smoothing, backend="triton")
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

        return loss

    return make


# The Triton launches for rows longer than one block (fused_ls.triton.smoothed_xent.candidate_configs).
TRITON_LAUNCHES = ("streamed-b4096-w8", "streamed-b2048-w4", "streamed-b8192-w16", "persistent-b4096-w8-p1",
                   "persistent-b4096-w8-p2", "persistent-b4096-w8-l2", "persistent-b8192-w16-p1",
                   "persistent-b8192-w16-l2", "split-b8192-w8-p1", "split-b4096-w8-p2")
for _launch in TRITON_LAUNCHES:
    register(Provider(f"triton:{_launch}", f"fused_ls.smoothed_xent(backend='triton'), launch {_launch} pinned",
                      False, _fused_unavailable("triton"), _pinned_triton_loss(_launch)))
register(Provider("liger", "Liger-Kernel LigerCrossEntropyLoss(label_smoothing=0.1), overwrites its input",
                  True, liger_unavailable, _liger_loss))


def select_providers(device: torch.device, requested: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(providers that can run on `device`, {provider: why not} for the others).

    `requested` None means every registered provider; unknown names raise."""
    names = list(PROVIDERS) if requested is None else list(dict.fromkeys(requested))
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {list(PROVIDERS)}")
    runnable, skipped = [], {}
    for name in names:
        why = PROVIDERS[name].unavailable_reason(device)
        if why is None:
            runnable.append(name)
        else:
            skipped[name] = why
    return runnable, skipped


# ----------------------------------------------------------------------------- one step


class _LogitsSource(torch.autograd.Function):
    """Produces the workload's logits as a non-leaf tensor, like an LM head, and receives
    their gradient. The tensor is the workload's buffer itself (no copy)."""

    @staticmethod
    def forward(ctx, anchor, workload):
        ctx.workload = workload
        return workload.logits.detach()

    @staticmethod
    def backward(ctx, grad):
        if ctx.workload.capture_grad:
            ctx.workload.captured_grad = grad
        return None, None


class LossWorkload:
    """One provider on one set of inputs."""

    def __init__(self, provider: str | Provider, logits: torch.Tensor, target: torch.Tensor,
                 label_smoothing: float = LABEL_SMOOTHING, scratch: torch.Tensor | None = None):
        """`scratch`: a buffer like `logits` that a provider overwriting its input works in
        (default: a clone of its own); several workloads may share one, since each restores
        it in prepare()."""
        self.provider = PROVIDERS[provider] if isinstance(provider, str) else provider
        self.loss_fn = self.provider.make_loss(label_smoothing)
        self.pristine, self.target = logits, target
        if self.provider.overwrites_input:
            self.logits = logits.clone() if scratch is None else scratch
        else:
            self.logits = logits
        self._anchor = torch.zeros((), device=logits.device, requires_grad=True)
        self.capture_grad = False
        self.captured_grad = None

    def prepare(self) -> None:
        if self.provider.overwrites_input:
            self.logits.copy_(self.pristine)

    def forward(self) -> torch.Tensor:
        return self.loss_fn(_LogitsSource.apply(self._anchor, self), self.target)

    def forward_backward(self) -> torch.Tensor:
        loss = self.forward()
        loss.backward()
        return loss

    def evaluate(self) -> torch.Tensor:
        with torch.no_grad():
            return self.loss_fn(self.logits, self.target)

    def mode(self, mode: str) -> ModeStep:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        steps = {"fwd+bwd": self.forward_backward, "fwd": self.forward, "eval": self.evaluate}
        return ModeStep(self, steps[mode])

    def loss_and_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward+backward from the pristine inputs: (loss as fp32, gradient of the logits).

        For a provider that overwrites its input the gradient is its logits buffer: use it
        before the next prepare()."""
        self.prepare()
        self.capture_grad = True
        try:
            loss = self.forward_backward()
            grad, self.captured_grad = self.captured_grad, None
        finally:
            self.capture_grad = False
        if grad is None:
            raise RuntimeError(f"{self.provider.name}: the backward sent no gradient to the logits")
        return loss.detach().float(), grad


@dataclass
class ModeStep:
    """A workload restricted to one mode: prepare() and step()."""

    workload: LossWorkload
    step: Callable[[], torch.Tensor]

    def prepare(self) -> None:
        self.workload.prepare()


_last_workload: dict[tuple, LossWorkload] = {}


def loss_workload(provider: str, case: str, mode: str, device: str = "cpu", seed: int = 0,
                  label_smoothing: float = LABEL_SMOOTHING) -> ModeStep:
    """Builder by name, for the memory subprocess (rss.py). Inputs come from `seed` and are
    shared by the providers of a case; consecutive modes of one provider share its
    workload, so torch.compile compiles once."""
    key = (provider, case, device, seed, label_smoothing)
    if key not in _last_workload:
        _last_workload.clear()  # drop the previous provider's buffers before building
        logits, target = make_inputs(Case.parse(case), device, seed)
        _last_workload[key] = LossWorkload(provider, logits, target, label_smoothing)
    return _last_workload[key].mode(mode)


# ----------------------------------------------------------------------------- the check


def relative_error(actual: torch.Tensor, expected: torch.Tensor, chunk_elements: int = 1 << 26) -> float:
    """||actual - expected|| / ||expected|| over all elements (NaN if either has a NaN),
    computed in row chunks so that no full-size temporary is made."""
    actual, expected = actual.reshape(actual.shape[0], -1), expected.reshape(expected.shape[0], -1)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    rows = max(1, chunk_elements // max(1, actual.shape[1]))
    diff_sq = torch.zeros((), dtype=torch.float64, device=actual.device)
    ref_sq = torch.zeros((), dtype=torch.float64, device=actual.device)
    for start in range(0, actual.shape[0], rows):
        a = actual[start:start + rows].to(torch.float64 if actual.dtype == torch.float64 else torch.float32)
        e = expected[start:start + rows].to(a.dtype)
        diff_sq += (a - e).square().sum(dtype=torch.float64)
        ref_sq += e.square().sum(dtype=torch.float64)
    return float((diff_sq.sqrt() / ref_sq.sqrt().clamp_min(1e-300)).item())


def check_against(workload: LossWorkload, reference: tuple[torch.Tensor, torch.Tensor], dtype: str) -> dict:
    """Loss and gradient of one forward+backward against the eager reference's."""
    tol = TOLERANCE[dtype]
    if workload.provider.name == "eager":  # the reference itself
        return {"ok": True, "loss_rel_err": 0.0, "grad_rel_err": 0.0, "tolerance": tol, "reference": "is the reference"}
    loss, grad = workload.loss_and_grad()
    ref_loss, ref_grad = reference
    loss_err = relative_error(loss.reshape(1, 1), ref_loss.reshape(1, 1))
    grad_err = relative_error(grad, ref_grad)
    ok = loss_err <= tol and grad_err <= tol  # False for NaN
    return {"ok": bool(ok), "loss_rel_err": loss_err, "grad_rel_err": grad_err, "tolerance": tol,
            "reference": "eager F.cross_entropy in the case's dtype"}
