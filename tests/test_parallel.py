"""Vocabulary parallelism: on every rank, the loss, lse and gradient slice equal the float64
result of one process holding the whole vocabulary.

Starting processes costs seconds, so each world size (2 and 4 gloo processes on this machine)
is one spawned group that runs every case below; each case is then reported as its own test.
Every rank builds the same full inputs from one seed, computes the single-process truth on
the whole vocabulary, runs its own slice through `smoothed_xent(..., process_group=...)`,
and compares its slice; the parent also checks that all ranks report bitwise the same loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import GRAD_TOL, LOSS_TOL, TRITON_FLOAT64_GRAD_ATOL, softcapped_grad_atol, truth
from test_no_host_sync import forbid_host_sync

import fused_ls._core
import fused_ls.eager
import fused_ls.parallel
from fused_ls import smoothed_xent, smoothed_xent_reference

WORLD_SIZES = (2, 4)

# Slice sizes per world size. "uneven" has a single-class slice; "empty" a rank with none.
SPLITS = {
    "even": {2: (8, 8), 4: (6, 6, 6, 6)},
    "uneven": {2: (5, 11), 4: (5, 11, 1, 7)},
    "empty": {2: (13, 0), 4: (4, 0, 9, 3)},
}

# name -> how the case differs from: float64 logits of shape (24, V), uneven slices, random
# targets, eps = 0.1, reduction "mean", offsets gathered at first use, lse compared.
CASES = {
    "uniform_mean_even_slices": dict(split="even"),
    "uniform_mean_uneven_slices": dict(),
    "others_convention": dict(kwargs=dict(convention="others")),
    "class_weights_sliced_mean_over_global_weight_sum": dict(weight=True),
    "class_weights_others_convention_sum": dict(weight=True, kwargs=dict(convention="others", reduction="sum")),
    "ignore_index_rows": dict(ignore_fraction=0.3, kwargs=dict(ignore_index=-1)),
    "reduction_sum": dict(kwargs=dict(reduction="sum")),
    "reduction_none_with_upstream_gradient": dict(kwargs=dict(reduction="none"), upstream=True, ignore_fraction=0.2),
    "normalizer_number": dict(kwargs=dict(normalizer=7.0), ignore_fraction=0.2),
    "normalizer_tensor_with_weights": dict(weight=True, normalizer_tensor=5.5),
    "z_loss_uses_global_lse": dict(kwargs=dict(z_loss=1e-2)),
    "softcap_and_logit_scale": dict(kwargs=dict(softcap=2.5, logit_scale=1.7), scale=6.0),
    "no_smoothing": dict(kwargs=dict(label_smoothing=0.0)),
    "all_smoothing_others": dict(kwargs=dict(label_smoothing=1.0, convention="others")),
    "every_feature_at_once": dict(
        weight=True, ignore_fraction=0.25, normalizer_tensor=9.0, shape=(4, 6),
        kwargs=dict(convention="others", z_loss=1e-3, softcap=3.0, logit_scale=0.8, ignore_index=-7),
    ),
    "targets_on_slice_boundaries": dict(targets="boundaries", weight=True),
    "targets_only_in_first_slice": dict(targets="first_slice", kwargs=dict(z_loss=1e-3)),
    "rank_with_empty_slice": dict(split="empty", weight=True, ignore_fraction=0.2),
    "explicit_vocab_start_and_size": dict(explicit_offsets=True, kwargs=dict(reduction="none"), upstream=True),
    "every_row_ignored_gives_zero": dict(ignore_fraction=1.0),
    # Where the CPU-only check is skipped (CUDA, torch.compile): that row's loss is NaN, its gradient 0.
    "unchecked_out_of_range_target_gives_nan_row_and_zero_gradient": dict(
        out_of_range_row=True, weight=True, kwargs=dict(reduction="none")
    ),
    "empty_batch_mean_is_nan": dict(rows=0),
    "leading_dims_and_int32_targets": dict(shape=(3, 2, 4), int32_targets=True, weight=True),
    "inplace_backward_writes_gradient_into_slice": dict(inplace=True, kwargs=dict(z_loss=1e-3)),
    "several_row_blocks": dict(row_chunk_elements=20, weight=True, kwargs=dict(softcap=4.0)),
    "backward_twice_with_retain_graph": dict(backward_twice=True, kwargs=dict(reduction="none"), upstream=True),
    "float32_logits": dict(dtype=torch.float32, weight=True, kwargs=dict(z_loss=1e-3)),
    "bfloat16_logits": dict(dtype=torch.bfloat16, ignore_fraction=0.2),
    "logits_offset_by_100": dict(dtype=torch.float32, offset=100.0),
    "logits_offset_by_1e4_keep_a_shift_invariant_gradient": dict(dtype=torch.float32, offset=1e4, scale=1.0),
    "an_ignored_row_gets_no_gradient_from_an_infinite_upstream": dict(
        kwargs=dict(reduction="none"), upstream="inf_on_ignored", ignore_fraction=0.3),
    "masked_slice_costs_nothing_without_smoothing": dict(masked=True, targets="first_slice",
                                                         kwargs=dict(label_smoothing=0.0)),
    "masked_slice_with_smoothing_is_inf_with_a_finite_gradient": dict(
        masked=True, weight=True, kwargs=dict(reduction="none", convention="others"), upstream=True),
    "normalizer_that_requires_grad_is_differentiated": dict(normalizer_tensor=6.0, normalizer_grad=True,
                                                            kwargs=dict(z_loss=1e-3)),
    "float16_logits_inplace": dict(dtype=torch.float16, inplace=True),
    # Tracing costs tens of seconds on a small machine: in the 2-process group only.
    "no_host_sync_with_explicit_offsets": dict(
        no_host_sync=True, explicit_offsets=True, weight=True, upstream=True, kwargs=dict(reduction="none", z_loss=1e-3)
    ),
    # The offsets of this split were gathered by an earlier case: now a dictionary look-up.
    "no_host_sync_once_offsets_are_cached": dict(no_host_sync=True, split="uneven", normalizer_tensor=3.0),
    "torch_compile_fullgraph": dict(
        compile=True, explicit_offsets=True, weight=True, kwargs=dict(softcap=3.0), worlds=(2,)
    ),
}

# The cases above run each rank's slice passes on the default backend (the native CPU kernels);
# these reach every branch of the passes again through Triton (its interpreter) and PyTorch ops.
_BRANCHES = ("every_feature_at_once", "targets_on_slice_boundaries", "rank_with_empty_slice",
             "masked_slice_with_smoothing_is_inf_with_a_finite_gradient", "inplace_backward_writes_gradient_into_slice",
             "bfloat16_logits", "logits_offset_by_100", "unchecked_out_of_range_target_gives_nan_row_and_zero_gradient")
for _backend in ("triton", "torch"):
    for _name in _BRANCHES:
        CASES[f"{_name}_on_{_backend}"] = dict(CASES[_name], backend=_backend, worlds=(2,) if _backend == "torch" else WORLD_SIZES)
CASES["several_row_blocks"]["backend"] = "torch"  # the eager passes' blocks of rows

# name -> (exception type, a fragment of its message, extra keywords); raised on every rank.
ERROR_CASES = {
    "vocab_start_without_vocab_size_raises": (ValueError, "both vocab_start and vocab_size", dict(vocab_start=0)),
    "slice_outside_vocab_size_raises": (ValueError, "do not fit", dict(vocab_start=-1, vocab_size=41)),
    "out_of_range_target_raises_on_cpu": (IndexError, "out of range", dict(target_shift=1000)),
    "vocab_start_without_process_group_raises": (ValueError, "need process_group", dict(vocab_start=0, vocab_size=16, no_group=True)),
}

FLOAT64_TOL = (1e-10, 1e-12)  # (rtol, atol): the same sums in another order


def _full_inputs(case: dict, world: int, generator: torch.Generator):
    """The whole-vocabulary inputs, the same on every rank."""
    sizes = SPLITS[case.get("split", "uneven")][world]
    V = sum(sizes)
    shape = case.get("shape", (case.get("rows", 24),))
    dtype = case.get("dtype", torch.float64)
    logits = torch.randn(*shape, V, dtype=torch.float64, generator=generator) * case.get("scale", 3.0)
    logits = (logits + case.get("offset", 0.0)).to(dtype)
    starts = [sum(sizes[:r]) for r in range(world)]
    if case.get("masked"):  # rank 1's whole slice and a few classes elsewhere: a masked vocabulary
        logits[..., starts[1]:starts[1] + sizes[1]] = -math.inf
        logits[..., 1:3] = -math.inf
    if case.get("targets") == "boundaries":  # the first and the last class of every non-empty slice
        edges = [c for s, n in zip(starts, sizes) if n for c in (s, s + n - 1)]
        target = torch.tensor(edges, dtype=torch.int64).repeat(math.prod(shape) // len(edges) + 1)
        target = target[: math.prod(shape)].reshape(shape)
    elif case.get("targets") == "first_slice":
        target = torch.randint(0, sizes[0], shape, generator=generator)
    else:
        target = torch.randint(0, V, shape, generator=generator)
    ignore_index = case.get("kwargs", {}).get("ignore_index", -100)
    ignored = torch.rand(shape, generator=generator) < case.get("ignore_fraction", 0.0)
    target = torch.where(ignored, ignore_index, target)
    if case.get("int32_targets"):
        target = target.int()
    weight = torch.rand(V, dtype=torch.float64, generator=generator) + 0.2 if case.get("weight") else None
    upstream = torch.randn(shape, dtype=torch.float64, generator=generator) if case.get("upstream") else None
    if case.get("upstream") == "inf_on_ignored":
        upstream = torch.where(ignored, math.inf, upstream)
    return sizes, starts, logits, target, weight, upstream


def _run_case(case: dict, rank: int, world: int, group, generator: torch.Generator) -> list[str]:
    """Compare this rank's results with the truth; return the loss for the cross-rank check."""
    sizes, starts, full_logits, target, full_weight, upstream = _full_inputs(case, world, generator)
    start, stop = starts[rank], starts[rank] + sizes[rank]
    kwargs = dict(case.get("kwargs", {}))
    eps = kwargs.pop("label_smoothing", 0.1)
    if "backend" in case:
        kwargs["backend"] = case["backend"]
    dtype = full_logits.dtype
    if "normalizer_tensor" in case:
        kwargs["normalizer"] = torch.tensor(case["normalizer_tensor"], requires_grad=case.get("normalizer_grad", False))
    if case.get("explicit_offsets"):
        kwargs.update(vocab_start=start, vocab_size=sum(sizes))

    # The truth: one process, the whole vocabulary, float64 from the same (rounded) logits.
    reference_kwargs = {k: v for k, v in kwargs.items() if k not in ("vocab_start", "vocab_size", "backend")}
    true_loss, true_grad = truth(full_logits, target, eps, weight=full_weight, upstream=upstream, **reference_kwargs)
    _, true_lse = smoothed_xent_reference(full_logits.double(), target, eps, return_lse=True, **reference_kwargs)
    if case.get("out_of_range_row"):  # row 0 as an ignored row, but with a NaN loss
        target = target.clone()
        target[0] = sum(sizes) + 3
        true_grad[0] = 0.0
        true_loss[0] = math.nan

    leaf = full_logits[..., start:stop].clone().requires_grad_(True)
    # inplace_backward needs logits made by an op, as an LM head's are; "* 1" saves nothing.
    logits = leaf * 1 if case.get("inplace") else leaf
    weight = None if full_weight is None else full_weight[start:stop]
    # aot_eager traces forward and backward as inductor does, without a C++ compiler.
    loss_fn = torch.compile(smoothed_xent, fullgraph=True, backend="aot_eager") if case.get("compile") else smoothed_xent
    upstream_shape = target.shape if kwargs.get("reduction") == "none" else ()
    upstream_grad = torch.ones(upstream_shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if upstream is not None:
        upstream_grad = upstream.to(upstream_grad.dtype)
    # The backward is the single-device path's (fused_ls._autograd.scale_saved_gradient), which
    # test_no_host_sync guards; the forward, with its collective, is this module's to guard.
    skip_check = _target_check_replaced_by(lambda check: lambda *args: None)
    with skip_check if case.get("out_of_range_row") else contextlib.nullcontext(), \
            _host_sync_guard() if case.get("no_host_sync") else contextlib.nullcontext():
        loss, lse = loss_fn(
            logits, target, eps, process_group=group, weight=weight, return_lse=True,
            inplace_backward=case.get("inplace", False), **kwargs,
        )
    loss.backward(upstream_grad, retain_graph=case.get("backward_twice", False))
    if case.get("backward_twice"):
        first = leaf.grad.clone()
        loss.backward(upstream_grad)
        torch.testing.assert_close(leaf.grad, 2 * first, rtol=0, atol=0)
        leaf.grad /= 2

    assert loss.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
    # float64: the same sums in another order; Triton takes its float scalars as float32.
    exact = dtype == torch.float64 and case.get("backend") != "triton"
    loss_tol = FLOAT64_TOL if exact else LOSS_TOL[dtype]
    grad_tol = FLOAT64_TOL if exact else GRAD_TOL[dtype]
    if dtype == torch.float64 and not exact:
        grad_tol = (grad_tol[0], TRITON_FLOAT64_GRAD_ATOL)
    if kwargs.get("softcap") and not exact:
        grad_tol = (grad_tol[0], max(grad_tol[1], softcapped_grad_atol(dtype, full_weight, kwargs.get("logit_scale", 1.0))))
    torch.testing.assert_close(loss.double(), true_loss, rtol=loss_tol[0], atol=loss_tol[1], equal_nan=True)
    torch.testing.assert_close(lse.double(), true_lse, rtol=loss_tol[0], atol=loss_tol[1])
    torch.testing.assert_close(
        leaf.grad.double(), true_grad[..., start:stop], rtol=grad_tol[0], atol=grad_tol[1], equal_nan=True
    )
    if case.get("inplace"):
        # The gradient was written into the logits' own storage: nothing else was allocated.
        torch.testing.assert_close(logits.detach(), leaf.grad, rtol=0, atol=0)
    if case.get("ignore_fraction") == 1.0:
        assert loss.item() == 0.0 and not leaf.grad.any()
    if case.get("normalizer_grad"):  # d(sum / n)/dn = -sum / n^2
        row_sum = smoothed_xent_reference(full_logits.double(), target, eps, reduction="sum",
                                          **{k: v for k, v in reference_kwargs.items() if k != "normalizer"})
        expected = -row_sum / case["normalizer_tensor"] ** 2
        torch.testing.assert_close(kwargs["normalizer"].grad.double(), expected, rtol=1e-6, atol=1e-9)
    if case.get("rows") == 0:
        assert math.isnan(loss.item())
    return [value.hex() for value in loss.detach().double().reshape(-1).tolist()]  # exact, NaN included


@contextlib.contextmanager
def _target_check_replaced_by(make_replacement):
    original = fused_ls._core.check_targets
    fused_ls._core.check_targets = make_replacement(original)
    try:
        yield
    finally:
        fused_ls._core.check_targets = original


@contextlib.contextmanager
def _host_sync_guard():
    """test_no_host_sync's guard; host reads are allowed only in the CPU-only target check,
    as that module allows them for the single-device path."""
    with forbid_host_sync() as guard:

        def allowed(check):
            def check_targets(*args):
                with guard.allowed():
                    return check(*args)

            return check_targets

        with _target_check_replaced_by(allowed):
            yield


def _run_error_case(spec, rank: int, world: int, group, generator: torch.Generator) -> None:
    error, fragment, extra = spec
    sizes, starts, full_logits, target, _, _ = _full_inputs({}, world, generator)
    extra = dict(extra)
    target = target + extra.pop("target_shift", 0)
    if extra.pop("no_group", False):
        group = None
    logits = full_logits[..., starts[rank]: starts[rank] + sizes[rank]]
    with pytest.raises(error, match=fragment):
        smoothed_xent(logits, target, 0.1, process_group=group, **extra)


def _readme_example() -> str:
    """The python block of the README's parallel section: it must run as printed."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("<!-- section: parallel -->")[1].split("<!-- /section: parallel -->")[0]
    return section.split("```python\n")[1].split("```")[0]


def _worker(rank: int, world: int, store_path: str, seed: int, out_dir: str, port: int) -> None:
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
        if name in CASES and world not in case.get("worlds", WORLD_SIZES):
            results[name] = {"skipped": True}
            continue
        generator = torch.Generator().manual_seed(seed + index)  # the same inputs on every rank
        saved_chunk = fused_ls.eager.ROW_CHUNK_ELEMENTS
        try:
            if name in ERROR_CASES:
                _run_error_case(case, rank, world, group, generator)
                results[name] = {"error": None, "loss": []}
            else:
                fused_ls.eager.ROW_CHUNK_ELEMENTS = case.get("row_chunk_elements", saved_chunk)
                results[name] = {"error": None, "loss": _run_case(case, rank, world, group, generator)}
        except AssertionError:
            results[name] = {"error": traceback.format_exc()}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            failed = True
        finally:
            fused_ls.eager.ROW_CHUNK_ELEMENTS = saved_chunk
    dist.destroy_process_group()
    if not failed:  # the README's example, run as torchrun would run it
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        try:
            exec(compile(_readme_example(), "README.md (section: parallel)", "exec"), {"__name__": "__main__"})
            results["readme_example"] = {"error": None, "loss": []}
        except Exception:
            results["readme_example"] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def group_results(request, tmp_path_factory):
    """Spawn one gloo group of the given size, run every case, return (seed, per-rank results)."""
    world = request.param
    seed = int.from_bytes(os.urandom(4), "little")
    directory = tmp_path_factory.mktemp(f"world{world}")
    with socket.socket() as probe:  # a free port for the README example's TCP rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A fork server imports torch once and forks every rank of both groups from it (a fresh
    # interpreter per rank costs seconds); it has run no torch op, so forking it is safe.
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", __name__])
    mp.start_processes(
        _worker, args=(world, str(directory / "store"), seed, str(directory), port), nprocs=world, join=True,
        start_method="forkserver",
    )
    ranks = []
    for rank in range(world):
        with open(directory / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return seed, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_matches_one_device_holding_the_whole_vocabulary(group_results, case):
    seed, ranks = group_results
    if ranks[0][case].get("skipped"):
        pytest.skip(f"{case} runs in groups of {CASES[case]['worlds']} processes only")
    for rank, results in enumerate(ranks):
        assert results[case]["error"] is None, f"rank {rank} of {len(ranks)} (seed {seed}):\n{results[case]['error']}"
    losses = [results[case]["loss"] for results in ranks]
    assert all(loss == losses[0] for loss in losses), f"ranks report different losses (seed {seed}): {losses}"


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_arguments_raise_on_every_rank(group_results, case):
    seed, ranks = group_results
    for rank, results in enumerate(ranks):
        assert results[case]["error"] is None, f"rank {rank} of {len(ranks)} (seed {seed}):\n{results[case]['error']}"


def test_readme_example_runs_on_every_rank(group_results):
    seed, ranks = group_results
    for rank, results in enumerate(ranks):
        outcome = results.get("readme_example", {"error": "not run: an earlier case raised unexpectedly"})
        assert outcome["error"] is None, f"rank {rank} of {len(ranks)}:\n{outcome['error']}"
