"""Every Triton launch the tuner may choose gives the same numbers, and the tuner checks a
candidate before it trusts it, keeps its choice, obeys a pin, and never writes the caller's
tensors. Under the interpreter on the CPU; tests/test_triton_targets.py compiles the same
launches for sm_80/90/100."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import GRAD_TOL, LOSS_TOL, TRITON_FLOAT64_GRAD_ATOL, masses, truth

pytest.importorskip("triton")
from fused_ls import available_backends, smoothed_xent  # noqa: E402

if "triton" not in available_backends("cuda" if torch.cuda.is_available() else "cpu"):
    pytest.skip("the Triton backend cannot run here", allow_module_level=True)

from fused_ls.triton import smoothed_xent as kernel  # noqa: E402
from fused_ls.triton import tuning  # noqa: E402


@pytest.fixture
def small_blocks(monkeypatch, tmp_path):
    """Launch sizes the interpreter runs quickly, so that every kind of launch is reached at
    small V; a private tuning cache."""
    monkeypatch.setattr(kernel, "MAX_SINGLE_BLOCK", 16)
    monkeypatch.setattr(kernel, "CHUNKED_BLOCK", 16)
    monkeypatch.setenv("FUSED_LS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_LS_TRITON_LAUNCH", raising=False)
    tuning.forget()
    yield
    tuning.forget()


def _rows(device, dtype, V, N=11):
    logits = (torch.randn(N, V, dtype=torch.float64, device=device) * 3).to(dtype)
    logits[3, : V // 2] = -math.inf  # a masked half-row: whole chunks of -inf
    target = torch.randint(0, V, (N,), device=device)
    target[1], target[2], target[5] = -100, V - 1, 0
    target[3] = V - 1  # a finite target in the masked row
    logits[8] = -math.inf  # an ignored row of padding: all -inf, a gradient of 0
    target[8] = -100
    return logits, target


@pytest.mark.parametrize("V", [29, 75])
@pytest.mark.parametrize("features", ["plain", "weight and softcap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_launch_gives_the_oracles_numbers(small_blocks, device, V, features, dtype):
    logits, target = _rows(device, dtype, V)
    N = logits.shape[0]
    weight = torch.rand(V, device=device) + 0.5 if features != "plain" else None
    softcap = 6.0 if features != "plain" else 0.0
    scale = torch.rand(N, device=device) + 0.5
    k_s, k_t = masses(0.1, V, others=True)
    kwargs = {"weight": weight, "softcap": softcap or None, "convention": "others", "z_loss": 1e-3}
    true_rows, true_grad = truth(logits, target, 0.1, reduction="none", upstream=scale, **kwargs)
    true_rows[8], true_grad[8] = 0.0, 0.0  # the oracle's NaN for a row of -inf; ignored: 0 by contract
    configs = kernel.candidate_configs(V, dtype, weight is not None, softcap > 0, split=True)
    assert {"streamed", "persistent", "split"} <= {c.kind for c in configs}
    # The split launch with segments the interpreter runs quickly: one turn of programs, and several.
    configs += [kernel.LaunchConfig("split", 16, 4, 1), kernel.LaunchConfig("split", 16, 4, 8)]
    for config in configs:
        loss = torch.full((N,), math.nan, device=device)
        lse = torch.full_like(loss, math.nan)
        grad = torch.full_like(logits, math.nan)  # poisoned: an element nothing wrote stays NaN
        weight_sum = None if weight is None else weight.sum()
        kernel.smoothed_xent_rows_out(logits, target, weight, weight_sum, scale, grad, loss, lse,
                                      k_s, k_t, -100, 1e-3, softcap, 1.0, config=config)
        torch.testing.assert_close(loss.double(), true_rows, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1],
                                   msg=lambda m, c=config: f"{c.name}: {m}")
        torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=GRAD_TOL[dtype][1],
                                   msg=lambda m, c=config: f"{c.name}: {m}")
        assert (grad[1] == 0).all()  # an ignored row: zeros, its logits not read again


def _layout(layout, N, V, dtype, device):
    """(logits, gradient buffer or None, the buffers they are views of) in one of the layouts
    users pass; the buffers' bytes outside the views are poisoned with a sentinel."""
    logits_src, target = _rows(device, dtype, V, N)
    width = {"padded rows": V + 3, "column view": V + 2}.get(layout, V)
    logits_buffer = torch.full((N, width), 7.0, dtype=dtype, device=device)
    offset = 1 if layout == "column view" else 0
    logits = logits_buffer[:, offset:offset + V]
    logits.copy_(logits_src)
    if layout == "loss only":
        return logits, None, target, ()
    if layout == "in place":
        return logits, logits, target, (logits_buffer,)
    grad_width = V + 1 if layout == "gradient of another row stride" else width
    grad_buffer = torch.full((N, grad_width), 7.0, dtype=dtype, device=device)
    return logits, grad_buffer[:, offset:offset + V], target, (logits_buffer, grad_buffer)


