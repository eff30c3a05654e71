"""The FM_UIA challenge's submission format, written by predict and read by evaluate.

A prediction folder holds
* classification_predictions.json: [{image_path, task_id, predicted_class, predicted_probs}]
* detection_predictions.json: [{image_path, task_id, bbox_normalized, bbox_pixels}]
* regression_predictions.json: [{image_path, task_id, predicted_points_normalized,
  predicted_points_pixels}] with points flattened as [x1, y1, x2, y2, ...]
* one single-channel index PNG per segmentation row at <folder>/<mask_path without its
  leading ../>, at the original image size.

`image_path` is the CSV string verbatim (with its ../). The challenge's evaluator reads the
pixel fields. Every file is written atomically (m2dino.io).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from m2dino import io
from m2dino.errors import InputError
from m2dino.tasks import TaskSpec, TaskTable, TaskType


class PredictionError(InputError):
    """The checkpoint and the data do not fit together, or the model produced unusable output."""


class EvaluationError(InputError):
    """Bad ground truth or predictions; the message names the file, row or image_path."""


# ----------------------------------------------------------------------------- writing
def prediction_mask_relpath(mask_path: str) -> PurePosixPath:
    """Where a segmentation prediction goes inside the output folder: mask_path without its leading ../."""
    parts = list(PurePosixPath(str(mask_path).replace("\\", "/")).parts)
    while parts and parts[0] in ("..", "."):
        parts.pop(0)
    if not parts or ".." in parts or parts[0] == "/":
        raise EvaluationError(f"mask_path {mask_path!r} cannot be placed inside the predictions folder")
    return PurePosixPath(*parts)


def write_index_png(path: Path, mask: np.ndarray) -> None:
    """A single-channel (mode L) PNG of class indices."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PredictionError(f"segmentation prediction for {path} has shape {mask.shape}, expected (H, W)")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise PredictionError(f"segmentation prediction for {path} has class indices outside 0..255")
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    io.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def submission_entry(task_type: str, task_id: str, image_path: str, prediction: dict) -> dict:
    """The challenge's JSON entry for one classification / detection / regression prediction."""
    try:
        write = SUBMISSION[task_type].write
    except KeyError as e:
        raise PredictionError(f"no JSON entry for task type {task_type!r} ({e})") from None
    entry = {"image_path": image_path, "task_id": task_id, **write(task_id, image_path, prediction)}
    for key, value in entry.items():
        if isinstance(value, list) and not all(np.isfinite(value)):
            raise PredictionError(f"{task_id} {image_path}: non-finite {key} {value}")
    return entry


def _classification_entry(task_id: str, image_path: str, prediction: dict) -> dict:
    probs = np.asarray(prediction["probs"], dtype=np.float64).reshape(-1)
    if not np.isfinite(probs).all() or probs.sum() <= 0:
        raise PredictionError(f"{task_id} {image_path}: class probabilities {probs.tolist()} are not usable")
    probs = probs / probs.sum()  # exactly summing to 1 in float64
    return {"predicted_class": int(prediction["predicted_class"]), "predicted_probs": [float(p) for p in probs]}


def _detection_entry(task_id: str, image_path: str, prediction: dict) -> dict:
    pixels = np.asarray(prediction["bbox_pixels"], dtype=np.float64).reshape(4)
    normalised = np.asarray(prediction["bbox_normalized"], dtype=np.float64).reshape(4)
    return {"bbox_normalized": [float(v) for v in normalised], "bbox_pixels": [float(v) for v in pixels]}


def _landmark_entry(task_id: str, image_path: str, prediction: dict) -> dict:
    pixels = np.asarray(prediction["points_pixels"], dtype=np.float64).reshape(-1)
    normalised = np.asarray(prediction["points_normalized"], dtype=np.float64).reshape(-1)
    return {"predicted_points_normalized": [float(v) for v in normalised],
            "predicted_points_pixels": [float(v) for v in pixels]}


def write_prediction_files(out_dir, entries: dict[str, list]) -> None:
    """The three JSON files of a folder from {task_type: [entry, ...]} (empty lists included)."""
    for task_type, filename in PREDICTION_FILES.items():
        io.write_json(Path(out_dir) / filename, entries.get(task_type, []))


