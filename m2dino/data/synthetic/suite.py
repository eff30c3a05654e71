"""The suite on disk: task sizes, the FM_UIA layout, `write_suite`, and the cache `ensure_synthetic`.

Task sizes follow the real approximate training sizes N_t, compressed: n_t = scale x N_max x
(N_t / N_max) ** SIZE_EXPONENT, at least `min_train`. The largest task keeps `scale` of its real
size and the real 41x span between the smallest and the largest becomes ~11x: small tasks stay
small (the data-scarce side the transfer question needs) but learnable, and the tasks spread
over both sides of the median instead of piling up on the minimum. Val is about 20%, at least
`min_val` (100: synthetic images are free, and a task's metric on 16 images cannot tell
paradigms apart), and class-balanced for classification (every class present equally).
Each image is seeded by (seed, task, split, index): the suite is deterministic and the
order of generation does not matter. `write_suite` writes `train/` and `val/` with their
`csv_files/`, a summary (synthetic.json) and the transfer design (design.json, design.py);
`ensure_synthetic` writes a suite once into a temporary folder, swaps it in whole and reuses
it while its version, scale and seed match.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from m2dino.data.reader import CSV_TASK_NAMES, csv_num_classes
from m2dino.data.synthetic.design import DESIGN_FILE, write_design
from m2dino.data.synthetic.scenes import DIFFICULTY, build
from m2dino.io import write_json
from m2dino.tasks import TASKS, TaskTable, TaskType

GENERATOR_VERSION = 7  # bump whenever an image, a label or the design changes: cached suites are rebuilt
DEFAULT_SCALE = 0.06
DEFAULT_SEED = 0
MIN_TRAIN = 16
MIN_VAL = 100
SIZE_EXPONENT = 0.65  # how much of the real size ratios the suite keeps (1: all, 0: none)
# Classification labels drawn freely in train; val is class-balanced (example i has class
# i % num_classes) so every class is present and the majority-class baseline is never 0.
VAL_FRACTION = 0.2
SIZE_RANGE = (96, 192)


# ============================================================================ layout and writing

_COUNT_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five", 6: "Six", 8: "Eight"}
# Per task type: (image folder, CSV name prefix, whether the count is in both names), as in the release.
_NAMING = TaskTable("synthetic suite naming", {
    TaskType.SEGMENTATION: ("Segmentation", "Seg", True),
    TaskType.CLASSIFICATION: ("Classification", "Cls", True),
    TaskType.DETECTION: ("Detection", "Det", False),
    TaskType.LANDMARKS: ("Regression", "Reg", True),
})


def _ext(task_id: str, i: int) -> str:
    """File-type mix: tasks differ (as in the real release), a few tasks mix types."""
    k = sum(map(ord, task_id))
    kinds = [".png", ".jpg", ".png", ".bmp", ".jpeg"]
    main = kinds[k % len(kinds)]
    return [".png", ".jpg"][i % 2] if k % 7 == 0 else main


def _count_word(spec) -> str:
    count = csv_num_classes(spec)
    return _COUNT_WORDS.get(count, str(count))


def _task_folder(spec) -> str:
    folder, _, counted = _NAMING[spec.task_type]
    if counted:
        return f"{folder}/{_count_word(spec)}/{spec.task_id}"
    return f"{folder}/{spec.task_id}"


def csv_name(spec, index: int) -> str:
    """Real-looking CSV names, e.g. `Cls-Eight_15.fetal_head_pos_cls.csv`, `Det_22.x.csv`."""
    _, prefix, counted = _NAMING[spec.task_type]
    if not counted:
        return f"{prefix}_{index}.{spec.task_id}.csv"
    return f"{prefix}-{_count_word(spec)}_{index}.{spec.task_id}.csv"


def task_sizes(scale: float = DEFAULT_SCALE, min_train: int | None = None, min_val: int = MIN_VAL,
               val_fraction: float = VAL_FRACTION, tasks=None) -> dict[str, tuple[int, int]]:
    """{task_id: (n_train, n_val)}: the compressed real sizes (module docstring), at least
    `min_train` (default MIN_TRAIN), val ~ val_fraction, at least `min_val`."""
    if scale <= 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    minimum = MIN_TRAIN if min_train is None else min_train
    largest = max(spec.train_size for spec in TASKS.values())
    out = {}
    for tid in tasks or TASKS:
        n = max(minimum, int(round(scale * largest * (TASKS[tid].train_size / largest) ** SIZE_EXPONENT)))
        out[tid] = (n, max(min_val, int(round(n * val_fraction))))
    return out


def image_size(rng) -> tuple[int, int]:
    """An image's (height, width): each side in SIZE_RANGE, aspect 0.85-1.4."""
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
        balanced = split != "train" and spec.task_type is TaskType.CLASSIFICATION
        img, ann = build(spec.task_id, rng, image_size(rng), label=i % spec.num_classes if balanced else None,
                         split=split)
        ext = _ext(spec.task_id, i)
        name = f"{spec.task_id}_{split}_{i:05d}{ext}"
        if spec.task_type is TaskType.CLASSIFICATION:
            rel = f"{folder}/{ann['label']}/{name}"
        elif spec.task_type is TaskType.SEGMENTATION:
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
               "task_name": CSV_TASK_NAMES[spec.task_type], "num_classes": csv_num_classes(spec)}
        if spec.task_type is TaskType.SEGMENTATION:
            mrel = f"{folder}/masks/{Path(name).stem}.png"
            (root / mrel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ann["mask"], mode="L").save(root / mrel, compress_level=1)
            row["mask_path"] = f"../{mrel}"
        elif spec.task_type is TaskType.CLASSIFICATION:
            row["mask"] = ann["label"]
        elif spec.task_type is TaskType.DETECTION:
            row.update(zip(("x_min", "y_min", "x_max", "y_max"), map(_fmt, ann["box"])))
        else:
            for k, (x, y) in enumerate(ann["points"], 1):
                row[f"point_{k}_xy"] = json.dumps([round(float(x), 2), round(float(y), 2)])
        rows.append(row)
    return rows


def _columns(spec) -> list[str]:
    base = ["image_path", "task_id", "task_name", "num_classes"]
    extra = {TaskType.SEGMENTATION: ["mask_path"], TaskType.CLASSIFICATION: ["mask"],
             TaskType.DETECTION: ["x_min", "y_min", "x_max", "y_max"],
             TaskType.LANDMARKS: [f"point_{k}_xy" for k in range(1, spec.num_points + 1)]}[spec.task_type]
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
        "difficulty": {t: DIFFICULTY[t] for t in task_ids}, "design": DESIGN_FILE,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_design(out, task_ids)
    write_json(out / "synthetic.json", summary)  # last: its presence marks a finished suite
    return summary


def _job(args):
    out, split, tid, n, seed, index = args
    return write_task(Path(out), split, TASKS[tid], n, seed, index)


# ============================================================================ the cache


def default_cache_root(scale: float = DEFAULT_SCALE, seed: int = DEFAULT_SEED) -> Path:
    base = os.environ.get("M2DINO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "m2dino")
    return Path(base) / f"synthetic-{scale:g}-{seed}"


def _is_current(root: Path, scale: float, seed: int) -> bool:
    """A finished suite written by this generator version for this scale and seed."""
    try:
        info = json.loads((root / "synthetic.json").read_text())
    except (OSError, ValueError):
        return False
    return (info.get("version") == GENERATOR_VERSION and info.get("scale") == scale and info.get("seed") == seed
            and (root / DESIGN_FILE).is_file())


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
