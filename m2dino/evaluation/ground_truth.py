"""Ground truth as the metrics read it: per-sample dicts in original-image pixels.

    {"task", "image_path", "orig_size": (H, W)} plus one of
    {"mask": ndarray[H, W]} | {"label": int} | {"box": xyxy pixels} | {"points": ndarray[K, 2] pixels}

built from a data-reader `Record` (challenge-exact: masks at the original resolution) or from
a dataset item's target (resized mask, normalised box and points).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from m2dino.data.images import image_size, load_mask_array
from m2dino.tasks import TaskTable, TaskType

# A record's annotation as the metrics read it, per task type: (record, with_mask) -> fields.
_RECORD_TRUTH = TaskTable("ground truth", {
    TaskType.SEGMENTATION: lambda record, with_mask: {"mask": load_mask_array(record.mask_file)} if with_mask else {},
    TaskType.CLASSIFICATION: lambda record, with_mask: {"label": int(record.label)},
    TaskType.DETECTION: lambda record, with_mask: {"box": [float(v) for v in record.box]},
    TaskType.LANDMARKS: lambda record, with_mask: {"points": np.asarray(record.points, dtype=np.float64)},
})


def ground_truth_from_record(record, with_mask: bool = True, with_size: bool = True) -> dict:
    """A data-reader `Record` as a ground-truth dict in original pixels (+ "orig_size").

    Segmentation masks are read from `record.mask_file` (skipped with with_mask=False); the
    original size comes from the image header (skipped with with_size=False).
    """
    truth = {"task": record.task_id, "image_path": record.image_path}
    if with_size:
        truth["orig_size"] = image_size(record.image_file)
    truth.update(_RECORD_TRUTH[record.task_type](record, with_mask))
    return truth


def ground_truth_from_target(task: str, target: Mapping, orig_size) -> dict:
    """A dataset item's target (resized mask, normalised box / points) as a ground-truth dict.

    Boxes and points are scaled back to original pixels exactly; the mask is the resized one
    (S x S), so predictions are scored against it after a nearest resize to S x S: Dice and HD
    then approximate the original-resolution values (use `ground_truth_from_record` for the
    challenge-exact numbers).
    """
    height, width = (int(v) for v in orig_size)
    truth = {"task": task, "orig_size": (height, width)}
    if "mask" in target:
        truth["mask"] = _to_numpy(target["mask"]).astype(np.int64)
    elif "label" in target:
        truth["label"] = int(_to_numpy(target["label"]))
    elif "box" in target:
        truth["box"] = (_to_numpy(target["box"]).astype(np.float64) * [width, height, width, height]).tolist()
    elif "points" in target:
        truth["points"] = _to_numpy(target["points"]).astype(np.float64).reshape(-1, 2) * [width, height]
    else:
        raise ValueError(
            f"ground_truth_from_target: task {task!r} target has none of mask/label/box/points: {sorted(target)}")
    return truth


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
