"""A small FM_UIA-shaped data root written by hand, with its known annotations (the reader's
tests compare what is read with them)."""
import csv
import json

import numpy as np
from PIL import Image


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def save(root, rel, array, mode=None):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(p)


def hand_root(root, n=4, seed=0):
    """A small FM_UIA-shaped root with known annotations for each task type."""
    rng = np.random.default_rng(seed)
    truth = {}
    seg, cls, det, reg = [], [], [], []
    for i in range(n):
        h, w = 20 + i % 5, 30 - i % 5
        img = rng.integers(0, 255, (h, w), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[2:8, 3:9] = 1
        mask[10:12, 4:20] = 3
        save(root, f"Segmentation/Four/cardiac_multi/images/c{i}.png", img)
        save(root, f"Segmentation/Four/cardiac_multi/masks/c{i}.png", mask)
        seg.append({"image_path": f"../Segmentation/Four/cardiac_multi/images/c{i}.png", "task_id": "cardiac_multi",
                    "task_name": "segmentation", "num_classes": 4,
                    "mask_path": f"../Segmentation/Four/cardiac_multi/masks/c{i}.png"})
        truth[("cardiac_multi", i)] = mask
        rgb = np.repeat(img[:, :, None], 3, 2)
        save(root, f"Classification/Eight/Head_Position/{i % 8}/h{i}.jpg", rgb)
        cls.append({"image_path": f"../Classification/Eight/Head_Position/{i % 8}/h{i}.jpg",
                    "task_id": "fetal_head_pos_cls", "task_name": "classification", "num_classes": 8,
                    "mask": i % 8})
        save(root, f"Detection/thyroid_nodule_det/d{i}.bmp", img)
        box = (1.25 + i % 5, 2.5, 17.75, 12.0 + i % 5)
        det.append({"image_path": f"../Detection/thyroid_nodule_det/d{i}.bmp", "task_id": "thyroid_nodule_det",
                    "task_name": "detection", "num_classes": 1,
                    **dict(zip(("x_min", "y_min", "x_max", "y_max"), map(str, box)))})
        truth[("thyroid_nodule_det", i)] = box
        save(root, f"Regression/Three/IUGC/r{i}.png", img)
        pts = ((1.5, 2.25), (10.0 + i % 5, 3.0), (w, h))  # the far corner is inside ([0, W] x [0, H])
        reg.append({"image_path": f"../Regression/Three/IUGC/r{i}.png", "task_id": "IUGC", "task_name": "Regression",
                    "num_classes": 3, **{f"point_{k + 1}_xy": json.dumps(list(p)) for k, p in enumerate(pts)}})
        truth[("IUGC", i)] = pts
    write_csv(root / "csv_files" / "Seg-Four_2.cardiac_multi.csv", seg)
    write_csv(root / "csv_files" / "Cls-Eight_1.Head_Position.csv", cls)
    write_csv(root / "csv_files" / "Det_23.thyroid_nodule_det.csv", det)
    write_csv(root / "csv_files" / "Reg-Three_26.IUGC.csv", reg)
    return truth
