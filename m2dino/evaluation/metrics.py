"""FM_UIA challenge metrics, computed the way the challenge's evaluator computes them.

Conventions (see also the README's evaluation section):

* Segmentation, per image and per class c on the binary masks ``pred == c`` / ``gt == c``:
  Dice = 2|P∩G| / (|P| + |G|), 1.0 when both are empty. Hausdorff distance (HD) is the full
  maximum (not HD95) symmetric distance between the two sets of *all foreground pixels*
  (the challenge uses SimpleITK's HausdorffDistanceImageFilter, which measures from every
  non-zero pixel of one mask to the nearest non-zero pixel of the other, not between
  extracted surfaces); 0 when both are empty, the image diagonal when exactly one is empty.
  A prediction of another size is resized to the ground truth with OpenCV-style nearest
  neighbour. Task score: per-class mean over images, then mean over the non-background
  classes.
* Classification: accuracy; F1 macro and weighted and the Matthews correlation from
  scikit-learn over the labels present in the ground truth or the predictions (as the
  challenge calls them, zero_division=0). AUC: two classes, ROC-AUC of the class-1
  probability; more classes, macro one-vs-rest ROC-AUC. Rule for classes absent from the
  ground truth (where the challenge's call raises and it records 0.0): the one-vs-rest
  average runs over the classes present in the ground truth only, which equals the
  challenge's value whenever every class is present; with fewer than two classes present
  AUC is undefined and reported as NaN.
* Detection: IoU of the predicted and ground-truth boxes (xyxy pixels), mean over images;
  inverted boxes count as empty; a zero union gives 0.
* Regression: mean radial error, the mean Euclidean distance per point in original-image
  pixels, averaged over images.

Every task score is computed in two steps, `metrics_from_values(per_image_values(...))`
(that is `score_task`): first the per-image values the metric is built from (JSON-ready lists,
one entry per image in the ground truth's order: per image and non-background class Dice and
HD; label, predicted class and probabilities; box IoU; per-point errors), then the task's
metrics from those values alone. The bootstrap (m2dino.evaluation.bootstrap) recomputes the
metrics from the same values, so point values and intervals cannot disagree.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

from m2dino.tasks import TASKS, TaskSpec, TaskTable, TaskType, get_task

METRIC_NAMES: TaskTable[tuple[str, ...]] = TaskTable("metric names", {
    TaskType.SEGMENTATION: ("dice", "hd"),
    TaskType.CLASSIFICATION: ("accuracy", "auc", "f1_macro", "f1_weighted", "mcc"),
    TaskType.DETECTION: ("iou",),
    TaskType.LANDMARKS: ("mre",),
})
LOWER_IS_BETTER = frozenset({"hd", "mre"})


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def as_float(value) -> float:
    """A metric value read back from JSON (where NaN is null) as a float."""
    return float("nan") if value is None else float(value)


def nanmean(values: Iterable[float]) -> float:
    """Mean of the values that are not NaN (NaN when there are none)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ----------------------------------------------------------------------------- segmentation
def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize with OpenCV's INTER_NEAREST sampling (src = floor(dst * src/dst)).

    PIL's NEAREST samples pixel centres and picks different pixels; the challenge uses cv2.
    """
    mask = np.asarray(mask)
    height, width = int(shape[0]), int(shape[1])
    if mask.shape[:2] == (height, width):
        return mask

    def source_index(dst: int, src: int) -> np.ndarray:
        inverse_scale = 1.0 / (dst / src)  # cv2 computes the inverse of the scale factor
        return np.minimum(np.floor(np.arange(dst) * inverse_scale).astype(np.int64), src - 1)

    return mask[source_index(height, mask.shape[0])][:, source_index(width, mask.shape[1])]


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def hausdorff_distance(pred: np.ndarray, gt: np.ndarray) -> float:
    """Maximum symmetric Hausdorff distance in pixels between the foreground pixel sets.

    0 when both masks are empty, the image diagonal when exactly one is empty.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"hausdorff_distance: masks differ in shape, {pred.shape} vs {gt.shape}")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return float(math.hypot(*gt.shape))
    # Exact Euclidean distance of every pixel to the nearest foreground pixel of the other mask.
    to_gt = ndimage.distance_transform_edt(~gt)
    to_pred = ndimage.distance_transform_edt(~pred)
    return float(max(to_gt[pred].max(), to_pred[gt].max()))


