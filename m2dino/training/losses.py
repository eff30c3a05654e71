"""Per-task-type losses and the total multi-task loss.

- segmentation: cross-entropy + soft Dice (softmax probabilities, per image and class,
  smoothed by 1 so that a class absent from both prediction and mask costs nothing),
  averaged over images and classes (background included).
- classification: cross-entropy with optional label smoothing.
- regression (landmarks): L1 between soft-argmax points and targets, normalised xy, plus
  HEATMAP_KL_WEIGHT x KL(target || softmax(heatmap)) with a Gaussian target (sigma one cell)
  around each true point, when the head outputs its heatmaps. The L1 alone hardly moves a
  nearly uniform heatmap (its gradient is scaled by the 1/(h*w) cell probabilities), so a
  small model trained from scratch stayed near the image centre, worse than the mean point.
- detection: CenterNet penalty-reduced focal loss on the centre heatmap (Gaussian target
  around the box centre's cell, alpha 2, beta 4, normalised by the number of boxes), plus L1
  on the size and on the in-cell offset read at the centre cell, plus GIoU loss (1 - GIoU) of
  the box decoded at the centre cell.

`total_loss` = sum_t lambda_t s_t L_t + sum_a w_a aux_a, the one loss of training and of
users' own loops: L_t the mean over task t's samples in the batch, lambda_t from
`loss_weights` (keys: task ids or task types; a task id wins; default 1), s_t a per-task
normaliser (`task_scales`, default 1: the trainer's data-parallel share of the global batch),
and w_a from `aux_weights` (DEFAULT_AUX_WEIGHTS otherwise; the names are the MoE layers'
AUX_NAMES). Aux terms of weight 0 are left out, not multiplied by 0 (a non-finite aux value
then cannot poison the loss).

Gradient accumulation: a step's batch of b images is cut into N consecutive micro-batches
(`split_batch`), each forwarded and backpropagated on its own, the gradients adding up before
one optimizer step. It is the step over the whole batch when micro-batch m's loss is
total_loss(..., task_scales=s_m, aux_scale=a_m) with (`accumulation_scales`):
- s_{t,m} = (n_{t,m} / N_t) * W. L_t is a mean over task t's samples, so over the whole batch
  L_t = sum_m (n_{t,m} / n_t) L_t(m); a task absent from a micro-batch adds nothing there. N_t
  counts task t over the whole step (every micro-batch of every rank) and W is the number of
  ranks whose gradients DDP averages (1 alone): the normaliser the trainer already uses across
  ranks, extended over the micro-batches. lambda_t multiplies as before.
- a_m = b_m / b, the micro-batch's share of the rank's images. The router z-loss is a mean
  over tokens (a fixed number per image), so it is exact. The load balance and the
  mutual information are functions of the batch's routing statistics (products of per-expert
  means, entropies) that no per-micro-batch weight reproduces: accumulated, they are the
  size-weighted mean of the micro-batches' values, the estimate data parallelism already makes
  (each rank's over its own batch, averaged over ranks). N micro-batches on one device are
  exactly N data-parallel ranks with one micro-batch each.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from m2dino.models.configs import DEFAULT_AUX_WEIGHTS  # noqa: F401 (training's defaults too)
from m2dino.models.heads import boxes_from_maps
from m2dino.models.moe import AUX_NAMES
from m2dino.tasks import TaskTable, TaskType

FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0


def _wide(x: Tensor) -> Tensor:
    """Losses run in fp32 at least: half-precision outputs (autocast) are upcast, float64 ones
    (gradient checks) kept."""
    return x if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------
def dice_loss(logits: Tensor, masks: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - mean over (image, class) of (2|P∩G| + s) / (|P| + |G| + s), P = softmax."""
    num_classes = logits.shape[1]
    probs = _wide(logits).softmax(dim=1)
    onehot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    intersection = (probs * onehot).sum(dim=(2, 3))
    total = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
    return 1.0 - ((2 * intersection + smooth) / (total + smooth)).mean()


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """logits [n, C, H, W], masks [n, H, W] (class indices)."""
    if masks.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"segmentation masks {list(masks.shape)} do not match logits "
                         f"{list(logits.shape)} (expected [n, H, W])")
    masks = masks.long()
    return F.cross_entropy(_wide(logits), masks) + dice_loss(logits, masks)


