"""Test-time augmentation: the model's raw outputs averaged over the image and its mirror.

`hflip_tta(model, images, task_ids)` runs the batch as it is and, for the rows whose task keeps
its meaning under a horizontal flip (`TaskSpec.hflip`; position classes and fetal_femur's
ordered endpoints do not), once more mirrored. The mirrored view's outputs are un-flipped to
the original frame (`unflip`) and averaged with the plain ones (`average`), per task type,
before postprocessing; rows of the other tasks keep their plain outputs untouched. The result
has the model's output shape (DESIGN.md), so `model.postprocess` reads it unchanged.

Un-flipping (normalised x -> 1 - x; pixel column j of w -> w - 1 - j, whose centre
(j + 0.5) / w maps exactly onto (w - 1 - j + 0.5) / w):
- segmentation logits, landmark heatmaps: mirror the W axis;
- landmark points: x -> 1 - x, the point order kept (hflip tasks have identity-ordered
  points: point k stays point k in the mirror);
- detection maps: heatmap and size mirrored on W (a box's width and height do not change);
  the centre offset inside a cell is NOT simply mirrored: a centre at column c + o (o in
  [0, 1)) of the mirrored map lies at w - c - o = (w - 1 - c) + (1 - o) in the original, so
  the x offset becomes 1 - o at the mirrored cell (the y offset is unchanged);
- detection boxes: (x0, y0, x1, y1) -> (1 - x1, y0, 1 - x0, y1).

Averaging is done on probabilities, not logits: the TTA prediction is the mixture of the two
views' predictive distributions, so one confidently wrong view cannot dominate as it does in a
logit mean (a renormalised geometric mean of the probabilities), and the classification
`predicted_probs` written are exactly the mean of the two views' probabilities. For the
soft-argmax landmarks, averaging the spatial distributions is the same as averaging the
points (the expectation is linear), which is what the points are. The averaged
distributions are stored as log-probabilities (finite, via logaddexp) in the logit fields, so
softmax / argmax downstream give the mean probabilities.

Detection: the boxes are decoded from each view and the un-flipped boxes averaged, rather
than decoding averaged maps. The size and offset maps are trained only at the ground-truth
centre cell (m2dino.training.losses.detection_loss); when the two views' peaks land in
neighbouring cells, a cellwise mean would pair one view's trained regression with the other's
untrained one. The maps in the result are the cellwise means (heatmap as the mean
probability's logit), kept for inspection; `boxes` and `scores` are the prediction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from m2dino.tasks import TaskTable, TaskType

LOG2 = math.log(2.0)


def _unflip_segmentation(out: dict) -> dict:
    return {"logits": out["logits"].flip(-1)}


def _unflip_classification(out: dict) -> dict:
    return {"logits": out["logits"]}


def _unflip_landmarks(out: dict) -> dict:
    points = out["points"].clone()
    points[..., 0] = 1.0 - points[..., 0]
    return {"heatmaps": out["heatmaps"].flip(-1), "points": points}


def _unflip_detection(out: dict) -> dict:
    offset = out["offset"].flip(-1).clone()
    offset[:, 0] = 1.0 - offset[:, 0]
    x0, y0, x1, y1 = out["boxes"].unbind(-1)
    return {"heatmap": out["heatmap"].flip(-1), "size": out["size"].flip(-1), "offset": offset,
            "boxes": torch.stack([1.0 - x1, y0, 1.0 - x0, y1], dim=-1), "scores": out["scores"]}


def _mean_log_softmax(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """log((softmax(a) + softmax(b)) / 2), finite for finite inputs."""
    return torch.logaddexp(a.float().log_softmax(dim), b.float().log_softmax(dim)) - LOG2


def _average_logits(a: dict, b: dict) -> dict:
    return {"logits": _mean_log_softmax(a["logits"], b["logits"], dim=1)}


def _average_landmarks(a: dict, b: dict) -> dict:
    shape = a["heatmaps"].shape
    heatmaps = _mean_log_softmax(a["heatmaps"].flatten(2), b["heatmaps"].flatten(2), dim=-1)
    return {"heatmaps": heatmaps.view(shape), "points": (a["points"].float() + b["points"].float()) / 2}


def _average_detection(a: dict, b: dict) -> dict:
    ha, hb = a["heatmap"].float(), b["heatmap"].float()
    log_p = torch.logaddexp(F.logsigmoid(ha), F.logsigmoid(hb)) - LOG2
    log_not_p = torch.logaddexp(F.logsigmoid(-ha), F.logsigmoid(-hb)) - LOG2
    return {"heatmap": log_p - log_not_p,
            **{k: (a[k].float() + b[k].float()) / 2 for k in ("size", "offset", "boxes", "scores")}}


# Per task type: (how a mirrored view's raw outputs map back, how two views' outputs average).
TTA = TaskTable("test-time flip rules", {
    TaskType.SEGMENTATION: (_unflip_segmentation, _average_logits),
    TaskType.CLASSIFICATION: (_unflip_classification, _average_logits),
    TaskType.LANDMARKS: (_unflip_landmarks, _average_landmarks),
    TaskType.DETECTION: (_unflip_detection, _average_detection),
})


def unflip(task_type: str, out: dict) -> dict:
    """Raw head outputs of a mirrored image mapped back to the original frame."""
    return TTA[task_type][0](out)


def average(task_type: str, a: dict, b: dict) -> dict:
    """The TTA output of two views' (already un-flipped) raw outputs, as in the module doc."""
    return TTA[task_type][1](a, b)


def hflip_tta(model, images: Tensor, task_ids: Tensor) -> dict:
    """`model(images, task_ids)` with every flip-safe task's outputs averaged over the image
    and its horizontal mirror (see the module doc); other tasks' outputs are the plain ones."""
    outputs = model(images, task_ids)
    flip_safe = torch.tensor([spec.hflip for spec in model.tasks], dtype=torch.bool)
    rows = flip_safe[task_ids.cpu()].nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return outputs
    index = rows.to(images.device)
    mirrored = model(images.index_select(0, index).flip(-1), task_ids.index_select(0, index))
    specs = {spec.task_id: spec for spec in model.tasks}
    merged = dict(outputs["tasks"])
    for task_id, flipped in mirrored["tasks"].items():
        plain = outputs["tasks"][task_id]
        # rows of the mirrored sub-batch -> rows of the batch: the same rows, in the same order
        if not torch.equal(rows[flipped["indices"].cpu()], plain["indices"].cpu()):
            raise RuntimeError(f"TTA: the mirrored rows of task {task_id!r} do not match the plain ones")
        kind = specs[task_id].task_type
        raw = {k: v for k, v in flipped.items() if k != "indices"}
        merged[task_id] = {"indices": plain["indices"],
                           **average(kind, {k: v for k, v in plain.items() if k != "indices"}, unflip(kind, raw))}
    return {**outputs, "tasks": merged}
