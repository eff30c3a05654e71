"""Bootstrap intervals (m2dino.evaluation.bootstrap): the per-image values give exactly the
challenge's metrics, the vectorised resampled metrics equal score_task / scikit-learn on every
resample, the intervals equal scipy.stats.bootstrap's, pairing narrows the interval of a
change, a planted difference is flagged and a null one is not (at the stated rate), and the
two-level pooling over seeds is what its docstring says."""
import json
import math
import statistics
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import f1_score, matthews_corrcoef

from m2dino.evaluation import bootstrap as BS
from m2dino.evaluation import metrics as M
from m2dino.evaluation.report.compute import relative_change

TOL = 1e-12


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    # sklearn warns when a resample has a single label; the values are still defined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# ------------------------------------------------------------------------- random tasks
def blob_mask(rng, shape, num_classes, empty_prob=0.2):
    mask = np.zeros(shape, np.uint8)
    for c in range(1, num_classes):
        if rng.random() < empty_prob:
            continue
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(1, 5, 2)
        mask[y:y + h, x:x + w] = c
    return mask


def random_task(task_type, num_classes, n, rng):
    """(predictions, ground truth) as score_task takes them, with the awkward cases: empty masks
    (in one or both), absent classes, tied probabilities, disjoint and inverted boxes."""
    preds, gts = [], []
    for i in range(n):
        path = f"../Images/{task_type}/{i:03d}.png"
        if task_type == "segmentation":
            gt = blob_mask(rng, (12, 10), num_classes)
            pred = gt.copy() if rng.random() < 0.3 else blob_mask(rng, (12, 10), num_classes)
            if rng.random() < 0.3:
                pred = pred[::2, ::2]  # another size: resized to the ground truth
            preds.append({"mask": pred})
            gts.append({"mask": gt, "image_path": path})
        elif task_type == "classification":
            label = int(rng.integers(0, max(1, num_classes - 1)))  # the last class never occurs
            probs = np.round(rng.dirichlet(np.ones(num_classes)), 1) + 1e-3  # rounding makes ties
            probs /= probs.sum()
            predicted = int(probs.argmax()) if rng.random() < 0.7 else int(rng.integers(0, num_classes))
            preds.append({"probs": probs, "predicted_class": predicted})
            gts.append({"label": label, "image_path": path})
        elif task_type == "detection":
            gt = np.r_[rng.uniform(0, 40, 2), rng.uniform(50, 90, 2)]
            pred = gt + rng.normal(0, 15, 4)
            if rng.random() < 0.15:
                pred = pred[[2, 3, 0, 1]]  # inverted: an empty box
            preds.append({"bbox_pixels": pred.tolist()})
            gts.append({"box": gt.tolist(), "image_path": path})
        else:
            gt = rng.uniform(0, 100, (num_classes, 2))
            preds.append({"points_pixels": gt + rng.normal(0, 5, gt.shape)})
            gts.append({"points": gt, "image_path": path})
    return preds, gts


CASES = [("segmentation", 2), ("segmentation", 3), ("segmentation", 4),
         ("classification", 2), ("classification", 3), ("classification", 5), ("classification", 8),
         ("detection", 1), ("regression", 1), ("regression", 3)]


def assert_metrics_close(got, expected, where=""):
    assert set(got) == set(expected), where
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[name]), f"{where} {name}: {got[name]} vs NaN"
        else:
            assert abs(got[name] - value) <= TOL, f"{where} {name}: {got[name]} vs {value}"


