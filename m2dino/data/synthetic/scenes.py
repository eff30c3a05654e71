"""What is drawn: the organ scenes and `build`, one image and its label for any FM_UIA task.

An organ scene paints an echogenicity map on a canvas (canvas.py) and returns the geometry
it drew; it is shared by all tasks of that organ, so related tasks can help or hurt each
other. `build(task_id, rng, size, label)` picks the probe (`PROBES`) and the scene for a
task, turns the geometry into the task's annotation (mask, class, box or points) and
renders the image. Every label is visible in the image; `DIFFICULTY` says how, per task.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from m2dino.data.synthetic.canvas import Canvas, blob, ellipse, new_scene, paint, render, segment_distance

# How each label can be read from the image (and so how hard the task is), per task.
DIFFICULTY = {
    "breast_lesion": "medium: hypoechoic lesion (oval or spiculated) in layered breast tissue",
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
    "breast_2cls": "medium: benign = anechoic oval, wider than tall, strong posterior enhancement; "
                   "malignant = spiculated, taller, dense posterior shadowing",
    "breast_3cls": "medium: as breast_2cls, plus normal = no lesion",
    "fetal_head_pos_cls": "medium: 8 positions = direction (45 degree steps) of a large bright occiput marker "
                          "(shadowing behind it) inside the head; not flip-invariant",
    "fetal_plane_cls": "easy: 6 planes drawn by different scenes (abdomen, brain, femur, thorax, cervix, other)",
    "fetal_sacral_pos_cls": "medium: 8 positions = direction of the thick bright sacrum arc in the dark fetal pelvis; "
                            "not flip-invariant",
    "liver_lesion_2cls": "easy: benign = hyperechoic well-defined lesion; "
                         "malignant = hypoechoic lesion with a bright halo",
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
    uv = segment_distance(cv, (cx - side * 0.15 * a, cy - 0.65 * b),
                          (cx - side * 0.05 * a, cy + 0.05 * b)) < 0.05 * cv.s
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
    for _k in range(int(rng.integers(3, 6))):
        phi = rng.uniform(0, 2 * math.pi)
        paint(sc, ellipse(cv, cx + 0.95 * a * math.cos(phi), cy + 0.95 * a * math.sin(phi), 0.1 * a, 0.05 * a,
                          phi + math.pi / 2), 0.95, bright=0.8)
    hx, hy = cx + rng.uniform(-0.2, 0.2) * a, cy + rng.uniform(-0.15, 0.15) * a
    hr = a * rng.uniform(0.38, 0.48)
    heart = ellipse(cv, hx, hy, hr, hr * rng.uniform(0.8, 0.95), rng.uniform(0, math.pi)) & thorax
    paint(sc, heart, 0.7)
    for qx in (-1, 1):
        for qy in (-1, 1):
            paint(sc, ellipse(cv, hx + qx * 0.4 * hr, hy + qy * 0.4 * hr, 0.32 * hr, 0.32 * hr) & heart, 0.05,
                  fluid=0.2)
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
            paint(sc, ellipse(cv, nx + rng.uniform(-0.5, 0.5) * nr, ny + rng.uniform(-0.5, 0.5) * nr, 1.2, 1.2)
                  & nodule, 1.0, bright=0.6)
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
            paint(sc, ellipse(cv, rng.uniform(xs[0], xs[1]), pleura_y + rng.uniform(0.1, 0.35) * cv.h, 1.5, 1.0) & cons,
                  1.0)
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
    paint(sc, segment_distance(cv, (cx - 0.25 * cv.s * c, cy - 0.25 * cv.s * s),
                               (cx + 0.25 * cv.s * c, cy + 0.25 * cv.s * s)) < 0.02 * cv.s, 0.9)
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


def bbox_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


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