# ---------------------------------------------------------------------------------------
# Classification and landmarks
# ---------------------------------------------------------------------------------------
def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    return F.cross_entropy(_wide(logits), labels.long(), label_smoothing=label_smoothing)


HEATMAP_KL_WEIGHT = 0.1


def heatmap_kl_loss(heatmaps: Tensor, target_points: Tensor, sigma_cells: float = 1.0) -> Tensor:
    """KL(Gaussian target around each point || spatial softmax of the heatmap logits), mean
    over samples and points. heatmaps [n, K, h, w]; target_points [n, K, 2] normalised xy."""
    n, k, h, w = heatmaps.shape
    xs = (torch.arange(w, device=heatmaps.device, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, device=heatmaps.device, dtype=torch.float32) + 0.5) / h
    t = target_points.float()
    dx = ((xs.view(1, 1, 1, w) - t[..., 0].view(n, k, 1, 1)) * w) ** 2
    dy = ((ys.view(1, 1, h, 1) - t[..., 1].view(n, k, 1, 1)) * h) ** 2
    target = (-(dx + dy) / (2 * sigma_cells ** 2)).flatten(2).softmax(-1)
    log_p = _wide(heatmaps).flatten(2).log_softmax(-1)
    kl = (target * (target.clamp_min(1e-12).log() - log_p)).sum(-1)
    return kl.mean()


def landmark_loss(points: Tensor, target_points: Tensor) -> Tensor:
    if points.shape != target_points.shape:
        raise ValueError(f"target points {list(target_points.shape)} do not match predicted "
                         f"{list(points.shape)} (expected [n, K, 2])")
    points = _wide(points)
    return F.l1_loss(points, target_points.to(points.dtype))