# ------------------------------------------------------------------------ per-image values
def test_per_image_values_follow_the_challenge_conventions():
    gt = np.zeros((6, 8), np.uint8)
    gt[0, 0] = 1                      # class 1 in the ground truth only; class 2 nowhere
    pred = np.zeros((6, 8), np.uint8)
    pred[5, 7] = 3                    # class 3 in the prediction only
    values = BS.per_image_values("segmentation", 4, [{"mask": pred}, {"mask": gt}],
                                 [{"mask": gt, "image_path": "a"}, {"mask": gt, "image_path": "b"}])
    assert values["dice"] == [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]   # both empty: Dice 1
    assert values["hd"] == [[10.0, 0.0, 10.0], [0.0, 0.0, 0.0]]   # one empty: the diagonal; both: 0
    assert values["image_path"] == ["a", "b"]
    assert json.loads(json.dumps(values)) == values                # JSON-ready as they are
    cls = BS.per_image_values("classification", 2, [{"probs": [0.25, 0.75], "predicted_class": 1}], [{"label": 0}])
    assert cls == {"label": [0], "predicted": [1], "probs": [[0.25, 0.75]]}   # no paths: no image_path
    reg = BS.per_image_values("regression", 2, [{"points_pixels": [[3, 4], [0, 0]]}], [{"points": [[0, 0], [0, 1]]}])
    assert reg == {"errors": [[5.0, 1.0]]}
    det = BS.per_image_values("detection", 1, [{"bbox_pixels": [0, 0, 2, 2]}], [{"box": [1, 1, 3, 3]}])
    assert det["iou"] == [pytest.approx(1 / 7)]


@pytest.mark.parametrize("task_type,num_classes", CASES)
def test_metrics_from_values_equal_score_task(task_type, num_classes):
    rng = np.random.default_rng(num_classes * 7 + len(task_type))
    for n in (1, 2, 9, 23):
        preds, gts = random_task(task_type, num_classes, n, rng)
        values = BS.per_image_values(task_type, num_classes, preds, gts)
        expected = M.score_task(task_type, num_classes, preds, gts)
        assert_metrics_close(BS.metrics_from_values(task_type, num_classes, values), expected, f"n={n}")
        # the vectorised path on the identity resample: other code, the same numbers
        identity = BS.metrics_from_values(task_type, num_classes, values, np.arange(n)[None])
        assert_metrics_close({k: float(v[0]) for k, v in identity.items()}, expected, f"identity n={n}")


@pytest.mark.parametrize("task_type,num_classes", CASES)
def test_resampled_metrics_equal_score_task_on_every_resample(task_type, num_classes):
    rng = np.random.default_rng(100 + num_classes)
    n, resamples = 14, 25
    preds, gts = random_task(task_type, num_classes, n, rng)
    values = BS.per_image_values(task_type, num_classes, preds, gts)
    index = BS.resample_indices(n, resamples, seed=3)
    vectorised = BS.metrics_from_values(task_type, num_classes, values, index)
    assert all(v.shape == (resamples,) for v in vectorised.values())
    for b, rows in enumerate(index):
        expected = M.score_task(task_type, num_classes, [preds[i] for i in rows], [gts[i] for i in rows])
        assert_metrics_close({k: float(v[b]) for k, v in vectorised.items()}, expected, f"resample {b}")


def test_resampled_classification_equals_sklearn_with_ties_and_missing_classes():
    """Many resamples of a 4-class task where class 3 is rare: resamples without it average
    the AUC over the classes they contain, and a single-class resample gives NaN."""
    rng = np.random.default_rng(5)
    n = 12
    labels = np.array([0] * 5 + [1] * 4 + [2] * 2 + [3])
    probs = np.round(rng.dirichlet(np.ones(4), n), 1) + 0.01      # heavy ties
    predicted = rng.integers(0, 4, n)
    values = {"label": labels.tolist(), "predicted": predicted.tolist(), "probs": probs.tolist()}
    index = np.vstack([BS.resample_indices(n, 150, seed=1), np.zeros((1, n), np.int64)])  # + one single-class resample
    got = BS.metrics_from_values("classification", 4, values, index)
    assert math.isnan(got["auc"][-1])
    for b, rows in enumerate(index):
        y, p = labels[rows], predicted[rows]
        assert abs(got["f1_macro"][b] - f1_score(y, p, average="macro", zero_division=0)) <= TOL
        assert abs(got["f1_weighted"][b] - f1_score(y, p, average="weighted", zero_division=0)) <= TOL
        assert abs(got["mcc"][b] - matthews_corrcoef(y, p)) <= TOL
        auc = M.classification_auc(y, probs[rows])
        assert (math.isnan(auc) and math.isnan(got["auc"][b])) or abs(got["auc"][b] - auc) <= TOL


