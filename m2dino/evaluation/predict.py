"""Predict FM_UIA challenge submissions with a trained M2DINO checkpoint.

`predict_folder(checkpoint, data_root, out_dir)` (and `python -m m2dino.predict`) predicts every
row of every task the model knows (that ROOT's CSVs hold), batched, on CPU or GPU, and writes
the challenge's submission format (m2dino.evaluation.submission) into out_dir.
Annotations are not needed: a test set whose CSVs hold only image_path, task_id, task_name,
num_classes (and mask_path, where the segmentation predictions go) is predicted as well.
Images get the validation transform of training (m2dino.data.transforms.SampleTransform).

Rows of tasks the checkpoint has no head for are skipped, not fatal: a warning names the task
ids and row counts and `missing_tasks.json` in out_dir lists the rows (csv, row, task_id,
image_path). `tta=True` averages each flip-safe task over the image and its mirror
(m2dino.evaluation.tta); `amp` autocasts on CUDA (bf16 / fp16; CPU always runs fp32).

The output folder. It may not be the data root, lie inside it or hold it (a prediction's path
mirrors its ground-truth mask_path). Predict holds its writer's lock while it writes
(m2dino.io.lock_directory) and replaces only files it wrote itself: `.m2dino-predictions.json`
lists them, and a file it would write that is not listed (a user's, another tool's) stops it,
named, unless `overwrite=True` moves the old folder aside first (nothing is deleted). Other
files in the folder are left alone.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from m2dino import io
from m2dino.data import collate
from m2dino.data.images import ImageError, to_pil_image
from m2dino.data.reader import (
    COUNT_CHECKED_TYPES,
    IMAGE_SUFFIXES,
    csv_files,
    read_csv_rows,
    resolve_inside,
    resolve_split_root,
    task_type_from_name,
)
from m2dino.data.transforms import SampleTransform
from m2dino.errors import InputError, run_command
from m2dino.evaluation.metrics import resize_nearest
from m2dino.evaluation.submission import (
    PREDICTION_FILES,
    EvaluationError,
    PredictionError,
    prediction_mask_relpath,
    submission_entry,
    write_index_png,
    write_prediction_files,
)
from m2dino.evaluation.tta import hflip_tta
from m2dino.models.m2dino import M2DINO, load_model
from m2dino.models.weights import WeightsError
from m2dino.tasks import TaskType

MISSING_TASKS_FILE = "missing_tasks.json"
# What predict leaves in its output folder: the files it wrote (it replaces only those)
PREDICTIONS_MARKER = ".m2dino-predictions.json"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
# What bad input raises (each names its file, row or task): a command prints it and exits 2.
PREDICTION_ERRORS = (FileNotFoundError, InputError, EvaluationError, PredictionError, WeightsError)


def default_device(device: str | None) -> torch.device:
    """`device`, or cuda when available else cpu (for None, "" and "auto")."""
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, amp: str = "off"):
    """Autocast in the `amp` dtype (bf16 | fp16) on CUDA; a disabled context otherwise."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    if device.type != "cuda" or AMP_DTYPES[amp] is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])


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