# ----------------------------------------------------------------------------- reading
def read_prediction_file(path: Path, task_type: str) -> dict[tuple[str, str], dict]:
    """{(task_id, image_path): entry} of one JSON prediction file, validated."""
    try:
        entries = io.read_json(path, expect=list)
    except FileNotFoundError:
        raise EvaluationError(f"prediction file {path} is missing") from None
    except ValueError as e:  # not JSON, or not a list of prediction objects
        raise EvaluationError(str(e)) from e
    table = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise EvaluationError(f"{path}: entry {i} is not an object")
        missing = [k for k in REQUIRED_FIELDS[task_type] if k not in entry]
        if missing:
            raise EvaluationError(f"{path}: entry {i} ({str(entry.get('image_path', '?'))[:200]}) lacks {missing}")
        if not (isinstance(entry["task_id"], str) and isinstance(entry["image_path"], str)):
            raise EvaluationError(f"{path}: entry {i}: task_id and image_path must be strings")
        key = (entry["task_id"], entry["image_path"])
        if key in table:
            raise EvaluationError(f"{path}: entry {i} repeats task {key[0]!r} image {key[1]!r}")
        table[key] = entry
    return table


def parse_entry(entry: dict, spec: TaskSpec, path: Path) -> dict:
    """One classification / detection / regression entry as the metrics read a prediction
    (m2dino.evaluation.metrics.score_task); malformed values raise EvaluationError."""
    try:
        return SUBMISSION[spec.task_type].read(entry, spec)
    except (TypeError, ValueError, OverflowError) as e:  # numbers too large for a float overflow
        raise EvaluationError(f"{path}: prediction for {entry.get('image_path')!r}: {str(e)[:500]}") from e


def _numbers(entry: dict, field: str) -> np.ndarray:
    """An entry's list of numbers as float64; ValueError naming the field when it is not one."""
    try:
        return np.asarray(entry[field], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:  # nested, text, or too large for a float
        raise ValueError(f"{field} must be a list of finite numbers, got {str(entry[field])[:200]} ({e})") from None


def _parse_classification(entry: dict, spec: TaskSpec) -> dict:
    probs = _numbers(entry, "predicted_probs")
    if probs.size != spec.num_classes or not np.isfinite(probs).all():
        raise ValueError(f"predicted_probs must be {spec.num_classes} finite numbers, got {entry['predicted_probs']!r}")
    predicted = entry["predicted_class"]
    if isinstance(predicted, bool) or not isinstance(predicted, (int, np.integer)):
        raise ValueError(f"predicted_class must be an integer, got {predicted!r}")
    if not 0 <= predicted < spec.num_classes:
        raise ValueError(f"predicted_class must be a class of the task, in [0, {spec.num_classes}), got {predicted}")
    return {"probs": probs, "predicted_class": int(predicted)}


def _parse_detection(entry: dict, spec: TaskSpec) -> dict:
    box = _numbers(entry, "bbox_pixels")
    if box.size != 4 or not np.isfinite(box).all():
        raise ValueError(f"bbox_pixels must be 4 finite numbers, got {entry['bbox_pixels']!r}")
    return {"bbox_pixels": box.tolist()}


def _parse_landmarks(entry: dict, spec: TaskSpec) -> dict:
    points = _numbers(entry, "predicted_points_pixels")
    if points.size != 2 * spec.num_points or not np.isfinite(points).all():
        raise ValueError(f"predicted_points_pixels must be {2 * spec.num_points} finite numbers "
                         f"(x1, y1, x2, y2, ...), got {entry['predicted_points_pixels']!r}")
    return {"points_pixels": points.reshape(-1, 2)}


class JsonFormat(NamedTuple):
    """How one task type's predictions travel in the challenge's JSON files."""

    filename: str
    required_fields: tuple[str, ...]  # what each entry must carry (the challenge reads the pixel fields)
    write: Callable[[str, str, dict], dict]  # (task_id, image_path, postprocessed prediction) -> entry fields
    read: Callable[[dict, TaskSpec], dict]  # (entry, spec) -> the prediction as the metrics read it


# The JSON-file task types (segmentation predictions are PNG files, see prediction_mask_relpath).
SUBMISSION = TaskTable("submission JSON files", {
    TaskType.CLASSIFICATION: JsonFormat("classification_predictions.json",
                                        ("image_path", "task_id", "predicted_class", "predicted_probs"),
                                        _classification_entry, _parse_classification),
    TaskType.DETECTION: JsonFormat("detection_predictions.json", ("image_path", "task_id", "bbox_pixels"),
                                   _detection_entry, _parse_detection),
    TaskType.LANDMARKS: JsonFormat("regression_predictions.json",
                                   ("image_path", "task_id", "predicted_points_pixels"),
                                   _landmark_entry, _parse_landmarks),
})
PREDICTION_FILES = TaskTable("prediction files", {kind: f.filename for kind, f in SUBMISSION.items()})
REQUIRED_FIELDS = TaskTable("prediction fields", {kind: f.required_fields for kind, f in SUBMISSION.items()})