def test_resampled_metrics_handle_a_large_validation_set_in_blocks(monkeypatch):
    """Realistic sizes (thousands of images) are processed in blocks of resamples; the blocks
    give the same numbers as one pass."""
    rng = np.random.default_rng(2)
    n = 3000
    labels = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n)
    values = {"label": labels.tolist(), "predicted": probs.argmax(1).tolist(), "probs": probs.tolist()}
    index = BS.resample_indices(n, 40, seed=0)
    whole = BS.metrics_from_values("classification", 3, values, index)
    monkeypatch.setattr(BS, "_CHUNK_ELEMENTS", 7 * n)
    blocks = BS.metrics_from_values("classification", 3, values, index)
    for name in whole:
        np.testing.assert_array_equal(whole[name], blocks[name])


# --------------------------------------------------------------------------- against scipy
def scipy_percentile(statistic, data, n_resamples, seed, vectorized):
    return scipy.stats.bootstrap(data, statistic, n_resamples=n_resamples, rng=seed, method="percentile",
                                 vectorized=vectorized, confidence_level=0.95)


@pytest.mark.parametrize("task_type,num_classes,metric", [
    ("segmentation", 3, "dice"), ("segmentation", 3, "hd"), ("detection", 1, "iou"), ("regression", 3, "mre")])
def test_mean_metric_intervals_equal_scipy_bootstrap(task_type, num_classes, metric):
    rng = np.random.default_rng(11)
    preds, gts = random_task(task_type, num_classes, 20, rng)
    values = BS.per_image_values(task_type, num_classes, preds, gts)
    result = BS.bootstrap_task(task_type, num_classes, values, n_resamples=500, seed=42)[metric]
    # the task metric is the mean over images of a per-image value (mean over the classes / points)
    key = {"dice": "dice", "hd": "hd", "iou": "iou", "mre": "errors"}[metric]
    per_image = np.array([np.mean(row) for row in values[key]])
    ref = scipy_percentile(np.mean, (per_image,), 500, 42, vectorized=True)
    np.testing.assert_allclose(result["distribution"], ref.bootstrap_distribution, rtol=0, atol=TOL)
    np.testing.assert_allclose(result["ci"], [ref.confidence_interval.low, ref.confidence_interval.high],
                               rtol=0, atol=TOL)
    assert result["value"] == M.score_task(task_type, num_classes, preds, gts)[metric]


@pytest.mark.parametrize("num_classes", [2, 4])
def test_classification_intervals_equal_scipy_bootstrap(num_classes):
    """f1_macro, AUC and MCC are not means of per-image values: scipy gets a statistic that
    scores each resample with score_task (scikit-learn), resampling the image indices."""
    rng = np.random.default_rng(num_classes)
    n = 30
    labels = np.arange(n) % num_classes                     # every class common: AUC defined on every resample
    probs = np.round(rng.dirichlet(np.ones(num_classes), n), 1) + 0.01
    probs[np.arange(n), labels] += rng.random(n)
    predicted = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, n))
    values = {"label": labels.tolist(), "predicted": predicted.tolist(), "probs": probs.tolist()}
    result = BS.bootstrap_task("classification", num_classes, values, n_resamples=200, seed=7)

    def statistic(rows):
        rows = rows.astype(np.int64)
        scores = M.classification_metrics(labels[rows], predicted[rows], probs[rows], num_classes)
        return np.array([scores["f1_macro"], scores["auc"], scores["mcc"]])

    ref = scipy_percentile(statistic, (np.arange(n),), 200, 7, vectorized=False)
    for k, metric in enumerate(("f1_macro", "auc", "mcc")):
        np.testing.assert_allclose(result[metric]["distribution"], ref.bootstrap_distribution[k], rtol=0, atol=TOL)
        np.testing.assert_allclose(result[metric]["ci"],
                                   [ref.confidence_interval.low[k], ref.confidence_interval.high[k]],
                                   rtol=0, atol=TOL)


