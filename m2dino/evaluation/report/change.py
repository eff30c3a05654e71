"""A paradigm's change on one task against a reference paradigm (TS, the control TS*, or any
other), the per-task tests behind it, and whether the reference is above chance at all.

Per task, with the training seeds paired by run directory (seed N of a paradigm against seed N
of the reference):

* The effect in the metric's own units: the paired difference value - reference (reference -
  value for HD and MRE, so positive is better and MRE's is the pixels saved), the mean over the
  seeds.
* With two or more paired seeds the test is over training seeds: the one-sample t-test of the S
  per-seed differences (scipy.stats.ttest_1samp, S - 1 degrees of freedom) and its t-interval.
  The validation images are the same under every seed, so this is a claim about training runs
  on these validation images.
* With one seed the test is over validation images only, seed variance not in it: the paired
  permutation test (each image's predictions swapped between the two models at random, the
  metric recomputed; exact at any number of images), and the paired percentile bootstrap
  interval (the same resampled images under both paradigms; m2dino.evaluation.bootstrap).
* Non-inferiority: H0 "the effect is at most -margin" (margin in the metric's units), one-sided:
  over seeds the t-test; with one seed the bootstrap p-value by the stated tail rule
  (`bootstrap_p_value`: H0 is not an exchangeability, so no permutation test).
* At chance: the reference is not significantly above its task's trivial baseline. The test is
  one-sided on the bootstrap over images, made in every seed, and the largest of the seeds'
  p-values counts (an intersection-union test: the reference is above chance in every seed).
  Without per-image values, a point comparison.
* Gap share: effect / (reference - baseline), both oriented: the share of the reference's margin
  over the trivial baseline that the paradigm adds (+) or gives back (-1: down to the baseline).
  Only where the reference is not at chance.
* Relative change (value - ref) / |ref| (sign-flipped for HD and MRE) per metric, a secondary
  number, with the interval of the same test.

P-values are adjusted for multiplicity afterwards (compute.py), over every per-task test of the
report; `decide` then sets the flags.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import scipy.stats

from m2dino.evaluation.bootstrap import (
    BOOTSTRAP_SEED,
    DEFAULT_LEVEL,
    bootstrap_p_value,
    change_vs_reference,
    difference_vs_reference,
    paired_permutation_test,
    percentile_interval,
    task_seed,
)
from m2dino.evaluation.metrics import as_float, nanmean

# Non-inferiority margins in the metric's units (pixels for MRE and HD): a loss smaller than this
# does not count as a loss. 0.02 Dice / IoU / macro-F1 is below what the synthetic suite's
# validation sets resolve per task; 1 px of radial error at the model's input scale.
DEFAULT_MARGINS = {"dice": 0.02, "iou": 0.02, "f1_macro": 0.02, "mre": 1.0, "hd": 1.0}
T_OVER_SEEDS = "t over seeds"
BOOTSTRAP_OVER_IMAGES = "permutation over images"
UNTESTED = "none"


class TaskRuns(NamedTuple):
    """One task's results over the paradigms and seeds, as the tests take them."""
    task_id: str
    metric: str                 # the primary metric
    baseline: float             # the trivial baseline's primary metric
    values: dict                # paradigm -> replicate -> {metric: point value}
    scored: dict                # paradigm -> replicate -> bootstrap_task result ({} when no intervals)
    images: dict = {}           # paradigm -> replicate -> per-image values, every run on the same images in one order
    task_type: str = ""
    num_classes: int = 0


