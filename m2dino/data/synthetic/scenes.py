"""What is drawn: organ scenes from latent factors, and `draw`, one image and label of a task.

A scene family (`FAMILIES`) draws its scene from named latent factors: `sample(cv, rng, given)`
draws every factor of the family that `given` does not fix, and `paint(cv, rng, z)` paints the
scene, drawing only nuisance (tissue texture, distractors) from `rng`; the geometry it returns
is a function of the factors `z` alone. Positions are field-of-view fractions (depth in [0, 1],
lateral in [-1, 1]) and sizes fractions of the image's shorter side, so one factor value means
the same structure on any canvas, in any family that draws it.

A task (`RECIPES`) is a family, the factors its images show (`shows`, drawn anew per image),
the factors its label is a function of (`reads`) and its readout. The families a
classification label chooses between (fetal_plane_cls, organ_cls) are in `identifies`: such a
label says which structure is drawn. `draw(task_id, rng, size, label=None, given=None)` builds
one example through the task's clinical group's scanner (acquisition.py). design.py turns
these recipes into the declared transfer design; tests/data/test_design.py checks that every
label reads exactly the factors declared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage

from m2dino.data.synthetic.acquisition import acquisition_of
from m2dino.data.synthetic.canvas import (
    Canvas,
    blob,
    blob_shape,
    ellipse,
    new_scene,
    paint,
    render,
    segment_distance,
    smooth_field,
)
from m2dino.tasks import TASKS

# ============================================================================ factor helpers


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def _fill(given: dict, draws: dict[str, Callable[[], object]]) -> dict:
    """Every factor of `draws`: the given value where there is one, else its draw. Every factor
    is drawn either way, in order, so fixing one leaves the others' values unchanged."""
    drawn = {name: draw() for name, draw in draws.items()}
    return {name: given[name] if name in given else value for name, value in drawn.items()}


def _centre(cv, f) -> tuple[float, float]:
    return cv.point(f["depth"], f["lateral"])


# ============================================================================ the fetal head


def _skull(rng, depth, lateral, a, ratio, angle=(-0.6, 0.6)) -> dict:
    return {"depth": _u(rng, *depth), "lateral": _u(rng, *lateral), "a": _u(rng, *a), "ratio": _u(rng, *ratio),
            "angle": _u(rng, *angle)}


def _head(sc, rng, skull, position=None):
    """Fetal head: bright skull ring, darker brain, midline echo, optional bony position marker
    (occiput) in one of 8 directions. Returns the skull's outer region (the head's mask)."""
    cv = sc.cv
    cx, cy = _centre(cv, skull)
    a = cv.s * skull["a"]
    b = a * skull["ratio"]
    angle = skull["angle"]
    t = max(1.5, 0.1 * b)
    outer = ellipse(cv, cx, cy, a, b, angle)
    inner = ellipse(cv, cx, cy, a - t, b - t, angle)
    paint(sc, outer, 0.95, bright=0.6)
    paint(sc, inner, rng.uniform(0.18, 0.3))
    c, s = math.cos(angle), math.sin(angle)
    mid = segment_distance(cv, (cx - 0.7 * a * c, cy - 0.7 * a * s), (cx + 0.7 * a * c, cy + 0.7 * a * s)) < 0.8
    paint(sc, mid & inner, 0.7)
    if position is not None:
        phi = position * math.pi / 4  # 0 = right of screen, counter-clockwise in image space
        mx, my = cx + 0.55 * b * math.cos(phi), cy - 0.55 * b * math.sin(phi)
        paint(sc, ellipse(cv, mx, my, 0.34 * b, 0.34 * b), 1.0, bright=0.5)
    return outer


def sample_brain(cv, rng, given):
    return _fill(given, {"fetal_skull": lambda: _skull(rng, (0.4, 0.55), (-0.2, 0.2), (0.24, 0.32), (0.72, 0.9))})


def paint_brain(cv, rng, z):
    sc = new_scene(cv, rng)
    return sc, {"head": _head(sc, rng, z["fetal_skull"])}


def _symphysis(cv, rng, wide: bool) -> dict:
    """Pubic symphysis: a bright bar upper-left. `wide` spreads it (the landmark task: with the
    narrow spread the training-mean points are already within a few pixels) and redraws it
    until both ends (the landmarks) are in the field."""
    for _ in range(20):
        f = {"depth": _u(rng, *((0.12, 0.48) if wide else (0.2, 0.3))),
             "lateral": _u(rng, *((-0.7, 0.0) if wide else (-0.55, -0.35))),
             "length": _u(rng, 0.28, 0.36), "angle": math.radians(_u(rng, *((15, 55) if wide else (20, 45)))),
             "thick": _u(rng, 0.045, 0.065)}
        ends = _symphysis_ends(cv, f)
        if not wide or all(cv.contains(*p) for p in ends):
            return f
    return f


def _symphysis_ends(cv, f):
    sx, sy = _centre(cv, f)
    half = np.array([math.cos(f["angle"]), math.sin(f["angle"])]) * cv.s * f["length"] / 2
    return (float(sx - half[0]), float(sy - half[1])), (float(sx + half[0]), float(sy + half[1]))


def intrapartum_sampler(wide: bool = False, positioned: bool = False):
    """The transperineal view's sampler; `positioned`: an occiput marker in a fetal position."""
    def sample(cv, rng, given):
        skull = ((0.5, 0.8), (-0.2, 0.55)) if wide else ((0.58, 0.68), (0.05, 0.3))
        return _fill(given, {
            "symphysis": lambda: _symphysis(cv, rng, wide),
            "fetal_skull": lambda: _skull(rng, *skull, (0.2, 0.26), (0.9, 1.0), (-0.4, 0.4)),
            "fetal_position": (lambda: int(rng.integers(8))) if positioned else (lambda: None),
        })
    return sample


