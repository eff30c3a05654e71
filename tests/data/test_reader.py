"""The FM_UIA reader: exact round trip of every annotation type, splits, extra tasks."""

import numpy as np
import pytest
from hand_data import hand_root, save, write_csv

from m2dino.data import (
    DataValidationError,
    load_fmuia,
    make_split,
    read_csvs,
    read_split,
    scan_dataset,
    write_split,
)
from m2dino.data.dataset import raw_target
from m2dino.data.reader import CSV_TASK_NAMES, csv_num_classes, task_type_from_name
from m2dino.tasks import TaskType, get_task


def test_round_trip_every_annotation_type_exactly(tmp_path):
    truth = hand_root(tmp_path)
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    assert scan.task_counts() == {"IUGC": 4, "cardiac_multi": 4, "fetal_head_pos_cls": 4, "thyroid_nodule_det": 4}
    for rec in scan.records:
        i = rec.row
        assert rec.split == "all"
        assert rec.image_path.startswith("../")
        assert rec.csv.startswith("csv_files/")
        if rec.task_type == "segmentation":
            np.testing.assert_array_equal(raw_target(rec)["mask"], truth[("cardiac_multi", i)])
            assert rec.mask_path == f"../Segmentation/Four/cardiac_multi/masks/c{i}.png"
        elif rec.task_type == "classification":
            assert rec.label == i % 8
        elif rec.task_type == "detection":
            assert rec.box == truth[("thyroid_nodule_det", i)]
        else:
            assert rec.points == truth[("IUGC", i)]


def test_windows_separators_resolve_and_still_cannot_escape(tmp_path):
    hand_root(tmp_path / "data", n=1)
    csv_file = tmp_path / "data" / "csv_files" / "Cls-Eight_1.Head_Position.csv"
    lines = csv_file.read_text().splitlines()
    lines[1] = lines[1].replace("../Classification/Eight/Head_Position/0/",
                                "..\\Classification\\Eight\\Head_Position\\0\\")
    lines.append(lines[1].replace("..\\Classification", "..\\..\\..\\Classification").replace("h0", "h9"))
    csv_file.write_text("\n".join(lines) + "\n")
    scan = scan_dataset(tmp_path / "data")
    assert [(p.row, "outside the data root" in p.problem) for p in scan.problems] == [(1, True)]
    (rec,) = [r for r in scan.records if r.task_id == "fetal_head_pos_cls"]
    assert rec.image_path.startswith("..\\") and rec.label == 0


def test_split_is_seeded_per_task_and_stable_when_files_are_added(tmp_path):
    hand_root(tmp_path, n=30)
    recs = read_csvs(tmp_path).records
    s1 = make_split(recs, 0.3, seed=4)
    assert s1 == make_split(list(reversed(recs)), 0.3, seed=4)  # order-independent
    assert s1 != make_split(recs, 0.3, seed=5)
    for val in s1["val"].values():
        assert 1 <= len(val) < 30
    # more files: existing ones keep their side
    hand_root(tmp_path / "bigger", n=60)
    more = read_csvs(tmp_path / "bigger").records
    s2 = make_split(more, 0.3, seed=4)
    for tid in s1["val"]:
        old_paths = {r.image_path for r in recs if r.task_id == tid}
        assert set(s2["val"][tid]) & old_paths == set(s1["val"][tid])
    write_split(s1, tmp_path / "run")
    assert read_split(tmp_path / "run") == s1


def test_load_fmuia_writes_the_split_into_the_run_dir_and_reuses_it(tmp_path):
    hand_root(tmp_path / "data", n=20)
    d1 = load_fmuia(tmp_path / "data", run_dir=tmp_path / "run", seed=1)
    assert (tmp_path / "run" / "split.json").is_file()
    assert len(d1.train) + len(d1.val) == 80 and len(d1.val) >= 4
    assert {r.split for r in d1.train} == {"train"} and {r.split for r in d1.val} == {"val"}
    # a different seed argument does not move rows once the run has its split
    d2 = load_fmuia(tmp_path / "data", run_dir=tmp_path / "run", seed=99)
    assert [r.image_path for r in d2.val] == [r.image_path for r in d1.val]
    d3 = load_fmuia(tmp_path / "data", tasks=["IUGC"])
    assert set(d3.tasks) == {"IUGC"} and {r.task_id for r in d3.train} == {"IUGC"}
    with pytest.raises(ValueError, match="no rows"):
        load_fmuia(tmp_path / "data", tasks=["lung"])


def test_train_and_val_folders_are_used_as_given(tmp_path):
    hand_root(tmp_path / "train", n=5)
    hand_root(tmp_path / "val", n=2, seed=1)
    data = load_fmuia(tmp_path)
    assert len(data.train) == 20 and len(data.val) == 8 and data.split is None
    assert all(r.csv.startswith("val/csv_files/") for r in data.val)


