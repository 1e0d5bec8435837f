"""Token accuracy and predictions come from the pass that reads the logits anyway: each row's
prediction is the first class of largest y (the logits after logit_scale and softcap), as
torch.argmax takes it, on every backend, launch and mode, and asking for them changes no loss
or gradient bit.

The logits are drawn on a coarse grid (multiples of 1/4 in [-10, 10]), exact in every dtype,
so that rows hold many exact ties (the first-index rule is tested on every row) while distinct
values stay far apart after a softcap (no backend's tanh rounding can reorder them).
"""

from __future__ import annotations

import math

import pytest
import torch

from fused_ls import SmoothedCrossEntropyLoss, SmoothedXentOutput, smoothed_xent
from fused_ls.backends import row_ops
from fused_ls.triton import smoothed_xent as triton_rows
from oracle import masses
from test_native import _run_emulated, emulated_cuda  # noqa: F401  (a fixture)

FEATURES = {
    "plain": {},
    "softcap": {"softcap": 30.0},
    "logit_scale": {"logit_scale": 0.5},
    "weight": {"weight": True},
}


def grid_logits(N, V, dtype, device, *, offset=0, masked_row=True):
    """(N, V) logits on the 1/4 grid, as a view `offset` elements into each padded row."""
    storage = torch.randint(-40, 41, (N, V + offset + 3), device=device).to(dtype) / 4
    logits = storage[:, offset:offset + V]
    if masked_row:
        logits[0] = -math.inf  # a fully masked row (a NaN loss): class 0, as argmax gives
    if N > 2:
        logits[1, : V // 2] = -math.inf  # a masked half of the vocabulary
    if N > 3:
        logits[2, -1] = 11.0  # the last class alone at the top
    if N > 4:
        logits[3, 0] = 11.0  # the first class alone at the top
    return logits


def expected_predictions(logits, softcap=None, logit_scale=1.0):
    y = logits.double() * logit_scale
    if softcap:
        y = softcap * torch.tanh(y / softcap)
    return y.argmax(dim=-1)


def expected_accuracy(predicted, target, ignore_index=-100):
    valid = target != ignore_index
    if not valid.any():
        return torch.zeros((), dtype=torch.float32)
    return (predicted[valid] == target[valid]).float().mean()


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [203, 5000])  # one chunk of the CPU kernel and the Triton launches; several
def test_predictions_are_the_first_class_of_largest_y_on_every_backend(backend, device, feature, dtype, V):
    options = dict(FEATURES[feature])
    N = 9
    logits = grid_logits(N, V, dtype, device, offset=1)
    target = torch.randint(0, V, (N,), device=device, dtype=torch.int32)
    target[4] = -100
    target[5] = expected_predictions(logits[5]).item()  # one row surely right
    if options.pop("weight", False):
        options["weight"] = torch.rand(V, device=device, dtype=dtype if dtype == torch.float64 else torch.float32)
    out = smoothed_xent(logits, target, 0.1, return_accuracy=True, return_predictions=True, backend=backend,
                        **options)
    assert isinstance(out, SmoothedXentOutput) and out.lse is None
    want = expected_predictions(logits, options.get("softcap"), options.get("logit_scale", 1.0))
    assert out.predictions.dtype == torch.int64 and out.predictions.shape == target.shape
    torch.testing.assert_close(out.predictions, want, rtol=0, atol=0)
    torch.testing.assert_close(out.accuracy, expected_accuracy(want, target.long()), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["saved", "inplace", "recompute", "no_grad"])
def test_asking_for_predictions_changes_no_loss_or_gradient_bit_in_any_mode(fused_backend, device, mode):
    N, V = 7, 130
    logits = grid_logits(N, V, torch.float32, device, masked_row=False) + torch.rand(N, V, device=device) / 8
    target = torch.randint(0, V, (N, 2), device=device)[:, 0]  # a strided target
    target[3] = -100
    kwargs = dict(backend=fused_backend, z_loss=1e-3, inplace_backward=mode == "inplace",
                  recompute_backward=mode == "recompute")

    def run(**extra):
        x = (logits.clone() * 1.0).requires_grad_(mode != "no_grad")
        leaf = x
        if mode == "inplace":
            x = x * 1.0  # an op's output may be overwritten; the leaf may not
        with torch.set_grad_enabled(mode != "no_grad"):
            out = smoothed_xent(x, target, 0.1, **kwargs, **extra)
            loss = out.loss if isinstance(out, SmoothedXentOutput) else out
            if mode != "no_grad":
                loss.backward()
        return out, None if mode == "no_grad" else leaf.grad

    plain_loss, plain_grad = run()
    out, grad = run(return_accuracy=True, return_predictions=True, return_lse=True)
    torch.testing.assert_close(out.loss, plain_loss, rtol=0, atol=0)
    if grad is not None:
        torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)
    want = expected_predictions(logits)
    torch.testing.assert_close(out.predictions, want, rtol=0, atol=0)
    torch.testing.assert_close(out.accuracy, expected_accuracy(want, target), rtol=0, atol=0)
    torch.testing.assert_close(out.lse, torch.logsumexp(logits.double(), -1).float(), rtol=1e-5, atol=1e-5)


