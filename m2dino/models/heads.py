"""Shared spatial neck and the four kinds of per-task heads.

Neck (DPT-style, light): four intermediate backbone layers (patch tokens at stride p, the
patch size) are each "reassembled" (1x1 projection, then resampled to a target stride), and
"fused" top-down (upsample the coarser map, add, 3x3 conv):

    layer a -> stride 4, layer b -> stride 8, layers c and d -> stride 16
    f16 = fuse(r_c + r_d),  f8 = fuse(r_b + up(f16)),  f4 = fuse(r_a + up(f8))

The resampling adapts to the patch size (p = 8: 2x transposed conv / identity / 2x strided
conv; p = 16: 4x / 2x transposed convs / identity). Strides are relative to the input.

Heads (one per task; outputs are raw, the names are those of DESIGN.md):
- SegmentationHead: f4 -> conv -> C logits, bilinearly upsampled to the input H x W.
- ClassificationHead: [CLS token, mean of patch tokens] (final, normalised) -> C logits.
- LandmarkHead: f4 -> K heatmap logits [h, w] (stride 4) -> soft-argmax (softmax over the
  map, expected pixel centre) -> points [K, 2], normalised xy in [0, 1].
- DetectionHead (anchor-free, CenterNet-style) on f4: centre heatmap logits [1, h, w], box
  size [2, h, w] (w, h normalised to the image, sigmoid), centre offset inside the cell
  [2, h, w] (sigmoid, in cells); `decode_boxes` returns scored boxes, the heads' `boxes` /
  `scores` are the best one (single-box tasks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2dino.models.configs import default_neck_layers  # noqa: F401 (re-exported)
from m2dino.tasks import TaskTable, TaskType

NECK_STRIDES = (4, 8, 16)


def _resample(channels: int, from_stride: int, to_stride: int) -> nn.Module:
    if to_stride == from_stride:
        return nn.Identity()
    if to_stride < from_stride:
        factor = from_stride // to_stride
        if factor * to_stride != from_stride:
            raise ValueError(f"cannot resample stride {from_stride} to {to_stride}")
        return nn.ConvTranspose2d(channels, channels, kernel_size=factor, stride=factor)
    factor = to_stride // from_stride
    if factor * from_stride != to_stride:
        raise ValueError(f"cannot resample stride {from_stride} to {to_stride}")
    return nn.Conv2d(channels, channels, kernel_size=factor, stride=factor)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.GroupNorm(min(8, out_channels), out_channels), nn.GELU())


def _upsample_to(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class DPTNeck(nn.Module):
    """Four [B, D, H/p, W/p] maps -> {4: [B, C, ~H/4, ~W/4], 8: ..., 16: ...}."""

    def __init__(self, embed_dim: int, patch_size: int, channels: int = 64):
        super().__init__()
        self.channels = channels
        strides = (4, 8, 16, 16)
        self.project = nn.ModuleList(nn.Conv2d(embed_dim, channels, 1) for _ in strides)
        self.resample = nn.ModuleList(_resample(channels, patch_size, s) for s in strides)
        self.fuse = nn.ModuleDict({str(s): _conv_block(channels, channels) for s in NECK_STRIDES})

    def forward(self, layers: list[Tensor]) -> dict[int, Tensor]:
        if len(layers) != 4:
            raise ValueError(f"DPTNeck takes 4 feature maps, got {len(layers)}")
        r4, r8, r16a, r16b = (resample(project(x)) for x, project, resample
                              in zip(layers, self.project, self.resample))
        f16 = self.fuse["16"](r16a + r16b)
        f8 = self.fuse["8"](r8 + _upsample_to(f16, r8))
        f4 = self.fuse["4"](r4 + _upsample_to(f8, r4))
        return {4: f4, 8: f8, 16: f16}


class SegmentationHead(nn.Module):
    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.block = _conv_block(channels, channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: dict[int, Tensor], cls_token: Tensor, patch_tokens: Tensor,
                image_size: tuple[int, int]) -> dict[str, Tensor]:
        logits = self.classifier(self.block(features[4]))
        logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
        return {"logits": logits}


class ClassificationHead(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(2 * embed_dim, num_classes)

    def forward(self, features, cls_token: Tensor, patch_tokens: Tensor,
                image_size) -> dict[str, Tensor]:
        pooled = torch.cat([cls_token, patch_tokens.mean(dim=1)], dim=-1)
        return {"logits": self.linear(self.dropout(pooled))}


def soft_argmax_2d(heatmaps: Tensor) -> Tensor:
    """[n, K, h, w] logits -> [n, K, 2] expected (x, y) of the cell centres, in [0, 1]."""
    n, k, h, w = heatmaps.shape
    probs = heatmaps.float().flatten(2).softmax(dim=-1).view(n, k, h, w)
    xs = (torch.arange(w, device=heatmaps.device, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, device=heatmaps.device, dtype=torch.float32) + 0.5) / h
    x = (probs.sum(dim=2) * xs).sum(dim=-1)
    y = (probs.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


class LandmarkHead(nn.Module):
    """Heatmap logits = features + a learnable per-point prior map (`prior` [K, 16, 16],
    bilinearly resampled to the heatmap's size). The prior is zero at construction;
    `set_point_prior` starts it at a Gaussian around the training-mean points. Why: a conv's
    bias is the same at every cell, so without a prior the head starts from the image centre
    (soft-argmax of a flat map), and with few steps it can end worse than simply predicting
    the mean. With it, the head starts where the trivial baseline is and the features learn how
    each image departs from it (a data-dependent start, like the detection head's prior bias)."""

    PRIOR_GRID = 16
    PRIOR_SIGMA = 0.1  # image fractions

    def __init__(self, channels: int, num_points: int):
        super().__init__()
        self.block = _conv_block(channels, channels)
        self.heatmap = nn.Conv2d(channels, num_points, 1)
        self.prior = nn.Parameter(torch.zeros(num_points, self.PRIOR_GRID, self.PRIOR_GRID))

    @torch.no_grad()
    def set_point_prior(self, mean_points) -> None:
        """Prior logits -d^2 / (2 PRIOR_SIGMA^2) around mean_points [K, 2] (normalised xy)."""
        mean = torch.as_tensor(mean_points, dtype=torch.float32).reshape(-1, 2)
        if mean.shape[0] != self.prior.shape[0]:
            raise ValueError(f"mean_points has {mean.shape[0]} points, the head predicts {self.prior.shape[0]}")
        centres = (torch.arange(self.PRIOR_GRID, dtype=torch.float32) + 0.5) / self.PRIOR_GRID
        dx = (centres.view(1, 1, -1) - mean[:, 0].view(-1, 1, 1)) ** 2
        dy = (centres.view(1, -1, 1) - mean[:, 1].view(-1, 1, 1)) ** 2
        self.prior.copy_(-(dx + dy) / (2 * self.PRIOR_SIGMA ** 2))

    def forward(self, features, cls_token, patch_tokens, image_size) -> dict[str, Tensor]:
        heatmaps = self.heatmap(self.block(features[4]))
        prior = self.prior
        if prior.shape[-2:] != heatmaps.shape[-2:]:
            prior = F.interpolate(prior[None], size=heatmaps.shape[-2:], mode="bilinear", align_corners=False)[0]
        heatmaps = heatmaps + prior.to(heatmaps.dtype)
        return {"heatmaps": heatmaps, "points": soft_argmax_2d(heatmaps)}


def boxes_from_maps(size: Tensor, offset: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Normalised xyxy boxes of the cells (rows, cols) [n] of size/offset maps [n, 2, h, w]."""
    h, w = size.shape[-2:]
    batch = torch.arange(size.shape[0], device=size.device)
    box_wh = size[batch, :, rows, cols]                  # [n, 2] normalised (w, h)
    cell_offset = offset[batch, :, rows, cols]           # [n, 2] in cells (x, y)
    cx = (cols.to(size.dtype) + cell_offset[:, 0]) / w
    cy = (rows.to(size.dtype) + cell_offset[:, 1]) / h
    half_w, half_h = box_wh[:, 0] / 2, box_wh[:, 1] / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def decode_boxes(heatmap: Tensor, size: Tensor, offset: Tensor, top_k: int = 1):
    """Scored boxes from detection maps: the top_k heatmap peaks (3x3 local maxima) of each
    image -> boxes [n, top_k, 4] normalised xyxy clipped to [0, 1], scores [n, top_k]."""
    n, _, h, w = heatmap.shape
    scores = heatmap.float().sigmoid()
    peaks = scores == F.max_pool2d(scores, 3, stride=1, padding=1)
    flat = (scores * peaks).flatten(1)
    top_k = min(top_k, h * w)
    best, index = flat.topk(top_k, dim=1)
    rows, cols = index // w, index % w
    boxes = torch.stack([boxes_from_maps(size, offset, rows[:, j], cols[:, j])
                         for j in range(top_k)], dim=1)
    return boxes.clamp(0.0, 1.0), best


class DetectionHead(nn.Module):
    def __init__(self, channels: int, prior_probability: float = 0.01):
        super().__init__()
        self.block = _conv_block(channels, channels)
        self.heatmap = nn.Conv2d(channels, 1, 1)
        self.size = nn.Conv2d(channels, 2, 1)
        self.offset = nn.Conv2d(channels, 2, 1)
        # focal-loss prior: start with few confident peaks (RetinaNet / CenterNet init)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features, cls_token, patch_tokens, image_size) -> dict[str, Tensor]:
        hidden = self.block(features[4])
        heatmap = self.heatmap(hidden)
        size = self.size(hidden).sigmoid()
        offset = self.offset(hidden).sigmoid()
        boxes, scores = decode_boxes(heatmap, size, offset, top_k=1)
        return {"heatmap": heatmap, "size": size, "offset": offset,
                "boxes": boxes[:, 0], "scores": scores[:, 0]}


# The head of each task type: (task, backbone embed_dim, neck channels) -> module.
HEADS = TaskTable("heads", {
    TaskType.SEGMENTATION: lambda task, embed_dim, channels: SegmentationHead(channels, task.num_classes),
    TaskType.CLASSIFICATION: lambda task, embed_dim, channels: ClassificationHead(embed_dim, task.num_classes),
    TaskType.LANDMARKS: lambda task, embed_dim, channels: LandmarkHead(channels, task.num_points),
    TaskType.DETECTION: lambda task, embed_dim, channels: DetectionHead(channels),
})


def build_head(task, embed_dim: int, channels: int) -> nn.Module:
    """The head of a TaskSpec's type."""
    return HEADS[task.task_type](task, embed_dim, channels)
