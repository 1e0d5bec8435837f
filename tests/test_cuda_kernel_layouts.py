"""The CUDA kernel on every row layout, run on the CPU by tests/cuda_host_emulation.cpp.

The kernel (csrc/cuda/smoothed_xent_kernel.cu) reads and writes every row in 16-byte vectors
whatever V, the row's offset and the row stride: pass 1 in groups of 16/b columns, each one
aligned load or two, pass 2 cut at the row's own 16-byte boundaries into an element-wise head,
a body of vectors and an element-wise tail. Here, for V of 1, 7, 9, 4097 and 5003 (none a
multiple of 8, like GPT-2's 50257), rows at offsets of 1 and 3 elements, odd row strides (the
alignment moves from row to row), every dtype, a new gradient of the logits' alignment or of
another one, in place, and rows split over 3 blocks:
  * loss, lse and gradient against the float64 oracle, with ignored and out-of-range targets
    and -inf (masked) classes, every output buffer poisoned with NaN, and every element of
    the buffers outside the rows' V columns (padding, a sliced-off start) unchanged;
  * the same bits for every layout of the same logits (pass 1 sums in one order for any
    alignment), and the lse of an ignored row is the lse the row has with a target;
  * from the emulation's count of every access to a row: nothing misaligned, only a few
    elements per row taken one at a time (the vector path is taken by every row), the exact
    stores expected (16 bytes wherever the gradient row lies a multiple of 16 bytes from the
    logits row, else as wide as that distance allows), and a row without a gradient (ignored,
    out of range) has its zeros written in 16-byte stores without being read a second time.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from oracle import GRAD_TOL, LOSS_TOL, masses, truth
from test_native import _SCALAR_KIND, _RowsProblem, emulated_cuda  # noqa: F401  (a fixture)

from fused_ls.reference import transform_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SIZES = [1, 7, 9, 4097, 5003]
LAYOUTS = ["contiguous", "offset 1", "offset 3, end -2", "odd stride, offset 1"]
IGNORE = -100
SENTINEL = 7.25  # exact in every dtype; what the padding holds and must keep


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vector(dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def _strided(values: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, view): `values` copied into a view of the given layout inside a buffer whose
    other elements hold SENTINEL."""
    N, V = values.shape
    if layout == "contiguous":
        start, width = 0, V
    elif layout == "offset 1":
        start, width = 1, V + 1
    elif layout == "offset 3, end -2":
        start, width = 3, V + 5
    elif layout == "odd stride, offset 1":
        start = 1
        width = V + 2 if (V + 2) % 2 == 1 else V + 3
    else:
        raise ValueError(layout)
    base = torch.full((N, width), SENTINEL, dtype=values.dtype)
    view = base[:, start : start + V]
    view.copy_(values)
    assert view.stride() == (width, 1)
    return base, view


def _launch(lib, logits, target, grad, *, weight=None, eps=0.1, blocks=1, others=False, z_loss=0.0, softcap=0.0,
            logit_scale=1.0, grad_scale=0.5):
    """The emulated CUDA launcher on these exact views: `grad` a view to write the gradient into,
    `logits` itself (in place) or None (the loss-only op). Returns (loss, lse), poisoned with NaN
    beforehand."""
    acc = _acc(logits.dtype)
    N, V = logits.shape
    target = target.long().contiguous()
    w = None if weight is None else weight.to(acc).contiguous()
    w_sum = None if weight is None else w.sum()
    scale = torch.tensor(grad_scale, dtype=acc)
    loss = torch.full((N,), math.nan, dtype=acc)
    lse = torch.full((N,), math.nan, dtype=acc)
    k_s, k_t = masses(eps, V, others)
    problem = _RowsProblem(
        _SCALAR_KIND[logits.dtype], logits.data_ptr(), logits.stride(0), None if grad is None else grad.data_ptr(),
        0 if grad is None else grad.stride(0), target.data_ptr(), None if w is None else w.data_ptr(),
        None if w_sum is None else w_sum.data_ptr(), None if grad is None else scale.data_ptr(), 0,
        loss.data_ptr(), lse.data_ptr(), N, V, IGNORE, k_s, k_t, z_loss, softcap, logit_scale,
    )
    lib.fused_ls_emulated_workspace_bytes.restype = ctypes.c_ulong
    workspace = torch.empty(max(lib.fused_ls_emulated_workspace_bytes(ctypes.byref(problem), blocks), 1), dtype=torch.uint8)
    status = lib.fused_ls_emulated_cuda_rows(ctypes.byref(problem), blocks, ctypes.c_void_p(workspace.data_ptr()))
    assert status == 0, f"launch returned cudaError {status}"
    return loss, lse


