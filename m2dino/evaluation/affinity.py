"""Inter-task affinity over a run's measured steps: the accumulator and `affinity.json`.

The probe (m2dino.training.affinity) measures, at one step, the lookahead affinity Z[i, j]
(a step on task i's loss changes task j's loss by the share Z: > 0 helps j) and the cosine of
the tasks' gradients on the shared parameters, for the tasks in that step's batch. Here those
steps are gathered per ordered pair over the run.

affinity.json (format 1), n tasks, S measured steps; matrices are row = the task that steps
(source i), column = the task served (target j); null where a pair was never measured:
    {"format": 1,
     "tasks": [n task ids],
     "steps": [S training steps at which it was measured, increasing],
     "lr": [S learning rates of the lookahead step],
     "losses": S x n, each task's loss at the measured step (null: not in that batch),
     "lookahead": {"mean": n x n, "std": n x n, "count": n x n, "per_step": S x n x n},
     "cosine":    {"mean": n x n, "std": n x n, "count": n x n, "per_step": S x n x n},
     "measured": {how: method, shared modules and parameter count, cadence, seconds}}
mean and std (ddof 1; null under 2 values) are over the steps where the pair was measured,
count is how many. `read_affinity` checks every shape and names the file at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dino import io
from m2dino.errors import InputError
from m2dino.paradigms import AG_PARADIGM

AFFINITY_FILE = "affinity.json"
FORMAT = 1
MEASURES = ("lookahead", "cosine")


@dataclass
class StepAffinity:
    """One measured step: the tasks of the batch (sorted) and their matrices."""
    tasks: list[str]
    lookahead: np.ndarray   # [k, k], row steps, column served
    cosine: np.ndarray      # [k, k]
    losses: np.ndarray      # [k], each task's loss before the step


@dataclass
class Measure:
    """One measure over the steps: per_step [S, n, n] (NaN: not measured), and its summary."""
    per_step: np.ndarray

    @property
    def count(self) -> np.ndarray:
        return (~np.isnan(self.per_step)).sum(axis=0) if len(self.per_step) else np.zeros(self.per_step.shape[1:], int)

    @property
    def mean(self) -> np.ndarray:
        return _summary(self.per_step, lambda v: np.nanmean(v, axis=0), minimum=1)

    @property
    def std(self) -> np.ndarray:
        return _summary(self.per_step, lambda v: np.nanstd(v, axis=0, ddof=1), minimum=2)

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "count": self.count, "per_step": self.per_step}


def _summary(per_step: np.ndarray, reduce, minimum: int) -> np.ndarray:
    counts = (~np.isnan(per_step)).sum(axis=0)
    out = np.full(per_step.shape[1:], np.nan)
    enough = counts >= minimum
    if enough.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            out[enough] = reduce(per_step[:, enough])
    return out


@dataclass
class AffinityRecord:
    """What affinity.json holds (module docstring), as arrays."""
    tasks: list[str]
    steps: list[int]
    lr: list[float]
    losses: np.ndarray                  # [S, n]
    lookahead: Measure
    cosine: Measure
    measured: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "tasks": list(self.tasks), "steps": list(self.steps), "lr": list(self.lr),
                "losses": self.losses, "lookahead": self.lookahead.to_json(), "cosine": self.cosine.to_json(),
                "measured": self.measured}

    def measure(self, name: str) -> Measure:
        if name not in MEASURES:
            raise ValueError(f"affinity measure must be one of {MEASURES}, got {name!r}")
        return getattr(self, name)

    def resampled(self, rows: np.ndarray) -> "AffinityRecord":
        """The record of the measured steps `rows` (indices, repeats allowed: a bootstrap draw)."""
        rows = np.asarray(rows, dtype=int)
        return AffinityRecord(self.tasks, [self.steps[r] for r in rows], [self.lr[r] for r in rows],
                              self.losses[rows], Measure(self.lookahead.per_step[rows]),
                              Measure(self.cosine.per_step[rows]), self.measured)


class AffinityAccumulator:
    """Gathers StepAffinity results over steps into an AffinityRecord for `tasks` (all the
    model's tasks; a step may hold a subset)."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks = list(tasks)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"affinity needs distinct task ids, got {self.tasks}")
        self._index = {t: i for i, t in enumerate(self.tasks)}
        self.steps: list[int] = []
        self.lr: list[float] = []
        self._losses: list[np.ndarray] = []
        self._per_step = {m: [] for m in MEASURES}

    def add(self, step: int, result: StepAffinity, lr: float) -> None:
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"affinity steps must increase: step {step} after {self.steps[-1]}")
        unknown = sorted(set(result.tasks) - set(self._index))
        if unknown:
            raise ValueError(f"measured tasks {unknown} are not the accumulator's tasks {self.tasks}")
        where = np.array([self._index[t] for t in result.tasks], dtype=int)
        n = len(self.tasks)
        for name in MEASURES:
            full = np.full((n, n), np.nan)
            full[np.ix_(where, where)] = getattr(result, name)
            self._per_step[name].append(full)
        losses = np.full(n, np.nan)
        losses[where] = result.losses
        self._losses.append(losses)
        self.steps.append(int(step))
        self.lr.append(float(lr))

    def record(self, measured: dict | None = None) -> AffinityRecord:
        n, s = len(self.tasks), len(self.steps)
        stack = {m: np.array(v).reshape(s, n, n) for m, v in self._per_step.items()}
        return AffinityRecord(list(self.tasks), list(self.steps), list(self.lr),
                              np.array(self._losses).reshape(s, n), Measure(stack["lookahead"]),
                              Measure(stack["cosine"]), dict(measured or {}))