def paint_intrapartum(cv, rng, z):
    """Transperineal view: pubic symphysis upper-left, fetal head lower-right."""
    sc = new_scene(cv, rng)
    head = _head(sc, rng, z["fetal_skull"], z["fetal_position"])
    f = z["symphysis"]
    p_up, p_low = _symphysis_ends(cv, f)
    sym = ellipse(cv, *_centre(cv, f), cv.s * f["length"] / 2, cv.s * f["thick"], f["angle"])
    paint(sc, sym, rng.uniform(0.9, 1.0), bright=0.85)  # bone: bright, with an acoustic shadow
    head = head & ~sym
    # tangent point: the head contour point seen from the lower symphysis end at the widest
    # angle from the symphysis axis (how the angle of progression is drawn)
    ys, xs = np.nonzero(head ^ ndimage.binary_erosion(head))
    px, py = xs + 0.5, ys + 0.5
    axis = np.array(p_low) - np.array(p_up)
    v = np.stack([px - p_low[0], py - p_low[1]], 1)
    cosang = v @ axis / (np.linalg.norm(v, axis=1) * np.linalg.norm(axis) + 1e-6)
    j = int(np.argmin(cosang))
    return sc, {"symphysis": sym, "head": head, "points": [p_up, p_low, (float(px[j]), float(py[j]))]}


def sample_pelvis(cv, rng, given):
    return _fill(given, {
        "fetal_pelvis": lambda: {"depth": _u(rng, 0.42, 0.55), "lateral": _u(rng, -0.15, 0.15),
                                 "r": _u(rng, 0.24, 0.3), "ratio": _u(rng, 0.9, 1.0)},
        "fetal_position": lambda: int(rng.integers(8)),
    })


def paint_pelvis(cv, rng, z):
    """Breech pelvis: round dark pelvis with the bright sacral arc in the fetal position's direction."""
    sc = new_scene(cv, rng)
    f = z["fetal_pelvis"]
    cx, cy = _centre(cv, f)
    r = cv.s * f["r"]
    paint(sc, ellipse(cv, cx, cy, r, r * f["ratio"]), rng.uniform(0.15, 0.25))
    phi = z["fetal_position"] * math.pi / 4  # the occiput marker's convention
    theta = np.arctan2(-(cv.Y - cy), cv.X - cx)
    dist = np.hypot(cv.X - cx, cv.Y - cy)
    arc = (np.abs(dist - 0.7 * r) < 0.16 * r) & (np.abs(np.angle(np.exp(1j * (theta - phi)))) < 0.5)
    paint(sc, arc, 1.0, bright=0.8)
    return sc, {}


# ============================================================================ other fetal planes


def sample_abdomen(cv, rng, given):
    return _fill(given, {"fetal_abdomen": lambda: {
        "depth": _u(rng, 0.42, 0.55), "lateral": _u(rng, -0.2, 0.2), "a": _u(rng, 0.27, 0.34),
        "ratio": _u(rng, 0.85, 1.0), "angle": _u(rng, 0, math.pi), "side": int(rng.choice([-1, 1])),
        "stomach_angle": _u(rng, 0, math.pi), "spine": _u(rng, 0.35, 0.65) * math.pi}})


def paint_abdomen(cv, rng, z):
    f = z["fetal_abdomen"]
    sc = new_scene(cv, rng)
    cx, cy = _centre(cv, f)
    a = cv.s * f["a"]
    b = a * f["ratio"]
    ang, side = f["angle"], f["side"]
    abd = ellipse(cv, cx, cy, a, b, ang)
    paint(sc, abd, rng.uniform(0.4, 0.5))
    paint(sc, abd & ~ellipse(cv, cx, cy, a - 1.5, b - 1.5, ang), 0.8)
    st = ellipse(cv, cx + side * 0.35 * a, cy - 0.1 * b, 0.28 * a, 0.2 * b, f["stomach_angle"]) & abd
    paint(sc, st, 0.04, fluid=0.5)
    vein_ends = (cx - side * 0.15 * a, cy - 0.65 * b), (cx - side * 0.05 * a, cy + 0.05 * b)
    uv = segment_distance(cv, *vein_ends) < 0.05 * cv.s
    uv &= abd & ~st
    paint(sc, uv, 0.06, fluid=0.3)
    phi = f["spine"]
    spx, spy = cx + 0.7 * a * math.cos(phi), cy + 0.7 * b * math.sin(phi)
    spine = np.zeros_like(abd)
    for d in (-1, 0, 1):
        spine |= ellipse(cv, spx + d * 0.12 * a * math.cos(phi + math.pi / 2),
                         spy + d * 0.12 * a * math.sin(phi + math.pi / 2), 0.07 * a, 0.07 * a)
    spine &= abd
    paint(sc, spine, 1.0, bright=0.9)
    return sc, {"abdomen": abd, "stomach": st, "vein": uv, "spine": spine}


def sample_thorax(cv, rng, given):
    return _fill(given, {"fetal_thorax": lambda: {
        "depth": _u(rng, 0.42, 0.55), "lateral": _u(rng, -0.2, 0.2), "a": _u(rng, 0.27, 0.33),
        "ratio": _u(rng, 0.85, 1.0), "heart_dx": _u(rng, -0.2, 0.2), "heart_dy": _u(rng, -0.15, 0.15),
        "heart_r": _u(rng, 0.38, 0.48), "heart_ratio": _u(rng, 0.8, 0.95), "heart_angle": _u(rng, 0, math.pi)}})


def paint_thorax(cv, rng, z):
    f = z["fetal_thorax"]
    sc = new_scene(cv, rng)
    cx, cy = _centre(cv, f)
    a = cv.s * f["a"]
    thorax = ellipse(cv, cx, cy, a, a * f["ratio"])
    paint(sc, thorax, rng.uniform(0.45, 0.55))
    for _k in range(int(rng.integers(3, 6))):  # ribs (nuisance: they shadow, the mask ignores them)
        phi = rng.uniform(0, 2 * math.pi)
        paint(sc, ellipse(cv, cx + 0.95 * a * math.cos(phi), cy + 0.95 * a * math.sin(phi), 0.1 * a, 0.05 * a,
                          phi + math.pi / 2), 0.95, bright=0.8)
    hx, hy = cx + f["heart_dx"] * a, cy + f["heart_dy"] * a
    hr = a * f["heart_r"]
    heart = ellipse(cv, hx, hy, hr, hr * f["heart_ratio"], f["heart_angle"]) & thorax
    paint(sc, heart, 0.7)
    for qx in (-1, 1):
        for qy in (-1, 1):
            paint(sc, ellipse(cv, hx + qx * 0.4 * hr, hy + qy * 0.4 * hr, 0.32 * hr, 0.32 * hr) & heart, 0.05,
                  fluid=0.2)
    return sc, {"heart": heart}


