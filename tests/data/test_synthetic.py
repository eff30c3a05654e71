"""The synthetic FM_UIA suite: layout, sizes, validity of every task's annotations,
determinism, the atomic cache, and that the class labels are learnable from the pixels."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from m2dino.data import scan_dataset
from m2dino.data.synthetic import (
    DIFFICULTY,
    GENERATOR_VERSION,
    build,
    default_cache_root,
    ensure_synthetic,
    task_sizes,
    write_suite,
)
from m2dino.data.synthetic.__main__ import main
from m2dino.tasks import TASKS

SMALL = ["fetal_head", "cardiac_multi", "fetal_head_pos_cls", "thyroid_nodule_det", "IUGC", "FUGC"]


def tiny(out, seed=0, tasks=SMALL):
    return write_suite(out, tasks=tasks, seed=seed, scale=1e-4, min_train=3, min_val=2, workers=1)


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "synthetic.json":
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_the_default_run_has_a_real_data_scale_split():
    """The default run's suite spans at least 10x in training size, few tasks sit on the
    minimum, and each side of the median (the report's default threshold) holds a third."""
    from m2dino.training.config import TrainConfig

    sizes = task_sizes(TrainConfig().synthetic_scale)
    assert set(sizes) == set(TASKS) and set(DIFFICULTY) == set(TASKS)
    train = np.array([n for n, _ in sizes.values()])
    val = sum(v for _, v in sizes.values())
    assert train.max() >= 10 * train.min()
    assert (train == train.min()).sum() <= 3
    threshold = np.median(train)
    assert (train >= threshold).sum() >= len(train) / 3 and (train < threshold).sum() >= len(train) / 3
    assert 1200 <= train.sum() <= 3000 and val >= 100 * len(TASKS)
    assert min(v for _, v in sizes.values()) >= 100
    # the real order of sizes is kept: the largest and smallest real tasks stay so
    assert max(sizes, key=lambda t: sizes[t][0]) == "fetal_plane_cls"
    assert min(sizes, key=lambda t: sizes[t][0]) == "fetal_heart"
    assert task_sizes(scale=0.5)["fetal_plane_cls"] == (3700, 740)  # the largest keeps scale x its size
    with pytest.raises(ValueError, match="scale"):
        task_sizes(scale=0)


@pytest.mark.parametrize("task_id", list(TASKS))
def test_every_task_builds_valid_annotations(task_id):
    spec = TASKS[task_id]
    for i in range(2):
        rng = np.random.default_rng([5, i])
        img, ann = build(task_id, rng, (100 + 40 * i, 150 - 30 * i))
        h, w = img.shape
        assert img.dtype == np.uint8 and img.std() > 10  # a real image, not blank
        if spec.task_type == "segmentation":
            m = ann["mask"]
            assert m.shape == (h, w) and m.max() < spec.num_classes
            assert set(np.unique(m)) == set(range(spec.num_classes))  # every class present
        elif spec.task_type == "classification":
            assert 0 <= ann["label"] < spec.num_classes
        elif spec.task_type == "detection":
            x0, y0, x1, y1 = ann["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        else:
            pts = np.asarray(ann["points"])
            assert pts.shape == (spec.num_points, 2)
            assert (pts >= 0).all() and (pts[:, 0] <= w).all() and (pts[:, 1] <= h).all()


def test_layout_matches_fmuia_and_reads_clean(tmp_path):
    summary = tiny(tmp_path)
    assert summary["total_train"] == 3 * len(SMALL)
    for split in ("train", "val"):
        names = sorted(p.name for p in (tmp_path / split / "csv_files").iterdir())
        assert "Seg-Four_2.cardiac_multi.csv" in names and "Reg-Three_26.IUGC.csv" in names
        assert "Det_23.thyroid_nodule_det.csv" in names and "Cls-Eight_15.fetal_head_pos_cls.csv" in names
    text = (tmp_path / "train/csv_files/Reg-Three_26.IUGC.csv").read_text().splitlines()
    assert text[0] == "image_path,task_id,task_name,num_classes,point_1_xy,point_2_xy,point_3_xy"
    assert text[1].startswith("../Regression/Three/IUGC/") and ",IUGC,Regression,3," in text[1]
    assert re.search(r'"\[[\d.]+, [\d.]+\]"', text[1])
    seg = (tmp_path / "train/csv_files/Seg-Four_2.cardiac_multi.csv").read_text().splitlines()[1]
    assert "../Segmentation/Four/cardiac_multi/images/" in seg and "../Segmentation/Four/cardiac_multi/masks/" in seg
    masks = list((tmp_path / "train/Segmentation").rglob("masks/*.png"))
    assert masks and all(Image.open(p).mode == "L" for p in masks)
    suffixes = {p.suffix for p in tmp_path.rglob("*") if p.is_file() and "masks" not in p.parts} - {".csv", ".json"}
    assert len(suffixes) >= 2
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    assert {t: n for t, n in scan.task_counts().items()} == {t: 5 for t in SMALL}


def test_deterministic_for_a_seed(tmp_path):
    tiny(tmp_path / "a", seed=1)
    tiny(tmp_path / "b", seed=1)
    tiny(tmp_path / "c", seed=2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_cache_writes_once_atomically_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("M2DINO_CACHE", str(tmp_path / "cache"))
    assert default_cache_root(0.06, 0) == tmp_path / "cache" / "synthetic-0.06-0"
    root = tmp_path / "cache" / "s"
    kw = dict(tasks=["lung_2cls"], min_train=3, min_val=2, workers=1)
    assert ensure_synthetic(root, scale=1e-4, seed=0, **kw) == root
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(root, scale=1e-4, seed=0, **kw) == root
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == ["s"]  # no temp dir left behind
    assert json.loads((root / "synthetic.json").read_text())["sizes"] == {"lung_2cls": {"train": 3, "val": 2}}
    # a suite from an older generator is replaced (atomically), not reused
    meta = json.loads((root / "synthetic.json").read_text())
    (root / "synthetic.json").write_text(json.dumps({**meta, "version": -1}))
    (root / "stale-marker").write_text("old")
    assert ensure_synthetic(root, scale=1e-4, seed=0, **kw) == root
    assert not (root / "stale-marker").exists() and (root / "train" / "csv_files").is_dir()
    assert [p.name for p in root.parent.iterdir()] == ["s"]
    # a foreign non-empty folder is never overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a synthetic suite"):
        ensure_synthetic(tmp_path / "mine", scale=1e-4, seed=0, **kw)


def test_validation_holds_100_class_balanced_images_per_task(tmp_path):
    """Synthetic images are free: every task gets at least MIN_VAL = 100 validation images, and a
    classification task's are class-balanced (every class equally often, to within one)."""
    import csv
    from collections import Counter

    from m2dino.data.synthetic import MIN_VAL

    assert MIN_VAL == 100
    tasks = ["lung_2cls", "fetal_head_pos_cls", "thyroid_nodule_det"]
    summary = write_suite(tmp_path, tasks=tasks, scale=1e-4, min_train=2, workers=1)
    assert all(summary["sizes"][t]["val"] == 100 for t in tasks)
    assert all(v >= 100 for _, v in task_sizes(0.03).values())
    for path in (tmp_path / "val" / "csv_files").glob("Cls*.csv"):
        rows = list(csv.DictReader(path.open()))
        counts = Counter(int(r["mask"]) for r in rows)
        num_classes = int(rows[0]["num_classes"])
        assert len(rows) == 100 and set(counts) == set(range(num_classes))
        assert max(counts.values()) - min(counts.values()) <= 1, (path.name, counts)


def test_a_cached_suite_without_its_design_is_rebuilt(tmp_path, monkeypatch):
    """A suite is current only with this generator version and its design.json beside it."""
    root = tmp_path / "s"
    kw = dict(tasks=["lung_2cls"], min_train=2, min_val=2, workers=1)
    ensure_synthetic(root, scale=1e-4, seed=0, **kw)
    assert json.loads((root / "synthetic.json").read_text())["version"] == GENERATOR_VERSION
    (root / "design.json").unlink()
    ensure_synthetic(root, scale=1e-4, seed=0, **kw)
    assert (root / "design.json").is_file()


def test_cli_refuses_a_non_empty_out(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--scale", "1e-4", "--min-train", "2", "--min-val", "1",
                 "--tasks", "organ_cls", "--workers", "1"]) == 0
    assert "wrote 2 train + 1 val images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x")])


