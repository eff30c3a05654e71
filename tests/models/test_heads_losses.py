"""Heads and losses: hand-computed values on small cases, shapes, and overfitting."""
import math

import pytest
import torch

from m2dino.models import heads
from m2dino.tasks import TaskSpec
from m2dino.training import losses


# ----- hand-computed loss values ---------------------------------------------------------
def test_segmentation_loss_by_hand():
    logits = torch.zeros(1, 2, 1, 2)          # p = 0.5 everywhere
    mask = torch.tensor([[[0, 1]]])
    # CE = ln 2; Dice per class = (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3 -> loss 1/3
    torch.testing.assert_close(losses.dice_loss(logits, mask), torch.tensor(1 / 3))
    torch.testing.assert_close(losses.segmentation_loss(logits, mask),
                               torch.tensor(math.log(2) + 1 / 3))
    with pytest.raises(ValueError, match=r"masks \[1, 3, 2\] do not match logits"):
        losses.segmentation_loss(logits, torch.zeros(1, 3, 2, dtype=torch.long))


def test_classification_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0]])
    p0 = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(losses.classification_loss(logits, torch.tensor([0])),
                               torch.tensor(-math.log(p0)))
    # smoothing 0.2 over 2 classes: target (0.9, 0.1)
    expected = -0.9 * math.log(p0) - 0.1 * math.log(1 - p0)
    torch.testing.assert_close(
        losses.classification_loss(logits, torch.tensor([0]), label_smoothing=0.2),
        torch.tensor(expected))


def test_soft_argmax_and_landmark_loss_by_hand():
    heat = torch.full((1, 2, 4, 4), -1e4)
    heat[0, 0, 1, 2] = 0.0                    # all mass on row 1, column 2
    heat[0, 1] = 0.0                          # uniform: the image centre
    points = heads.soft_argmax_2d(heat)
    torch.testing.assert_close(points, torch.tensor([[[2.5 / 4, 1.5 / 4], [0.5, 0.5]]]))
    target = torch.tensor([[[0.625, 0.375], [0.3, 0.9]]])
    # |0.5-0.3| + |0.5-0.9| = 0.6 over 4 numbers
    torch.testing.assert_close(losses.landmark_loss(points, target), torch.tensor(0.15))


def test_landmark_prior_starts_the_head_at_the_mean_points():
    torch.manual_seed(0)
    head = heads.LandmarkHead(channels=8, num_points=2)
    features = {4: torch.randn(3, 8, 16, 16)}
    plain = heads.soft_argmax_2d(head.heatmap(head.block(features[4])))
    torch.testing.assert_close(head(features, None, None, 64)["points"], plain)  # zero prior: no change
    mean = torch.tensor([[0.2, 0.3], [0.7, 0.8]])
    head.set_point_prior(mean)
    # the prior is a Gaussian of the distance to the mean, peaked at the cell holding it
    assert head.prior[0].flatten().argmax().item() == 4 * 16 + 3  # row 0.3 -> 4, column 0.2 -> 3
    with torch.no_grad():  # features silent: the head predicts the mean (to the grid's symmetry)
        head.heatmap.weight.zero_()
        head.heatmap.bias.zero_()
        for size in (16, 8, 32):  # the prior is resampled to other heatmap sizes
            points = head({4: torch.randn(2, 8, size, size)}, None, None, 4 * size)["points"]
            torch.testing.assert_close(points, mean.expand(2, 2, 2), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="mean_points has 3 points, the head predicts 2"):
        head.set_point_prior(torch.zeros(3, 2))


def test_generalized_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    # inter 1, union 7, hull 9 -> 1/7 - 2/9; identical boxes -> 1
    torch.testing.assert_close(losses.generalized_iou(a, b), torch.tensor([1 / 7 - 2 / 9, 1.0]))


def test_focal_loss_by_hand():
    logits = torch.zeros(1, 1, 1, 2)          # p = 0.5
    target = torch.tensor([[[[1.0, 0.0]]]])
    # positive: (1-p)^2 ln2; negative: (1-0)^4 p^2 ln2; one positive
    torch.testing.assert_close(losses.focal_loss(logits, target), torch.tensor(0.5 * math.log(2)))
    target_soft = torch.tensor([[[[1.0, 0.5]]]])
    expected = 0.25 * math.log(2) + (0.5 ** 4) * 0.25 * math.log(2)
    torch.testing.assert_close(losses.focal_loss(logits, target_soft), torch.tensor(expected))


