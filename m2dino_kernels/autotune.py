"""The measuring behind `auto`, like cuDNN's benchmark mode: the tuner and its cache file.

m2dino_kernels.selection decides which backend runs and m2dino_kernels.trials builds the
trials on each op's inputs; this module times and checks them and remembers the outcome. On
the device types it tunes (CUDA), the first call of an op for a key (TuneKey: the op, the
device, the dtype, the op's sizes -- MoE experts: activation, D, H, E, k; routing: D, E, k,
tasks; attention: heads, N, head_dim, RoPE -- and a power-of-two bucket of the token count,
the batch for attention) runs every candidate on that call's own inputs, forward and
backward, compares each one's outputs and gradients with the library path's (grouped_mm for
the MoE ops where it runs, else reference; sdpa for attention) within the dtype's tolerance
(m2dino_kernels.compare), times forward+backward, and keeps the fastest that agrees for every
later call with that key. A backend that raises or disagrees is excluded for that key with
one warning naming it, the key and the error. The candidates are screened first by `auto`'s
self-test gate (m2dino_kernels.gate): a compiled backend that has not passed the self-test on
the device in a child process never runs in this one.

Decisions live in memory and in `$M2DINO_CACHE/kernels-autotune.json` (default cache folder
~/.cache/m2dino; m2dino_kernels.jsonfile.CacheFile: written atomically, merged with what other
processes wrote meanwhile, read back only when written by the same torch version, ignored with
a warning when it cannot be parsed and rewritten at the next decision).

M2DINO_KERNELS_AUTOTUNE=0 turns measurement off: `auto` is then the library path. Under
torch.compile tracing `auto` uses a decision already in memory, else the library path; it
never measures there. Device types that are not tuned (CPU by default) keep selection.py's
fixed rule. `TUNER` is the process's tuner; tests install their own (e.g. one that tunes CPU
with a candidate list of their choosing).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from m2dino_kernels.compare import mismatch
from m2dino_kernels.jsonfile import CacheFile
from m2dino_kernels.registry import BACKEND_ALIASES

ENV_VAR = "M2DINO_KERNELS_AUTOTUNE"
CACHE_NAME = "kernels-autotune.json"
FORMAT = 1
def token_bucket(n: int) -> int:
    """The power of two at or above n (n >= 1): calls within a factor of two share a
    decision."""
    return 1 << max(0, int(n) - 1).bit_length()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_DEVICE_NAMES: dict = {}


def device_name(device: torch.device) -> str:
    key = (device.type, device.index)
    if key not in _DEVICE_NAMES:
        _DEVICE_NAMES[key] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else device.type)
    return _DEVICE_NAMES[key]


class TuneKey(NamedTuple):
    """What a decision is remembered by: the op, the device, the dtype and the op's sizes
    (name, value) in order, the token (or batch) bucket last."""

    op: str
    device_type: str
    device_index: Optional[int]
    dtype: torch.dtype
    sizes: tuple

    @classmethod
    def of(cls, op: str, device: torch.device, dtype: torch.dtype, sizes: dict) -> "TuneKey":
        return cls(op, device.type, device.index, dtype, tuple(sizes.items()))

    def file_key(self) -> str:
        """The cache file's key: op, device name, dtype and the sizes, as readable text."""
        device = torch.device(self.device_type, self.device_index)
        parts = [self.op, device_name(device), str(self.dtype).replace("torch.", "")]
        return "|".join(parts + [f"{name}={value}" for name, value in self.sizes])


class Trial:
    """One timed, checked run per candidate on a call's inputs.

    run(name) -> tuple of tensors (outputs then gradients; None entries allowed), the
    forward+backward of backend `name`. check(name, got, want) -> None or a message (default:
    every entry within the tolerance of `dtype`, `names` label them)."""

    def __init__(self, run: Callable[[str], Sequence], names: Sequence[str], dtype,
                 device: torch.device, check: Optional[Callable] = None):
        self.run = run
        self.names = tuple(names)
        self.dtype = dtype
        self.device = device
        self._check = check

    def check(self, name: str, got: Sequence, want: Sequence) -> Optional[str]:
        if self._check is not None:
            return self._check(got, want)
        if len(got) != len(want):
            return f"returned {len(got)} tensors, expected {len(want)}"
        for label, g, w in zip(self.names, got, want):
            problem = mismatch(label, g, w, self.dtype)
            if problem:
                return problem
        return None


# ---------------------------------------------------------------------------------------
# The tuner
# ---------------------------------------------------------------------------------------
def _canonical_entry(entry: dict) -> dict:
    """An entry with old backend names (files written before a rename) read as today's."""
    def name(n):
        return BACKEND_ALIASES.get(n, n)

    entry = {**entry, "backend": name(entry["backend"])}
    if isinstance(entry.get("reference"), str):
        entry["reference"] = name(entry["reference"])
    for field in ("ms", "excluded"):
        if isinstance(entry.get(field), dict):
            entry[field] = {name(n): value for n, value in entry[field].items()}
    return entry


