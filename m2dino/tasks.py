"""The FM_UIA task registry: one `TaskSpec` per task, and the clinical groups.

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
from dataclasses import dataclass, replace
from pathlib import Path

_HERE = Path(__file__).resolve().parent
TASKS_FILE = _HERE / "fmuia_tasks.json"
GROUPS_FILE = _HERE / "clinical_groups.json"

TASK_TYPES = ("segmentation", "classification", "detection", "regression")
PRIMARY_METRICS = {
    "segmentation": "dice",
    "classification": "f1_macro",
    "detection": "iou",
    "regression": "mre",
}
# The CSV's `task_name` spellings (the real files write `Regression` with a capital R).
TASK_NAMES = {
    "segmentation": "segmentation",
    "classification": "classification",
    "detection": "detection",
    "regression": "regression",
}
# Spelling the synthetic suite writes, as in the real release.
CSV_TASK_NAMES = {
    "segmentation": "segmentation",
    "classification": "classification",
    "detection": "detection",
    "regression": "Regression",
}


def task_type_from_name(task_name: str) -> str:
    """Map a CSV `task_name` (case-insensitive) to a task type; ValueError when unknown."""
    key = str(task_name).strip().lower()
    if key not in TASK_NAMES:
        raise ValueError(
            f"unknown task_name {task_name!r}; expected one of "
            f"{sorted(set(CSV_TASK_NAMES.values()))}"
        )
    return TASK_NAMES[key]


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    task_type: str  # "segmentation" | "classification" | "detection" | "regression"
    num_classes: int  # seg: incl. background; cls: classes; det: 1; reg: number of points
    organ: str = "unknown"
    group: str = "Other"  # clinical group
    primary_metric: str = ""  # "" -> the task type's default (PRIMARY_METRICS)
    train_size: int = 0
    hflip: bool = True  # horizontal flip keeps the label's meaning

    def __post_init__(self):
        if not isinstance(self.task_id, str) or not self.task_id:
            raise ValueError(f"TaskSpec.task_id must be a non-empty string, got {self.task_id!r}")
        if self.task_type not in TASK_TYPES:
            raise ValueError(
                f"TaskSpec {self.task_id!r}: task_type {self.task_type!r} is not one of {TASK_TYPES}"
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"TaskSpec {self.task_id!r}: num_classes must be an int, got {self.num_classes!r}")
        minimum = {"segmentation": 2, "classification": 2, "detection": 1, "regression": 1}[self.task_type]
        if self.num_classes < minimum:
            raise ValueError(
                f"TaskSpec {self.task_id!r}: a {self.task_type} task needs num_classes >= {minimum}, "
                f"got {self.num_classes}"
            )
        if self.task_type == "detection" and self.num_classes != 1:
            raise ValueError(f"TaskSpec {self.task_id!r}: detection tasks have num_classes == 1 (one box)")
        if not self.primary_metric:
            object.__setattr__(self, "primary_metric", PRIMARY_METRICS[self.task_type])
        if self.primary_metric not in PRIMARY_METRICS.values():
            raise ValueError(
                f"TaskSpec {self.task_id!r}: primary_metric {self.primary_metric!r} is not one of "
                f"{sorted(PRIMARY_METRICS.values())}"
            )
        if int(self.train_size) < 0:
            raise ValueError(f"TaskSpec {self.task_id!r}: train_size must be >= 0")

    @property
    def num_points(self) -> int:
        return self.num_classes if self.task_type == "regression" else 0

    def to_dict(self) -> dict:
        return {
            "task_id": self.task_id,
            "task_type": self.task_type,
            "num_classes": self.num_classes,
            "organ": self.organ,
            "group": self.group,
            "primary_metric": self.primary_metric,
            "train_size": self.train_size,
            "hflip": self.hflip,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TaskSpec.from_dict: unknown field(s) {sorted(unknown)}")
        return cls(**d)


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


def make_task(task_id: str, task_type: str, num_classes: int, **overrides) -> TaskSpec:
    """A TaskSpec for a task outside the registry (an extra task found in a dataset's CSVs).

    `overrides` may set any other TaskSpec field (organ, group, primary_metric, hflip, ...),
    e.g. from a training config.
    """
    return TaskSpec(task_id=task_id, task_type=task_type, num_classes=int(num_classes), **overrides)


def resolve_tasks(task_ids, overrides: dict | None = None) -> list[TaskSpec]:
    """TaskSpecs for a list of task ids (or TaskSpecs), with per-task field overrides
    `{task_id: {field: value}}` applied (e.g. from a config)."""
    overrides = overrides or {}
    out = []
    for t in task_ids:
        spec = t if isinstance(t, TaskSpec) else get_task(t)
        if spec.task_id in overrides:
            spec = replace(spec, **overrides[spec.task_id])
        out.append(spec)
    return out


__all__ = [
    "TaskSpec",
    "TASKS",
    "TASK_TYPES",
    "PRIMARY_METRICS",
    "CSV_TASK_NAMES",
    "get_task",
    "load_groups",
    "group_of",
    "apply_groups",
    "make_task",
    "resolve_tasks",
    "task_type_from_name",
]
