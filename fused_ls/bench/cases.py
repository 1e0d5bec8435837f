"""A benchmark case: N rows of V logits in one dtype, and the default sets for each device.

The CPU set is issue 3's targets plus a large-class classifier, each about 1e8 logits so a
2-core machine runs the whole report in a few minutes. The CUDA set is the LLM range at
16384 tokens (V = 32000 Llama 2, 50257 GPT-2, 128256 Llama 3, 256000 Gemma) plus a
1,000,000-class classifier, bf16 (the headline) before fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

CPU_DEFAULT = ("4096x32000:fp32", "1024x128256:bf16", "16384x8192:fp32", "64x1000000:fp32")
CUDA_TOKENS = 16384
CUDA_VOCABS = (32000, 50257, 128256, 256000)
CUDA_LARGE_CLASS = "256x1000000"
CUDA_DEFAULT = tuple(
    name
    for dtype in ("bf16", "fp32")
    for name in [f"{CUDA_TOKENS}x{v}:{dtype}" for v in CUDA_VOCABS] + [f"{CUDA_LARGE_CLASS}:{dtype}"]
)


@dataclass(frozen=True)
class Case:
    rows: int
    classes: int
    dtype: str  # a key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return self.rows * self.classes

    @property
    def logits_bytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.classes}:{self.dtype}"

    @property
    def shape(self) -> str:
        return f"{self.rows}x{self.classes}"

    @classmethod
    def parse(cls, text: str, dtype: str | None = None) -> Case:
        """'4096x32000:bf16', or '4096x32000' with `dtype` given."""
        shape, _, own_dtype = text.strip().partition(":")
        dtype = own_dtype or dtype
        if dtype not in DTYPES:
            raise ValueError(f"case {text!r}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        try:
            rows, classes = (int(part.replace("_", "")) for part in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"case {text!r}: expected ROWSxCLASSES, e.g. 4096x32000:bf16") from None
        if rows < 1 or classes < 2:
            raise ValueError(f"case {text!r}: needs at least 1 row and 2 classes")
        return cls(rows, classes, dtype)


def default_cases(device: torch.device) -> list[Case]:
    return [Case.parse(name) for name in (CUDA_DEFAULT if device.type == "cuda" else CPU_DEFAULT)]


def select_cases(device: torch.device, shapes: str | None = None, dtypes: str | None = None) -> list[Case]:
    """The cases to run. `shapes` ('4096x32000,1024x128256:bf16') replaces the device's default
    shapes; `dtypes` ('bf16,fp32') gives every shape that names no dtype each of those dtypes.
    With neither, the default set as it stands (its shapes carry their own dtypes)."""
    if shapes is None and dtypes is None:
        return default_cases(device)
    dtype_list = [d.strip() for d in (dtypes or "fp32").split(",") if d.strip()]
    if shapes is None:  # the default shapes in the chosen dtypes
        names = list(dict.fromkeys(c.shape for c in default_cases(device)))
    else:
        names = [s.strip() for s in shapes.split(",") if s.strip()]
    cases = []
    for dtype in dtype_list:
        for name in names:
            case = Case.parse(name, dtype)
            if case not in cases:
                cases.append(case)
    return cases


@functools.lru_cache(maxsize=1)
def make_inputs(case: Case, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (standard normal, never zeros) and targets for `case`, from `seed`.

    Cached (one case at a time) so that the providers of a case share one set of inputs."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(case.rows, case.classes, generator=generator, device=device, dtype=case.torch_dtype)
    target = torch.randint(0, case.classes, (case.rows,), generator=generator, device=device)
    return logits, target


def release_inputs() -> None:
    make_inputs.cache_clear()
