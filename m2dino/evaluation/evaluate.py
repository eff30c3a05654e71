"""Score a prediction folder exactly as the FM_UIA challenge's evaluator does.

`evaluate_folder(data_root, predictions_dir)` (and `python -m m2dino.evaluate`) reads the
ground truth from ROOT's `csv_files/*.csv` (or from ROOT/val when ROOT is a release with
train/ and val/; `split` picks another) and the submission in the folder
(m2dino.evaluation.submission).

The ground truth comes from the CSVs through `m2dino.data.reader.read_csvs` (its CSV-level
checks, root containment included, apply; masks are decoded while scoring). Unlike the
challenge's script, which skips a missing prediction silently and scores the rest, a missing
prediction is an error naming the image_path, and so is a malformed file.
Metric conventions: see `m2dino.evaluation.metrics`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dino import io
from m2dino.data.images import load_mask_array
from m2dino.data.reader import Record, read_csvs, resolve_split_root
from m2dino.evaluation import metrics
from m2dino.evaluation.ground_truth import ground_truth_from_record
from m2dino.evaluation.submission import (
    PREDICTION_FILES,
    EvaluationError,
    parse_entry,
    prediction_mask_relpath,
    read_prediction_file,
)
from m2dino.tasks import TaskSpec, TaskType


def read_ground_truth(split_root: Path, tasks: Sequence[str] | None = None) -> tuple[list[Record], dict[str, TaskSpec]]:
    """The validated CSV records of a split root (and the task specs), optionally only `tasks`.

    CSV-level problems (columns, values, paths outside the root, duplicates) are errors; the
    masks themselves are read while scoring.
    """
    scan = read_csvs(split_root)
    records, specs = scan.records, scan.tasks
    if tasks is not None:
        unknown = set(tasks) - set(specs)
        if unknown:
            raise EvaluationError(f"tasks {sorted(unknown)} have no rows in {split_root / 'csv_files'}; "
                                  f"found {sorted(specs)}")
        records = [r for r in records if r.task_id in set(tasks)]
        specs = {t: s for t, s in specs.items() if t in set(tasks)}
    wanted = {(r.csv, r.row) for r in records}
    problems = [p for p in scan.problems if p.row < 0 or (p.csv, p.row) in wanted]
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:20])
        raise EvaluationError(f"{len(problems)} ground-truth problem(s) under {split_root}:\n  {listed}")
    return records, specs


def _read_mask(path: Path, what: str) -> np.ndarray:
    try:
        mask = load_mask_array(path)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{path}: cannot read the {what} mask ({e})") from e
    if mask.ndim != 2:
        raise EvaluationError(f"{path}: the {what} mask has shape {mask.shape}, expected (H, W)")
    return mask


# ------------------------------------------------------------------------------- evaluation
def evaluate_folder(data_root, predictions_dir, split: str | None = None, tasks: Sequence[str] | None = None) -> dict:
    """{"tasks": {task_id: {metric: value}}, "task_types": {type: {metric: mean over tasks}},
    "num_samples": {task_id: n}, "types": {task_id: task type}} for every ground-truth task
    (or only `tasks`)."""
    split_root = resolve_split_root(data_root, split)
    predictions_dir = Path(predictions_dir)
    if not predictions_dir.is_dir():
        raise FileNotFoundError(f"predictions folder {predictions_dir} does not exist")
    records, specs = read_ground_truth(split_root, tasks)

    tables: dict[str, dict] = {}
    per_task: dict[str, tuple[list, list]] = {}
    for record in records:
        spec = specs[record.task_id]
        if spec.task_type is TaskType.SEGMENTATION:
            pred_path = predictions_dir / prediction_mask_relpath(record.mask_path)
            if not pred_path.is_file():
                raise EvaluationError(f"no segmentation prediction for task {record.task_id!r} image_path "
                                      f"{record.image_path!r}: {pred_path} is missing")
            pred = {"mask": _read_mask(pred_path, "predicted")}
            truth = {"mask": _read_mask(Path(record.mask_file), "ground-truth")}
        else:
            path = predictions_dir / PREDICTION_FILES[spec.task_type]
            if spec.task_type not in tables:
                tables[spec.task_type] = read_prediction_file(path, spec.task_type)
            entry = tables[spec.task_type].get((record.task_id, record.image_path))
            if entry is None:
                raise EvaluationError(f"{path}: no prediction for task {record.task_id!r} "
                                      f"image_path {record.image_path!r}")
            pred = parse_entry(entry, spec, path)
            truth = ground_truth_from_record(record, with_mask=False, with_size=False)
        preds, truths = per_task.setdefault(record.task_id, ([], []))
        preds.append(pred)
        truths.append(truth)

    task_metrics, num_samples = {}, {}
    for task_id in sorted(per_task):
        preds, truths = per_task[task_id]
        spec = specs[task_id]
        try:
            task_metrics[task_id] = metrics.score_task(spec.task_type, spec.num_classes, preds, truths)
        except ValueError as e:
            raise EvaluationError(f"task {task_id!r}: {e}") from e
        num_samples[task_id] = len(preds)
    return {
        "tasks": task_metrics,
        "task_types": metrics.average_by_task_type(task_metrics, specs),
        "num_samples": num_samples,
        "types": {task_id: specs[task_id].task_type for task_id in task_metrics},
    }


def format_results(results: dict) -> str:
    """A plain-text table per task type, with the mean over its tasks."""
    lines = []
    for task_type in TaskType:
        rows = [t for t, kind in results["types"].items() if kind == task_type]
        if not rows:
            continue
        names = metrics.METRIC_NAMES[task_type]
        lines.append(f"[{task_type}]")
        lines.append(f"  {'task':<24} {'n':>5} " + " ".join(f"{n:>11}" for n in names))
        for task_id in rows:
            values = " ".join(f"{_num(results['tasks'][task_id][n]):>11}" for n in names)
            lines.append(f"  {task_id:<24} {results['num_samples'][task_id]:>5} {values}")
        mean = results["task_types"][task_type]
        lines.append(f"  {'mean over tasks':<24} {'':>5} " + " ".join(f"{_num(mean[n]):>11}" for n in names))
    return "\n".join(lines)


def _num(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


RESULT_KEYS = ("tasks", "task_types", "num_samples", "types")


def is_results_file(path) -> bool:
    """Whether `path` holds results written by `write_json` (a file evaluate may replace)."""
    try:
        data = io.read_json(path)
    except (OSError, ValueError):
        return False
    return all(key in data for key in RESULT_KEYS)


def check_results_path(path, data_root, predictions_dir=None, overwrite: bool = False) -> bool:
    """Whether the results may be written to `path`: InputError when it lies inside the data root
    or the predictions folder (evaluate writes over none of its inputs), is a folder, or is a file
    evaluate did not write (unless `overwrite`). True when an existing file must move aside first."""
    target = Path(path)
    resolved = target.resolve()
    for folder, what in ((data_root, "the data root"), (predictions_dir, "the predictions folder")):
        if folder is None:
            continue
        inside = Path(folder).resolve()
        if resolved == inside or inside in resolved.parents:
            raise EvaluationError(f"--json {path} lies inside {what} {folder}: evaluate writes into none of its "
                                  f"inputs. Choose a --json outside it")
    if target.is_dir():
        raise EvaluationError(f"--json {path} is a folder; give the results file to write")
    if os.path.lexists(target) and not is_results_file(target):
        if not overwrite:
            raise EvaluationError(f"--json {path} exists and is not a results file written by m2dino.evaluate; it "
                                  f"is not replaced. Choose another --json, or --overwrite to move it aside to "
                                  f"{path}.old-<timestamp> (nothing is deleted)")
        return True
    return False


def write_json(results: dict, path) -> None:
    """Results as JSON (NaN written as null), atomically."""
    io.write_json(path, results)
