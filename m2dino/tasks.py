"""The FM_UIA task registry: one `TaskSpec` per task, the task types, and the clinical groups.

Task types are `TaskType`, a `str` Enum whose values are the words our files and JSON have
always used: SEGMENTATION, CLASSIFICATION, DETECTION and LANDMARKS, whose value stays
"regression" (the challenge's word, in metrics.json, checkpoints and exports). Each layer that
does something per type keeps one `TaskTable` keyed by it (the heads, the losses, the metrics,
TTA, the submission files, the baselines, ...): a new kind of task is one entry per table, and
a table without an entry for a type says so, naming the table and the types it knows.

A landmark task's point count is `num_points` (its `num_classes` is 0). The challenge's CSVs
write it in their `num_classes` column, and checkpoints saved before `num_points` existed hold
it in `num_classes` too: `TaskSpec.from_dict`, per-task overrides and `make_task` read that old
spelling; the CSV's own spellings live in m2dino.data.reader.

The 27 tasks of the FM_UIA 2026 challenge live in `fmuia_tasks.json` (type, class or point
count, organ, approximate real training size, whether a horizontal flip keeps the label's
meaning). The default clinical groups live in `clinical_groups.json`; they are OUR assumption
(the M2DINO paper names OB, breast and lung groups but does not publish the membership) and
any YAML/JSON file given to `load_groups(path)` replaces them.

Horizontal flip (`hflip`) decisions, per task:
- fetal_head_pos_cls, fetal_sacral_pos_cls: False. Their classes are positions (e.g. left vs
  right occiput anterior); a mirror image belongs to another class.
- fetal_femur: False. Its two endpoints may be ordered by image position; a mirror swaps
  which end is "point 1", so we do not flip rather than guess the convention.
- Everything else: True. Segmentation masks, boxes and identity-ordered landmarks (IUGC:
  symphysis ends + head tangent; FUGC: cervical landmarks) move with the image, and the
  remaining classification labels (plane, organ, benign/malignant, disease) are not
  lateral.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Generic, TypeVar

_HERE = Path(__file__).resolve().parent
TASKS_FILE = _HERE / "fmuia_tasks.json"
GROUPS_FILE = _HERE / "clinical_groups.json"


class TaskType(str, Enum):
    """The kinds of task. A `str` Enum whose values are the spellings our files and JSON use,
    so `spec.task_type == "segmentation"` holds and JSON writes the plain word.

    Landmark tasks keep the challenge's word, "regression", as their value: that is what
    metrics.json, checkpoints and exported models have always said.
    """

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    LANDMARKS = "regression"

    def __str__(self) -> str:  # messages, f-strings and file names show the plain spelling
        return self.value


class UnknownTaskType(KeyError, ValueError):
    """A task type a table has no entry for (a KeyError for `in` and `.get`, a ValueError for callers
    that check arguments)."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


V = TypeVar("V")


class TaskTable(Mapping, Generic[V]):
    """One layer's entry per task type (its head, loss, metrics, ...): adding a task type is one
    entry per table, and looking up a type a table lacks raises `UnknownTaskType` naming the table,
    the type and the types it knows. Keys may be given as TaskType members or their strings."""

    def __init__(self, name: str, entries: Mapping):
        self.name = name
        self._entries: dict[TaskType, V] = {TaskType(k): v for k, v in entries.items()}

    def __getitem__(self, kind) -> V:
        try:
            return self._entries[TaskType(kind)]
        except (ValueError, KeyError):
            known = ", ".join(str(k) for k in self._entries)
            raise UnknownTaskType(f"{self.name}: no entry for task type {kind!r}; known task types: {known}") from None

    def __iter__(self) -> Iterator[TaskType]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TaskTable({self.name!r}, {{{', '.join(f'{str(k)!r}: {v!r}' for k, v in self._entries.items())}}})"


