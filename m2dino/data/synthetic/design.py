"""The suite's transfer design: which tasks share what, declared, machine-readable, shipped.

`write_suite` writes it as design.json beside synthetic.json; `load_design(root)` reads it back
as a `Design`; docs/data.md documents the schema. Every relation follows from the generator's
recipes (scenes.RECIPES) by the rules below, except the conflicts, which are declared here with
their mechanism; tests/data/test_design.py checks each against what the generator does.

A factor is a latent variable of a scene (a structure's place, size and shape, or a cue such
as a lesion's margin); a task `shows` the factors that vary in its images and `reads` those
its label is a function of. For a pair of tasks:
- positive: both labels read a common factor (the same structure, drawn by the same code), or
  one label says which structure is drawn (fetal_plane_cls, organ_cls: `identifies`) and the
  other reads that structure. A model that has learnt the factor for one task has what the
  other needs.
- conflict: the two labels are one clinical variable read from different cues of the same
  images, and one task's training images carry the other's cue as a shortcut: there it always
  agrees with the label, in validation and in the other task's images it varies independently
  (their labels agree at chance). That task must ignore the cue the other learns to read, so a
  model that trains both strengthens the wrong cue for it (declared in CONFLICTS; the shortcut
  is the recipe's `train_given`).
- none: no common factor. `shared_scene` (both draw from a common scene family) and
  `same_acquisition` (same clinical group, hence the same scanner) say what they still share.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from m2dino.data.synthetic.acquisition import ACQUISITIONS, DEFAULT_ACQUISITION
from m2dino.data.synthetic.scenes import FAMILIES, RECIPES

DESIGN_FILE = "design.json"
SCHEMA_VERSION = 1
RELATIONS = ("positive", "conflict", "none")

# What each factor is (the generator draws it; scenes.py has the ranges).
FACTORS = {
    "fetal_skull": "the fetal head: skull ellipse centre, axes and angle (brain plane and intrapartum view)",
    "symphysis": "the pubic symphysis: a bright bar's centre, length, angle and thickness",
    "fetal_position": "fetal position, 8 directions at 45 degrees: where the bony landmark (occiput marker in the "
                      "head, sacral arc in the pelvis) lies from the centre of the round fetal part",
    "fetal_pelvis": "the breech fetal pelvis: centre, radius",
    "fetal_abdomen": "the fetal abdomen: outline, stomach side and angle, umbilical vein, spine direction",
    "fetal_thorax": "the fetal thorax and the four-chamber heart inside it",
    "femur": "the femur: centre, length, angle",
    "cervix": "the cervix: centre, length, width, angle (lips and canal follow)",
    "breast_lesion": "whether a breast lesion is present, and its centre, size, orientation and base outline",
    "margin": "the breast lesion's margin: circumscribed (smooth) or spiculated",
    "echotexture": "the breast lesion's inside: homogeneous, or heterogeneous (mottled with bright foci)",
    "posterior": "what lies behind the breast lesion: nothing, enhancement or shadowing",
    "thyroid_lobe": "the thyroid lobe with the carotid and trachea beside it",
    "thyroid_nodule": "the thyroid nodule: centre, size, outline, hypoechoic or isoechoic with a dark halo",
    "pleura": "the pleural line's depth and the two ribs whose shadows bound the lung field",
    "lung_pattern": "the lung pattern below the pleura: A-lines, B-lines or a consolidation, and how conspicuous "
                    "its lines are",
    "liver_lesion": "the liver lesion: place, size, outline and kind (hyperechoic benign / hypoechoic with halo)",
    "cardiac_chambers": "the left ventricle, its myocardium and the left atrium (the RV follows)",
    "carotid_vessel": "the carotid artery: lumen centre, radius, wall",
    "ovarian_mass": "the ovarian mass: centre, size, outline",
    "fibroid": "the uterine fibroid: centre, size, angle",
    "spinal_cord": "the spinal canal (depth, width, tilt) and the injury focus inside the cord",
}

# The declared conflicts: {pair: (clinical variable, {task: the cue it reads}, mechanism)}.
CONFLICTS = {
    ("breast_2cls", "breast_3cls"): (
        "malignancy", {"breast_2cls": "posterior", "breast_3cls": "echotexture"},
        "Both labels say benign or malignant for lesion images of one breast scene: breast_2cls reads it from the "
        "posterior feature (enhancement or shadowing), breast_3cls from the inside's echotexture. In breast_2cls's "
        "training images the echotexture always agrees with its label (the cues co-occur: a shortcut); in its "
        "validation images and in breast_3cls's they are drawn independently, so the two labels agree on half the "
        "lesions. breast_2cls must ignore the echotexture, the cue breast_3cls learns to read: a model trained on "
        "both strengthens the shortcut, and breast_2cls's validation score falls with its reliance on it."),
}


def _task_group() -> dict[str, str]:
    from m2dino.tasks import group_of, load_groups

    return group_of(load_groups())


def _families(task_id: str) -> tuple[str, ...]:
    recipe = RECIPES[task_id]
    return recipe.identifies or (recipe.family,)


def _identified(task_id: str) -> dict[str, str]:
    """{factor: family} of the structures a scene classifier's classes name (anatomy, if any)."""
    return {FAMILIES[f].anatomy: f for f in RECIPES[task_id].identifies if FAMILIES[f].anatomy}


