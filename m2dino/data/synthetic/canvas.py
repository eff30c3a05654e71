"""How a B-mode-like image is drawn: the probe's field of view, shapes, painting, rendering.

A `Canvas` is the pixel grid and the probe geometry: a linear probe (a rectangle below the
skin line) or a sector (convex or phased array, a fan from a virtual apex), with `depth` and
`point(depth, lateral)` in field-of-view coordinates. Shapes are boolean masks on it; an
irregular outline (`blob`) takes its harmonics from a `blob_shape` drawn beforehand, so that a
scene's geometry is a function of its latent factors (scenes.py) and not of the painting.
A `Scene` holds three maps that organ scenes `paint`: tissue echogenicity, bright reflectors
and fluid. `render` turns them into B-mode through a scanner's `Acquisition`
(acquisition.py): the point-spread blur, acoustic shadowing behind bright structures and
enhancement behind fluid (propagated along the beam), attenuation and time-gain compensation,
near-field clutter, correlated multiplicative speckle with Rayleigh amplitude statistics and
the scanner's grain, log compression, the scanner's overlay; outside the field of view is black.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from m2dino.data.synthetic.acquisition import Acquisition, draw_values, near_field, overlay, time_gain

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


def blob_shape(rng, irregular=0.1, spikes=0.0) -> dict:
    """An irregular outline's parameters: low harmonics (`irregular`) and sharp high ones (`spikes`)."""
    harmonics = [(k, float(irregular * rng.uniform(-1, 1)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 5)]
    spike = (int(rng.integers(7, 12)), float(spikes), float(rng.uniform(0, np.pi))) if spikes else None
    return {"harmonics": harmonics, "spikes": spike}


def blob(cv, cx, cy, r, shape, angle=0.0, aspect=1.0):
    """A star-shaped region whose radius is modulated by the harmonics of `shape` (blob_shape)."""
    dx, dy = cv.X - cx, cv.Y - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, (-dx * s + dy * c) / aspect
    theta = np.arctan2(v, u)
    rad = np.ones_like(theta)
    for k, amplitude, phase in shape["harmonics"]:
        rad += amplitude * np.cos(k * theta + phase)
    if shape.get("spikes"):
        count, amplitude, phase = shape["spikes"]
        rad += amplitude * np.abs(np.cos(count * theta / 2 + phase)) ** 6
    return np.hypot(u, v) <= r * rad


def segment_distance(cv, p0, p1):
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((cv.X - x0) * dx + (cv.Y - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return np.hypot(cv.X - (x0 + t * dx), cv.Y - (y0 + t * dy))


def smooth_field(cv, rng, cells=6, lo=0.0, hi=1.0):
    small = rng.uniform(lo, hi, size=(cells, cells)).astype(np.float32)
    return np.array(Image.fromarray(small, mode="F").resize((cv.w, cv.h), Image.BICUBIC))


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


def render(sc, rng, acq: Acquisition) -> np.ndarray:
    """B-mode rendering of a scene through a scanner -> uint8 [H, W] (float32 throughout: the hot loop)."""
    cv = sc.cv
    f32 = np.float32
    v = draw_values(acq, rng)
    echo = ndimage.gaussian_filter(sc.echo, v["psf"], truncate=3.0)
    transmit = 1.0 - f32(0.75) * cv.behind(sc.bright) + f32(0.45) * cv.behind(sc.fluid)
    # correlated complex Gaussian field -> Rayleigh-distributed amplitude (mean normalised to 1)
    sig = (v["grain_axial"], v["grain_lateral"])
    re = ndimage.gaussian_filter(rng.standard_normal((cv.h, cv.w), dtype=f32), sig, truncate=3.0)
    im = ndimage.gaussian_filter(rng.standard_normal((cv.h, cv.w), dtype=f32), sig, truncate=3.0)
    speckle = np.hypot(re, im)
    speckle *= f32(1.0 / (speckle.mean() + 1e-6))
    signal = np.maximum(echo * transmit, 0) * time_gain(cv.depth, v) + near_field(cv.depth, acq.haze)
    k = f32(v["compression"])
    gain = f32(255.0 * v["gain"] / math.log1p(k * 1.6))
    img = np.log1p(k * signal * speckle) * gain + rng.standard_normal(signal.shape, dtype=f32) * f32(acq.noise)
    img[~cv.fov] = 0
    return overlay(np.clip(img, 0, 255).astype(np.uint8), acq, rng)