@dataclass
class Change:
    """A paradigm's change on one task against a reference paradigm."""
    paradigm: str
    reference: str
    metric: str                            # the task's primary metric
    units: float                           # paired difference in the metric's units, positive = better
    units_ci: list | None                  # its interval (t over seeds, or bootstrap over images)
    relative: dict                         # metric -> relative change (secondary)
    relative_ci: dict = field(default_factory=dict)
    relative_spread: dict = field(default_factory=dict)  # metric -> std of the per-seed changes
    method: str = UNTESTED                 # T_OVER_SEEDS, BOOTSTRAP_OVER_IMAGES or UNTESTED
    n_seeds: int = 0                       # paired seeds
    p: float | None = None                 # two-sided p of the effect
    margin: float = math.nan               # non-inferiority margin (metric units)
    non_inferiority_p: float | None = None  # one-sided p of H0: effect <= -margin
    gap_share: float | None = None         # effect / (reference - baseline); None at chance
    # set by the multiplicity correction and `decide`
    p_adjusted: float | None = None
    non_inferiority_p_adjusted: float | None = None
    transfer: str = "n.s."                 # "positive", "negative" or "n.s."
    non_inferior: bool | None = None       # None: not tested

    @property
    def relative_primary(self) -> float:
        return as_float(self.relative.get(self.metric))

    def to_json(self) -> dict:
        """The record as report.json holds it (the relative change keeps its historical key)."""
        out = {"reference": self.reference,
               "change_vs_ts": self.relative, "change_ci": self.relative_ci,
               "transfer": self.transfer, "negative_transfer": self.transfer == "negative",
               "effect_units": {"metric": self.metric, "value": self.units, "ci": self.units_ci, "p": self.p,
                                "p_adjusted": self.p_adjusted, "method": self.method, "n_seeds": self.n_seeds},
               "gap_share": self.gap_share,
               "non_inferiority": {"margin": self.margin, "p": self.non_inferiority_p,
                                   "p_adjusted": self.non_inferiority_p_adjusted, "shown": self.non_inferior}}
        if self.relative_spread:
            out["change_spread"] = self.relative_spread
        return out

    @classmethod
    def from_json(cls, paradigm: str, data: dict) -> "Change":
        units, ni = data["effect_units"], data["non_inferiority"]
        return cls(paradigm=paradigm, reference=data["reference"], metric=units["metric"],
                   units=as_float(units["value"]), units_ci=units["ci"], relative=data["change_vs_ts"],
                   relative_ci=data.get("change_ci") or {}, relative_spread=data.get("change_spread") or {},
                   method=units["method"], n_seeds=units["n_seeds"], p=units["p"], margin=as_float(ni["margin"]),
                   non_inferiority_p=ni["p"], gap_share=data["gap_share"], p_adjusted=units["p_adjusted"],
                   non_inferiority_p_adjusted=ni["p_adjusted"], transfer=data["transfer"], non_inferior=ni["shown"])


def compare(task: TaskRuns, paradigm: str, reference: str, margin: float, level: float = DEFAULT_LEVEL) -> Change:
    """The paradigm's change on the task against the reference, tested (not yet corrected)."""
    return compare_all([(task, paradigm, reference, margin)], level)[0]