def test_every_row_op_writes_every_prediction(fused_backend, device):
    """The op-level contract, on a poisoned buffer: every row written, by all three ops."""
    N, V = 6, 77
    logits = grid_logits(N, V, torch.float32, device)
    target = torch.randint(0, V, (N,), device=device)
    target[2] = -100
    options = (*masses(0.1, V), -100, 0.0, 0.0, 1.0)
    one = torch.ones((), device=device)
    ops = row_ops(fused_backend)
    want = expected_predictions(logits)
    for run in (lambda p: ops.rows(logits, target, None, one, *options, p),
                lambda p: ops.rows_loss(logits, target, None, *options, p),
                lambda p: ops.rows_inplace(logits.clone(), target, None, one, *options, p)):
        predicted = torch.full((N,), -7, dtype=torch.int64, device=device)
        run(predicted)
        torch.testing.assert_close(predicted, want, rtol=0, atol=0)


def test_a_wrong_prediction_buffer_is_refused(fused_backend, device):
    logits = torch.randn(4, 9, device=device)
    target = torch.zeros(4, dtype=torch.int64, device=device)
    options = (*masses(0.1, 9), -100, 0.0, 0.0, 1.0)
    for bad in (torch.empty(3, dtype=torch.int64, device=device), torch.empty(4, dtype=torch.int32, device=device),
                torch.empty(8, dtype=torch.int64, device=device)[::2]):
        with pytest.raises((ValueError, RuntimeError), match="predicted"):
            row_ops(fused_backend).rows_loss(logits, target, None, *options, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_triton_launch_takes_the_first_argmax(device, dtype, monkeypatch):
    """Each candidate launch (in registers, streamed, persistent, split across programs), on
    rows whose starts are not 16-byte aligned (the aligned body with scalar edges) and rows
    that are; several ties a row."""
    monkeypatch.setenv("FUSED_LS_UNVALIDATED_LAUNCHES", "1")
    N, V = 5, 9000  # past MAX_SINGLE_BLOCK: every kind of launch is a candidate
    for offset in (0, 1):
        logits = grid_logits(N, V, dtype, device, offset=offset)
        target = torch.randint(0, V, (N,), device=device)
        want = expected_predictions(logits)
        for config in triton_rows.candidate_configs(V, dtype, False, False, split=True, predict=True):
            loss = torch.empty(N, device=device)
            lse = torch.empty(N, device=device)
            grad = torch.empty(N, V, dtype=dtype, device=device)
            predicted = torch.full((N,), -7, dtype=torch.int64, device=device)
            args = (logits, target, None, None, torch.ones((), device=device), grad, loss, lse, *masses(0.1, V),
                    -100, 0.0, 0.0, 1.0)
            if config.kind == "split":
                triton_rows._launch_split(*args, config, predicted_out=predicted)
            else:
                triton_rows.smoothed_xent_rows_out(*args, predicted_out=predicted, config=config)
            torch.testing.assert_close(predicted, want, rtol=0, atol=0, msg=lambda m, c=config: f"{c.name}: {m}")


def test_accuracy_of_a_batch_with_every_target_ignored_is_zero(backend, device):
    logits = torch.randn(3, 10, device=device)
    target = torch.full((3,), -100, device=device)
    out = smoothed_xent(logits, target, 0.1, return_accuracy=True, backend=backend)
    assert out.accuracy.item() == 0.0 and out.predictions is None


def test_accuracy_counts_a_custom_ignore_index_and_leading_dimensions(backend, device):
    logits = grid_logits(4, 31, torch.float32, device).reshape(2, 2, 31)
    target = torch.randint(0, 31, (2, 2), device=device)
    target[0, 1] = 5
    out = smoothed_xent(logits, target, 0.0, ignore_index=5, reduction="none", return_accuracy=True,
                        return_predictions=True, backend=backend)
    want = expected_predictions(logits)
    assert out.predictions.shape == (2, 2) and out.loss.shape == (2, 2)
    torch.testing.assert_close(out.predictions, want, rtol=0, atol=0)
    torch.testing.assert_close(out.accuracy, expected_accuracy(want.flatten(), target.flatten(), 5), rtol=0, atol=0)


def test_the_module_returns_accuracy_too(device):
    module = SmoothedCrossEntropyLoss(0.1, return_accuracy=True)
    logits = torch.randn(5, 12, device=device)
    target = logits.argmax(-1)
    out = module(logits, target)
    assert out.accuracy.item() == 1.0


def test_compiled_training_step_returns_accuracy_without_graph_break(fused_backend, device):
    torch._dynamo.reset()
    logits = torch.randn(6, 40, device=device, requires_grad=True)
    target = torch.randint(0, 40, (6,), device=device)
    target[0] = logits[0].argmax()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, t):
        out = smoothed_xent(x * 2.0, t, 0.1, return_accuracy=True, return_predictions=True, backend=fused_backend)
        return out.loss, out.accuracy, out.predictions

    loss, accuracy, predictions = step(logits, target)
    loss.backward()
    torch.testing.assert_close(predictions, logits.detach().argmax(-1), rtol=0, atol=0)
    torch.testing.assert_close(accuracy, expected_accuracy(predictions, target), rtol=0, atol=0)
    ref = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref * 2.0, target, label_smoothing=0.1).backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_accuracy_with_the_vocabulary_split_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="return_accuracy"):
        smoothed_xent(torch.randn(2, 4), torch.zeros(2, dtype=torch.int64), process_group=object(),
                      return_accuracy=True)


