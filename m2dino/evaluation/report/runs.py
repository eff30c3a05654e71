"""Reading run directories: every `<paradigm>/metrics.json`, and beside it each model's
`<paradigm>/<model>/routing.json`, per-image values (PER_IMAGE_FILE) and checkpoint config
(best.json), validated, with the run's config.yaml. Each run directory is one replicate (a seed
of `--seeds`); the report pools them. A folder whose subfolders are run directories (the OUT of
`--seeds`: OUT/seed-N/) stands for all of them."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import yaml

from m2dino import io
from m2dino.evaluation.bootstrap import PER_IMAGE_FILE
from m2dino.evaluation.metrics import METRIC_NAMES
from m2dino.tasks import PRIMARY_METRICS


class Runs(NamedTuple):
    """What the run directories hold, by paradigm and replicate (a replicate is named by its run
    directory, e.g. seed-0)."""
    results: dict    # paradigm -> task_id -> replicate -> metrics.json entry (+ "primary_metric", "values")
    routing: dict    # paradigm -> model (model@replicate from the second replicate on) -> routing.json data
    training: dict   # paradigm -> replicate -> model -> metrics.json "training" entry
    folders: dict    # paradigm -> replicate -> the OUT/<paradigm> folder
    configs: dict    # replicate -> its config.yaml ({} when the run directory has none)


def find_paradigm_files(run_dirs: Sequence[os.PathLike]) -> list[Path]:
    """Every `<paradigm>/metrics.json` under the run directories (a paradigm folder itself is
    accepted, and a folder of run directories stands for each of them)."""
    found = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        if (run_dir / "metrics.json").is_file():
            found.append(run_dir / "metrics.json")
            continue
        files = sorted(run_dir.glob("*/metrics.json")) or sorted(run_dir.glob("*/*/metrics.json"))
        if not files:
            raise FileNotFoundError(f"run directory {run_dir} holds no <paradigm>/metrics.json")
        found.extend(files)
    return found


# A model's training length, as the report reads it (the rest of a training entry is left as it is)
TRAINING_KEYS = ("train_images", "epochs", "steps", "samples_seen", "seconds")


def _is_number(value) -> bool:
    """A metric value as JSON holds it: a number, or null for NaN."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _require(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise ValueError(f"{path}: {what}")


