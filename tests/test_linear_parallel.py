"""The vocabulary-parallel linear head: on every rank, the loss, lse and the gradients of
hidden, of its weight slice and of its bias slice equal the float64 result of one process
holding the whole head (F.linear, then the float64 reference).

As in test_parallel.py, each world size (2 and 4 gloo processes) is one spawned group that
runs every case; each case is then reported as its own test. Every rank builds the same full
head from one seed, computes the single-process truth, runs its own rows of the head through
`smoothed_linear_xent(..., process_group=...)`, and compares; the parent also checks that all
ranks report bitwise the same loss.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fused_ls import SmoothedLinearCrossEntropyLoss, smoothed_linear_xent, smoothed_xent_reference

WORLD_SIZES = (2, 4)
HIDDEN = 6

# Rows of the head per rank. "uneven" has a single-class slice; "empty" a rank with none.
SPLITS = {
    "even": {2: (8, 8), 4: (6, 6, 6, 6)},
    "uneven": {2: (5, 11), 4: (5, 11, 1, 7)},
    "empty": {2: (13, 0), 4: (4, 0, 9, 3)},
}

# name -> how the case differs from: float64, 13 tokens in chunks of 5 (the last one short),
# uneven slices, a bias, 20% ignored targets, eps = 0.1, reduction "mean", offsets gathered at
# first use, an upstream gradient of 0.7 (random per token for "none").
CASES = {
    "uniform_mean_even_slices": dict(split="even"),
    "uniform_mean_uneven_slices": dict(),
    "others_convention_spreads_eps_over_the_global_vocabulary": dict(kwargs=dict(convention="others")),
    "class_weights_sliced_mean_over_global_weight_sum": dict(weight=True),
    "class_weights_others_convention_sum": dict(weight=True, kwargs=dict(convention="others", reduction="sum")),
    "ignore_index_rows": dict(ignore_fraction=0.4, kwargs=dict(ignore_index=-1)),
    "reduction_sum": dict(kwargs=dict(reduction="sum")),
    "reduction_none_recomputes_in_backward": dict(kwargs=dict(reduction="none")),
    "reduction_none_with_class_weights_z_loss_and_softcap": dict(
        weight=True, kwargs=dict(reduction="none", z_loss=1e-2, softcap=3.0)),
    "normalizer_number": dict(kwargs=dict(normalizer=7.0)),
    "normalizer_tensor_that_requires_grad_is_differentiated": dict(normalizer_tensor=5.5, weight=True),
    "z_loss_uses_global_lse": dict(kwargs=dict(z_loss=1e-2)),
    "softcap_and_logit_scale": dict(kwargs=dict(softcap=2.5, logit_scale=1.7)),
    "no_bias": dict(bias=False, weight=True),
    "no_smoothing": dict(kwargs=dict(label_smoothing=0.0)),
    "every_feature_at_once": dict(
        weight=True, ignore_fraction=0.25, normalizer_tensor=9.0, shape=(3, 5),
        kwargs=dict(convention="others", z_loss=1e-3, softcap=3.0, logit_scale=0.8, ignore_index=-7,
                    label_smoothing=0.2),
    ),
    "every_feature_at_once_reduction_none": dict(
        weight=True, ignore_fraction=0.25, shape=(3, 5), backward_twice=True,
        kwargs=dict(convention="others", z_loss=1e-3, softcap=3.0, logit_scale=0.8, ignore_index=-7,
                    reduction="none"),
    ),
    # 500 tokens: a default computed from each rank's own slice would give the ranks different
    # chunk counts (so different numbers of gathers: a deadlock, then gloo's timeout).
    "default_chunk_size_is_the_same_on_every_rank": dict(chunk_size=None, rows=500),
    "one_token_per_chunk": dict(chunk_size=1, weight=True),
    "rank_with_empty_slice": dict(split="empty", weight=True),
    "explicit_vocab_start_and_size": dict(explicit_offsets=True, kwargs=dict(reduction="none")),
    "partial_hidden_gradient_for_the_callers_all_reduce": dict(kwargs=dict(reduce_hidden_grad=False)),
    "partial_hidden_gradient_reduction_none": dict(kwargs=dict(reduce_hidden_grad=False, reduction="none")),
    "only_the_weight_requires_grad": dict(frozen=("hidden", "bias")),
    "evaluation_under_no_grad": dict(no_grad=True, weight=True, kwargs=dict(z_loss=1e-3)),
    "every_row_ignored_gives_zero": dict(ignore_fraction=1.0),
    "empty_batch_mean_is_nan": dict(rows=0),
    "int32_targets": dict(int32_targets=True, shape=(2, 7)),
    "backward_twice_with_retain_graph": dict(backward_twice=True, kwargs=dict(reduction="none")),
    "float32_within_its_error_bound": dict(dtype=torch.float32, chunk_size=4),
    "module_form": dict(module=True, weight=True, kwargs=dict(convention="others")),
}

# name -> (exception type, a fragment of its message, extra keywords); raised on every rank.
ERROR_CASES = {
    "vocab_start_without_vocab_size_raises": (ValueError, "both vocab_start and vocab_size", dict(vocab_start=0)),
    "z_loss_denominator_tokens_raises": (ValueError, "not available with process_group",
                                         dict(z_loss_denominator="tokens")),
    "reduce_hidden_grad_without_process_group_raises": (ValueError, "need process_group",
                                                        dict(reduce_hidden_grad=False, no_group=True)),
    "class_weight_of_the_whole_vocabulary_raises": (ValueError, "class weights", dict(full_class_weight=True)),
    "out_of_range_target_raises_on_cpu": (IndexError, "out of range", dict(target_shift=1000)),
}

# float64 (rtol, atol): the same products and sums in another order (chunks, slices, the
# gathered combine), each a few dozen roundings of 2^-53 relative to terms of order 1:
# errors below 1e-14, four orders under these tolerances.
FLOAT64_TOL = (1e-10, 1e-12)


def _full_inputs(case: dict, world: int, generator: torch.Generator):
    """The whole head and batch, the same on every rank."""
    sizes = SPLITS[case.get("split", "uneven")][world]
    V = sum(sizes)
    shape = case.get("shape", (case.get("rows", 13),))
    hidden = torch.randn(*shape, HIDDEN, dtype=torch.float64, generator=generator)
    weight = torch.randn(V, HIDDEN, dtype=torch.float64, generator=generator) * (2 / math.sqrt(HIDDEN))
    bias = torch.randn(V, dtype=torch.float64, generator=generator) * 0.5 if case.get("bias", True) else None
    target = torch.randint(0, V, shape, generator=generator)
    ignore_index = case.get("kwargs", {}).get("ignore_index", -100)
    ignored = torch.rand(shape, generator=generator) < case.get("ignore_fraction", 0.2)
    target = torch.where(ignored, ignore_index, target)
    if case.get("int32_targets"):
        target = target.int()
    class_weight = torch.rand(V, dtype=torch.float64, generator=generator) + 0.2 if case.get("weight") else None
    if case.get("kwargs", {}).get("reduction") == "none":
        upstream = torch.randn(shape, dtype=torch.float64, generator=generator)
    else:
        upstream = torch.tensor(0.7, dtype=torch.float64)
    dtype = case.get("dtype", torch.float64)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return sizes, hidden, weight, bias, target, class_weight, upstream


def _truth(hidden, weight, bias, target, eps, class_weight, upstream, kwargs):
    """Loss, lse and the gradients of hidden, weight, bias and the logits: one process, float64,
    from the same (possibly rounded) inputs."""
    inputs = (hidden, weight) + ((bias,) if bias is not None else ())
    leaves = [t.to(torch.float64, copy=True).requires_grad_(True) for t in inputs]
    logits = F.linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    logits.retain_grad()
    normalizer = kwargs.get("normalizer")
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.detach().double().requires_grad_(normalizer.requires_grad)
    options = {k: v for k, v in kwargs.items() if k not in ("normalizer", "reduce_hidden_grad")}
    loss, lse = smoothed_xent_reference(logits, target, eps, weight=class_weight, normalizer=normalizer,
                                        return_lse=True, **options)
    loss.backward(upstream)
    grads = [leaf.grad for leaf in leaves] + [None] * (3 - len(leaves))
    normalizer_grad = normalizer.grad if isinstance(normalizer, torch.Tensor) else None
    return loss.detach(), lse.detach(), grads, logits.grad, normalizer_grad


def _float32_bounds(hidden, weight, bias, target, true_logits_grad, true_lse, true_loss, world):
    """Element-wise bounds on the float32 errors against the float64 truth of the same inputs.

    u = 2^-24 and gamma_n = n u / (1 - n u) bound a float32 sum of n terms by gamma_n times the
    sum of their magnitudes (Higham, Accuracy and Stability of Numerical Algorithms, 3.1):
      * a logit (H products and the bias) is off by at most delta = gamma_{H+1} max sum |h W| + |b|;
      * the row statistics (a max, a sum of V exponentials, a log, the gathered combine) put
        lse within delta + (V + 4 + world) u (1 + |lse|) of the truth;
      * so p_c = exp(y_c - lse) is within a relative 2.1 (delta + that) + u, and the gradient of a
        logit, (p_coef p_c - q_c) / n with p_c <= 1 and coefficients computed to a few u, within
        E = (2.1 (2 delta + (V + 4 + world) u (1 + |lse|)) + 8 u) / n, n the mean's denominator;
      * dL/dh = G W, dL/dW = G^T h, dL/db = sum_i G: E times the other factor's magnitudes summed,
        plus the GEMM's own gamma_{V or N} sum |terms|, plus world roundings of the all-reduce.
      * the loss: 2 delta plus gamma_{2V+N+8+world} times the magnitudes it sums.
    Each bound is doubled: a margin for any term counted too tightly above."""
    u = 2.0**-24

    def gamma(n):
        return n * u / (1 - n * u)

    h, W = hidden.double(), weight.double()
    b = bias.double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    N, H = h.shape
    V = W.shape[0]
    delta = (gamma(H + 1) * ((h.abs() @ W.abs().T) + b.abs())).max()
    n = max(int((target != -100).sum()), 1)
    lse_error = delta + (V + 4 + world) * u * (1 + true_lse.abs().max())
    E = (2.1 * (delta + lse_error) + 8 * u) / n
    G = true_logits_grad.abs()
    hidden_bound = E * W.abs().sum(0).expand(N, H) + gamma(V) * (G @ W.abs()) + 2 * world * u * (G @ W.abs())
    weight_bound = E * h.abs().sum(0).expand(V, H) + gamma(N) * (G.T @ h.abs())
    bias_bound = E * N + gamma(N) * G.sum(0)
    y = h @ W.T + b
    loss_bound = 2 * delta + gamma(2 * V + N + 8 + world) * (
        (true_lse.unsqueeze(1) - y).abs().max() + true_lse.abs().max() + true_loss.abs().max() + 1)
    return 2 * loss_bound, 2 * hidden_bound, 2 * weight_bound, 2 * bias_bound


def _assert_close(actual, expected, bound, what):
    """float64: FLOAT64_TOL; float32: within the element-wise `bound` of _float32_bounds."""
    actual = actual.detach().double()
    if bound is None:
        torch.testing.assert_close(actual, expected, rtol=FLOAT64_TOL[0], atol=FLOAT64_TOL[1], equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
        return
    error = (actual - expected).abs()
    bound = torch.as_tensor(bound, dtype=error.dtype).expand_as(error)
    worst = (error - bound).argmax()
    assert bool((error <= bound).all()), (
        f"{what}: error {error.flatten()[worst].item():.3g} beyond its bound {bound.flatten()[worst].item():.3g}")


def _run_case(case: dict, rank: int, world: int, group, generator: torch.Generator) -> list[str]:
    """Compare this rank's results with the truth; return the loss for the cross-rank check."""
    sizes, hidden, weight, bias, target, class_weight, upstream = _full_inputs(case, world, generator)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    kwargs = dict(case.get("kwargs", {}))
    eps = kwargs.pop("label_smoothing", 0.1)
    if "normalizer_tensor" in case:
        kwargs["normalizer"] = torch.tensor(case["normalizer_tensor"], dtype=torch.float64, requires_grad=True)
    true_loss, true_lse, true_grads, true_logits_grad, true_normalizer_grad = _truth(
        hidden, weight, bias, target, eps, class_weight, upstream, kwargs)
    if case.get("explicit_offsets"):
        kwargs.update(vocab_start=start, vocab_size=sum(sizes))

    frozen = case.get("frozen", ())
    h = hidden.clone().requires_grad_("hidden" not in frozen)
    w = weight[start:stop].clone().requires_grad_(True)
    b = None if bias is None else bias[start:stop].clone().requires_grad_("bias" not in frozen)
    cw = None if class_weight is None else class_weight[start:stop]
    head = smoothed_linear_xent
    if case.get("module"):
        head = SmoothedLinearCrossEntropyLoss(eps, class_weight=cw, process_group=group, return_lse=True,
                                              chunk_size=case.get("chunk_size", 5), **kwargs)
    with torch.no_grad() if case.get("no_grad") else torch.enable_grad():
        if case.get("module"):
            loss, lse = head(h, w, target, b)
        else:
            loss, lse = head(h, w, target, b, eps, class_weight=cw, process_group=group, return_lse=True,
                             chunk_size=case.get("chunk_size", 5), **kwargs)
    dtype = hidden.dtype
    assert loss.dtype == lse.dtype == dtype
    if dtype == torch.float64:
        bounds = dict.fromkeys(("loss", "hidden", "weight", "bias"), None)
    else:
        loss_bound, hidden_bound, weight_bound, bias_bound = _float32_bounds(
            hidden, weight, bias, target, true_logits_grad, true_lse, true_loss, world)
        bounds = dict(loss=loss_bound, hidden=hidden_bound, weight=weight_bound[start:stop],
                      bias=bias_bound[start:stop])
    _assert_close(loss, true_loss, bounds["loss"], "loss")
    if target.numel():
        _assert_close(lse, true_lse, bounds["loss"], "lse")
    if case.get("no_grad"):
        assert not loss.requires_grad
        return [value.hex() for value in loss.double().reshape(-1).tolist()]

    upstream = upstream.to(dtype)
    loss.backward(upstream, retain_graph=case.get("backward_twice", False))
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    if case.get("backward_twice"):
        first = [t.grad.clone() for t in leaves]
        loss.backward(upstream)
        for leaf, once in zip(leaves, first):
            torch.testing.assert_close(leaf.grad, 2 * once, rtol=0, atol=0)
            leaf.grad /= 2

    true_hidden, true_weight, true_bias = true_grads
    if kwargs.get("reduce_hidden_grad") is False:
        # This rank's partial product; the caller's all-reduce makes it the whole gradient.
        partial = true_logits_grad[..., start:stop] @ weight[start:stop].double()
        _assert_close(h.grad, partial, bounds["hidden"], "partial hidden gradient")
        summed = h.grad.clone()
        dist.all_reduce(summed, group=group)
        _assert_close(summed, true_hidden, bounds["hidden"], "summed hidden gradient")
    elif "hidden" in frozen:
        assert h.grad is None
    else:
        assert h.grad.dtype == dtype and h.grad.shape == h.shape
        _assert_close(h.grad, true_hidden, bounds["hidden"], "hidden gradient")
    assert w.grad.dtype == dtype
    _assert_close(w.grad, true_weight[start:stop], bounds["weight"], "weight gradient")
    if b is not None and "bias" not in frozen:
        assert b.grad.dtype == dtype
        _assert_close(b.grad, true_bias[start:stop], bounds["bias"], "bias gradient")
    elif b is not None:
        assert b.grad is None
    if true_normalizer_grad is not None:
        _assert_close(kwargs["normalizer"].grad, true_normalizer_grad, None, "normalizer gradient")
    if case.get("ignore_fraction") == 1.0:
        assert loss.item() == 0.0 and not w.grad.any() and not h.grad.any()
    if case.get("rows") == 0:
        assert math.isnan(loss.item())
    return [value.hex() for value in loss.detach().double().reshape(-1).tolist()]  # exact, NaN included


