"""No host synchronisation in smoothed_xent's forward or backward, on any backend.

A host sync (the CPU waiting for the device to hand back a value: `.item()`, `bool(t)`, a
device-to-host copy, an op whose output shape depends on the data) stalls the launch queue
every step, breaks CUDA graph capture and forces a graph break under torch.compile. Three
independent proofs that the path has none:

1. `forbid_host_sync()` below, on every backend that runs here, eager forward and backward:
   a TorchDispatchMode that raises on every aten op that needs the device's data on the host
   (`_local_scalar_dense`, which `.item()`/`bool()`/`int()`/`float()` reach, `nonzero`,
   `masked_select`, `equal`, `unique`, boolean indexing, device-to-host copies, ...), plus
   patches on the torch.Tensor methods that read values without dispatching an op on a CPU
   tensor (`.tolist()`, `.numpy()`, ...). It looks inside our torch.library ops as well: the
   Triton launcher (run by Triton's interpreter here) and the native kernels.
2. `torch.compile(fullgraph=True)` of a training step: Dynamo cannot trace a host read or a
   data-dependent shape without a graph break, which fullgraph turns into an error; it traces
   the autograd.Function's backward at compile time, so this covers the backward too.
3. On a GPU (`@pytest.mark.gpu`, skipped without CUDA): `torch.cuda.set_sync_debug_mode("error")`
   around forward and backward, and CUDA graph capture and replay of both.

Deliberate exceptions: code that only ever runs on CPU tensors, where reading a value stalls
nothing (the data already is in host memory), may read it:
* `_core.check_targets` raises a clear IndexError for an out-of-range target on CPU
  tensors, eager only; it is skipped for every other device and under torch.compile.
  `test_target_check_reads_the_host_only_for_cpu_tensors` proves both halves of that claim.
* a kernel registered for the CPU dispatch key of one of our ops (the native C++ kernels; the
  CPU kernel of `fused_ls::scale_rows_`, which skips its pass when every scale is 1) runs only
  for CPU tensors; its CUDA counterpart is a different kernel, checked by proof 3.
  `test_host_reads_are_allowed_only_in_cpu_kernels` proves the guard exempts exactly those.
Everything device-generic (the Python wrapper, the autograd.Function, the Triton launcher and
op) is checked with no exception, and proofs 2 and 3 allow nothing at all.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_ls import _core, available_backends, functional, smoothed_xent, smoothed_xent_reference

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """Something in the guarded region made the host read device data."""


def _existing(*names):
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


# Ops that hand a value back to the host, or whose output shape depends on the data.
_SYNCING_OPS = _existing(
    "_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "allclose",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount",
)
_INDEXING_OPS = _existing("index", "index_put", "index_put_", "_index_put_impl_")
# Tensor methods that can read values on the host without dispatching any op (a CPU tensor's
# .tolist() copies straight from its memory), or that do so before an op is dispatched.
_HOST_READING_METHODS = ("item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__",
                         "__index__", "__complex__")
_BELOW_PYTHON_KEY = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


def _why_it_syncs(func, args, kwargs) -> str | None:
    packet = func.overloadpacket
    if packet in _SYNCING_OPS:
        return f"{func} reads device data on the host or has a data-dependent shape"
    if packet is aten.repeat_interleave and func._overloadname.startswith("Tensor") and kwargs.get("output_size") is None:
        return f"{func} without output_size has a data-dependent shape"
    if packet in _INDEXING_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{func} with a boolean mask has a data-dependent shape"
    if packet is aten._to_copy:
        src, dst = args[0], kwargs.get("device")
        if dst is not None and torch.device(dst).type == "cpu" and src.device.type not in ("cpu", "meta"):
            return f"{func} copies device memory to the host"
    if packet is aten.copy_:
        dst, src = args[0], args[1]
        if dst.device.type == "cpu" and src.device.type not in ("cpu", "meta"):
            return f"{func} copies device memory to the host"
    return None


class _HostSyncGuard(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.allowed_depth = 0
        self.violations: list[str] = []

    def report(self, why: str):
        if self.allowed_depth:
            return
        self.violations.append(why)
        raise HostSyncError(why)

    @contextlib.contextmanager
    def allowed(self):
        self.allowed_depth += 1
        try:
            yield
        finally:
            self.allowed_depth -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why_it_syncs(func, args, kwargs)
        if why is not None:
            self.report(why)
        if func.namespace.startswith("fused_ls"):
            # A dispatch mode sees a custom op as one opaque call; re-enter the mode and
            # dispatch below it, so that the ops the implementation runs are checked too.
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
            for t in tensors:
                keys = keys | torch._C._dispatch_keys(t)
            # A kernel registered for the CPU key alone never sees device memory: its host
            # reads are free (see the module docstring); its CUDA twin is checked on a GPU.
            cpu_kernel = all(t.device.type == "cpu" for t in tensors) and \
                torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CPU")
            with self, self.allowed() if cpu_kernel else contextlib.nullcontext():
                return func.redispatch(keys & _BELOW_PYTHON_KEY, *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def forbid_host_sync():
    """Raise HostSyncError on any host read of tensor data inside the block.

    Yields the guard; `with guard.allowed():` exempts a region (see the module docstring).
    """
    guard = _HostSyncGuard()
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READING_METHODS if hasattr(torch.Tensor, name)}

    def patched(name, original):
        def method(self, *args, **kwargs):
            guard.report(f"Tensor.{name} reads tensor data on the host")
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, patched(name, original))
    try:
        with guard:
            yield guard
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    if guard.violations:  # also when something in between swallowed the exception
        raise HostSyncError("; ".join(guard.violations))


@pytest.fixture
def cpu_target_check_allowed(monkeypatch):
    """forbid_host_sync, with host reads allowed inside _core.check_targets only."""
    original = _core.check_targets
    guards = []

    def check_targets(*args, **kwargs):
        with guards[-1].allowed() if guards else contextlib.nullcontext():
            return original(*args, **kwargs)

    monkeypatch.setattr(_core, "check_targets", check_targets)

    @contextlib.contextmanager
    def guarded():
        with forbid_host_sync() as guard:
            guards.append(guard)
            try:
                yield guard
            finally:
                guards.pop()

    return guarded


# ----------------------------------------------------------------------------- the guard itself


def _mask_index(x):
    return x[x > 0]


def _mask_assign(x):
    x[x > 0] = 0.0


_SYNCS = {
    "item": lambda x: x.sum().item(),
    "tolist": lambda x: x.tolist(),
    "bool": lambda x: bool(x.sum() > 0),
    "if": lambda x: 1 if (x > 0).any() else 0,
    "int": lambda x: int(x.sum()),
    "float": lambda x: float(x.sum()),
    "index": lambda x: [0, 1][(x.sum() > 0).long()],
    "numpy": lambda x: x.numpy(),
    "nonzero": lambda x: x.nonzero(),
    "masked_select": lambda x: x.masked_select(x > 0),
    "boolean indexing": _mask_index,
    "boolean index assignment": _mask_assign,
    "torch.equal": lambda x: torch.equal(x, x),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.tensor([1, 2], device=x.device)),
    "scalar argument": lambda x: torch.full((2,), x.sum()),
}


@pytest.mark.parametrize("sync", list(_SYNCS), ids=list(_SYNCS))
def test_guard_catches_every_kind_of_host_sync(sync, device):
    x = torch.randn(8, device=device)
    with pytest.raises(HostSyncError), forbid_host_sync():
        _SYNCS[sync](x)


def test_guard_lets_device_only_work_through(device):
    x = torch.randn(6, 5, device=device, requires_grad=True)
    t = torch.randint(0, 5, (6,), device=device)
    with forbid_host_sync():
        y = torch.where(x > 0, x, 0.0).logsumexp(-1) - x.gather(1, t[:, None]).squeeze(1)
        y = y + x[torch.arange(6, device=device), t]  # integer (not boolean) indexing
        y.sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- eager, every backend


CASES = {
    "mean": {"reduction": "mean"},
    "mean, float normalizer": {"reduction": "mean", "normalizer": 37.0},
    "mean, tensor normalizer": {"reduction": "mean", "normalizer": "tensor"},
    "mean, class weights": {"reduction": "mean", "weight": True},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "z_loss, softcap, others": {"reduction": "mean", "z_loss": 1e-4, "softcap": 5.0, "convention": "others"},
}


def _case_kwargs(case, V, device):
    kwargs = dict(CASES[case])
    if kwargs.get("normalizer") == "tensor":
        kwargs["normalizer"] = torch.tensor(41.0, device=device)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(V, device=device) + 0.5
    return kwargs


def _inputs(device, n=12, V=40):
    logits = torch.randn(n, V, device=device) * 3
    target = torch.randint(0, V, (n,), device=device)
    target[::4] = -100
    return logits, target


def _loss_and_grad(logits, target, **kwargs):
    x = logits.clone().requires_grad_(True)
    upstream = torch.rand(target.shape, device=logits.device) if kwargs.get("reduction") == "none" else None
    loss = smoothed_xent(x * 1.0, target, 0.1, **kwargs)  # * 1.0: a non-leaf, as the LM head gives
    loss.backward(upstream)
    return loss.detach(), x.grad, upstream


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_never_sync(backend, device, case, cpu_target_check_allowed):
    logits, target = _inputs(device)
    kwargs = _case_kwargs(case, logits.shape[1], device)
    _loss_and_grad(logits, target, backend=backend, **kwargs)  # warm-up: compile kernels, load modules
    with cpu_target_check_allowed():
        loss, grad, upstream = _loss_and_grad(logits, target, backend=backend, **kwargs)
    # The guarded run did the real work: it agrees with the eager reference.
    x = logits.double().requires_grad_(True)
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref = smoothed_xent_reference(x, target, 0.1, **kwargs)
    ref.backward(None if upstream is None else upstream.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_evaluation_never_syncs(backend, device, case, cpu_target_check_allowed):
    logits, target = _inputs(device)
    kwargs = _case_kwargs(case, logits.shape[1], device)
    with torch.no_grad():
        smoothed_xent(logits, target, 0.1, backend=backend, **kwargs)  # warm-up
        with cpu_target_check_allowed():
            loss = smoothed_xent(logits, target, 0.1, backend=backend, **kwargs)
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ref = smoothed_xent_reference(logits.double(), target, 0.1, **kwargs)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=2e-5)


def test_inplace_backward_never_syncs(fused_backend, device, cpu_target_check_allowed):
    logits, target = _inputs(device)
    W = torch.randn(16, logits.shape[1], device=device, requires_grad=True)
    h = torch.randn(logits.shape[0], 16, device=device)
    smoothed_xent(h @ W, target, inplace_backward=True, backend=fused_backend).backward()  # warm-up
    W.grad = None
    with cpu_target_check_allowed():
        smoothed_xent(h @ W, target, inplace_backward=True, backend=fused_backend).backward()
    expected = torch.autograd.grad(F.cross_entropy(h @ W, target, label_smoothing=0.1), W)[0]
    torch.testing.assert_close(W.grad, expected, rtol=1e-5, atol=1e-6)


def _plant_in_backward(monkeypatch):
    original = functional._FusedSmoothedXent.backward

    def backward(ctx, grad_loss, *grad_others):
        grad_loss.sum().item()
        return original(ctx, grad_loss, *grad_others)

    monkeypatch.setattr(functional._FusedSmoothedXent, "backward", staticmethod(backward))


def _plant_in_triton_launcher(monkeypatch):
    from fused_ls.triton import smoothed_xent as launcher

    original = launcher.smoothed_xent_rows_out

    def rows_out(logits, target, weight, weight_sum, grad_scale, *args, **kwargs):
        target.nonzero()  # an aten op only the dispatch mode sees, inside the torch.library op
        return original(logits, target, weight, weight_sum, grad_scale, *args, **kwargs)

    monkeypatch.setattr(launcher, "smoothed_xent_rows_out", rows_out)


def _plant_in_normaliser(monkeypatch):
    original = _core.gradient_scale

    def gradient_scale(*args):
        scale = original(*args)
        return torch.tensor(scale.tolist(), device=scale.device)

    monkeypatch.setattr(_core, "gradient_scale", gradient_scale)


PLANTS = {"autograd backward": _plant_in_backward, "triton launcher": _plant_in_triton_launcher,
          "normaliser": _plant_in_normaliser}


@pytest.mark.parametrize("where", list(PLANTS))
def test_guard_catches_a_sync_planted_in_the_path(where, device, cpu_target_check_allowed, monkeypatch):
    backend = "triton" if where == "triton launcher" else available_backends(device)[0]
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} cannot run on {device}")
    PLANTS[where](monkeypatch)
    logits, target = _inputs(device)
    with pytest.raises(HostSyncError), cpu_target_check_allowed():
        _loss_and_grad(logits, target, backend=backend)


@torch.library.custom_op("fused_ls_test::peek_generic", mutates_args=())
def _peek_generic(x: torch.Tensor) -> torch.Tensor:
    return x * 1.0 if bool(x.any()) else x * 0.0  # a host read of the data


@torch.library.custom_op("fused_ls_test::peek_cpu_kernel", mutates_args=())
def _peek_cpu_kernel(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_peek_cpu_kernel.register_kernel("cpu")
def _(x):
    return x * 1.0 if bool(x.any()) else x * 0.0


def test_host_reads_are_allowed_only_in_cpu_kernels():
    x = torch.ones(3)
    with forbid_host_sync():  # a kernel for the CPU key alone, given CPU tensors
        _peek_cpu_kernel(x)
    with pytest.raises(HostSyncError), forbid_host_sync():  # the same read, device-generic implementation
        _peek_generic(x)


def test_target_check_reads_the_host_only_for_cpu_tensors():
    target = torch.tensor([3, -100, 7])
    # On CPU tensors it reads the verdict on the host: that is why the eager test allows it...
    with pytest.raises(HostSyncError), forbid_host_sync():
        _core.check_targets(target, 10, -100)
    # ...and on any other device it does nothing (meta stands in for CUDA here: no data at all).
    with forbid_host_sync():
        _core.check_targets(target.to("meta"), 10, -100)


# ----------------------------------------------------------------------------- torch.compile


class _TinyLM(torch.nn.Module):
    def __init__(self, V=48, d=16):
        super().__init__()
        self.embed = torch.nn.Embedding(V, d)
        self.head = torch.nn.Linear(d, V)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def _assert_graph_never_syncs(gm, example_inputs):
    """An AOTAutograd compiler for the forward and the backward graph: fail on a syncing op.

    Dynamo already refuses host reads and data-dependent shapes under fullgraph; this also
    catches what it traces happily, such as a device-to-host copy.
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
            why = _why_it_syncs(node.target, args, kwargs)
            if why is not None:
                raise HostSyncError(f"compiled graph: {why}")
    return make_boxed_func(gm.forward)


