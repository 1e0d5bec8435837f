"""DTensor logits sharded on the classes (loss parallelism, as torch's loss_parallel and
torchtitan produce them) take the vocabulary-parallel path with no extra argument: on every
rank the loss is a replicated DTensor equal to the float64 loss of one process holding all the
logits, and the logits' gradient is the DTensor sharded like them, slice for slice the truth's.

One spawned gloo group of 2 processes on a CPU DeviceMesh runs every case (as in
test_parallel.py); each case is then reported as its own test.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from fused_ls import SmoothedCrossEntropyLoss, smoothed_xent, smoothed_xent_reference

WORLD = 2

# name -> how the case differs from: float64 logits (12, 13) (Shard's split: 7 and 6 classes),
# random targets, eps = 0.1, mean, a 1-D mesh, a plain target tensor.
CASES = {
    "even_shards": dict(V=16),
    "uneven_shards_are_ceil_divided": dict(),
    "a_rank_with_no_classes": dict(V=1, kwargs=dict(reduction="sum")),
    "others_convention_uses_the_global_vocabulary": dict(kwargs=dict(convention="others", reduction="sum")),
    "class_weight_as_one_plain_tensor": dict(weight="plain"),
    "class_weight_as_a_replicated_dtensor": dict(weight="replicated"),
    "class_weight_sharded_like_the_classes": dict(weight="sharded", kwargs=dict(convention="others")),
    "target_as_a_replicated_dtensor": dict(target_dtensor=True, ignore_fraction=0.3),
    "reduction_none_with_an_upstream_gradient": dict(kwargs=dict(reduction="none"), ignore_fraction=0.2),
    "every_feature_at_once": dict(
        shape=(3, 4), weight="plain", ignore_fraction=0.25, normalizer=6.5,
        kwargs=dict(z_loss=1e-3, softcap=3.0, logit_scale=0.8, ignore_index=-7, label_smoothing=0.2),
    ),
    "return_lse_is_replicated": dict(return_lse=True),
    "inplace_backward_on_logits_made_by_an_op": dict(inplace=True, kwargs=dict(z_loss=1e-3)),
    "two_dimensional_mesh_replicated_on_the_other_dimension": dict(mesh=(1, 2)),
    "module_form": dict(module=True, weight="plain"),
}

# name -> (exception type, a fragment of its message, how the call is made wrong).
ERROR_CASES = {
    "process_group_with_dtensor_logits_raises": (ValueError, "carry their group", "process_group"),
    "replicated_logits_raise": (ValueError, "sharded on the class", "replicated_logits"),
    "logits_sharded_on_rows_raise": (ValueError, "sharded on the class", "row_sharded_logits"),
    "target_sharded_over_ranks_raises": (ValueError, "target must be the same on every rank", "sharded_target"),
    "inplace_backward_on_a_leaf_dtensor_raises": (ValueError, "leaf DTensor", "inplace_leaf"),
    "class_weight_of_the_wrong_size_raises": (ValueError, "class weights", "short_weight"),
}

# (rtol, atol) in float64: the same sums in another order (a gathered combine), a few dozen
# roundings of 2^-53 relative to terms of order 1: errors below 1e-14.
FLOAT64_TOL = (1e-10, 1e-12)


def _inputs(case: dict, generator: torch.Generator):
    V = case.get("V", 13)
    shape = case.get("shape", (12,))
    logits = torch.randn(*shape, V, dtype=torch.float64, generator=generator) * 3
    target = torch.randint(0, V, shape, generator=generator)
    ignore_index = case.get("kwargs", {}).get("ignore_index", -100)
    ignored = torch.rand(shape, generator=generator) < case.get("ignore_fraction", 0.0)
    target = torch.where(ignored, ignore_index, target)
    weight = torch.rand(V, dtype=torch.float64, generator=generator) + 0.2 if case.get("weight") else None
    upstream = torch.randn(shape, dtype=torch.float64, generator=generator)
    return logits, target, weight, upstream


def _mesh(case: dict):
    shape = case.get("mesh", (WORLD,))
    return init_device_mesh("cpu", shape), len(shape) - 1  # the class dim is sharded on the last mesh dim


def _run_case(case: dict, generator: torch.Generator) -> list[str]:
    full, target, weight, upstream = _inputs(case, generator)
    kwargs = dict(case.get("kwargs", {}))
    eps = kwargs.pop("label_smoothing", 0.1)
    if "normalizer" in case:
        kwargs["normalizer"] = case["normalizer"]
    reduction = kwargs.get("reduction", "mean")
    true_upstream = upstream if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    x = full.clone().requires_grad_(True)
    true_loss, true_lse = smoothed_xent_reference(x, target, eps, weight=weight, return_lse=True, **kwargs)
    true_loss.backward(true_upstream)

    mesh, mesh_dim = _mesh(case)
    placements = [Replicate()] * mesh.ndim
    placements[mesh_dim] = Shard(full.dim() - 1)
    leaf = distribute_tensor(full.clone(), mesh, placements, src_data_rank=None).requires_grad_(True)
    logits = leaf * 1 if case.get("inplace") else leaf  # an op's output, as an LM head's
    replicate = [Replicate()] * mesh.ndim
    if case.get("weight") == "replicated":
        weight = distribute_tensor(weight, mesh, replicate, src_data_rank=None)
    elif case.get("weight") == "sharded":
        weight_placements = list(replicate)
        weight_placements[mesh_dim] = Shard(0)
        weight = distribute_tensor(weight, mesh, weight_placements, src_data_rank=None)
    if case.get("target_dtensor"):
        target = distribute_tensor(target, mesh, replicate, src_data_rank=None)
    if case.get("module"):
        out = SmoothedCrossEntropyLoss(eps, weight=weight, **kwargs)(logits, target)
    else:
        out = smoothed_xent(logits, target, eps, weight=weight, return_lse=case.get("return_lse", False),
                            inplace_backward=case.get("inplace", False), **kwargs)
    loss, lse = out if case.get("return_lse") else (out, None)

    assert isinstance(loss, DTensor) and all(p.is_replicate() for p in loss.placements), loss
    assert loss.shape == true_loss.shape
    torch.testing.assert_close(loss.to_local(), true_loss.detach(), rtol=FLOAT64_TOL[0], atol=FLOAT64_TOL[1])
    if lse is not None:
        assert isinstance(lse, DTensor) and all(p.is_replicate() for p in lse.placements)
        torch.testing.assert_close(lse.to_local(), true_lse, rtol=FLOAT64_TOL[0], atol=FLOAT64_TOL[1])
    loss.backward(DTensor.from_local(true_upstream, mesh, replicate, run_check=False))

    grad = leaf.grad
    assert isinstance(grad, DTensor) and tuple(grad.placements) == tuple(leaf.placements), grad
    assert grad.shape == full.shape
    local = leaf.to_local()
    V, world = full.shape[-1], mesh.size(mesh_dim)
    start = min(mesh.get_local_rank(mesh_dim) * -(-V // world), V)
    expected = x.grad[..., start:start + local.shape[-1]]
    torch.testing.assert_close(grad.to_local(), expected, rtol=FLOAT64_TOL[0], atol=FLOAT64_TOL[1])
    torch.testing.assert_close(grad.full_tensor(), x.grad, rtol=FLOAT64_TOL[0], atol=FLOAT64_TOL[1])
    return [value.hex() for value in loss.to_local().detach().reshape(-1).tolist()]


def _run_error_case(spec, generator: torch.Generator) -> None:
    error, fragment, how = spec
    full, target, weight, _ = _inputs({"weight": True}, generator)
    mesh = init_device_mesh("cpu", (WORLD,))
    placements = {"replicated_logits": [Replicate()], "row_sharded_logits": [Shard(0)]}.get(how, [Shard(1)])
    logits = distribute_tensor(full, mesh, placements, src_data_rank=None).requires_grad_(True)
    kwargs = {}
    if how == "process_group":
        kwargs["process_group"] = dist.group.WORLD
    if how == "sharded_target":
        target = distribute_tensor(target, mesh, [Shard(0)], src_data_rank=None)
    if how == "inplace_leaf":
        kwargs["inplace_backward"] = True
    if how == "short_weight":
        kwargs["weight"] = weight[:-1]
    with pytest.raises(error, match=fragment):
        smoothed_xent(logits, target, 0.1, **kwargs)


def _worker(rank: int, store_path: str, seed: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    results = {}
    failed = False
    for index, (name, case) in enumerate(list(CASES.items()) + list(ERROR_CASES.items())):
        if failed:  # an unexpected error may have left the ranks out of step: stop
            results[name] = {"error": "not run: an earlier case raised unexpectedly on this rank"}
            continue
        generator = torch.Generator().manual_seed(seed + index)  # the same inputs on every rank
        try:
            if name in ERROR_CASES:
                _run_error_case(case, generator)
                results[name] = {"error": None, "loss": []}
            else:
                results[name] = {"error": None, "loss": _run_case(case, generator)}
        except AssertionError:
            results[name] = {"error": traceback.format_exc()}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            failed = True
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """Spawn one gloo group of WORLD processes, run every case, return (seed, per-rank results)."""
    seed = int.from_bytes(os.urandom(4), "little")
    directory = tmp_path_factory.mktemp("dtensor")
    multiprocessing.set_forkserver_preload(["torch", __name__])
    mp.start_processes(_worker, args=(str(directory / "store"), seed, str(directory)), nprocs=WORLD, join=True,
                       start_method="forkserver")
    ranks = []
    for rank in range(WORLD):
        with open(directory / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return seed, ranks


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_dtensor_logits_match_one_device(group_results, case):
    seed, ranks = group_results
    for rank, results in enumerate(ranks):
        assert results[case]["error"] is None, f"rank {rank} (seed {seed}):\n{results[case]['error']}"
    losses = [results[case]["loss"] for results in ranks]
    assert all(loss == losses[0] for loss in losses), f"ranks report different losses (seed {seed}): {losses}"


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_dtensor_arguments_raise_on_every_rank(group_results, case):
    seed, ranks = group_results
    for rank, results in enumerate(ranks):
        assert results[case]["error"] is None, f"rank {rank} (seed {seed}):\n{results[case]['error']}"