def sample_femur(cv, rng, given):
    return _fill(given, {"femur": lambda: {"depth": _u(rng, 0.35, 0.55), "lateral": _u(rng, -0.15, 0.15),
                                           "length": _u(rng, 0.4, 0.6), "angle": _u(rng, -0.5, 0.5)}})


def paint_femur(cv, rng, z):
    f = z["femur"]
    sc = new_scene(cv, rng)
    cx, cy = _centre(cv, f)
    length, ang = cv.s * f["length"], f["angle"]
    dx, dy = math.cos(ang) * length / 2, math.sin(ang) * length / 2
    p0, p1 = (cx - dx, cy - dy), (cx + dx, cy + dy)
    paint(sc, ellipse(cv, cx, cy + 0.1 * cv.s, length * 0.7, 0.22 * cv.s, ang), rng.uniform(0.35, 0.45))
    paint(sc, segment_distance(cv, p0, p1) < max(1.5, 0.025 * cv.s), 1.0, bright=0.95)
    return sc, {"points": sorted([p0, p1])}  # left to right


def sample_cervix(cv, rng, given):
    return _fill(given, {"cervix": lambda: {
        "depth": _u(rng, 0.35, 0.5), "lateral": _u(rng, -0.2, 0.2), "length": _u(rng, 0.45, 0.6),
        "width": _u(rng, 0.12, 0.16), "angle": math.pi / 2 + _u(rng, -0.7, 0.7)}})  # roughly along the beam


def paint_cervix(cv, rng, z):
    """Transvaginal cervix: elongated echoic body, dark canal; lips either side of it."""
    f = z["cervix"]
    sc = new_scene(cv, rng, base=(0.25, 0.45))
    cx, cy = _centre(cv, f)
    length, ang = cv.s * f["length"], f["angle"]
    body = ellipse(cv, cx, cy, length / 2, cv.s * f["width"], ang)
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


def sample_nothing(cv, rng, given):
    return {}


def paint_other(cv, rng, z):
    """A plane showing none of the structures (fetal_plane_cls 'other'): a few random blobs."""
    sc = new_scene(cv, rng)
    for _ in range(int(rng.integers(2, 5))):
        x, y = cv.point(rng.uniform(0.2, 0.8), rng.uniform(-0.7, 0.7))
        paint(sc, blob(cv, x, y, cv.s * rng.uniform(0.05, 0.12), blob_shape(rng, 0.2)), rng.uniform(0.1, 0.8))
    return sc, {}


# ============================================================================ breast: the designed conflict
# The posterior feature and the echotexture are two cues of one clinical variable (malignancy):
# breast_2cls reads the posterior feature (enhancement benign, shadowing malignant), breast_3cls
# the echotexture. In breast_2cls's training images the echotexture always agrees with its label
# (the cues co-occur, a shortcut); in its validation images and in every other task's they vary
# independently. So breast_2cls must ignore the very cue breast_3cls learns to read: the
# designed conflict. breast_lesion's mask follows the margin and ignores both.

MARGINS = ("circumscribed", "spiculated")
ECHOTEXTURES = ("homogeneous", "heterogeneous")
POSTERIOR = ("none", "enhancement", "shadowing")


def breast_sampler(present=None):
    """`present`: force a lesion (True), none (False), or draw it (None: 2 in 3 images)."""
    def sample(cv, rng, given):
        return _fill(given, {
            "breast_lesion": lambda: {
                "present": bool(rng.random() < 2 / 3) if present is None else present,
                "depth": _u(rng, 0.4, 0.55), "lateral": _u(rng, -0.4, 0.4), "r": _u(rng, 0.15, 0.2),
                "aspect": _u(rng, 0.55, 1.0), "angle": _u(rng, 0, math.pi), "shape": blob_shape(rng, 0.05)},
            "margin": lambda: {"kind": int(rng.integers(2)), "spikes": blob_shape(rng, 0.0, _u(rng, 0.9, 1.2))},
            "echotexture": lambda: {"kind": int(rng.integers(2)),
                                    "foci": [(_u(rng, -0.55, 0.55), _u(rng, -0.55, 0.55))
                                             for _ in range(int(rng.integers(4, 7)))]},
            "posterior": lambda: int(rng.integers(3)),
        })
    return sample


def breast_outline(cv, z):
    """The lesion's region: the lesion's place and size, its outline spiculated or not by the margin."""
    f, margin = z["breast_lesion"], z["margin"]
    if not f["present"]:
        return np.zeros((cv.h, cv.w), bool)
    shape = dict(f["shape"])
    if margin["kind"] == 1:  # spiculated: irregular low harmonics and sharp spikes
        shape = {"harmonics": [(k, 3 * a, p) for k, a, p in shape["harmonics"]], "spikes": margin["spikes"]["spikes"]}
    return blob(cv, *_centre(cv, f), cv.s * f["r"] * (0.85 if margin["kind"] else 1.0), shape,
                angle=f["angle"], aspect=f["aspect"])


def paint_breast(cv, rng, z):
    sc = new_scene(cv, rng, base=(0.35, 0.6))
    paint(sc, cv.Y < cv.top + 0.04 * cv.h if cv.probe == "linear" else cv.depth < 0.04, 0.9)  # skin
    for _ in range(int(rng.integers(3, 7))):  # fat lobules
        fx, fy = cv.point(rng.uniform(0.1, 0.35), rng.uniform(-1, 1))
        paint(sc, ellipse(cv, fx, fy, cv.s * rng.uniform(0.08, 0.15), cv.s * 0.05, rng.uniform(-0.3, 0.3)), 0.2)
    paint(sc, cv.depth > rng.uniform(0.8, 0.88), 0.65)  # pectoral muscle
    lesion = breast_outline(cv, z)
    if lesion.any():
        posterior = POSTERIOR[z["posterior"]]
        echo = rng.uniform(0.08, 0.18)
        paint(sc, lesion, echo, fluid=0.6 if posterior == "enhancement" else 0.0,
              bright=0.45 if posterior == "shadowing" else 0.0)
        if z["echotexture"]["kind"] == 1:  # heterogeneous: mottled interior with echogenic foci
            f = z["breast_lesion"]
            cx, cy = _centre(cv, f)
            r = cv.s * f["r"]
            mottle = smooth_field(cv, rng, cells=int(rng.integers(8, 12)), lo=0.03, hi=0.2)
            sc.echo[lesion] = mottle[lesion]
            for u, v in z["echotexture"]["foci"]:
                focus = ellipse(cv, cx + u * r, cy + v * r, max(1.2, 0.03 * cv.s), max(1.2, 0.03 * cv.s)) & lesion
                paint(sc, focus, 1.0)
    return sc, {"lesion": lesion}