def compare_all(items, level: float = DEFAULT_LEVEL) -> list[Change]:
    """`compare` of many (task, paradigm, reference, margin) at once: the tests of all of them
    run as a few vectorised calls (one t-test per count of seeds, one interval over all
    bootstrap distributions), which is what makes a whole study, or many simulated ones, quick."""
    changes, t_rows, bootstrapped = [], [], []
    for task, paradigm, reference, margin in items:
        change = Change(paradigm, reference, task.metric, math.nan, None, {}, margin=margin)
        runs, ref_runs = task.values[paradigm], task.values[reference]
        # seed N against seed N; unless every seed of the paradigm has its partner, the means are compared
        paired = sorted(runs) if set(runs) <= set(ref_runs) else []
        change.n_seeds = len(paired)
        names = sorted({m for rep in runs.values() for m in rep})
        scored, ref_scored = task.scored.get(paradigm) or {}, task.scored.get(reference) or {}
        if len(paired) >= 2:
            change.method = T_OVER_SEEDS
            differences = [difference_vs_reference(runs[r].get(task.metric), ref_runs[r].get(task.metric),
                                                   task.metric) for r in paired]
            t_rows += [(change, "units", differences), (change, "non_inferiority", [d + margin for d in differences])]
            for name in names:
                per_seed = [change_vs_reference(as_float(runs[r].get(name)), as_float(ref_runs[r].get(name)), name)
                            for r in paired]
                t_rows.append((change, name, per_seed))
                change.relative_spread[name] = _spread(per_seed)
        elif len(paired) == 1 and paired[0] in scored and paired[0] in ref_scored:
            change.method = BOOTSTRAP_OVER_IMAGES
            rep = paired[0]
            change.units = difference_vs_reference(runs[rep].get(task.metric), ref_runs[rep].get(task.metric),
                                                   task.metric)
            distributions = {name: change_vs_reference(scored[rep][name]["distribution"],
                                                       ref_scored[rep][name]["distribution"], name)
                             for name in names if name in scored[rep] and name in ref_scored[rep]}
            distributions["units"] = difference_vs_reference(scored[rep][task.metric]["distribution"],
                                                             ref_scored[rep][task.metric]["distribution"], task.metric)
            bootstrapped.append((change, distributions))
            if rep in (task.images.get(paradigm) or {}) and rep in (task.images.get(reference) or {}):
                change.p = paired_permutation_test(
                    task.task_type, task.num_classes, task.images[paradigm][rep], task.images[reference][rep],
                    task.metric, n_resamples=len(distributions["units"]),
                    seed=task_seed(BOOTSTRAP_SEED, f"{task.task_id}/{paradigm}/{reference}"))
            for name in names:
                change.relative[name] = change_vs_reference(as_float(runs[rep].get(name)),
                                                            as_float(ref_runs[rep].get(name)), name)
        else:  # unpaired seeds, or one seed without per-image values: the change of the means, untested
            for name in names:
                change.relative[name] = change_vs_reference(_mean(runs, name), _mean(ref_runs, name), name)
            change.units = difference_vs_reference(_mean(runs, task.metric), _mean(ref_runs, task.metric),
                                                   task.metric)
        changes.append(change)
    _t_over_seeds(t_rows, level)
    _bootstrap_over_images(bootstrapped, level)
    for change in changes:
        change.units = float(change.units)
    return changes


def above_chance(task: TaskRuns, reference: str, level: float = DEFAULT_LEVEL) -> dict:
    """{"at_chance": bool | None, "p", "method", "gap"}: whether the reference is not significantly
    above the task's trivial baseline (None: no baseline to compare with). gap: reference - baseline
    (oriented), the denominator of the gap share."""
    runs = task.values[reference]
    gap = difference_vs_reference(_mean(runs, task.metric), task.baseline, task.metric)
    if not math.isfinite(gap):
        return {"at_chance": None, "p": None, "method": "no baseline", "gap": None}
    scored = task.scored.get(reference) or {}
    if scored and all(rep in scored for rep in runs):
        p = max(bootstrap_p_value(difference_vs_reference(scored[rep][task.metric]["distribution"], task.baseline,
                                                          task.metric), 0.0, "greater") for rep in runs)
        return {"at_chance": not (p <= 1 - level and gap > 0), "p": float(p),
                "method": "one-sided bootstrap over images in every seed (largest p)", "gap": float(gap)}
    return {"at_chance": not gap > 0, "p": None, "method": "point values (no intervals)", "gap": float(gap)}


def with_gap_share(change: Change, chance: dict) -> Change:
    """The change with its gap share, where the reference is above chance."""
    if chance["at_chance"] is False and chance["gap"] and math.isfinite(change.units):
        change.gap_share = change.units / chance["gap"]
    return change


def decide(change: Change, alpha: float, threshold: float) -> Change:
    """The transfer flag and the non-inferiority verdict from the adjusted p-values.

    A gain (loss) is flagged when the adjusted p is at most alpha, the effect is above (below) 0,
    and the relative change is beyond +threshold (-threshold) or undefined (a reference of 0).
    Untested changes (no paired seeds and no per-image values) are flagged by the threshold
    alone, and the report says they are not evidence."""
    relative = change.relative_primary
    beyond = {1: not math.isfinite(relative) or relative > threshold,
              -1: not math.isfinite(relative) or relative < -threshold}
    if change.method == UNTESTED:
        change.transfer = ("negative" if math.isfinite(relative) and relative < -threshold else
                           "positive" if math.isfinite(relative) and relative > threshold else "n.s.")
        return change
    significant = change.p_adjusted is not None and change.p_adjusted <= alpha
    sign = int(np.sign(change.units)) if math.isfinite(change.units) else 0
    change.transfer = ("positive" if significant and sign > 0 and beyond[1] else
                       "negative" if significant and sign < 0 and beyond[-1] else "n.s.")
    if change.non_inferiority_p_adjusted is not None:
        change.non_inferior = bool(change.non_inferiority_p_adjusted <= alpha)
    return change


