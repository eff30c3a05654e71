"""The measuring behind `auto`, like cuDNN's benchmark mode: the tuner and its cache file.

m2dino_kernels.selection decides which backend runs and builds the trials on each op's inputs;
this module times and checks them and remembers the outcome. On the device types it tunes
(CUDA), the first call of an op for a key -- the device's name,
the dtype, the op's sizes (MoE experts: activation, D, H, E, k; routing: D, E, k, tasks;
attention: heads, N, head_dim, RoPE) and a power-of-two bucket of the token count (the batch
for attention) -- runs every backend available for the device and dtype on that call's own
inputs, forward and backward, compares each one's outputs and gradients with the library
path's (grouped_mm for the MoE ops where it runs, else reference; sdpa for attention) within the
dtype's tolerance, times forward+backward, and keeps the fastest that agrees for every later
call with that key. A backend that raises or disagrees is excluded for that key with one
warning naming it, the key and the error.

Decisions live in memory and in `$M2DINO_CACHE/kernels-autotune.json` (default cache folder
~/.cache/m2dino), written atomically (a temporary file in the same folder, then os.replace),
merged with what other processes wrote meanwhile, and only read back when written by the same
torch version. A file that cannot be parsed is ignored with a warning (and rewritten at the
next decision).

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
from m2dino_kernels.jsonfile import read_cache_table, write_json
from m2dino_kernels.registry import BACKEND_ALIASES

ENV_VAR = "M2DINO_KERNELS_AUTOTUNE"
CACHE_NAME = "kernels-autotune.json"
FORMAT = 1
def cache_dir() -> Path:
    """$M2DINO_CACHE, default ~/.cache/m2dino (the same folder as m2dino's own cache)."""
    return Path(os.environ.get("M2DINO_CACHE") or Path.home() / ".cache" / "m2dino")


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
        self._path = None if path is None else Path(path)
        self.repeats = repeats
        self._memory: dict = {}    # in-process key (tuple) -> backend name
        self._entries: Optional[dict] = None  # file key (str) -> entry, loaded lazily
        self._warned_write = False

    # -- the cache file ---------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / CACHE_NAME

    def _read_file(self, quiet: bool = False) -> dict:
        payload = read_cache_table(self.path, "decisions", _entry_problem,
                                   "m2dino_kernels autotune", quiet)
        if not payload or payload.get("format") != FORMAT or payload.get("torch") != torch.__version__:
            return {}  # missing, corrupt, or written by another version: its timings need not hold
        return {key: _canonical_entry(entry) for key, entry in payload["decisions"].items()}

    def entries(self) -> dict:
        """The decisions of the cache file (file key -> entry), read once."""
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    def _save(self, file_key: str, entry: dict) -> None:
        self.entries()[file_key] = entry
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read_file(quiet=True), **self._entries}
            write_json(path, {"format": FORMAT, "torch": torch.__version__, "decisions": merged})
        except OSError as err:
            if not self._warned_write:
                self._warned_write = True
                warnings.warn(f"m2dino_kernels autotune: cannot write {path} ({err}); "
                              "decisions are kept in memory only", RuntimeWarning,
                              stacklevel=4)

    def clear(self) -> None:
        """Forget the in-memory decisions (the file stays)."""
        self._memory.clear()
        self._entries = None

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
        self._save(fkey, entry)
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
