"""Per-sample transforms that keep image and annotation aligned.

Coordinates are continuous: pixel i covers [i, i+1), so a point x in an image of width W is
x / W in normalised units, and the S x S resize (per axis, no letterbox) maps it to x * S / W.
Pillow's resampling uses the same convention (it samples at pixel centres i + 0.5), which
is why masks, boxes and points stay aligned; tests/data/test_transforms.py checks it numerically.

Train-time augmentation, ultrasound-appropriate: one affine (scale, small rotation,
translation, and a horizontal flip only where the task's `hflip` allows it) applied to the
image, the mask, the box corners and the points together; then brightness/contrast, gamma
and multiplicative speckle on the image only. A random affine that would push a box or a
landmark out of the frame is redrawn (so annotations are never clipped); detection tasks get
no rotation (the box of a rotated box is not the box of the rotated object).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# DINOv3 (LVD-1689M) normalisation = ImageNet mean / std.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation strengths (0 disables an item)."""

    p_affine: float = 0.8
    scale: tuple = (0.9, 1.1)
    rotate_deg: float = 10.0
    translate: float = 0.06  # fraction of the side
    p_hflip: float = 0.5  # only for tasks whose TaskSpec.hflip is True
    brightness: float = 0.15  # additive, in [0, 1] intensity units
    contrast: float = 0.2  # multiplicative around the mean: 1 +- contrast
    gamma: tuple = (0.75, 1.35)
    speckle: float = 0.15  # strength of multiplicative Rayleigh speckle
    max_tries: int = 5


def _forward_affine(S, rng, aug: Augment, allow_flip: bool, allow_rotate: bool):
    """A 2x3 matrix mapping output pixel coordinates from input ones (both S x S)."""
    flip = allow_flip and rng.random() < aug.p_hflip
    m = np.eye(3)
    if flip:
        m = np.array([[-1.0, 0, S], [0, 1, 0], [0, 0, 1]]) @ m
    if rng.random() < aug.p_affine:
        s = rng.uniform(*aug.scale)
        th = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg)) if allow_rotate else 0.0
        tx, ty = rng.uniform(-aug.translate, aug.translate, size=2) * S
        c, sn = math.cos(th) * s, math.sin(th) * s
        cx = cy = S / 2
        rot = np.array([[c, -sn, cx - c * cx + sn * cy + tx], [sn, c, cy - sn * cx - c * cy + ty], [0, 0, 1]])
        m = rot @ m
    return m


def _apply(m, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:2, :2].T + m[:2, 2]


def _box_corners(box):
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float64)


class SampleTransform:
    """(PIL image, raw target in original pixels) -> (FloatTensor[3,S,S], normalised target).

    raw target: {"mask": int ndarray[H,W]} | {"label": int} | {"box": (x0,y0,x1,y1)} |
    {"points": [(x, y), ...]}. Output target as in DESIGN.md (mask LongTensor[S,S],
    label LongTensor[], box FloatTensor[4] xyxy in [0,1], points FloatTensor[K,2] in [0,1]).
    """

    def __init__(self, size: int = 224, train: bool = False, augment: Augment | None = None,
                 mean=IMAGE_MEAN, std=IMAGE_STD):
        if int(size) < 8:
            raise ValueError(f"image size must be >= 8, got {size}")
        self.size = int(size)
        self.train = bool(train)
        self.augment = augment or Augment()
        self.mean = np.asarray(mean, np.float32)
        self.inv_std = 1.0 / np.asarray(std, np.float32)

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator | None = None,
                 hflip: bool = True, rotate: bool = True):
        S = self.size
        W, H = image.size
        sx, sy = S / W, S / H
        img = image.resize((S, S), Image.BILINEAR)
        mask = None
        if "mask" in target:
            m = np.asarray(target["mask"])
            if m.shape != (H, W):
                raise ValueError(f"mask shape {m.shape} differs from image size {(H, W)}")
            mask = Image.fromarray(m.astype(np.uint8 if m.max(initial=0) < 256 else np.int32))
            mask = mask.resize((S, S), Image.NEAREST)
        box = None
        if "box" in target:
            box = np.asarray(target["box"], np.float64) * [sx, sy, sx, sy]
        pts = None
        if "points" in target:
            pts = np.asarray(target["points"], np.float64).reshape(-1, 2) * [sx, sy]

        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            aug = self.augment
            for _ in range(max(1, aug.max_tries)):
                m = _forward_affine(S, rng, aug, hflip, rotate and box is None)
                ok = True
                if box is not None:
                    c = _apply(m, _box_corners(box))
                    ok = c.min() >= 0 and c[:, 0].max() <= S and c[:, 1].max() <= S
                if ok and pts is not None and len(pts):
                    p = _apply(m, pts)
                    ok = p.min() >= 0 and p[:, 0].max() <= S and p[:, 1].max() <= S
                if ok:
                    break
            else:
                m = np.eye(3)  # no affine keeps everything in frame
            if not np.allclose(m, np.eye(3)):
                inv = np.linalg.inv(m)
                coeffs = tuple(inv[:2].reshape(-1))
                img = img.transform((S, S), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)
                if mask is not None:
                    mask = mask.transform((S, S), Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=0)
                if box is not None:
                    c = _apply(m, _box_corners(box))
                    box = np.array([c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()])
                if pts is not None:
                    pts = _apply(m, pts)

        if self.train:
            x = self._photometric(np.asarray(img), rng)
        else:
            x = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
        if x.ndim == 2:  # grayscale -> 3 identical channels
            x = np.repeat(x[:, :, None], 3, axis=2)
        x = (x - self.mean) * self.inv_std
        tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

        out = {}
        if mask is not None:
            out["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
        if "label" in target:
            out["label"] = torch.tensor(int(target["label"]), dtype=torch.long)
        if box is not None:
            out["box"] = torch.tensor(box / S, dtype=torch.float32)
        if pts is not None:
            out["points"] = torch.tensor(pts / S, dtype=torch.float32)
        return tensor, out

    def _photometric(self, u8: np.ndarray, rng) -> np.ndarray:
        """uint8 image -> float32 in [0, 1] with contrast, brightness, gamma (one 256-entry
        lookup table, they are pointwise) and multiplicative Rayleigh speckle."""
        aug = self.augment
        v = np.arange(256, dtype=np.float32) / 255.0
        mean = float(u8.mean()) / 255.0
        if aug.contrast:
            v = (v - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
        if aug.brightness:
            v = v + rng.uniform(-aug.brightness, aug.brightness)
        v = np.clip(v, 0.0, 1.0)
        if aug.gamma:
            v = v ** np.float32(rng.uniform(*aug.gamma))
        x = v.astype(np.float32)[u8]
        if aug.speckle:
            # Rayleigh amplitude = sqrt(2 * Exp(1)) * sigma; sigma = sqrt(2/pi) gives mean 1
            n = np.sqrt(rng.standard_exponential(u8.shape[:2], dtype=np.float32) * np.float32(4 / np.pi))
            k = np.float32(rng.uniform(0, aug.speckle))
            factor = (1 - k) + k * n
            x *= factor[:, :, None] if x.ndim == 3 else factor
            np.clip(x, 0.0, 1.0, out=x)
        return x


def denormalize(image: torch.Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """Inverse of the normalisation, for viewing: [3,S,S] -> [3,S,S] in [0,1]."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image * s + m).clamp(0, 1)
