"""FM_UIA reader: CSV rows -> `Record`s, with every CSV-level problem found at once.

Layout (see docs of the challenge): a data root holds `csv_files/*.csv`; each row names an
image by a path relative to `csv_files/` (so it starts with `../`). A challenge release has
`train/` and `val/` roots of that shape under one folder.

Every problem is reported, each as `Problem(csv, row, problem)` with the csv path relative to
the root given by the user and the 0-based data row (header excluded, blank lines skipped).
A path that resolves outside the data root (through `../`, an absolute path or a symlink) is
refused before anything is opened; nothing here opens an image (decoding checks:
m2dino.data.validate; the split: m2dino.data.splits; the bad-row policy: m2dino.data.fmuia).

An image's identity is the file its path resolves to, not the CSV's spelling: two rows of a
task that reach one file (`../A/./b.png` and `../A/b.png`, or through a symlink) are
duplicates, and one in train/ and val/ is a leak; `Record.image_key` spells the resolved file
relative to csv_files/ (for the usual `../A/b.png` that is the CSV string itself), which the
split hashes. CSV discovery reads regular files only (a FIFO named *.csv would block a reader
forever) and reports every other *.csv entry it skipped.
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from m2dino import io
from m2dino.errors import InputError
from m2dino.tasks import TASKS, TaskSpec, TaskTable, TaskType, make_task

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
# The CSV's `task_name` per task type, as the real release writes it (read case-insensitively).
CSV_TASK_NAMES: TaskTable[str] = TaskTable("CSV task names", {
    TaskType.SEGMENTATION: "segmentation",
    TaskType.CLASSIFICATION: "classification",
    TaskType.DETECTION: "detection",
    TaskType.LANDMARKS: "Regression",
})
# Which TaskSpec count the CSV's `num_classes` column holds: a landmark task's is its point count.
CSV_COUNT_FIELDS: TaskTable[str] = TaskTable("CSV num_classes column", {
    TaskType.SEGMENTATION: "num_classes",
    TaskType.CLASSIFICATION: "num_classes",
    TaskType.DETECTION: "num_classes",
    TaskType.LANDMARKS: "num_points",
})


def task_type_from_name(task_name: str) -> TaskType:
    """Map a CSV `task_name` (case-insensitive) to a task type; ValueError when unknown."""
    key = str(task_name).strip().lower()
    for kind, name in CSV_TASK_NAMES.items():
        if name.lower() == key:
            return kind
    raise ValueError(f"unknown task_name {task_name!r}; expected one of {sorted(CSV_TASK_NAMES.values())}")


def csv_num_classes(spec: TaskSpec) -> int:
    """The CSV's `num_classes` value for a task: its classes, or a landmark task's point count."""
    return getattr(spec, CSV_COUNT_FIELDS[spec.task_type])


@dataclass(frozen=True)
class Problem:
    csv: str  # csv path relative to the user's root, e.g. "train/csv_files/Seg-Two.lung.csv"
    row: int  # 0-based data row
    problem: str
    task_id: str | None = field(default=None, compare=False)  # when the row names one (not in to_dict)

    def to_dict(self) -> dict:
        return {"csv": self.csv, "row": self.row, "problem": self.problem}

    def __str__(self) -> str:
        return f"{self.csv} row {self.row}: {self.problem}"


@dataclass(frozen=True)
class Record:
    """One CSV row: one image for one task, with its annotation in original pixels."""

    task_id: str
    task_type: TaskType
    image_path: str  # the CSV string, verbatim
    image_file: str  # resolved absolute path (inside the root)
    csv: str
    row: int
    split: str = "train"
    mask_path: str | None = None
    mask_file: str | None = None
    label: int | None = None
    box: tuple | None = None  # (x_min, y_min, x_max, y_max) pixels
    points: tuple | None = None  # ((x, y), ...) pixels
    image_key: str = ""  # the resolved image file relative to csv_files/ ("../A/b.png"): the split's key

    def __post_init__(self):
        object.__setattr__(self, "task_type", TaskType(self.task_type))

    @property
    def key(self) -> tuple:
        return (self.csv, self.row)


# ----------------------------------------------------------------------------- roots


def split_roots(root) -> list[tuple[str, Path]]:
    """[(split, data_root)]: [("train", root/train), ("val", root/val)] for a challenge
    release, else [("all", root)]. Each data_root holds csv_files/."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist or is not a directory")
    if (root / "train" / "csv_files").is_dir() and (root / "val" / "csv_files").is_dir():
        return [("train", root / "train"), ("val", root / "val")]
    if (root / "csv_files").is_dir():
        return [("all", root)]
    raise FileNotFoundError(
        f"{root}: no csv_files/ folder (expected ROOT/csv_files/*.csv, or ROOT/train/csv_files "
        f"and ROOT/val/csv_files)"
    )