def _entry_problem(entry) -> Optional[str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
        return "has no backend name"
    return None


def first_line(err: BaseException) -> str:
    """The exception's type and the first line of its message (at most 300 characters)."""
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:300]


class Autotuner:
    """Measured backend decisions per key, in memory and in the JSON cache file.

    device_types: the device types whose `auto` is measured (default CUDA only).
    candidates: None (every backend the caller lists) or callable(op, device_type, dtype,
        names) -> the names to try (tests inject backends of their own here).
    enabled: None reads M2DINO_KERNELS_AUTOTUNE (anything but "0" is on).
    path: the cache file (default $M2DINO_CACHE/kernels-autotune.json, read when first
        needed). repeats: timed runs per candidate after the checked one (the fastest counts).
    """

    def __init__(self, device_types=("cuda",), candidates=None, enabled=None, path=None,
                 repeats: int = 3):
        self.device_types = frozenset(device_types)
        self.candidates = candidates
        self.enabled = (os.environ.get(ENV_VAR, "1") != "0") if enabled is None else enabled
        self.repeats = repeats
        self._memory: dict = {}    # in-process key (TuneKey) -> backend name
        self._file = CacheFile(CACHE_NAME, "decisions", {"format": FORMAT, "torch": torch.__version__},
                               _entry_problem, "m2dino_kernels autotune", path,
                               read_entry=_canonical_entry)

    # -- the cache file ---------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._file.path

    def entries(self) -> dict:
        """The decisions of the cache file (file key -> entry), read once; entries naming a
        backend by an old name are read as today's."""
        return self._file.entries()

    def clear(self) -> None:
        """Forget the in-memory decisions (the file stays)."""
        self._memory.clear()
        self._file.clear()

    # -- deciding ---------------------------------------------------------------------
    def applies_to(self, device_type: str) -> bool:
        return self.enabled and device_type in self.device_types

    def remembered(self, key: TuneKey) -> Optional[str]:
        """The in-memory decision for `key` (a plain dict read: safe under tracing)."""
        return self._memory.get(key)

    def choose(self, key: TuneKey, names: Sequence[str], references: Sequence[str],
               make_trial: Callable[[], Trial], default: str,
               screen: Optional[Callable[[list], list]] = None) -> str:
        """The backend for `key`: remembered, else read from the cache file, else measured.

        names: the candidates (backends available for the device and dtype); references:
        the backends to compare with, in order of preference (the first that runs);
        make_trial: builds the Trial on the call's inputs (only when measuring); default:
        what to use when nothing can be measured; screen: the candidates that may run in
        this process at all (`auto`'s self-test gate), applied before the file or a trial."""
        found = self._memory.get(key)
        if found is not None:
            return found
        if torch.compiler.is_compiling():
            return default
        names = list(names)
        if self.candidates is not None:
            names = list(self.candidates(key.op, key.device_type, key.dtype, names))
        if screen is not None:
            names = screen(names)
        fkey = key.file_key()
        entry = self.entries().get(fkey)
        if entry is not None and entry["backend"] in names:
            self._memory[key] = entry["backend"]
            return entry["backend"]
        entry = self._measure(fkey, names, references, make_trial())
        if entry is None:
            return default
        self._memory[key] = entry["backend"]
        self._file.save(fkey, entry)
        return entry["backend"]

    def _measure(self, fkey: str, names, references, trial: Trial) -> Optional[dict]:
        want, reference = None, None
        for ref in list(references) + [n for n in names if n not in references]:
            try:
                want = trial.run(ref)
                reference = ref
                break
            except Exception as err:  # noqa: BLE001 (any failure excludes it)
                warnings.warn(f"m2dino_kernels autotune: reference backend {ref!r} failed for "
                              f"{fkey}: {first_line(err)}", RuntimeWarning, stacklevel=5)
        if reference is None:
            return None
        times, excluded = {}, {}
        for name in names:
            try:
                got = want if name == reference else trial.run(name)
                problem = None if name == reference else trial.check(name, got, want)
                if problem is not None:
                    raise AssertionError(f"disagrees with {reference!r}: {problem}")
                times[name] = self._time(trial, name)
            except Exception as err:  # noqa: BLE001
                excluded[name] = first_line(err)
                warnings.warn(f"m2dino_kernels autotune: backend {name!r} excluded for {fkey}: "
                              f"{excluded[name]}", RuntimeWarning, stacklevel=5)
        if not times:
            return None
        best = min(times, key=times.get)
        return {"backend": best, "reference": reference,
                "ms": {n: round(t * 1e3, 4) for n, t in sorted(times.items())},
                "excluded": excluded}

    def _time(self, trial: Trial, name: str) -> float:
        best = math.inf
        for _ in range(max(1, self.repeats)):
            synchronize(trial.device)
            start = time.perf_counter()
            trial.run(name)
            synchronize(trial.device)
            best = min(best, time.perf_counter() - start)
        return best


TUNER = Autotuner()