def test_resample_indices_are_scipys_and_repeat_for_a_seed():
    index = BS.resample_indices(9, 50, seed=123)
    np.testing.assert_array_equal(index, np.random.default_rng(123).integers(0, 9, (50, 9)))
    np.testing.assert_array_equal(index, BS.resample_indices(9, 50, seed=123))
    # scipy draws the same resamples whether the generator comes as rng= or random_state=
    x = np.arange(9.0) ** 2
    a = scipy.stats.bootstrap((x,), np.mean, n_resamples=50, rng=123, method="percentile")
    b = scipy.stats.bootstrap((x,), np.mean, n_resamples=50, random_state=np.random.default_rng(123),
                              method="percentile")
    np.testing.assert_allclose(a.bootstrap_distribution, x[index].mean(axis=1), rtol=0, atol=TOL)
    np.testing.assert_array_equal(a.bootstrap_distribution, b.bootstrap_distribution)


def test_percentile_interval_leaves_out_undefined_resamples():
    dist = np.r_[np.arange(100.0), np.full(20, np.nan)]
    assert BS.percentile_interval(dist) == pytest.approx(tuple(np.quantile(np.arange(100.0), [0.025, 0.975])))
    lo, hi = BS.percentile_interval(np.full(5, np.nan))
    assert math.isnan(lo) and math.isnan(hi)
    lo, hi = BS.percentile_interval(np.stack([np.arange(100.0), -np.arange(100.0)], axis=1), level=0.9)
    np.testing.assert_allclose(lo, [4.95, -94.05])
    np.testing.assert_allclose(hi, [94.05, -4.95])


def test_task_seed_is_stable_and_per_task():
    assert BS.task_seed(0, "fetal_head") == BS.task_seed(0, "fetal_head")
    assert BS.task_seed(0, "fetal_head") == 6333901865699037442  # a hash: the same in every process
    seeds = {BS.task_seed(s, t) for s in (0, 1) for t in ("fetal_head", "IUGC", "lung_2cls")}
    assert len(seeds) == 6


def test_bootstrap_off():
    out = BS.bootstrap_task("detection", 1, {"iou": [0.2, 0.4]}, n_resamples=0)
    assert out["iou"]["value"] == pytest.approx(0.3) and out["iou"]["ci"] is None
    assert out["iou"]["distribution"].shape == (0,)


# ------------------------------------------------------------------------- changes vs TS
def test_change_vs_reference_is_the_reports_definition():
    cases = [(0.8, 0.5, "dice"), (0.4, 0.5, "f1_macro"), (3.0, 4.0, "mre"), (5.0, 4.0, "hd"),
             (0.3, 0.0, "iou"), (math.nan, 0.5, "auc"), (0.5, math.nan, "auc"), (-0.2, -0.4, "mcc")]
    for value, ref, metric in cases:
        got, want = BS.change_vs_reference(value, ref, metric), relative_change(value, ref, metric)
        assert (math.isnan(got) and math.isnan(want)) or got == want, (value, ref, metric)
    assert math.isnan(BS.change_vs_reference(None, 0.5, "dice"))
    vec = BS.change_vs_reference(np.array([0.6, 0.4, 1.0]), np.array([0.5, 0.5, 0.0]), "dice")
    np.testing.assert_allclose(vec, [0.2, -0.2, np.nan])
    np.testing.assert_allclose(BS.change_vs_reference(np.array([2.0, 6.0]), 4.0, "mre"), [0.5, -0.5])