def _inside(path: Path, root_resolved: Path) -> bool:
    try:
        path.relative_to(root_resolved)
        return True
    except ValueError:
        return False


def resolve_inside(csv_dir: Path, rel: str, root_resolved: Path) -> Path | None:
    """The real path of `rel` (relative to `csv_dir`) if it stays inside the root, else None;
    ValueError saying why when it cannot be resolved at all (a NUL byte, a symlink loop, a name
    too long).

    `Path.resolve` follows every symlink (it reads links, it opens no file), so a link inside
    the root that points outside is caught here, before any open."""
    rel = rel.replace("\\", "/")  # CSVs written on Windows use backslashes
    if "\0" in rel:
        raise ValueError("holds a NUL byte")
    try:
        candidate = (csv_dir / rel).resolve()
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise ValueError("goes round a symlink loop") from None
    except OSError as e:
        raise ValueError(f"cannot be resolved ({e.strerror})") from None
    return candidate if _inside(candidate, root_resolved) else None


def image_key(image_file: Path, csv_dir_resolved: Path) -> str:
    """A resolved image file spelled relative to csv_files/, with forward slashes: the usual
    CSV spelling ("../Classification/Six/x.png"), the same for every spelling of one file."""
    return Path(os.path.relpath(image_file, csv_dir_resolved)).as_posix()


