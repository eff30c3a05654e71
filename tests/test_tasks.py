"""The 27-task registry, task types and their tables, and the clinical groups."""
import dataclasses
import json

import pytest

from m2dino.tasks import (
    PRIMARY_METRICS,
    TASK_TYPES,
    TASKS,
    TaskSpec,
    TaskTable,
    TaskType,
    UnknownTaskType,
    apply_groups,
    get_task,
    load_groups,
    make_task,
    resolve_tasks,
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


def test_task_type_is_a_str_enum_with_the_files_spelling():
    assert TaskType.LANDMARKS == "regression" and TaskType("regression") is TaskType.LANDMARKS
    assert [str(t) for t in TaskType] == ["segmentation", "classification", "detection", "regression"]
    spec = TaskSpec("x", "segmentation", 3)
    assert spec.task_type is TaskType.SEGMENTATION and spec.task_type == "segmentation"
    assert f"{spec.task_type}" == "segmentation" and f"{TaskType.LANDMARKS:<12}|" == "regression  |"
    assert json.dumps({"t": TaskType.LANDMARKS}) == '{"t": "regression"}'
    assert spec.to_dict()["task_type"] == "segmentation" and type(spec.to_dict()["task_type"]) is str
    assert {"regression": 1}[TaskType.LANDMARKS] == 1 and TASK_TYPES == tuple(TaskType)


def test_task_table_accepts_either_spelling_and_names_unknown_types():
    table = TaskTable("things", {"segmentation": 1, TaskType.LANDMARKS: 2})
    assert table["segmentation"] == 1 and table[TaskType.SEGMENTATION] == 1 and table["regression"] == 2
    assert "detection" not in table and table.get("keypoints") is None and list(table) == [
        TaskType.SEGMENTATION, TaskType.LANDMARKS]
    for kind in ("keypoints", "detection"):
        with pytest.raises(UnknownTaskType, match=rf"things: no entry for task type '{kind}'; "
                                                  r"known task types: segmentation, regression"):
            table[kind]
    with pytest.raises(ValueError):  # also a ValueError, for callers that check arguments
        table["keypoints"]
    with pytest.raises(ValueError, match="not a valid TaskType"):
        TaskTable("bad", {"keypoints": 1})


def test_every_layer_has_one_entry_per_task_type():
    from m2dino import tasks as tasks_module
    from m2dino.data import dataset, reader
    from m2dino.evaluation import baselines, bootstrap, metrics, submission, tta
    from m2dino.models import heads
    from m2dino.training import losses

    complete = [heads.HEADS, losses.LOSSES, metrics.METRIC_NAMES, metrics._PER_IMAGE_VALUES,
                metrics._METRICS_FROM_VALUES, tta.TTA, baselines.BASELINES, bootstrap.IMAGE_KEY,
                bootstrap._RESAMPLED, reader.CSV_TASK_NAMES, reader.CSV_COUNT_FIELDS, reader._ANNOTATIONS,
                reader._EXTRA_TASK_COUNTS, dataset._RAW_TARGETS, PRIMARY_METRICS, tasks_module._COUNTS]
    for table in complete:
        assert set(table) == set(TaskType), table.name
    # segmentation predictions are PNG files, every other type has its JSON file
    assert set(submission.SUBMISSION) == set(TaskType) - {TaskType.SEGMENTATION}


def test_landmark_tasks_say_num_points():
    spec = TaskSpec("knee", TaskType.LANDMARKS, num_points=2)
    assert (spec.num_points, spec.num_classes, spec.primary_metric) == (2, 0, "mre")
    with pytest.raises(ValueError, match=r"'knee'.*num_classes == 0, got 2 .*num_points"):
        TaskSpec("knee", "regression", 2)
    with pytest.raises(ValueError, match="num_points >= 1, got 0"):
        TaskSpec("knee", "regression")
    with pytest.raises(ValueError, match="segmentation task needs num_points == 0"):
        TaskSpec("x", "segmentation", 2, num_points=3)
    # make_task keeps its positional count: for a landmark task it is the point count
    assert make_task("knee", "regression", 2) == spec
    assert make_task("knee", "regression", num_points=2) == spec


def test_old_style_task_dict_round_trips_through_from_dict():
    """A checkpoint saved before landmark tasks had num_points holds asdict(TaskSpec) with the
    point count in num_classes (and no num_points field)."""
    old = {"task_id": "IUGC", "task_type": "regression", "num_classes": 3, "organ": "intrapartum", "group": "OB",
           "primary_metric": "mre", "train_size": 2800, "hflip": True}
    spec = TaskSpec.from_dict(old)
    assert spec == get_task("IUGC") and (spec.num_points, spec.num_classes) == (3, 0)
    assert TaskSpec.from_dict(dataclasses.asdict(spec)) == spec  # what a new checkpoint holds
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    new = spec.to_dict()
    assert new["num_points"] == 3 and new["num_classes"] == 0 and new["task_type"] == "regression"
    other = {"task_id": "lung", "task_type": "segmentation", "num_classes": 2}
    assert TaskSpec.from_dict(other).num_classes == 2  # other types are unchanged
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        TaskSpec.from_dict({**old, "colour": "red"})


def test_overrides_read_a_landmark_count_in_either_spelling():
    (old,) = resolve_tasks(["IUGC"], overrides={"IUGC": {"num_classes": 4}})
    (new,) = resolve_tasks(["IUGC"], overrides={"IUGC": {"num_points": 4, "hflip": False}})
    assert (old.num_points, old.num_classes) == (4, 0) and new.num_points == 4 and not new.hflip
    (seg,) = resolve_tasks(["cardiac_multi"], overrides={"cardiac_multi": {"num_classes": 5}})
    assert seg.num_classes == 5
    with pytest.raises(ValueError, match=r"'IUGC': unknown TaskSpec field\(s\) \['points'\]"):
        get_task("IUGC").with_overrides({"points": 4})