COMPILERS = {
    "aot_no_sync": aot_autograd(fw_compiler=_assert_graph_never_syncs, bw_compiler=_assert_graph_never_syncs),
    "inductor": "inductor",
}


def _compiled_training_step(model, backend, compiler):
    def loss_of(tokens, target, normalizer):
        return smoothed_xent(model(tokens), target, 0.1, normalizer=normalizer, backend=backend)

    return torch.compile(loss_of, fullgraph=True, backend=COMPILERS[compiler])


def _batch(device, B=3, T=8, V=48):
    tokens = torch.randint(0, V, (B, T), device=device)
    target = torch.roll(tokens, -1, dims=1)
    target[:, -1] = -100
    return tokens, target


@pytest.mark.parametrize(
    "compiler, normalizer",
    # Inductor's codegen costs seconds: one case per backend shows our ops lower through it.
    [("aot_no_sync", "count"), ("aot_no_sync", "float"), ("aot_no_sync", "tensor"), ("inductor", "tensor")],
)
def test_compiled_training_step_has_no_graph_break(backend, device, compiler, normalizer):
    torch._dynamo.reset()
    model = _TinyLM().to(device)
    step = _compiled_training_step(model, backend, compiler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # the second step reuses the graph: new weights, data and normaliser value
        tokens, target = _batch(device)
        count = (target != -100).sum()
        norm = {"count": None, "float": float(count) * 1.5, "tensor": count.float() * 1.5}[normalizer]
        model.zero_grad(set_to_none=True)
        loss = step(tokens, target, norm)
        loss.backward()
        got = [loss.detach()] + [p.grad.clone() for p in model.parameters()]

        model.zero_grad(set_to_none=True)
        total = F.cross_entropy(model(tokens).flatten(0, 1), target.flatten(), label_smoothing=0.1, reduction="sum")
        expected_loss = total / (count if norm is None else norm)
        expected_loss.backward()
        expected = [expected_loss.detach()] + [p.grad for p in model.parameters()]
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=2e-5, atol=1e-6)
        for p, g in zip(model.parameters(), got[1:]):
            p.grad = g
        optimizer.step()


