"""Score a prediction folder exactly as the FM_UIA challenge's evaluator does.

`python -m m2dino.evaluate --data-root ROOT --predictions DIR [--json FILE]` reads the ground
truth from ROOT's `csv_files/*.csv` (or from ROOT/val when ROOT is a release with train/ and
val/; `--split` picks another) and the submission in DIR: `classification_predictions.json`,
`detection_predictions.json`, `regression_predictions.json` and one index PNG per
segmentation row at DIR/<mask_path without its leading ../>. With `--checkpoint CKPT` it
first predicts into DIR (a temporary folder when --predictions is left out) and scores the
model's tasks.

The ground truth comes from the CSVs through `m2dino.data.reader.read_csvs` (its CSV-level
checks, root containment included, apply; masks are decoded while scoring). Unlike the
challenge's script, which skips a missing prediction silently and scores the rest, a missing
prediction is an error naming the image_path, and so is a malformed file.
Metric conventions: see `m2dino.metrics`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from m2dino import metrics
from m2dino.data.reader import Record, load_mask_array, read_csvs
from m2dino.tasks import TaskSpec

PREDICTION_FILES = {
    "classification": "classification_predictions.json",
    "detection": "detection_predictions.json",
    "regression": "regression_predictions.json",
}
# Fields each prediction entry must carry (the challenge reads the pixel fields).
REQUIRED_FIELDS = {
    "classification": ("image_path", "task_id", "predicted_class", "predicted_probs"),
    "detection": ("image_path", "task_id", "bbox_pixels"),
    "regression": ("image_path", "task_id", "predicted_points_pixels"),
}


class EvaluationError(ValueError):
    """Bad ground truth or predictions; the message names the file, row or image_path."""


# ------------------------------------------------------------------------------ data roots
def resolve_split_root(data_root, split: str | None = None) -> Path:
    """The folder holding csv_files/: ROOT itself, ROOT/<split>, or ROOT/val for a release."""
    root = Path(data_root)
    if split:
        candidate = root / split
        if not (candidate / "csv_files").is_dir():
            raise FileNotFoundError(f"{candidate} has no csv_files/ folder (--split {split})")
        return candidate
    if (root / "csv_files").is_dir():
        return root
    if (root / "val" / "csv_files").is_dir():
        return root / "val"
    raise FileNotFoundError(f"{root} has no csv_files/ folder (nor val/csv_files/)")


def prediction_mask_relpath(mask_path: str) -> PurePosixPath:
    """Where a segmentation prediction goes inside the output folder: mask_path without its leading ../."""
    parts = list(PurePosixPath(str(mask_path).replace("\\", "/")).parts)
    while parts and parts[0] in ("..", "."):
        parts.pop(0)
    if not parts or ".." in parts or parts[0] == "/":
        raise EvaluationError(f"mask_path {mask_path!r} cannot be placed inside the predictions folder")
    return PurePosixPath(*parts)


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


# ----------------------------------------------------------------------------- predictions
def read_prediction_file(path: Path, task_type: str) -> dict[tuple[str, str], dict]:
    """{(task_id, image_path): entry} of one JSON prediction file, validated."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise EvaluationError(f"prediction file {path} is missing") from None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
        raise EvaluationError(f"{path}: expected a JSON list of prediction objects, got {type(entries).__name__}")
    table = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise EvaluationError(f"{path}: entry {i} is not an object")
        missing = [k for k in REQUIRED_FIELDS[task_type] if k not in entry]
        if missing:
            raise EvaluationError(f"{path}: entry {i} ({entry.get('image_path', '?')}) lacks {missing}")
        key = (str(entry["task_id"]), str(entry["image_path"]))
        if key in table:
            raise EvaluationError(f"{path}: entry {i} repeats task {key[0]!r} image {key[1]!r}")
        table[key] = entry
    return table