def test_extra_task_from_its_csv_and_overridable(tmp_path):
    hand_root(tmp_path)
    img = np.zeros((10, 12), np.uint8)
    mask = np.zeros((10, 12), np.uint8)
    mask[1:3, 1:3] = 2
    save(tmp_path, "Segmentation/Three/kidney/a.png", img)
    save(tmp_path, "Segmentation/Three/kidney/a_mask.png", mask)
    write_csv(tmp_path / "csv_files" / "Seg-Three_99.kidney.csv", [
        {"image_path": "../Segmentation/Three/kidney/a.png", "task_id": "kidney_stone",
         "task_name": "segmentation", "num_classes": 3, "mask_path": "../Segmentation/Three/kidney/a_mask.png"}])
    save(tmp_path, "Regression/Two/knee/k.png", img)
    write_csv(tmp_path / "csv_files" / "Reg-Two_98.knee.csv", [
        {"image_path": "../Regression/Two/knee/k.png", "task_id": "knee_points", "task_name": "Regression",
         "num_classes": 2, "point_1_xy": "[1, 2]", "point_2_xy": "[3, 4]"}])
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    spec = scan.tasks["kidney_stone"]
    assert (spec.task_type, spec.num_classes, spec.primary_metric) == ("segmentation", 3, "dice")
    knee = scan.tasks["knee_points"]
    assert (knee.task_type, knee.num_points, knee.num_classes) == (TaskType.LANDMARKS, 2, 0)
    assert csv_num_classes(knee) == 2 and csv_num_classes(spec) == 3
    scan = scan_dataset(tmp_path, task_overrides={"kidney_stone": {"organ": "kidney", "hflip": False},
                                                  "knee_points": {"group": "MSK"}})
    assert scan.tasks["kidney_stone"].organ == "kidney" and not scan.tasks["kidney_stone"].hflip
    assert scan.tasks["knee_points"].group == "MSK"
    # a landmark task's count override, in the CSV's spelling (num_classes) or the TaskSpec's
    for field in ("num_classes", "num_points"):
        scan = scan_dataset(tmp_path, task_overrides={"knee_points": {field: 1}})
        assert scan.tasks["knee_points"].num_points == 1 and scan.problems == []
    # an extra task whose spec cannot be made (no num_classes) is reported on every row
    write_csv(tmp_path / "csv_files" / "Cls-X_97.extra.csv", [
        {"image_path": path, "task_id": "mystery", "task_name": "classification", "num_classes": "", "mask": 0}
        for path in ("../Regression/Two/knee/k.png", "../Segmentation/Three/kidney/a.png")])
    bad = scan_dataset(tmp_path).problems
    assert [(p.csv, p.row) for p in bad] == [("csv_files/Cls-X_97.extra.csv", 0), ("csv_files/Cls-X_97.extra.csv", 1)]
    assert "cannot define extra task 'mystery'" in bad[0].problem
    fixed = scan_dataset(tmp_path, task_overrides={"mystery": {"num_classes": 2}})
    assert fixed.problems == [] and fixed.tasks["mystery"].num_classes == 2
    (tmp_path / "csv_files" / "Cls-X_97.extra.csv").unlink()
    # overriding num_classes below the mask values makes the rows invalid, naming them
    scan = scan_dataset(tmp_path, task_overrides={"kidney_stone": {"num_classes": 2}})
    assert [(p.csv, p.row) for p in scan.problems] == [("csv_files/Seg-Three_99.kidney.csv", 0)]


def test_policy_error_lists_everything_and_bad_policy_is_refused(tmp_path):
    hand_root(tmp_path)
    with pytest.raises(ValueError, match="policy"):
        load_fmuia(tmp_path, policy="ignore")
    (tmp_path / "Regression/Three/IUGC/r1.png").unlink()
    (tmp_path / "Detection/thyroid_nodule_det/d2.bmp").unlink()
    with pytest.raises(DataValidationError) as e:
        load_fmuia(tmp_path)
    assert len(e.value.problems) == 2
    assert "csv_files/Reg-Three_26.IUGC.csv row 1" in str(e.value)
    assert "csv_files/Det_23.thyroid_nodule_det.csv row 2" in str(e.value)
    # a run restricted to other tasks is not blocked by these rows
    part = load_fmuia(tmp_path, tasks=["cardiac_multi", "fetal_head_pos_cls"])
    assert len(part.train) + len(part.val) == 8
    with pytest.raises(FileNotFoundError, match="csv_files"):
        scan_dataset(tmp_path / "Regression")


def test_task_name_spellings():
    assert task_type_from_name("Regression") is TaskType.LANDMARKS
    assert task_type_from_name(" REGRESSION ") == "regression"
    assert task_type_from_name("segmentation") is TaskType.SEGMENTATION
    with pytest.raises(ValueError, match="unknown task_name 'keypoints'"):
        task_type_from_name("keypoints")
    assert CSV_TASK_NAMES[TaskType.LANDMARKS] == "Regression"
    assert csv_num_classes(get_task("IUGC")) == 3 and csv_num_classes(get_task("cardiac_multi")) == 4