def _plant_branch_in_backward(monkeypatch):
    original = functional._FusedSmoothedXent.backward

    def backward(ctx, grad_loss, *grad_others):
        if grad_loss.sum() > 0:  # control flow on device data
            pass
        return original(ctx, grad_loss, *grad_others)

    monkeypatch.setattr(functional._FusedSmoothedXent, "backward", staticmethod(backward))


def _plant_copy_in_backward(monkeypatch):
    original = functional._FusedSmoothedXent.backward

    def backward(ctx, grad_loss, *grad_others):
        grad_loss = grad_loss.cpu().to(grad_loss.device)  # on a GPU: a device-to-host copy
        return original(ctx, grad_loss, *grad_others)

    monkeypatch.setattr(functional._FusedSmoothedXent, "backward", staticmethod(backward))


@pytest.mark.parametrize("plant", [_plant_branch_in_backward, _plant_copy_in_backward], ids=["branch", "copy"])
def test_compile_check_catches_a_sync_planted_in_backward(device, monkeypatch, plant):
    if plant is _plant_copy_in_backward and device.type == "cpu":
        pytest.skip("a copy to the host is no sync for CPU tensors")
    plant(monkeypatch)
    torch._dynamo.reset()
    model = _TinyLM().to(device)
    step = _compiled_training_step(model, available_backends(device)[0], "aot_no_sync")
    tokens, target = _batch(device)
    # The branch must be named for what it is: a looser match passed once on an unrelated
    # graph break (a backward whose arguments no longer bound).
    expected = "(?i)data-dependent"
    if plant is _plant_copy_in_backward:
        expected += "|graph break|compiled graph"
    with pytest.raises(Exception, match=expected):
        step(tokens, target, None).backward()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- CUDA

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA_BACKENDS = available_backends("cuda") if torch.cuda.is_available() else []