# (layout, whether the rows are read as an aligned body and scalar edges at V = 29)
LAYOUTS = {
    "contiguous": True, "padded rows": True, "in place": True, "loss only": True,
    "column view": False,  # a base not 16-byte aligned: Triton's scalar accesses
    "gradient of another row stride": False,  # no one split of a row fits both
}


@pytest.mark.parametrize("V", [29, 6])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_rows_at_any_offset_from_a_16_byte_boundary_give_the_oracles_numbers(device, V, layout, dtype):
    """V not a multiple of 16: each row starts at another offset from a 16-byte boundary, and is
    read as an aligned body plus scalar edges; every launch kind, poisoned outputs, and the
    bytes around the views untouched."""
    N = 11
    logits, grad, target, buffers = _layout(layout, N, V, dtype, device)
    assert kernel.aligned_body(logits, grad) == LAYOUTS[layout]
    weight = torch.rand(V, device=device) + 0.5
    k_s, k_t = masses(0.1, V)
    scale = torch.rand(N, device=device) + 0.5
    true_rows, true_grad = truth(logits.clone(), target, 0.1, reduction="none", upstream=scale, weight=weight,
                                 z_loss=1e-3)
    true_rows[8], true_grad[8] = 0.0, 0.0  # the oracle's NaN for a row of -inf; ignored: 0 by contract
    original = logits.clone()
    grad_atol = TRITON_FLOAT64_GRAD_ATOL if dtype == torch.float64 else GRAD_TOL[dtype][1]
    for config in (kernel.LaunchConfig("single", 32, 4), kernel.LaunchConfig("streamed", 8, 4),
                   kernel.LaunchConfig("persistent", 8, 4, 1)):
        logits.copy_(original)
        if grad is not None and grad is not logits:
            grad.fill_(math.nan)  # poisoned: an element nothing wrote stays NaN
        loss = torch.full((N,), math.nan, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          device=device)
        lse = torch.full_like(loss, math.nan)
        kernel.smoothed_xent_rows_out(logits, target, weight, weight.sum(), None if grad is None else scale, grad,
                                      loss, lse, k_s, k_t, -100, 1e-3, 0.0, 1.0, config=config)
        torch.testing.assert_close(loss.double(), true_rows, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1],
                                   msg=lambda m, c=config: f"{c.name}: {m}")
        if grad is not None:
            torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=grad_atol,
                                       msg=lambda m, c=config: f"{c.name}: {m}")
        for buffer in buffers:  # nothing written outside the views
            outside = torch.ones_like(buffer, dtype=torch.bool)
            outside[:, 1 if layout == "column view" else 0:][:, :V] = False
            assert (buffer[outside] == 7.0).all(), config.name


def test_the_aligned_body_is_used_exactly_where_triton_cannot_prove_16_byte_accesses(device):
    aligned = torch.empty(4, 4096, dtype=torch.bfloat16, device=device)
    assert not kernel.aligned_body(aligned, torch.empty_like(aligned))  # Triton's own proof holds
    assert kernel.aligned_body(torch.empty(4, 50257, dtype=torch.bfloat16, device=device), None)
    assert kernel.aligned_body(torch.empty(4, 1000, dtype=torch.bfloat16, device=device), None)
    padded = torch.empty(4, 4104, dtype=torch.bfloat16, device=device)[:, :4096]  # rows 8 elements apart
    assert kernel.aligned_body(padded, None)


