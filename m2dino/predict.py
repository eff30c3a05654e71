"""Write FM_UIA challenge submissions with a trained M2DINO checkpoint.

`python -m m2dino.predict --checkpoint CKPT --data-root ROOT --out DIR` predicts every row of
every task the model knows (that ROOT's CSVs hold), batched, on CPU or GPU, and writes:

* DIR/classification_predictions.json: [{image_path, task_id, predicted_class, predicted_probs}]
* DIR/detection_predictions.json: [{image_path, task_id, bbox_normalized, bbox_pixels}]
* DIR/regression_predictions.json: [{image_path, task_id, predicted_points_normalized,
  predicted_points_pixels}] with points flattened as [x1, y1, x2, y2, ...]
* one single-channel index PNG per segmentation row at DIR/<mask_path without its leading ../>,
  at the original image size.

`image_path` is the CSV string verbatim (with its ../). Every file is written atomically
(temporary file, then rename), so an interrupted run never leaves a truncated file.
Annotations are not needed: a test set whose CSVs hold only image_path, task_id, task_name,
num_classes (and mask_path, where the segmentation predictions go) is predicted as well.
Images get the validation transform of training (m2dino.data.transforms.SampleTransform).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from m2dino.data import collate
from m2dino.data.reader import IMAGE_SUFFIXES, resolve_inside
from m2dino.data.transforms import SampleTransform, to_pil_image
from m2dino.backbone import WeightsError
from m2dino.evaluate import EvaluationError, PREDICTION_FILES, prediction_mask_relpath, resolve_split_root
from m2dino.metrics import resize_nearest
from m2dino.tasks import task_type_from_name


class PredictionError(ValueError):
    """The checkpoint and the data do not fit together, or the model produced unusable output."""


def _atomic_write_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")

    _atomic_write_bytes(Path(path), write)


def write_index_png(path: Path, mask: np.ndarray) -> None:
    """A single-channel (mode L) PNG of class indices."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise PredictionError(f"segmentation prediction for {path} has shape {mask.shape}, expected (H, W)")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise PredictionError(f"segmentation prediction for {path} has class indices outside 0..255")
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    _atomic_write_bytes(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def default_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------- one prediction -> entry
def submission_entry(task_type: str, task_id: str, image_path: str, prediction: dict) -> dict:
    """The challenge's JSON entry for one classification / detection / regression prediction."""
    entry = {"image_path": image_path, "task_id": task_id}
    if task_type == "classification":
        probs = np.asarray(prediction["probs"], dtype=np.float64).reshape(-1)
        if not np.isfinite(probs).all() or probs.sum() <= 0:
            raise PredictionError(f"{task_id} {image_path}: class probabilities {probs.tolist()} are not usable")
        probs = probs / probs.sum()  # exactly summing to 1 in float64
        entry["predicted_class"] = int(prediction["predicted_class"])
        entry["predicted_probs"] = [float(p) for p in probs]
    elif task_type == "detection":
        pixels = np.asarray(prediction["bbox_pixels"], dtype=np.float64).reshape(4)
        normalised = np.asarray(prediction["bbox_normalized"], dtype=np.float64).reshape(4)
        entry["bbox_normalized"] = [float(v) for v in normalised]
        entry["bbox_pixels"] = [float(v) for v in pixels]
    elif task_type == "regression":
        pixels = np.asarray(prediction["points_pixels"], dtype=np.float64).reshape(-1)
        normalised = np.asarray(prediction["points_normalized"], dtype=np.float64).reshape(-1)
        entry["predicted_points_normalized"] = [float(v) for v in normalised]
        entry["predicted_points_pixels"] = [float(v) for v in pixels]
    else:
        raise PredictionError(f"no JSON entry for task type {task_type!r}")
    for key, value in entry.items():
        if isinstance(value, list) and not all(np.isfinite(value)):
            raise PredictionError(f"{task_id} {image_path}: non-finite {key} {value}")
    return entry


# ------------------------------------------------------------------------- rows to predict
@dataclass(frozen=True)
class PredictionRow:
    task_id: str
    task_type: str
    image_path: str  # the CSV string, verbatim
    image_file: str  # resolved, inside the data root
    mask_path: str | None
    csv: str
    row: int  # 0-based data row


def read_prediction_rows(split_root: Path, specs: dict) -> list[PredictionRow]:
    """The CSV rows of the tasks in `specs` (task_id -> TaskSpec); only what prediction needs
    is read and checked, so unlabelled test CSVs work. Errors name the csv and row."""
    csv_dir = split_root / "csv_files"
    root_resolved = split_root.resolve()
    csv_files = sorted(p for p in csv_dir.glob("*.csv"))
    if not csv_files:
        raise FileNotFoundError(f"no CSV files in {csv_dir}")
    rows, problems, seen = [], [], {}
    for csv_file in csv_files:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
            data_rows = [r for r in csv.DictReader(f) if any((v or "").strip() for v in r.values())]
        for index, record in enumerate(data_rows):
            where = f"{csv_file.name} row {index}"
            task_id = (record.get("task_id") or "").strip()
            if task_id not in specs:
                continue
            spec = specs[task_id]
            try:
                task_type = task_type_from_name(record.get("task_name", ""))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            if task_type != spec.task_type:
                problems.append(f"{where}: task_name {record.get('task_name')!r} but the model's {task_id!r} is {spec.task_type}")
                continue
            image_path = (record.get("image_path") or "").strip()
            image_file = resolve_inside(csv_dir, image_path, root_resolved) if image_path else None
            if image_file is None:
                problems.append(f"{where}: image_path {image_path!r} is empty or resolves outside the data root")
                continue
            if image_file.suffix.lower() not in IMAGE_SUFFIXES or not image_file.is_file():
                problems.append(f"{where}: image {image_path!r} is missing or not an image file {IMAGE_SUFFIXES}")
                continue
            num_classes = (record.get("num_classes") or "").strip()
            if task_type in ("segmentation", "classification") and num_classes:
                try:
                    agrees = int(float(num_classes)) == spec.num_classes
                except ValueError:
                    agrees = False
                if not agrees:
                    problems.append(f"{where}: num_classes {num_classes!r} but the model's {task_id!r} head has "
                                    f"{spec.num_classes}")
                    continue
            mask_path = (record.get("mask_path") or "").strip() or None
            if task_type == "segmentation":
                if mask_path is None:
                    problems.append(f"{where}: segmentation row without mask_path (where its prediction goes)")
                    continue
                try:
                    prediction_mask_relpath(mask_path)
                except EvaluationError as e:
                    problems.append(f"{where}: {e}")
                    continue
            key = (task_id, image_path)
            if key in seen:
                problems.append(f"{where}: same task and image_path as {seen[key]}")
                continue
            seen[key] = where
            rows.append(PredictionRow(task_id, task_type, image_path, str(image_file), mask_path, csv_file.name, index))
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PredictionError(f"{len(problems)} problem(s) in {csv_dir}:\n  {listed}{more}")
    return rows


class PredictionImages(Dataset):
    """PredictionRows -> dataset items of DESIGN.md's shape (empty target), validation transform."""

    def __init__(self, rows: Sequence[PredictionRow], image_size: int):
        self.rows = list(rows)
        self.transform = SampleTransform(image_size, train=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        try:
            image = to_pil_image(row.image_file)
        except OSError as e:
            raise PredictionError(f"{row.csv} row {row.row}: cannot read image {row.image_path!r} ({e})") from e
        tensor, _ = self.transform(image, {})
        return {"image": tensor, "task": row.task_id, "target": {}, "orig_size": (image.size[1], image.size[0]),
                "image_path": row.image_path, "mask_path": row.mask_path}


def prediction_loader(rows: Sequence[PredictionRow], task_order: Sequence[str], image_size: int, batch_size: int,
                      workers: int = 0) -> DataLoader:
    """Batches in task order, so most batches hold a single task (one head call each)."""
    rank = {task_id: i for i, task_id in enumerate(task_order)}
    ordered = sorted(rows, key=lambda r: (rank[r.task_id], r.csv, r.row))
    return DataLoader(PredictionImages(ordered, image_size), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate)


# ------------------------------------------------------------------------------ the run
def predict_folder(checkpoint, data_root, out_dir, split: str | None = None, batch_size: int = 16,
                   device: str | None = None, tasks: Sequence[str] | None = None, workers: int = 0,
                   progress: bool = False) -> dict:
    """Predict every row of every task the checkpoint knows under the data root; returns
    {"tasks": [task ids predicted], "counts": {task_id: rows}, "out": out_dir}."""
    from m2dino.model import load_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = default_device(device)
    model = load_model(checkpoint)
    model.to(device).eval()
    model_specs = {spec.task_id: spec for spec in model.tasks}

    split_root = resolve_split_root(data_root, split)
    if tasks:
        unknown = [t for t in tasks if t not in model_specs]
        if unknown:
            raise PredictionError(f"the checkpoint {checkpoint} has no head for task(s) {unknown}; "
                                  f"it knows {sorted(model_specs)}")
        model_specs = {t: model_specs[t] for t in tasks}
    rows = read_prediction_rows(split_root, model_specs)
    wanted = [t for t in model_specs if any(r.task_id == t for r in rows)]
    if not wanted:
        raise PredictionError(f"none of the tasks {sorted(model_specs)} has rows under {split_root / 'csv_files'}")
    if tasks:
        empty = [t for t in tasks if t not in wanted]
        if empty:
            raise PredictionError(f"task(s) {empty} have no rows under {split_root / 'csv_files'}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {task_type: [] for task_type in PREDICTION_FILES}
    counts: Counter = Counter()
    loader = prediction_loader(rows, wanted, model.img_size, batch_size, workers)
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="predict", unit="batch")
    with torch.inference_mode():
        for batch in iterator:
            images = batch["images"].to(device, non_blocking=True)
            task_index = model.task_index(batch["tasks"]).to(device)
            outputs = model(images, task_index)
            predictions = model.postprocess(outputs, batch["orig_sizes"])
            for i, prediction in enumerate(predictions):
                task_id = batch["tasks"][i]
                spec = model_specs[task_id]
                orig_size = tuple(int(v) for v in batch["orig_sizes"][i])
                if spec.task_type == "segmentation":
                    mask = resize_nearest(np.asarray(prediction["mask"]), orig_size)
                    write_index_png(out_dir / prediction_mask_relpath(batch["mask_paths"][i]), mask)
                else:
                    entries[spec.task_type].append(
                        submission_entry(spec.task_type, task_id, batch["image_paths"][i], prediction))
                counts[task_id] += 1
    for task_type, filename in PREDICTION_FILES.items():
        write_json_atomic(out_dir / filename, entries[task_type])
    missing = {t: sum(r.task_id == t for r in rows) - counts[t] for t in wanted}
    if any(missing.values()):
        raise PredictionError(f"rows without a prediction: { {t: n for t, n in missing.items() if n} }")
    return {"tasks": wanted, "counts": dict(counts), "out": str(out_dir)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (e.g. runs/default/au/all/best.safetensors)")
    parser.add_argument("--data-root", required=True, help="FM_UIA root (csv_files/ inside, or train/ and val/)")
    parser.add_argument("--out", required=True, help="submission folder to write")
    parser.add_argument("--split", help="sub-folder of --data-root to predict (default: the root itself, else val/)")
    parser.add_argument("--tasks", help="comma-separated task ids (default: every task of the checkpoint in the data)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        result = predict_folder(args.checkpoint, args.data_root, args.out, split=args.split,
                                batch_size=args.batch_size, device=args.device, tasks=tasks,
                                workers=args.workers, progress=True)
    except (FileNotFoundError, EvaluationError, PredictionError, WeightsError) as e:
        print(f"m2dino.predict: error: {e}", file=sys.stderr)
        return 2
    for task_id, n in sorted(result["counts"].items()):
        print(f"  {task_id:<24} {n:>6} rows")
    print(f"predictions written to {result['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