def read_prediction_rows(split_root: Path, specs: dict, known=None) -> tuple[list[PredictionRow], list[dict]]:
    """(the CSV rows of the tasks in `specs` (task_id -> TaskSpec), the skipped rows).

    Only what prediction needs is read and checked, so unlabelled test CSVs work; errors name
    the csv and row. Rows of a task outside `known` (default: `specs`; the task ids the model
    has a head for) are skipped and returned as {csv, row, task_id, image_path}; rows of a
    known task outside `specs` (not asked for) are ignored. CSV files are found and read as
    m2dino.data.check reads them (regular files only, UTF-8), and two rows of a task reaching
    one image file (however spelled) are a problem."""
    known = set(specs if known is None else known)
    csv_dir = split_root / "csv_files"
    root_resolved = split_root.resolve()
    found, not_read = csv_files(csv_dir, root_resolved)
    for path, why in not_read:
        print(f"m2dino: warning: {path}: {why}; skipped, not read", file=sys.stderr)
    if not found:
        raise FileNotFoundError(f"no CSV files in {csv_dir}")
    rows, skipped, problems, seen = [], [], [], {}
    for csv_file in found:
        try:
            _, data_rows = read_csv_rows(csv_file)
        except (InputError, OSError) as e:
            problems.append(f"{csv_file.name}: cannot read csv: {e}")
            continue
        for index, record in data_rows:
            where = f"{csv_file.name} row {index}"
            task_id = record.get("task_id") or ""
            if task_id not in known:
                skipped.append({"csv": csv_file.name, "row": index, "task_id": task_id,
                                "image_path": record.get("image_path") or ""})
                continue
            if task_id not in specs:
                continue
            spec = specs[task_id]
            try:
                task_type = task_type_from_name(record.get("task_name", ""))
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            if task_type != spec.task_type:
                problems.append(f"{where}: task_name {record.get('task_name')!r} "
                                f"but the model's {task_id!r} is {spec.task_type}")
                continue
            image_path = record.get("image_path") or ""
            try:
                image_file = resolve_inside(csv_dir, image_path, root_resolved) if image_path else None
            except ValueError as e:
                problems.append(f"{where}: image_path {image_path!r} {e}")
                continue
            if image_file is None:
                problems.append(f"{where}: image_path {image_path!r} is empty or resolves outside the data root")
                continue
            if image_file.suffix.lower() not in IMAGE_SUFFIXES or io.file_kind(image_file):
                problems.append(f"{where}: image {image_path!r} is missing or not an image file {IMAGE_SUFFIXES}")
                continue
            num_classes = record.get("num_classes") or ""
            if task_type in COUNT_CHECKED_TYPES and num_classes:
                try:
                    agrees = int(float(num_classes)) == spec.num_classes
                except (ValueError, OverflowError):  # not a number, or an infinite one
                    agrees = False
                if not agrees:
                    problems.append(f"{where}: num_classes {num_classes!r} but the model's {task_id!r} head has "
                                    f"{spec.num_classes}")
                    continue
            mask_path = record.get("mask_path") or None
            if task_type is TaskType.SEGMENTATION:
                if mask_path is None:
                    problems.append(f"{where}: segmentation row without mask_path (where its prediction goes)")
                    continue
                try:
                    prediction_mask_relpath(mask_path)
                except EvaluationError as e:
                    problems.append(f"{where}: {e}")
                    continue
            key = (task_id, image_file)
            if key in seen:
                problems.append(f"{where}: same task and image as {seen[key]}")
                continue
            seen[key] = where
            rows.append(PredictionRow(task_id, task_type, image_path, str(image_file), mask_path, csv_file.name, index))
    if problems:
        listed = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PredictionError(f"{len(problems)} problem(s) in {csv_dir}:\n  {listed}{more}")
    return rows, skipped


def report_skipped(skipped: list[dict], out_dir: Path, ours: frozenset = frozenset({MISSING_TASKS_FILE})) -> None:
    """Warn about rows of tasks the checkpoint does not know (task ids and row counts) and
    list them in out_dir/missing_tasks.json; a stale list from an earlier run (one of `ours`,
    the files predict wrote there) is removed."""
    listing = Path(out_dir) / MISSING_TASKS_FILE
    if not skipped:
        if MISSING_TASKS_FILE in ours:
            listing.unlink(missing_ok=True)
        return
    counts = Counter(r["task_id"] for r in skipped)
    named = ", ".join(f"{t or '<empty task_id>'} ({n} row{'s' if n > 1 else ''})" for t, n in sorted(counts.items()))
    print(f"m2dino: warning: skipped {len(skipped)} row(s) of task(s) the checkpoint has no head for: "
          f"{named}; listed in {listing}", file=sys.stderr)
    io.write_json(listing, skipped)


# ------------------------------------------------------------------------------ the output folder
def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_out_dir(out_dir, data_root, checkpoint=None, overwrite: bool = False) -> None:
    """InputError when the output folder is the data root, lies inside it or holds it (the
    predictions mirror the ground truth's paths), or (--overwrite) holds the checkpoint."""
    out, root = Path(out_dir).resolve(), Path(data_root).resolve()
    if _overlaps(out, root):
        where = "is" if out == root else ("lies inside" if root in out.parents else "holds")
        raise InputError(f"--out {out_dir} {where} the data root {data_root}: predictions are written at their "
                         f"ground truth's paths (mask_path), and never into the input. Choose an --out outside "
                         f"the data root")
    if overwrite and isinstance(checkpoint, (str, Path)) and out in Path(checkpoint).resolve().parents:
        raise InputError(f"the checkpoint {checkpoint} lies inside --out {out_dir}: --overwrite would move it aside "
                         f"with the old predictions. Move it out first, or choose another --out")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"--out {out_dir} is a file, not a folder")