def ag_affinity_candidates(run_dir) -> list[Path]:
    """Where a run's AG groups take their affinity from, in order: the study's AU model's record,
    else AG's own probe's (m2dino.training.ag)."""
    run_dir = Path(run_dir)
    return [run_dir / "au" / "all" / AFFINITY_FILE, run_dir / AG_PARADIGM / AFFINITY_FILE]


def write_affinity(path, record: AffinityRecord) -> Path:
    """affinity.json, atomically (NaN written as null)."""
    return io.write_json(path, record.to_json())


def read_affinity(path) -> AffinityRecord:
    """An affinity.json back as an AffinityRecord; InputError naming the file and the field at
    fault for anything not of the documented shape."""
    path = Path(path)
    data = io.read_json(path)

    def bad(message: str):
        return InputError(f"{path}: {message} (not an affinity file of format {FORMAT}; see "
                          f"m2dino.evaluation.affinity)")

    if data.get("format") != FORMAT:
        raise bad(f"format is {data.get('format')!r}")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks) \
            or len(set(tasks)) != len(tasks):
        raise bad("'tasks' must be a non-empty list of distinct task ids")
    steps, lr = data.get("steps"), data.get("lr")
    if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise bad("'steps' must be a list of integers")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise bad("'steps' must increase")
    n, s = len(tasks), len(steps)
    if not isinstance(lr, list) or len(lr) != s:
        raise bad(f"'lr' must be a list of {s} learning rates (one per step)")
    lr_values = _array(lr, (s,), "lr", bad)
    losses = _array(data.get("losses"), (s, n), "losses", bad)
    measures = {}
    for name in MEASURES:
        block = data.get(name)
        if not isinstance(block, dict):
            raise bad(f"{name!r} must be an object with mean, std, count, per_step")
        measures[name] = Measure(_array(block.get("per_step"), (s, n, n), f"{name}.per_step", bad))
        for key in ("mean", "std", "count"):
            _array(block.get(key), (n, n), f"{name}.{key}", bad)
    measured = data.get("measured", {})
    if not isinstance(measured, dict):
        raise bad("'measured' must be an object")
    return AffinityRecord(tasks, steps, [float(v) for v in lr_values], losses, measures["lookahead"],
                          measures["cosine"], measured)


def _array(value, shape: tuple, name: str, bad) -> np.ndarray:
    """value (nested lists of numbers or null) as a float array of `shape` (null -> NaN)."""
    try:
        array = np.array(value if value is not None else [], dtype=object)
        if array.shape != shape:
            raise ValueError
        flat = [np.nan if v is None else v for v in array.reshape(-1)]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise ValueError
        return np.array(flat, dtype=float).reshape(shape)
    except ValueError:
        got = np.shape(value) if value is not None else "nothing"
        raise bad(f"{name!r} must be numbers (or null) of shape {list(shape)}, got shape "
                  f"{list(got) if isinstance(got, tuple) else got}") from None