def csv_files(csv_dir: Path, root_resolved: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the *.csv files of csv_dir that are regular files inside the root, sorted; [(path, why)]
    for the other *.csv entries, skipped unopened: resolving outside the root, a folder, a FIFO
    (which would block a reader forever), a device...)."""
    found, skipped = [], []
    for path in sorted(p for p in csv_dir.iterdir() if p.suffix.lower() == ".csv"):
        try:
            inside = resolve_inside(csv_dir, path.name, root_resolved) is not None
        except ValueError as e:
            skipped.append((path, f"csv file {e}"))
            continue
        if not inside:
            skipped.append((path, "csv file resolves outside the data root"))
            continue
        kind = io.file_kind(path)
        if kind:
            skipped.append((path, f"csv file is {kind}, not a regular file"))
        else:
            found.append(path)
    return found, skipped


def resolve_split_root(data_root, split: str | None = None) -> Path:
    """The folder holding csv_files/ to predict or score: ROOT itself, ROOT/<split>, or
    ROOT/val for a release with train/ and val/."""
    root = Path(data_root)
    if split:
        candidate = root / split
        if not (candidate / "csv_files").is_dir():
            raise FileNotFoundError(f"{candidate} has no csv_files/ folder (--split {split})")
        return candidate
    if (root / "csv_files").is_dir():
        return root
    if (root / "val" / "csv_files").is_dir():
        return root / "val"
    raise FileNotFoundError(f"{root} has no csv_files/ folder (nor val/csv_files/)")


# ----------------------------------------------------------------------------- CSV parsing


def _parse_float(text: str) -> float:
    return float(str(text).strip())


def _parse_int_label(text: str) -> int:
    value = float(str(text).strip())
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"class label {text!r} is not an integer")
    return int(value)


def parse_point(text: str) -> tuple[float, float]:
    """A JSON "[x, y]" point string (NaN/Infinity allowed by JSON, caught by validation)."""
    try:
        value = json.loads(text)
    except RecursionError:  # a cell of 100000 "[": not a point, and no stack overflow
        raise ValueError(f"point {text[:40]!r}... is not a JSON [x, y] pair") from None
    if not isinstance(value, list) or len(value) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"point {text!r} is not a JSON [x, y] pair")
    return float(value[0]), float(value[1])


def _point_columns(fieldnames) -> list[str]:
    cols = [c for c in fieldnames if c.startswith("point_") and c.endswith("_xy")]
    return sorted(cols, key=lambda c: int(c[len("point_"):-len("_xy")]) if c[6:-3].isdigit() else 10**9)


def read_csv_rows(csv_file: Path):
    """(fieldnames, [(row_index, dict)]) with 0-based data rows, blank lines skipped, headers and
    values stripped. InputError saying why the file cannot be read (not UTF-8, not CSV, not a
    regular file); the caller names the file."""
    try:
        with io.open_regular(csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return [], []
            header = [h.strip() for h in header]
            rows = []
            for values in reader:
                if not values or all(not v.strip() for v in values):
                    continue
                rows.append((len(rows), dict(zip(header, (v.strip() for v in values)))))
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8 "
                         f"(as the FM_UIA release is)") from None
    except csv.Error as e:
        raise InputError(f"not a readable CSV ({e})") from None
    return header, rows


@dataclass
class Scan:
    """Everything the reader found under a root."""

    root: Path
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    csv_files: list[str] = field(default_factory=list)
    row_counts: Counter = field(default_factory=Counter)  # every CSV row, good or bad, per task_id

    def task_counts(self, clean: bool = False) -> dict[str, int]:
        """Rows per task_id: all of them, or (clean=True) those without a problem."""
        if not clean:
            return dict(sorted(self.row_counts.items()))
        bad = self.bad_keys
        counts = Counter(r.task_id for r in self.records if r.key not in bad)
        return {t: counts.get(t, 0) for t in sorted(self.row_counts)}

    @property
    def bad_keys(self) -> set:
        return {(p.csv, p.row) for p in self.problems}


def _extra_task_spec(task_id, task_type, rows, fieldnames, overrides) -> TaskSpec:
    """A TaskSpec for a task outside the registry, from its CSV rows (then `overrides`)."""
    fields = dict(overrides or {})
    counts = {name: int(fields.pop(name)) for name in ("num_classes", "num_points") if name in fields}
    if not counts:
        counts = _EXTRA_TASK_COUNTS[task_type](rows, fieldnames)
    return make_task(task_id, task_type, **counts, **fields)


# The most classes an extra task may declare in its CSV: a mask holds at most 16-bit class indices
MAX_CSV_CLASSES = 65536


def _class_count(rows, fieldnames) -> dict:
    text = Counter(_norm_count(r.get("num_classes", "")) for r in rows).most_common(1)[0][0]
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"num_classes {text!r} is not an integer (set it in the task overrides)") from None
    if count > MAX_CSV_CLASSES:
        raise ValueError(f"num_classes {count} is more than {MAX_CSV_CLASSES} (a 16-bit mask's classes); "
                         f"set the real count in the task overrides")
    return {"num_classes": count}


def _point_count(rows, fieldnames) -> dict:
    return {"num_points": len([c for c in _point_columns(fieldnames) if rows and rows[0].get(c, "")])}


# An extra task's counts, read from its rows when the overrides give none.
_EXTRA_TASK_COUNTS = TaskTable("extra task counts", {
    TaskType.SEGMENTATION: _class_count,
    TaskType.CLASSIFICATION: _class_count,
    TaskType.DETECTION: lambda rows, fieldnames: {"num_classes": 1},
    TaskType.LANDMARKS: _point_count,
})
# Task types whose rows' num_classes column is checked against the task's (by predict too).
COUNT_CHECKED_TYPES = frozenset({TaskType.SEGMENTATION, TaskType.CLASSIFICATION})


def _norm_count(text: str) -> str:
    """'4', '4.0' and ' 4' are the same count; anything else is compared verbatim."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return str(text)
    return str(int(value)) if math.isfinite(value) and value == int(value) else str(text)


class CsvRow(NamedTuple):
    """One row of a CSV as read, before it becomes a Record: where it is and its cells."""
    split: str            # "train" or "val"
    csv: str              # the CSV's path relative to the data root
    csv_dir: Path         # the folder its relative paths start from
    fieldnames: list      # the CSV's columns
    index: int            # the row's number in its CSV (as Problem rows count)
    cells: dict           # {column: text}