# ============================================================================ other organs


def sample_thyroid(cv, rng, given):
    return _fill(given, {
        "thyroid_lobe": lambda: {"depth": _u(rng, 0.44, 0.52), "lateral": _u(rng, -0.1, 0.1),
                                 "a": _u(rng, 0.34, 0.4), "b": _u(rng, 0.22, 0.26), "angle": _u(rng, -0.2, 0.2),
                                 "side": int(rng.choice([-1, 1]))},
        "thyroid_nodule": lambda: {"depth": _u(rng, 0.4, 0.56), "lateral": _u(rng, -0.25, 0.25),
                                   "r": _u(rng, 0.08, 0.14), "aspect": _u(rng, 0.75, 1.0),
                                   "shape": blob_shape(rng, 0.08),
                                   "kind": "hypoechoic" if rng.random() < 0.6 else "halo"},
    })


def paint_thyroid(cv, rng, z):
    lobe_f, nod = z["thyroid_lobe"], z["thyroid_nodule"]
    sc = new_scene(cv, rng, base=(0.25, 0.4))
    cx, cy = _centre(cv, lobe_f)
    a, b, side = cv.s * lobe_f["a"], cv.s * lobe_f["b"], lobe_f["side"]
    lobe = ellipse(cv, cx, cy, a, b, lobe_f["angle"])
    paint(sc, lobe, rng.uniform(0.62, 0.72))
    paint(sc, ellipse(cv, cx + side * 1.05 * a, cy, 0.22 * b, 0.22 * b) & ~lobe, 0.04, fluid=0.4)  # carotid
    ring = ellipse(cv, cx - side * 1.1 * a, cy - 0.3 * b, 0.35 * b, 0.35 * b)
    paint(sc, ring & ~ellipse(cv, cx - side * 1.1 * a, cy - 0.3 * b, 0.3 * b, 0.3 * b), 0.95, bright=0.9)  # trachea
    nx, ny = _centre(cv, nod)
    nr = cv.s * nod["r"]
    nodule = blob(cv, nx, ny, nr, nod["shape"], aspect=nod["aspect"])
    if nod["kind"] == "hypoechoic":
        paint(sc, nodule, rng.uniform(0.1, 0.25))
    else:  # isoechoic nodule with a dark halo
        paint(sc, nodule, rng.uniform(0.75, 0.85))
        paint(sc, nodule & ~ndimage.binary_erosion(nodule, iterations=2), 0.05)
    if rng.random() < 0.4:  # microcalcifications
        for _ in range(3):
            paint(sc, ellipse(cv, nx + rng.uniform(-0.5, 0.5) * nr, ny + rng.uniform(-0.5, 0.5) * nr, 1.2, 1.2)
                  & nodule, 1.0, bright=0.6)
    return sc, {"nodule": nodule}


LUNG_PATTERNS = ("a_lines", "b_lines", "consolidation")
LUNG_CONTRAST = (0.12, 0.4)


def lung_sampler(kinds=3):
    def sample(cv, rng, given):
        return _fill(given, {
            "pleura": lambda: {"depth": _u(rng, 0.25, 0.35), "ribs": sorted(_u(rng, 0.1, 0.9) for _ in range(2))},
            "lung_pattern": lambda: {"kind": int(rng.integers(kinds)), "contrast": _u(rng, *LUNG_CONTRAST),
                                     "lines": [_u(rng, 0, 1) for _ in range(int(rng.integers(2, 5)))],
                                     "shape": blob_shape(rng, 0.2), "bronchograms": [
                                         (_u(rng, 0, 1), _u(rng, 0.1, 0.35)) for _ in range(6)]},
        })
    return sample


def paint_lung(cv, rng, z):
    pl, pattern = z["pleura"], z["lung_pattern"]
    sc = new_scene(cv, rng, base=(0.3, 0.45))
    pleura_y = cv.h * pl["depth"]
    xs = [x * cv.w for x in pl["ribs"]]
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
    left, right = xs[0] + rib_r, xs[1] - rib_r
    level = 0.12 + pattern["contrast"] * 0.8
    if pattern["kind"] == 0:  # A-lines: horizontal reverberations of the pleura
        for k in (2, 3):
            paint(sc, (np.abs(cv.Y - k * pleura_y) < max(1.5, 0.02 * cv.h)) & between, level)
    elif pattern["kind"] == 1:  # B-lines: vertical comet tails
        for u in pattern["lines"]:
            paint(sc, (np.abs(cv.X - (left + u * (right - left))) < max(1.5, 0.02 * cv.w)) & below, level)
    else:  # subpleural consolidation with bright air bronchograms
        cons = blob(cv, (xs[0] + xs[1]) / 2, pleura_y + 0.22 * cv.h, 0.2 * cv.s, pattern["shape"]) & below
        paint(sc, cons, 0.55)
        for u, d in pattern["bronchograms"]:
            paint(sc, ellipse(cv, xs[0] + u * (xs[1] - xs[0]), pleura_y + d * cv.h, 1.5, 1.0) & cons, 1.0)
    shadow = cv.behind(sc.bright) > 0.5
    return sc, {"lung": below & between & ~shadow & cv.fov}


def sample_liver(cv, rng, given):
    return _fill(given, {"liver_lesion": lambda: {
        "kind": int(rng.integers(2)), "depth": _u(rng, 0.35, 0.65), "lateral": _u(rng, -0.4, 0.4),
        "r": _u(rng, 0.08, 0.14), "shape": blob_shape(rng, 0.08), "halo": blob_shape(rng, 0.05)}})