def _prediction_for(record: Record, spec: TaskSpec, table: dict, path: Path) -> dict:
    """The prediction of one classification / detection / regression row, as metrics expects it."""
    entry = table.get((record.task_id, record.image_path))
    if entry is None:
        raise EvaluationError(f"{path}: no prediction for task {record.task_id!r} image_path {record.image_path!r}")
    try:
        if spec.task_type == "classification":
            probs = np.asarray(entry["predicted_probs"], dtype=np.float64).reshape(-1)
            if probs.size != spec.num_classes or not np.isfinite(probs).all():
                raise ValueError(f"predicted_probs must be {spec.num_classes} finite numbers, got {entry['predicted_probs']!r}")
            predicted = entry["predicted_class"]
            if isinstance(predicted, bool) or not isinstance(predicted, (int, np.integer)):
                raise ValueError(f"predicted_class must be an integer, got {predicted!r}")
            return {"probs": probs, "predicted_class": int(predicted)}
        if spec.task_type == "detection":
            box = np.asarray(entry["bbox_pixels"], dtype=np.float64).reshape(-1)
            if box.size != 4 or not np.isfinite(box).all():
                raise ValueError(f"bbox_pixels must be 4 finite numbers, got {entry['bbox_pixels']!r}")
            return {"bbox_pixels": box.tolist()}
        points = np.asarray(entry["predicted_points_pixels"], dtype=np.float64).reshape(-1)
        if points.size != 2 * spec.num_points or not np.isfinite(points).all():
            raise ValueError(f"predicted_points_pixels must be {2 * spec.num_points} finite numbers "
                             f"(x1, y1, x2, y2, ...), got {entry['predicted_points_pixels']!r}")
        return {"points_pixels": points.reshape(-1, 2)}
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"{path}: prediction for {record.image_path!r}: {e}") from e


def _truth_of(record: Record) -> dict:
    if record.task_type == "classification":
        return {"label": record.label}
    if record.task_type == "detection":
        return {"box": list(record.box)}
    return {"points": np.asarray(record.points, dtype=np.float64)}


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
        if spec.task_type == "segmentation":
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
            pred = _prediction_for(record, spec, tables[spec.task_type], path)
            truth = _truth_of(record)
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
    for task_type in metrics.TASK_TYPES:
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


def _json_ready(value):
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(results: dict, path) -> None:
    """Results as JSON (NaN written as null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_ready(results), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="FM_UIA root (csv_files/ inside, or train/ and val/)")
    parser.add_argument("--predictions", help="prediction folder (the submission format); with --checkpoint, where to write it")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--split", help="sub-folder of --data-root to score (default: the root itself, else val/)")
    parser.add_argument("--tasks", help="comma-separated task ids to score (default: every task in the CSVs, "
                                        "or the checkpoint's tasks with --checkpoint)")
    parser.add_argument("--checkpoint", help="predict with this checkpoint first, then score its tasks")
    parser.add_argument("--batch-size", type=int, default=16, help="prediction batch size (with --checkpoint)")
    parser.add_argument("--device", default=None, help="prediction device (with --checkpoint; default cuda if available)")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    errors: tuple = (FileNotFoundError, EvaluationError)
    if args.checkpoint:
        from m2dino.backbone import WeightsError
        from m2dino.predict import PredictionError, predict_folder

        errors += (PredictionError, WeightsError)
    try:
        with tempfile.TemporaryDirectory(prefix="m2dino-predictions-") as scratch:
            predictions = args.predictions
            if args.checkpoint:
                predictions = predictions or scratch
                written = predict_folder(args.checkpoint, args.data_root, predictions, split=args.split,
                                         batch_size=args.batch_size, device=args.device, tasks=tasks)
                tasks = tasks or written["tasks"]
            elif not predictions:
                parser.error("--predictions is required without --checkpoint")
            results = evaluate_folder(args.data_root, predictions, split=args.split, tasks=tasks)
    except errors as e:
        print(f"m2dino.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_results(results))
    if args.json:
        write_json(results, args.json)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