def _take_accesses(lib) -> dict:
    """The emulation's count of row accesses since the last call: loads and stores by width in
    bytes, and how many were not aligned to their width."""
    counts = (ctypes.c_ulonglong * 11)()
    lib.fused_ls_emulated_take_row_accesses(counts)
    widths = [1, 2, 4, 8, 16]
    return {"load": dict(zip(widths, counts[0:5])), "store": dict(zip(widths, counts[5:10])), "misaligned": counts[10]}


def _problem(dtype, V, N=6):
    """Logits with -inf classes at the rows' edges and inside, and targets: in range (first
    and last class among them), ignored, and out of range (never read: V + 10**6, -7)."""
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, V, (N,))
    target[0], target[1], target[2] = 0, IGNORE, V - 1
    if N > 4:
        target[4] = V + 10**6
    if N > 5:
        target[5] = -7
    if V >= 7:
        inf = float("-inf")
        logits[0, V - 1] = inf                 # the last column (a tail, for most offsets)
        logits[2, 0] = inf                     # the first column (a head)
        logits[3, V // 2 : V // 2 + 5] = inf  # a run inside the body
        logits[1, 1:3] = inf                   # an ignored row
    return logits, target


FEATURES = {
    "plain": {},
    "every feature": {"others": True, "z_loss": 1e-2, "softcap": 2.5, "logit_scale": 1.3, "weighted": True},
}


def _oracle(logits, target, eps, weight, features, grad_scale):
    """Float64 loss rows, gradient and lse; out-of-range targets as ignored (their loss is NaN)."""
    V = logits.shape[1]
    valid = (target >= 0) & (target < V)
    kwargs = {"convention": "others" if features.get("others") else "uniform", "z_loss": features.get("z_loss", 0.0),
              "softcap": features.get("softcap"), "logit_scale": features.get("logit_scale", 1.0)}
    safe = torch.where(valid, target, IGNORE)
    upstream = torch.full((len(target),), grad_scale, dtype=torch.float64)
    loss, grad = truth(logits, safe, eps, weight=weight, reduction="none", upstream=upstream, **kwargs)
    loss = torch.where(valid | (target == IGNORE), loss, math.nan)
    y = transform_logits(logits.double(), kwargs["logit_scale"], kwargs["softcap"])
    return loss, grad, torch.logsumexp(y, 1)


# Every dtype, V and layout; the features alternate over V and layout, so that each dtype meets
# both settings at every V and in every layout (the full product takes minutes to emulate).
ORACLE_CASES = [
    pytest.param(dtype, V, layout, "every feature" if (i + j) % 2 else "plain", id=f"{dtype}-{V}-{layout}")
    for dtype in DTYPES
    for i, V in enumerate(SIZES)
    for j, layout in enumerate(LAYOUTS)
]
# (where the gradient goes, blocks per row): a new contiguous buffer, one at another alignment
# (offset 3, row stride V + 5), or the logits (in place).
OUTPUTS = [("new", 1), ("in place", 1), ("offset gradient", 3), ("in place", 3)]


@pytest.mark.parametrize(("dtype", "V", "layout", "features"), ORACLE_CASES)
def test_every_layout_matches_the_oracle_and_writes_only_its_rows(emulated_cuda, dtype, V, layout, features):
    feats = FEATURES[features]
    if V == 1:  # the 'others' convention needs a second class
        feats = {**feats, "others": False}
    logits, target = _problem(dtype, V)
    weight = torch.rand(V, dtype=torch.float64) + 0.5 if feats.get("weighted") else None
    eps, grad_scale = 0.1, 0.5
    true_loss, true_grad, true_lse = _oracle(logits, target, eps, weight, feats, grad_scale)
    acc = _acc(dtype)
    # A saturated softcap's derivative 1 - tanh^2 carries a few units in the last place of 1, times
    # the class mass (up to max(weight)) and logit_scale (as in tests/test_native.py).
    grad_atol = GRAD_TOL[dtype][1]
    if feats.get("softcap"):
        grad_atol = max(grad_atol, 4 * torch.finfo(acc).eps * float(weight.max()) * 1.3 * grad_scale)
    kwargs = {k: v for k, v in feats.items() if k != "weighted"}
    for output, blocks in OUTPUTS:
        base, x = _strided(logits, layout)
        if output == "in place":
            grad_base, grad = base, x
        else:
            grad_base, grad = _strided(torch.full_like(logits, math.nan), "contiguous" if output == "new" else
                                       "offset 3, end -2")
        where = f"{output}, {blocks} blocks per row"
        loss, lse = _launch(emulated_cuda, x, target, grad, weight=weight, eps=eps, blocks=blocks,
                            grad_scale=grad_scale, **kwargs)
        torch.testing.assert_close(loss.double(), true_loss, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1],
                                   equal_nan=True, msg=lambda m: f"loss, {where}: {m}")
        torch.testing.assert_close(lse.double(), true_lse, rtol=LOSS_TOL[dtype][0], atol=LOSS_TOL[dtype][1],
                                   msg=lambda m: f"lse, {where}: {m}")
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), true_grad, rtol=GRAD_TOL[dtype][0], atol=grad_atol,
                                   msg=lambda m: f"gradient, {where}: {m}")
        assert (grad[[1, 4, 5]] == 0).all(), where  # ignored and out-of-range rows: exactly 0
        # Nothing outside the rows' V columns was written, in either buffer.
        outside = torch.ones_like(grad_base, dtype=torch.bool)
        outside[:, grad.storage_offset() : grad.storage_offset() + V] = False
        assert (grad_base[outside] == SENTINEL).all(), where
        if output != "in place":
            assert torch.equal(x, logits), where


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_same_logits_give_the_same_bits_in_every_layout(emulated_cuda, dtype, blocks):
    # Pass 1 takes the columns in one order for any alignment of the row, and pass 2 is element
    # by element: loss, lse and gradient do not depend on where the rows lie, in place or not.
    V = 5003
    logits, target = _problem(dtype, V)
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    results = {}
    for layout in LAYOUTS:
        for inplace in (False, True):
            base, x = _strided(logits, layout)
            grad = x if inplace else _strided(torch.full_like(logits, math.nan), "odd stride, offset 1")[1]
            loss, lse = _launch(emulated_cuda, x, target, grad, weight=weight, blocks=blocks, others=True, z_loss=1e-3,
                                softcap=4.0)
            results[layout, inplace] = (loss, lse, grad.clone())
    reference = results["contiguous", False]
    for key, result in results.items():
        for name, a, b in zip(("loss", "lse", "gradient"), result, reference):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), (key, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_ignored_or_out_of_range_row_has_the_lse_it_has_with_a_target(emulated_cuda, dtype, layout):
    V, N = 4097, 4
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    _, x = _strided(logits, layout)
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    with_target = _launch(emulated_cuda, x, torch.tensor([0, 5, V - 1, 2048]), None, weight=weight)
    without = _launch(emulated_cuda, x, torch.tensor([IGNORE, IGNORE, V, -1]), None, weight=weight)
    assert torch.equal(without[1], with_target[1])
    assert (without[0][:2] == 0).all() and without[0][2:].isnan().all()


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _slices(V, blocks, kvec):
    """The columns of each block of a row split over `blocks` (whole vectors each, as the launcher
    cuts them)."""
    per_block = -(-V // blocks)
    columns = -(-per_block // kvec) * kvec
    return [(b * columns, min(b * columns + columns, V)) for b in range(blocks)]


def _threads(V, blocks, kvec):
    """The launcher's threads per block (threads_for in the .cu)."""
    c0, c1 = _slices(V, blocks, kvec)[0]
    loads = -(-(c1 - c0) // kvec)
    return 128 if loads <= 1024 else 256 if loads <= 4096 else 512


def _span(address, size, kvec, c0, c1):
    """[begin, end): the whole 16-byte vectors of columns [c0, c1) of a row at `address`."""
    if c1 <= c0:
        return c0, c0
    start = address + c0 * size
    head = (16 - start % 16) % 16 // size
    begin = min(c0 + head, c1)
    return begin, begin + (c1 - begin) // kvec * kvec


def _expected_stores(x, grad, has_grad, blocks):
    """Stores by width the kernel should make: per slice of a row, its head and tail element by
    element and its body in vectors; a row with a gradient cut at its logits' 16-byte boundaries,
    in stores as wide as the gradient row's distance to them modulo 16 allows, a row without
    one cut at the gradient row's own boundaries, in 16-byte stores."""
    N, V = x.shape
    size, kvec = _size(x.dtype), _vector(x.dtype)
    counts = {1: 0, 2: 0, 4: 0, 8: 0, 16: 0}
    for r in range(N):
        distance = (grad[r].data_ptr() - x[r].data_ptr()) % 16
        width = max(16 if distance == 0 else distance & -distance, size) if has_grad[r] else 16
        row = x[r].data_ptr() if has_grad[r] else grad[r].data_ptr()
        for c0, c1 in _slices(V, blocks, kvec):
            begin, end = _span(row, size, kvec, c0, c1)
            counts[size] += max(c1 - c0, 0) - (end - begin)
            counts[width] += (end - begin) * size // width
    return counts


def _element_loads_bound(V, kvec, rows, blocks):
    """Element-wise loads a row may make: pass 1's first and last group of kVec columns (when the
    row is not 16-byte aligned) and its last V mod kVec columns, pass 2's head and tail (fewer
    than kVec each, per block). x[t], and x[0] if y_t is not finite, are read by every thread
    (a broadcast on a GPU) and counted apart."""
    return rows * (2 * kvec + V % kvec + blocks * 2 * (kvec - 1))


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_row_takes_the_16_byte_path_whatever_its_alignment(emulated_cuda, dtype, layout, blocks):
    V, N = 5003, 6
    kvec, size = _vector(dtype), _size(dtype)
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, V, (N,))
    broadcasts = N * blocks * _threads(V, blocks, kvec)  # x[t], every y_t finite
    _take_accesses(emulated_cuda)
    for inplace in (False, True):
        _, x = _strided(logits, layout)
        # A new gradient of the same row stride and start alignment as the logits (what
        # torch.empty_like gives a contiguous input), or the logits themselves.
        grad = x if inplace else _strided(torch.full_like(logits, math.nan), layout)[1]
        _launch(emulated_cuda, x, target, grad, blocks=blocks)
        counts = _take_accesses(emulated_cuda)
        assert counts["misaligned"] == 0
        elements = counts["load"][size] - broadcasts
        assert 0 <= elements <= _element_loads_bound(V, kvec, N, blocks), counts
        assert all(counts["load"][w] == 0 for w in (1, 2, 4, 8) if w != size), counts
        # Both passes read every element: pass 1 once, or in two aligned vectors (the row not
        # 16-byte aligned), pass 2 once.
        vector_bytes, element_bytes = counts["load"][16] * 16, elements * size
        assert 2 * N * V * size <= vector_bytes + element_bytes <= 3 * N * V * size, counts
        # Every store a whole 16-byte vector, but each slice's head and tail.
        assert counts["store"] == _expected_stores(x, grad, [True] * N, blocks), counts
        assert counts["store"][16] * 16 >= N * (V - blocks * 2 * kvec) * size


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_gradient_of_another_alignment_keeps_16_byte_loads_and_stores_as_wide_as_it_can(emulated_cuda, dtype,
                                                                                          blocks):
    # Logits at offset 3 with a row stride of V + 5, a new contiguous gradient of stride V: each
    # row's gradient lies at another distance from its logits modulo 16 bytes (every one of them
    # for 2-byte logits).
    V, N = 4097, 8
    kvec, size = _vector(dtype), _size(dtype)
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, V, (N,))
    _, x = _strided(logits, "offset 3, end -2")
    _, grad = _strided(torch.full_like(logits, math.nan), "contiguous")
    _take_accesses(emulated_cuda)
    _launch(emulated_cuda, x, target, grad, blocks=blocks)
    counts = _take_accesses(emulated_cuda)
    assert counts["misaligned"] == 0
    elements = counts["load"][size] - N * blocks * _threads(V, blocks, kvec)
    assert 0 <= elements <= _element_loads_bound(V, kvec, N, blocks), counts
    assert counts["store"] == _expected_stores(x, grad, [True] * N, blocks), counts
    assert counts["store"][16] > 0 and (size == 8 or counts["store"][8] > 0), counts  # not vacuous
    distances = {(grad[r].data_ptr() - x[r].data_ptr()) % 16 for r in range(N)}
    assert distances - {0}, distances  # the case this test is for
    if size < 8:  # fp64 rows are 0 or 8 bytes apart modulo 16; the others take several distances
        assert len(distances) > 2, distances


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_without_a_gradient_are_read_once_and_get_their_zeros_in_16_byte_stores(emulated_cuda, dtype, blocks):
    V, N = 5003, 4
    logits = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    target = torch.tensor([IGNORE, V, -3, IGNORE])  # ignored and out of range
    for layout in ("contiguous", "offset 3, end -2"):
        _, x = _strided(logits, layout)
        _take_accesses(emulated_cuda)
        loss_only = _launch(emulated_cuda, x, target, None, blocks=blocks)
        reads_for_the_lse = _take_accesses(emulated_cuda)["load"]
        # Pass 1 of a row without a gradient reads neither x[t] nor x[0]: its V logits only.
        assert reads_for_the_lse[16] * 16 + reads_for_the_lse[_size(dtype)] * _size(dtype) <= 2 * N * V * _size(dtype)
        for inplace in (False, True):
            _, x = _strided(logits, layout)
            grad = x if inplace else _strided(torch.full_like(logits, math.nan), "odd stride, offset 1")[1]
            loss, lse = _launch(emulated_cuda, x, target, grad, blocks=blocks)
            counts = _take_accesses(emulated_cuda)
            assert counts["load"] == reads_for_the_lse  # pass 2 reads nothing
            assert counts["misaligned"] == 0
            assert counts["store"] == _expected_stores(x, grad, [False] * N, blocks), counts
            assert (grad == 0).all() and not grad.signbit().any()
            torch.testing.assert_close(loss, loss_only[0], rtol=0, atol=0, equal_nan=True)
            assert torch.equal(lse, loss_only[1])
