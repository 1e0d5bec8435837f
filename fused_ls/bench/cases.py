"""A benchmark case: N rows of V logits in one dtype, and the sets run by default on each device.

Two sets per device. The default one is a representative run of about a minute on a 2-core
CPU: one fp32 case at Llama 2's vocabulary and one bf16 case at Llama 3's, each about 6.6e7
logits (well beyond the caches, so the memory traffic is what is timed), every provider, both
modes. `--full` (python -m fused_ls bench) or `--bench-full` (pytest bench) runs the whole
table: on the CPU the four targets of about 1e8 logits each, adding a 16384 x 8192 case and a
1,000,000-class classifier; on CUDA the LLM range at 16384 tokens (V = 32000 Llama 2, 50257
GPT-2, 128256 Llama 3, 256000 Gemma) plus a 1,000,000-class classifier, bf16 (the headline)
before fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

CPU_DEFAULT = ("2048x32000:fp32", "512x128256:bf16")
CPU_FULL = ("4096x32000:fp32", "1024x128256:bf16", "16384x8192:fp32", "64x1000000:fp32")
CUDA_TOKENS = 16384
CUDA_VOCABS = (32000, 50257, 128256, 256000)
CUDA_LARGE_CLASS = "256x1000000"
CUDA_DEFAULT = (f"{CUDA_TOKENS}x32000:bf16", f"{CUDA_TOKENS}x128256:bf16", f"{CUDA_TOKENS}x128256:fp32")
CUDA_FULL = tuple(
    name
    for dtype in ("bf16", "fp32")
    for name in [f"{CUDA_TOKENS}x{v}:{dtype}" for v in CUDA_VOCABS] + [f"{CUDA_LARGE_CLASS}:{dtype}"]
)


def split_names(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None stays None (the option was not given)."""
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


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


def default_names(device: torch.device | str, full: bool = False) -> tuple[str, ...]:
    """The names of the device's default set, or of its full table with `full`."""
    cuda = torch.device(device).type == "cuda"
    if full:
        return CUDA_FULL if cuda else CPU_FULL
    return CUDA_DEFAULT if cuda else CPU_DEFAULT


def default_cases(device: torch.device | str, full: bool = False) -> list[Case]:
    return [Case.parse(name) for name in default_names(device, full)]


def select_cases(device: torch.device | str, shapes: str | None = None, dtypes: str | None = None,
                 full: bool = False) -> list[Case]:
    """The cases to run. `shapes` ('4096x32000,1024x128256:bf16') replaces the device's default
    shapes; `dtypes` ('bf16,fp32') gives every shape that names no dtype each of those dtypes.
    With neither, the default set (the full table with `full`) as it stands: its shapes carry
    their own dtypes. `full` with `dtypes` alone: the full table's shapes in those dtypes."""
    if shapes is None and dtypes is None:
        return default_cases(device, full)
    dtype_list = split_names(dtypes or "fp32")
    if shapes is None:  # the default shapes in the chosen dtypes
        names = list(dict.fromkeys(c.shape for c in default_cases(device, full)))
    else:
        names = split_names(shapes)
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
