"""Self-tuning of the Triton launch on the user's GPU, checked before it is trusted.

The first call for a (GPU, V, dtype, features) key times every candidate launch
(fused_ls.triton.smoothed_xent.candidate_configs) on that call's own rows and keeps the
fastest; the choice is kept for the process and on disk ($FUSED_LS_CACHE_DIR, default
~/.cache/fused_ls, file triton-launch.json), so later processes do not tune again. Before a
candidate is timed its loss, lse and gradient are compared with the default launch's on the
same rows, and one that disagrees is dropped. Trials write into scratch buffers, never into
the caller's tensors: an in-place launch is tuned out of place, its input untouched.

    FUSED_LS_TRITON_LAUNCH=<name>  pins a launch by name (e.g. "persistent-b4096-w8-p1")
    FUSED_LS_AUTOTUNE=0            no tuning: the default launch
    fused_ls.tune(logits, target, ...)  tunes ahead of time, e.g. before CUDA-graph capture

Tuning syncs with the host (it times), so it never runs while a CUDA graph is being captured
(the default launch is used then) and, once a key is tuned, a call makes no host sync.
Nothing is tuned on the CPU (the interpreter runs the default launch).
"""

from __future__ import annotations

import json
import os
import statistics
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

# Rows a trial runs on: enough for every SM to have rows, few enough that the scratch
# gradient stays small (at most about 2**26 logits, 128 MiB in bf16).
_TRIAL_ELEMENTS = 1 << 26
_TRIAL_REPEATS = 5

_CHOICES: dict[str, str] = {}
_UNPINNED: set[str] = set()
_LOADED = {"disk": False}


def cache_path() -> Path:
    root = os.environ.get("FUSED_LS_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fused_ls"
    return Path(root) / "triton-launch.json"


def tuning_key(device: torch.device, V: int, dtype: torch.dtype, features: Sequence) -> str:
    import triton

    from fused_ls._version import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join([name, f"triton {triton.__version__}", f"fused_ls {__version__}", str(V),
                     str(dtype).replace("torch.", ""), *map(str, features)])


def _load_disk() -> None:
    if _LOADED["disk"]:
        return
    _LOADED["disk"] = True
    try:
        saved = json.loads(cache_path().read_text())
    except Exception:  # noqa: BLE001  (no cache yet, no home directory, an unreadable file: tune again)
        return
    if isinstance(saved, dict):
        _CHOICES.update({k: v for k, v in saved.items() if isinstance(k, str) and isinstance(v, str)})


def _save_disk() -> None:
    try:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(_CHOICES, indent=1, sort_keys=True))
        temporary.replace(path)  # atomic: concurrent processes never read half a file
    except Exception:  # noqa: BLE001  (a read-only or missing home: the choice still holds for this process)
        pass


def choose(key: str, names: Sequence[str], trial: Callable[[str], tuple], *, may_tune: bool,
           timer: Callable[[Callable[[], None]], float] | None = None) -> str:
    """The launch name for `key`, among `names` (the first is the default).

    `trial(name)` runs one candidate into scratch buffers and returns its outputs (tensors);
    `timer(fn)` returns fn's time in ms (CUDA events by default)."""
    pinned = os.environ.get("FUSED_LS_TRITON_LAUNCH")
    if pinned:
        if pinned in names:
            return pinned
        if key not in _UNPINNED:  # a pin for other rows (another V, dtype or features): said once
            _UNPINNED.add(key)
            warnings.warn(f"FUSED_LS_TRITON_LAUNCH={pinned!r} is not a launch for {key}; candidates: {list(names)}",
                          stacklevel=2)
    if os.environ.get("FUSED_LS_AUTOTUNE", "1") == "0":
        return names[0]
    if key in _CHOICES and _CHOICES[key] in names:
        return _CHOICES[key]
    _load_disk()
    if key in _CHOICES and _CHOICES[key] in names:
        return _CHOICES[key]
    if not may_tune or len(names) == 1:
        return names[0]
    _CHOICES[key] = tune(names, trial, timer or _cuda_time_ms)
    _save_disk()
    return _CHOICES[key]


def tune(names: Sequence[str], trial: Callable[[str], tuple], timer: Callable) -> str:
    """The fastest candidate whose outputs match the default's (names[0])."""
    reference = trial(names[0])
    times = {}
    for name in names:
        try:
            outputs = reference if name == names[0] else trial(name)
        except Exception:  # noqa: BLE001  (a candidate that cannot run here is simply not chosen)
            continue
        if not _agrees(outputs, reference):
            continue
        times[name] = timer(lambda name=name: trial(name))
    return min(times, key=times.get) if times else names[0]


def _agrees(outputs: tuple, reference: tuple) -> bool:
    """Equal up to the rounding of a different summation order: the loss and lse to float32's
    precision, the gradient to one rounding of its dtype; integers (each row's argmax) exactly."""
    for got, want in zip(outputs, reference):
        if got is None or want is None:
            if got is not want:
                return False
            continue
        if got.shape != want.shape:
            return False
        if not got.is_floating_point():
            if not torch.equal(got, want):
                return False
            continue
        rtol = 1e-5 if got.dtype in (torch.float32, torch.float64) else 2.0 ** -7
        if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=1e-6, equal_nan=True):
            return False
    return True


def _cuda_time_ms(fn: Callable[[], None]) -> float:
    fn()  # warm-up: compiles the candidate
    times = []
    for _ in range(_TRIAL_REPEATS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def decided() -> dict[str, str]:
    """The tuned choices of this process (read from disk or timed here)."""
    return _CHOICES


def trial_rows(num_rows: int, V: int, sms: int) -> int:
    """Rows a trial runs on: all of them, or enough for 4 rows an SM within _TRIAL_ELEMENTS."""
    return max(1, min(num_rows, max(4 * sms, _TRIAL_ELEMENTS // max(V, 1))))


def forget() -> None:
    """Drop this process's choices (tests; a changed environment)."""
    _CHOICES.clear()
    _LOADED["disk"] = False
    for hook in _FORGET_HOOKS:
        hook()


# Callables that drop what was derived from the choices (the launcher's per-call memo).
_FORGET_HOOKS: list = []
