"""m2dino.evaluate on hand-made data and predictions (numbers computed by hand), and
m2dino.predict + evaluate on a tiny synthetic suite with a tiny untrained model."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2dino import evaluate as E

H, W = 6, 8


def write_csv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_png(path: Path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def image(root: Path, rel: str):
    write_png(root / rel.replace("../", "", 1), np.full((H, W), 80))
    return rel


@pytest.fixture
def hand_root(tmp_path):
    """A tiny FM_UIA-shaped root: lung (seg, 2 classes), lung_2cls, thyroid_nodule_det, fetal_femur."""
    root = tmp_path / "data"
    csv_dir = root / "csv_files"
    gt1 = np.zeros((H, W), np.uint8)
    gt1[1:3, 2:4] = 1
    write_png(root / "Segmentation/Two/lung/masks/a.png", gt1)
    write_png(root / "Segmentation/Two/lung/masks/b.png", np.zeros((H, W)))
    write_csv(csv_dir / "Seg-Two.lung.csv", ["image_path", "mask_path", "task_id", "task_name", "num_classes"], [
        [image(root, "../Segmentation/Two/lung/images/a.png"), "../Segmentation/Two/lung/masks/a.png", "lung",
         "segmentation", 2],
        [image(root, "../Segmentation/Two/lung/images/b.png"), "../Segmentation/Two/lung/masks/b.png", "lung",
         "segmentation", 2],
    ])
    write_csv(csv_dir / "Cls-Two.lung_2cls.csv", ["image_path", "mask", "task_id", "task_name", "num_classes"], [
        [image(root, f"../Classification/Two/lung/{i}.png"), label, "lung_2cls", "classification", 2]
        for i, label in enumerate([0, 0, 1, 1])
    ])
    write_csv(csv_dir / "Det.thyroid.csv",
              ["image_path", "task_id", "task_name", "num_classes", "x_min", "y_min", "x_max", "y_max"], [
        [image(root, "../Detection/thyroid/0.png"), "thyroid_nodule_det", "detection", 1, 1, 1, 3, 3],
        [image(root, "../Detection/thyroid/1.png"), "thyroid_nodule_det", "detection", 1, 0, 0, 2, 2],
    ])
    write_csv(csv_dir / "Reg-Two_3.fetal_femur.csv",
              ["image_path", "task_id", "task_name", "num_classes", "point_1_xy", "point_2_xy"], [
        [image(root, "../Regression/femur/0.png"), "fetal_femur", "Regression", 2, "[1, 1]", "[5, 5]"],
    ])
    return root


def write_hand_predictions(out: Path):
    pred1 = np.zeros((H, W), np.uint8)
    pred1[1:3, 2:4] = 1  # perfect: Dice 1, HD 0
    pred2 = np.zeros((H, W), np.uint8)
    pred2[0, 0] = 1  # GT empty: Dice 0, HD = diagonal 10
    write_png(out / "Segmentation/Two/lung/masks/a.png", pred1)
    write_png(out / "Segmentation/Two/lung/masks/b.png", pred2)
    p1 = [0.1, 0.8, 0.7, 0.9]
    (out / "classification_predictions.json").write_text(json.dumps([
        {"image_path": f"../Classification/Two/lung/{i}.png", "task_id": "lung_2cls", "predicted_class": c,
         "predicted_probs": [1 - p, p]} for i, (c, p) in enumerate(zip([0, 1, 1, 1], p1))]))
    (out / "detection_predictions.json").write_text(json.dumps([
        {"image_path": "../Detection/thyroid/0.png", "task_id": "thyroid_nodule_det",
         "bbox_normalized": [0, 0, 2 / W, 2 / H], "bbox_pixels": [0, 0, 2, 2]},
        {"image_path": "../Detection/thyroid/1.png", "task_id": "thyroid_nodule_det",
         "bbox_normalized": [0, 0, 4 / W, 2 / H], "bbox_pixels": [0, 0, 4, 2]},
    ]))
    (out / "regression_predictions.json").write_text(json.dumps([
        {"image_path": "../Regression/femur/0.png", "task_id": "fetal_femur",
         "predicted_points_normalized": [1 / W, 1 / H, 8 / W, 9 / H], "predicted_points_pixels": [1, 1, 8, 9]},
    ]))


def test_evaluate_folder_hand_computed(hand_root, tmp_path):
    out = tmp_path / "pred"
    write_hand_predictions(out)
    results = E.evaluate_folder(hand_root, out)
    assert results["num_samples"] == {"fetal_femur": 1, "lung": 2, "lung_2cls": 4, "thyroid_nodule_det": 2}
    assert results["tasks"]["lung"] == {"dice": pytest.approx(0.5), "hd": pytest.approx(5.0)}
    cls = results["tasks"]["lung_2cls"]
    assert cls["accuracy"] == pytest.approx(0.75)
    assert cls["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert cls["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert cls["auc"] == pytest.approx(0.75)
    assert results["tasks"]["thyroid_nodule_det"]["iou"] == pytest.approx((1 / 7 + 0.5) / 2)
    assert results["tasks"]["fetal_femur"]["mre"] == pytest.approx((0 + 5) / 2)  # (5,5) -> (8,9) is 5 px
    assert results["task_types"]["segmentation"]["dice"] == pytest.approx(0.5)
    # the CLI writes the same numbers
    assert E.main(["--data-root", str(hand_root), "--predictions", str(out), "--json", str(tmp_path / "r.json")]) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["tasks"]["lung"]["hd"] == pytest.approx(5.0)
    subset = E.evaluate_folder(hand_root, out, tasks=["fetal_femur"])
    assert list(subset["tasks"]) == ["fetal_femur"]


def test_evaluate_errors_name_the_culprit(hand_root, tmp_path, capsys):
    out = tmp_path / "pred"
    write_hand_predictions(out)
    (out / "Segmentation/Two/lung/masks/b.png").unlink()
    with pytest.raises(E.EvaluationError, match=r"image_path '../Segmentation/Two/lung/images/b.png'"):
        E.evaluate_folder(hand_root, out)
    assert E.main(["--data-root", str(hand_root), "--predictions", str(out)]) == 2
    assert "images/b.png" in capsys.readouterr().err

    write_hand_predictions(out)
    entries = json.loads((out / "detection_predictions.json").read_text())[:1]
    (out / "detection_predictions.json").write_text(json.dumps(entries))
    with pytest.raises(E.EvaluationError, match=r"no prediction for task 'thyroid_nodule_det' image_path '../Detection/thyroid/1.png'"):
        E.evaluate_folder(hand_root, out)

    write_hand_predictions(out)
    (out / "regression_predictions.json").write_text("[{")
    with pytest.raises(E.EvaluationError, match=r"regression_predictions.json: not valid JSON"):
        E.evaluate_folder(hand_root, out)

    write_hand_predictions(out)
    entries = json.loads((out / "classification_predictions.json").read_text())
    entries[2]["predicted_probs"] = [1.0]
    (out / "classification_predictions.json").write_text(json.dumps(entries))
    with pytest.raises(E.EvaluationError, match=r"prediction for '../Classification/Two/lung/2.png': predicted_probs must be 2"):
        E.evaluate_folder(hand_root, out)

    entries[2] = {"image_path": entries[2]["image_path"], "task_id": "lung_2cls"}
    (out / "classification_predictions.json").write_text(json.dumps(entries))
    with pytest.raises(E.EvaluationError, match=r"entry 2 \(../Classification/Two/lung/2.png\) lacks \['predicted_class'"):
        E.evaluate_folder(hand_root, out)

    with pytest.raises(E.EvaluationError, match=r"tasks \['breast_lesion'\] have no rows"):
        E.evaluate_folder(hand_root, out, tasks=["breast_lesion"])
    with pytest.raises(FileNotFoundError, match="no csv_files"):
        E.evaluate_folder(tmp_path / "nowhere", out)


def test_prediction_mask_relpath():
    assert str(E.prediction_mask_relpath("../Segmentation/Two/x/m.png")) == "Segmentation/Two/x/m.png"
    assert str(E.prediction_mask_relpath("Segmentation/m.png")) == "Segmentation/m.png"
    with pytest.raises(E.EvaluationError, match="cannot be placed"):
        E.prediction_mask_relpath("../a/../../etc/passwd")


def test_trivial_baselines_from_reader_records(hand_root):
    from m2dino import metrics
    from m2dino.data.reader import read_csvs

    scan = read_csvs(hand_root)
    out = metrics.trivial_baselines(scan.records, scan.records, scan.tasks)
    # empty mask: image a (class 1 present) Dice 0 / HD 10, image b (empty) Dice 1 / HD 0
    assert out["lung"] == {"dice": pytest.approx(0.5), "hd": pytest.approx(5.0)}
    # labels 0,0,1,1: the tie goes to class 0; F1 class 0 = 2*2/(2*2+2), class 1 = 0
    assert out["lung_2cls"]["accuracy"] == pytest.approx(0.5)
    assert out["lung_2cls"]["f1_macro"] == pytest.approx(1 / 3)
    # mean box [.5, .5, 2.5, 2.5] overlaps each GT box by 1.5 x 1.5 of a 4 + 4 - 2.25 union
    assert out["thyroid_nodule_det"]["iou"] == pytest.approx(2.25 / 5.75)
    assert out["fetal_femur"]["mre"] == pytest.approx(0.0)