def _shows(task_id: str) -> tuple[str, ...]:
    recipe = RECIPES[task_id]
    if recipe.identifies:  # every factor of every family its classes draw
        return tuple(sorted({name for f in recipe.identifies for name in _factor_names(f)}))
    return recipe.shows


def _factor_names(family: str) -> set[str]:
    """The factors a family's images show (those its tasks' recipes list)."""
    return {f for r in RECIPES.values() if not r.identifies and r.family == family for f in r.shows}


def pair_design(a: str, b: str, group: dict[str, str]) -> dict:
    """The designed relation of tasks a and b with the factors behind it (the rules of the module docstring)."""
    key = (a, b) if (a, b) in CONFLICTS else (b, a)
    shared = set(RECIPES[a].reads) & set(RECIPES[b].reads)
    via_identity = sorted((set(_identified(a)) & set(RECIPES[b].reads)) | (set(_identified(b)) & set(RECIPES[a].reads)))
    shared = sorted(shared | set(via_identity))
    entry = {
        "tasks": [a, b],
        "group": group.get(a, DEFAULT_ACQUISITION) if group.get(a) == group.get(b) else None,
        "relation": "positive" if shared else "none",
        "factors": shared,
        "via_identity": via_identity,
        "conflicting": [],
        "shared_scene": bool(set(_families(a)) & set(_families(b))),
        "same_acquisition": group.get(a, DEFAULT_ACQUISITION) == group.get(b, DEFAULT_ACQUISITION),
        "note": "",
    }
    if key in CONFLICTS:
        variable, cues, mechanism = CONFLICTS[key]
        entry.update(relation="conflict", variable=variable, note=mechanism,
                     conflicting=[{"cue": cue, "read_by": t, "ignored_by": b if t == a else a}
                                  for t, cue in cues.items()],
                     shortcuts=[{"task": t, "cue": cue} for t in (a, b) for cue in training_shortcuts(t)])
        entry["factors"] = sorted(set(shared) | set(cues.values()))
    elif via_identity:
        entry["note"] = "one label names which structure is drawn, the other reads that structure"
    return entry


def training_shortcuts(task_id: str) -> list[str]:
    """The factors a task's training images tie to its label beyond what the label reads."""
    recipe = RECIPES[task_id]
    return sorted(recipe.train_given(0)) if recipe.train_given else []


def _group_relation(pairs: list[dict]) -> str:
    relations = {p["relation"] for p in pairs}
    return "conflict" if "conflict" in relations else "positive" if "positive" in relations else "none"