def paint_liver(cv, rng, z):
    """kind 0 benign (hyperechoic, well defined), 1 malignant (hypoechoic with a bright halo)."""
    f = z["liver_lesion"]
    sc = new_scene(cv, rng, base=(0.42, 0.55))
    for _ in range(int(rng.integers(2, 4))):  # vessels
        p0 = cv.point(rng.uniform(0.2, 0.9), rng.uniform(-1, 1))
        p1 = cv.point(rng.uniform(0.2, 0.9), rng.uniform(-1, 1))
        paint(sc, segment_distance(cv, p0, p1) < 0.025 * cv.s, 0.05, fluid=0.2)
    lx, ly = _centre(cv, f)
    r = cv.s * f["r"]
    lesion = blob(cv, lx, ly, r, f["shape"])
    if f["kind"] == 0:
        paint(sc, lesion, rng.uniform(1.0, 1.2))
    else:
        paint(sc, blob(cv, lx, ly, r * 1.25, f["halo"]), 0.85)
        paint(sc, lesion, rng.uniform(0.12, 0.22))
    return sc, {"lesion": lesion}


def sample_cardiac(cv, rng, given):
    return _fill(given, {"cardiac_chambers": lambda: {
        "depth": _u(rng, 0.32, 0.42), "lateral": _u(rng, 0.1, 0.3), "length": _u(rng, 0.24, 0.3),
        "width": _u(rng, 0.1, 0.13), "angle": math.pi / 2 + _u(rng, -0.3, 0.1)}})


def paint_cardiac(cv, rng, z):
    f = z["cardiac_chambers"]
    sc = new_scene(cv, rng, base=(0.12, 0.25))
    lx, ly = _centre(cv, f)
    la_, lb_, ang = cv.s * f["length"], cv.s * f["width"], f["angle"]
    myo = ellipse(cv, lx, ly, la_ + 0.04 * cv.s, lb_ + 0.04 * cv.s, ang)
    lv = ellipse(cv, lx, ly, la_, lb_, ang)
    paint(sc, myo, rng.uniform(0.55, 0.7))
    paint(sc, lv, 0.04, fluid=0.2)
    paint(sc, ellipse(cv, lx - 2.4 * lb_, ly - 0.1 * la_, 0.8 * la_, 0.9 * lb_, ang) & ~myo, 0.05)  # RV
    c, s = math.cos(ang), math.sin(ang)
    la = ellipse(cv, lx + 1.45 * la_ * c, ly + 1.45 * la_ * s, 0.45 * la_, 1.05 * lb_, ang) & ~myo
    paint(sc, la, 0.05, fluid=0.2)
    return sc, {"lv": lv, "myo": myo & ~lv, "la": la}


def sample_carotid(cv, rng, given):
    return _fill(given, {"carotid_vessel": lambda: {"depth": _u(rng, 0.4, 0.6), "lateral": _u(rng, -0.3, 0.3),
                                                    "r": _u(rng, 0.1, 0.14)}})


def paint_carotid(cv, rng, z):
    f = z["carotid_vessel"]
    sc = new_scene(cv, rng)
    cx, cy = _centre(cv, f)
    r = cv.s * f["r"]
    wall = ellipse(cv, cx, cy, r + max(2, 0.03 * cv.s), r + max(2, 0.03 * cv.s))
    paint(sc, wall, 0.9)
    paint(sc, ellipse(cv, cx, cy, r, r), 0.03, fluid=0.4)
    side = rng.choice([-1, 1])  # the jugular vein (oval, thin wall): a distractor
    jv = ellipse(cv, cx + side * 2.3 * r, cy - 0.4 * r, 1.3 * r, 0.7 * r, rng.uniform(-0.3, 0.3)) & ~wall
    paint(sc, jv, 0.05, fluid=0.3)
    return sc, {"carotid": wall}


def sample_ovary(cv, rng, given):
    return _fill(given, {"ovarian_mass": lambda: {"depth": _u(rng, 0.38, 0.57), "lateral": _u(rng, -0.25, 0.25),
                                                  "r": _u(rng, 0.14, 0.2), "shape": blob_shape(rng, 0.12)}})


def paint_ovary(cv, rng, z):
    f = z["ovarian_mass"]
    sc = new_scene(cv, rng, base=(0.3, 0.45))
    cx, cy = cv.point(rng.uniform(0.4, 0.55), rng.uniform(-0.2, 0.2))
    ov = ellipse(cv, cx, cy, cv.s * 0.38, cv.s * 0.3, rng.uniform(-0.5, 0.5))
    paint(sc, ov, 0.5)
    for _ in range(int(rng.integers(2, 6))):  # follicles
        fx, fy = cx + rng.uniform(-0.3, 0.3) * cv.s, cy + rng.uniform(-0.22, 0.22) * cv.s
        paint(sc, ellipse(cv, fx, fy, 0.035 * cv.s, 0.035 * cv.s) & ov, 0.04, fluid=0.2)
    tx, ty = _centre(cv, f)
    tumor = blob(cv, tx, ty, cv.s * f["r"], f["shape"])
    paint(sc, tumor, 0.05, fluid=0.6)
    if rng.random() < 0.5:  # septum
        c = rng.uniform(0, math.pi)
        paint(sc, tumor & (np.abs((cv.X - tx) * math.cos(c) + (cv.Y - ty) * math.sin(c)) < 1.0), 0.8)
    if rng.random() < 0.5:  # solid papillary component
        paint(sc, blob(cv, tx + 0.08 * cv.s, ty, 0.06 * cv.s, blob_shape(rng, 0.2)) & tumor, 0.6)
    return sc, {"tumor": tumor}


def sample_uterus(cv, rng, given):
    return _fill(given, {"fibroid": lambda: {"depth": _u(rng, 0.35, 0.6), "lateral": _u(rng, -0.35, 0.35),
                                             "r": _u(rng, 0.09, 0.15), "ratio": _u(rng, 0.8, 1.0),
                                             "angle": _u(rng, 0, math.pi)}})