# ------------------------------------------------------------------------------ helpers
def _t_over_seeds(rows: list, level: float) -> None:
    """Fill the changes from their per-seed values: rows (change, what, values), what = "units"
    (mean, t-interval, two-sided p of mean 0), "non_inferiority" (the one-sided p of the values
    shifted by the margin) or a metric name (the relative change's mean and t-interval).
    scipy.stats.ttest_1samp runs once per count of finite seeds, over all rows with that count."""
    by_length: dict[int, list] = {}
    for change, what, values in rows:
        finite = [v for v in values if math.isfinite(v)]
        by_length.setdefault(len(finite), []).append((change, what, np.asarray(finite, dtype=np.float64)))
    for length, group in by_length.items():
        table = np.stack([values for _, _, values in group]) if length else np.zeros((len(group), 0))
        means = table.mean(axis=1) if length else np.full(len(group), math.nan)
        if length >= 2:
            with warnings.catch_warnings():  # near-identical seeds: scipy warns of lost precision
                warnings.simplefilter("ignore", RuntimeWarning)
                two_sided = scipy.stats.ttest_1samp(table, 0.0, axis=1)
                interval = two_sided.confidence_interval(level)
                greater = scipy.stats.ttest_1samp(table, 0.0, axis=1, alternative="greater").pvalue
        constant = np.ptp(table, axis=1) == 0 if length else np.ones(len(group), bool)
        for i, (change, what, _) in enumerate(group):
            mean = float(means[i])
            if length < 2:
                ci, p, p_greater = None, None, None
            elif constant[i]:  # every seed alike: no spread to test against
                ci, p, p_greater = [mean, mean], (1.0 if mean == 0 else None), (1.0 if mean <= 0 else None)
            else:
                ci = [float(interval.low[i]), float(interval.high[i])]
                p, p_greater = float(two_sided.pvalue[i]), float(greater[i])
            if what == "units":
                change.units, change.units_ci, change.p = mean, ci, p
            elif what == "non_inferiority":
                change.non_inferiority_p = p_greater
            else:
                change.relative[what], change.relative_ci[what] = mean, ci


def _bootstrap_over_images(items: list, level: float) -> None:
    """Fill the changes from their paired bootstrap distributions: items (change, {"units": [B],
    metric: [B] relative change}); one percentile call and one p-value call over all of them."""
    if not items:
        return
    keys = [(i, key) for i, (_, distributions) in enumerate(items) for key in distributions]
    table = np.stack([items[i][1][key] for i, key in keys], axis=1)  # [B, rows]
    low, high = percentile_interval(table, level)
    units = [j for j, (_, key) in enumerate(keys) if key == "units"]
    margins = np.array([items[keys[j][0]][0].margin for j in units])
    non_inferiority = np.atleast_1d(bootstrap_p_value(table[:, units].T + margins[:, None], 0.0, "greater"))
    for j, (i, key) in enumerate(keys):
        change, interval = items[i][0], [float(np.atleast_1d(low)[j]), float(np.atleast_1d(high)[j])]
        if key == "units":
            k = units.index(j)
            change.units_ci, change.non_inferiority_p = interval, float(non_inferiority[k])
        else:
            change.relative_ci[key] = interval


def _spread(values) -> float:
    """Standard deviation across seeds (ddof 1) of the finite values; NaN with fewer than two."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _mean(runs: dict, metric: str) -> float:
    return nanmean([as_float(values.get(metric)) for values in runs.values()])
