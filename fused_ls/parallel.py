"""Vocabulary parallelism: each rank holds a slice of the classes, every rank gets the whole loss.

When the output layer is split over a torch.distributed group (a tensor-parallel LM head, a
classifier with millions of classes), rank r holds the logits of classes [start_r, start_r + V_r)
and the global targets. `smoothed_xent_vocab_parallel` gives every rank the loss, lse and
gradient slice that one device holding all V classes would give, for every feature of
`smoothed_xent`, with one collective per call and none in the backward.

The maths, per row (notation of docs/maths.md)
-------------------------------------------------------------------
y = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x), lse = logsumexp_c y_c, and the
smoothed target gives class c the mass q_c = k_s w_c + k_t w_t [c == t], so

    loss = sum_c q_c (lse - y_c) + z lse^2

Split the sum over the ranks. Rank r knows only its slice; it reduces it to four numbers per
row, with its sum centred on its own logsumexp so that nothing large cancels later:

    m_r, s_r = max_{c in r} y_c, sum_{c in r} exp(y_c - m_r)     (lse_r = m_r + log s_r;
                                                                   -inf, 0 for an empty slice)
    L_r      = sum_{c in r} q_c (lse_r - y_c)                     (each lse_r - y_c >= 0)
    w_t,r    = w_t if r holds the target else 0

and one number per call, W_r = sum_{c in r} w_c (V_r without weights). With Q_r = k_s W_r +
k_t w_t,r, the mass of the slice, the row's loss is then exactly

    m    = max_r m_r,   log s = logsumexp_r (m_r - m + log s_r),   lse = m + log s
    loss = sum_r [ L_r + Q_r (lse - lse_r) ] + z lse^2
    lse - lse_r = (m - m_r) + (log s - log s_r) >= 0

where every difference is of nearby numbers (m - m_r of two logits: exact), never of two large
lse values: with logits near 100 that would cost float32 about 1e-5 of the loss. The gradient
of the slice needs only lse and per-row coefficients, no collective:

    dloss/dy_c = (k_s W + k_t w_t + 2 z lse) exp(y_c - lse) - k_s w_c - k_t w_t [c == t]
    W = sum_r W_r,  w_t = sum_r w_t,r

Collectives: one all-gather per call of (4 N + 1) numbers per rank, the row statistics
(m_r, log s_r, L_r, w_t,r) and W_r, in float32 (float64 for float64 logits): 16 bytes per row
sent by each rank and 16 * world_size bytes per row received, plus 4 bytes per rank per call.
A gather, not the usual all-reduce MAX of the row max followed by an all-reduce SUM: one round
of latency instead of two. The gathered bytes grow with the group (16 * world_size per row) while
two ring all-reduces move about 2 * 16 bytes per row whatever its size: for the 2 to 8 ranks of
a tensor-parallel group on one node (16k rows: 2 MiB, microseconds on NVLink) the one round
should win; for large groups over a network the two all-reduces would. Every rank combines the
same gathered numbers in the same order, so the reported loss is bitwise the same on all ranks. The backward scales the saved gradient slice: no collective. Nothing syncs with
the host, except once per (group, local size) when the offsets are gathered rather than passed.

Autograd: the loss is one global number; each rank's `loss.backward()` writes
d(loss)/d(its slice) and nothing else, so nothing is counted twice. In a tensor-parallel LM
head the gradient of the hidden states (h @ W_r^T summed over r) still needs the all-reduce
of the usual "copy to tensor-parallel region" op, exactly as for any row-split projection.

The local passes are the backend's two slice passes (fused_ls._slice_op): a statistics pass
that reads the slice once and writes (m_r, log s_r, L_r) per row, and a gradient pass that reads
it once more with the global (m, log s) and the per-row coefficients (p_coef, k_s, k_t w_t) and
writes the gradient: the native CPU kernels, Triton's, or PyTorch ops over blocks of rows
("torch"). The gather sits between the two, so the slice is read twice (read, read, write: 3b a
logit, where one device's row held on chip costs 2b); holding a slice on chip across a
collective is not possible.

The steps (slice_targets, row_statistics, write_gradient) are functions of their own: the
vocabulary-parallel linear head (fused_ls.linear) runs them on each chunk of tokens. DTensor
logits sharded on the classes come here from smoothed_xent with no extra argument: the group
and the slice are read off the mesh and Shard's ceil-divided layout, and the loss is returned
as a replicated DTensor, as loss_parallel returns it.
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from fused_ls import _core, backends
from fused_ls._autograd import check_inplace_allowed, refuse_create_graph, scale_saved_gradient
from fused_ls._core import RowOptions, accumulation_dtype, mean_gradient_scale, not_ignored, reduce_rows

# Statistics per row in the gathered buffer: m_r, log s_r, L_r, w_t,r.
_ROW_STATS = 4

# (group -> {local size: (start, global size)}), filled by _gathered_layout.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def smoothed_xent_vocab_parallel(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.1,
    *,
    process_group,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    convention: str = "uniform",
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    normalizer: float | torch.Tensor | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
):
    r"""`smoothed_xent` with the classes split over the ranks of `process_group`.

    Every rank of the group calls it, with the same arguments except:

    Args:
        logits: (..., V_r), this rank's slice of the classes, [vocab_start, vocab_start + V_r).
            Slices may differ in size (0 included) and follow the ranks' order in the group.
        target: (...) the global class indices, the same on every rank.
        weight: optional (V_r,) this rank's slice of the class weights (the slice matching
            its logits, as a sharded parameter is stored). The mean divides by the global
            sum of the targets' weights.
        vocab_start, vocab_size: this rank's first class and the global number of classes V.
            Pass both, or neither: then the first call for a group and a local size gathers
            every rank's V_r (one all-gather and one host sync) and caches the offsets, so
            each rank must keep its local size for that group from then on. Passing them
            makes every call free of host syncs (torch.compile, CUDA graphs).
        backend: whose slice passes compute the local statistics and the gradient (as in
            `smoothed_xent`; "auto": Triton on CUDA, the native CPU kernels on the CPU).

    Every other argument means what it means in `smoothed_xent`, with the global V: the
    loss (and ``lse`` with ``return_lse``) is the same on every rank, and ``loss.backward()``
    gives each rank the gradient of that loss with respect to its slice. ``normalizer``
    must be the same on every rank. One all-gather per call (see the module docstring).
    """
    if is_dtensor(logits):
        return _smoothed_xent_dtensor(
            logits, target, label_smoothing, process_group=process_group, weight=weight, ignore_index=ignore_index,
            reduction=reduction, convention=convention, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            normalizer=normalizer, return_lse=return_lse, inplace_backward=inplace_backward, vocab_start=vocab_start,
            vocab_size=vocab_size, backend=backend,
        )
    if process_group is None:
        raise ValueError("process_group is required: the group over which the classes are split")
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + backends.BACKENDS}")
    local_size = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 else None
    start, num_classes = _vocab_slice(process_group, local_size, vocab_start, vocab_size, logits)
    _core.check_arguments(logits, target, label_smoothing, weight, reduction, convention, z_loss, softcap,
                          logit_scale, num_classes=num_classes, ignore_index=ignore_index)
    softcap = _core.effective_softcap(softcap)
    _core.check_targets(target, num_classes, ignore_index)
    if inplace_backward and not (torch.is_grad_enabled() and logits.requires_grad):
        inplace_backward = False  # no gradient will be read: keep the logits intact
    if inplace_backward:
        check_inplace_allowed(logits)

    acc_dtype = accumulation_dtype(logits.dtype)
    options = _core.row_options(convention, label_smoothing, num_classes, ignore_index, z_loss, softcap, logit_scale)
    plan = _Plan(group=process_group, vocab_start=start, vocab_size=num_classes, options=options,
                 reduction=reduction, inplace=inplace_backward, backend=backends.resolve(backend, logits.device))
    logits2d = logits.reshape(target.numel(), local_size)  # -1 is ambiguous for 0 rows or classes
    target1d = target.reshape(-1)
    if weight is not None:
        weight = weight.to(acc_dtype)
    if normalizer is not None:
        normalizer = _core.normalizer_tensor(normalizer, acc_dtype, logits.device)
    loss, lse = _VocabParallelSmoothedXent.apply(logits2d, target1d, weight, normalizer, plan)
    if reduction == "none":
        loss = loss.view(target.shape)
    if return_lse:
        return loss, lse.view(target.shape)
    return loss


@dataclass(frozen=True)
class _Plan:
    group: object
    vocab_start: int
    vocab_size: int
    options: RowOptions
    reduction: str
    inplace: bool
    backend: str  # resolved: its slice passes compute the local statistics and the gradient


class _VocabParallelSmoothedXent(torch.autograd.Function):
    """Forward: local statistics, one all-gather, the loss, and the gradient slice (saved).

    Backward: the saved slice scaled by the upstream gradient, exactly as the fused path.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, normalizer, plan: _Plan):
        n_rows, local_size = logits.shape
        acc_dtype = accumulation_dtype(logits.dtype)
        options = plan.options
        rows = slice_targets(target, options.ignore_index, plan.vocab_start, local_size, plan.vocab_size)
        stats = row_statistics(logits, weight, rows, options, plan.group, plan.backend)

        if plan.reduction == "mean":
            weight_of_targets = None if weight is None else stats.w_t.sum()
            grad_scale = mean_gradient_scale(rows.valid, normalizer, weight_of_targets, acc_dtype)
        else:
            grad_scale = torch.ones((), dtype=acc_dtype, device=logits.device)
        # In place: into the logits' own memory, taken without their autograd view metadata: a
        # view made by a custom Function (DTensor.to_local) and then overwritten could not be unpacked.
        grad = write_gradient(logits.detach() if plan.inplace else logits, weight, rows, stats, grad_scale, options,
                              inplace=plan.inplace, backend=plan.backend)

        loss_rows = stats.loss_rows
        loss = reduce_rows(loss_rows, plan.reduction, grad_scale)
        # With reduction="none", rows without a gradient get no upstream (inf included), as in PyTorch.
        ctx.save_for_backward(grad, *((rows.active,) if plan.reduction == "none" else ()))
        # A tensor normalizer n that requires grad is differentiated: d(sum / n)/dn = -sum / n^2.
        ctx.normalizer_grad = None
        if plan.reduction == "mean" and normalizer is not None and ctx.needs_input_grad[3]:
            ctx.normalizer_grad = -loss_rows.sum() * grad_scale.square()
        ctx.mark_non_differentiable(stats.lse)
        return loss, stats.lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        refuse_create_graph("smoothed_xent (vocabulary parallel)")
        grad, *active = ctx.saved_tensors  # the slice's gradient: no collective needed
        if active:
            grad_loss = torch.where(active[0], grad_loss, 0.0)
        grad = scale_saved_gradient(grad, grad_loss)
        grad_normalizer = None if ctx.normalizer_grad is None else ctx.normalizer_grad * grad_loss
        return grad, None, None, grad_normalizer, None


