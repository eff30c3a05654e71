"""Bad data: every defect is reported with its csv and row, training
input refuses it under policy "error" and drops exactly those rows under "skip", and no
file outside the data root is ever opened."""
import builtins
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from m2dino.data import DataValidationError, load_fmuia, scan_dataset
from m2dino.data import check as check_cli
from m2dino.data.dataset import FMUIADataset
from m2dino.data.synthetic import write_suite

TASKS = ["cardiac_multi", "breast_3cls", "thyroid_nodule_det", "IUGC"]


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _first_row(csv_dir, prefix):
    (path,) = [p for p in csv_dir.iterdir() if p.name.startswith(prefix)]
    with open(path, newline="") as f:
        return next(csv.DictReader(f))


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    """A synthetic suite plus one CSV per task type full of defects; returns (root, expected)
    with expected = {(csv, row): words the problem must contain}."""
    base = tmp_path_factory.mktemp("bad")
    root = base / "data"
    write_suite(root, tasks=TASKS, scale=1e-4, min_train=4, min_val=2, workers=1)
    outside = base / "outside"
    outside.mkdir()
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(outside / "secret.png")
    _csv(outside / "evil.csv", ["image_path", "task_id", "task_name", "num_classes", "mask"],
         [["../../../outside/secret.png", "breast_3cls", "classification", 3, 0]])

    tr = root / "train"
    C = tr / "csv_files"
    seg = _first_row(C, "Seg-Four")
    img_rel, mask_rel = seg["image_path"], seg["mask_path"]
    img_file = (C / img_rel).resolve()
    folder = img_file.parent
    h, w = np.asarray(Image.open(img_file)).shape[:2]

    data = img_file.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "junk.png").write_bytes(b"this is not an image" * 10)
    Image.fromarray(np.zeros((h + 3, w), np.uint8)).save(folder / "wrong_size_mask.png")
    big = np.zeros((h, w), np.uint8)
    big[0, 0] = 7
    Image.fromarray(big).save(folder / "value7_mask.png")
    ok_image = np.asarray(Image.open(img_file))
    for name in ("size_img", "value_img", "mask_escape_img", "no_mask_img"):  # distinct good images
        Image.fromarray(ok_image).save(folder / f"{name}.png")
    os.symlink(outside / "secret.png", folder / "link.png")
    rel = os.path.dirname(img_rel)  # "../Segmentation/Four/cardiac_multi/images"
    S = ["cardiac_multi", "segmentation", 4]
    seg_rows = [
        [f"{rel}/nope.png", *S, mask_rel],                                # 0 missing image
        [f"{rel}/truncated.png", *S, mask_rel],                           # 1 truncated image
        [f"{rel}/junk.png", *S, mask_rel],                                # 2 undecodable image
        [f"{rel}/mask_escape_img.png", *S, "../../../outside/secret.png"],  # 3 mask escapes via ../
        [f"{rel}/size_img.png", *S, f"{rel}/wrong_size_mask.png"],        # 4 mask of another size
        [f"{rel}/value_img.png", *S, f"{rel}/value7_mask.png"],           # 5 mask value >= num_classes
        ["../../../outside/secret.png", *S, mask_rel],                    # 6 image escapes via ../
        [f"{rel}/link.png", *S, mask_rel],                                # 7 image escapes via symlink
        [img_rel, *S, mask_rel],                                          # 8 duplicated row
        [f"{rel}/../../../../../../outside/secret.png", *S, mask_rel],    # 9 escapes the long way
        [img_rel.replace(".png", "Y.png"), "cardiac_multi", "segmentation", 5, mask_rel],  # 10 num_classes
        [f"{rel}/no_mask_img.png", *S, "../Segmentation/none.png"],       # 11 missing mask
    ]
    _csv(C / "Seg-Four_90.defects.csv", ["image_path", "task_id", "task_name", "num_classes", "mask_path"], seg_rows)

    cls = _first_row(C, "Cls-Three")
    K = ["breast_3cls", "classification", 3]
    _csv(C / "Cls-Three_91.defects.csv", ["image_path", "task_id", "task_name", "num_classes", "mask"], [
        [cls["image_path"][:-4] + "_a.jpg", *K, 3],          # 0 label out of range (and image missing)
        [cls["image_path"], "breast_3cls", "classifcation", 3, 1],  # 1 unknown task_name
        [cls["image_path"], *K, "1.5"],                      # 2 label not an integer
    ])
    det = _first_row(C, "Det_")
    dimg = (C / det["image_path"]).resolve()
    dw, dh = Image.open(dimg).size
    D = ["thyroid_nodule_det", "detection", 1]
    for i in range(3):
        (dimg.parent / f"copy{i}{dimg.suffix}").write_bytes(dimg.read_bytes())
    drel = os.path.dirname(det["image_path"])
    _csv(C / "Det_92.defects.csv",
         ["image_path", "task_id", "task_name", "num_classes", "x_min", "y_min", "x_max", "y_max"], [
        [f"{drel}/copy0{dimg.suffix}", *D, 30, 10, 20, 40],          # 0 inverted box
        [f"{drel}/copy1{dimg.suffix}", *D, 5, 10, 5, 40],            # 1 zero width
        [f"{drel}/copy2{dimg.suffix}", *D, 5, 10, dw + 10, dh - 1],  # 2 outside the image
    ])
    reg = _first_row(C, "Reg-Three")
    rimg = (C / reg["image_path"]).resolve()
    rw, rh = Image.open(rimg).size
    rrel = os.path.dirname(reg["image_path"])
    for i in range(3):
        (rimg.parent / f"copy{i}{rimg.suffix}").write_bytes(rimg.read_bytes())
    R = ["IUGC", "Regression", 3]
    _csv(C / "Reg-Three_93.defects.csv",
         ["image_path", "task_id", "task_name", "num_classes", "point_1_xy", "point_2_xy", "point_3_xy"], [
        [f"{rrel}/copy0{rimg.suffix}", *R, "[NaN, 3.0]", "[1, 1]", "[2, 2]"],           # 0 NaN point
        [f"{rrel}/copy1{rimg.suffix}", *R, "[1, 1]", f"[{rw + 5}, 3]", "[2, 2]"],      # 1 outside
        [f"{rrel}/copy2{rimg.suffix}", *R, "[1, 1]", "[2, 2]", "[3, 3"],              # 2 not JSON
    ])
    os.symlink(outside / "evil.csv", C / "Cls-Three_94.linked.csv")

    seg_csv, cls_csv = "train/csv_files/Seg-Four_90.defects.csv", "train/csv_files/Cls-Three_91.defects.csv"
    det_csv, reg_csv = "train/csv_files/Det_92.defects.csv", "train/csv_files/Reg-Three_93.defects.csv"
    expected = {
        (seg_csv, 0): "image file missing",
        (seg_csv, 1): "cannot be decoded",
        (seg_csv, 2): "cannot be decoded",
        (seg_csv, 3): "mask_path '../../../outside/secret.png' resolves outside the data root",
        (seg_csv, 4): "mask size",
        (seg_csv, 5): "mask value 7 >= num_classes 4",
        (seg_csv, 6): "resolves outside the data root",
        (seg_csv, 7): "resolves outside the data root",
        (seg_csv, 8): "duplicated row",
        (seg_csv, 9): "resolves outside the data root",
        (seg_csv, 10): "num_classes '5' inconsistent",
        (seg_csv, 11): "mask file missing",
        (cls_csv, 0): "class label 3 out of range",  # reported with the missing image
        (cls_csv, 1): "unknown task_name 'classifcation'",
        (cls_csv, 2): "not an integer",
        (det_csv, 0): "zero or negative area",
        (det_csv, 1): "zero or negative area",
        (det_csv, 2): "not inside the image",
        (reg_csv, 0): "not finite",
        (reg_csv, 1): "outside the image",
        (reg_csv, 2): "not a JSON [x, y] pair",
        ("train/csv_files/Cls-Three_94.linked.csv", -1): "csv file resolves outside the data root",
    }
    return root, outside, expected