TASK_TYPES = tuple(TaskType)
PRIMARY_METRICS: TaskTable[str] = TaskTable("primary metrics", {
    TaskType.SEGMENTATION: "dice",
    TaskType.CLASSIFICATION: "f1_macro",
    TaskType.DETECTION: "iou",
    TaskType.LANDMARKS: "mre",
})
# Allowed (num_classes, num_points) per type: (minimum, maximum or None); landmarks have no classes.
_COUNTS: TaskTable[tuple[tuple[int, int | None], tuple[int, int | None]]] = TaskTable("task counts", {
    TaskType.SEGMENTATION: ((2, None), (0, 0)),  # background included
    TaskType.CLASSIFICATION: ((2, None), (0, 0)),
    TaskType.DETECTION: ((1, 1), (0, 0)),  # one box
    TaskType.LANDMARKS: ((0, 0), (1, None)),
})


def _check_count(task_id: str, kind: TaskType, name: str, value, bounds: tuple[int, int | None]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"TaskSpec {task_id!r}: {name} must be an int, got {value!r}")
    low, high = bounds
    if value < low or (high is not None and value > high):
        want = f"== {low}" if low == high else f">= {low}"
        hint = ""
        if kind is TaskType.LANDMARKS and name == "num_classes":
            hint = " (a landmark task gives its point count as num_points; TaskSpec.from_dict reads the old spelling)"
        raise ValueError(f"TaskSpec {task_id!r}: a {kind} task needs {name} {want}, got {value}{hint}")


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    task_type: TaskType  # a string is converted to its TaskType
    num_classes: int = 0  # seg: incl. background; cls: classes; det: 1; landmarks: 0
    organ: str = "unknown"
    group: str = "Other"  # clinical group
    primary_metric: str = ""  # "" -> the task type's default (PRIMARY_METRICS)
    train_size: int = 0
    hflip: bool = True  # horizontal flip keeps the label's meaning
    num_points: int = 0  # landmarks: the number of points; else 0

    def __post_init__(self):
        if not isinstance(self.task_id, str) or not self.task_id:
            raise ValueError(f"TaskSpec.task_id must be a non-empty string, got {self.task_id!r}")
        try:
            kind = TaskType(self.task_type)
        except ValueError:
            raise ValueError(f"TaskSpec {self.task_id!r}: task_type {self.task_type!r} is not one of "
                             f"{[str(t) for t in TaskType]}") from None
        object.__setattr__(self, "task_type", kind)
        classes, points = _COUNTS[kind]
        _check_count(self.task_id, kind, "num_classes", self.num_classes, classes)
        _check_count(self.task_id, kind, "num_points", self.num_points, points)
        if not self.primary_metric:
            object.__setattr__(self, "primary_metric", PRIMARY_METRICS[kind])
        if self.primary_metric not in PRIMARY_METRICS.values():
            raise ValueError(
                f"TaskSpec {self.task_id!r}: primary_metric {self.primary_metric!r} is not one of "
                f"{sorted(PRIMARY_METRICS.values())}"
            )
        if int(self.train_size) < 0:
            raise ValueError(f"TaskSpec {self.task_id!r}: train_size must be >= 0")

    def to_dict(self) -> dict:
        """The fields as plain JSON values (task_type as its string)."""
        return {f.name: str(v) if isinstance(v, TaskType) else v
                for f in fields(self) for v in (getattr(self, f.name),)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TaskSpec":
        """A TaskSpec from `to_dict()`'s fields, or from the spelling saved before landmark tasks had
        `num_points` (checkpoints and configs that hold `asdict(TaskSpec)`): a landmark task
        ("regression") whose point count is in `num_classes`."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TaskSpec.from_dict: unknown field(s) {sorted(unknown)}")
        return cls(**_landmark_points(dict(d)))

    def with_overrides(self, overrides: Mapping) -> "TaskSpec":
        """A copy with some fields replaced (a config's per-task overrides); a landmark task's
        `num_classes` override is read as its point count, the old spelling."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"task {self.task_id!r}: unknown TaskSpec field(s) {sorted(unknown)} in the overrides")
        changes = dict(overrides)
        if "task_type" not in changes and "num_classes" in changes and "num_points" not in changes:
            changes["task_type"] = self.task_type
        return replace(self, **_landmark_points(changes))


def _landmark_points(d: dict) -> dict:
    """Move a landmark task's point count from the old `num_classes` to `num_points`."""
    try:
        landmarks = TaskType(d.get("task_type")) is TaskType.LANDMARKS
    except ValueError:
        return d  # TaskSpec names the bad task_type
    if landmarks and d.get("num_classes") and not d.get("num_points"):
        d["num_points"] = d.pop("num_classes")
        d["num_classes"] = 0
    return d


def _read_mapping(path: Path) -> dict:
    """Read a JSON or YAML mapping, with a clear error naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read groups file {path}: {e}") from e
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError / yaml.YAMLError
        raise ValueError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_groups(path=None) -> dict[str, list[str]]:
    """Clinical groups: {group: [task_id, ...]}.

    Without `path`, the default groups (our assumption, see module docstring). With a YAML or
    JSON file holding either `{group: [task_ids]}` or `{"groups": {group: [task_ids]}}`, that
    file replaces the defaults entirely. A task may belong to at most one group; task ids not
    in the 27 are allowed (extra tasks).
    """
    data = _read_mapping(GROUPS_FILE if path is None else Path(path))
    source = GROUPS_FILE if path is None else Path(path)
    groups = data.get("groups", data) if isinstance(data.get("groups"), dict) else data
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for group, members in groups.items():
        if not isinstance(members, (list, tuple)) or not all(isinstance(m, str) for m in members):
            raise ValueError(f"{source}: group {group!r} must be a list of task_id strings, got {members!r}")
        for m in members:
            if m in seen:
                raise ValueError(f"{source}: task {m!r} is in two groups ({seen[m]!r} and {group!r})")
            seen[m] = str(group)
        out[str(group)] = list(members)
    return out


def group_of(groups: dict[str, list[str]]) -> dict[str, str]:
    """Invert a groups mapping: {task_id: group}."""
    return {t: g for g, members in groups.items() for t in members}


def apply_groups(tasks, groups: dict[str, list[str]], default: str = "Other") -> list[TaskSpec]:
    """Copies of `tasks` whose `group` follows `groups` (tasks in no group get `default`)."""
    inverse = group_of(groups)
    return [replace(t, group=inverse.get(t.task_id, default)) for t in tasks]


def _load_registry() -> dict[str, TaskSpec]:
    data = json.loads(TASKS_FILE.read_text())
    inverse = group_of(load_groups())
    registry = {}
    for row in data["tasks"]:
        spec = TaskSpec.from_dict({**row, "group": inverse.get(row["task_id"], "Other")})
        registry[spec.task_id] = spec
    return registry


TASKS: dict[str, TaskSpec] = _load_registry()


def get_task(task_id: str) -> TaskSpec:
    """The registry's TaskSpec for `task_id`; KeyError naming the known ids otherwise."""
    try:
        return TASKS[task_id]
    except KeyError:
        raise KeyError(f"unknown task_id {task_id!r}; known FM_UIA tasks: {sorted(TASKS)}") from None


def make_task(task_id: str, task_type: str, num_classes: int = 0, **overrides) -> TaskSpec:
    """A TaskSpec for a task outside the registry (an extra task found in a dataset's CSVs).

    `overrides` may set any other TaskSpec field (organ, group, primary_metric, hflip, num_points,
    ...), e.g. from a training config. A landmark task's count given as `num_classes` is read as
    its `num_points` (the old spelling, as `TaskSpec.from_dict` reads it).
    """
    return TaskSpec.from_dict({"task_id": task_id, "task_type": task_type, "num_classes": int(num_classes),
                               **overrides})


def resolve_tasks(task_ids, overrides: dict | None = None) -> list[TaskSpec]:
    """TaskSpecs for a list of task ids (or TaskSpecs), with per-task field overrides
    `{task_id: {field: value}}` applied (e.g. from a config)."""
    overrides = overrides or {}
    out = []
    for t in task_ids:
        spec = t if isinstance(t, TaskSpec) else get_task(t)
        if spec.task_id in overrides:
            spec = spec.with_overrides(overrides[spec.task_id])
        out.append(spec)
    return out


__all__ = [
    "TaskSpec",
    "TaskType",
    "TaskTable",
    "UnknownTaskType",
    "TASKS",
    "TASK_TYPES",
    "PRIMARY_METRICS",
    "get_task",
    "load_groups",
    "group_of",
    "apply_groups",
    "make_task",
    "resolve_tasks",
]
