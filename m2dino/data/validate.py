"""Pixel-level validation: decode every image and mask and check each annotation against
its image (mask size and values, boxes and points inside the image).

`scan_dataset(root)` = the reader's CSV-level checks (m2dino.data.reader.read_csvs) plus these,
for the rows that passed them: what `python -m m2dino.data.check` prints and what training
refuses or skips.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from m2dino.data.images import ImageError, decoded_size, load_mask_array
from m2dino.data.reader import Problem, Record, Scan, read_csvs
from m2dino.tasks import TaskSpec, TaskType


def _check_pixels(rec: Record, spec: TaskSpec) -> str | None:
    """Decode the image (and mask) fully and check the annotation against the image size."""
    try:
        w, h = decoded_size(rec.image_file)  # full decode: a truncated file raises here
    except (ImageError, OSError) as e:
        return f"image {rec.image_path!r} cannot be decoded: {e}"
    if rec.task_type is TaskType.SEGMENTATION:
        try:
            m = load_mask_array(rec.mask_file)
        except (ImageError, OSError) as e:
            return f"mask {rec.mask_path!r} cannot be decoded: {e}"
        if m.shape != (h, w):
            return f"mask size {m.shape[1]}x{m.shape[0]} differs from image size {w}x{h}"
        top = int(m.max()) if m.size else 0
        if top >= spec.num_classes or int(m.min()) < 0:
            return f"mask value {top} >= num_classes {spec.num_classes}" if top >= spec.num_classes \
                else f"mask has negative value {int(m.min())}"
    elif rec.task_type is TaskType.DETECTION:
        x0, y0, x1, y1 = rec.box
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            return f"box {list(rec.box)} is not inside the image ({w}x{h})"
    elif rec.task_type is TaskType.LANDMARKS:
        for k, (x, y) in enumerate(rec.points, 1):
            if not (0 <= x <= w and 0 <= y <= h):
                return f"point_{k}_xy [{x}, {y}] is outside the image ({w}x{h})"
    return None


def check_pixels(records, tasks, workers: int | None = None) -> list[Problem]:
    """Decode every image/mask (threads: PIL releases the GIL while decoding)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda r: _check_pixels(r, tasks[r.task_id]), records, chunksize=16))
    return [Problem(r.csv, r.row, p, r.task_id) for r, p in zip(records, results) if p]


def scan_dataset(root, task_overrides: dict | None = None, decode: bool = True) -> Scan:
    """Read and fully validate a root: CSV-level checks, then pixel-level checks of the rows
    that passed them (decode=False skips decoding; much faster, misses corrupt files)."""
    scan = read_csvs(root, task_overrides=task_overrides)
    if decode:
        scan.problems.extend(check_pixels(scan.records, scan.tasks))
        scan.problems.sort(key=lambda p: (p.csv, p.row))
    return scan