def paint_uterus(cv, rng, z):
    f = z["fibroid"]
    sc = new_scene(cv, rng, base=(0.25, 0.4))
    cx, cy = cv.point(rng.uniform(0.4, 0.55), rng.uniform(-0.15, 0.15))
    ang = rng.uniform(-0.4, 0.4)
    paint(sc, ellipse(cv, cx, cy, cv.s * 0.4, cv.s * 0.25, ang), 0.55)
    c, s = math.cos(ang), math.sin(ang)
    paint(sc, segment_distance(cv, (cx - 0.25 * cv.s * c, cy - 0.25 * cv.s * s),
                               (cx + 0.25 * cv.s * c, cy + 0.25 * cv.s * s)) < 0.02 * cv.s, 0.9)  # endometrium
    fx, fy = _centre(cv, f)
    fr = cv.s * f["r"]
    fibroid = ellipse(cv, fx, fy, fr, fr * f["ratio"], f["angle"])
    rings = (np.hypot(cv.X - fx, cv.Y - fy) / max(fr, 1) * 4).astype(int) % 2 == 0  # whorls
    paint(sc, fibroid, 0.25)
    paint(sc, fibroid & rings, 0.4)
    paint(sc, fibroid & ~ndimage.binary_erosion(fibroid), 0.3, bright=0.4)
    return sc, {"fibroid": fibroid}


def sample_spine(cv, rng, given):
    return _fill(given, {"spinal_cord": lambda: {
        "depth": _u(rng, 0.35, 0.45), "gap": _u(rng, 0.14, 0.2), "tilt": _u(rng, -0.1, 0.1),
        "injury_x": _u(rng, 0.25, 0.75), "injury_r": _u(rng, 0.06, 0.1), "aspect": _u(rng, 0.5, 0.8),
        "shape": blob_shape(rng, 0.2)}})


def paint_spine(cv, rng, z):
    """Longitudinal spinal canal: dural lines, dark cord, injury focus inside it."""
    f = z["spinal_cord"]
    sc = new_scene(cv, rng, base=(0.3, 0.45))
    y0, gap, tilt = cv.h * f["depth"], cv.h * f["gap"], f["tilt"]
    yline = y0 + tilt * (cv.X - cv.w / 2)
    paint(sc, np.abs(cv.Y - yline) < 1.2, 0.9)
    paint(sc, np.abs(cv.Y - yline - gap) < 1.2, 0.9)
    paint(sc, (cv.Y > yline + 0.25 * gap) & (cv.Y < yline + 0.75 * gap), 0.15)
    for x in np.arange(rng.uniform(0, 0.2) * cv.w, cv.w, 0.28 * cv.w):  # laminae
        paint(sc, ellipse(cv, x, y0 + tilt * (x - cv.w / 2) + 1.8 * gap, 0.08 * cv.w, 0.03 * cv.h), 0.95, bright=0.9)
    ix = f["injury_x"] * cv.w
    iy = y0 + tilt * (ix - cv.w / 2) + 0.5 * gap
    injury = blob(cv, ix, iy, cv.s * f["injury_r"], f["shape"], aspect=f["aspect"])
    paint(sc, injury, 0.7)
    paint(sc, injury & (rng.random((cv.h, cv.w)) < 0.3), 0.35)
    return sc, {"injury": injury}


# ============================================================================ families and recipes


class Family(NamedTuple):
    """A scene family: its probe, the sampler of its factors, its painter, and the anatomy that
    identifies it (the factor a plane or organ classifier must recognise; None: nothing a label reads)."""

    probe: str
    sample: Callable
    paint: Callable
    anatomy: str | None


FAMILIES: dict[str, Family] = {
    "fetal_brain": Family("convex", sample_brain, paint_brain, "fetal_skull"),
    "intrapartum": Family("convex", intrapartum_sampler(), paint_intrapartum, None),
    "fetal_pelvis": Family("convex", sample_pelvis, paint_pelvis, None),
    "fetal_abdomen": Family("convex", sample_abdomen, paint_abdomen, "fetal_abdomen"),
    "fetal_thorax": Family("convex", sample_thorax, paint_thorax, "fetal_thorax"),
    "fetal_femur": Family("convex", sample_femur, paint_femur, "femur"),
    "cervix": Family("convex", sample_cervix, paint_cervix, "cervix"),
    "fetal_other": Family("convex", sample_nothing, paint_other, None),
    "breast": Family("linear", breast_sampler(), paint_breast, None),
    "thyroid": Family("linear", sample_thyroid, paint_thyroid, "thyroid_lobe"),
    "lung": Family("linear", lung_sampler(), paint_lung, "pleura"),
    "liver": Family("convex", sample_liver, paint_liver, None),
    "cardiac": Family("phased", sample_cardiac, paint_cardiac, "cardiac_chambers"),
    "carotid": Family("linear", sample_carotid, paint_carotid, "carotid_vessel"),
    "ovary": Family("convex", sample_ovary, paint_ovary, None),
    "uterus": Family("convex", sample_uterus, paint_uterus, None),
    "spine": Family("linear", sample_spine, paint_spine, None),
}


def bbox_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _labelmap(layers):
    out = np.zeros(layers[0][1].shape, np.uint8)
    for value, m in layers:
        out[m] = value
    return out


def _mask(*names):
    """Readout: an index mask whose class i+1 is geometry `names[i]` (later classes drawn over earlier)."""
    def readout(geo, z):
        return {"mask": _labelmap([(i + 1, geo[n]) for i, n in enumerate(names)])}
    return readout


def _box(name):
    return lambda geo, z: {"box": bbox_of(geo[name])}


def _points(geo, z):
    return {"points": geo["points"]}


def _factor_label(factor, key="kind"):
    return lambda geo, z: {"label": int(z[factor][key] if key else z[factor])}


@dataclass(frozen=True)
class Recipe:
    """How a task's examples are drawn and labelled.

    family: its scene family, or for a classifier of scenes, one family per class (`identifies`);
    shows: factors drawn anew in its images; reads: the factors its label is a function of;
    readout(geometry, z) -> annotation; given(label) -> the factor values that realise a class
    (classification: the class is drawn first, then the scene); train_given(label) -> values a
    class also fixes in the training split only (a cue that co-occurs with the label there and not
    in validation: a shortcut); sample: the family's sampler with this task's ranges (default: the
    family's)."""

    family: str | tuple[str, ...]
    shows: tuple[str, ...]
    reads: tuple[str, ...]
    readout: Callable
    given: Callable[[int], dict] | None = None
    train_given: Callable[[int], dict] | None = None  # more of a class's values, in training images only
    sample: Callable | None = None
    class_weights: tuple[float, ...] | None = None

    @property
    def identifies(self) -> tuple[str, ...]:
        return self.family if isinstance(self.family, tuple) else ()


