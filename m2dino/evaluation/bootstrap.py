"""Bootstrap confidence intervals for the challenge metrics, over validation images.

Method, in words a report header can quote:

* **Interval of a task metric.** The task's validation images are resampled with replacement
  B times (`--bootstrap B`, default 1000); on every resample each metric is recomputed from
  the per-image values exactly as on the full set (Dice, HD, IoU and MRE as means over the
  resampled images; accuracy, macro and weighted F1 and MCC from the resample's confusion
  matrix; AUC from the resample's ranks, one-vs-rest over the classes present in the
  resample), and the 95% interval is the 2.5th to 97.5th percentile of the B values (the
  percentile bootstrap, identical to `scipy.stats.bootstrap(..., method="percentile")` with
  the same seed). Resamples on which a metric is undefined (AUC with fewer than two classes
  present) are left out of that metric's interval.
* **Interval of a change against TS.** The same B resamples of the same images are scored
  under both paradigms; the change (value - TS) / |TS| (sign-flipped for HD and MRE, so
  positive is better) is computed on every resample and its interval is the percentile
  interval of these B changes (a paired bootstrap: what the two models share, the images,
  cancels out).
* **P-values.** `bootstrap_p_value`: a tail's share of the resampled values at or beyond the
  null value, counted as (k + 1) / (B + 1); two-sided, twice the smaller tail, at most 1.
  `paired_permutation_test`: each image's predictions swapped between the two models at random,
  the metric recomputed (exact at any number of images). The report's flags (corrected for
  multiplicity) are m2dino.evaluation.report.change's; `significance` is the interval rule
  without a correction, kept for callers of one comparison.
* **Several training seeds.** See `pooled`: the same image resamples are used for every
  seed, and each image resample is combined with a resample of the seeds.
* **Seeds of the bootstrap.** Task t's resamples come from `task_seed(seed, t)` (a hash of the
  study's bootstrap seed and the task id, not the training seed), so they are the same under
  every paradigm and training seed, and adding a task changes no other task's intervals.

Per-image values are `metrics.per_image_values` (re-exported here). A caller pairing two
models aligns their values by image first: `align` reorders one onto the other by the CSV
image_path (values carry it as "image_path" when the ground truth did).

Cost: O(B * n) per metric (AUC: O(n log n) once per class, then O(B * n) per class). The
27-task default run (16-44 images a task, B = 1000, three paradigms, CG and AU against TS)
takes about a second on 2 cores (benchmarks/test_bootstrap_bench.py), most of it the point
metrics' scikit-learn calls.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats

from m2dino.evaluation import metrics as M
from m2dino.evaluation.metrics import LOWER_IS_BETTER, METRIC_NAMES, per_image_values  # noqa: F401 (re-export)
from m2dino.tasks import TaskTable, TaskType

DEFAULT_RESAMPLES = 1000
BOOTSTRAP_SEED = 0                    # the study's bootstrap seed: task t resamples with task_seed(0, t)
PER_IMAGE_FILE = "eval_per_image.json"  # beside each model's eval.json: {"tasks": {task_id: per-image values}}
DEFAULT_LEVEL = 0.95
DEFAULT_THRESHOLD = 0.05
# The key of each task type's values whose length is the number of images.
IMAGE_KEY = TaskTable("per-image value keys", {
    TaskType.SEGMENTATION: "dice", TaskType.CLASSIFICATION: "label", TaskType.DETECTION: "iou",
    TaskType.LANDMARKS: "errors",
})
_CHUNK_ELEMENTS = 1 << 22  # resamples are processed in blocks of about this many (resample, image) cells
_SEED_DRAW_STREAM = 1     # pooled(): the seed draws come from default_rng([seed, 1]), apart from the images'


# ------------------------------------------------------------------------------ resampling
def bootstrap_settings(n_resamples: int, level: float = DEFAULT_LEVEL) -> dict:
    """How intervals were made, for the files that carry them."""
    return {"n_resamples": int(n_resamples), "level": level, "seed": BOOTSTRAP_SEED,
            "method": "percentile bootstrap over validation images; task t resamples with task_seed(seed, t)"}


def resample_indices(n: int, n_resamples: int, seed) -> np.ndarray:
    """[B, n] int64 image indices, drawn with replacement: `default_rng(seed).integers(0, n, (B, n))`.

    These are the indices `scipy.stats.bootstrap(data, ..., n_resamples=B, rng=seed)` draws for
    one sample (or for paired samples), so a percentile interval over them equals scipy's. The
    same (n, seed) always gives the same indices: that is what pairs two paradigms, and seeds.
    """
    if n < 1:
        raise ValueError(f"resample_indices: no images to resample (n = {n})")
    return np.random.default_rng(seed).integers(0, n, (int(n_resamples), int(n)))


def resample_counts(index: np.ndarray, n: int) -> np.ndarray:
    """[B, n] float: how many times each image occurs in each resample of `index` [B, m]."""
    index = np.asarray(index)
    rows = index.shape[0]
    flat = (np.arange(rows)[:, None] * n + index).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def task_seed(seed: int, task_id: str) -> int:
    """A stable per-task seed: the first 8 bytes of sha256("<seed>/<task_id>") as an integer."""
    digest = hashlib.sha256(f"{int(seed)}/{task_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def percentile_interval(distribution, level: float = DEFAULT_LEVEL):
    """(lo, hi): the (1-level)/2 and (1+level)/2 quantiles over axis 0 of [B] or [B, ...].

    NaN resamples are left out; NaN where none is left. The quantile is scipy.stats.quantile's
    default (linear, Hyndman-Fan type 7, = numpy's), as in scipy.stats.bootstrap.
    """
    dist = np.asarray(distribution, dtype=np.float64)
    alpha = (1 - level) / 2
    if dist.shape[0] == 0:
        lo = np.full(dist.shape[1:], np.nan)
        return _scalar(lo), _scalar(lo.copy())
    q = scipy.stats.quantile(np.moveaxis(dist, 0, -1), np.array([alpha, 1 - alpha]), axis=-1, nan_policy="omit")
    return _scalar(q[..., 0]), _scalar(q[..., 1])


def _scalar(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


# ----------------------------------------------------------------------- values and images
def num_images(task_type: str, values: Mapping) -> int:
    return len(values[IMAGE_KEY[task_type]])


def select(values: Mapping, rows) -> dict:
    """The values of the images `rows` (in that order): every per-image list, image_path too."""
    rows = [int(r) for r in rows]
    return {key: [column[r] for r in rows] for key, column in values.items()}


def align(values_a: Mapping, paths_a: Sequence[str] | None, values_b: Mapping, paths_b: Sequence[str] | None):
    """(values_a, values_b reordered to a's image order), both with "image_path".

    paths_*: the CSV image_path of each image, in the values' order (None: the values'
    "image_path"). The two must cover the same images, each once: a pairing over different
    images would not be paired.
    """
    paths_a = _paths(values_a, paths_a, "a")
    paths_b = _paths(values_b, paths_b, "b")
    position = {path: i for i, path in enumerate(paths_b)}
    only_a = [p for p in paths_a if p not in position]
    only_b = sorted(set(paths_b) - set(paths_a))
    if only_a or only_b:
        raise ValueError(f"align: the two value sets cover different images ({len(only_a)} only in a, e.g. "
                         f"{only_a[:3]}; {len(only_b)} only in b, e.g. {only_b[:3]})")
    a = {**values_a, "image_path": list(paths_a)}
    b = select({**values_b, "image_path": list(paths_b)}, [position[p] for p in paths_a])
    return a, b


def _paths(values: Mapping, paths, name: str) -> list[str]:
    if paths is None:
        if "image_path" not in values:
            raise ValueError(f"align: values_{name} carry no image_path and no paths_{name} was given")
        paths = values["image_path"]
    paths = [str(p) for p in paths]
    lengths = {len(column) for key, column in values.items() if key != "image_path"}
    if lengths != {len(paths)}:
        raise ValueError(f"align: {len(paths)} image paths for values_{name} of {sorted(lengths)} images")
    repeated = [path for path, count in Counter(paths).items() if count > 1]
    if repeated:
        raise ValueError(f"align: image_path {repeated[0]!r} occurs more than once in values_{name}")
    return paths


# ------------------------------------------------------------------ metrics from the values
def metrics_from_values(task_type: str, num_classes: int, values: Mapping, index=None) -> dict:
    """The task's metrics from its per-image values.

    index None: {metric: float}, the challenge's values (`metrics.metrics_from_values`, the
    code `score_task` runs). index, an int array [B, m] of image indices (one resample a
    row): {metric: ndarray [B]}, each metric recomputed on every resample, vectorised.
    """
    if index is None:
        return M.metrics_from_values(task_type, num_classes, values)
    n = num_images(task_type, values)
    index = np.asarray(index)
    if index.ndim != 2 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"metrics_from_values: index must be an integer array [B, m], got {index.dtype} {index.shape}")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"metrics_from_values: index outside [0, {n})")
    if index.shape[1] == 0:
        raise ValueError("metrics_from_values: resamples of zero images")
    compute = _RESAMPLED[task_type](values, num_classes)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, index.shape[1]))
    blocks = (index[start:start + chunk] for start in range(0, index.shape[0], chunk))
    parts = [compute(block, resample_counts(block, n)) for block in blocks]
    if not parts:
        return {name: np.zeros(0) for name in METRIC_NAMES[task_type]}
    return {name: np.concatenate([p[name] for p in parts]) for name in METRIC_NAMES[task_type]}


# Each maker checks a task's values once and returns compute(index [b, m], counts [b, n]) ->
# {metric: [b]}; counts[r, i] is how often image i occurs in resample r (resample_counts).
def _segmentation(values, num_classes):
    tables = {name: M.per_class_table(values, name, num_classes) for name in ("dice", "hd")}
    # per class: the mean over the resampled images; then the mean over the classes
    return lambda index, counts: {name: (counts @ t).mean(axis=1) / index.shape[1] for name, t in tables.items()}


def _detection(values, num_classes):
    iou = np.asarray(values["iou"], dtype=np.float64)
    return lambda index, counts: {"iou": counts @ iou / index.shape[1]}


def _regression(values, num_classes):
    errors = M.image_radial_errors(values["errors"])
    return lambda index, counts: {"mre": counts @ errors / index.shape[1]}


def _classification(values, num_classes):
    labels, predicted, probs = M.classification_arrays(values["label"], values["predicted"],
                                                       M.probs_table(values["probs"]), num_classes)
    if not np.isfinite(probs).all():
        raise ValueError("classification: non-finite probabilities")
    codes = labels * num_classes + predicted
    scores = [_SortedScores(probs[:, c], labels == c) for c in range(num_classes)]

    def compute(index, counts):
        rows = index.shape[0]
        flat = (np.arange(rows)[:, None] * num_classes ** 2 + codes[index]).ravel()
        confusion = np.bincount(flat, minlength=rows * num_classes ** 2)
        confusion = confusion.reshape(rows, num_classes, num_classes).astype(np.float64)
        out = confusion_metrics(confusion)
        out["auc"] = _resampled_auc(scores, confusion.sum(axis=2), counts)
        return out

    return compute


_RESAMPLED = TaskTable("bootstrap resampling", {
    TaskType.SEGMENTATION: _segmentation, TaskType.CLASSIFICATION: _classification,
    TaskType.DETECTION: _detection, TaskType.LANDMARKS: _regression,
})


def confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, f1_macro, f1_weighted, mcc of each confusion matrix [B, C, C] (rows: truth).

    As scikit-learn computes them over the labels present in the truth or the predictions:
    F1_c = 2 TP / (true + predicted), macro = mean over those labels, weighted by true count;
    MCC is the multi-class (Gorodkin) formula of sklearn's matthews_corrcoef, 0 when undefined.
    """
    true = confusion.sum(axis=2)
    pred = confusion.sum(axis=1)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    total = true.sum(axis=1)
    correct = tp.sum(axis=1)
    seen = true + pred
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(seen > 0, 2 * tp / seen, 0.0)
        cov_tp = correct * total - (true * pred).sum(axis=1)
        cov_pp = total ** 2 - (pred * pred).sum(axis=1)
        cov_tt = total ** 2 - (true * true).sum(axis=1)
        product = cov_pp * cov_tt
        mcc = np.where(product == 0, 0.0, cov_tp / np.sqrt(np.where(product == 0, 1.0, product)))
        return {
            "accuracy": correct / total,
            "f1_macro": f1.sum(axis=1) / (seen > 0).sum(axis=1),
            "f1_weighted": (f1 * true).sum(axis=1) / total,
            "mcc": mcc,
        }