def segmentation_image_scores(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[list[float], list[float]]:
    """Per-class (background included) Dice and HD of one index-mask prediction."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"ground-truth mask must be 2-D (H, W), got shape {gt.shape}")
    pred = np.asarray(pred)
    if pred.ndim != 2:
        raise ValueError(f"predicted mask must be 2-D (H, W), got shape {pred.shape}")
    pred = resize_nearest(pred, gt.shape)
    dice, hd = [], []
    for c in range(num_classes):
        pred_c, gt_c = pred == c, gt == c
        dice.append(dice_score(pred_c, gt_c))
        hd.append(hausdorff_distance(pred_c, gt_c))
    return dice, hd


def segmentation_values(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int) -> dict[str, list]:
    """Per-image values: {"dice": [n][C-1], "hd": [n][C-1]} of the non-background classes."""
    _check_pairs(preds, gts, TaskType.SEGMENTATION)
    if num_classes < 2:
        raise ValueError(f"segmentation needs num_classes >= 2 (background included), got {num_classes}")
    values = {"dice": [], "hd": []}
    for pred, gt in zip(preds, gts):
        dice, hd = segmentation_image_scores(pred, gt, num_classes)
        values["dice"].append(dice[1:])
        values["hd"].append(hd[1:])
    return values


def segmentation_from_values(values: Mapping, num_classes: int) -> dict[str, float]:
    """Task score: per-class mean over images, then mean over non-background classes."""
    return {name: float(per_class_table(values, name, num_classes).mean(axis=0).mean()) for name in ("dice", "hd")}


def per_class_table(values: Mapping, name: str, num_classes: int) -> np.ndarray:
    """values[name] as a float array [n, C-1] (n >= 1), checked against num_classes."""
    table = np.asarray(values[name], dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] != num_classes - 1:
        raise ValueError(f"segmentation: per-image {name} of shape {table.shape}, expected (n >= 1, {num_classes - 1})")
    return table


def segmentation_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], num_classes: int) -> dict[str, float]:
    """Task score: per-class mean over images, then mean over non-background classes."""
    return segmentation_from_values(segmentation_values(preds, gts, num_classes), num_classes)


# --------------------------------------------------------------------------- classification
def classification_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC: class-1 probability for 2 classes, macro one-vs-rest over present classes otherwise."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    present = np.unique(labels)
    if present.size < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))


def classification_metrics(labels: Sequence[int], predicted: Sequence[int], probs,
                           num_classes: int) -> dict[str, float]:
    """accuracy, auc, f1_macro, f1_weighted, mcc of one task."""
    labels, predicted, probs = classification_arrays(labels, predicted, probs, num_classes)
    return {
        "accuracy": float(np.mean(labels == predicted)),
        "auc": classification_auc(labels, probs),
        "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(labels, predicted, average="weighted", zero_division=0)),
        "mcc": matthews(labels, predicted),
    }


def matthews(labels: np.ndarray, predicted: np.ndarray) -> float:
    """MCC; 0 when labels and predictions hold a single class between them (sklearn's value
    there, without its warning about a one-class confusion matrix: small sets do this)."""
    if np.union1d(labels, predicted).size < 2:
        return 0.0
    return float(matthews_corrcoef(labels, predicted))


def classification_arrays(labels, predicted, probs, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """labels [n] and predicted [n] int64, probs [n, C] float64, checked (n >= 1, classes in range)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("classification_metrics: no samples")
    if predicted.shape != labels.shape:
        raise ValueError(f"classification_metrics: {predicted.size} predictions for {labels.size} labels")
    if probs.shape != (labels.size, num_classes):
        raise ValueError(
            f"classification_metrics: probabilities of shape {probs.shape}, expected {(labels.size, num_classes)}")
    for name, values in (("label", labels), ("predicted class", predicted)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise ValueError(f"classification_metrics: {name} {values[bad][0]} outside [0, {num_classes})")
    return labels, predicted, probs


# -------------------------------------------------------------------------------- detection
def box_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """IoU of two xyxy boxes; a zero union gives 0."""
    px0, py0, px1, py1 = (float(v) for v in pred)
    gx0, gy0, gx1, gy1 = (float(v) for v in gt)
    inter = max(0.0, min(px1, gx1) - max(px0, gx0)) * max(0.0, min(py1, gy1) - max(py0, gy0))
    area_pred = max(0.0, px1 - px0) * max(0.0, py1 - py0)
    area_gt = max(0.0, gx1 - gx0) * max(0.0, gy1 - gy0)
    union = area_pred + area_gt - inter
    return inter / union if union > 0 else 0.0


def detection_values(pred_boxes, gt_boxes) -> dict[str, list[float]]:
    """Per-image values: {"iou": [n]}."""
    _check_pairs(pred_boxes, gt_boxes, TaskType.DETECTION)
    return {"iou": [box_iou(p, g) for p, g in zip(pred_boxes, gt_boxes)]}


def detection_metrics(pred_boxes, gt_boxes) -> dict[str, float]:
    return metrics_from_values(TaskType.DETECTION, 1, detection_values(pred_boxes, gt_boxes))


# ------------------------------------------------------------------------------- regression
def point_errors(pred_points, gt_points) -> np.ndarray:
    """Euclidean distance of each of the K points of one image (pixels), [K]."""
    pred = np.asarray(pred_points, dtype=np.float64).reshape(-1, 2)
    gt = np.asarray(gt_points, dtype=np.float64).reshape(-1, 2)
    if pred.shape != gt.shape:
        raise ValueError(f"radial_error: {pred.shape[0]} predicted points for {gt.shape[0]} ground-truth points")
    return np.linalg.norm(pred - gt, axis=1)


def radial_error(pred_points, gt_points) -> float:
    """Mean Euclidean distance over the K points of one image (pixels)."""
    return float(point_errors(pred_points, gt_points).mean())


def regression_values(pred_points, gt_points) -> dict[str, list[list[float]]]:
    """Per-image values: {"errors": [n][K]}, each point's distance in pixels."""
    _check_pairs(pred_points, gt_points, TaskType.LANDMARKS)
    return {"errors": [point_errors(p, g).tolist() for p, g in zip(pred_points, gt_points)]}


def image_radial_errors(errors) -> np.ndarray:
    """Per-image radial error [n] (mean over the image's points) from per-point errors [n][K]."""
    if len(errors) == 0:
        raise ValueError("regression: no samples to score")
    return np.array([np.asarray(row, dtype=np.float64).mean() for row in errors])


def regression_metrics(pred_points, gt_points) -> dict[str, float]:
    return metrics_from_values(TaskType.LANDMARKS, 0, regression_values(pred_points, gt_points))


def _check_pairs(preds, gts, kind: str) -> None:
    if len(preds) != len(gts):
        raise ValueError(f"{kind}: {len(preds)} predictions for {len(gts)} ground-truth samples")
    if len(gts) == 0:
        raise ValueError(f"{kind}: no samples to score")


# ------------------------------------------------------------------ per-sample task scoring
def task_table(tasks=None) -> dict[str, TaskSpec]:
    """task_id -> TaskSpec from a list (of specs or registry ids), a mapping, or the registry."""
    if tasks is None:
        return dict(TASKS)
    if isinstance(tasks, Mapping):
        return dict(tasks)
    table = {}
    for spec in tasks:
        spec = get_task(spec) if isinstance(spec, str) else spec
        table[spec.task_id] = spec
    return table


def score_task(task_type: str, num_classes: int, predictions: Sequence[Mapping],
               ground_truth: Sequence[Mapping]) -> dict[str, float]:
    """Score one task from per-sample prediction and ground-truth dicts (pixel units).

    predictions: `model.postprocess` dicts ({"mask"} | {"probs", "predicted_class"} |
    {"bbox_pixels", ...} | {"points_pixels", ...}); ground truth: {"mask": ndarray[H, W]} |
    {"label": int} | {"box": xyxy pixels} | {"points": [K, 2] pixels}.
    """
    return metrics_from_values(task_type, num_classes,
                               per_image_values(task_type, num_classes, predictions, ground_truth))


def per_image_values(task_type: str, num_classes: int, predictions: Sequence[Mapping],
                     ground_truth: Sequence[Mapping]) -> dict[str, list]:
    """The per-image values every metric of the task is computed from, JSON-ready, in the ground
    truth's order (same inputs as `score_task`):

    segmentation {"dice": [n][C-1], "hd": [n][C-1]} (non-background classes) | classification
    {"label": [n], "predicted": [n], "probs": [n][C]} | detection {"iou": [n]} | regression
    {"errors": [n][K]} (per point, pixels); plus "image_path": [n] when every ground-truth dict
    carries one (the key that pairs two models' values, see bootstrap.align).
    """
    values = _PER_IMAGE_VALUES[task_type](predictions, ground_truth, num_classes)
    if ground_truth and all("image_path" in g for g in ground_truth):
        values["image_path"] = [str(g["image_path"]) for g in ground_truth]
    return values


def _classification_values(predictions, ground_truth, num_classes) -> dict[str, list]:
    _check_pairs(predictions, ground_truth, TaskType.CLASSIFICATION)
    return {
        "label": [int(g["label"]) for g in ground_truth],
        "predicted": [int(p["predicted_class"]) for p in predictions],
        "probs": [np.asarray(p["probs"], dtype=np.float64).reshape(-1).tolist() for p in predictions],
    }


# Per task type: (predictions, ground truth, num_classes) -> per-image values.
_PER_IMAGE_VALUES = TaskTable("per-image values", {
    TaskType.SEGMENTATION: lambda predictions, ground_truth, num_classes: segmentation_values(
        [p["mask"] for p in predictions], [g["mask"] for g in ground_truth], num_classes),
    TaskType.CLASSIFICATION: _classification_values,
    TaskType.DETECTION: lambda predictions, ground_truth, num_classes: detection_values(
        [p["bbox_pixels"] for p in predictions], [g["box"] for g in ground_truth]),
    TaskType.LANDMARKS: lambda predictions, ground_truth, num_classes: regression_values(
        [p["points_pixels"] for p in predictions], [g["points"] for g in ground_truth]),
})


def metrics_from_values(task_type: str, num_classes: int, values: Mapping) -> dict[str, float]:
    """The task's metrics (METRIC_NAMES[task_type]) from its `per_image_values`."""
    return _METRICS_FROM_VALUES[task_type](values, num_classes)


def _detection_from_values(values: Mapping, num_classes: int) -> dict[str, float]:
    iou = np.asarray(values["iou"], dtype=np.float64)
    if iou.size == 0:
        raise ValueError("detection: no samples to score")
    return {"iou": float(np.mean(iou))}


# Per task type: (per-image values, num_classes) -> {metric: value}, the names of METRIC_NAMES.
_METRICS_FROM_VALUES = TaskTable("metrics", {
    TaskType.SEGMENTATION: segmentation_from_values,
    TaskType.CLASSIFICATION: lambda values, num_classes: classification_metrics(
        values["label"], values["predicted"], probs_table(values["probs"]), num_classes),
    TaskType.DETECTION: _detection_from_values,
    TaskType.LANDMARKS: lambda values, num_classes: {"mre": float(np.mean(image_radial_errors(values["errors"])))},
})


def probs_table(probs) -> np.ndarray:
    """Per-image probability lists as a float array [n, C] ([0, 0] for none)."""
    rows = [np.asarray(p, dtype=np.float64).reshape(-1) for p in probs]
    return np.stack(rows) if rows else np.zeros((0, 0))


def values_by_task(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
                   tasks=None) -> dict[str, dict[str, list]]:
    """{task_id: per_image_values} from parallel lists of per-sample predictions and ground truth.

    Every ground-truth dict names its task under "task" (predictions may too; they must
    agree). `tasks`: TaskSpecs (list or {task_id: spec}); default the registry.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(
            f"evaluate_predictions: {len(predictions)} predictions for {len(ground_truth)} ground-truth samples")
    table = task_table(tasks)
    by_task: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for i, (pred, gt) in enumerate(zip(predictions, ground_truth)):
        task_id = gt["task"]
        if "task" in pred and pred["task"] != task_id:
            raise ValueError(f"evaluate_predictions: sample {i} predicted for task {pred['task']!r} "
                             f"but its ground truth is {task_id!r}")
        by_task[task_id][0].append(pred)
        by_task[task_id][1].append(gt)
    values = {}
    for task_id, (preds, gts) in by_task.items():
        if task_id not in table:
            raise KeyError(f"evaluate_predictions: unknown task {task_id!r}; pass its TaskSpec in tasks=")
        spec = table[task_id]
        values[task_id] = per_image_values(spec.task_type, spec.num_classes, preds, gts)
    return values


def metrics_by_task(values: Mapping[str, Mapping], tasks=None) -> dict[str, dict[str, float]]:
    """{task_id: {metric: value}} from {task_id: per-image values} (`values_by_task`)."""
    table = task_table(tasks)
    return {task_id: metrics_from_values(table[task_id].task_type, table[task_id].num_classes, task_values)
            for task_id, task_values in values.items()}


def evaluate_predictions(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
                         tasks=None) -> dict[str, dict[str, float]]:
    """{task_id: {metric: value}}: `metrics_by_task` of `values_by_task`."""
    table = task_table(tasks)
    return metrics_by_task(values_by_task(predictions, ground_truth, table), table)


def average_by_task_type(task_metrics: Mapping[str, Mapping[str, float]], tasks=None) -> dict[str, dict[str, float]]:
    """Per task type, each metric averaged over its tasks (NaN-tolerant: NaN tasks are skipped)."""
    table = task_table(tasks)
    grouped: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for task_id, metrics in task_metrics.items():
        for name, value in metrics.items():
            grouped[table[task_id].task_type][name].append(float(value))
    return {
        task_type: {name: nanmean(values) for name, values in metrics.items()} for task_type, metrics in grouped.items()
    }