def read_csvs(root, task_overrides: dict | None = None) -> Scan:
    """Parse every csv_files/*.csv under `root` into records, with every problem found
    without opening images (columns, values, paths, duplicates, task consistency).

    `task_overrides`: {task_id: {field: value}} for TaskSpec fields (also how an extra task's
    num_classes, organ, group, hflip... are set)."""
    root = Path(root)
    root_resolved = root.resolve()
    task_overrides = task_overrides or {}
    scan = Scan(root=root)
    parsed: list[CsvRow] = []

    for split, data_root in split_roots(root):
        csv_dir = data_root / "csv_files"
        files, skipped = csv_files(csv_dir, root_resolved)
        for csv_file, why in skipped:
            scan.csv_files.append(csv_file.relative_to(root).as_posix())
            scan.problems.append(Problem(csv_file.relative_to(root).as_posix(), -1, f"{why}; not read"))
        for csv_file in files:
            csv_rel = csv_file.relative_to(root).as_posix()
            scan.csv_files.append(csv_rel)
            try:
                fieldnames, rows = read_csv_rows(csv_file)
            except (OSError, InputError) as e:
                scan.problems.append(Problem(csv_rel, -1, f"cannot read csv: {e}"))
                continue
            missing = [c for c in ("image_path", "task_id", "task_name") if c not in fieldnames]
            if missing:
                scan.problems.append(Problem(csv_rel, -1, f"csv lacks column(s) {missing}"))
                continue
            for i, row in rows:
                parsed.append(CsvRow(split, csv_rel, csv_dir, fieldnames, i, row))
                if row.get("task_id"):
                    scan.row_counts[row["task_id"]] += 1

    # Task types and specs: registry first, then extra tasks from their CSV rows.
    rows_by_task = defaultdict(list)
    type_by_task = {}
    for parsed_row in parsed:
        csv_rel, i, row = parsed_row.csv, parsed_row.index, parsed_row.cells
        try:
            ttype = task_type_from_name(row.get("task_name", ""))
        except ValueError as e:
            scan.problems.append(Problem(csv_rel, i, str(e), row.get("task_id") or None))
            continue
        tid = row.get("task_id", "")
        if not tid:
            scan.problems.append(Problem(csv_rel, i, "empty task_id"))
            continue
        known = TASKS.get(tid)
        expected = known.task_type if known else type_by_task.setdefault(tid, ttype)
        if ttype != expected:
            scan.problems.append(
                Problem(csv_rel, i, f"task_name {row['task_name']!r} disagrees with task {tid!r} ({expected})", tid)
            )
            continue
        rows_by_task[tid].append(parsed_row)

    for tid, items in rows_by_task.items():
        if tid in TASKS:
            spec = TASKS[tid]
            if tid in task_overrides:
                spec = spec.with_overrides(task_overrides[tid])
        else:
            try:
                spec = _extra_task_spec(
                    tid, type_by_task[tid], [it.cells for it in items], items[0].fieldnames, task_overrides.get(tid)
                )
            except (ValueError, TypeError) as e:  # every row of the task is unusable: say so for each
                scan.problems.extend(Problem(it.csv, it.index, f"cannot define extra task {tid!r}: {e}", tid)
                                     for it in items)
                continue
        scan.tasks[tid] = spec
        # num_classes must agree within the task (and with the spec for seg / cls).
        nc_counts = Counter(_norm_count(it.cells.get("num_classes", "")) for it in items)
        majority = nc_counts.most_common(1)[0][0] if nc_counts else ""
        seen: dict[Path, CsvRow] = {}  # resolved image file -> the first row of this task with it
        for item in items:
            csv_rel, i, row = item.csv, item.index, item.cells
            row_problems = []
            nc = _norm_count(row.get("num_classes", ""))
            if nc != majority:
                row_problems.append(f"num_classes {nc!r} inconsistent within task {tid!r} (most rows: {majority!r})")
            elif spec.task_type in COUNT_CHECKED_TYPES and nc != "":
                ok = nc == str(spec.num_classes)
                if not ok:
                    row_problems.append(f"num_classes {nc!r} disagrees with task {tid!r} ({spec.num_classes})")
            rec, more, image_file = _row_to_record(spec, item, root_resolved)
            if image_file is not None:
                if image_file in seen:
                    row_problems.append(_same_image(seen[image_file], item))
                else:
                    seen[image_file] = item
            row_problems += more
            if row_problems:
                scan.problems.extend(Problem(csv_rel, i, text, tid) for text in row_problems)
            else:
                scan.records.append(rec)
    scan.problems.sort(key=lambda p: (p.csv, p.row))
    return scan


def _same_image(first: CsvRow, later: CsvRow) -> str:
    """The problem of a row whose image is the same file as an earlier row's of its task."""
    split0, csv0, row0, path0 = first.split, first.csv, first.index, first.cells["image_path"]
    split, image_path = later.split, later.cells["image_path"]
    spelled = "" if path0 == image_path else f" (the same file, spelled {path0!r} there)"
    if split0 != split:
        return (f"image {image_path!r} is also in {split0}/ ({csv0} row {row0}){spelled}: the same image in "
                f"{split0} and {split} leaks into the validation")
    if spelled:
        return f"duplicated row: same task and image as {csv0} row {row0}{spelled}"
    return f"duplicated row: same task and image_path as {csv0} row {row0}"


