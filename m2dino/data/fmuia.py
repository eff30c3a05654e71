"""One FM_UIA root ready for training: read, validated, split, with the bad-row policy
applied (`load_fmuia`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from m2dino import io
from m2dino.data.reader import Problem, Record
from m2dino.data.splits import apply_split, make_split, read_split, write_split
from m2dino.data.validate import scan_dataset
from m2dino.errors import InputError
from m2dino.tasks import TaskSpec

SKIPPED_FILE = "skipped_rows.json"
POLICIES = ("error", "skip")


class DataValidationError(InputError):
    """Raised under policy "error" when the data have problems; `.problems` lists them all."""

    def __init__(self, problems: list[Problem], root=None):
        self.problems = list(problems)
        head = f"{len(self.problems)} data problem(s)" + (f" under {root}" if root else "")
        lines = [str(p) for p in self.problems[:50]]
        more = len(self.problems) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more (run `python -m m2dino.data.check ROOT` for all)")
        super().__init__(
            head + ":\n  " + "\n  ".join(lines)
            + "\nFix them, or pass policy='skip' (--on-bad-sample skip) to train without these rows."
        )


@dataclass
class FMUIAData:
    """What training needs: records per split, the task specs, and what was excluded."""

    root: Path
    train: list[Record]
    val: list[Record]
    tasks: dict[str, TaskSpec]
    problems: list[Problem]
    skipped: list[Problem]
    split: dict | None = None  # the generated split (None for a train/ val/ root)

    def task_counts(self, split: str = "train") -> dict[str, int]:
        counts = Counter(r.task_id for r in (self.train if split == "train" else self.val))
        return {t: counts.get(t, 0) for t in sorted(self.tasks)}


def write_skipped(problems, run_dir) -> Path:
    return io.write_json(Path(run_dir) / SKIPPED_FILE, [p.to_dict() for p in problems])


def load_fmuia(root, policy: str = "error", run_dir=None, tasks=None, task_overrides: dict | None = None,
               val_fraction: float = 0.2, seed: int = 0, decode: bool = True) -> FMUIAData:
    """Read, validate and split an FM_UIA root for training.

    policy "error": any problem raises DataValidationError listing them all (nothing trains).
    policy "skip": problem rows are excluded and listed in run_dir/skipped_rows.json.
    tasks: optional list of task ids to keep (other tasks' rows are ignored, their problems too;
    problems of rows with no task, e.g. an unreadable csv, always count).
    Without train/ and val/, the per-task split comes from run_dir/split.json when it exists
    (resume) and is otherwise made by `make_split` and written there.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy (--on-bad-sample) must be one of {POLICIES}, got {policy!r}")
    scan = scan_dataset(root, task_overrides=task_overrides, decode=decode)
    keep = None if tasks is None else {t.task_id if isinstance(t, TaskSpec) else t for t in tasks}
    if keep is not None:
        missing = keep - set(scan.tasks)
        if missing:
            raise ValueError(f"{root}: requested task(s) {sorted(missing)} have no rows; found {sorted(scan.tasks)}")
        # problems of rows that belong to tasks not asked for do not block this run
        scan.records = [r for r in scan.records if r.task_id in keep]
        scan.problems = [p for p in scan.problems if p.task_id is None or p.task_id in keep]
        scan.tasks = {t: s for t, s in scan.tasks.items() if t in keep}
    problems = scan.problems
    if problems and policy == "error":
        raise DataValidationError(problems, root)
    bad = scan.bad_keys
    records = [r for r in scan.records if r.key not in bad]
    skipped = list(problems)
    if run_dir is not None and policy == "skip":
        write_skipped(skipped, run_dir)
    split = None
    if any(r.split == "all" for r in records):
        split = read_split(run_dir) if run_dir is not None else None
        if split is None:
            split = make_split(records, val_fraction=val_fraction, seed=seed)
        else:  # rows added since: placed by the same hash rule, existing ones do not move
            fresh = make_split(records, val_fraction=split.get("val_fraction", val_fraction),
                               seed=split.get("seed", seed), min_val=0)
            listed = {(t, p) for t, ps in split["val"].items() for p in ps}
            known = set(listed)
            for t, ps in fresh["val"].items():
                for p in ps:
                    if (t, p) not in known:
                        split["val"].setdefault(t, []).append(p)
        if run_dir is not None:
            write_split(split, run_dir)
        records = apply_split(records, split)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    return FMUIAData(root=Path(root), train=train, val=val, tasks=scan.tasks,
                     problems=problems, skipped=skipped if policy == "skip" else [], split=split)