def test_significance_rule():
    assert BS.significance([-0.3, -0.1], -0.2) == "negative"
    assert BS.significance([0.1, 0.3], 0.2) == "positive"
    assert BS.significance([-0.3, 0.05], -0.2) == "n.s."      # the interval reaches 0
    assert BS.significance([-0.05, -0.01], -0.03) == "n.s."   # significant but within the threshold
    assert BS.significance([-0.05, -0.01], -0.03, threshold=0.0) == "negative"
    assert BS.significance(None, -0.5) == "n.s."
    assert BS.significance([math.nan, math.nan], -0.5) == "n.s."


def correlated_iou(rng, n, shift, noise=0.05):
    """Two models' per-image IoU on the same images: a shared per-image difficulty plus each
    model's own noise; the second is better by `shift` on every image."""
    base = rng.beta(3, 4, n)
    a = np.clip(base + rng.normal(0, noise, n), 0, 1)
    b = np.clip(base + shift + rng.normal(0, noise, n), 0, 1)
    return {"iou": a.tolist()}, {"iou": b.tolist()}


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
    rng = np.random.default_rng(0)
    reference, values = correlated_iou(rng, 30, 0.02)
    paired = BS.paired_change("detection", 1, values, reference, n_resamples=1000, seed=1)["iou"]
    # unpaired: the two sets resampled independently
    dist = BS.metrics_from_values("detection", 1, values, BS.resample_indices(30, 1000, 1))["iou"]
    dist_ref = BS.metrics_from_values("detection", 1, reference, BS.resample_indices(30, 1000, 2))["iou"]
    unpaired = BS.percentile_interval(BS.change_vs_reference(dist, dist_ref, "iou"))
    width = paired["ci"][1] - paired["ci"][0]
    assert width < 0.5 * (unpaired[1] - unpaired[0])
    assert paired["value"] == pytest.approx(
        BS.change_vs_reference(np.mean(values["iou"]), np.mean(reference["iou"]), "iou"))
    # the same seed gives the same interval: two paradigms share their resamples
    again = BS.paired_change("detection", 1, values, reference, n_resamples=1000, seed=1)["iou"]
    assert again["ci"] == paired["ci"]


CALIBRATION_SEEDS = 200


def test_planted_difference_is_flagged_and_null_difference_is_not():
    """200 repetitions (data and bootstrap seed), 30 images, B = 1000. Planted: IoU + 0.1 on
    every image plus noise (about +23%): flagged "positive" every time (measured 200/200). Null:
    both sets drawn from the same distribution: flagged in 5.5% of the repetitions at the default
    threshold 0.05 and 6.5% with no threshold (the interval alone), where a correct 95% interval
    gives 5% (binomial sd 1.5% over 200). Bound: 10%, 3 sd above the nominal rate."""
    flagged = {"planted": 0, "null": 0, "null_no_threshold": 0}
    for s in range(CALIBRATION_SEEDS):
        rng = np.random.default_rng(10_000 + s)
        for case, shift in (("planted", 0.1), ("null", 0.0)):
            reference, values = correlated_iou(rng, 30, shift)
            change = BS.paired_change("detection", 1, values, reference, 1000, BS.task_seed(s, case))["iou"]
            verdict = BS.significance(change["ci"], change["value"])
            if shift:
                flagged["planted"] += verdict == "positive"
            else:
                flagged["null"] += verdict != "n.s."
                flagged["null_no_threshold"] += BS.significance(change["ci"], change["value"], threshold=0.0) != "n.s."
    rates = {k: v / CALIBRATION_SEEDS for k, v in flagged.items()}
    print("calibration rates over", CALIBRATION_SEEDS, "repetitions:", rates)
    assert rates["planted"] >= 0.95, rates
    assert rates["null"] <= 0.10 and rates["null_no_threshold"] <= 0.10, rates