# ----------------------------------------------------------------------------- DTensor logits


def is_dtensor(tensor) -> bool:
    """A torch.distributed.tensor.DTensor? Free when that module was never imported: then none exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def dtensor_class_slice(logits) -> tuple[object, int, int, int]:
    """(mesh, mesh dim, first class, local classes) of DTensor logits sharded on their last dim.

    Shard places torch.chunk's pieces: ceil(V / n) classes per rank in mesh order, the last
    ranks shorter or empty. The local tensor is checked against that layout."""
    placements = tuple(logits.placements)
    class_dim = logits.dim() - 1
    on_classes = [i for i, p in enumerate(placements)
                  if p.is_shard() and class_dim >= 0 and p.dim % logits.dim() == class_dim]
    others = [p for i, p in enumerate(placements) if i not in on_classes and not p.is_replicate()]
    if len(on_classes) != 1 or others:
        raise ValueError(
            "smoothed_xent takes DTensor logits sharded on the class (last) dimension over one mesh dimension and "
            f"replicated over the others, as loss parallelism produces them; got placements {placements} for "
            f"shape {tuple(logits.shape)} (pass logits.full_tensor() for replicated logits)"
        )
    mesh = logits.device_mesh
    mesh_dim = on_classes[0]
    world, rank = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    V = logits.shape[-1]
    per_rank = -(-V // world)
    start = min(rank * per_rank, V)
    local_size = min(start + per_rank, V) - start
    if logits.to_local().shape[-1] != local_size:
        raise ValueError(
            f"rank {rank} of mesh dimension {mesh_dim} holds {logits.to_local().shape[-1]} classes, not the "
            f"{local_size} of Shard's even split of {V} (ceil(V / {world}) per rank): a layout not supported here"
        )
    return mesh, mesh_dim, start, local_size


def _replicated(tensor, name: str):
    """The local value of a tensor every rank holds in full: a plain tensor, or a replicated DTensor."""
    if not is_dtensor(tensor):
        return tensor
    if not all(p.is_replicate() for p in tensor.placements):
        raise ValueError(f"{name} must be the same on every rank: a plain tensor or a DTensor with Replicate "
                         f"placements, got {tuple(tensor.placements)}")
    return tensor.to_local()


def _class_weight_slice(weight, mesh_dim: int, V: int, start: int, local_size: int):
    """This rank's slice of the class weights: from a DTensor sharded like the logits' classes
    (Shard(0) on their mesh dimension), or sliced from the whole (V,) weights every rank holds
    (a plain tensor or a replicated DTensor, as loss_parallel takes them)."""
    if is_dtensor(weight):
        sharded = [i for i, p in enumerate(weight.placements) if p.is_shard(0)]
        rest_replicated = all(p.is_replicate() for i, p in enumerate(weight.placements) if i not in sharded)
        if sharded == [mesh_dim] and rest_replicated and weight.shape == (V,):
            return weight.to_local()
    weight = _replicated(weight, "weight (or a DTensor sharded on the classes like the logits)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != V:
        raise ValueError(f"weight must be a 1-D tensor of the {V} class weights")
    return weight[start:start + local_size]


def _smoothed_xent_dtensor(logits, target, label_smoothing, *, process_group, weight, normalizer, return_lse,
                           inplace_backward, vocab_start, vocab_size, **options):
    """smoothed_xent of DTensor logits sharded on the classes: the vocabulary-parallel path with
    the group and the slice read off the DTensor, the loss (and lse) a replicated DTensor."""
    if process_group is not None or vocab_start is not None or vocab_size is not None:
        raise ValueError("DTensor logits carry their group and class slice: pass no process_group, vocab_start "
                         "or vocab_size")
    tensor_module = sys.modules["torch.distributed.tensor"]
    mesh, mesh_dim, start, local_size = dtensor_class_slice(logits)
    if inplace_backward and torch.is_grad_enabled() and logits.requires_grad:
        # The local tensor is a view made without autograd: the leaf check must look at the DTensor.
        base = logits._base if logits._base is not None else logits
        if base.is_leaf:
            raise ValueError("inplace_backward would overwrite a leaf DTensor (or a view of one) that requires grad; "
                             "use it on logits produced by an op (for example the LM head)")
    V = logits.shape[-1]
    if weight is not None:
        weight = _class_weight_slice(weight, mesh_dim, V, start, local_size)
    out = smoothed_xent_vocab_parallel(
        logits.to_local(), _replicated(target, "target"), label_smoothing, process_group=mesh.get_group(mesh_dim),
        weight=weight, normalizer=_replicated(normalizer, "normalizer"), return_lse=return_lse,
        inplace_backward=inplace_backward, vocab_start=start, vocab_size=V, **options,
    )
    replicate = [tensor_module.Replicate()] * mesh.ndim
    # Every rank holds bitwise the same loss: replicated, with no check (it would communicate).
    wrap = lambda t: tensor_module.DTensor.from_local(t, mesh, replicate, run_check=False)  # noqa: E731
    return tuple(wrap(t) for t in out) if return_lse else wrap(out)


# ----------------------------------------------------------------------------- the shared steps
# The steps below serve the logits path above and the vocabulary-parallel linear head
# (fused_ls.linear), which runs them once per chunk of tokens.


class SliceTargets(NamedTuple):
    """Where each row's target lies relative to this rank's slice."""

    valid: torch.Tensor  # not ignore_index: counted by a mean
    active: torch.Tensor  # valid and within [0, V): the rows that get a loss and a gradient
    owned: torch.Tensor  # active and within this rank's slice
    column: torch.Tensor  # the target's index within the slice where owned, else 0 (a safe index)

    def __getitem__(self, rows):  # the same view of a block of rows
        return SliceTargets(*(t[rows] for t in self))


class RowStatistics(NamedTuple):
    """What the gathered statistics give every rank, per row (and W, per call)."""

    row_max: torch.Tensor  # m
    log_sum: torch.Tensor  # log s, so lse = m + log s
    lse: torch.Tensor
    loss_rows: torch.Tensor  # the row's loss (0 if ignored, NaN if its target is out of range)
    w_t: torch.Tensor  # the target's class weight (1 without weights, 0 for an inactive row)
    weight_sum: torch.Tensor  # W = sum_c w_c over the whole vocabulary (0-d)


def slice_targets(target, ignore_index, vocab_start, local_size, vocab_size) -> SliceTargets:
    target = target.long()
    valid = not_ignored(target, ignore_index)
    active = valid & (target >= 0) & (target < vocab_size)
    local_target = target - vocab_start
    owned = active & (local_target >= 0) & (local_target < local_size)
    column = torch.where(owned, local_target, torch.zeros_like(local_target))
    return SliceTargets(valid, active, owned, column)


def row_statistics(logits, weight, rows: SliceTargets, options: RowOptions, group, backend: str) -> RowStatistics:
    """This rank's statistics of (n, V_r) logits, one all-gather, and the global row statistics.

    `weight` is this rank's (V_r,) slice of the class weights in the accumulation dtype, or None;
    `backend` a resolved backend name, whose slice passes compute the local statistics.
    Every rank of `group` must call it with the same number of rows."""
    n_rows, local_size = logits.shape
    acc_dtype = accumulation_dtype(logits.dtype)
    k_s, k_t = options.k_s, options.k_t
    column, owned = rows.column, rows.owned

    # This rank's contribution, laid out for the gather: [m_r | log s_r | L_r | w_t,r | W_r].
    sent = logits.new_empty(_ROW_STATS * n_rows + 1, dtype=acc_dtype)
    max_local, log_sum_local, loss_local, w_t_local = sent[:-1].view(_ROW_STATS, n_rows).unbind(0)
    if weight is None:
        w_t_local.copy_(owned)
        sent[-1] = local_size
    else:
        w_t_local.copy_(weight[column] * owned if local_size else owned)
        sent[-1] = weight.sum()
    if local_size == 0:
        max_local.fill_(-math.inf)
        log_sum_local.fill_(-math.inf)
        loss_local.zero_()
    elif n_rows:
        ops = backends.slice_ops(backend)
        for out, value in zip((max_local, log_sum_local, loss_local),
                              ops.stats(logits, column, owned, weight, k_s, k_t, options.softcap, options.logit_scale)):
            out.copy_(value)

    world = dist.get_world_size(group)
    gathered = sent.new_empty(world * sent.numel())
    _all_gather(gathered, sent, group)
    gathered = gathered.view(world, -1)
    max_ranks, log_sum_ranks, loss_ranks, w_t_ranks = gathered[:, :-1].view(world, _ROW_STATS, n_rows).unbind(1)
    weight_sum_ranks = gathered[:, -1:]

    # lse = m + log s as on one device; lse - lse_r = (m - m_r) + (log s - log s_r) is formed
    # from small differences, never as a difference of two large lse values.
    row_max = max_ranks.amax(dim=0)
    below_max = max_ranks - row_max  # m_r - m <= 0, exact
    log_sum = torch.logsumexp(below_max + log_sum_ranks, dim=0)
    lse = row_max + log_sum
    slice_mass = k_s * weight_sum_ranks + k_t * w_t_ranks  # Q_r
    # An empty slice has lse_r = -inf and no mass: its term is 0, not 0 * inf.
    gap = (log_sum - log_sum_ranks) - below_max  # lse - lse_r >= 0
    recentre = torch.where(slice_mass != 0, slice_mass * gap, 0.0)
    loss_rows = (loss_ranks + recentre).sum(dim=0) + options.z_loss * lse.square()
    nan = torch.full((), math.nan, dtype=acc_dtype, device=logits.device)
    loss_rows = torch.where(rows.valid, torch.where(rows.active, loss_rows, nan), 0.0)
    return RowStatistics(row_max, log_sum, lse, loss_rows, w_t_ranks.sum(dim=0), weight_sum_ranks.sum())


def write_gradient(logits, weight, rows: SliceTargets, stats: RowStatistics, row_scale, options: RowOptions, *,
                   inplace: bool, backend: str) -> torch.Tensor:
    """d(loss_i)/d(logits_i) times row_scale (0-d, or one per row), from the global statistics:
    no collective. Written over `logits` if `inplace`, else into a new tensor; returned either
    way. Inactive rows get 0 whatever their scale."""
    n_rows, local_size = logits.shape
    if n_rows == 0 or local_size == 0:
        return logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    # Per-row gradient coefficients, with the mean's 1/denominator and logit_scale folded in.
    row_factor = torch.where(rows.active, row_scale * options.logit_scale, 0.0)
    p_coef = (options.k_s * stats.weight_sum + options.k_t * stats.w_t + 2.0 * options.z_loss * stats.lse) * row_factor
    smooth_coef = (options.k_s * row_factor).expand(n_rows)
    true_coef = torch.where(rows.owned, options.k_t * stats.w_t, 0.0) * row_factor
    ops = backends.slice_ops(backend)
    args = (rows.column, weight, stats.row_max, stats.log_sum, p_coef, smooth_coef, true_coef, options.softcap,
            options.logit_scale)
    if inplace:
        ops.grad_inplace(logits, *args)
        return logits
    return ops.grad(logits, *args)


def target_weight_sum(target, ignore_index, weight, vocab_start, vocab_size, group, dtype) -> torch.Tensor:
    """sum_i w_{t_i} over the non-ignored rows, with the class weights split over the ranks:
    each rank sums the targets it holds; one all-gather of one number per rank."""
    rows = slice_targets(target, ignore_index, vocab_start, weight.shape[0], vocab_size)
    local = (weight.to(dtype)[rows.column] * rows.owned).sum() if weight.shape[0] else weight.new_zeros((), dtype=dtype)
    world = dist.get_world_size(group)
    gathered = local.new_empty(world)
    _all_gather(gathered, local.reshape(1), group)
    return gathered.sum()


def vocab_slice(group, local_size, vocab_start, vocab_size, device) -> tuple[int, int]:
    """(this rank's first class, the global number of classes), checked or gathered once."""
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError("pass both vocab_start and vocab_size, or neither (then they are gathered once)")
    if vocab_start is None:
        return _gathered_layout(group, local_size, device)
    vocab_start, vocab_size = int(vocab_start), int(vocab_size)
    if vocab_start < 0 or vocab_start + local_size > vocab_size:
        raise ValueError(
            f"this rank's classes [{vocab_start}, {vocab_start + local_size}) do not fit in vocab_size={vocab_size}"
        )
    return vocab_start, vocab_size



def _all_gather(output: torch.Tensor, local: torch.Tensor, group) -> None:
    """Concatenate every rank's `local` into `output` (torch >= 2.13 renamed the op)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


def _vocab_slice(group, local_size, vocab_start, vocab_size, logits) -> tuple[int, int]:
    """(this rank's first class, the global number of classes)."""
    if local_size is None:
        return 0, 1  # not a tensor with a class dimension: _check_arguments says so
    return vocab_slice(group, local_size, vocab_start, vocab_size, logits.device)


def _gathered_layout(group, local_size: int, device: torch.device) -> tuple[int, int]:
    """Gather every rank's slice size once per (group, local size); afterwards a dict look-up."""
    cached = _LAYOUTS.setdefault(group, {})
    if local_size not in cached:
        world = dist.get_world_size(group)
        sizes = torch.empty(world, dtype=torch.int64, device=device)
        _all_gather(sizes, torch.full((1,), local_size, dtype=torch.int64, device=device), group)
        sizes = sizes.tolist()  # the one host sync, at first use
        rank = dist.get_rank(group)
        cached[local_size] = (sum(sizes[:rank]), sum(sizes))
    return cached[local_size]