def test_centre_targets_by_hand():
    heat, rows, cols, offsets = losses.centre_targets(torch.tensor([[0.25, 0.25, 0.75, 0.875]]),
                                                      4, 4)
    # centre (2.0, 2.25) cells -> cell (row 2, col 2), offset (0, 0.25)
    assert (int(rows[0]), int(cols[0])) == (2, 2)
    torch.testing.assert_close(offsets, torch.tensor([[0.0, 0.25]]))
    assert heat[0, 0, 2, 2] == 1.0 and int((heat == 1).sum()) == 1
    # sigma_x = 2 cells / 6 -> 0.5 (floor); one column away: exp(-1 / (2 * 0.25))
    torch.testing.assert_close(heat[0, 0, 2, 3], torch.tensor(math.exp(-2.0)))


def test_detection_loss_of_a_perfect_prediction_is_near_zero():
    box = torch.tensor([[0.25, 0.25, 0.75, 0.875]])
    target_heat, rows, cols, offsets = losses.centre_targets(box, 4, 4)
    heat_logits = torch.where(target_heat == 1, torch.tensor(20.0), torch.tensor(-20.0))
    size = torch.zeros(1, 2, 4, 4)
    size[0, :, 2, 2] = torch.tensor([0.5, 0.625])
    offset = torch.zeros(1, 2, 4, 4)
    offset[0, :, 2, 2] = torch.tensor([0.0, 0.25])
    loss, parts = losses.detection_loss(heat_logits, size, offset, box, return_parts=True)
    assert float(loss) < 1e-6, parts
    boxes, scores = heads.decode_boxes(heat_logits, size, offset)
    torch.testing.assert_close(boxes[:, 0], box)
    assert float(scores[0, 0]) > 0.999


def test_decode_picks_the_highest_peak():
    heat = torch.full((1, 1, 4, 4), -5.0)
    heat[0, 0, 0, 0] = 1.0
    heat[0, 0, 3, 1] = 3.0
    size = torch.full((1, 2, 4, 4), 0.25)
    offset = torch.full((1, 2, 4, 4), 0.5)
    boxes, scores = heads.decode_boxes(heat, size, offset, top_k=2)
    # peak 1 at (row 3, col 1): centre (1.5/4, 3.5/4); box clipped to [0, 1]
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.25, 0.75, 0.5, 1.0]))
    torch.testing.assert_close(scores[0], torch.sigmoid(torch.tensor([3.0, 1.0])))


# ----- neck and heads ---------------------------------------------------------------------
@pytest.mark.parametrize("patch, size", [(8, 32), (16, 64), (8, 40)])
def test_neck_strides_adapt_to_the_patch(patch, size):
    neck = heads.DPTNeck(embed_dim=24, patch_size=patch, channels=16)
    grid = size // patch
    maps = neck([torch.randn(2, 24, grid, grid) for _ in range(4)])
    for stride in (4, 8, 16):
        assert maps[stride].shape == (2, 16, grid * patch // stride, grid * patch // stride)


def test_default_neck_layers():
    assert heads.default_neck_layers(12) == [2, 5, 8, 11]
    assert heads.default_neck_layers(6) == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="depth >= 4"):
        heads.default_neck_layers(3)


TASKS = [TaskSpec("seg", "segmentation", 3), TaskSpec("cls", "classification", 4),
         TaskSpec("reg", "regression", num_points=3), TaskSpec("det", "detection", 1)]


