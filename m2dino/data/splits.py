"""The train/val split of a data root without train/ and val/: deterministic, per task, and
stable when files are added (a seeded hash of each image decides), stored in the run
directory as split.json so a resumed run keeps it.

What is hashed is the image's identity, the file its path resolves to inside the data root,
spelled relative to csv_files/ (`Record.image_key`): every spelling of one file lands on the
same side. For every row whose image_path is already spelled that way (`../A/b.png`, as the
FM_UIA release and the synthetic suite write them) that is the CSV string itself, so the split
of existing data is what it was before the key was the resolved file. A stored split.json is
always honoured: its paths match a row by the resolved key or by the verbatim string.
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from m2dino import io
from m2dino.data.reader import Record
from m2dino.errors import InputError

SPLIT_FILE = "split.json"


def _hash_unit(seed: int, task_id: str, image_path: str) -> float:
    """A number in [0, 1) fixed by (seed, task, image_path): stable when files are added."""
    digest = hashlib.sha1(f"{seed}\0{task_id}\0{image_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_key(record: Record) -> str:
    """What the split hashes and lists: the resolved image (image_key), or the CSV string for a
    record made without one."""
    return record.image_key or record.image_path


def make_split(records, val_fraction: float = 0.2, seed: int = 0, min_val: int = 1) -> dict:
    """Deterministic per-task split for a root without train/ and val/.

    A row goes to val when the hash of (seed, task_id, its split_key) is below val_fraction, so
    adding files never moves existing ones. A task with at least 2 rows gets at least
    `min_val` val rows (its lowest hashes). Returns {"seed", "val_fraction", "val": {task_id:
    sorted [split_key]}}, the JSON that `write_split` stores in the run directory."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_task = defaultdict(list)
    for r in records:
        key = split_key(r)
        by_task[r.task_id].append((_hash_unit(seed, r.task_id, key), key))
    val = {}
    for tid, items in sorted(by_task.items()):
        items.sort()
        chosen = [p for h, p in items if h < val_fraction]
        if val_fraction > 0 and len(chosen) < min_val and len(items) >= 2:
            chosen = [p for _, p in items[: min(min_val, len(items) - 1)]]
        val[tid] = sorted(chosen)
    return {"seed": seed, "val_fraction": val_fraction, "val": val}


def write_split(split: dict, run_dir) -> Path:
    return io.write_text(Path(run_dir) / SPLIT_FILE, json.dumps(split, indent=1, sort_keys=True))


def read_split(run_dir) -> dict | None:
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    split = io.read_json(path)
    val = split.get("val")
    if not isinstance(val, dict) or not all(isinstance(t, str) and isinstance(paths, list)
                                            and all(isinstance(p, str) for p in paths) for t, paths in val.items()):
        raise InputError(f"{path}: not a split file (its 'val' must map task ids to lists of image paths); "
                         f"remove it to split again, or restore the run's own split.json")
    return split


def apply_split(records, split: dict) -> list[Record]:
    """Records with split "train"/"val" set from a split mapping, each matched by its split_key
    or its verbatim image_path (rows of a train/ val/ root keep their folder's split)."""
    val = {(t, p) for t, paths in split["val"].items() for p in paths}
    out = []
    for r in records:
        if r.split == "all":
            listed = (r.task_id, split_key(r)) in val or (r.task_id, r.image_path) in val
            r = replace(r, split="val" if listed else "train")
        out.append(r)
    return out