def _run_error_case(spec, rank: int, world: int, group, generator: torch.Generator) -> None:
    error, fragment, extra = spec
    sizes, hidden, weight, bias, target, class_weight, _ = _full_inputs({"weight": True}, world, generator)
    extra = dict(extra)
    target = target + extra.pop("target_shift", 0)
    if extra.pop("no_group", False):
        group = None
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    cw = class_weight if extra.pop("full_class_weight", False) else class_weight[rows]
    with pytest.raises(error, match=fragment):
        smoothed_linear_xent(hidden, weight[rows], target, bias[rows], 0.1, class_weight=cw, process_group=group,
                             **extra)


def _worker(rank: int, world: int, store_path: str, seed: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # world_size processes share the machine's cores
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    group = dist.group.WORLD
    results = {}
    failed = False
    for index, (name, case) in enumerate(list(CASES.items()) + list(ERROR_CASES.items())):
        if failed:  # an unexpected error may have left the ranks out of step: stop
            results[name] = {"error": "not run: an earlier case raised unexpectedly on this rank"}
            continue
        generator = torch.Generator().manual_seed(seed + index)  # the same inputs on every rank
        try:
            if name in ERROR_CASES:
                _run_error_case(case, rank, world, group, generator)
                results[name] = {"error": None, "loss": []}
            else:
                results[name] = {"error": None, "loss": _run_case(case, rank, world, group, generator)}
        except AssertionError:
            results[name] = {"error": traceback.format_exc()}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            failed = True
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group_results(request, tmp_path_factory):
    """Spawn one gloo group of the given size, run every case, return (seed, per-rank results)."""
    world = request.param
    seed = int.from_bytes(os.urandom(4), "little")
    directory = tmp_path_factory.mktemp(f"world{world}")
    # A fork server imports torch once and forks every rank from it (a fresh interpreter per
    # rank costs seconds); it has run no torch op, so forking it is safe.
    multiprocessing.set_forkserver_preload(["torch", __name__])
    mp.start_processes(_worker, args=(world, str(directory / "store"), seed, str(directory)), nprocs=world,
                       join=True, start_method="forkserver")
    ranks = []
    for rank in range(world):
        with open(directory / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return seed, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_matches_one_device_holding_the_whole_head(group_results, case):
    seed, ranks = group_results
    for rank, results in enumerate(ranks):
        assert results[case]["error"] is None, f"rank {rank} of {len(ranks)} (seed {seed}):\n{results[case]['error']}"
    losses = [results[case]["loss"] for results in ranks]
    assert all(loss == losses[0] for loss in losses), f"ranks report different losses (seed {seed}): {losses}"


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_arguments_raise_on_every_rank(group_results, case):
    seed, ranks = group_results
    for rank, results in enumerate(ranks):
        assert results[case]["error"] is None, f"rank {rank} of {len(ranks)} (seed {seed}):\n{results[case]['error']}"