# ------------------------------------------------------------------------------- alignment
def test_align_pairs_values_by_image_path():
    rng = np.random.default_rng(4)
    preds, gts = random_task("classification", 3, 8, rng)
    values = BS.per_image_values("classification", 3, preds, gts)
    order = rng.permutation(8)
    shuffled = BS.select(values, order)             # another paradigm predicted in another order
    a, b = BS.align(values, None, shuffled, None)
    assert b == values and a == values
    with pytest.raises(ValueError, match="align"):
        BS.paired_change("classification", 3, values, shuffled, 10, 0)
    paths = values["image_path"]
    bare = {k: v for k, v in shuffled.items() if k != "image_path"}
    assert BS.align(values, paths, bare, [paths[i] for i in order])[1]["label"] == values["label"]
    with pytest.raises(ValueError, match="1 only in a"):
        BS.align(values, None, BS.select(values, range(7)), None)
    with pytest.raises(ValueError, match="more than once"):
        BS.align(values, None, BS.select(values, [0, 0, 1, 2, 3, 4, 5, 6]), None)


# ---------------------------------------------------------------------------------- pooling
def test_pooled_is_the_two_level_bootstrap_by_hand():
    n_images, n_resamples, n_draws, seed = 5, 4, 3, 9
    index = BS.resample_indices(n_images, n_resamples, seed)
    rng = np.random.default_rng(1)
    per_seed_values = [{"iou": rng.random(n_images).tolist()} for _ in range(3)]   # 3 training seeds
    dists = [BS.metrics_from_values("detection", 1, v, index)["iou"] for v in per_seed_values]
    points = [float(np.mean(v["iou"])) for v in per_seed_values]
    out = BS.pooled(dists, points, n_resamples_seeds=n_draws, seed=seed)

    draws = np.random.default_rng([seed, 1]).integers(0, 3, (n_resamples, n_draws, 3))
    by_hand = []
    for b in range(n_resamples):
        for r in range(n_draws):
            drawn = [per_seed_values[s]["iou"] for s in draws[b, r]]
            by_hand.append(np.mean([np.mean([v[i] for i in index[b]]) for v in drawn]))
    np.testing.assert_allclose(out["distribution"], by_hand, rtol=0, atol=TOL)
    np.testing.assert_allclose(out["ci"], np.quantile(by_hand, [0.025, 0.975]), rtol=0, atol=TOL)
    assert out["value"] == pytest.approx(statistics.mean(points))
    assert out["spread"] == pytest.approx(statistics.stdev(points))
    assert out["n_seeds"] == 3


def test_pooled_over_one_seed_is_that_seeds_interval():
    values = {"iou": np.random.default_rng(3).random(20).tolist()}
    single = BS.bootstrap_task("detection", 1, values, 300, seed=5)["iou"]
    out = BS.pooled([single["distribution"]], [single["value"]], seed=5)
    assert out["ci"] == single["ci"] and math.isnan(out["spread"])


def test_pooled_interval_widens_when_seeds_disagree():
    rng = np.random.default_rng(8)
    base = rng.random(25)
    index = BS.resample_indices(25, 500, 0)
    seeds = [{"iou": (base + offset).tolist()} for offset in (0.0, 0.1, 0.2)]   # seeds that disagree
    dists = [BS.metrics_from_values("detection", 1, v, index)["iou"] for v in seeds]
    points = [float(np.mean(v["iou"])) for v in seeds]
    out = BS.pooled(dists, points, n_resamples_seeds=5, seed=0)
    single = BS.percentile_interval(dists[1])
    # the seed-mean's spread (0.1 sqrt(2/3) / sqrt(3) = 0.047) adds to the images' (about 0.049)
    # in quadrature: about 1.4 times the single seed's width
    assert out["ci"][1] - out["ci"][0] > 1.2 * (single[1] - single[0])
    assert out["spread"] == pytest.approx(0.1)
