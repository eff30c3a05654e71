"""Trivial baselines: what a model must beat to have learnt anything from the image.

Majority class, the empty mask, the training-mean box and the training-mean points, scored on
the validation rows exactly as a model is (m2dino.evaluation.metrics).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from m2dino.evaluation.ground_truth import ground_truth_from_record
from m2dino.evaluation.metrics import evaluate_predictions, task_table
from m2dino.tasks import TaskTable, TaskType


def baseline_predictions(task_type: str, num_classes: int, train_truth: Sequence[Mapping], sample: Mapping) -> dict:
    """The trivial prediction for one ground-truth sample, learnt from the training ground truth.

    Majority class (its one-hot probabilities, so AUC is 0.5), the empty mask, the training-mean
    box and the training-mean points (both averaged in normalised coordinates, so images of
    different sizes contribute alike, then scaled to this image's size).
    Ground-truth dicts need "orig_size" (H, W) for detection and regression.
    """
    return BASELINES[task_type].predict(num_classes, train_truth, sample)


def _empty_mask(num_classes: int, train_truth: Sequence[Mapping], sample: Mapping) -> dict:
    return {"mask": np.zeros(np.asarray(sample["mask"]).shape, dtype=np.uint8)}


def _majority_class(num_classes: int, train_truth: Sequence[Mapping], sample: Mapping) -> dict:
    counts = Counter(int(g["label"]) for g in train_truth)
    majority = min(counts, key=lambda c: (-counts[c], c))  # ties to the lower class index
    probs = np.zeros(num_classes)
    probs[majority] = 1.0
    return {"probs": probs, "predicted_class": majority}


def _mean_box(num_classes: int, train_truth: Sequence[Mapping], sample: Mapping) -> dict:
    height, width = sample["orig_size"]
    mean_box = training_mean(train_truth, "box")
    box = (mean_box * [width, height, width, height]).tolist()
    return {"bbox_pixels": box, "bbox_normalized": mean_box.tolist(), "score": 1.0}


def _mean_points(num_classes: int, train_truth: Sequence[Mapping], sample: Mapping) -> dict:
    height, width = sample["orig_size"]
    mean_points = training_mean(train_truth, "points")
    return {"points_pixels": mean_points * [width, height], "points_normalized": mean_points}


class Baseline(NamedTuple):
    """One task type's trivial baseline."""

    predict: Callable[[int, Sequence[Mapping], Mapping], dict]  # (num_classes, train truth, sample) -> prediction
    learnt: bool  # needs training samples (skipped for tasks without any)
    normalised: bool  # learns in normalised coordinates: training images' sizes are read


BASELINES = TaskTable("baselines", {
    TaskType.SEGMENTATION: Baseline(_empty_mask, learnt=False, normalised=False),
    TaskType.CLASSIFICATION: Baseline(_majority_class, learnt=True, normalised=False),
    TaskType.DETECTION: Baseline(_mean_box, learnt=True, normalised=True),
    TaskType.LANDMARKS: Baseline(_mean_points, learnt=True, normalised=True),
})


def training_mean(train_truth: Sequence[Mapping], key: str) -> np.ndarray:
    """Mean "box" or "points" of ground-truth dicts in normalised coordinates (the trivial
    baseline's prediction; also where landmark heads start)."""
    return np.mean([_normalise(g[key], g["orig_size"]) for g in train_truth], axis=0)


def _normalise(pixels, orig_size) -> np.ndarray:
    height, width = orig_size
    values = np.asarray(pixels, dtype=np.float64)
    if values.ndim == 1:  # xyxy box
        return values / [width, height, width, height]
    return values / [width, height]


def trivial_baselines(train_truth: Sequence, val_truth: Sequence, tasks=None) -> dict[str, dict[str, float]]:
    """{task_id: {metric: value}} of the trivial baselines on the validation ground truth.

    Both arguments are data-reader `Record`s or ground-truth dicts as for
    `evaluate_predictions` ("task", the target in pixels, "orig_size"). Tasks without training
    samples are skipped for the learnt baselines (majority class, mean box, mean points); the
    empty-mask baseline needs none (and no training masks are read).
    """
    table = task_table(tasks)
    # Training rows only feed the majority class, the mean box and the mean points: no masks are
    # read, and image headers only where boxes and points are normalised.
    train_truth = [
        ground_truth_from_record(g, with_mask=False, with_size=BASELINES[g.task_type].normalised)
        if hasattr(g, "task_id") else g
        for g in train_truth
    ]
    val_truth = [ground_truth_from_record(g) if hasattr(g, "task_id") else g for g in val_truth]
    train_by_task: dict[str, list] = defaultdict(list)
    for g in train_truth:
        train_by_task[g["task"]].append(g)
    preds, gts = [], []
    for g in val_truth:
        spec = table[g["task"]]
        if BASELINES[spec.task_type].learnt and not train_by_task[g["task"]]:
            continue
        preds.append(baseline_predictions(spec.task_type, spec.num_classes, train_by_task[g["task"]], g))
        gts.append(g)
    return evaluate_predictions(preds, gts, table)
