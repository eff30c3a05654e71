"""m2dino.evaluate on hand-made data and predictions (numbers computed by hand), and
m2dino.predict + evaluate on a tiny synthetic suite with a tiny untrained model."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hand_predictions import SUITE_TASKS, write_csv, write_hand_predictions
from PIL import Image

from m2dino import evaluate as evaluate_cli
from m2dino import predict as predict_cli
from m2dino.evaluation import evaluate as E


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
    assert evaluate_cli.main(["--data-root", str(hand_root), "--predictions", str(out),
                              "--json", str(tmp_path / "r.json")]) == 0
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
    assert evaluate_cli.main(["--data-root", str(hand_root), "--predictions", str(out)]) == 2
    assert "images/b.png" in capsys.readouterr().err

    write_hand_predictions(out)
    entries = json.loads((out / "detection_predictions.json").read_text())[:1]
    (out / "detection_predictions.json").write_text(json.dumps(entries))
    with pytest.raises(E.EvaluationError,
                       match=r"no prediction for task 'thyroid_nodule_det' image_path '../Detection/thyroid/1.png'"):
        E.evaluate_folder(hand_root, out)

    write_hand_predictions(out)
    (out / "regression_predictions.json").write_text("[{")
    with pytest.raises(E.EvaluationError, match=r"regression_predictions.json: not valid JSON"):
        E.evaluate_folder(hand_root, out)

    write_hand_predictions(out)
    entries = json.loads((out / "classification_predictions.json").read_text())
    entries[2]["predicted_probs"] = [1.0]
    (out / "classification_predictions.json").write_text(json.dumps(entries))
    with pytest.raises(E.EvaluationError,
                       match=r"prediction for '../Classification/Two/lung/2.png': predicted_probs must be 2"):
        E.evaluate_folder(hand_root, out)

    entries[2] = {"image_path": entries[2]["image_path"], "task_id": "lung_2cls"}
    (out / "classification_predictions.json").write_text(json.dumps(entries))
    with pytest.raises(E.EvaluationError,
                       match=r"entry 2 \(../Classification/Two/lung/2.png\) lacks \['predicted_class'"):
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
    from m2dino.data import read_csvs
    from m2dino.evaluation.baselines import trivial_baselines

    scan = read_csvs(hand_root)
    out = trivial_baselines(scan.records, scan.records, scan.tasks)
    # empty mask: image a (class 1 present) Dice 0 / HD 10, image b (empty) Dice 1 / HD 0
    assert out["lung"] == {"dice": pytest.approx(0.5), "hd": pytest.approx(5.0)}
    # labels 0,0,1,1: the tie goes to class 0; F1 class 0 = 2*2/(2*2+2), class 1 = 0
    assert out["lung_2cls"]["accuracy"] == pytest.approx(0.5)
    assert out["lung_2cls"]["f1_macro"] == pytest.approx(1 / 3)
    # mean box [.5, .5, 2.5, 2.5] overlaps each GT box by 1.5 x 1.5 of a 4 + 4 - 2.25 union
    assert out["thyroid_nodule_det"]["iou"] == pytest.approx(2.25 / 5.75)
    assert out["fetal_femur"]["mre"] == pytest.approx(0.0)


def test_submission_entries_and_index_png(tmp_path):
    from m2dino.evaluation import submission as P

    cls = P.submission_entry("classification", "lung_2cls", "../a.png",
                             {"probs": np.array([1.0, 3.0]), "predicted_class": 1})
    assert cls == {"image_path": "../a.png", "task_id": "lung_2cls", "predicted_class": 1,
                   "predicted_probs": [0.25, 0.75]}
    det = P.submission_entry("detection", "d", "../b.png", {"bbox_pixels": np.array([1, 2, 3, 4]),
                                                          "bbox_normalized": np.array([.1, .2, .3, .4]), "score": .9})
    assert det == {"image_path": "../b.png", "task_id": "d", "bbox_normalized": [.1, .2, .3, .4],
                   "bbox_pixels": [1.0, 2.0, 3.0, 4.0]}
    reg = P.submission_entry("regression", "r", "../c.png", {"points_pixels": np.array([[1, 2], [3, 4]]),
                                                           "points_normalized": np.array([[.1, .2], [.3, .4]])})
    assert reg["predicted_points_pixels"] == [1.0, 2.0, 3.0, 4.0]
    assert reg["predicted_points_normalized"] == [.1, .2, .3, .4]
    with pytest.raises(P.PredictionError, match="non-finite"):
        P.submission_entry("detection", "d", "../b.png",
                           {"bbox_pixels": [0, 0, np.nan, 1], "bbox_normalized": [0, 0, 0, 0]})
    mask = np.array([[0, 1, 2], [2, 1, 0]])
    P.write_index_png(tmp_path / "x" / "m.png", mask)
    with Image.open(tmp_path / "x" / "m.png") as written:
        assert written.mode == "L" and written.size == (3, 2)
        np.testing.assert_array_equal(np.asarray(written), mask)
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["m.png"]  # no temporary left behind


# ------------------------------------------------- predict + evaluate on a synthetic suite
def _independent_scores(root: Path, out: Path) -> dict:
    """Metrics recomputed from the written files with numpy / scipy / sklearn only."""
    from scipy.spatial.distance import directed_hausdorff
    from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

    rows = {}
    for csv_file in sorted((root / "val" / "csv_files").glob("*.csv")):
        with open(csv_file, newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["task_id"], []).append(row)
    scores = {}
    # segmentation: per class mean over images, then mean over classes 1..C-1
    dice, hd = {1: [], 2: []}, {1: [], 2: []}
    for row in rows["cervix_multi"]:
        gt = np.asarray(Image.open(root / "val" / row["mask_path"].replace("../", "", 1)))
        pred = np.asarray(Image.open(out / row["mask_path"].replace("../", "", 1)))
        assert pred.shape == gt.shape  # written at the original size
        for c in (1, 2):
            p, g = pred == c, gt == c
            dice[c].append(1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum()))
            if not p.any() and not g.any():
                hd[c].append(0.0)
            elif not p.any() or not g.any():
                hd[c].append(math.hypot(*gt.shape))
            else:
                a, b = np.argwhere(p), np.argwhere(g)
                hd[c].append(max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]))
    scores["cervix_multi"] = {"dice": np.mean([np.mean(dice[c]) for c in (1, 2)]),
                              "hd": np.mean([np.mean(hd[c]) for c in (1, 2)])}
    entries = {e["image_path"]: e for e in json.loads((out / "classification_predictions.json").read_text())}
    labels = [int(r["mask"]) for r in rows["lung_disease_3cls"]]
    preds = [entries[r["image_path"]]["predicted_class"] for r in rows["lung_disease_3cls"]]
    probs = np.array([entries[r["image_path"]]["predicted_probs"] for r in rows["lung_disease_3cls"]])
    cls = {"accuracy": np.mean(np.array(labels) == np.array(preds)),
           "f1_macro": f1_score(labels, preds, average="macro", zero_division=0),
           "f1_weighted": f1_score(labels, preds, average="weighted", zero_division=0),
           "mcc": matthews_corrcoef(labels, preds)}
    if len(set(labels)) == 3:
        cls["auc"] = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    scores["lung_disease_3cls"] = cls
    entries = {e["image_path"]: e for e in json.loads((out / "detection_predictions.json").read_text())}
    ious = []
    for r in rows["thyroid_nodule_det"]:
        p = entries[r["image_path"]]["bbox_pixels"]
        g = [float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
        iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
        ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
        ious.append(iw * ih / union)
    scores["thyroid_nodule_det"] = {"iou": np.mean(ious)}
    entries = {e["image_path"]: e for e in json.loads((out / "regression_predictions.json").read_text())}
    errors = []
    for r in rows["fetal_femur"]:
        p = np.array(entries[r["image_path"]]["predicted_points_pixels"]).reshape(-1, 2)
        g = np.array([json.loads(r["point_1_xy"]), json.loads(r["point_2_xy"])])
        errors.append(np.linalg.norm(p - g, axis=1).mean())
    scores["fetal_femur"] = {"mre": np.mean(errors)}
    return scores


def test_predict_then_evaluate_on_synthetic_suite(suite_and_checkpoint, tmp_path):

    root, checkpoint = suite_and_checkpoint
    out = tmp_path / "submission"
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--out", str(out),
                   "--split", "val", "--batch-size", "3", "--device", "cpu"]) == 0
    val_csv = root / "val" / "csv_files"
    n_rows = {}
    sizes = {}
    for csv_file in val_csv.glob("*.csv"):
        with open(csv_file, newline="") as f:
            for row in csv.DictReader(f):
                n_rows[row["task_id"]] = n_rows.get(row["task_id"], 0) + 1
                with Image.open(val_csv / row["image_path"]) as im:
                    sizes[row["image_path"]] = im.size  # (W, H)

    # the submission format, field by field
    cls = json.loads((out / "classification_predictions.json").read_text())
    assert len(cls) == n_rows["lung_disease_3cls"]
    for e in cls:
        assert set(e) == {"image_path", "task_id", "predicted_class", "predicted_probs"}
        assert e["image_path"].startswith("../") and len(e["predicted_probs"]) == 3
        assert sum(e["predicted_probs"]) == pytest.approx(1.0, abs=1e-9)
    det = json.loads((out / "detection_predictions.json").read_text())
    assert len(det) == n_rows["thyroid_nodule_det"]
    for e in det:
        assert set(e) == {"image_path", "task_id", "bbox_normalized", "bbox_pixels"}
        w, h = sizes[e["image_path"]]
        np.testing.assert_allclose(np.array(e["bbox_normalized"]) * [w, h, w, h], e["bbox_pixels"],
                                   rtol=1e-5, atol=1e-3)
    reg = json.loads((out / "regression_predictions.json").read_text())
    assert len(reg) == n_rows["fetal_femur"]
    for e in reg:
        assert set(e) == {"image_path", "task_id", "predicted_points_normalized", "predicted_points_pixels"}
        w, h = sizes[e["image_path"]]
        assert len(e["predicted_points_pixels"]) == 4
        np.testing.assert_allclose(np.array(e["predicted_points_normalized"]) * [w, h, w, h],
                                   e["predicted_points_pixels"], rtol=1e-5, atol=1e-3)
    masks = sorted(out.rglob("*.png"))
    assert len(masks) == n_rows["cervix_multi"]
    for path in masks:
        with Image.open(path) as im:
            assert im.mode == "L" and np.asarray(im).max() < 3

    results = E.evaluate_folder(root, out, split="val")
    assert results["num_samples"] == n_rows
    expected = _independent_scores(root, out)
    for task_id, values in expected.items():
        for metric, value in values.items():
            assert results["tasks"][task_id][metric] == pytest.approx(value, rel=1e-9, abs=1e-9), (task_id, metric)

    # --checkpoint predicts and scores in one go (one task here, to keep the test short)
    json_path = tmp_path / "scores.json"
    assert evaluate_cli.main(["--data-root", str(root), "--split", "val", "--checkpoint", str(checkpoint), "--tasks",
                   "fetal_femur", "--json", str(json_path), "--device", "cpu"]) == 0
    again = json.loads(json_path.read_text())
    assert list(again["tasks"]) == ["fetal_femur"]
    assert again["tasks"]["fetal_femur"]["mre"] == pytest.approx(results["tasks"]["fetal_femur"]["mre"])


def test_predict_errors(suite_and_checkpoint, tmp_path, capsys):
    from m2dino.evaluation import predict as P

    root, checkpoint = suite_and_checkpoint
    with pytest.raises(P.PredictionError, match=r"no head for task\(s\) \['lung'\]"):
        P.predict_folder(checkpoint, root, tmp_path / "o", split="val", tasks=["lung"])
    assert predict_cli.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--data-root", str(root),
                   "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_unlabelled_test_csvs(suite_and_checkpoint, tmp_path):
    """A test release has no labels, boxes, points or mask files: prediction still works."""
    import shutil

    from m2dino.evaluation import predict as P

    root, checkpoint = suite_and_checkpoint
    test_root = tmp_path / "test"
    shutil.copytree(root / "val", test_root)
    for csv_file in (test_root / "csv_files").glob("*.csv"):
        with open(csv_file, newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            if row.get("mask_path"):
                (test_root / "csv_files" / row["mask_path"]).resolve().unlink()
        keep = [c for c in ("image_path", "task_id", "task_name", "num_classes", "mask_path") if c in rows[0]]
        write_csv(csv_file, keep, [[row[c] for c in keep] for row in rows])
    out = tmp_path / "submission"
    result = P.predict_folder(checkpoint, test_root, out, tasks=["cervix_multi", "fetal_femur"], batch_size=4)
    assert result["counts"] == {"cervix_multi": 4, "fetal_femur": 4}
    assert len(list(out.rglob("*.png"))) == 4
    assert len(json.loads((out / "regression_predictions.json").read_text())) == 4


# ------------------------------------------------------------- test-time flip averaging
TTA_TASKS = ["cervix_multi", "fetal_head_pos_cls", "thyroid_nodule_det", "IUGC", "lung_disease_3cls"]


class FlipEquivariantStub:
    """Outputs in the model's format that are exactly flip-equivariant functions of the image
    (pointwise maps, pooling with symmetric windows, an x offset from a horizontal derivative,
    which changes sign under the mirror, so the offset maps to 1 - o at the mirrored cell): the
    un-flipped mirrored view must equal the plain view, so TTA must return the plain outputs."""

    def __init__(self, tasks):
        from m2dino.tasks import get_task

        self.tasks = [get_task(t) for t in tasks]

    def __call__(self, images, task_ids):
        import torch
        import torch.nn.functional as F

        from m2dino.models.heads import decode_boxes, soft_argmax_2d

        outputs = {}
        for i, spec in enumerate(self.tasks):
            rows = (task_ids == i).nonzero(as_tuple=True)[0]
            if not rows.numel():
                continue
            x = images.index_select(0, rows)
            pooled = F.avg_pool2d(x, 4)  # [n, 3, S/4, S/4]
            if spec.task_type == "segmentation":
                ramp = torch.arange(1.0, spec.num_classes + 1).view(1, -1, 1, 1)
                out = {"logits": x[:, :1].repeat(1, spec.num_classes, 1, 1) * ramp}
            elif spec.task_type == "classification":
                out = {"logits": x.mean((2, 3))[:, :1] * torch.arange(1.0, spec.num_classes + 1)}
            elif spec.task_type == "regression":
                heatmaps = pooled[:, [0, 1, 2][: spec.num_points]] * 3
                out = {"heatmaps": heatmaps, "points": soft_argmax_2d(heatmaps)}
            else:
                padded = F.pad(pooled[:, :1], (1, 1))
                g = padded[..., 2:] - padded[..., :-2]  # d/dx: g'(w-1-c) = -g(c) for the mirror
                heatmap, size = pooled[:, :1] * 4, pooled[:, 1:3].sigmoid()
                offset = torch.cat([g.sigmoid(), pooled[:, 2:3].sigmoid()], dim=1)
                boxes, scores = decode_boxes(heatmap, size, offset)
                out = {"heatmap": heatmap, "size": size, "offset": offset, "boxes": boxes[:, 0], "scores": scores[:, 0]}
            outputs[spec.task_id] = {"indices": rows, **out}
        return {"tasks": outputs, "aux": {}}


def test_tta_unflips_every_output_exactly():
    import torch

    from m2dino.evaluation.tta import hflip_tta

    stub = FlipEquivariantStub(TTA_TASKS)
    images = torch.randn(10, 3, 32, 32)
    task_ids = torch.arange(10) % len(TTA_TASKS)
    plain, tta = stub(images, task_ids), hflip_tta(stub, images, task_ids)
    for task_id, out in plain["tasks"].items():
        merged = tta["tasks"][task_id]
        assert torch.equal(merged["indices"], out["indices"])
        if task_id == "fetal_head_pos_cls":  # a position class: never flipped, the plain outputs exactly
            assert torch.equal(merged["logits"], out["logits"])
            continue
        kind = {s.task_id: s.task_type for s in stub.tasks}[task_id]
        if kind in ("segmentation", "classification"):  # log of the mean probability == log_softmax
            torch.testing.assert_close(merged["logits"], out["logits"].log_softmax(1), atol=1e-5, rtol=0)
        elif kind == "regression":
            torch.testing.assert_close(merged["points"], out["points"], atol=1e-6, rtol=0)
        else:
            for key in ("boxes", "scores", "size", "offset", "heatmap"):
                torch.testing.assert_close(merged[key], out[key], atol=1e-5, rtol=0, msg=key)


def test_tta_on_a_mirror_symmetric_image():
    """A mirror-symmetric image is its own flip: TTA masks are symmetric, boxes centred on the
    axis, landmarks on it (x = 0.5, each point averaged with its own mirror: the order is kept),
    flip-safe class probabilities unchanged, and position classes untouched."""
    import torch

    from m2dino.evaluation.tta import hflip_tta
    from m2dino.models.m2dino import create_model

    torch.manual_seed(0)
    model = create_model("dinov3_tiny", TTA_TASKS, num_experts=2, top_k=1, moe_layers=2, img_size=32).eval()
    half = torch.randn(len(TTA_TASKS), 3, 32, 32)
    images = half + half.flip(-1)
    task_ids = model.task_index(TTA_TASKS)
    with torch.inference_mode():
        plain = model.postprocess(model(images, task_ids), [(40, 60)] * len(TTA_TASKS))
        tta = model.postprocess(hflip_tta(model, images, task_ids), [(40, 60)] * len(TTA_TASKS))
    seg, pos, det, reg, cls = tta
    np.testing.assert_array_equal(seg["mask"], seg["mask"][:, ::-1])
    np.testing.assert_array_equal(pos["probs"], plain[1]["probs"])
    box = np.asarray(det["bbox_normalized"])
    assert box[0] + box[2] == pytest.approx(1.0, abs=1e-5)
    assert box[[1, 3]] == pytest.approx(np.asarray(plain[2]["bbox_normalized"])[[1, 3]], abs=1e-5)
    np.testing.assert_allclose(reg["points_normalized"][:, 0], 0.5, atol=1e-5)
    np.testing.assert_allclose(reg["points_normalized"][:, 1], plain[3]["points_normalized"][:, 1], atol=1e-5)
    np.testing.assert_allclose(cls["probs"], plain[4]["probs"], atol=1e-5)


def test_predict_tta_keeps_unflippable_tasks(suite_and_checkpoint, tmp_path):
    root, checkpoint = suite_and_checkpoint
    outs = {}
    for tta in (False, True):
        outs[tta] = tmp_path / f"tta{tta}"
        assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--split", "val",
                                 "--out", str(outs[tta]), "--batch-size", "4", "--device", "cpu"]
                                + (["--tta"] if tta else [])) == 0
    reg = [json.loads((outs[t] / "regression_predictions.json").read_text()) for t in (False, True)]
    assert reg[0] == reg[1] and len(reg[0]) == 4  # fetal_femur: hflip False, untouched by TTA
    det = [json.loads((outs[t] / "detection_predictions.json").read_text()) for t in (False, True)]
    assert len(det[1]) == len(det[0]) and det[0] != det[1]  # flip-safe: averaged
    assert len(list(outs[True].rglob("*.png"))) == len(list(outs[False].rglob("*.png")))


def test_predict_skips_and_lists_rows_of_unknown_tasks(suite_and_checkpoint, tmp_path, capsys):
    import shutil

    from m2dino.evaluation import predict as P

    root, checkpoint = suite_and_checkpoint
    data = tmp_path / "data"
    shutil.copytree(root / "val", data)
    images = sorted(p for p in (data / "Detection").rglob("*") if p.is_file())[:3]
    rels = ["../" + p.relative_to(data).as_posix() for p in images]
    write_csv(data / "csv_files" / "Other.csv", ["image_path", "task_id", "task_name", "num_classes"],
              [[rels[0], "lung_2cls", "classification", 2], [rels[1], "lung_2cls", "classification", 2],
               [rels[2], "mystery", "whatever", 9]])
    result = P.predict_folder(checkpoint, data, tmp_path / "out", batch_size=4, device="cpu")
    err = capsys.readouterr().err
    assert "skipped 3 row(s)" in err and "lung_2cls (2 rows)" in err and "mystery (1 row)" in err
    assert result["counts"] == {t: 4 for t in SUITE_TASKS}  # every other row is predicted
    listed = json.loads((tmp_path / "out" / "missing_tasks.json").read_text())
    assert listed == [{"csv": "Other.csv", "row": 0, "task_id": "lung_2cls", "image_path": rels[0]},
                      {"csv": "Other.csv", "row": 1, "task_id": "lung_2cls", "image_path": rels[1]},
                      {"csv": "Other.csv", "row": 2, "task_id": "mystery", "image_path": rels[2]}]
    # a clean run into the same folder drops the stale list
    P.predict_folder(checkpoint, root / "val", tmp_path / "out", batch_size=4, device="cpu")
    assert not (tmp_path / "out" / "missing_tasks.json").exists()
    with pytest.raises(FileNotFoundError, match="has no csv_files"):
        P.predict_folder(checkpoint, tmp_path / "nowhere", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
