"""A synthetic FM_UIA suite: the 27 tasks, the exact on-disk layout, B-mode-like images.

    python -m m2dino.data.synthetic --out DIR [--scale 0.06] [--seed 0]

Why: nobody can download the challenge data here, yet every code path that reads real data,
and the TS / CG / AU comparison, must run. So this writes `train/` and `val/` roots with
`csv_files/` (paths relative to it, starting with `../`), the real task ids, `task_name`
spellings (`Regression`), class and point counts, png/jpg/bmp images and index-PNG masks.

Images: an echogenicity map painted by an organ "scene" (shared by all tasks of that organ,
so related tasks can help or hurt each other), then rendered like B-mode: sector (convex or
phased) or linear probe field of view, acoustic shadowing behind bright structures and
enhancement behind fluid (propagated along the beam), depth attenuation, correlated
multiplicative speckle with Rayleigh amplitude statistics, log compression.

Every label is visible in the image; `DIFFICULTY` says how, per task. Task sizes are the
real approximate training sizes times `scale`, at least `min_train` (more for a few hard
classification tasks, `MIN_TRAIN_FACTOR`); val is about 20%, at least `min_val`, and
class-balanced for classification (every class present).
Each image is seeded by (seed, task, split, index): the suite is deterministic and the
order of generation does not matter.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from m2dino.tasks import CSV_TASK_NAMES, TASKS

GENERATOR_VERSION = 4  # bump whenever the images or labels change: cached suites are rebuilt
DEFAULT_SCALE = 0.06
DEFAULT_SEED = 0
MIN_TRAIN = 40
MIN_VAL = 16
# Tasks whose labels need more examples than MIN_TRAIN for a small model trained from scratch
# (8-way orientation, lesion shape): their training minimum is min_train times this factor.
MIN_TRAIN_FACTOR = {"fetal_sacral_pos_cls": 2.0, "breast_2cls": 1.4, "breast_3cls": 1.6}
# Classification labels drawn freely in train; val is class-balanced (example i has class
# i % num_classes) so every class is present and the majority-class baseline is never 0.
VAL_FRACTION = 0.2
SIZE_RANGE = (96, 192)

# How each label can be read from the image (and so how hard the task is), per task.
DIFFICULTY = {
    "breast_lesion": "medium: hypoechoic lesion (oval or spiculated) in layered breast tissue",
    "cardiac_multi": "medium: LV cavity, its myocardial wall and the LA in a phased-array sector; RV is a distractor",
    "carotid_artery": "medium: round lumen with a thick bright wall; the jugular vein (oval, thin wall) is a distractor",
    "cervix": "medium: elongated moderately echoic cervix with a dark canal line",
    "cervix_multi": "hard: the two lips of the cervix, separated only by the thin canal line",
    "fetal_abdomen_multi": "hard: abdomen, stomach, umbilical vein and spine; small structures",
    "fetal_head": "easy: bright skull ellipse",
    "fetal_heart": "medium: four-chamber heart inside the fetal thorax, ribs shadowing",
    "head_symphysis_multi": "medium: pubic symphysis (elongated) and fetal head (skull ellipse)",
    "lung": "medium: lung field below the pleural line, between rib shadows",
    "ovary_tumor": "medium: large cystic/solid mass among small anechoic follicles",
    "thyroid_nodule": "medium: nodule (hypoechoic, or isoechoic with a dark halo) in the thyroid lobe",
    "breast_2cls": "medium: benign = anechoic oval, wider than tall, strong posterior enhancement; malignant = spiculated, taller, dense posterior shadowing",
    "breast_3cls": "medium: as breast_2cls, plus normal = no lesion",
    "fetal_head_pos_cls": "medium: 8 positions = direction (45 degree steps) of a large bright occiput marker (shadowing behind it) inside the head; not flip-invariant",
    "fetal_plane_cls": "easy: 6 planes drawn by different scenes (abdomen, brain, femur, thorax, cervix, other)",
    "fetal_sacral_pos_cls": "medium: 8 positions = direction of the thick bright sacrum arc in the dark fetal pelvis; not flip-invariant",
    "liver_lesion_2cls": "easy: benign = hyperechoic well-defined lesion; malignant = hypoechoic lesion with a bright halo",
    "lung_2cls": "medium: normal = horizontal A-lines; abnormal = vertical B-lines",
    "lung_disease_3cls": "medium: A-lines / B-lines / subpleural consolidation with bright air bronchograms",
    "organ_cls": "easy: 6 organs drawn by their scenes (breast, thyroid, liver, lung, heart, carotid)",
    "spinal_cord_injury_loc": "hard: small heterogeneous bright focus inside the cord between dural lines",
    "thyroid_nodule_det": "medium: box of the thyroid nodule",
    "uterine_fibroid_det": "medium: box of the round whorled fibroid in the uterus",
    "FUGC": "medium: the two ends of the cervical canal (point 1 nearer the probe)",
    "IUGC": "medium: the symphysis ends (upper, lower; a bright bar) and the tangent point on the fetal head",
    "fetal_femur": "easy: the two ends of the bright femur, ordered left to right (so not flipped)",
}

_COUNT_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six", 8: "Eight"}


# ============================================================================ the probe canvas


class Canvas:
    """Pixel grids (pixel i spans [i, i+1), centres at i + 0.5) and the probe geometry."""

    def __init__(self, h: int, w: int, probe: str, rng: np.random.Generator):
        self.h, self.w, self.probe = h, w, probe
        self.s = float(min(h, w))
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        self.X, self.Y = xs + 0.5, ys + 0.5
        if probe == "linear":
            self.top = rng.uniform(0.02, 0.06) * h
            self.fov = self.Y >= self.top
            self.depth = np.clip((self.Y - self.top) / (h - self.top), 0, 1)
        else:
            convex = probe == "convex"
            self.r0 = (rng.uniform(0.15, 0.35) if convex else 0.03) * h
            self.ay = 0.03 * h - self.r0
            self.ax = w / 2
            self.rmax = h - self.ay - 0.02 * h
            half = math.radians(rng.uniform(30, 40) if convex else rng.uniform(38, 45))
            if self.rmax > 0.49 * w:  # keep the fan inside the image width
                half = min(half, math.asin(0.49 * w / self.rmax))
            self.half = half
            self.r = np.hypot(self.X - self.ax, self.Y - self.ay)
            self.th = np.arctan2(self.X - self.ax, self.Y - self.ay)
            self.fov = (self.r >= self.r0) & (self.r <= self.rmax) & (np.abs(self.th) <= self.half)
            self.depth = np.clip((self.r - self.r0) / (self.rmax - self.r0), 0, 1)

    def point(self, depth: float, lateral: float) -> tuple[float, float]:
        """Pixel (x, y) at a depth fraction in [0, 1] and lateral fraction in [-1, 1] of the field."""
        if self.probe == "linear":
            return self.w / 2 + lateral * self.w / 2, self.top + depth * (self.h - self.top)
        r = self.r0 + depth * (self.rmax - self.r0)
        t = lateral * self.half
        return self.ax + r * math.sin(t), self.ay + r * math.cos(t)

    def contains(self, x: float, y: float) -> bool:
        """Whether pixel coordinates (x, y) fall inside the field of view."""
        col, row = int(x), int(y)
        return 0 <= row < self.h and 0 <= col < self.w and bool(self.fov[row, col])

    def behind(self, m: np.ndarray, gap: float = 0.02) -> np.ndarray:
        """Strength of `m` met earlier along each beam line (the region behind it, not itself)."""
        shift = max(1, int(gap * self.h))
        if not m.any():
            return np.zeros_like(m)
        if self.probe == "linear":
            acc = np.maximum.accumulate(m, axis=0)
            out = np.zeros_like(acc)
            out[shift:] = acc[:-shift]
            return out
        # a half-resolution polar grid: shadows are smooth, this halves the cost
        nr, nt = max(8, self.h // 2), max(8, self.w // 2)
        shift = max(1, shift // 2)
        radii = np.linspace(0, self.rmax, nr, dtype=np.float32)[:, None]
        thetas = np.linspace(-self.half, self.half, nt, dtype=np.float32)[None, :]
        py = self.ay + radii * np.cos(thetas) - 0.5
        px = self.ax + radii * np.sin(thetas) - 0.5
        polar = ndimage.map_coordinates(m, [py, px], order=1, mode="constant")
        acc = np.maximum.accumulate(polar, axis=0)
        out = np.zeros_like(acc)
        out[shift:] = acc[:-shift]
        ri = self.r / self.rmax * (nr - 1)
        ti = (self.th + self.half) / (2 * self.half) * (nt - 1)
        return ndimage.map_coordinates(out, [ri, ti], order=1, mode="nearest")


# ============================================================================ shapes


def ellipse(cv, cx, cy, a, b, angle=0.0):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = cv.X - cx, cv.Y - cy
    u, v = (dx * c + dy * s) / a, (-dx * s + dy * c) / b
    return u * u + v * v <= 1.0


def blob(cv, rng, cx, cy, r, irregular=0.1, spikes=0.0, angle=0.0, aspect=1.0):
    """A star-shaped region whose radius is modulated by random harmonics (spikes: high ones)."""
    dx, dy = cv.X - cx, cv.Y - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, (-dx * s + dy * c) / aspect
    theta = np.arctan2(v, u)
    rad = np.ones_like(theta)
    for k in (2, 3, 5):
        rad += irregular * rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    if spikes:
        rad += spikes * np.abs(np.cos(rng.integers(7, 12) * theta / 2 + rng.uniform(0, np.pi))) ** 6
    return np.hypot(u, v) <= r * rad


def segment_distance(cv, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((cv.X - x0) * dx + (cv.Y - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return np.hypot(cv.X - (x0 + t * dx), cv.Y - (y0 + t * dy))


def smooth_field(cv, rng, cells=6, lo=0.0, hi=1.0):
    small = rng.uniform(lo, hi, size=(cells, cells)).astype(np.float32)
    return np.array(Image.fromarray(small, mode="F").resize((cv.w, cv.h), Image.BICUBIC))


def bbox_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


# ============================================================================ rendering


@dataclass
class Scene:
    """What an organ scene paints; annotations are filled by the task builders."""

    cv: Canvas
    echo: np.ndarray  # tissue echogenicity, ~[0, 1]
    bright: np.ndarray  # reflectors that shadow what lies behind them, [0, 1]
    fluid: np.ndarray  # fluid that enhances what lies behind it, [0, 1]


def new_scene(cv, rng, base=(0.3, 0.55)):
    echo = smooth_field(cv, rng, cells=int(rng.integers(4, 9)), lo=base[0], hi=base[1])
    z = np.zeros((cv.h, cv.w), np.float32)
    return Scene(cv, echo, z.copy(), z.copy())


def paint(sc, mask, value, bright=0.0, fluid=0.0):
    sc.echo[mask] = value
    if bright:
        sc.bright[mask] = np.maximum(sc.bright[mask], bright)
    if fluid:
        sc.fluid[mask] = np.maximum(sc.fluid[mask], fluid)


def render(sc, rng) -> np.ndarray:
    """B-mode rendering of a scene -> uint8 [H, W] (float32 throughout: it is the hot loop)."""
    cv = sc.cv
    f32 = np.float32
    echo = ndimage.gaussian_filter(sc.echo, 0.7, truncate=3.0)
    transmit = 1.0 - f32(0.75) * cv.behind(sc.bright) + f32(0.45) * cv.behind(sc.fluid)
    attenuation = np.exp(f32(-rng.uniform(0.6, 1.6)) * cv.depth) * (1 + f32(rng.uniform(0.0, 0.5)) * cv.depth)
    # correlated complex Gaussian field -> Rayleigh-distributed amplitude (mean normalised to 1)
    sig = (rng.uniform(0.5, 0.9), rng.uniform(0.9, 1.6))
    re = ndimage.gaussian_filter(rng.standard_normal((cv.h, cv.w), dtype=f32), sig, truncate=3.0)
    im = ndimage.gaussian_filter(rng.standard_normal((cv.h, cv.w), dtype=f32), sig, truncate=3.0)
    speckle = np.hypot(re, im)
    speckle *= f32(1.0 / (speckle.mean() + 1e-6))
    intensity = np.maximum(echo * transmit * attenuation, 0) * speckle
    k = f32(rng.uniform(8, 25))
    gain = f32(255.0 * rng.uniform(0.85, 1.1) / math.log1p(k * 1.6))
    img = np.log1p(k * intensity) * gain + rng.standard_normal(intensity.shape, dtype=f32) * f32(3.0)
    img[~cv.fov] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


# ============================================================================ organ scenes
# Each returns (scene, info): info holds the geometry the task builders turn into labels.


def _head(sc, rng, cx, cy, a, b, angle, marker_dir=None):
    """Fetal head: bright skull ring, darker brain, midline echo, optional occiput marker."""
    cv = sc.cv
    t = max(1.5, 0.1 * b)
    outer = ellipse(cv, cx, cy, a, b, angle)
    inner = ellipse(cv, cx, cy, a - t, b - t, angle)
    paint(sc, outer, 0.95, bright=0.6)
    paint(sc, inner, rng.uniform(0.18, 0.3))
    c, s = math.cos(angle), math.sin(angle)
    mid = segment_distance(cv, (cx - 0.7 * a * c, cy - 0.7 * a * s), (cx + 0.7 * a * c, cy + 0.7 * a * s)) < 0.8
    paint(sc, mid & inner, 0.7)
    if marker_dir is not None:
        phi = marker_dir * math.pi / 4  # 0 = right of screen, counter-clockwise in image space
        mx, my = cx + 0.55 * b * math.cos(phi), cy - 0.55 * b * math.sin(phi)
        paint(sc, ellipse(cv, mx, my, 0.34 * b, 0.34 * b), 1.0, bright=0.5)
    return outer


def scene_fetal_head(cv, rng, marker_dir=None):
    sc = new_scene(cv, rng)
    cx, cy = cv.point(rng.uniform(0.4, 0.55), rng.uniform(-0.2, 0.2))
    a = cv.s * rng.uniform(0.24, 0.32)
    b = a * (rng.uniform(0.9, 1.0) if marker_dir is not None else rng.uniform(0.72, 0.9))
    head = _head(sc, rng, cx, cy, a, b, rng.uniform(-0.6, 0.6), marker_dir)
    return sc, {"head": head}


def scene_intrapartum(cv, rng, marker_dir=None, wide=False):
    """Transperineal view: pubic symphysis upper-left, fetal head lower-right. `wide` spreads
    the placement (the landmark task: with the narrow spread the training-mean points are
    already within a few pixels, so there is little to learn beyond the mean)."""
    sc = new_scene(cv, rng)
    for _ in range(20):  # wide: redraw until both symphysis ends (landmarks) are in the field
        if wide:
            sx, sy = cv.point(rng.uniform(0.18, 0.4), rng.uniform(-0.6, -0.15))
        else:
            sx, sy = cv.point(rng.uniform(0.2, 0.3), rng.uniform(-0.55, -0.35))
        length = cv.s * rng.uniform(0.28, 0.36)
        ang = math.radians(rng.uniform(15, 55) if wide else rng.uniform(20, 45))
        half = np.array([math.cos(ang), math.sin(ang)]) * length / 2
        p_up, p_low = (sx - half[0], sy - half[1]), (sx + half[0], sy + half[1])
        if not wide or (cv.contains(*p_up) and cv.contains(*p_low)):
            break
    sym = ellipse(cv, sx, sy, length / 2, cv.s * rng.uniform(0.045, 0.065), ang)
    paint(sc, sym, rng.uniform(0.9, 1.0), bright=0.85)  # bone: bright, with an acoustic shadow
    a = cv.s * rng.uniform(0.2, 0.26)
    b = a * rng.uniform(0.9, 1.0)
    if wide:
        hx, hy = cv.point(rng.uniform(0.52, 0.74), rng.uniform(-0.1, 0.45))
    else:
        hx, hy = cv.point(rng.uniform(0.58, 0.68), rng.uniform(0.05, 0.3))
    head = _head(sc, rng, hx, hy, a, b, rng.uniform(-0.4, 0.4), marker_dir)
    head &= ~sym
    # tangent point: the head contour point seen from the lower symphysis end at the widest
    # angle from the symphysis axis (how the angle of progression is drawn)
    ys, xs = np.nonzero(head ^ ndimage.binary_erosion(head))
    px, py = xs + 0.5, ys + 0.5
    ax_dir = np.array(p_low) - np.array(p_up)
    v = np.stack([px - p_low[0], py - p_low[1]], 1)
    cosang = v @ ax_dir / (np.linalg.norm(v, axis=1) * np.linalg.norm(ax_dir) + 1e-6)
    j = int(np.argmin(cosang))
    tangent = (float(px[j]), float(py[j]))
    return sc, {"symphysis": sym, "head": head, "points": [p_up, p_low, tangent]}


def scene_fetal_abdomen(cv, rng):
    sc = new_scene(cv, rng)
    cx, cy = cv.point(rng.uniform(0.42, 0.55), rng.uniform(-0.2, 0.2))
    a = cv.s * rng.uniform(0.27, 0.34)
    b = a * rng.uniform(0.85, 1.0)
    ang = rng.uniform(0, math.pi)
    abd = ellipse(cv, cx, cy, a, b, ang)
    paint(sc, abd, rng.uniform(0.4, 0.5))
    rim = abd & ~ellipse(cv, cx, cy, a - 1.5, b - 1.5, ang)
    paint(sc, rim, 0.8)
    side = rng.choice([-1, 1])
    st = ellipse(cv, cx + side * 0.35 * a, cy - 0.1 * b, 0.28 * a, 0.2 * b, rng.uniform(0, math.pi)) & abd
    paint(sc, st, 0.04, fluid=0.5)
    uv = segment_distance(cv, (cx - side * 0.15 * a, cy - 0.65 * b), (cx - side * 0.05 * a, cy + 0.05 * b)) < 0.05 * cv.s
    uv &= abd & ~st
    paint(sc, uv, 0.06, fluid=0.3)
    phi = rng.uniform(0.35, 0.65) * math.pi
    spx, spy = cx + 0.7 * a * math.cos(phi), cy + 0.7 * b * math.sin(phi)
    spine = np.zeros_like(abd)
    for d in (-1, 0, 1):
        spine |= ellipse(cv, spx + d * 0.12 * a * math.cos(phi + math.pi / 2),
                         spy + d * 0.12 * a * math.sin(phi + math.pi / 2), 0.07 * a, 0.07 * a)
    spine &= abd
    paint(sc, spine, 1.0, bright=0.9)
    return sc, {"abdomen": abd, "stomach": st, "vein": uv, "spine": spine}


def scene_fetal_thorax(cv, rng):
    sc = new_scene(cv, rng)
    cx, cy = cv.point(rng.uniform(0.42, 0.55), rng.uniform(-0.2, 0.2))
    a = cv.s * rng.uniform(0.27, 0.33)
    thorax = ellipse(cv, cx, cy, a, a * rng.uniform(0.85, 1.0))
    paint(sc, thorax, rng.uniform(0.45, 0.55))
    for k in range(int(rng.integers(3, 6))):
        phi = rng.uniform(0, 2 * math.pi)
        paint(sc, ellipse(cv, cx + 0.95 * a * math.cos(phi), cy + 0.95 * a * math.sin(phi), 0.1 * a, 0.05 * a, phi + math.pi / 2), 0.95, bright=0.8)
    hx, hy = cx + rng.uniform(-0.2, 0.2) * a, cy + rng.uniform(-0.15, 0.15) * a
    hr = a * rng.uniform(0.38, 0.48)
    heart = ellipse(cv, hx, hy, hr, hr * rng.uniform(0.8, 0.95), rng.uniform(0, math.pi)) & thorax
    paint(sc, heart, 0.7)
    for qx in (-1, 1):
        for qy in (-1, 1):
            paint(sc, ellipse(cv, hx + qx * 0.4 * hr, hy + qy * 0.4 * hr, 0.32 * hr, 0.32 * hr) & heart, 0.05, fluid=0.2)
    return sc, {"heart": heart}


def scene_fetal_femur(cv, rng):
    sc = new_scene(cv, rng)
    cx, cy = cv.point(rng.uniform(0.35, 0.55), rng.uniform(-0.15, 0.15))
    length = cv.s * rng.uniform(0.4, 0.6)
    ang = rng.uniform(-0.5, 0.5)
    dx, dy = math.cos(ang) * length / 2, math.sin(ang) * length / 2
    p0, p1 = (cx - dx, cy - dy), (cx + dx, cy + dy)
    paint(sc, ellipse(cv, cx, cy + 0.1 * cv.s, length * 0.7, 0.22 * cv.s, ang), rng.uniform(0.35, 0.45))
    femur = segment_distance(cv, p0, p1) < max(1.5, 0.025 * cv.s)
    paint(sc, femur, 1.0, bright=0.95)
    return sc, {"points": sorted([p0, p1])}  # left to right


def scene_cervix(cv, rng):
    """Transvaginal cervix: elongated echoic body, dark canal; lips either side of it."""
    sc = new_scene(cv, rng, base=(0.25, 0.45))
    cx, cy = cv.point(rng.uniform(0.35, 0.5), rng.uniform(-0.2, 0.2))
    length = cv.s * rng.uniform(0.45, 0.6)
    ang = math.pi / 2 + rng.uniform(-0.7, 0.7)  # roughly along the beam
    body = ellipse(cv, cx, cy, length / 2, cv.s * rng.uniform(0.12, 0.16), ang)
    paint(sc, body, rng.uniform(0.6, 0.72))
    c, s = math.cos(ang), math.sin(ang)
    e0 = (cx - 0.42 * length * c, cy - 0.42 * length * s)
    e1 = (cx + 0.42 * length * c, cy + 0.42 * length * s)
    canal = (segment_distance(cv, e0, e1) < max(1.0, 0.012 * cv.s)) & body
    paint(sc, canal, 0.08)
    side = (cv.X - cx) * (-s) + (cv.Y - cy) * c
    lip_a = body & ~canal & (side < 0)
    lip_b = body & ~canal & (side >= 0)
    near, far = sorted([e0, e1], key=lambda p: p[1])  # point 1 nearer the probe (smaller y)
    return sc, {"cervix": body, "lips": (lip_a, lip_b), "points": [near, far]}


def scene_cardiac(cv, rng):
    sc = new_scene(cv, rng, base=(0.12, 0.25))
    lx, ly = cv.point(rng.uniform(0.32, 0.42), rng.uniform(0.1, 0.3))
    la_, lb_ = cv.s * rng.uniform(0.24, 0.3), cv.s * rng.uniform(0.1, 0.13)
    ang = math.pi / 2 + rng.uniform(-0.3, 0.1)
    myo = ellipse(cv, lx, ly, la_ + 0.04 * cv.s, lb_ + 0.04 * cv.s, ang)
    lv = ellipse(cv, lx, ly, la_, lb_, ang)
    paint(sc, myo, rng.uniform(0.55, 0.7))
    paint(sc, lv, 0.04, fluid=0.2)
    rv = ellipse(cv, lx - 2.4 * lb_, ly - 0.1 * la_, 0.8 * la_, 0.9 * lb_, ang) & ~myo
    paint(sc, rv, 0.05)
    c, s = math.cos(ang), math.sin(ang)
    ax_, ay_ = lx + 1.45 * la_ * c, ly + 1.45 * la_ * s
    la = ellipse(cv, ax_, ay_, 0.45 * la_, 1.05 * lb_, ang) & ~myo
    paint(sc, la, 0.05, fluid=0.2)
    return sc, {"lv": lv, "myo": myo & ~lv, "la": la}


def scene_carotid(cv, rng):
    sc = new_scene(cv, rng)
    cx, cy = cv.point(rng.uniform(0.4, 0.6), rng.uniform(-0.3, 0.3))
    r = cv.s * rng.uniform(0.1, 0.14)
    wall = ellipse(cv, cx, cy, r + max(2, 0.03 * cv.s), r + max(2, 0.03 * cv.s))
    lumen = ellipse(cv, cx, cy, r, r)
    paint(sc, wall, 0.9)
    paint(sc, lumen, 0.03, fluid=0.4)
    side = rng.choice([-1, 1])
    jv = ellipse(cv, cx + side * 2.3 * r, cy - 0.4 * r, 1.3 * r, 0.7 * r, rng.uniform(-0.3, 0.3)) & ~wall
    paint(sc, jv, 0.05, fluid=0.3)
    return sc, {"carotid": wall}


def scene_breast(cv, rng, kind):
    """kind: 0 benign (oval, enhancement), 1 malignant (spiculated, shadow), 2 normal."""
    sc = new_scene(cv, rng, base=(0.35, 0.6))
    paint(sc, cv.Y < cv.top + 0.04 * cv.h if cv.probe == "linear" else cv.depth < 0.04, 0.9)
    for _ in range(int(rng.integers(3, 7))):  # fat lobules
        fx, fy = cv.point(rng.uniform(0.1, 0.35), rng.uniform(-1, 1))
        paint(sc, ellipse(cv, fx, fy, cv.s * rng.uniform(0.08, 0.15), cv.s * 0.05, rng.uniform(-0.3, 0.3)), 0.2)
    paint(sc, cv.depth > rng.uniform(0.8, 0.88), 0.65)  # pectoral muscle
    lesion = np.zeros((cv.h, cv.w), bool)
    if kind != 2:
        lx, ly = cv.point(rng.uniform(0.4, 0.55), rng.uniform(-0.4, 0.4))
        r = cv.s * rng.uniform(0.12, 0.18)
        if kind == 0:  # anechoic, wider than tall, strong posterior enhancement
            lesion = blob(cv, rng, lx, ly, r, irregular=0.05, aspect=rng.uniform(0.5, 0.7))
            paint(sc, lesion, rng.uniform(0.02, 0.08), fluid=0.9)
        else:  # hypoechoic, spiculated, taller than wide, dense posterior shadow
            lesion = blob(cv, rng, lx, ly, r * 0.85, irregular=0.15, spikes=0.6,
                          angle=math.pi / 2, aspect=rng.uniform(0.65, 0.9))
            paint(sc, lesion, rng.uniform(0.14, 0.22), bright=0.9)
    return sc, {"lesion": lesion}


def scene_thyroid(cv, rng):
    sc = new_scene(cv, rng, base=(0.25, 0.4))
    cx, cy = cv.point(rng.uniform(0.42, 0.55), rng.uniform(-0.15, 0.15))
    a, b = cv.s * rng.uniform(0.32, 0.4), cv.s * rng.uniform(0.2, 0.26)
    lobe = ellipse(cv, cx, cy, a, b, rng.uniform(-0.2, 0.2))
    paint(sc, lobe, rng.uniform(0.62, 0.72))
    side = rng.choice([-1, 1])
    paint(sc, ellipse(cv, cx + side * 1.05 * a, cy, 0.22 * b, 0.22 * b) & ~lobe, 0.04, fluid=0.4)  # carotid
    tr = ellipse(cv, cx - side * 1.1 * a, cy - 0.3 * b, 0.35 * b, 0.35 * b)
    paint(sc, tr & ~ellipse(cv, cx - side * 1.1 * a, cy - 0.3 * b, 0.3 * b, 0.3 * b), 0.95, bright=0.9)  # trachea
    nr = b * rng.uniform(0.35, 0.6)
    nx, ny = cx + rng.uniform(-0.4, 0.4) * a, cy + rng.uniform(-0.2, 0.2) * b
    nodule = blob(cv, rng, nx, ny, nr, irregular=0.08, aspect=rng.uniform(0.75, 1.0))
    if rng.random() < 0.6:
        paint(sc, nodule, rng.uniform(0.1, 0.25))
    else:  # isoechoic nodule with a dark halo
        halo = nodule & ~ndimage.binary_erosion(nodule, iterations=2)
        paint(sc, nodule, rng.uniform(0.75, 0.85))
        paint(sc, halo, 0.05)
    if rng.random() < 0.4:  # microcalcifications
        for _ in range(3):
            paint(sc, ellipse(cv, nx + rng.uniform(-0.5, 0.5) * nr, ny + rng.uniform(-0.5, 0.5) * nr, 1.2, 1.2) & nodule, 1.0, bright=0.6)
    return sc, {"nodule": nodule}


def scene_lung(cv, rng, kind):
    """kind: 0 normal (A-lines), 1 B-lines, 2 consolidation."""
    sc = new_scene(cv, rng, base=(0.3, 0.45))
    pleura_y = cv.h * rng.uniform(0.25, 0.35)
    xs = sorted(rng.uniform(0.1, 0.9, size=2) * cv.w)
    if xs[1] - xs[0] < 0.45 * cv.w:
        xs = [0.15 * cv.w, 0.85 * cv.w]
    rib_r = 0.07 * cv.s
    for x in xs:
        paint(sc, ellipse(cv, x, pleura_y - 0.5 * rib_r, rib_r * 1.3, rib_r * 0.8), 0.95, bright=0.97)
    line = np.abs(cv.Y - pleura_y) < max(1.0, 0.012 * cv.h)
    between = (cv.X > xs[0] + rib_r) & (cv.X < xs[1] - rib_r)
    paint(sc, line & between, 1.0)
    below = cv.Y > pleura_y + max(1.0, 0.012 * cv.h)
    paint(sc, below, 0.12)
    if kind == 0:
        for k in (2, 3):
            paint(sc, (np.abs(cv.Y - k * pleura_y) < max(1.5, 0.02 * cv.h)) & between, 0.8 - 0.15 * k)
    elif kind == 1:
        for x in rng.uniform(xs[0] + rib_r, xs[1] - rib_r, size=int(rng.integers(2, 5))):
            paint(sc, (np.abs(cv.X - x) < max(1.5, 0.035 * cv.w)) & below, 0.9)
    else:
        cons = blob(cv, rng, (xs[0] + xs[1]) / 2, pleura_y + 0.22 * cv.h, 0.2 * cv.s, irregular=0.2) & below
        paint(sc, cons, 0.55)
        for _ in range(6):
            paint(sc, ellipse(cv, rng.uniform(xs[0], xs[1]), pleura_y + rng.uniform(0.1, 0.35) * cv.h, 1.5, 1.0) & cons, 1.0)
    shadow = cv.behind(sc.bright) > 0.5
    lung = below & between & ~shadow & cv.fov
    return sc, {"lung": lung}


def scene_liver(cv, rng, kind):
    """kind: 0 benign (hyperechoic, well defined), 1 malignant (hypoechoic with bright halo)."""
    sc = new_scene(cv, rng, base=(0.42, 0.55))
    for _ in range(int(rng.integers(2, 4))):  # vessels
        p0 = cv.point(rng.uniform(0.2, 0.9), rng.uniform(-1, 1))
        p1 = cv.point(rng.uniform(0.2, 0.9), rng.uniform(-1, 1))
        paint(sc, segment_distance(cv, p0, p1) < 0.025 * cv.s, 0.05, fluid=0.2)
    lx, ly = cv.point(rng.uniform(0.35, 0.65), rng.uniform(-0.4, 0.4))
    r = cv.s * rng.uniform(0.08, 0.14)
    lesion = blob(cv, rng, lx, ly, r, irregular=0.08)
    if kind == 0:
        paint(sc, lesion, rng.uniform(1.0, 1.2))
    else:
        paint(sc, blob(cv, rng, lx, ly, r * 1.25, irregular=0.05), 0.85)
        paint(sc, lesion, rng.uniform(0.12, 0.22))
    return sc, {"lesion": lesion}


def scene_ovary(cv, rng):
    sc = new_scene(cv, rng, base=(0.3, 0.45))
    cx, cy = cv.point(rng.uniform(0.4, 0.55), rng.uniform(-0.2, 0.2))
    ov = ellipse(cv, cx, cy, cv.s * 0.38, cv.s * 0.3, rng.uniform(-0.5, 0.5))
    paint(sc, ov, 0.5)
    for _ in range(int(rng.integers(2, 6))):  # follicles
        fx, fy = cx + rng.uniform(-0.3, 0.3) * cv.s, cy + rng.uniform(-0.22, 0.22) * cv.s
        paint(sc, ellipse(cv, fx, fy, 0.035 * cv.s, 0.035 * cv.s) & ov, 0.04, fluid=0.2)
    tx, ty = cx + rng.uniform(-0.12, 0.12) * cv.s, cy + rng.uniform(-0.08, 0.08) * cv.s
    tumor = blob(cv, rng, tx, ty, cv.s * rng.uniform(0.14, 0.2), irregular=0.12)
    paint(sc, tumor, 0.05, fluid=0.6)
    if rng.random() < 0.5:  # septum
        c = rng.uniform(0, math.pi)
        paint(sc, tumor & (np.abs((cv.X - tx) * math.cos(c) + (cv.Y - ty) * math.sin(c)) < 1.0), 0.8)
    if rng.random() < 0.5:  # solid papillary component
        paint(sc, blob(cv, rng, tx + 0.08 * cv.s, ty, 0.06 * cv.s, irregular=0.2) & tumor, 0.6)
    return sc, {"tumor": tumor}


def scene_uterus(cv, rng):
    sc = new_scene(cv, rng, base=(0.25, 0.4))
    cx, cy = cv.point(rng.uniform(0.4, 0.55), rng.uniform(-0.15, 0.15))
    ang = rng.uniform(-0.4, 0.4)
    ut = ellipse(cv, cx, cy, cv.s * 0.4, cv.s * 0.25, ang)
    paint(sc, ut, 0.55)
    c, s = math.cos(ang), math.sin(ang)
    paint(sc, segment_distance(cv, (cx - 0.25 * cv.s * c, cy - 0.25 * cv.s * s), (cx + 0.25 * cv.s * c, cy + 0.25 * cv.s * s)) < 0.02 * cv.s, 0.9)
    fx, fy = cx + rng.uniform(-0.2, 0.2) * cv.s, cy + rng.uniform(-0.1, 0.1) * cv.s
    fr = cv.s * rng.uniform(0.09, 0.15)
    fibroid = ellipse(cv, fx, fy, fr, fr * rng.uniform(0.8, 1.0), rng.uniform(0, math.pi))
    rings = (np.hypot(cv.X - fx, cv.Y - fy) / max(fr, 1) * 4).astype(int) % 2 == 0  # whorls
    paint(sc, fibroid, 0.25)
    paint(sc, fibroid & rings, 0.4)
    edge = fibroid & ~ndimage.binary_erosion(fibroid)
    paint(sc, edge, 0.3, bright=0.4)
    return sc, {"fibroid": fibroid}


def scene_spine(cv, rng):
    """Longitudinal spinal canal: dural lines, dark cord, injury focus inside it."""
    sc = new_scene(cv, rng, base=(0.3, 0.45))
    y0 = cv.h * rng.uniform(0.35, 0.45)
    gap = cv.h * rng.uniform(0.14, 0.2)
    tilt = rng.uniform(-0.1, 0.1)
    yline = y0 + tilt * (cv.X - cv.w / 2)
    paint(sc, np.abs(cv.Y - yline) < 1.2, 0.9)
    paint(sc, np.abs(cv.Y - yline - gap) < 1.2, 0.9)
    cord = (cv.Y > yline + 0.25 * gap) & (cv.Y < yline + 0.75 * gap)
    paint(sc, cord, 0.15)
    for x in np.arange(rng.uniform(0, 0.2) * cv.w, cv.w, 0.28 * cv.w):  # laminae
        paint(sc, ellipse(cv, x, y0 + tilt * (x - cv.w / 2) + 1.8 * gap, 0.08 * cv.w, 0.03 * cv.h), 0.95, bright=0.9)
    ix = rng.uniform(0.25, 0.75) * cv.w
    iy = y0 + tilt * (ix - cv.w / 2) + 0.5 * gap
    injury = blob(cv, rng, ix, iy, cv.s * rng.uniform(0.06, 0.1), irregular=0.2, aspect=rng.uniform(0.5, 0.8))
    paint(sc, injury, 0.7)
    paint(sc, injury & (rng.random((cv.h, cv.w)) < 0.3), 0.35)
    return sc, {"injury": injury}


def scene_other(cv, rng):
    sc = new_scene(cv, rng)
    for _ in range(int(rng.integers(2, 5))):
        x, y = cv.point(rng.uniform(0.2, 0.8), rng.uniform(-0.7, 0.7))
        paint(sc, blob(cv, rng, x, y, cv.s * rng.uniform(0.05, 0.12), irregular=0.2), rng.uniform(0.1, 0.8))
    return sc, {}


def scene_sacrum(cv, rng, direction):
    """Breech pelvis: round pelvis with the bright sacral arc at one of 8 directions."""
    sc = new_scene(cv, rng)
    cx, cy = cv.point(rng.uniform(0.42, 0.55), rng.uniform(-0.15, 0.15))
    r = cv.s * rng.uniform(0.24, 0.3)
    paint(sc, ellipse(cv, cx, cy, r, r * rng.uniform(0.9, 1.0)), rng.uniform(0.15, 0.25))
    phi = direction * math.pi / 4
    theta = np.arctan2(-(cv.Y - cy), cv.X - cx)
    dist = np.hypot(cv.X - cx, cv.Y - cy)
    dphi = np.angle(np.exp(1j * (theta - phi)))
    arc = (np.abs(dist - 0.7 * r) < 0.16 * r) & (np.abs(dphi) < 0.5)
    paint(sc, arc, 1.0, bright=0.8)
    return sc, {}


# ============================================================================ task builders

# Probe per organ (anything else: convex sector): small parts linear, echo phased array.
PROBES = {
    "breast": "linear", "thyroid": "linear", "carotid": "linear", "spine": "linear",
    "cardiac": "phased", "lung": "linear",
}


def _labelmap(h, w, layers):
    out = np.zeros((h, w), np.uint8)
    for value, m in layers:
        out[m] = value
    return out


def build(task_id: str, rng: np.random.Generator, size: tuple[int, int], label: int | None = None):
    """One example of a task: (uint8 image [H, W], annotation in original pixels:
    {"mask": uint8 [H, W]} | {"label": int} | {"box": [x0, y0, x1, y1]} | {"points": [(x, y), ...]}).
    `label` forces the class of a classification example (class-balanced val); default: drawn."""
    h, w = size
    t = task_id
    forced = label

    def draw(k, p=None):
        if forced is not None:
            return int(forced)
        return int(rng.choice(k, p=p)) if p is not None else int(rng.integers(k))

    def canvas(organ):
        return Canvas(h, w, PROBES.get(organ, "convex"), rng)

    if t in ("fetal_head",):
        sc, g = scene_fetal_head(canvas("fetal"), rng)
        ann = {"mask": _labelmap(h, w, [(1, g["head"])])}
    elif t == "fetal_head_pos_cls":
        label = draw(8)
        sc, g = scene_intrapartum(canvas("fetal"), rng, marker_dir=label)
        ann = {"label": label}
    elif t == "head_symphysis_multi":
        sc, g = scene_intrapartum(canvas("fetal"), rng)
        ann = {"mask": _labelmap(h, w, [(2, g["head"]), (1, g["symphysis"])])}
    elif t == "IUGC":
        sc, g = scene_intrapartum(canvas("fetal"), rng, wide=True)
        ann = {"points": g["points"]}
    elif t == "fetal_abdomen_multi":
        sc, g = scene_fetal_abdomen(canvas("fetal"), rng)
        ann = {"mask": _labelmap(h, w, [(1, g["abdomen"]), (2, g["stomach"]), (3, g["vein"]), (4, g["spine"])])}
    elif t == "fetal_heart":
        sc, g = scene_fetal_thorax(canvas("fetal"), rng)
        ann = {"mask": _labelmap(h, w, [(1, g["heart"])])}
    elif t == "fetal_femur":
        sc, g = scene_fetal_femur(canvas("fetal"), rng)
        ann = {"points": g["points"]}
    elif t in ("cervix", "cervix_multi", "FUGC"):
        sc, g = scene_cervix(canvas("cervix"), rng)
        if t == "cervix":
            ann = {"mask": _labelmap(h, w, [(1, g["cervix"])])}
        elif t == "cervix_multi":
            ann = {"mask": _labelmap(h, w, [(1, g["lips"][0]), (2, g["lips"][1])])}
        else:
            ann = {"points": g["points"]}
    elif t == "fetal_plane_cls":
        label = draw(6, p=[0.22, 0.22, 0.18, 0.16, 0.12, 0.10])
        scene = [scene_fetal_abdomen, scene_fetal_head, scene_fetal_femur, scene_fetal_thorax,
                 scene_cervix, scene_other][label]
        sc, g = scene(canvas("cervix" if label == 4 else "fetal"), rng)
        ann = {"label": label}
    elif t == "fetal_sacral_pos_cls":
        label = draw(8)
        sc, g = scene_sacrum(canvas("fetal"), rng, label)
        ann = {"label": label}
    elif t == "cardiac_multi":
        sc, g = scene_cardiac(canvas("cardiac"), rng)
        ann = {"mask": _labelmap(h, w, [(2, g["myo"]), (1, g["lv"]), (3, g["la"])])}
    elif t == "carotid_artery":
        sc, g = scene_carotid(canvas("carotid"), rng)
        ann = {"mask": _labelmap(h, w, [(1, g["carotid"])])}
    elif t in ("breast_lesion", "breast_2cls", "breast_3cls"):
        kind = draw(3 if t == "breast_3cls" else 2) if t != "breast_lesion" else int(rng.integers(2))
        sc, g = scene_breast(canvas("breast"), rng, kind)
        ann = {"mask": _labelmap(h, w, [(1, g["lesion"])])} if t == "breast_lesion" else {"label": kind}
    elif t in ("thyroid_nodule", "thyroid_nodule_det"):
        sc, g = scene_thyroid(canvas("thyroid"), rng)
        ann = {"mask": _labelmap(h, w, [(1, g["nodule"])])} if t == "thyroid_nodule" else {"box": bbox_of(g["nodule"])}
    elif t in ("lung", "lung_2cls", "lung_disease_3cls"):
        kind = draw(3 if t == "lung_disease_3cls" else 2) if t != "lung" else int(rng.integers(3))
        sc, g = scene_lung(canvas("lung"), rng, kind)
        ann = {"mask": _labelmap(h, w, [(1, g["lung"])])} if t == "lung" else {"label": kind}
    elif t == "liver_lesion_2cls":
        label = draw(2)
        sc, g = scene_liver(canvas("liver"), rng, label)
        ann = {"label": label}
    elif t == "organ_cls":
        label = draw(6)
        organ = ["breast", "thyroid", "liver", "lung", "cardiac", "carotid"][label]
        cv = canvas(organ)
        sc, g = {
            0: lambda: scene_breast(cv, rng, int(rng.integers(3))),
            1: lambda: scene_thyroid(cv, rng),
            2: lambda: scene_liver(cv, rng, int(rng.integers(2))),
            3: lambda: scene_lung(cv, rng, int(rng.integers(3))),
            4: lambda: scene_cardiac(cv, rng),
            5: lambda: scene_carotid(cv, rng),
        }[label]()
        ann = {"label": label}
    elif t == "ovary_tumor":
        sc, g = scene_ovary(canvas("ovary"), rng)
        ann = {"mask": _labelmap(h, w, [(1, g["tumor"])])}
    elif t == "uterine_fibroid_det":
        sc, g = scene_uterus(canvas("uterus"), rng)
        ann = {"box": bbox_of(g["fibroid"])}
    elif t == "spinal_cord_injury_loc":
        sc, g = scene_spine(canvas("spine"), rng)
        ann = {"box": bbox_of(g["injury"])}
    else:
        raise KeyError(f"no synthetic generator for task {task_id!r}")
    img = render(sc, rng)
    if "mask" in ann:
        ann["mask"][~sc.cv.fov] = 0
    return img, ann


# ============================================================================ layout and writing

_TYPE_FOLDERS = {"segmentation": "Segmentation", "classification": "Classification",
                 "detection": "Detection", "regression": "Regression"}
_CSV_PREFIX = {"segmentation": "Seg", "classification": "Cls", "detection": "Det", "regression": "Reg"}


def _ext(task_id: str, i: int) -> str:
    """File-type mix: tasks differ (as in the real release), a few tasks mix types."""
    k = sum(map(ord, task_id))
    kinds = [".png", ".jpg", ".png", ".bmp", ".jpeg"]
    main = kinds[k % len(kinds)]
    return [".png", ".jpg"][i % 2] if k % 7 == 0 else main


def _task_folder(spec) -> str:
    t = spec.task_type
    if t in ("segmentation", "classification", "regression"):
        return f"{_TYPE_FOLDERS[t]}/{_COUNT_WORDS.get(spec.num_classes, str(spec.num_classes))}/{spec.task_id}"
    return f"{_TYPE_FOLDERS[t]}/{spec.task_id}"


def csv_name(spec, index: int) -> str:
    """Real-looking CSV names, e.g. `Cls-Eight_15.fetal_head_pos_cls.csv`, `Det_22.x.csv`."""
    prefix = _CSV_PREFIX[spec.task_type]
    if spec.task_type == "detection":
        return f"{prefix}_{index}.{spec.task_id}.csv"
    return f"{prefix}-{_COUNT_WORDS.get(spec.num_classes, str(spec.num_classes))}_{index}.{spec.task_id}.csv"


def task_sizes(scale: float = DEFAULT_SCALE, min_train: int | None = None, min_val: int = MIN_VAL,
               val_fraction: float = VAL_FRACTION, tasks=None) -> dict[str, tuple[int, int]]:
    """{task_id: (n_train, n_val)}: real size x scale (at least the training minimum), val ~
    val_fraction. The default minimum is MIN_TRAIN, raised for the hard tasks by
    MIN_TRAIN_FACTOR; an explicit `min_train` is the same exact minimum for every task."""
    if scale <= 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    out = {}
    for tid in tasks or TASKS:
        minimum = (int(math.ceil(MIN_TRAIN * MIN_TRAIN_FACTOR.get(tid, 1.0)))
                   if min_train is None else min_train)
        n = max(minimum, int(round(TASKS[tid].train_size * scale)))
        out[tid] = (n, max(min_val, int(round(n * val_fraction))))
    return out


def _image_size(rng):
    h = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    w = int(np.clip(round(h * rng.uniform(0.85, 1.4)), SIZE_RANGE[0], SIZE_RANGE[1]))
    return h, w


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def write_task(out: Path, split: str, spec, n: int, seed: int, task_index: int) -> list[dict]:
    """Write `n` examples of one task under out/<split>/ and return their CSV rows."""
    root = out / split
    folder = _task_folder(spec)
    rows = []
    split_code = 0 if split == "train" else 1
    stored_rgb = (task_index % 3) == 0  # some tasks store grayscale as RGB, as in the wild
    for i in range(n):
        rng = np.random.default_rng([seed, task_index, split_code, i])
        balanced = split != "train" and spec.task_type == "classification"
        img, ann = build(spec.task_id, rng, _image_size(rng), label=i % spec.num_classes if balanced else None)
        ext = _ext(spec.task_id, i)
        name = f"{spec.task_id}_{split}_{i:05d}{ext}"
        if spec.task_type == "classification":
            rel = f"{folder}/{ann['label']}/{name}"
        elif spec.task_type == "segmentation":
            rel = f"{folder}/images/{name}"
        else:
            rel = f"{folder}/{name}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray(img, mode="L")
        if stored_rgb:
            pil = pil.convert("RGB")
        if ext in (".jpg", ".jpeg"):
            pil.save(path, quality=92)
        elif ext == ".png":
            pil.save(path, compress_level=1)
        else:
            pil.save(path)
        row = {"image_path": f"../{rel}", "task_id": spec.task_id,
               "task_name": CSV_TASK_NAMES[spec.task_type], "num_classes": spec.num_classes}
        if spec.task_type == "segmentation":
            mrel = f"{folder}/masks/{Path(name).stem}.png"
            (root / mrel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ann["mask"], mode="L").save(root / mrel, compress_level=1)
            row["mask_path"] = f"../{mrel}"
        elif spec.task_type == "classification":
            row["mask"] = ann["label"]
        elif spec.task_type == "detection":
            row.update(zip(("x_min", "y_min", "x_max", "y_max"), map(_fmt, ann["box"])))
        else:
            for k, (x, y) in enumerate(ann["points"], 1):
                row[f"point_{k}_xy"] = json.dumps([round(float(x), 2), round(float(y), 2)])
        rows.append(row)
    return rows


def _columns(spec) -> list[str]:
    base = ["image_path", "task_id", "task_name", "num_classes"]
    extra = {"segmentation": ["mask_path"], "classification": ["mask"],
             "detection": ["x_min", "y_min", "x_max", "y_max"],
             "regression": [f"point_{k}_xy" for k in range(1, spec.num_points + 1)]}[spec.task_type]
    return base + extra


def write_suite(out, scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED, tasks=None,
                min_train: int | None = None, min_val: int = MIN_VAL, workers: int | None = None) -> dict:
    """Write the synthetic suite under `out` (train/ and val/). Returns its summary, also
    written to out/synthetic.json. `tasks` restricts it to some task ids (tests)."""
    out = Path(out)
    task_ids = list(tasks or TASKS)
    unknown = [t for t in task_ids if t not in TASKS]
    if unknown:
        raise KeyError(f"unknown task id(s) {unknown}; the synthetic suite has the 27 FM_UIA tasks")
    sizes = task_sizes(scale, min_train, min_val, tasks=task_ids)
    order = list(TASKS)
    jobs = [(split, tid, n) for tid in task_ids for split, n in zip(("train", "val"), sizes[tid])]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_job, [(str(out), s, t, n, seed, order.index(t)) for s, t, n in jobs]))
    else:
        results = [_job((str(out), s, t, n, seed, order.index(t))) for s, t, n in jobs]
    for (split, tid, _), rows in zip(jobs, results):
        spec = TASKS[tid]
        csv_dir = out / split / "csv_files"
        csv_dir.mkdir(parents=True, exist_ok=True)
        with open(csv_dir / csv_name(spec, order.index(tid) + 1), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_columns(spec))
            writer.writeheader()
            writer.writerows(rows)
    summary = {
        "version": GENERATOR_VERSION, "scale": scale, "seed": seed, "min_train": min_train, "min_val": min_val,
        "sizes": {t: {"train": sizes[t][0], "val": sizes[t][1]} for t in task_ids},
        "total_train": sum(s[0] for s in sizes.values()), "total_val": sum(s[1] for s in sizes.values()),
        "difficulty": {t: DIFFICULTY[t] for t in task_ids},
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1))
    return summary


def _job(args):
    out, split, tid, n, seed, index = args
    return write_task(Path(out), split, TASKS[tid], n, seed, index)


def default_cache_root(scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED) -> Path:
    base = os.environ.get("M2DINO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "m2dino")
    return Path(base) / f"synthetic-{scale:g}-{seed}"


def _is_current(root: Path, scale: float, seed: int) -> bool:
    """A finished suite written by this generator version for this scale and seed."""
    try:
        info = json.loads((root / "synthetic.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == GENERATOR_VERSION and info.get("scale") == scale and info.get("seed") == seed


def ensure_synthetic(root=None, scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED, **kwargs) -> Path:
    """The synthetic suite's root, written once (into a temp dir, then renamed) and reused.

    A finished suite is recognised by its synthetic.json; a crashed write leaves only a temp
    dir, never a half suite at `root`. A suite from another generator version (or scale or
    seed) is replaced, so a seed always means the same data."""
    root = Path(root) if root is not None else default_cache_root(scale, seed)
    if _is_current(root, scale, seed):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "synthetic.json").is_file():
        raise FileExistsError(f"{root} exists and is not a synthetic suite; not overwriting it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    stale = None
    try:
        write_suite(tmp, scale=scale, seed=seed, **kwargs)
        if root.exists():  # an older suite: move it aside, then swap in the new one
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
            try:
                os.rename(root, stale / "old")
            except OSError:
                pass  # a concurrent writer moved it already
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_current(root, scale, seed):  # not a concurrent writer's finished copy
                raise
    finally:
        for leftover in (tmp, stale):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2dino.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (train/ and val/ go inside)")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help=f"fraction of the real FM_UIA training sizes (default {DEFAULT_SCALE}: ~2.6k training images)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--min-train", type=int, default=None,
                   help=f"training minimum per task (default {MIN_TRAIN}, more for the hard tasks)")
    p.add_argument("--min-val", type=int, default=MIN_VAL)
    p.add_argument("--tasks", nargs="*", default=None, help="only these task ids")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} exists and is not empty")
    s = write_suite(out, a.scale, a.seed, tasks=a.tasks, min_train=a.min_train, min_val=a.min_val, workers=a.workers)
    print(f"wrote {s['total_train']} train + {s['total_val']} val images for {len(s['sizes'])} tasks "
          f"to {out} in {s['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