def _fixed_features(n=2, dim=24, channels=16, size=16):
    torch.manual_seed(3)
    feats = {s: torch.randn(n, channels, size // s, size // s) for s in (4, 8, 16)}
    return feats, torch.randn(n, dim), torch.randn(n, 16, dim)


def _targets(task, n=2, size=16):
    g = torch.Generator().manual_seed(5)
    if task.task_type == "segmentation":
        mask = torch.zeros(n, size, size, dtype=torch.long)
        mask[0, 4:12, 4:12] = 1   # on the stride-4 grid of the finest map
        mask[1, 8:16, 0:8] = 2
        return [{"mask": m} for m in mask]
    if task.task_type == "classification":
        return [{"label": torch.tensor(i % task.num_classes)} for i in range(n)]
    if task.task_type == "regression":
        return [{"points": torch.rand(task.num_points, 2, generator=g) * 0.8 + 0.1}
                for _ in range(n)]
    return [{"box": torch.tensor([0.2, 0.3, 0.6, 0.8])}, {"box": torch.tensor([0.5, 0.1, 0.9, 0.4])}]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.task_type)
def test_each_head_overfits_a_tiny_batch(task):
    feats, cls_token, patch_tokens = _fixed_features()
    head = heads.build_head(task, embed_dim=24, channels=16)
    targets = _targets(task)
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-2)
    rows = torch.arange(2)
    first = None
    for _ in range(120):
        out = {"indices": rows, **head(feats, cls_token, patch_tokens, (16, 16))}
        loss = losses.task_loss(task, out, targets)
        first = float(loss.detach()) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    if task.task_type == "regression":
        # the loss adds a heatmap KL to a Gaussian target, which a 1x1 heatmap conv on fixed
        # random features cannot match exactly: the points themselves must be overfitted
        target = torch.stack([t["points"] for t in targets])
        l1 = float(losses.landmark_loss(out["points"].detach(), target))
        assert l1 < 0.02 and float(loss) < 0.2 * first and float(loss) < 0.1, (first, float(loss), l1)
        return
    if task.task_type == "detection":
        # the focal loss on the Gaussian centre heatmap shrinks slowly near its floor (how slowly
        # depends on the CPU's float rounding): the decoded boxes themselves must be overfitted
        error = float((out["boxes"].detach() - torch.stack([t["box"] for t in targets])).abs().max())
        assert error < 0.05 and float(loss) < 0.1 * first, (first, float(loss), error)
        return
    assert float(loss) < 0.1 * first and float(loss) < 0.1, (first, float(loss))


def test_head_output_shapes():
    feats, cls_token, patch_tokens = _fixed_features(n=3, size=32)
    seg = heads.build_head(TASKS[0], 24, 16)(feats, cls_token, patch_tokens, (32, 32))
    assert seg["logits"].shape == (3, 3, 32, 32)
    cls = heads.build_head(TASKS[1], 24, 16)(feats, cls_token, patch_tokens, (32, 32))
    assert cls["logits"].shape == (3, 4)
    reg = heads.build_head(TASKS[2], 24, 16)(feats, cls_token, patch_tokens, (32, 32))
    assert reg["heatmaps"].shape == (3, 3, 8, 8) and reg["points"].shape == (3, 3, 2)
    det = heads.build_head(TASKS[3], 24, 16)(feats, cls_token, patch_tokens, (32, 32))
    assert det["heatmap"].shape == (3, 1, 8, 8) and det["size"].shape == (3, 2, 8, 8)
    assert det["offset"].shape == (3, 2, 8, 8)
    assert det["boxes"].shape == (3, 4) and det["scores"].shape == (3,)


# ----- total loss -------------------------------------------------------------------------
def test_total_loss_weights_by_task_and_type():
    outputs = {
        "tasks": {
            "cls": {"indices": torch.tensor([1]), "logits": torch.tensor([[0.0, 0.0, 0.0, 0.0]])},
            "reg": {"indices": torch.tensor([0]), "points": torch.full((1, 3, 2), 0.5)},
        },
        "aux": {"load_balance": torch.tensor(2.0), "z_loss": torch.tensor(3.0),
                "mutual_information": torch.tensor(-1.0)},
    }
    targets = [{"points": torch.full((3, 2), 0.25)}, {"label": torch.tensor(1)}]
    aux_weights = {"load_balance": 0.5, "z_loss": 0.1, "mutual_information": 1.0}
    loss, logs = losses.total_loss(outputs, targets, TASKS,
                                   loss_weights={"regression": 2.0, "cls": 3.0},
                                   aux_weights=aux_weights)
    expected = 3.0 * math.log(4) + 2.0 * 0.25 + 0.5 * 2.0 + 0.1 * 3.0 - 1.0
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(logs["cls"], torch.tensor(math.log(4)))
    torch.testing.assert_close(logs["reg"], torch.tensor(0.25))
    assert float(logs["aux/z_loss"]) == 3.0
    with pytest.raises(ValueError, match=r"batch row 0 \(task 'reg'\) has no 'points'"):
        losses.total_loss(outputs, [{"label": torch.tensor(0)}, {"label": torch.tensor(1)}],
                          TASKS)
    with pytest.raises(ValueError, match="unknown aux_weights keys"):
        losses.total_loss(outputs, targets, TASKS, aux_weights={"balance": 1.0})
