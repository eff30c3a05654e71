"""Reading run directories: every `<paradigm>/metrics.json` and `<paradigm>/<model>/routing.json`
under them, validated, with seed replicates of a paradigm merged."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dino import io
from m2dino.evaluation.metrics import METRIC_NAMES, as_float, nanmean
from m2dino.tasks import PRIMARY_METRICS


def find_paradigm_files(run_dirs: Sequence[os.PathLike]) -> list[Path]:
    """Every `<paradigm>/metrics.json` under the run directories (a paradigm folder itself is accepted)."""
    found = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        if (run_dir / "metrics.json").is_file():
            found.append(run_dir / "metrics.json")
            continue
        files = sorted(run_dir.glob("*/metrics.json"))
        if not files:
            raise FileNotFoundError(f"run directory {run_dir} holds no <paradigm>/metrics.json")
        found.extend(files)
    return found


def _validate_paradigm_metrics(data: dict, path: Path) -> None:
    for key in ("paradigm", "tasks"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    if not isinstance(data["tasks"], dict):
        raise ValueError(f"{path}: 'tasks' must map task_id to its entry")
    for task_id, entry in data["tasks"].items():
        for key in ("task_type", "metrics"):
            if key not in entry:
                raise ValueError(f"{path}: task {task_id!r} has no {key!r}")
        if entry["task_type"] not in METRIC_NAMES:
            raise ValueError(f"{path}: task {task_id!r} has unknown task_type {entry['task_type']!r}")


def load_runs(run_dirs: Sequence[os.PathLike]) -> tuple[dict, dict]:
    """(paradigm -> task_id -> merged entry, paradigm -> model -> routing.json data).

    Replicates of one paradigm are averaged metric by metric; `runs` counts them.
    """
    replicates: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    routing: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in find_paradigm_files(run_dirs):
        data = io.read_json(path)
        _validate_paradigm_metrics(data, path)
        paradigm = str(data["paradigm"]).lower()
        for task_id, entry in data["tasks"].items():
            replicates[paradigm][task_id].append(entry)
        for routing_path in sorted(path.parent.glob("*/routing.json")):
            model_name = routing_path.parent.name
            key = model_name if model_name not in routing[paradigm] else f"{model_name}@{path.parent.parent.name}"
            routing[paradigm][key] = _read_routing(routing_path)
    merged = {p: {t: _merge_replicates(entries) for t, entries in tasks.items()} for p, tasks in replicates.items()}
    return merged, dict(routing)


def _merge_replicates(entries: list[dict]) -> dict:
    first = entries[0]

    def mean_of(key):
        names = {n for e in entries for n in (e.get(key) or {})}
        return {n: nanmean([as_float((e.get(key) or {}).get(n)) for e in entries]) for n in sorted(names)}

    return {
        "task_type": first["task_type"],
        "group": first.get("group", "Other"),
        "train_size": int(first.get("train_size", 0) or 0),
        "model": first.get("model", ""),
        "primary_metric": first.get("primary_metric") or PRIMARY_METRICS[first["task_type"]],
        "metrics": mean_of("metrics"),
        "baseline": mean_of("baseline"),
        "runs": len(entries),
    }


def _read_routing(path: Path) -> dict:
    data = io.read_json(path)
    for key in ("tasks", "num_experts", "layers"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    num_tasks, num_experts = len(data["tasks"]), int(data["num_experts"])
    for layer, counts in data["layers"].items():
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (num_tasks, num_experts):
            raise ValueError(
                f"{path}: layer {layer} has counts of shape {counts.shape}, expected (tasks, experts) = "
                f"{(num_tasks, num_experts)}"
            )
        if (counts < 0).any():
            raise ValueError(f"{path}: layer {layer} has negative counts")
    return data