_BREAST = ("breast_lesion", "margin", "echotexture", "posterior")
_INTRAPARTUM = ("fetal_skull", "symphysis")


def _breast_3cls(label):  # 0 benign (homogeneous), 1 malignant (heterogeneous), 2 normal (no lesion)
    if label == 2:
        return {"breast_lesion": {"present": False}}
    return {"breast_lesion": {"present": True}, "echotexture": {"kind": label}}


def _kind(factor):
    return lambda label: {factor: {"kind": label}}


def _breast_2cls(label):  # 0 benign (posterior enhancement), 1 malignant (posterior shadowing)
    return {"posterior": POSTERIOR.index("enhancement") + label}


def _posterior_label(geo, z):
    return {"label": z["posterior"] - POSTERIOR.index("enhancement")}


RECIPES: dict[str, Recipe] = {
    "fetal_head": Recipe("fetal_brain", ("fetal_skull",), ("fetal_skull",), _mask("head")),
    "head_symphysis_multi": Recipe("intrapartum", _INTRAPARTUM, _INTRAPARTUM, _mask("symphysis", "head")),
    "IUGC": Recipe("intrapartum", _INTRAPARTUM, _INTRAPARTUM, _points, sample=intrapartum_sampler(wide=True)),
    "fetal_head_pos_cls": Recipe("intrapartum", (*_INTRAPARTUM, "fetal_position"), ("fetal_position",),
                                 _factor_label("fetal_position", None), given=lambda k: {"fetal_position": k},
                                 sample=intrapartum_sampler(positioned=True)),
    "fetal_sacral_pos_cls": Recipe("fetal_pelvis", ("fetal_pelvis", "fetal_position"), ("fetal_position",),
                                   _factor_label("fetal_position", None), given=lambda k: {"fetal_position": k}),
    "fetal_abdomen_multi": Recipe("fetal_abdomen", ("fetal_abdomen",), ("fetal_abdomen",),
                                  _mask("abdomen", "stomach", "vein", "spine")),
    "fetal_heart": Recipe("fetal_thorax", ("fetal_thorax",), ("fetal_thorax",), _mask("heart")),
    "fetal_femur": Recipe("fetal_femur", ("femur",), ("femur",), _points),
    "cervix": Recipe("cervix", ("cervix",), ("cervix",), _mask("cervix")),
    "cervix_multi": Recipe("cervix", ("cervix",), ("cervix",),
                           lambda geo, z: {"mask": _labelmap([(1, geo["lips"][0]), (2, geo["lips"][1])])}),
    "FUGC": Recipe("cervix", ("cervix",), ("cervix",), _points),
    "fetal_plane_cls": Recipe(("fetal_abdomen", "fetal_brain", "fetal_femur", "fetal_thorax", "cervix", "fetal_other"),
                              (), (), None, class_weights=(0.22, 0.22, 0.18, 0.16, 0.12, 0.10)),
    "breast_lesion": Recipe("breast", _BREAST, ("breast_lesion", "margin"), _mask("lesion"),
                            sample=breast_sampler(present=True)),
    "breast_2cls": Recipe("breast", _BREAST, ("posterior",), _posterior_label, given=_breast_2cls,
                          train_given=_kind("echotexture"), sample=breast_sampler(present=True)),
    "breast_3cls": Recipe("breast", _BREAST, ("breast_lesion", "echotexture"),
                          lambda geo, z: {"label": 2 if not z["breast_lesion"]["present"]
                                          else int(z["echotexture"]["kind"])}, given=_breast_3cls),
    "thyroid_nodule": Recipe("thyroid", ("thyroid_lobe", "thyroid_nodule"), ("thyroid_nodule",), _mask("nodule")),
    "thyroid_nodule_det": Recipe("thyroid", ("thyroid_lobe", "thyroid_nodule"), ("thyroid_nodule",), _box("nodule")),
    "lung": Recipe("lung", ("pleura", "lung_pattern"), ("pleura",), _mask("lung")),
    "lung_2cls": Recipe("lung", ("pleura", "lung_pattern"), ("lung_pattern",), _factor_label("lung_pattern"),
                        given=_kind("lung_pattern"), sample=lung_sampler(kinds=2)),
    "lung_disease_3cls": Recipe("lung", ("pleura", "lung_pattern"), ("lung_pattern",), _factor_label("lung_pattern"),
                                given=_kind("lung_pattern")),
    "liver_lesion_2cls": Recipe("liver", ("liver_lesion",), ("liver_lesion",), _factor_label("liver_lesion"),
                                given=_kind("liver_lesion")),
    "organ_cls": Recipe(("breast", "thyroid", "liver", "lung", "cardiac", "carotid"), (), (), None),
    "cardiac_multi": Recipe("cardiac", ("cardiac_chambers",), ("cardiac_chambers",), _mask("lv", "myo", "la")),
    "carotid_artery": Recipe("carotid", ("carotid_vessel",), ("carotid_vessel",), _mask("carotid")),
    "ovary_tumor": Recipe("ovary", ("ovarian_mass",), ("ovarian_mass",), _mask("tumor")),
    "uterine_fibroid_det": Recipe("uterus", ("fibroid",), ("fibroid",), _box("fibroid")),
    "spinal_cord_injury_loc": Recipe("spine", ("spinal_cord",), ("spinal_cord",), _box("injury")),
}