def transfer_design(tasks=None) -> dict:
    """The design of the suite's tasks (default: all 27) as design.json holds it."""
    from m2dino.tasks import TASKS, load_groups

    task_ids = list(tasks or TASKS)
    group = _task_group()
    pairs = [pair_design(a, b, group) for a, b in combinations(task_ids, 2)]
    groups = {}
    for name, members in load_groups().items():
        chosen = [t for t in members if t in task_ids]
        if not chosen:
            continue
        inside = [p for p in pairs if p["group"] == name]
        groups[name] = {"tasks": chosen, "relation": _group_relation(inside),
                        "positive_pairs": sum(p["relation"] == "positive" for p in inside),
                        "conflict_pairs": sum(p["relation"] == "conflict" for p in inside),
                        "none_pairs": sum(p["relation"] == "none" for p in inside),
                        "acquisition": ACQUISITIONS.get(name, ACQUISITIONS[DEFAULT_ACQUISITION]).to_dict()}
    return {
        "schema_version": SCHEMA_VERSION,
        "relations": {"positive": "both labels read a common factor (or one names the structure the other reads)",
                      "conflict": "one clinical variable read from two cues of the same images; one task's "
                                  "training images carry the other's cue as a shortcut, which it must ignore",
                      "none": "no common factor (shared_scene / same_acquisition say what they still share)"},
        "factors": {name: {"description": FACTORS[name],
                           "read_by": [t for t in task_ids if name in RECIPES[t].reads],
                           "shown_by": [t for t in task_ids if name in _shows(t)]} for name in FACTORS},
        "tasks": {t: {"group": group.get(t, DEFAULT_ACQUISITION), "families": list(_families(t)),
                      "shows": list(_shows(t)), "reads": list(RECIPES[t].reads),
                      "training_shortcuts": training_shortcuts(t),
                      "identifies": sorted(_identified(t))} for t in task_ids},
        "groups": groups,
        "pairs": pairs,
    }


def write_design(root, tasks=None) -> Path:
    from m2dino.io import write_json

    path = Path(root) / DESIGN_FILE
    write_json(path, transfer_design(tasks))
    return path


# ============================================================================ reading it back


@dataclass(frozen=True)
class Design:
    """A suite's design.json, read: the raw mapping plus lookups by task pair and group."""

    path: Path
    data: dict

    @property
    def tasks(self) -> dict:
        return self.data["tasks"]

    @property
    def groups(self) -> dict:
        return self.data["groups"]

    @property
    def factors(self) -> dict:
        return self.data["factors"]

    @property
    def pairs(self) -> list[dict]:
        return self.data["pairs"]

    def pair(self, a: str, b: str) -> dict:
        """The entry of the unordered pair {a, b}."""
        for entry in self.pairs:
            if set(entry["tasks"]) == {a, b} and a != b:
                return entry
        raise KeyError(f"{self.path}: no designed pair ({a!r}, {b!r})")

    def relation(self, a: str, b: str) -> str:
        return self.pair(a, b)["relation"]

    def group_pairs(self, group: str) -> list[dict]:
        return [p for p in self.pairs if p["group"] == group]


def find_design(root) -> Path | None:
    """design.json of a suite: `root` itself if a file, else in `root` or its parent (a split's
    folder, train/ or val/); None if there is none (e.g. real FM_UIA data)."""
    root = Path(root)
    if root.is_file():
        return root
    for folder in (root, root.parent):
        if (folder / DESIGN_FILE).is_file():
            return folder / DESIGN_FILE
    return None


def load_design(root) -> Design:
    """The transfer design of the synthetic suite at `root` (the suite's folder, its train/ or
    val/, or the design.json file). Errors name the file and what is wrong with it."""
    path = find_design(root)
    if path is None:
        raise FileNotFoundError(f"no {DESIGN_FILE} in {root} or its parent: not a synthetic suite "
                                f"(written by m2dino.data.synthetic since generator version 6)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable JSON: {err}") from err
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {data.get('schema_version') if isinstance(data, dict) else None!r}, "
                         f"this code reads {SCHEMA_VERSION}")
    missing = [k for k in ("factors", "tasks", "groups", "pairs") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    for i, entry in enumerate(data["pairs"]):
        if entry.get("relation") not in RELATIONS or len(entry.get("tasks", ())) != 2:
            raise ValueError(f"{path}: pairs[{i}] is not a pair of tasks with a relation in {RELATIONS}: {entry}")
    return Design(path, data)