def test_cli_runs_as_a_module():
    """`python -m m2dino.data.synthetic` runs the package's __main__.py, and runpy does not
    warn that it was imported before it ran (the package must not import it eagerly)."""
    run = subprocess.run([sys.executable, "-m", "m2dino.data.synthetic", "--help"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: python -m m2dino.data.synthetic") and "--scale" in run.stdout
    assert "FM_UIA suite" in run.stdout  # the description: the package docstring's first line
    assert "found in sys.modules" not in run.stderr


def _outline(img):
    """Position-free shape of the darkest region (solidity and perimeter/sqrt(area), at three
    thresholds): what tells a spiculated lesion from a smooth one."""
    from scipy.spatial import ConvexHull

    fov = ndimage.binary_erosion(img > 0, iterations=6)
    smooth = ndimage.gaussian_filter(img.astype(np.float32), 1.0)
    out = []
    for q in (0.04, 0.08, 0.12):
        dark = ndimage.binary_fill_holes((smooth < np.quantile(smooth[fov], q)) & fov)
        labels, n = ndimage.label(dark)
        if n == 0:
            out += [0.0, 0.0]
            continue
        region = labels == 1 + int(np.argmax(ndimage.sum(dark, labels, range(1, n + 1))))
        ys, xs = np.nonzero(region)
        try:
            hull = ConvexHull(np.stack([xs, ys], 1).astype(float)).volume
        except Exception:  # a degenerate region (a line): no hull
            hull = len(xs)
        perimeter = (region ^ ndimage.binary_erosion(region)).sum()
        out += [len(xs) / max(hull, 1.0), perimeter / np.sqrt(len(xs)) / 4]
    return np.asarray(out)


def _features(img):
    """20x20 thumbnail + quantiles of the local mean inside the field of view + the darkest
    region's outline (all but the thumbnail position-free)."""
    thumb = np.asarray(Image.fromarray(img).resize((20, 20), Image.BILINEAR), np.float32).ravel() / 255
    inside = ndimage.binary_erosion(img > 0, iterations=6)
    local = ndimage.uniform_filter(img.astype(np.float32), 9)[inside] / 255
    return np.concatenate([thumb, np.quantile(local, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]) * 5, _outline(img)])


@pytest.mark.slow
def test_class_labels_are_learnable_from_pixels():
    """A linear classifier on 20x20 thumbnails, local-mean quantiles and the darkest region's
    outline beats the majority class by a wide margin on every classification task (the model
    has far more to work with)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    for task_id, spec in TASKS.items():
        if spec.task_type != "classification":
            continue
        X, y = [], []
        for i in range(max(80, 24 * spec.num_classes)):
            img, ann = build(task_id, np.random.default_rng([11, i]), (100, 120))
            X.append(_features(img))
            y.append(ann["label"])
        y = np.asarray(y)
        acc = cross_val_score(LogisticRegression(C=0.5, max_iter=500), np.asarray(X), y, cv=3).mean()
        majority = np.bincount(y).max() / len(y)
        assert acc > majority + 0.2, (task_id, acc, majority)