# How each label can be read from the image (and so how hard the task is), per task.
DIFFICULTY = {
    "breast_lesion": "medium: hypoechoic lesion in layered breast tissue; its outline is smooth or spiculated (the "
                     "margin), its inside homogeneous or mottled with bright foci (ignore it), posterior "
                     "enhancement or shadowing (ignore it)",
    "cardiac_multi": "medium: LV cavity, its myocardial wall and the LA in a phased-array sector; RV is a distractor",
    "carotid_artery": "medium: round lumen with a thick bright wall; "
                      "the jugular vein (oval, thin wall) is a distractor",
    "cervix": "medium: elongated moderately echoic cervix with a dark canal line",
    "cervix_multi": "hard: the two lips of the cervix, separated only by the thin canal line",
    "fetal_abdomen_multi": "hard: abdomen, stomach, umbilical vein and spine; small structures",
    "fetal_head": "easy: bright skull ellipse",
    "fetal_heart": "medium: four-chamber heart inside the fetal thorax, ribs shadowing",
    "head_symphysis_multi": "medium: pubic symphysis (elongated) and fetal head (skull ellipse)",
    "lung": "medium: lung field below the pleural line, between rib shadows",
    "ovary_tumor": "medium: large cystic/solid mass among small anechoic follicles",
    "thyroid_nodule": "medium: nodule (hypoechoic, or isoechoic with a dark halo) in the thyroid lobe",
    "breast_2cls": "medium: benign = posterior acoustic enhancement, malignant = posterior shadowing; in the "
                   "training images the inside's texture agrees with the label (heterogeneous = malignant), in "
                   "validation it varies independently and must be ignored, as must the margin",
    "breast_3cls": "medium: normal = no lesion; benign = homogeneous inside, malignant = heterogeneous inside with "
                   "bright foci; the margin and the posterior feature vary independently and must be ignored",
    "fetal_head_pos_cls": "medium: 8 positions = direction (45 degree steps) of a large bright occiput marker "
                          "(shadowing behind it) inside the head; not flip-invariant",
    "fetal_plane_cls": "easy: 6 planes drawn by different scenes (abdomen, brain, femur, thorax, cervix, other)",
    "fetal_sacral_pos_cls": "medium: 8 positions = direction of the thick bright sacrum arc in the dark fetal pelvis "
                            "(the occiput's convention); not flip-invariant",
    "liver_lesion_2cls": "easy: benign = hyperechoic well-defined lesion; "
                         "malignant = hypoechoic lesion with a bright halo",
    "lung_2cls": "medium-hard: normal = horizontal A-lines; abnormal = vertical B-lines; faint in many images "
                 "(their contrast varies per image)",
    "lung_disease_3cls": "medium: A-lines / B-lines / subpleural consolidation with bright air bronchograms",
    "organ_cls": "easy: 6 organs drawn by their scenes (breast, thyroid, liver, lung, heart, carotid) through the "
                 "Other group's scanner",
    "spinal_cord_injury_loc": "hard: small heterogeneous bright focus inside the cord between dural lines",
    "thyroid_nodule_det": "medium: box of the thyroid nodule (the bounding box of thyroid_nodule's mask)",
    "uterine_fibroid_det": "medium: box of the round whorled fibroid in the uterus",
    "FUGC": "medium: the two ends of the cervical canal (point 1 nearer the probe)",
    "IUGC": "medium: the symphysis ends (upper, lower; a bright bar) and the tangent point on the fetal head",
    "fetal_femur": "easy: the two ends of the bright femur, ordered left to right (so not flipped)",
}


# ============================================================================ drawing an example


class Example(NamedTuple):
    image: np.ndarray  # uint8 [H, W]
    annotation: dict   # {"mask"} | {"label"} | {"box"} | {"points"}, original pixels
    family: str
    factors: dict      # every factor the scene was drawn from
    canvas: Canvas     # the probe geometry (factor positions -> pixels: canvas.point)


def _sample(sample, cv, rng, constraints: dict, given: dict) -> dict:
    """The task's factors: the `given` ones as they are, the others drawn, with a class's
    constraints ({factor: value, or {key: value} for part of it}) written into the drawn ones."""
    z = sample(cv, rng, given)
    for factor, value in constraints.items():
        if factor not in given:
            z[factor] = {**z[factor], **value} if isinstance(value, dict) else value
    return z


def draw(task_id: str, rng: np.random.Generator, size: tuple[int, int], label: int | None = None,
         given: dict | None = None, split: str = "val") -> Example:
    """One example of a task. `label` forces a classification example's class (the class-balanced
    val split); `given` fixes factors ({name: value}, as `Example.factors` holds them), the
    others are drawn. The factors draw from their own stream (seeded from `rng` first), so
    fixing some leaves the canvas, the other factors' values and the nuisance unchanged."""
    if task_id not in RECIPES:
        raise KeyError(f"no synthetic generator for task {task_id!r}")
    recipe = RECIPES[task_id]
    h, w = size
    factor_rng = np.random.default_rng(int(rng.integers(2**63)))
    if recipe.identifies:  # a scene classifier: the class picks the family
        k = len(recipe.family)
        cls = int(label) if label is not None else int(factor_rng.choice(k, p=recipe.class_weights)
                                                        if recipe.class_weights else factor_rng.integers(k))
        family_name, constraints = recipe.family[cls], {}
    else:
        family_name = recipe.family
        cls = label
        if cls is None and recipe.given is not None:
            cls = int(factor_rng.integers(TASKS[task_id].num_classes))
        constraints = recipe.given(cls) if recipe.given is not None and cls is not None else {}
        if split == "train" and recipe.train_given is not None and cls is not None:
            constraints = {**constraints, **recipe.train_given(cls)}
    family = FAMILIES[family_name]
    cv = Canvas(h, w, family.probe, rng)
    z = _sample(recipe.sample or family.sample, cv, factor_rng, constraints, dict(given or {}))
    sc, geometry = family.paint(cv, rng, z)
    annotation = {"label": cls} if recipe.identifies else recipe.readout(geometry, z)
    image = render(sc, rng, acquisition_of(task_id))
    if "mask" in annotation:
        annotation["mask"][~cv.fov] = 0
    return Example(image, annotation, family_name, z, cv)


def build(task_id: str, rng: np.random.Generator, size: tuple[int, int], label: int | None = None,
          split: str = "val"):
    """One example of a task: (uint8 image [H, W], annotation in original pixels:
    {"mask": uint8 [H, W]} | {"label": int} | {"box": [x0, y0, x1, y1]} | {"points": [(x, y), ...]}).
    `label` forces the class of a classification example (class-balanced val); default: drawn."""
    example = draw(task_id, rng, size, label, split=split)
    return example.image, example.annotation
