"""What the autograd.Functions of `functional`, `linear` and `parallel` share: the rules
for writing a gradient over the logits, the refusal of a second derivative, and the backward
of a loss whose forward already computed its gradient (scale it by the upstream gradient).

The forward folds the mean's 1/normaliser into the gradient, so for the usual
`loss.backward()` the upstream gradient is exactly 1 and the scaling is a no-op: on CUDA the
Triton kernel decides that on the device (no host sync) and moves no bytes; elsewhere it is
one multiply, computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch

from fused_ls._library import define_op
from fused_ls._row_op import elements_overlap
from fused_ls._core import accumulation_dtype


def refuse_create_graph(what: str) -> None:
    """Called first in a fused backward: a fused kernel's gradient is a saved tensor, not a
    graph of ops, so a backward that records a graph (create_graph=True, for a second
    derivative) would silently treat it as a constant. Refused with the way out."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{what}: the fused backends compute the gradient in their fused pass and cannot differentiate "
            "it again (create_graph=True, double backward, a gradient penalty); use backend='torch' for that"
        )


def check_inplace_allowed(logits: torch.Tensor) -> None:
    """Autograd's rules for an in-place write, checked before the kernel overwrites `logits`
    with their gradient: never a leaf that requires grad, nor a view of one (a slice or
    reshape of a parameter), whose data the write would destroy; and never elements that
    share memory (expanded or unfolded logits), whose gradients would overwrite each other."""
    base = logits._base if logits._base is not None else logits
    if base.is_leaf and base.requires_grad:
        what = "a leaf tensor" if base is logits else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward would overwrite {what} that requires grad; "
            "use it on logits produced by an op (for example the LM head)"
        )
    if elements_overlap(logits):
        raise ValueError(
            f"inplace_backward needs logits whose elements do not share memory (got shape {tuple(logits.shape)}, "
            f"strides {logits.stride()}: expanded or unfolded); call .contiguous() first or drop inplace_backward"
        )


def scale_saved_gradient(grad: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """The backward of a loss whose forward saved its gradient: row i of `grad` times
    grad_loss[i] (a 0-d grad_loss scales every row; a 1-D `grad` is one row)."""
    if grad is None:
        return None
    rows = grad if grad.dim() == 2 else grad.view(1, -1)
    row_scale = grad_loss.reshape(-1).expand(rows.shape[0]).to(accumulation_dtype(grad.dtype))  # stride 0 unless "none"
    if backward_may_run_again():
        return (rows * row_scale.unsqueeze(1)).to(grad.dtype).view(grad.shape)
    # The saved gradient is ours alone and this backward is its last use: scale it in
    # place, which on CUDA costs nothing when the upstream gradient is exactly 1.
    torch.ops.fused_ls.scale_rows_(rows, row_scale)
    return grad


def backward_may_run_again() -> bool:
    """True when the saved gradient must survive this backward (retain_graph, gradcheck)."""
    if torch.compiler.is_compiling():
        return True  # traced once for every later call; the compiler re-inplaces if it can
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def _multiply(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[i, :] *= scale[i]; `scale` has one entry per row (stride 0 for a scalar)."""
    grad.mul_(scale.unsqueeze(1))


def _multiply_cpu(grad: torch.Tensor, scale: torch.Tensor) -> None:
    # Reading CPU scales is no device sync: skip the whole pass over the gradient (as much
    # memory traffic as the fused op itself) when every scale is exactly 1.
    if not bool((scale == 1).all()):
        _multiply(grad, scale)


def _multiply_cuda(grad: torch.Tensor, scale: torch.Tensor) -> None:
    if grad.dim() != 2 or (grad.stride(1) != 1 and grad.shape[1] > 1):
        _multiply(grad, scale)  # the Triton kernel reads rows of unit stride
        return
    try:
        from fused_ls.triton.smoothed_xent import scale_rows_ as triton_scale_rows_
    except Exception:  # noqa: BLE001  (no working Triton: the plain multiply is still right)
        _multiply(grad, scale)
        return
    triton_scale_rows_(grad, scale)


scale_rows_ = define_op(
    "scale_rows_(Tensor(a!) grad, Tensor scale) -> ()",
    default=_multiply,
    fake=lambda grad, scale: None,
    kernels={"CPU": _multiply_cpu, "CUDA": _multiply_cuda},
    mutated=(0,),
)
