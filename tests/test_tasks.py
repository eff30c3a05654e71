"""The 27-task registry and the clinical groups."""
import json

import pytest

from m2dino.tasks import (
    TASKS,
    TaskSpec,
    apply_groups,
    get_task,
    load_groups,
    make_task,
    resolve_tasks,
    task_type_from_name,
)


def test_registry_has_the_27_fmuia_tasks_with_their_types_and_counts():
    assert len(TASKS) == 27
    by_type = {}
    for t in TASKS.values():
        by_type.setdefault(t.task_type, []).append(t.task_id)
    assert {k: len(v) for k, v in by_type.items()} == {
        "segmentation": 12, "classification": 9, "detection": 3, "regression": 3}
    assert get_task("cardiac_multi").num_classes == 4
    assert get_task("fetal_abdomen_multi").num_classes == 5
    assert get_task("fetal_head_pos_cls").num_classes == 8
    assert get_task("fetal_plane_cls").num_classes == 6
    assert get_task("IUGC").num_points == 3
    assert get_task("FUGC").num_points == 2
    assert get_task("fetal_head").num_points == 0
    assert get_task("thyroid_nodule_det").num_classes == 1
    assert get_task("fetal_plane_cls").train_size == 7400
    assert sum(t.train_size for t in TASKS.values()) == pytest.approx(40000, rel=0.1)


def test_primary_metric_follows_type_and_position_tasks_do_not_flip():
    metric = {"segmentation": "dice", "classification": "f1_macro", "detection": "iou", "regression": "mre"}
    for t in TASKS.values():
        assert t.primary_metric == metric[t.task_type]
    assert not get_task("fetal_head_pos_cls").hflip
    assert not get_task("fetal_sacral_pos_cls").hflip
    assert get_task("breast_lesion").hflip


def test_default_groups_match_issue_and_cover_every_task_once():
    groups = load_groups()
    assert set(groups) == {"OB", "Breast", "Lung", "Thyroid", "Cardiovascular", "Gynecology", "Other"}
    assert len(groups["OB"]) == 12
    assert groups["Breast"] == ["breast_lesion", "breast_2cls", "breast_3cls"]
    members = [t for g in groups.values() for t in g]
    assert sorted(members) == sorted(TASKS)
    for g, ts in groups.items():
        for t in ts:
            assert TASKS[t].group == g
    # OB is the data-rich group, breast the data-scarce one (as the paper reports)
    n = {g: sum(TASKS[t].train_size for t in ts) for g, ts in groups.items()}
    assert n["OB"] > 5 * n["Breast"]


def test_groups_file_replaces_defaults(tmp_path):
    y = tmp_path / "g.yaml"
    y.write_text("A: [fetal_head, lung]\nB: [breast_lesion]\n")
    assert load_groups(y) == {"A": ["fetal_head", "lung"], "B": ["breast_lesion"]}
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"groups": {"X": ["cervix"]}}))
    assert load_groups(j) == {"X": ["cervix"]}
    specs = apply_groups([TASKS["cervix"], TASKS["lung"]], load_groups(j))
    assert [s.group for s in specs] == ["X", "Other"]


def test_bad_groups_files_raise_naming_the_file(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("A: [lung]\nB: [lung]\n")
    with pytest.raises(ValueError, match="dup.yaml.*two groups"):
        load_groups(dup)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_groups(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_groups(tmp_path / "missing.yaml")


def test_taskspec_validation_and_extra_tasks():
    with pytest.raises(ValueError, match="task_type"):
        TaskSpec("x", "keypoints", 2)
    with pytest.raises(ValueError, match="num_classes >= 2"):
        TaskSpec("x", "segmentation", 1)
    with pytest.raises(ValueError, match="detection"):
        TaskSpec("x", "detection", 2)
    extra = make_task("kidney_stone", "segmentation", 3, organ="kidney", hflip=False)
    assert extra.primary_metric == "dice" and extra.group == "Other" and not extra.hflip
    assert TaskSpec.from_dict(extra.to_dict()) == extra
    with pytest.raises(KeyError, match="unknown task_id 'nope'"):
        get_task("nope")
    (spec,) = resolve_tasks(["lung"], overrides={"lung": {"group": "Chest"}})
    assert spec.group == "Chest" and spec.num_classes == 2


def test_task_name_spellings():
    assert task_type_from_name("Regression") == "regression"
    assert task_type_from_name("segmentation") == "segmentation"
    with pytest.raises(ValueError, match="unknown task_name 'keypoints'"):
        task_type_from_name("keypoints")
