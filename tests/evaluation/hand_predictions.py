"""Data and predictions written by hand for the predict / evaluate tests: a tiny FM_UIA root
whose scores are known (`write_hand_root`, `write_hand_predictions`), and a synthetic suite with
an untrained checkpoint (`write_suite_and_checkpoint`). The fixtures are in conftest.py."""
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

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


def write_hand_root(root: Path) -> Path:
    """A tiny FM_UIA-shaped root: lung (seg, 2 classes), lung_2cls, thyroid_nodule_det, fetal_femur."""
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


SUITE_TASKS = ["cervix_multi", "lung_disease_3cls", "thyroid_nodule_det", "fetal_femur"]


def write_suite_and_checkpoint(base: Path) -> tuple[Path, Path]:
    """A synthetic suite of SUITE_TASKS and an untrained checkpoint of them: (data root, weights)."""
    import torch

    from m2dino.data import write_suite
    from m2dino.models.m2dino import create_model, save_model

    write_suite(base / "data", tasks=SUITE_TASKS, scale=1e-4, min_train=2, min_val=4, workers=1)
    torch.manual_seed(0)
    model = create_model("dinov3_tiny", SUITE_TASKS, num_experts=2, top_k=1, moe_layers=2, img_size=32)
    save_model(model, base / "ckpt" / "best")
    return base / "data", base / "ckpt" / "best.safetensors"
