"""Bad input gets a clear Python error, and nothing is read or written out of bounds."""

from __future__ import annotations

import pytest
import torch

from oracle import masses

from fused_ls import smoothed_xent
from fused_ls.backends import row_ops


def _ok(device, n=4, V=10):
    return torch.randn(n, V, device=device), torch.randint(0, V, (n,), device=device)


@pytest.mark.parametrize("bad_target", [10, 11, -1, -101])
def test_out_of_range_target_raises_on_cpu(backend, device, bad_target):
    logits, target = _ok(device)
    target[2] = bad_target
    if device.type != "cpu":
        pytest.skip("on CUDA an out-of-range target gives NaN instead (no host sync)")
    with pytest.raises(IndexError, match=f"target {bad_target} is out of range for 10 classes"):
        smoothed_xent(logits, target, backend=backend)


def test_kernel_never_reads_an_out_of_range_target(fused_backend, device):
    # The op under the Python checks: the row gets a NaN loss and a zero gradient, and
    # every other row is untouched.
    logits, target = _ok(device, n=3, V=16)
    target[1] = 1 << 40
    ops = row_ops(fused_backend)
    one = torch.ones((), device=device)
    loss, lse, grad = ops.rows(logits, target, None, one, *masses(0.1, 16), -100, 0.0, 0.0, 1.0)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.all(grad[1] == 0) and torch.isfinite(lse).all()


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda x, t: (x, t.float()), TypeError, "target must hold class indices"),
        (lambda x, t: (x.int(), t), TypeError, "logits must be float32"),
        (lambda x, t: (x, t[:-1]), ValueError, "target shape"),
        (lambda x, t: (x, t.view(2, 2)), ValueError, "target shape"),
        (lambda x, t: (x, t.to("meta")), ValueError, "target is on meta"),
    ],
)
def test_mismatched_inputs_raise(device, make, error, message):
    logits, target = make(*_ok(device))
    with pytest.raises(error, match=message):
        smoothed_xent(logits, target)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing must be in"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
        ({"softcap": -3.0}, ValueError, "softcap must be > 0"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"convention": "fairseq"}, ValueError, "convention must be one of"),
        ({"z_loss": float("nan")}, ValueError, "z_loss must be finite"),
        ({"weight": torch.ones(9)}, ValueError, "weight must be a 1-D tensor of 10"),
        ({"weight": torch.ones(10, dtype=torch.long)}, TypeError, "weight must be floating point"),
        ({"weight": torch.ones(10, device="meta")}, ValueError, "weight is on meta"),
        ({"backend": "cudnn"}, ValueError, "unknown backend"),
    ],
)
def test_bad_arguments_raise(kwargs, error, message):
    logits, target = _ok("cpu")
    with pytest.raises(error, match=message):
        smoothed_xent(logits, target, **kwargs)


def test_others_convention_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        smoothed_xent(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), convention="others")


def test_inputs_are_not_modified_by_a_failed_call(device):
    logits, target = _ok(device)
    target[0] = 99
    before = logits.clone(), target.clone()
    with pytest.raises((IndexError, ValueError)):
        smoothed_xent(logits, target, label_smoothing=2.0)
    assert torch.equal(logits, before[0]) and torch.equal(target, before[1])


def test_triton_on_cpu_without_the_interpreter_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run on cpu tensors: it needs CUDA"):
        smoothed_xent(*_ok("cpu"), backend="triton")


def test_environment_variable_chooses_the_backend(monkeypatch):
    monkeypatch.setenv("FUSED_LS_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        smoothed_xent(*_ok("cpu"))
    monkeypatch.setenv("FUSED_LS_BACKEND", "torch")
    logits, target = _ok("cpu")
    logits.requires_grad_(True)
    smoothed_xent(logits, target).backward()
    assert logits.grad.shape == logits.shape


def test_explicit_argument_beats_the_environment(monkeypatch):
    monkeypatch.setenv("FUSED_LS_BACKEND", "no-such-backend")
    smoothed_xent(*_ok("cpu"), backend="torch")


def test_unbuilt_native_backend_raises_naming_what_is_missing(monkeypatch):
    from fused_ls import backends

    monkeypatch.setattr(backends, "_native_status", lambda: (None, "the extension fused_ls._C is not built (test)"))
    with pytest.raises(RuntimeError, match="backend 'native' is unavailable: the extension fused_ls._C is not built"):
        smoothed_xent(*_ok("cpu"), backend="native")