class _SortedScores:
    """One class's scores sorted once (O(n log n)), with the groups of tied scores."""

    def __init__(self, scores: np.ndarray, positive: np.ndarray):
        self.order = np.argsort(scores, kind="stable")
        s = scores[self.order]
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        self.positive = positive[self.order].astype(np.float64)
        self.any_positive = bool(positive.any())

    def auc(self, counts: np.ndarray) -> np.ndarray:
        """ROC-AUC on each resample, its images weighted by counts [B, n]; ties count 1/2.

        Mann-Whitney: over groups of tied scores in ascending order, sum of positives x
        (negatives below + half the tied negatives), over positives x negatives. NaN where a
        resample lacks positives or negatives.
        """
        weights = counts[:, self.order]
        pos = np.add.reduceat(weights * self.positive, self.starts, axis=1)
        neg = np.add.reduceat(weights, self.starts, axis=1) - pos
        below = np.cumsum(neg, axis=1) - neg
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / pairs, np.nan)


def _resampled_auc(scores: list[_SortedScores], true_counts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The challenge's AUC rule per resample: 2 classes, the class-1 score; more, the macro
    one-vs-rest mean over the classes present in the resample; NaN with fewer than 2 present."""
    rows, num_classes = true_counts.shape
    if num_classes < 2:
        return np.full(rows, np.nan)
    if num_classes == 2:
        return scores[1].auc(counts)
    present = true_counts > 0
    total = np.zeros(rows)
    for c, sc in enumerate(scores):
        if sc.any_positive:
            total += np.where(present[:, c], np.nan_to_num(sc.auc(counts)), 0.0)
    k = present.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(k >= 2, total / k, np.nan)


# --------------------------------------------------------------------- intervals and changes
def bootstrap_task(task_type: str, num_classes: int, values: Mapping, n_resamples: int = DEFAULT_RESAMPLES,
                   seed=0, level: float = DEFAULT_LEVEL) -> dict:
    """{metric: {"value": float, "ci": [lo, hi], "distribution": ndarray [B]}} of one task.

    seed: the task's seed (`task_seed(study_seed, task_id)`). n_resamples 0 turns the
    bootstrap off: "ci" is None and the distribution empty.
    """
    point = metrics_from_values(task_type, num_classes, values)
    dist = _distributions(task_type, num_classes, values, n_resamples, seed)
    return {name: _entry(point[name], dist[name], level) for name in point}


def paired_change(task_type: str, num_classes: int, values: Mapping, reference_values: Mapping,
                  n_resamples: int = DEFAULT_RESAMPLES, seed=0, level: float = DEFAULT_LEVEL) -> dict:
    """{metric: {"value", "ci", "distribution"}} of the change of `values` against the reference
    (`change_vs_reference`), over the same resampled images under both (paired bootstrap).

    The two must list the same images in the same order (`align` first); when both carry
    "image_path" that is checked. With both paradigms' `bootstrap_task` results at hand (same
    seed), `change_from_results` gives the same without recomputing them.
    """
    n = num_images(task_type, values)
    if num_images(task_type, reference_values) != n:
        raise ValueError(
            f"paired_change: {n} images against {num_images(task_type, reference_values)} in the reference")
    if "image_path" in values and "image_path" in reference_values \
            and list(values["image_path"]) != list(reference_values["image_path"]):
        raise ValueError("paired_change: the two value sets list different images or another order; align() them first")
    return change_from_results(bootstrap_task(task_type, num_classes, values, n_resamples, seed, level),
                               bootstrap_task(task_type, num_classes, reference_values, n_resamples, seed, level),
                               level)


def change_from_results(results: Mapping, reference_results: Mapping, level: float = DEFAULT_LEVEL) -> dict:
    """The paired change between two `bootstrap_task` results of one task: {metric: {"value",
    "ci", "distribution"}}. Paired only when both were resampled alike: the same images in the
    same order, the same n_resamples and seed (the task's seed, whatever the paradigm)."""
    out = {}
    for name, entry in results.items():
        ref = reference_results[name]
        if entry["distribution"].shape != ref["distribution"].shape:
            raise ValueError(f"change_from_results: {name} distributions of {entry['distribution'].size} and "
                             f"{ref['distribution'].size} resamples")
        out[name] = _entry(change_vs_reference(entry["value"], ref["value"], name),
                           change_vs_reference(entry["distribution"], ref["distribution"], name), level)
    return out


def _distributions(task_type, num_classes, values, n_resamples, seed) -> dict:
    if n_resamples == 0:
        return {name: np.zeros(0) for name in METRIC_NAMES[task_type]}
    index = resample_indices(num_images(task_type, values), n_resamples, seed)
    return metrics_from_values(task_type, num_classes, values, index)


def _entry(value, distribution: np.ndarray, level: float) -> dict:
    ci = list(percentile_interval(distribution, level)) if distribution.size else None
    return {"value": float(value), "ci": ci, "distribution": distribution}


def difference_vs_reference(value, reference, metric: str):
    """value - ref in the metric's units, sign-flipped for HD and MRE (reference - value): positive
    is better, and for HD and MRE it is the pixels saved. NaN where either is NaN/None. Scalars
    give a float, arrays an array (elementwise)."""
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return _scalar(reference - value if metric in LOWER_IS_BETTER else value - reference)


def change_vs_reference(value, reference, metric: str):
    """(value - ref) / |ref|, sign-flipped for HD and MRE (positive = better); NaN when ref is 0
    or either is NaN/None. Scalars give a float, arrays an array (elementwise)."""
    reference = np.asarray(reference, dtype=np.float64)
    delta = np.asarray(difference_vs_reference(value, reference, metric))
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.where(reference == 0, np.nan, delta / np.abs(reference))
    return _scalar(change)


def bootstrap_p_value(distribution, null: float = 0.0, alternative: str = "two-sided"):
    """The p-value of a paired change from its B resampled values (over the last axis), by the
    report's stated rule: a tail's share is (k + 1) / (B + 1), k the resamples at or beyond `null`
    on the side of H0 (the +1 counts the observed sample, so p is never 0); "greater" (H1: the
    change is above null) is the share at or below it, "less" the share at or above it, and
    "two-sided" twice the smaller of the two, at most 1. NaN resamples are left out (NaN when
    none is left)."""
    dist = np.asarray(distribution, dtype=np.float64)
    valid = np.isfinite(dist)
    b = valid.sum(axis=-1)
    below = ((dist <= null) & valid).sum(axis=-1)
    above = ((dist >= null) & valid).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share_below, share_above = (below + 1) / (b + 1), (above + 1) / (b + 1)
        tails = {"greater": share_below, "less": share_above,
                 "two-sided": np.minimum(1.0, 2 * np.minimum(share_below, share_above))}
        if alternative not in tails:
            raise ValueError(f"bootstrap_p_value: alternative must be one of {sorted(tails)}, got {alternative!r}")
        return _scalar(np.where(b > 0, tails[alternative], np.nan))


def significance(ci, change, threshold: float = DEFAULT_THRESHOLD) -> str:
    """"negative" when change < -threshold and the interval lies entirely below 0, "positive"
    when change > threshold and it lies entirely above 0, else "n.s." (also without an interval)."""
    if ci is None or change is None:
        return "n.s."
    lo, hi = (float(v) if v is not None else math.nan for v in ci)
    change = float(change)
    if change < -threshold and hi < 0:
        return "negative"
    if change > threshold and lo > 0:
        return "positive"
    return "n.s."


def paired_permutation_test(task_type: str, num_classes: int, values: Mapping, reference_values: Mapping,
                            metric: str, n_resamples: int = DEFAULT_RESAMPLES, seed=0) -> float:
    """Two-sided p-value of "the two models score the task alike" on the same images: each image's
    predictions are swapped between the two models at random (a paired permutation test, the
    approximate randomisation test of Noreen 1989; scipy.stats.permutation_test with
    permutation_type="samples", exact when 2^n <= n_resamples), and the metric difference is
    recomputed on every permutation, so any metric works (macro-F1 from the mixed confusion
    matrix too). Exact at every number of images, where a bootstrap test is liberal on small sets.
    The two must list the same images in the same order."""
    n = num_images(task_type, values)
    if num_images(task_type, reference_values) != n:
        raise ValueError(f"paired_permutation_test: {n} images against {num_images(task_type, reference_values)}")
    # both models' values as one set of 2n images: a permutation picks, per image, one of its two rows
    combined = {key: list(values[key]) + list(reference_values[key]) for key in values
                if key != "image_path" and key in reference_values}

    def difference(ours, theirs, axis=-1):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        shape = ours.shape[:-1]
        a = metrics_from_values(task_type, num_classes, combined, ours.reshape(-1, n))[metric]
        b = metrics_from_values(task_type, num_classes, combined, theirs.reshape(-1, n))[metric]
        return (a - b).reshape(shape)

    result = scipy.stats.permutation_test((np.arange(n), np.arange(n) + n), difference, vectorized=True,
                                          permutation_type="samples", n_resamples=int(n_resamples),
                                          rng=np.random.default_rng(seed))
    return float(result.pvalue)


def pooled(distributions_by_seed: Sequence, values_by_seed: Sequence[float], n_resamples_seeds: int = 1,
           seed=0, level: float = DEFAULT_LEVEL) -> dict:
    """One metric (or change) pooled over S training seeds, accounting for images and seeds.

    Method, in words a report header can quote: "Over S training seeds, the value is the mean
    of the seeds' values and ± the sample standard deviation across seeds. The 95% interval is
    a two-level bootstrap: every seed is scored on the same B resamples of the validation
    images; for each image resample, the S seeds are drawn with replacement (R times) and their
    values on that resample averaged, and the interval is the 2.5th to 97.5th percentile of
    these B x R averages, so it reflects both which images were validated on and which training
    seeds were run." (With S = 1 it is the single seed's image interval; with 2 or 3 seeds the
    seed resampling understates the between-seed spread, by the factor (S-1)/S in variance.)

    distributions_by_seed: S arrays [B], aligned (resample b is the same images for every
    seed: the same task seed for all); values_by_seed: the S point values. The seed draws
    come from `default_rng([seed, 1])`, a stream apart from the image resamples' `default_rng(seed)`.
    Returns {"value", "spread", "ci", "distribution" [B * R], "n_seeds"}.
    """
    table = np.stack([np.asarray(d, dtype=np.float64) for d in distributions_by_seed])  # [S, B]
    values = np.asarray(values_by_seed, dtype=np.float64)
    n_seeds, n_resamples = table.shape
    if values.shape != (n_seeds,):
        raise ValueError(f"pooled: {values.size} point values for {n_seeds} seeds' distributions")
    rng = np.random.default_rng([int(seed), _SEED_DRAW_STREAM])
    draws = rng.integers(0, n_seeds, (n_resamples, int(n_resamples_seeds), n_seeds))  # [B, R, S]
    averages = table.T[np.arange(n_resamples)[:, None, None], draws].mean(axis=2).ravel()  # [B * R]
    return {
        "value": float(np.mean(values)),
        "spread": float(np.std(values, ddof=1)) if n_seeds > 1 else math.nan,
        "ci": list(percentile_interval(averages, level)) if averages.size else None,
        "distribution": averages,
        "n_seeds": n_seeds,
    }