def _validate_paradigm_metrics(data: dict, path: Path) -> None:
    """Every field the report reads has its shape checked (ValueError naming the file and field)."""
    for key in ("paradigm", "tasks"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    _require(isinstance(data["paradigm"], str), path, "'paradigm' must be a paradigm's name")
    if not isinstance(data["tasks"], dict):
        raise ValueError(f"{path}: 'tasks' must map task_id to its entry")
    for task_id, entry in data["tasks"].items():
        _require(isinstance(entry, dict), path, f"task {task_id!r}: its entry must be an object")
        for key in ("task_type", "metrics"):
            if key not in entry:
                raise ValueError(f"{path}: task {task_id!r} has no {key!r}")
        if not isinstance(entry["task_type"], str) or entry["task_type"] not in METRIC_NAMES:
            raise ValueError(f"{path}: task {task_id!r} has unknown task_type {entry['task_type']!r}")
        for key in ("metrics", "baseline"):
            _require(key not in entry or isinstance(entry[key], dict) and all(map(_is_number, entry[key].values())),
                     path, f"task {task_id!r}: {key!r} must map metric names to numbers")
        ci = entry.get("ci", {})
        _require(isinstance(ci, dict) and all(v is None or isinstance(v, list) and len(v) == 2
                                              and all(map(_is_number, v)) for v in ci.values()),
                 path, f"task {task_id!r}: 'ci' must map metric names to [low, high]")
        for key in ("model", "group", "primary_metric"):
            _require(isinstance(entry.get(key, ""), str), path, f"task {task_id!r}: {key!r} must be a string")
        for key in ("train_size", "num_classes"):
            _require(_is_number(entry.get(key)), path, f"task {task_id!r}: {key!r} must be a number")
    training = data.get("training") or {}
    _require(isinstance(training, dict) and all(isinstance(t, dict) and all(_is_number(t.get(k)) for k in TRAINING_KEYS)
                                                for t in training.values()),
             path, f"'training' must map each model to numbers ({', '.join(TRAINING_KEYS)})")


def load_runs(run_dirs: Sequence[os.PathLike]) -> Runs:
    """The run directories' results (Runs). An entry is the metrics.json entry (with
    "primary_metric" filled in) plus "values": the model's per-image values of the task, or None
    when the run has none (a run from before they were written: no intervals then)."""
    runs: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    routing: dict[str, dict[str, dict]] = defaultdict(dict)
    training: dict[str, dict[str, dict]] = defaultdict(dict)
    folders: dict[str, dict[str, Path]] = defaultdict(dict)
    configs: dict[str, dict] = {}
    for path in find_paradigm_files(run_dirs):
        data = io.read_json(path)
        _validate_paradigm_metrics(data, path)
        paradigm = str(data["paradigm"]).lower()
        replicate = path.parent.parent.name
        if replicate in training[paradigm]:
            raise ValueError(f"{path}: two run directories named {replicate!r} hold paradigm {paradigm!r}; "
                             f"give each seed its own folder name")
        if replicate not in configs:
            configs[replicate] = _read_config(path.parent.parent / "config.yaml")
        training[paradigm][replicate] = dict(data.get("training") or {})
        folders[paradigm][replicate] = path.parent
        values = {}
        for task_id, entry in data["tasks"].items():
            model = entry.get("model", "")
            if model not in values:
                values[model] = _read_per_image(path.parent / model / PER_IMAGE_FILE)
            runs[paradigm][task_id][replicate] = {
                **entry, "primary_metric": entry.get("primary_metric") or PRIMARY_METRICS[entry["task_type"]],
                "values": (values[model] or {}).get(task_id)}
        for routing_path in sorted(path.parent.glob("*/routing.json")):
            model_name = routing_path.parent.name
            key = model_name if model_name not in routing[paradigm] else f"{model_name}@{replicate}"
            routing[paradigm][key] = _read_routing(routing_path)
    return Runs({p: dict(t) for p, t in runs.items()}, dict(routing), dict(training), dict(folders), configs)


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not the run's options (not valid YAML: {str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(config).__name__}")
    _require(all(config.get(k) is None or _is_number(config[k]) for k in ("steps", "min_steps", "epochs"))
             and isinstance(config.get("control") or "", str) and isinstance(config.get("budget") or "", str),
             path, "not the run's options (numbers for steps, min_steps and epochs; words for control and budget)")
    return config


def read_checkpoint_config(folder: Path, model: str) -> dict | None:
    """A model's best.json (its checkpoint config), None when absent."""
    path = folder / model / "best.json"
    return io.read_json(path) if path.is_file() else None


def _read_per_image(path: Path) -> dict | None:
    """{task_id: per-image values} of a model, None when the file is absent."""
    if not path.is_file():
        return None
    data = io.read_json(path)
    if not isinstance(data.get("tasks"), dict):
        raise ValueError(f"{path}: expected {{'tasks': {{task_id: per-image values}}}}")
    for task_id, values in data["tasks"].items():
        paths = values.get("image_path") if isinstance(values, dict) else None
        if not isinstance(paths, list):
            raise ValueError(f"{path}: task {task_id!r} has no image_path list")
        lengths = {k: len(v) for k, v in values.items() if isinstance(v, list)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{path}: task {task_id!r} has per-image lists of different lengths {lengths}")
    return data["tasks"]


def _read_routing(path: Path) -> dict:
    data = io.read_json(path)
    for key in ("tasks", "num_experts", "layers"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    _require(isinstance(data["tasks"], list) and all(isinstance(t, str) for t in data["tasks"]), path,
             "'tasks' must be a list of task ids")
    _require(isinstance(data["num_experts"], int) and not isinstance(data["num_experts"], bool)
             and data["num_experts"] >= 1, path, "'num_experts' must be a positive integer")
    _require(isinstance(data["layers"], dict), path, "'layers' must map block indices to counts")
    num_tasks, num_experts = len(data["tasks"]), int(data["num_experts"])
    for layer, counts in data["layers"].items():
        try:
            counts = np.asarray(counts, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: layer {layer} has counts that are not a (tasks, experts) table") from None
        if counts.shape != (num_tasks, num_experts):
            raise ValueError(
                f"{path}: layer {layer} has counts of shape {counts.shape}, expected (tasks, experts) = "
                f"{(num_tasks, num_experts)}"
            )
        if (counts < 0).any():
            raise ValueError(f"{path}: layer {layer} has negative counts")
    return data