@contextlib.contextmanager
def _sync_debug_mode_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
@requires_cuda
def test_sync_debug_mode_catches_a_sync():
    x = torch.randn(4, device="cuda")
    with pytest.raises(RuntimeError), _sync_debug_mode_error():
        x.sum().item()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_backward_pass_sync_debug_mode_error(backend, case, dtype):
    logits, target = _inputs("cuda", n=64, V=1000)
    logits = logits.to(dtype)
    kwargs = _case_kwargs(case, logits.shape[1], "cuda")
    _loss_and_grad(logits, target, backend=backend, **kwargs)  # warm-up: JIT-compile the kernels
    upstream = torch.rand(target.shape, device="cuda")
    x = logits.clone().requires_grad_(True)
    torch.cuda.synchronize()
    with _sync_debug_mode_error():
        loss = smoothed_xent(x * 1.0, target, 0.1, backend=backend, **kwargs)
        loss.backward(upstream if kwargs["reduction"] == "none" else None)
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_evaluation_passes_sync_debug_mode_error(backend, case):
    logits, target = _inputs("cuda", n=64, V=1000)
    kwargs = _case_kwargs(case, logits.shape[1], "cuda")
    with torch.no_grad():
        smoothed_xent(logits, target, 0.1, backend=backend, **kwargs)  # warm-up: JIT-compile the kernels
        torch.cuda.synchronize()
        with _sync_debug_mode_error():
            loss = smoothed_xent(logits, target, 0.1, backend=backend, **kwargs)
    assert torch.isfinite(loss).all()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_graph_captures_forward_and_backward(backend, inplace):
    if inplace and backend == "torch":
        pytest.skip("inplace_backward needs a fused backend")
    N, d, V = 64, 32, 1000
    W = torch.randn(d, V, device="cuda", requires_grad=True)
    static_h = torch.randn(N, d, device="cuda")
    static_target = torch.randint(0, V, (N,), device="cuda")
    static_count = torch.zeros((), device="cuda")  # the global-token-count normaliser, a graph input

    def step():
        logits = static_h @ W
        loss = smoothed_xent(logits, static_target, 0.1, normalizer=static_count, inplace_backward=inplace,
                             backend=backend)
        loss.backward()
        return loss

    static_count.fill_(float(N))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(3):
            W.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    W.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    for _ in range(2):  # replay with new data, normaliser included, and compare with eager
        h = torch.randn(N, d, device="cuda")
        target = torch.randint(0, V, (N,), device="cuda")
        target[::5] = -100
        count = (target != -100).sum() * 2.0
        static_h.copy_(h)
        static_target.copy_(target)
        static_count.copy_(count)
        graph.replay()
        W_ref = W.detach().clone().requires_grad_(True)
        ref = F.cross_entropy(h @ W_ref, target, label_smoothing=0.1, reduction="sum") / count
        ref.backward()
        torch.testing.assert_close(static_loss, ref.detach(), rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(W.grad, W_ref.grad, rtol=2e-5, atol=1e-6)
