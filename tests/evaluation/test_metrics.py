"""Challenge metrics against hand-computed values and independent implementations."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.distance import directed_hausdorff
from sklearn.metrics import roc_auc_score

from m2dino.evaluation import metrics as M
from m2dino.evaluation.baselines import trivial_baselines
from m2dino.evaluation.ground_truth import ground_truth_from_target


def spec(task_id, task_type, num_classes):
    return SimpleNamespace(task_id=task_id, task_type=task_type, num_classes=num_classes)


# ----------------------------------------------------------------------------- segmentation
def test_dice_hand_values():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 pixels
    gt[0, 1:4] = True
    gt[1, 0:3] = True  # 6 pixels, 3 shared
    assert M.dice_score(pred, gt) == pytest.approx(2 * 3 / 10)
    assert M.dice_score(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert M.dice_score(np.zeros((3, 3)), np.eye(3)) == 0.0


def test_hausdorff_hand_values_and_empty_conventions():
    gt = np.zeros((6, 8), bool)
    pred = np.zeros((6, 8), bool)
    gt[0, 0] = True
    pred[0, 0] = True
    pred[3, 4] = True  # 3-4-5 triangle away from the only GT pixel
    assert M.hausdorff_distance(pred, gt) == pytest.approx(5.0)
    assert M.hausdorff_distance(gt, pred) == pytest.approx(5.0)
    empty = np.zeros((6, 8), bool)
    assert M.hausdorff_distance(empty, empty) == 0.0
    assert M.hausdorff_distance(empty, gt) == pytest.approx(10.0)  # diagonal of 6 x 8
    assert M.hausdorff_distance(pred, empty) == pytest.approx(10.0)


def test_hausdorff_is_over_all_foreground_pixels_not_surfaces():
    # A full square against the same square with one interior pixel missing: every pixel of
    # either set is within 1 px of the other set (the challenge's SimpleITK filter gives 1);
    # a surface distance would see the hole's rim ~9 px inside the outer contour.
    gt = np.zeros((25, 25), bool)
    gt[2:23, 2:23] = True
    pred = gt.copy()
    pred[12, 12] = False
    assert M.hausdorff_distance(pred, gt) == pytest.approx(1.0)


def test_hausdorff_matches_scipy_point_set_hausdorff():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred = rng.random((17, 13)) > 0.8
        gt = rng.random((17, 13)) > 0.7
        a, b = np.argwhere(pred), np.argwhere(gt)
        expected = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
        assert M.hausdorff_distance(pred, gt) == pytest.approx(expected)


def test_resize_nearest_uses_opencv_sampling():
    src = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(M.resize_nearest(src, (4, 4))[:, 0], [0, 0, 2, 2])
    # 3 -> 2 pixels: OpenCV takes floor(i * 1.5) = [0, 1]; PIL's centre sampling would take [0, 2].
    np.testing.assert_array_equal(M.resize_nearest(np.array([[5, 6, 7]]), (1, 2)), [[5, 6]])
    np.testing.assert_array_equal(M.resize_nearest(np.arange(10)[None], (1, 3)), [[0, 3, 6]])


def test_segmentation_task_score_hand_computed():
    # Two 3-class images. Image 1: class 1 perfect, class 2 missed -> Dice 1 and 0, HD 0 and
    # diagonal. Image 2: class 1 half overlap, class 2 both empty -> Dice 2/3 and 1, HD 1 and 0.
    gt1 = np.zeros((3, 4), np.uint8)
    gt1[0, 0] = 1
    gt1[2, 3] = 2
    pred1 = np.zeros((3, 4), np.uint8)
    pred1[0, 0] = 1
    gt2 = np.zeros((3, 4), np.uint8)
    gt2[1, 1:3] = 1
    pred2 = np.zeros((3, 4), np.uint8)
    pred2[1, 1] = 1
    scores = M.segmentation_metrics([pred1, pred2], [gt1, gt2], num_classes=3)
    dice_class1 = (1.0 + 2 * 1 / 3) / 2
    dice_class2 = (0.0 + 1.0) / 2
    assert scores["dice"] == pytest.approx((dice_class1 + dice_class2) / 2)
    hd_class1 = (0.0 + 1.0) / 2
    hd_class2 = (5.0 + 0.0) / 2  # diagonal of 3 x 4
    assert scores["hd"] == pytest.approx((hd_class1 + hd_class2) / 2)


def test_segmentation_prediction_of_other_size_is_resized_to_gt():
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1
    small = np.array([[1, 0], [0, 0]], np.uint8)  # nearest x2 gives exactly gt
    assert M.segmentation_metrics([small], [gt], 2) == {"dice": 1.0, "hd": 0.0}


def test_segmentation_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        M.segmentation_metrics([np.zeros((2, 2))] * 2, [np.zeros((2, 2))], 2)
    with pytest.raises(ValueError, match="2-D"):
        M.segmentation_metrics([np.zeros((2, 2, 3))], [np.zeros((2, 2))], 2)


# --------------------------------------------------------------------------- classification
def test_classification_hand_values_binary():
    labels = [0, 0, 1, 1]
    predicted = [0, 1, 1, 1]
    p1 = np.array([0.1, 0.8, 0.7, 0.9])
    probs = np.stack([1 - p1, p1], axis=1)
    scores = M.classification_metrics(labels, predicted, probs, 2)
    assert scores["accuracy"] == pytest.approx(0.75)
    # class 0: precision 1, recall 1/2 -> F1 2/3; class 1: precision 2/3, recall 1 -> F1 0.8
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert scores["f1_weighted"] == pytest.approx((2 / 3 + 0.8) / 2)
    # TP=2, TN=1, FP=1, FN=0: (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1)
    assert scores["mcc"] == pytest.approx(2 / math.sqrt(12))
    # positive scores {0.7, 0.9} vs negative {0.1, 0.8}: 3 of 4 pairs ordered
    assert scores["auc"] == pytest.approx(0.75)


def test_classification_multiclass_auc_equals_sklearn_ovr_when_all_classes_present():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 0])
    probs = rng.random((10, 3))
    probs /= probs.sum(1, keepdims=True)
    scores = M.classification_metrics(labels, probs.argmax(1), probs, 3)
    assert scores["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_classification_auc_with_absent_classes():
    labels = [0, 0, 1, 1]
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]])
    # class 0 vs rest: positives {0.6, 0.2} vs negatives {0.3, 0.1}: 3 of 4 pairs -> 0.75
    # class 1 vs rest: positives {0.6, 0.2} vs negatives {0.3, 0.5}: 2 of 4 pairs -> 0.5
    # class 2 absent from the ground truth: left out of the average.
    scores = M.classification_metrics(labels, [0, 1, 1, 2], probs, 3)
    assert scores["auc"] == pytest.approx((0.75 + 0.5) / 2)
    single = M.classification_metrics([1, 1], [1, 0], [[0.2, 0.8], [0.6, 0.4]], 2)
    assert math.isnan(single["auc"])
    assert single["accuracy"] == 0.5


def test_classification_bad_input():
    with pytest.raises(ValueError, match="probabilities of shape"):
        M.classification_metrics([0, 1], [0, 1], np.ones((2, 3)) / 3, 2)
    with pytest.raises(ValueError, match="label 4 outside"):
        M.classification_metrics([0, 4], [0, 1], np.ones((2, 2)) / 2, 2)


# ------------------------------------------------------------------ detection and regression
def test_box_iou_hand_values():
    assert M.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert M.box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert M.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert M.box_iou([2, 2, 0, 0], [0, 0, 2, 2]) == 0.0  # inverted box is empty
    assert M.detection_metrics([[0, 0, 2, 2], [0, 0, 4, 2]], [[1, 1, 3, 3], [0, 0, 2, 2]])["iou"] == pytest.approx(
        (1 / 7 + 0.5) / 2
    )


def test_mre_hand_values():
    pred = [np.array([[0, 0], [3, 4]]), np.array([[1, 1], [2, 2]])]
    gt = [np.zeros((2, 2)), np.array([[1, 2], [2, 1]])]
    assert M.regression_metrics(pred, gt)["mre"] == pytest.approx((2.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="3 predicted points for 2"):
        M.radial_error(np.zeros((3, 2)), np.zeros((2, 2)))


# ------------------------------------------------------------- per-sample API and baselines
TASKS = [spec("seg", "segmentation", 2), spec("cls", "classification", 2), spec("det", "detection", 1),
         spec("reg", "regression", 2)]


def test_evaluate_predictions_groups_by_task():
    gt_mask = np.zeros((4, 4), np.uint8)
    gt_mask[1:3, 1:3] = 1
    predictions = [
        {"mask": gt_mask.copy()},
        {"probs": np.array([0.9, 0.1]), "predicted_class": 0},
        {"probs": np.array([0.2, 0.8]), "predicted_class": 1},
        {"bbox_pixels": [0, 0, 2, 2]},
        {"points_pixels": np.array([[0.0, 0.0], [3.0, 4.0]])},
    ]
    truth = [
        {"task": "seg", "mask": gt_mask},
        {"task": "cls", "label": 0},
        {"task": "cls", "label": 0},
        {"task": "det", "box": [1, 1, 3, 3]},
        {"task": "reg", "points": np.zeros((2, 2))},
    ]
    out = M.evaluate_predictions(predictions, truth, TASKS)
    assert out["seg"] == {"dice": 1.0, "hd": 0.0}
    assert out["cls"]["accuracy"] == 0.5 and math.isnan(out["cls"]["auc"])
    assert out["det"] == {"iou": pytest.approx(1 / 7)}
    assert out["reg"] == {"mre": pytest.approx(2.5)}
    by_type = M.average_by_task_type(out, TASKS)
    assert by_type["detection"]["iou"] == pytest.approx(1 / 7)
    assert math.isnan(by_type["classification"]["auc"])
    with pytest.raises(ValueError, match="sample 0 predicted for task 'cls'"):
        M.evaluate_predictions([{"task": "cls"}], [{"task": "seg"}], TASKS)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        M.evaluate_predictions([{}], [{"task": "nope"}], TASKS)


def test_trivial_baselines_hand_computed():
    mask_full = np.ones((2, 2), np.uint8)
    train = [
        {"task": "cls", "label": 1, "orig_size": (10, 10)},
        {"task": "cls", "label": 1, "orig_size": (10, 10)},
        {"task": "cls", "label": 0, "orig_size": (10, 10)},
        {"task": "det", "box": [0, 0, 10, 10], "orig_size": (10, 10)},  # normalised [0, 0, 1, 1]
        {"task": "det", "box": [0, 0, 10, 10], "orig_size": (20, 20)},  # normalised [0, 0, .5, .5]
        {"task": "reg", "points": [[10, 0], [0, 20]], "orig_size": (20, 10)},  # (H, W): [[1, 0], [0, 1]]
        {"task": "reg", "points": [[0, 0], [0, 0]], "orig_size": (20, 10)},
    ]
    val = [
        {"task": "seg", "mask": mask_full, "orig_size": (2, 2)},
        {"task": "seg", "mask": np.zeros((2, 2), np.uint8), "orig_size": (2, 2)},
        {"task": "cls", "label": 0, "orig_size": (10, 10)},
        {"task": "cls", "label": 1, "orig_size": (10, 10)},
        {"task": "cls", "label": 1, "orig_size": (10, 10)},
        {"task": "cls", "label": 1, "orig_size": (10, 10)},
        {"task": "det", "box": [0, 0, 40, 40], "orig_size": (40, 80)},  # mean box -> [0, 0, 60, 30]
        {"task": "reg", "points": [[0, 0], [0, 0]], "orig_size": (8, 6)},  # mean -> [[3, 0], [0, 4]]
    ]
    out = trivial_baselines(train, val, TASKS)
    # empty mask: image 1 Dice 0 / HD diagonal sqrt(8); image 2 Dice 1 / HD 0
    assert out["seg"]["dice"] == pytest.approx(0.5)
    assert out["seg"]["hd"] == pytest.approx(math.sqrt(8) / 2)
    # majority class 1: accuracy 3/4; F1 class 0 = 0, class 1 = 2*3/(2*3+1) = 6/7
    assert out["cls"]["accuracy"] == pytest.approx(0.75)
    assert out["cls"]["f1_macro"] == pytest.approx(3 / 7)
    assert out["cls"]["auc"] == pytest.approx(0.5)
    # predicted [0,0,60,30] vs gt [0,0,40,40]: inter 40*30, union 1800 + 1600 - 1200
    assert out["det"]["iou"] == pytest.approx(1200 / 2200)
    assert out["reg"]["mre"] == pytest.approx((3 + 4) / 2)


def test_ground_truth_from_target_scales_to_pixels():
    import torch

    box = ground_truth_from_target("det", {"box": torch.tensor([0.25, 0.5, 0.5, 1.0])}, (10, 20))
    assert box["box"] == [5.0, 5.0, 10.0, 10.0]
    points = ground_truth_from_target("reg", {"points": torch.tensor([[0.5, 0.1], [1.0, 0.0]])}, (10, 20))
    np.testing.assert_allclose(points["points"], [[10.0, 1.0], [20.0, 0.0]])
    assert ground_truth_from_target("cls", {"label": torch.tensor(3)}, (4, 4))["label"] == 3
    with pytest.raises(ValueError, match="none of mask/label/box/points"):
        ground_truth_from_target("x", {"other": 1}, (4, 4))