def planned_files(rows: Sequence[PredictionRow], skipped: list[dict]) -> list[str]:
    """The files (relative to the output folder) a prediction of `rows` writes."""
    files = {PREDICTIONS_MARKER, *PREDICTION_FILES.values()}
    if skipped:
        files.add(MISSING_TASKS_FILE)
    files.update(prediction_mask_relpath(r.mask_path).as_posix() for r in rows if r.task_type is TaskType.SEGMENTATION)
    return sorted(files)


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
        except (ImageError, FileNotFoundError) as e:
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
                   progress: bool = False, amp: str = "off", tta: bool = False, overwrite: bool = False) -> dict:
    """Predict every row of every task the checkpoint knows under the data root; returns
    {"tasks": [task ids predicted], "counts": {task_id: rows}, "skipped": [rows of unknown
    tasks], "out": out_dir}. `checkpoint`: a checkpoint path or a loaded M2DINO. The output
    folder's rules (see the module doc): `overwrite` moves a folder holding files predict did
    not write aside first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, data_root, checkpoint, overwrite)
    device = default_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictionError(f"device {device} was asked for, but torch sees no CUDA device (use cpu or auto)")
    model = checkpoint if isinstance(checkpoint, M2DINO) else load_model(checkpoint)
    source = "the model" if isinstance(checkpoint, M2DINO) else f"the checkpoint {checkpoint}"
    model.to(device).eval()
    model_specs = {spec.task_id: spec for spec in model.tasks}
    known = set(model_specs)

    split_root = resolve_split_root(data_root, split)
    if split is None and split_root != Path(data_root):  # a release with train/ and val/: say which is predicted
        print(f"m2dino: predicting {split_root} (the root holds train/ and val/; --split train predicts the other)",
              file=sys.stderr)
    if tasks:
        unknown = [t for t in tasks if t not in model_specs]
        if unknown:
            raise PredictionError(f"{source} has no head for task(s) {unknown}; "
                                  f"it knows {sorted(model_specs)}")
        model_specs = {t: model_specs[t] for t in tasks}
    rows, skipped = read_prediction_rows(split_root, model_specs, known)
    wanted = [t for t in model_specs if any(r.task_id == t for r in rows)]
    if not wanted:
        raise PredictionError(f"none of the tasks {sorted(model_specs)} has rows under {split_root / 'csv_files'}"
                              + (f" (its {len(skipped)} row(s) are of other tasks: "
                                 f"{sorted({r['task_id'] for r in skipped})})" if skipped else ""))
    if tasks:
        empty = [t for t in tasks if t not in wanted]
        if empty:
            raise PredictionError(f"task(s) {empty} have no rows under {split_root / 'csv_files'}")

    planned = planned_files(rows, skipped)
    with io.lock_directory(out_dir, "m2dino.predict"):  # no other writer from the check to the last file
        ours = io.claim_files(out_dir, planned, "m2dino.predict", PREDICTIONS_MARKER, overwrite)
        with io.lock_directory(out_dir, "m2dino.predict"):  # the same lock, or the new folder's after a move
            io.record_files(out_dir, "m2dino.predict", PREDICTIONS_MARKER, ours | set(planned))
            report_skipped(skipped, out_dir, ours)
            counts = _predict_into(out_dir, model, model_specs, rows, wanted, device, batch_size, workers, progress,
                                   amp, tta)
    return {"tasks": wanted, "counts": dict(counts), "skipped": skipped, "out": str(out_dir)}


def _predict_into(out_dir: Path, model, model_specs: dict, rows, wanted, device, batch_size: int, workers: int,
                  progress: bool, amp: str, tta: bool) -> Counter:
    """Run the model over `rows` and write the submission files; {task_id: rows predicted}."""
    entries = {}
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
            with autocast(device, amp):
                outputs = hflip_tta(model, images, task_index) if tta else model(images, task_index)
            predictions = model.postprocess(outputs, batch["orig_sizes"])
            for i, prediction in enumerate(predictions):
                task_id = batch["tasks"][i]
                spec = model_specs[task_id]
                orig_size = tuple(int(v) for v in batch["orig_sizes"][i])
                if spec.task_type is TaskType.SEGMENTATION:
                    mask = resize_nearest(np.asarray(prediction["mask"]), orig_size)
                    write_index_png(out_dir / prediction_mask_relpath(batch["mask_paths"][i]), mask)
                else:
                    entries.setdefault(spec.task_type, []).append(
                        submission_entry(spec.task_type, task_id, batch["image_paths"][i], prediction))
                counts[task_id] += 1
    write_prediction_files(out_dir, entries)
    missing = {t: sum(r.task_id == t for r in rows) - counts[t] for t in wanted}
    if any(missing.values()):
        raise PredictionError(f"rows without a prediction: { {t: n for t, n in missing.items() if n} }")
    return counts


def run_prediction(predict, prog: str) -> int:
    """The command-line end of a prediction: `predict()` (returning predict_folder's result),
    its rows per task and where they went printed; bad input printed as `prog: error: ...`
    with exit status 2, a fault of the machine (a full or read-only disk) with 1
    (m2dino.errors.run_command; python -m m2dino.predict and the exported model.py)."""
    def body() -> None:
        result = predict()
        for task_id, n in sorted(result["counts"].items()):
            print(f"  {task_id:<24} {n:>6} rows")
        print(f"predictions written to {result['out']}")

    return run_command(prog, body)