@pytest.mark.parametrize("dtype, V, padding, blocks, loss_only", [
    (torch.float32, 1000, 0, 1, False),
    (torch.bfloat16, 3001, 3, 1, True),     # unaligned rows, the loss-only kernel
    (torch.float16, 5003, 1, 4, False),     # a row split over 4 blocks
    (torch.float64, 301, 0, 1, False),
    (torch.float64, 5000, 0, 3, False),    # fp64 rows are not split when predicting: one block each
])
def test_cuda_kernels_take_the_first_argmax_in_pass_one(emulated_cuda, dtype, V, padding, blocks, loss_only):
    """The native CUDA kernels, run on the CPU (tests/cuda_host_emulation.cpp): every row's
    prediction from a poisoned buffer, with ties, masked rows and split rows."""
    N = 5
    logits = grid_logits(N, V, dtype, "cpu", offset=padding)
    target = torch.randint(0, V, (N,))
    target[3] = -100
    predicted = torch.full((N,), -7, dtype=torch.int64)
    _run_emulated(emulated_cuda, logits, target, None, 0.1, blocks, loss_only=loss_only, softcap=30.0,
                  predicted=predicted)
    torch.testing.assert_close(predicted, expected_predictions(logits, 30.0), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_linear_head_predicts_each_token_from_its_chunks_pass(backend, device, reduction):
    """smoothed_linear_xent over several chunks: the predictions of the logits it never holds
    whole, and the same loss and gradients as without them."""
    from fused_ls import smoothed_linear_xent

    N, H, V = 11, 8, 37
    hidden = torch.randn(N, H, device=device, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, device=device, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (N,), device=device)
    target[4] = -100
    target[0] = (hidden[0] @ weight.T).argmax()
    plain = smoothed_linear_xent(hidden, weight, target, None, 0.1, reduction=reduction, chunk_size=4,
                                 backend=backend)
    out = smoothed_linear_xent(hidden, weight, target, None, 0.1, reduction=reduction, chunk_size=4, backend=backend,
                               return_accuracy=True, return_predictions=True)
    want = (hidden @ weight.T).argmax(-1)
    torch.testing.assert_close(out.predictions, want, rtol=0, atol=0)
    torch.testing.assert_close(out.accuracy, expected_accuracy(want, target), rtol=0, atol=0)
    grads = torch.autograd.grad(out.loss.sum(), (hidden, weight))
    plain_grads = torch.autograd.grad(plain.sum(), (hidden, weight))
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0)
    for got, expected in zip(grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_module_asking_for_accuracy_over_a_split_vocabulary_is_refused_when_built():
    from fused_ls import SmoothedLinearCrossEntropyLoss

    for module in (SmoothedCrossEntropyLoss, SmoothedLinearCrossEntropyLoss):
        with pytest.raises(ValueError, match="return_accuracy"):
            module(0.1, return_accuracy=True, process_group=object())


def test_a_float64_row_split_over_cuda_blocks_keeps_its_bits_but_for_the_documented_last_ones(emulated_cuda):
    """The one documented exception to "asking changes no bit": the native CUDA kernels take a
    float64 row with predictions in one block; float32 and bfloat16 split rows keep every bit."""
    N, V = 3, 20000
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.randn(N, V).to(dtype)
        target = torch.randint(0, V, (N,))
        plain = _run_emulated(emulated_cuda, logits, target, None, 0.1, 4)
        predicted = torch.full((N,), -7, dtype=torch.int64)
        asked = _run_emulated(emulated_cuda, logits, target, None, 0.1, 4, predicted=predicted)
        torch.testing.assert_close(predicted, logits.double().argmax(-1), rtol=0, atol=0)
        exact = dtype != torch.float64
        for got, want in zip(asked, plain):
            torch.testing.assert_close(got, want, rtol=0 if exact else 1e-13, atol=0 if exact else 1e-15)