# ---------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------
def generalized_iou(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Row-wise GIoU of xyxy boxes [n, 4]."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]).clamp_min(0) * (boxes_a[:, 3] - boxes_a[:, 1]).clamp_min(0)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]).clamp_min(0) * (boxes_b[:, 3] - boxes_b[:, 1]).clamp_min(0)
    top_left = torch.maximum(boxes_a[:, :2], boxes_b[:, :2])
    bottom_right = torch.minimum(boxes_a[:, 2:], boxes_b[:, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=1)
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(1e-9)
    hull = (torch.maximum(boxes_a[:, 2:], boxes_b[:, 2:])
            - torch.minimum(boxes_a[:, :2], boxes_b[:, :2])).clamp_min(0).prod(dim=1)
    return iou - (hull - union) / hull.clamp_min(1e-9)


def centre_targets(boxes: Tensor, height: int, width: int):
    """Gaussian centre heatmaps [n, 1, h, w] (1 at the centre cell), the centre cells
    (rows, cols) and the in-cell offsets [n, 2] of normalised xyxy boxes [n, 4]."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 * width
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 * height
    cols = cx.floor().clamp(0, width - 1).long()
    rows = cy.floor().clamp(0, height - 1).long()
    offsets = torch.stack([cx - cols, cy - rows], dim=1)
    sigma_x = ((boxes[:, 2] - boxes[:, 0]) * width / 6).clamp_min(0.5)
    sigma_y = ((boxes[:, 3] - boxes[:, 1]) * height / 6).clamp_min(0.5)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32)
    gx = ((xs[None] - cols[:, None]) ** 2) / (2 * sigma_x[:, None] ** 2)      # [n, w]
    gy = ((ys[None] - rows[:, None]) ** 2) / (2 * sigma_y[:, None] ** 2)      # [n, h]
    heat = torch.exp(-(gy[:, :, None] + gx[:, None, :]))[:, None]
    return heat, rows, cols, offsets


def focal_loss(heatmap_logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet focal loss; positives are the cells where target == 1; / number of them."""
    logits = _wide(heatmap_logits)
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    positive = target == 1
    pos = -((1 - p) ** FOCAL_ALPHA) * log_p
    neg = -((1 - target) ** FOCAL_BETA) * (p ** FOCAL_ALPHA) * log_not_p
    loss = torch.where(positive, pos, neg).sum()
    return loss / positive.sum().clamp_min(1)


def detection_loss(heatmap: Tensor, size: Tensor, offset: Tensor, boxes: Tensor,
                   return_parts: bool = False):
    """heatmap logits [n,1,h,w], size/offset [n,2,h,w], target boxes [n,4] normalised xyxy."""
    if boxes.shape != (heatmap.shape[0], 4):
        raise ValueError(f"target boxes must have shape [n, 4] = [{heatmap.shape[0]}, 4], "
                         f"got {list(boxes.shape)}")
    size, offset = _wide(size), _wide(offset)
    boxes = boxes.to(size.dtype)
    height, width = heatmap.shape[-2:]
    target_heat, rows, cols, target_offset = centre_targets(boxes, height, width)
    batch = torch.arange(boxes.shape[0], device=boxes.device)
    target_size = boxes[:, 2:] - boxes[:, :2]
    parts = {
        "focal": focal_loss(heatmap, target_heat),
        "size": F.l1_loss(size[batch, :, rows, cols], target_size),
        "offset": F.l1_loss(offset[batch, :, rows, cols], target_offset),
        "giou": (1 - generalized_iou(boxes_from_maps(size, offset, rows, cols),
                                     boxes)).mean(),
    }
    loss = sum(parts.values())
    return (loss, parts) if return_parts else loss


# ---------------------------------------------------------------------------------------
# Total
# ---------------------------------------------------------------------------------------
def _stack_targets(targets: list, rows: Tensor, key: str, task_id: str, device) -> Tensor:
    values = []
    for row in rows.tolist():
        target = targets[row]
        if not isinstance(target, dict) or key not in target:
            raise ValueError(f"target of batch row {row} (task {task_id!r}) has no {key!r}; "
                             f"got {sorted(target) if isinstance(target, dict) else target!r}")
        values.append(torch.as_tensor(target[key]))
    return torch.stack(values).to(device)


def _segmentation_task_loss(task, head_outputs: dict, targets: list, label_smoothing: float) -> Tensor:
    logits = head_outputs["logits"]
    return segmentation_loss(logits, _stack_targets(targets, head_outputs["indices"], "mask", task.task_id,
                                                    logits.device))


def _classification_task_loss(task, head_outputs: dict, targets: list, label_smoothing: float) -> Tensor:
    logits = head_outputs["logits"]
    return classification_loss(logits, _stack_targets(targets, head_outputs["indices"], "label", task.task_id,
                                                      logits.device), label_smoothing)


def _landmark_task_loss(task, head_outputs: dict, targets: list, label_smoothing: float) -> Tensor:
    points = head_outputs["points"]
    target_points = _stack_targets(targets, head_outputs["indices"], "points", task.task_id, points.device)
    loss = landmark_loss(points, target_points)
    if head_outputs.get("heatmaps") is not None and HEATMAP_KL_WEIGHT > 0:
        loss = loss + HEATMAP_KL_WEIGHT * heatmap_kl_loss(head_outputs["heatmaps"], target_points)
    return loss


def _detection_task_loss(task, head_outputs: dict, targets: list, label_smoothing: float) -> Tensor:
    heat = head_outputs["heatmap"]
    return detection_loss(heat, head_outputs["size"], head_outputs["offset"],
                          _stack_targets(targets, head_outputs["indices"], "box", task.task_id, heat.device))


# L_t per task type: (task, head outputs, batch targets, label_smoothing) -> scalar loss.
LOSSES = TaskTable("losses", {
    TaskType.SEGMENTATION: _segmentation_task_loss,
    TaskType.CLASSIFICATION: _classification_task_loss,
    TaskType.LANDMARKS: _landmark_task_loss,
    TaskType.DETECTION: _detection_task_loss,
})


def task_loss(task, head_outputs: dict, targets: list, label_smoothing: float = 0.0) -> Tensor:
    """L_t of one task: the head outputs of its rows against targets[row]."""
    return LOSSES[task.task_type](task, head_outputs, targets, label_smoothing)


def task_weight(task, loss_weights: Optional[dict]) -> float:
    """lambda_t: `loss_weights[task_id]`, else `loss_weights[task_type]`, else 1."""
    if not loss_weights:
        return 1.0
    if task.task_id in loss_weights:
        return float(loss_weights[task.task_id])
    return float(loss_weights.get(task.task_type, 1.0))


def check_aux_weights(aux_weights: Optional[dict]) -> dict:
    """The aux weights to use (DEFAULT_AUX_WEIGHTS when None); unknown names raise."""
    weights = dict(DEFAULT_AUX_WEIGHTS if aux_weights is None else aux_weights)
    unknown = set(weights) - set(AUX_NAMES)
    if unknown:
        raise ValueError(f"unknown aux_weights keys {sorted(unknown)}; expected {sorted(AUX_NAMES)}")
    return weights


def total_loss(outputs: dict, targets: list, tasks, loss_weights: Optional[dict] = None,
               aux_weights: Optional[dict] = None, label_smoothing: float = 0.0,
               task_scales: Optional[dict] = None, anchor_unused: bool = True, aux_scale: float = 1.0):
    """(loss, {task_id: L_t, "aux/<name>": aux value}) for a model forward's outputs.

    targets: the batch's target dicts in batch order (collate's "targets"); tasks: the
    model's TaskSpecs (or any list containing the tasks present in outputs); task_scales:
    {task_id: s_t} (see the module docstring). anchor_unused: add the forward's
    `unused_anchor` (0 x the parameters of heads absent from the batch), so that every
    parameter gets a gradient, zeros for those, as DistributedDataParallel without
    find_unused_parameters needs; False leaves them without a gradient (AdamW then leaves them
    untouched). aux_scale multiplies the aux terms (a micro-batch's share of the step, see
    `accumulation_scales`). The returned loss carries every gradient; the dict is detached,
    for logging.
    """
    specs = {getattr(t, "task_id", None): t for t in tasks}
    weights = check_aux_weights(aux_weights)
    task_scales = task_scales or {}
    loss = _zero_like_outputs(outputs)
    if anchor_unused and outputs.get("unused_anchor") is not None:
        loss = loss + outputs["unused_anchor"]
    logged = {}
    for task_id, head_outputs in outputs["tasks"].items():
        if task_id not in specs:
            raise ValueError(f"outputs have task {task_id!r}, which is not in `tasks`")
        value = task_loss(specs[task_id], head_outputs, targets, label_smoothing)
        scale = task_weight(specs[task_id], loss_weights) * float(task_scales.get(task_id, 1.0))
        loss = loss + scale * _wide(value)
        logged[task_id] = value.detach()
    for name, value in outputs.get("aux", {}).items():
        if weights.get(name, 0.0):
            loss = loss + weights[name] * aux_scale * _wide(value)
        logged[f"aux/{name}"] = value.detach()
    return loss, logged


def _zero_like_outputs(outputs: dict) -> Tensor:
    """A 0-d fp32 zero on the outputs' device (the sum's start)."""
    for head_outputs in outputs["tasks"].values():
        return torch.zeros((), device=head_outputs["indices"].device)
    for value in outputs.get("aux", {}).values():
        return torch.zeros((), device=value.device)
    return torch.zeros(())


# ---------------------------------------------------------------------------------------
# Gradient accumulation (see the module docstring)
# ---------------------------------------------------------------------------------------
def split_batch(batch: dict, micro_batches: int) -> list[dict]:
    """A batch (collate's dict: tensors and lists with one entry per image) cut into
    `micro_batches` consecutive micro-batches whose sizes differ by at most one, larger first
    (torch.tensor_split's rule). One micro-batch returns the batch itself."""
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if micro_batches == 1:
        return [batch]
    size = len(batch["tasks"])
    if micro_batches > size:
        raise ValueError(f"cannot cut a batch of {size} images into {micro_batches} micro-batches "
                         f"(each needs at least one image): lower the accumulation or raise the batch size")
    for key, value in batch.items():
        if isinstance(value, Tensor):
            length = value.shape[0] if value.dim() else None
        else:
            length = len(value) if isinstance(value, (list, tuple)) else None
        if length != size:
            raise ValueError(f"batch[{key!r}] has {length} entries, not one per image ({size}): cannot split it")
    bounds = [0]
    for m in range(micro_batches):
        bounds.append(bounds[-1] + size // micro_batches + (1 if m < size % micro_batches else 0))
    return [{key: value[start:end] for key, value in batch.items()} for start, end in zip(bounds, bounds[1:])]


class MicroBatchScales(NamedTuple):
    """total_loss's task_scales and aux_scale for one micro-batch."""
    task_scales: dict[str, float]
    aux_scale: float


def task_counts(micro_batch_tasks: Sequence[Sequence[str]]) -> dict[str, float]:
    """How many images of each task the micro-batches hold together (a rank's share of N_t)."""
    counts: dict[str, float] = {}
    for tasks in micro_batch_tasks:
        for task in tasks:
            counts[task] = counts.get(task, 0.0) + 1.0
    return counts


def accumulation_scales(micro_batch_tasks: Sequence[Sequence[str]], step_counts: Optional[dict] = None,
                        world_size: int = 1) -> list[MicroBatchScales]:
    """The scales that make the micro-batches' accumulated gradients the step's (module docstring).

    micro_batch_tasks: each micro-batch's task ids, one per image (a batch's "tasks"); step_counts:
    {task_id: N_t} over the whole step on every rank (the all-reduced sum of each rank's
    `task_counts`), this rank's own counts when None; world_size: the ranks DDP averages over.
    One micro-batch on one process gives task scales of 1 and an aux scale of 1."""
    counts = task_counts(micro_batch_tasks) if step_counts is None else step_counts
    images = sum(len(tasks) for tasks in micro_batch_tasks)
    scales = []
    for tasks in micro_batch_tasks:
        local = task_counts([tasks])
        missing = sorted(t for t in local if not counts.get(t))
        if missing:
            raise ValueError(f"step_counts has no images of tasks {missing}, which this micro-batch holds")
        scales.append(MicroBatchScales({t: float(n / counts[t]) * world_size for t, n in local.items()},
                                       len(tasks) / images))
    return scales


def merge_logged(logged: Sequence[dict], micro_batch_tasks: Sequence[Sequence[str]]) -> dict:
    """The step's {task_id: L_t, "aux/<name>": value} from its micro-batches' total_loss dicts:
    each L_t the mean over the task's images of the step (its micro-batch values weighted by
    their shares of the task's images), each aux value weighted by the micro-batch's share of
    the images (as accumulation_scales weights it). One micro-batch returns its dict as is."""
    if len(logged) != len(micro_batch_tasks):
        raise ValueError(f"{len(logged)} logged dicts for {len(micro_batch_tasks)} micro-batches")
    if len(logged) == 1:
        return dict(logged[0])
    counts = task_counts(micro_batch_tasks)
    images = sum(len(tasks) for tasks in micro_batch_tasks)
    merged: dict = {}
    for values, tasks in zip(logged, micro_batch_tasks):
        local = task_counts([tasks])
        for key, value in values.items():
            weight = len(tasks) / images if key.startswith("aux/") else local[key] / counts[key]
            merged[key] = merged[key] + weight * value if key in merged else weight * value
    return merged