def _file_problem(csv_dir, rel, what, root_resolved, suffixes=None):
    """(resolved path, None) or (None, problem). Containment is checked before anything else."""
    if not rel:
        return None, f"empty {what}"
    try:
        resolved = resolve_inside(csv_dir, rel, root_resolved)
    except ValueError as e:
        return None, f"{what} {rel!r} {e}"
    if resolved is None:
        return None, f"{what} {rel!r} resolves outside the data root; refused, not read"
    if suffixes and resolved.suffix.lower() not in suffixes:
        return None, f"{what} {rel!r}: unsupported file type (expected one of {suffixes})"
    kind = io.file_kind(resolved)
    if kind == "missing":
        return None, f"{'image' if what == 'image_path' else 'mask'} file missing: {rel!r}"
    if kind:
        return None, f"{what} {rel!r} is {kind}, not a regular file"
    return resolved, None


def _mask(spec, row, csv_dir, root_resolved):
    """(fields, None) or (None, problem) for a segmentation row's mask file."""
    mask_path = row.get("mask_path", "")
    mask_file, p = _file_problem(csv_dir, mask_path, "mask_path", root_resolved)
    if p:
        return None, p
    return {"mask_path": mask_path, "mask_file": str(mask_file)}, None


def _label(spec, row, csv_dir, root_resolved):
    text = row.get("mask", "")
    if text == "":
        return None, "classification row without a label in column 'mask'"
    try:
        label = _parse_int_label(text)
    except ValueError:
        return None, f"class label {text!r} is not an integer"
    if not 0 <= label < spec.num_classes:
        return None, f"class label {label} out of range [0, {spec.num_classes})"
    return {"label": label}, None


def _box(spec, row, csv_dir, root_resolved):
    try:
        box = tuple(_parse_float(row[c]) for c in BOX_COLUMNS)
    except KeyError as e:
        return None, f"detection row lacks column {e.args[0]!r}"
    except ValueError:
        return None, f"box {[row.get(c) for c in BOX_COLUMNS]} is not numeric"
    if not all(math.isfinite(v) for v in box):
        return None, f"box {list(box)} has non-finite coordinates"
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, f"box {list(box)} has zero or negative area (x_max <= x_min or y_max <= y_min)"
    return {"box": box}, None


def _points(spec, row, csv_dir, root_resolved):
    pts = []
    for k in range(1, spec.num_points + 1):
        col = f"point_{k}_xy"
        text = row.get(col, "")
        if not text:
            return None, f"regression row lacks {col} (task has {spec.num_points} points)"
        try:
            x, y = parse_point(text)
        except (ValueError, json.JSONDecodeError):
            return None, f"{col} {text!r} is not a JSON [x, y] pair"
        if not (math.isfinite(x) and math.isfinite(y)):
            return None, f"{col} {text!r} is not finite"
        pts.append((x, y))
    return {"points": tuple(pts)}, None


# A row's annotation per task type: (Record fields, None) or (None, problem); opens nothing.
_ANNOTATIONS = TaskTable("CSV annotations", {
    TaskType.SEGMENTATION: _mask,
    TaskType.CLASSIFICATION: _label,
    TaskType.DETECTION: _box,
    TaskType.LANDMARKS: _points,
})


def _row_to_record(spec, item: CsvRow, root_resolved):
    """(Record, [], image file) or (None, [problem texts], image file or None): every problem of
    the row, and the file its image_path resolves to (for the duplicate check); opens nothing."""
    row, csv_dir = item.cells, item.csv_dir
    image_path = row.get("image_path", "")
    problems = []
    image_file, p = _file_problem(csv_dir, image_path, "image_path", root_resolved, IMAGE_SUFFIXES)
    if p:
        problems.append(p)
    fields, p = _ANNOTATIONS[spec.task_type](spec, row, csv_dir, root_resolved)
    if p:
        problems.append(p)
    if problems:
        return None, problems, image_file
    return Record(task_id=spec.task_id, task_type=spec.task_type, image_path=image_path,
                  image_file=str(image_file), csv=item.csv, row=item.index, split=item.split,
                  image_key=image_key(image_file, csv_dir.resolve()), **fields), [], image_file
