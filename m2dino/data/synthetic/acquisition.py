"""How each clinical group's scanner turns a scene into pixels: the domain shift between groups.

Every FM_UIA task comes from its own public dataset, acquired on its own machines; here the
tasks of a clinical group share one `Acquisition` (the groups of m2dino/clinical_groups.json)
and the groups differ in it:

- point-spread function: how much the echogenicity map is blurred (`psf`, pixels);
- speckle grain: the correlation lengths of the complex speckle field along and across the
  beam (`grain_axial`, `grain_lateral`, pixels): fine for high-frequency linear probes, coarse
  for abdominal convex ones;
- time-gain curve: depth attenuation `exp(-attenuation * depth)` compensated from a knee
  depth on (`tgc` gain per unit depth beyond `knee`), so each group has its own depth profile;
- log compression (`compression`), overall `gain`, electronic `noise` and near-field clutter
  (`haze`, bright reverberation just below the probe);
- burned-in overlays (`overlay`): a depth ruler, a body marker, a focus marker, a text block,
  an ECG trace, an orientation dot, a grey-scale bar. They never depend on a label.

Each image draws its values uniformly within its group's ranges. `ACQUISITIONS` holds the
profiles by group name; `acquisition_of(task_id)` is a task's profile.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

Range = tuple[float, float]


@dataclass(frozen=True)
class Acquisition:
    """One scanner's rendering ranges (see the module docstring for each field's meaning)."""

    psf: Range
    grain_axial: Range
    grain_lateral: Range
    attenuation: Range
    tgc: Range
    knee: Range
    compression: Range
    gain: Range
    noise: float
    haze: float
    overlay: str

    def to_dict(self) -> dict:
        return asdict(self)


ACQUISITIONS: dict[str, Acquisition] = {
    # abdominal convex probe, low frequency: coarse grain, wide blur, deep TGC ramp, a depth ruler
    "OB": Acquisition(psf=(0.9, 1.2), grain_axial=(0.9, 1.2), grain_lateral=(1.7, 2.3), attenuation=(1.2, 1.6),
                      tgc=(0.8, 1.2), knee=(0.3, 0.45), compression=(8, 12), gain=(0.9, 1.05), noise=3.0,
                      haze=0.0, overlay="ruler"),
    # high-frequency linear probe: fine grain, sharp, strong attenuation, high contrast, a body marker
    "Breast": Acquisition(psf=(0.4, 0.6), grain_axial=(0.45, 0.6), grain_lateral=(0.7, 0.95),
                          attenuation=(1.6, 2.0), tgc=(1.4, 1.9), knee=(0.1, 0.2), compression=(18, 28),
                          gain=(0.85, 0.95), noise=2.0, haze=0.15, overlay="body_marker"),
    # linear probe at lower frequency, flat time-gain curve, a focus marker
    "Lung": Acquisition(psf=(0.7, 0.9), grain_axial=(0.6, 0.8), grain_lateral=(1.1, 1.5), attenuation=(0.5, 0.8),
                        tgc=(0.0, 0.2), knee=(0.5, 0.6), compression=(10, 14), gain=(0.95, 1.1), noise=4.0,
                        haze=0.0, overlay="focus"),
    # small-parts linear probe, bright, a text block in the corner
    "Thyroid": Acquisition(psf=(0.5, 0.7), grain_axial=(0.5, 0.7), grain_lateral=(0.9, 1.2),
                           attenuation=(0.8, 1.1), tgc=(0.4, 0.7), knee=(0.2, 0.3), compression=(14, 20),
                           gain=(1.0, 1.12), noise=2.5, haze=0.05, overlay="text"),
    # cardiac and vascular machine: grainy, strong near-field clutter, an ECG trace
    "Cardiovascular": Acquisition(psf=(0.8, 1.1), grain_axial=(0.7, 1.0), grain_lateral=(1.4, 2.0),
                                  attenuation=(0.9, 1.3), tgc=(0.5, 0.9), knee=(0.25, 0.4), compression=(9, 13),
                                  gain=(0.9, 1.0), noise=3.5, haze=0.3, overlay="ecg"),
    # transvaginal / pelvic probe: dark, low compression, an orientation dot
    "Gynecology": Acquisition(psf=(0.8, 1.0), grain_axial=(0.8, 1.1), grain_lateral=(1.2, 1.6),
                              attenuation=(1.4, 1.9), tgc=(1.0, 1.4), knee=(0.15, 0.3), compression=(6, 9),
                              gain=(0.8, 0.92), noise=3.0, haze=0.1, overlay="orientation_dot"),
    # a general-purpose machine: mid values, a grey-scale bar
    "Other": Acquisition(psf=(0.6, 0.9), grain_axial=(0.55, 0.9), grain_lateral=(0.9, 1.6), attenuation=(0.7, 1.4),
                         tgc=(0.3, 0.8), knee=(0.2, 0.5), compression=(10, 20), gain=(0.9, 1.1), noise=3.0,
                         haze=0.05, overlay="grey_bar"),
}
# The pretraining pool has no group: it draws a profile per image from all of them (suite-free).
DEFAULT_ACQUISITION = "Other"


@lru_cache(maxsize=None)
def acquisition_of(task_id: str) -> Acquisition:
    """The task's clinical group's scanner (the default groups; tasks in none: Other's)."""
    from m2dino.tasks import group_of, load_groups

    return ACQUISITIONS.get(group_of(load_groups()).get(task_id, DEFAULT_ACQUISITION),
                            ACQUISITIONS[DEFAULT_ACQUISITION])


# ============================================================================ overlays
# Burned into the uint8 image after rendering, at the image's edges; labels never see them.


def _ruler(img, rng):
    h, w = img.shape
    x = w - 1 - int(rng.integers(2, 5))
    for y in np.linspace(0.08 * h, 0.95 * h, int(rng.integers(6, 10))):
        img[int(y), max(0, x - 3):x + 1] = 220
    img[int(0.08 * h):int(0.95 * h), x] = 160


def _body_marker(img, rng):
    h, w = img.shape
    s = max(6, int(0.1 * min(h, w)))
    x0 = int(rng.integers(2, 6)) if rng.random() < 0.5 else w - s - int(rng.integers(2, 6))
    y0 = h - s - int(rng.integers(2, 6))
    img[y0, x0:x0 + s] = img[y0 + s - 1, x0:x0 + s] = 200
    img[y0:y0 + s, x0] = img[y0:y0 + s, x0 + s - 1] = 200
    img[y0 + s // 2, x0 + 1:x0 + s - 1] = 255  # the probe's position on the pictogram


def _focus(img, rng):
    h, w = img.shape
    y = int(rng.uniform(0.3, 0.7) * h)
    for k in range(4):
        img[max(0, y - k):y + k + 1, k] = 230


def _text(img, rng):
    h, w = img.shape
    y, x = int(rng.integers(2, 5)), w - int(0.3 * w)
    for line in range(int(rng.integers(2, 4))):
        length = int(rng.uniform(0.12, 0.25) * w)
        img[y + 4 * line:y + 4 * line + 2, x:x + length] = 235


def _ecg(img, rng):
    h, w = img.shape
    xs = np.arange(w)
    base = h - 6
    period = rng.uniform(0.25, 0.4) * w
    phase = rng.uniform(0, period)
    beat = np.exp(-(((xs + phase) % period) - 0.5 * period) ** 2 / 2.0) * 4
    ys = np.clip((base - beat).astype(int), 0, h - 1)
    img[ys, xs] = 200


def _orientation_dot(img, rng):
    h, w = img.shape
    cy, cx = int(rng.integers(4, 8)), int(rng.integers(4, 8))
    img[cy - 2:cy + 3, cx - 2:cx + 3] = 255
    img[int(0.1 * h):int(0.9 * h), 1] = 120


def _grey_bar(img, rng):
    h, w = img.shape
    x0 = int(rng.integers(1, 3))
    top, bottom = int(0.15 * h), int(0.75 * h)
    img[top:bottom, x0:x0 + 3] = np.linspace(255, 0, bottom - top, dtype=np.float32)[:, None].astype(np.uint8)


OVERLAYS = {"ruler": _ruler, "body_marker": _body_marker, "focus": _focus, "text": _text, "ecg": _ecg,
            "orientation_dot": _orientation_dot, "grey_bar": _grey_bar, "none": lambda img, rng: None}


def draw_values(acq: Acquisition, rng: np.random.Generator) -> dict:
    """One image's acquisition values, drawn within the profile's ranges."""
    return {name: float(rng.uniform(*getattr(acq, name)))
            for name in ("psf", "grain_axial", "grain_lateral", "attenuation", "tgc", "knee", "compression", "gain")}


def time_gain(depth: np.ndarray, values: dict) -> np.ndarray:
    """Attenuation times the time-gain compensation ramp from the knee depth on."""
    f32 = np.float32
    ramp = np.maximum(depth - f32(values["knee"]), 0)
    return np.exp(f32(-values["attenuation"]) * depth) * (1 + f32(values["tgc"]) * ramp)


def near_field(depth: np.ndarray, strength: float) -> np.ndarray:
    """Reverberation clutter just below the probe: an additive bright band fading over ~8% depth."""
    return np.float32(strength) * np.exp(-depth / np.float32(0.08)) if strength else np.float32(0)


def overlay(img: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    OVERLAYS[acq.overlay](img, rng)
    return img