def test_a_persistent_launch_takes_every_row_with_fewer_programs_than_rows(small_blocks, device):
    config = kernel.LaunchConfig("persistent", 16, 4, programs_per_sm=1)
    sms = kernel.device_shape(device)[0]
    assert kernel.grid_size(config, 50, 40, torch.float32, device) == sms < 50
    # Sized to L2: the rows in flight fill at most 3/4 of it.
    l2 = kernel.LaunchConfig("persistent", 16, 4)
    l2_bytes = kernel.device_shape(device)[1]
    assert kernel.grid_size(l2, 10**6, 4096, torch.bfloat16, device) == (3 * l2_bytes // 4) // (4096 * 2)


def _fake_outputs(value):
    return (torch.full((3,), value), torch.zeros(3), torch.zeros(3, 4))


def test_the_tuner_keeps_the_fastest_candidate_that_agrees_and_remembers_it(small_blocks):
    times = {"default": 3.0, "wrong": 1.0, "fast": 2.0, "broken": 0.5}

    def trial(name):
        if name == "broken":
            raise RuntimeError("cannot run here")
        return _fake_outputs(2.0 if name == "wrong" else 1.0)

    timed = []

    def timer(fn):
        name = ("default", "fast")[len(timed)]  # only the two that agree may be timed
        timed.append(name)
        return times[name]

    choice = tuning.choose("key", list(times), trial, may_tune=True, timer=timer)
    assert choice == "fast" and timed == ["default", "fast"]
    assert tuning.cache_path().exists()
    # A new process reads the choice from disk and does not tune again.
    tuning.forget()
    assert tuning.choose("key", list(times), lambda name: pytest.fail("tuned again"), may_tune=True) == "fast"


def test_the_tuner_drops_a_candidate_whose_predictions_differ_by_one_class(small_blocks):
    def trial(name):
        predicted = torch.tensor([5, 7, 1000 if name != "wrong" else 1001])
        return (*_fake_outputs(1.0), predicted)

    times = {"default": 3.0, "wrong": 1.0}
    choice = tuning.choose("key", list(times), trial, may_tune=True, timer=lambda fn: times.pop(next(iter(times))))
    assert choice == "default"


def test_no_tuning_where_timing_would_sync_or_capture(small_blocks):
    names = ["default", "other"]
    assert tuning.choose("key", names, lambda name: pytest.fail("tuned"), may_tune=False) == "default"
    assert not tuning.cache_path().exists()


def test_a_pinned_launch_is_used_where_it_is_a_candidate(small_blocks, monkeypatch):
    monkeypatch.setenv("FUSED_LS_TRITON_LAUNCH", "other")
    assert tuning.choose("key", ["default", "other"], lambda n: pytest.fail("tuned"), may_tune=True) == "other"
    with pytest.warns(UserWarning, match="not a launch"):
        assert tuning.choose("key2", ["default"], lambda n: pytest.fail("tuned"), may_tune=True) == "default"


def test_tuning_an_in_place_launch_never_writes_the_callers_logits(small_blocks, monkeypatch, device):
    # As on a GPU (tuning on), with the interpreter's launches and a stand-in timer that
    # favours the last candidate: the in-place gradient must still be the out-of-place one.
    seen = []

    def timer(fn):
        fn()
        seen.append(fn)
        return 1.0 / len(seen)  # each candidate faster than the one before

    monkeypatch.setattr(kernel, "_may_tune", lambda logits: True)
    monkeypatch.setattr(tuning, "_cuda_time_ms", timer)
    V = 75
    logits, target = _rows(device, torch.float32, V)
    logits[3] = torch.randn(V, device=device)
    logits[8] = torch.randn(V, device=device)  # the oracle (PyTorch) gives a padding row of -inf a NaN gradient
    x = logits.clone().requires_grad_(True)
    expected = torch.autograd.grad(smoothed_xent(x, target, 0.1, backend="torch"), x)[0]
    h = logits.clone().requires_grad_(True)
    produced = h * 1.0  # logits made by an op, so they may be overwritten
    loss = smoothed_xent(produced, target, 0.1, backend="triton", inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, h)
    assert len(seen) > 1, "the tuner did not run"
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_tuning_ahead_tunes_the_training_and_evaluation_launches_and_leaves_the_inputs(small_blocks, monkeypatch,
                                                                                      device):
    import fused_ls

    monkeypatch.setattr(kernel, "_may_tune", lambda logits: True)
    monkeypatch.setattr(tuning, "_cuda_time_ms", lambda fn: (fn(), 1.0)[1])
    logits, target = _rows(device, torch.bfloat16, 75)
    before = logits.clone()
    fused_ls.tune(logits, target, 0.1, backend="triton", inplace_backward=True)
    assert torch.equal(logits, before)
    with_gradient = [key for key in tuning._CHOICES if key.endswith("|True|")]
    loss_only = [key for key in tuning._CHOICES if key.endswith("|False|")]
    assert len(with_gradient) == 1 and len(loss_only) == 1


def test_tuning_is_off_with_autotune_0_even_where_a_choice_is_cached(small_blocks, monkeypatch):
    tuning.choose("key", ["default", "fast"], lambda n: _fake_outputs(1.0), may_tune=True,
                  timer=lambda fn: {"default": 2.0, "fast": 1.0}[fn.__defaults__[0]])
    monkeypatch.setenv("FUSED_LS_AUTOTUNE", "0")
    assert tuning.choose("key", ["default", "fast"], lambda n: pytest.fail("tuned"), may_tune=True) == "default"


@pytest.mark.parametrize("content", ["[1, 2]", "null", "{not json", '{"key": 3}'])
def test_an_unusable_cache_file_is_ignored(small_blocks, content):
    tuning.cache_path().parent.mkdir(parents=True, exist_ok=True)
    tuning.cache_path().write_text(content)
    assert tuning.choose("key", ["default", "other"], lambda n: pytest.fail("tuned"), may_tune=False) == "default"


def test_no_home_directory_costs_the_disk_cache_only(small_blocks, monkeypatch):
    monkeypatch.delenv("FUSED_LS_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(tuning.Path, "home", staticmethod(no_home))
    times = {"default": 2.0, "fast": 1.0}
    assert tuning.choose("key", list(times), lambda n: _fake_outputs(1.0), may_tune=True,
                         timer=lambda fn: times[fn.__defaults__[0]]) == "fast"


def test_an_empty_batch_is_not_tuned(small_blocks, monkeypatch, device):
    monkeypatch.setattr(kernel, "_may_tune", lambda logits: True)
    monkeypatch.setattr(tuning, "_cuda_time_ms", lambda fn: pytest.fail("tuned an empty batch"))
    logits = torch.randn(0, 75, device=device, requires_grad=True)
    smoothed_xent(logits, torch.zeros(0, dtype=torch.long, device=device), 0.1, reduction="sum",
                  backend="triton").backward()
    assert not tuning._CHOICES


@pytest.mark.parametrize("kwargs", [{"reduction": "none"}, {"return_lse": True}, {"reduction": "sum"}])
def test_tuning_ahead_takes_every_form_of_the_loss(small_blocks, device, kwargs):
    import fused_ls

    logits, target = _rows(device, torch.float32, 75)
    fused_ls.tune(logits, target, 0.1, backend="triton", **kwargs)


def test_scaling_a_saved_gradient_reads_its_strides_and_keeps_float64(device):
    from fused_ls import _autograd

    for dtype in (torch.float32, torch.float64):
        grad = torch.randn(9, 6, dtype=dtype, device=device).t()  # rows of stride 6: not the kernel's layout
        scale = torch.rand(6, dtype=dtype, device=device) + 0.5
        expected = grad * scale.unsqueeze(1)
        _autograd._multiply_cuda(grad, scale)
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    grad = torch.randn(4, 33, dtype=torch.float64, device=device)
    scale = torch.tensor([1 + 2**-40, 3.0, 1.0, -0.5], dtype=torch.float64, device=device)
    expected = grad * scale.unsqueeze(1)
    kernel.scale_rows_(grad, scale)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)  # no float32 rounding, no skipped 1 + 2^-40


def test_a_decided_launch_is_looked_up_not_decided_again_and_a_new_pin_still_wins(small_blocks, monkeypatch, device):
    monkeypatch.setattr(kernel, "_may_tune", lambda logits: True)
    monkeypatch.setattr(tuning, "_cuda_time_ms", lambda fn: (fn(), 1.0)[1])
    logits, target = _rows(device, torch.float32, 75)
    smoothed_xent(logits, target, 0.1, backend="triton")  # no grad needed: the loss-only launch, tuned
    original = tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: pytest.fail("decided again"))
    smoothed_xent(logits, target, 0.1, backend="triton")
    monkeypatch.setattr(tuning, "choose", original)
    monkeypatch.setenv("FUSED_LS_TRITON_LAUNCH", "streamed-b2048-w4")
    chosen = []
    monkeypatch.setattr(kernel, "smoothed_xent_rows_out",
                        lambda *a, config=None, **k: chosen.append(config.name))
    smoothed_xent(logits, target, 0.1, backend="triton")
    assert chosen == ["streamed-b2048-w4"]