@pytest.fixture
def opened(monkeypatch):
    """Every path any open() / PIL.Image.open receives during the test."""
    seen = []

    def recording(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)):
                seen.append(Path(os.fsdecode(path)))
            return real(path, *args, **kwargs)
        return call

    for owner in (builtins, io, os, PIL.Image):
        monkeypatch.setattr(owner, "open", recording(owner.open))
    return seen


def _assert_nothing_outside(seen, outside):
    outside = outside.resolve()
    leaked = [p for p in seen if Path(os.path.realpath(p)).is_relative_to(outside)]
    assert leaked == []
    assert seen, "the recorder saw no open at all: the patch is not effective"


def test_check_reports_every_defect_with_csv_and_row(bad_root, opened):
    root, outside, expected = bad_root
    scan = scan_dataset(root)
    got = {}
    for p in scan.problems:
        got.setdefault((p.csv, p.row), []).append(p.problem)
    for key, words in expected.items():
        assert key in got, f"no problem reported for {key} ({words})"
        assert any(words in text for text in got[key]), (key, got[key])
    assert set(got) == set(expected), set(got) ^ set(expected)  # the clean rows stay clean
    _assert_nothing_outside(opened, outside)


def test_check_cli_json_and_exit_code(bad_root, opened, capsys):
    root, outside, expected = bad_root
    assert check_cli.main([str(root), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"tasks", "problems"}
    assert {(p["csv"], p["row"]) for p in out["problems"]} == set(expected)
    assert all(set(p) == {"csv", "row", "problem"} for p in out["problems"])
    assert out["tasks"]["cardiac_multi"] == 4 + 2 + 12  # train + val good rows + 12 defect rows
    assert check_cli.main([str(root)]) == 1
    text = capsys.readouterr().out
    assert "train/csv_files/Det_92.defects.csv row 0: box [30.0, 10.0, 20.0, 40.0] has zero or negative area" in text
    _assert_nothing_outside(opened, outside)


def test_policy_error_refuses_and_skip_drops_exactly_the_bad_rows(bad_root, tmp_path, opened):
    root, outside, expected = bad_root
    with pytest.raises(DataValidationError) as e:
        load_fmuia(root, policy="error")
    assert {(p.csv, p.row) for p in e.value.problems} == set(expected)
    assert "Seg-Four_90.defects.csv row 7" in str(e.value) and "skip" in str(e.value)

    data = load_fmuia(root, policy="skip", run_dir=tmp_path / "run")
    skipped = json.loads((tmp_path / "run" / "skipped_rows.json").read_text())
    assert {(s["csv"], s["row"]) for s in skipped} == set(expected)
    bad = set(expected)
    assert not any((r.csv, r.row) in bad for r in data.train + data.val)
    assert data.task_counts("train") == {"IUGC": 4, "breast_3cls": 4, "cardiac_multi": 4, "thyroid_nodule_det": 4}
    # what survives loads
    ds = FMUIADataset(data.train, data.tasks, image_size=32, train=True)
    for i in range(len(ds)):
        assert ds[i]["image"].shape == (3, 32, 32)
    _assert_nothing_outside(opened, outside)
