"""The ops that fused_ls defines from Python, registered with the dispatcher's own API.

`torch.library.custom_op` would do the same registration, but it wraps every call of an
op in `torch._dynamo.disable`, which imports torch._dynamo on a process's first call: seconds
of start-up and about 150 MB of resident memory for every script, compiled or not. These ops
are plain schema definitions in a FRAGMENT library of the `fused_ls` namespace, with one
kernel per dispatch key and a fake implementation for torch.compile and opcheck. Every schema
of the namespace is defined here, from Python; the C++ extension only registers kernels for
some of them (TORCH_LIBRARY_IMPL), so it must never open a DEF library (TORCH_LIBRARY). torch.compile still sees a
mutating op through its schema's alias annotations, as for any ATen op.
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("fused_ls", "FRAGMENT")


def define_op(
    schema: str,
    *,
    default: Callable | None = None,
    fake: Callable,
    kernels: dict[str, Callable] | None = None,
    mutated: tuple[int, ...] = (),
):
    """Define `fused_ls::<schema>` and return its overload packet.

    `default` serves every device (CompositeExplicitAutograd); `kernels` maps a dispatch key
    ("CPU", "CUDA") to a faster kernel for that device; `fake` computes the outputs' metadata.
    With neither `default` nor `kernels`, the op is declared for kernels that C++ registers
    (TORCH_LIBRARY_IMPL) when the native extension loads.
    `mutated` lists the positions of the arguments the op writes: their version counters move
    after each call, as for any in-place op, so that autograd notices a tensor it saved.
    """
    name = schema.split("(", 1)[0]
    _LIBRARY.define(schema)
    if default is not None:
        _LIBRARY.impl(name, _bumping_versions(default, mutated), "CompositeExplicitAutograd")
    for key, kernel in (kernels or {}).items():
        _LIBRARY.impl(name, _bumping_versions(kernel, mutated), key)
    torch.library.register_fake(f"fused_ls::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.fused_ls, name)


def _bumping_versions(kernel: Callable, mutated: tuple[int, ...]) -> Callable:
    if not mutated:
        return kernel

    def run(*args, **kwargs):
        result = kernel(*args, **kwargs)
        for position in mutated:
            torch.autograd.graph.increment_version(args[position])
        return result

    return run
