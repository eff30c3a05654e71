"""The numbers of the transfer report, as one JSON-ready dict (`compute_report`).

Definitions (also stated in the report itself):

* References: TS, and TS* (the converged-TS control) when the run has it. Every other paradigm
  is compared with each reference before it in that order (TS* itself against TS), task by task
  (change.py: the effect in the metric's units, its test over training seeds or, with one seed,
  over validation images, non-inferiority, the gap share, the relative change).
* Intervals of a value: 95% percentile bootstrap over the validation images, every metric
  recomputed on each resample, the same resamples for every paradigm and seed of a task
  (m2dino.evaluation.bootstrap). Several run directories are seed replicates: a value is the mean
  over seeds, "spread" the standard deviation across them, and the interval a two-level
  bootstrap (bootstrap.pooled: per resample, one draw of the images, shared by every seed and
  paradigm since they are scored on the same images, and one draw of the seeds).
* Multiplicity: every per-task p-value of the report (the change and non-inferiority tests of
  every task, paradigm and reference) is adjusted together (--correction); so is every test over
  tasks (tasklevel.py), as a second family.
* Transfer: negative (positive) when the adjusted p is at most 0.05, the effect is below (above)
  0 and the relative change is beyond the threshold (default 5%); otherwise "n.s.".
* At chance: the reference is not significantly above the task's trivial baseline; such a task
  is left out of the relative summaries (gap share, relative change) and of the tests over tasks.
* Data scale: a task is data-rich when its training size is >= the threshold (default the
  median training size of the reported tasks), data-scarce otherwise; the split is descriptive,
  RQ2's claim comes from the tests over tasks.
* Routing: the share of each task's routed tokens that went to each expert, per MoE layer.
  Task affinity = 1 - Jensen-Shannon divergence (base 2, so in [0, 1]; 1 = identical
  routing) between two tasks' expert distributions, averaged over the MoE layers.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from typing import Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon

from m2dino.evaluation.bootstrap import (
    BOOTSTRAP_SEED,
    DEFAULT_LEVEL,
    bootstrap_task,
    change_vs_reference,
    pooled,
    select,
    task_seed,
)
from m2dino.evaluation.metrics import LOWER_IS_BETTER, METRIC_NAMES, as_float, nanmean
from m2dino.evaluation.report import design as designed
from m2dino.evaluation.report import groupings, tasklevel
from m2dino.evaluation.report.change import (
    BOOTSTRAP_OVER_IMAGES,
    DEFAULT_MARGINS,
    T_OVER_SEEDS,
    Change,
    TaskRuns,
    above_chance,
    compare_all,
    decide,
    with_gap_share,
)
from m2dino.evaluation.report.runs import TRAINING_KEYS, Runs, load_runs, read_checkpoint_config
from m2dino.evaluation.report.tasklevel import CORRECTION_NAMES, CORRECTIONS, DEFAULT_CORRECTION
from m2dino.paradigms import AG_PARADIGM, CONTROL_PARADIGM, PARADIGMS, plateau_rule_text
from m2dino.tasks import TaskTable, TaskType

# The converged-TS control (--control ts-converged): its models are the second reference
CONTROL = CONTROL_PARADIGM
# The references every other paradigm is compared with, in order (each against those before it)
REFERENCES = ("ts", CONTROL)
DEFAULT_NEGATIVE_THRESHOLD = 0.05
BUDGETS = ("equal-exposure", "converged")
AFFINITY_DEFINITION = ("1 - Jensen-Shannon divergence (base 2) of the tasks' expert-routing distributions, "
                       "mean over MoE layers")
INTERVAL_METHOD = ("95% percentile bootstrap over the validation images (every metric recomputed on each of the "
                   "{n} resamples; the same resamples under every paradigm and seed)")
SEED_METHOD = ("over {s} training seeds: a value is the mean of the seeds' values, spread their standard deviation; "
               "its interval is a two-level bootstrap (each resample draws the seeds with replacement and one "
               "resample of the validation images, shared by every seed and paradigm as they are all scored on "
               "the same images), so it reflects both; a change is tested over the seeds (paired t-test of the "
               "per-seed differences, t-interval with {df} degrees of freedom), a claim about training runs on "
               "these validation images")
ONE_SEED_METHOD = ("one training seed: intervals and tests cover the validation images only (paired bootstrap "
                   "intervals, paired permutation tests), "
                   "not the variance between training runs, which can be as large; answers that need it say "
                   "'inconclusive: one training seed'")
P_VALUE_RULE = ("p-values: with several seeds the t-test's (scipy.stats.ttest_1samp); with one seed the paired "
                "permutation test's for a change (scipy.stats.permutation_test, B permutations) and, for the one-sided "
                "tests (non-inferiority, above chance), the bootstrap p-value: the share of the B resampled paired "
                "differences at or beyond the null value, counted as (k + 1) / (B + 1) (a two-sided bootstrap "
                "p-value would be twice the smaller tail share, at most 1)")
CHANCE_RULE = ("the reference is not significantly above the task's trivial baseline (one-sided, "
               "alpha 0.05, in every seed: the largest of the seeds' bootstrap p-values); such tasks are left out "
               "of the relative summaries and of the tests over tasks. It is a screen, not a finding, and is not "
               "corrected for multiplicity")
GAP_SHARE_DEFINITION = ("gap share = effect / (reference - trivial baseline), both signed so that positive is better: "
                        "the share of the reference's margin over its baseline that the paradigm adds (+) or gives "
                        "back (-100%: down to the baseline)")
EFFECT_DEFINITION = ("effect = paradigm - reference in the metric's own units (Dice, macro-F1, IoU; for MRE and HD "
                     "the pixels saved, reference - paradigm): positive is better")
RELATIVE_DEFINITION = "relative change = (value - reference) / |reference|, sign flipped for hd and mre (secondary)"


def routing_shares(counts) -> np.ndarray:
    """Counts [tasks, experts] -> each task's share per expert (rows of a task with no token stay 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def task_affinity(layers: dict) -> np.ndarray:
    """Mean over layers of 1 - JS divergence (base 2) between task routing distributions.

    A pair involving a task that routed no token in a layer is left out of that layer's mean
    (NaN if it routed none in every layer).
    """
    per_layer = []
    for counts in layers.values():
        shares = routing_shares(counts)
        used = shares.sum(axis=1) > 0
        n = shares.shape[0]
        affinity = np.full((n, n), np.nan)
        for i in range(n):
            for j in range(n):
                if used[i] and used[j]:
                    affinity[i, j] = 1.0 - jensenshannon(shares[i], shares[j], base=2) ** 2
        per_layer.append(affinity)
    stacked = np.stack(per_layer)
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(stacked)).sum(0)
        total = np.nansum(stacked, axis=0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


def compute_report(
    run_dirs: Sequence[os.PathLike],
    scale_threshold: float | None = None,
    negative_threshold: float = DEFAULT_NEGATIVE_THRESHOLD,
    n_resamples: int = 1000,
    level: float = DEFAULT_LEVEL,
    correction: str = DEFAULT_CORRECTION,
    margins: dict | None = None,
) -> dict:
    """All numbers of the report as one dict (NaN where undefined; null once written as JSON)."""
    check_options(negative_threshold, n_resamples, correction, margins)
    return analyse(load_runs(run_dirs), scale_threshold, negative_threshold, n_resamples, level, correction,
                   margins)


def check_options(negative_threshold: float, n_resamples: int, correction: str, margins: dict | None) -> None:
    if negative_threshold < 0:
        raise ValueError(f"negative_threshold must be >= 0, got {negative_threshold}")
    if n_resamples < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {n_resamples}")
    if correction not in CORRECTIONS:
        raise ValueError(f"--correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    for metric, margin in (margins or {}).items():
        if metric not in DEFAULT_MARGINS:
            raise ValueError(f"--non-inferiority-margin: unknown metric {metric!r}; one of {sorted(DEFAULT_MARGINS)}")
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"--non-inferiority-margin: {metric} must be a number >= 0, got {margin}")


def analyse(runs: Runs, scale_threshold: float | None = None,
            negative_threshold: float = DEFAULT_NEGATIVE_THRESHOLD, n_resamples: int = 1000,
            level: float = DEFAULT_LEVEL, correction: str = DEFAULT_CORRECTION, margins: dict | None = None) -> dict:
    """The report of runs already read (load_runs); what compute_report does after reading."""
    margins = {**DEFAULT_MARGINS, **(margins or {})}
    alpha = 1 - level
    runs, nulls = groupings.split_nulls(runs)  # the random groupings: AG's null, in its section only
    results = runs.results
    paradigms = [p for p in PARADIGMS if p in results] + sorted(set(results) - set(PARADIGMS))
    if CONTROL in paradigms:  # the control reads after the paradigms it controls
        paradigms = [p for p in paradigms if p != CONTROL] + [CONTROL]
    task_ids = sorted({t for tasks in results.values() for t in tasks})
    replicates = sorted({r for tasks in results.values() for reps in tasks.values() for r in reps})

    facts = {}
    for task_id in task_ids:
        source = next(iter(next(results[p][task_id] for p in paradigms if task_id in results[p]).values()))
        facts[task_id] = {k: source[k] for k in ("task_type", "group", "train_size", "primary_metric")}
    # Report order: by task type (segmentation, classification, detection, regression), then id.
    type_order = {t: i for i, t in enumerate(METRIC_NAMES)}
    task_ids.sort(key=lambda t: (type_order[facts[t]["task_type"]], t))
    scale = _scale_split([facts[t]["train_size"] for t in task_ids], scale_threshold)

    tasks_out, task_runs = {}, {}
    for task_id in task_ids:
        fact = facts[task_id]
        by_paradigm = {p: results[p][task_id] for p in paradigms if task_id in results[p]}
        task_runs[task_id] = scored_runs(task_id, fact, by_paradigm, n_resamples, level)
        tasks_out[task_id] = {
            **fact, "scale": "data-rich" if fact["train_size"] >= scale["threshold"] else "data-scarce",
            "paradigms": {p: _paradigm_result(task_id, reps, task_runs[task_id].scored.get(p),
                                              runs.training.get(p, {}), level)
                          for p, reps in by_paradigm.items()}}

    design = designed.find_design(runs.configs)  # the synthetic suite's design.json, None for real data
    relations = designed.DesignedTransfer(design, tasks_out) if design else None
    against, family = per_task_tests(task_runs, paradigms, margins, level, correction, negative_threshold,
                                     relations.tests if relations else None)
    for view in against.values():
        _summaries(view, tasks_out, paradigms, n_resamples, level, correction, alpha)

    training = _training_table(runs.training)
    capacity = _capacity(runs, training)
    seeds = _seeds(runs.configs, replicates)
    report = {
        "paradigms": paradigms,
        "protocol": run_protocol(runs.configs),
        "budget": budget_of(runs.configs),
        "replicates": replicates,
        "seeds": seeds,
        "correction": correction,
        "settings": _settings(scale, negative_threshold, n_resamples, level, correction, margins, len(replicates),
                              family),
        "tasks": tasks_out,
        "training": training,
        "capacity": capacity,
        "routing": _routing_out(runs.routing),
        "against": {r: _view_json(v) for r, v in against.items()},
    }
    report["task_level_tests"] = [e for v in report["against"].values() for e in v["task_level_tests"]]
    report["group_table"] = group_table(tasks_out, paradigms, training)
    _compat_views(report)
    if relations:  # the synthetic suite: its designed transfer read against the measured
        report["designed_transfer"] = relations.to_json(alpha)
        report["settings"]["designed_transfer"] = designed.settings(len(replicates))
    if AG_PARADIGM in results:  # AG's groups per seed; without TS, no change to predict or compare
        ts = against.get("ts")
        report["affinity_groupings"] = groupings.affinity_groupings(
            runs, nulls.results, ts["changes"] if ts else {},
            null_changes(nulls.results, results["ts"], facts, ts["chance"], margins, n_resamples, level) if ts
            else {p: {} for p in nulls.results}, design)
    return report


def null_changes(null_results: dict, ts_results: dict, facts: dict, chance: dict, margins: dict, n_resamples: int,
                 level: float) -> dict:
    """{random grouping: {task: Change vs TS}}, each with its gap share (the tests as for every
    paradigm, outside the report's families: only the null's summary is used)."""
    items = []
    for task_id, fact in facts.items():
        by_paradigm = {p: tasks[task_id] for p, tasks in null_results.items() if task_id in tasks}
        if not by_paradigm or task_id not in ts_results or task_id not in chance:
            continue
        task = scored_runs(task_id, fact, {"ts": ts_results[task_id], **by_paradigm}, n_resamples, level)
        items += [(task, p, "ts", margins.get(task.metric, 0.0)) for p in by_paradigm]
    out: dict = {p: {} for p in null_results}
    for (task, paradigm, _, _), change in zip(items, compare_all(items, level)):
        out[paradigm][task.task_id] = with_gap_share(change, chance[task.task_id])
    return out


def scored_runs(task_id: str, fact: dict, by_paradigm: dict, n_resamples: int, level: float) -> TaskRuns:
    """A task's runs ({paradigm: {replicate: entry}}) with every value bootstrapped over its
    validation images (the same resamples under every paradigm and seed)."""
    images = _aligned_images(fact, by_paradigm) if n_resamples else {}
    scored = {p: {rep: bootstrap_task(fact["task_type"], num_classes, values, n_resamples=n_resamples,
                                      seed=task_seed(BOOTSTRAP_SEED, task_id), level=level)
                  for rep, (values, num_classes) in reps.items()} for p, reps in images.items()}
    metric = fact["primary_metric"]
    baseline = nanmean([as_float(e.get("baseline", {}).get(metric)) for reps in by_paradigm.values()
                        for e in reps.values()])
    points = {p: {r: e["metrics"] for r, e in reps.items()} for p, reps in by_paradigm.items()}
    num_classes = next((c for reps in images.values() for _, c in reps.values()), 0)
    return TaskRuns(task_id, metric, baseline, points, scored,
                    {p: {r: v for r, (v, _) in reps.items()} for p, reps in images.items()},
                    fact["task_type"], num_classes)


def per_task_tests(task_runs: dict, paradigms: list[str], margins: dict, level: float = DEFAULT_LEVEL,
                   correction: str = DEFAULT_CORRECTION,
                   threshold: float = DEFAULT_NEGATIVE_THRESHOLD, more_tests=None) -> tuple[dict, dict]:
    """Every per-task test of the report: per reference, whether it is at chance on each task
    and every other paradigm's change against it, tested in one batch, adjusted as one family and
    flagged. ({reference: {"reference", "compared", "chance", "changes": {task: {paradigm:
    Change}}}}, {"n_tests", "method"}); task_runs: {task_id: TaskRuns}. more_tests(against): more
    p-values of the family made from the changes (objects with p, given p_adjusted; design.py)."""
    references = [r for r in REFERENCES if r in paradigms]
    against, items, keys = {}, [], []
    for i, reference in enumerate(references):
        compared = [p for p in paradigms if p not in references[:i + 1]]
        chance = {t: above_chance(runs, reference, level) for t, runs in task_runs.items() if reference in runs.values}
        against[reference] = {"reference": reference, "compared": compared, "chance": chance, "changes": {}}
        for t in chance:
            for paradigm in compared:
                if paradigm in task_runs[t].values:
                    items.append((task_runs[t], paradigm, reference, margins.get(task_runs[t].metric, 0.0)))
                    keys.append((reference, t, paradigm))
    for (reference, t, paradigm), change in zip(keys, compare_all(items, level)):
        view = against[reference]
        view["changes"].setdefault(t, {})[paradigm] = with_gap_share(change, view["chance"][t])
    extra = more_tests(against) if more_tests else []
    return against, _correct_per_task(against, correction, 1 - level, threshold, extra)


# ------------------------------------------------------------------------------ multiplicity
def _correct_per_task(against: dict, correction: str, alpha: float, threshold: float, extra=()) -> dict:
    """Adjust every per-task p-value of every reference together, then flag (change.decide).
    One-sided (non-inferiority) p-values enter doubled: each test is then at alpha / 2 per side,
    the lower bound of the two-sided 95% interval above -margin. extra: more tests of the family
    (p, and p_adjusted set here)."""
    changes = [c for view in against.values() for per_task in view["changes"].values() for c in per_task.values()]
    p_values = [c.p for c in changes] + [None if c.non_inferiority_p is None else min(1.0, 2 * c.non_inferiority_p)
                                         for c in changes] + [t.p for t in extra]
    adjusted = tasklevel.adjust(p_values, correction, alpha)
    for test, p in zip(extra, adjusted[2 * len(changes):]):
        test.p_adjusted = p
    for i, change in enumerate(changes):
        change.p_adjusted, change.non_inferiority_p_adjusted = adjusted[i], adjusted[len(changes) + i]
        decide(change, alpha, threshold)
    return {"n_tests": sum(p is not None for p in p_values), "method": CORRECTION_NAMES[correction],
            "n_design_tests": sum(t.p is not None for t in extra)}


def _summaries(view: dict, tasks_out: dict, paradigms: list[str], n_resamples: int, level: float,
               correction: str, alpha: float) -> None:
    """The reference's summaries over tasks, its descriptive median split and its tests over tasks
    (adjusted together, as the second family)."""
    reference, changes = view["reference"], view["changes"]
    at_chance = {t: c["at_chance"] for t, c in view["chance"].items()}
    tasks = {t: tasks_out[t] for t in changes}
    keys = {"overall": lambda t: "all", "by_group": lambda t: t["group"], "by_task_type": lambda t: t["task_type"],
            "by_scale": lambda t: t["scale"]}
    shown = [p for p in paradigms if p in {reference, *view["compared"]}]
    view["averages"] = {name: tasklevel.summarize(tasks, changes, at_chance, shown, key, n_resamples, level,
                                                  f"{reference}/{name}")
                        for name, key in keys.items()}
    aggregated = [p for p in view["compared"] if p not in REFERENCES]
    view["comparisons"] = tasklevel.median_split(tasks, changes, aggregated)
    tests = tasklevel.task_level_tests(tasks, changes, aggregated, reference)
    for entry, p in zip(tests, tasklevel.adjust([e["p"] for e in tests], correction, alpha)):
        entry["p_adjusted"] = p
        entry["significant"] = p is not None and p <= alpha
    view["task_level_tests"] = tests


def _view_json(view: dict) -> dict:
    return {"reference": view["reference"], "compared": view["compared"],
            "at_chance": {t: c for t, c in view["chance"].items()},
            "tasks": {t: {p: c.to_json() for p, c in per_task.items()} for t, per_task in view["changes"].items()},
            "averages": view["averages"], "comparisons": view["comparisons"],
            "task_level_tests": view["task_level_tests"]}


def changes_against(report: dict, reference: str) -> dict[str, dict[str, Change]]:
    """{task: {paradigm: Change}} of the report against one reference."""
    tasks = report["against"][reference]["tasks"]
    return {t: {p: Change.from_json(p, data) for p, data in per_task.items()} for t, per_task in tasks.items()}


def _compat_views(report: dict) -> None:
    """The fields report.json had before the per-reference analyses, filled from them: the change
    against TS in each task's paradigm entry, the TS averages and contrasts, the list of
    significant losses, and `control` (the analysis against TS*)."""
    primary = report["against"].get("ts")
    changes = changes_against(report, "ts") if primary else {}
    negatives = []
    for task_id, task in report["tasks"].items():
        chance = primary["at_chance"].get(task_id) if primary else None
        task["at_chance"] = None if chance is None else chance["at_chance"]
        task["effect_units"] = {}
        for paradigm, change in changes.get(task_id, {}).items():
            data = change.to_json()
            task["paradigms"][paradigm].update(data)
            task["effect_units"][paradigm] = data["effect_units"]
            if change.transfer == "negative":
                negatives.append({"task_id": task_id, "paradigm": paradigm, "metric": change.metric,
                                  "change_vs_ts": change.relative_primary,
                                  "change_ci": change.relative_ci.get(change.metric), "effect_units": change.units,
                                  "effect_ci": change.units_ci, "p_adjusted": change.p_adjusted})
    report["averages"] = primary["averages"] if primary else {}
    report["comparisons"] = primary["comparisons"] if primary else {}
    report["negative_transfer"] = negatives
    if CONTROL in report["against"] and primary:
        report["control"] = report["against"][CONTROL]


# ------------------------------------------------------------------------------ settings, protocol
def _settings(scale: dict, threshold: float, n_resamples: int, level: float, correction: str, margins: dict,
              n_seeds: int, family: dict) -> dict:
    return {
        "scale_threshold": float(scale["threshold"]),
        "scale_threshold_rule": scale["rule"],
        "scale_counts": scale["counts"],
        "data_rich_rule": "train_size >= scale_threshold",
        "negative_transfer_threshold": float(threshold),
        "alpha": 1 - level,
        "transfer_rule": (f"negative (positive): the adjusted p-value of the effect is at most {1 - level:g}, the "
                          f"effect is below (above) 0 and the relative change is beyond -threshold (+threshold) or "
                          f"undefined; otherwise n.s. A change that could not be tested (no per-image values and one "
                          f"seed, or --bootstrap 0 with one seed) is flagged by the threshold alone: not evidence"),
        "bootstrap": {"n_resamples": int(n_resamples), "level": level, "seed": BOOTSTRAP_SEED},
        "interval_method": INTERVAL_METHOD.format(n=n_resamples) if n_resamples else "none (--bootstrap 0)",
        "seed_method": (SEED_METHOD.format(s=n_seeds, df=n_seeds - 1) if n_seeds > 1 else ONE_SEED_METHOD),
        "n_seeds": n_seeds,
        "change_test": (f"{T_OVER_SEEDS} (scipy.stats.ttest_1samp of the per-seed paired differences)" if n_seeds > 1
                        else f"{BOOTSTRAP_OVER_IMAGES} (paired permutation test; interval: paired percentile "
                             f"bootstrap; validation images only)"),
        "p_value_rule": P_VALUE_RULE,
        "correction": {"method": correction, "name": family["method"], "n_per_task_tests": family["n_tests"],
                       "families": "every per-task p-value of the report (changes and non-inferiority, every task, "
                                   "paradigm and reference: one family"
                                   + (f", with the {family['n_design_tests']} tests of the designed relations"
                                      if family.get("n_design_tests") else "")
                                   + "); every test over tasks (RQ2-RQ4) of a reference: a second family"},
        "non_inferiority_margins": {m: float(v) for m, v in sorted(margins.items())},
        "non_inferiority_rule": ("non-inferior: H0 'effect <= -margin' rejected one-sided (its p doubled into the "
                                 "family, i.e. at alpha/2: the lower bound of the two-sided 95% interval above "
                                 "-margin), after correction"),
        "chance_rule": CHANCE_RULE,
        "effect_definition": EFFECT_DEFINITION,
        "gap_share_definition": GAP_SHARE_DEFINITION,
        "change_definition": RELATIVE_DEFINITION,
        "task_unit": ("claims about groups of tasks (RQ2 scale, RQ3 type, RQ4 stability) come from tests over tasks, "
                      "the task as the unit, on the gap share of the tasks not at chance; summaries over tasks give "
                      "mean and median with percentile bootstrap intervals that resample the tasks"),
        "affinity_definition": AFFINITY_DEFINITION,
    }


def budget_of(configs: dict) -> str:
    """The runs' training-budget rule (config.yaml's `budget`; a run without the key is
    equal-exposure, today's rule with its --min-steps / --steps variants)."""
    budgets = sorted({str(c.get("budget") or "equal-exposure") for c in configs.values()} or {"equal-exposure"})
    return budgets[0] if len(budgets) == 1 else " / ".join(budgets)


def run_protocol(configs: dict) -> str:
    """The training-length protocol of the runs, in one line, from their config.yaml."""
    lines = set()
    for config in configs.values() or [{}]:
        budget = config.get("budget")
        if budget == "converged":
            line = (f"converged budget (--budget converged: every model, TS, CG and AU alike, trained until its loss "
                    f"plateaus on an inner split of its own training data, or its cap; {plateau_rule_text()})")
        elif config.get("steps") is not None:
            line = f"fixed steps (--steps {config['steps']} for every model; exposure differs across paradigms)"
        elif int(config.get("min_steps") or 0) > 0:
            line = (f"min steps (--epochs {config.get('epochs')}, repeated until a model has trained at least "
                    f"--min-steps {config['min_steps']} steps; equal exposure holds only above that)")
        elif config:
            line = f"equal exposure (--epochs {config.get('epochs')} for every model)"
        else:
            line = "unknown (no config.yaml in the run directory)"
        if (config.get("control") or "none") != "none":
            line += (f"; control {config['control']}: TS* = every TS model trained on until its training loss "
                     f"plateaus ({plateau_rule_text()})")
        lines.add(line)
    return " / ".join(sorted(lines))


def _seeds(configs: dict, replicates: list[str]) -> list:
    """The training seed of each replicate (config.yaml's `seed`), else its run directory's name."""
    return [configs.get(r, {}).get("seed", r) for r in replicates]


def relative_change(value: float, reference: float, metric: str) -> float:
    """Signed relative change against the reference; positive = better, also for HD and MRE."""
    return change_vs_reference(as_float(value), as_float(reference), metric)


# ------------------------------------------------------------------------------ per task
def _scale_split(sizes: list[int], threshold: float | None) -> dict:
    rule = "given"
    if threshold is None:
        threshold = float(np.median(sizes)) if sizes else 0.0
        rule = "median training size"
    rich = sum(1 for n in sizes if n >= threshold)
    return {"threshold": threshold, "rule": rule, "counts": {"data-rich": rich, "data-scarce": len(sizes) - rich}}


def _aligned_images(fact: dict, by_paradigm: dict) -> dict:
    """{paradigm: {replicate: (per-image values, num_classes)}} on the images every run of the task
    predicted, in one order (so a resample or a permutation is the same images everywhere); {}
    when a run has no per-image values."""
    entries = [e for reps in by_paradigm.values() for e in reps.values()]
    if any(e.get("values") is None for e in entries):
        return {}
    common = sorted(set.intersection(*(set(e["values"]["image_path"]) for e in entries)))
    if not common:
        return {}
    out = {}
    for paradigm, reps in by_paradigm.items():
        out[paradigm] = {}
        for rep, entry in reps.items():
            position = {path: i for i, path in enumerate(entry["values"]["image_path"])}
            values = select(entry["values"], [position[path] for path in common])
            out[paradigm][rep] = (values, _num_classes(fact["task_type"], entry, values))
    return out


# num_classes as the per-image values show it, for runs written before metrics.json stored it
# (the CSV's meaning: classes with background for segmentation, points for landmarks)
CLASSES_FROM_VALUES = TaskTable("num_classes from per-image values", {
    TaskType.CLASSIFICATION: lambda values: len(values["probs"][0]),
    TaskType.SEGMENTATION: lambda values: len(values["dice"][0]) + 1,
    TaskType.LANDMARKS: lambda values: len(values["errors"][0]),
    TaskType.DETECTION: lambda values: 1,
})


def _num_classes(task_type: str, entry: dict, values: dict) -> int:
    """The entry's num_classes, else what the per-image values show (runs before it was stored)."""
    if entry.get("num_classes"):
        return int(entry["num_classes"])
    return CLASSES_FROM_VALUES[task_type](values)


def _paradigm_result(task_id: str, reps: dict, scored: dict | None, training: dict, level: float) -> dict:
    """A task under one paradigm: metrics pooled over the seed replicates, with intervals."""
    names = sorted({m for e in reps.values() for m in e["metrics"]})
    metrics, spread, intervals = {}, {}, {}
    for name in names:
        values = [as_float(e["metrics"].get(name)) for e in reps.values()]
        metrics[name] = nanmean(values)
        finite = [v for v in values if math.isfinite(v)]
        if len(values) > 1:
            spread[name] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
        if scored:
            dists = [scored[rep][name]["distribution"] for rep in reps]
            intervals[name] = (pooled(dists, values, seed=task_seed(BOOTSTRAP_SEED, f"{task_id}/{name}"),
                                      level=level)["ci"]
                               if len(dists) > 1
                               else scored[next(iter(reps))][name]["ci"])
    baseline = {m: nanmean([as_float(e["baseline"].get(m)) for e in reps.values()])
                for m in sorted({m for e in reps.values() for m in (e.get("baseline") or {})})}
    model = next(iter(reps.values())).get("model", "")
    primary = next(iter(reps.values()))["primary_metric"]
    lengths = [training.get(rep, {}).get(model) for rep in reps]
    result = {"model": model, "runs": len(reps), "metrics": metrics, "ci": intervals, "baseline": baseline,
              "beats_baseline": _beats(metrics.get(primary), baseline.get(primary), primary),
              "training": _mean_training([t for t in lengths if t])}
    if spread:
        result["spread"] = spread
    return result


def _beats(value, baseline, metric) -> bool | None:
    value, baseline = as_float(value), as_float(baseline)
    if math.isnan(value) or math.isnan(baseline):
        return None
    return bool(value < baseline) if metric in LOWER_IS_BETTER else bool(value > baseline)


# ------------------------------------------------------------------------------ training, capacity, routing
STOP_REASONS = ("plateau", "cap", "epochs")


def _mean_training(lengths: list[dict]) -> dict | None:
    """A model's training entry over its seed replicates: the mean of the numbers, the stop
    reason (`stop_reason`, or the control's older `stopped`; None when not recorded; the counts
    when the seeds differ) and the final learning rate (`final_lr`, None when not recorded)."""
    if not lengths:
        return None
    out = {k: nanmean([as_float(t.get(k)) for t in lengths]) for k in TRAINING_KEYS}
    reasons = [t.get("stop_reason") or t.get("stopped") or None for t in lengths]
    recorded = Counter(r for r in reasons if r)
    out["stop_reason"] = (None if not recorded else next(iter(recorded)) if len(recorded) == 1
                          else ", ".join(f"{r} x{n}" for r, n in sorted(recorded.items())))
    final_lr = [as_float(t.get("final_lr")) for t in lengths if t.get("final_lr") is not None]
    out["final_lr"] = nanmean(final_lr) if final_lr else None
    return out


def _training_table(training: dict) -> dict:
    """{paradigm: {model: training length, the mean over seed replicates}}."""
    out = {}
    for paradigm, reps in training.items():
        models = sorted({m for rep in reps.values() for m in rep})
        out[paradigm] = {m: _mean_training([rep[m] for rep in reps.values() if m in rep]) for m in models}
    return out


def _capacity(runs: Runs, training: dict) -> dict:
    """Per paradigm: its models' parameters (total: the sum over its models; active per token: the
    largest of its models, a token passes one) and training FLOPs (the sum over its models and
    seeds). Each model's numbers come from its metrics.json entry's `capacity` ({"params_total",
    "params_active_per_token", "train_flops"}); without it the parameters are counted from the
    model's best.json (m2dino.models.capacity) and the FLOPs are not recorded. Also stored per
    model in the training table (`capacity`)."""
    out = {}
    for paradigm, reps in runs.training.items():
        models = sorted({m for rep in reps.values() for m in rep})
        per_model = {}
        for model in models:
            recorded = [rep[model]["capacity"] for rep in reps.values()
                        if model in rep and isinstance(rep[model].get("capacity"), dict)]
            per_model[model] = _model_capacity(recorded, runs.folders.get(paradigm, {}), model, len(reps))
            if training.get(paradigm, {}).get(model) is not None:
                training[paradigm][model]["capacity"] = per_model[model]
        flops = [c["train_flops"] for c in per_model.values()]
        totals = [c["params_total"] for c in per_model.values()]
        active = [c["params_active_per_token"] for c in per_model.values() if c["params_active_per_token"] is not None]
        out[paradigm] = {
            "models": len(models),
            "params_total": sum(totals) if totals and None not in totals else None,
            "params_active_per_token": max(active) if active else None,
            "params_active_per_token_min": min(active) if active else None,
            "train_flops": sum(flops) if flops and None not in flops else None,
            "sources": sorted({c["source"] for c in per_model.values()}),
        }
    return out


def _model_capacity(recorded: list[dict], folders: dict, model: str, n_seeds: int) -> dict:
    if recorded:
        flops = [as_float(c.get("train_flops")) for c in recorded if c.get("train_flops") is not None]
        return {"params_total": recorded[0].get("params_total"),
                "params_active_per_token": recorded[0].get("params_active_per_token"),
                # the model's training FLOPs summed over the seeds that recorded them
                "train_flops": float(sum(flops)) if len(flops) == n_seeds else None,
                "source": "metrics.json"}
    for folder in folders.values():
        config = read_checkpoint_config(folder, model)
        if config is not None:
            from m2dino.models.capacity import parameter_counts  # noqa: PLC0415 (imports torch)

            counts = parameter_counts(config)
            return {"params_total": counts["total"], "params_active_per_token": counts["active_per_token"],
                    "train_flops": None, "source": "best.json"}
    return {"params_total": None, "params_active_per_token": None, "train_flops": None, "source": "not recorded"}


def group_table(tasks_out: dict, paradigms: list[str], training: dict) -> list[dict]:
    """The paper's per-group table: per clinical group its tasks, training images and CG steps,
    and each paradigm's absolute primary metric per task."""
    groups: dict[str, list[str]] = {}
    for task_id, task in tasks_out.items():
        groups.setdefault(task["group"], []).append(task_id)
    out = []
    for group in sorted(groups):
        members = groups[group]
        cg_models = sorted({tasks_out[t]["paradigms"]["cg"]["model"] for t in members
                            if "cg" in tasks_out[t]["paradigms"]})
        cg_steps = [(training.get("cg", {}).get(m) or {}).get("steps") for m in cg_models]
        rows = []
        for task_id in members:
            task = tasks_out[task_id]
            metric = task["primary_metric"]
            results = task["paradigms"]
            baseline = next((r["baseline"].get(metric) for r in results.values() if metric in r["baseline"]), None)
            rows.append({"task": task_id, "metric": metric, "train_images": task["train_size"],
                         "values": {p: results[p]["metrics"].get(metric) for p in paradigms if p in results},
                         "baseline": baseline, "at_chance": task.get("at_chance")})
        out.append({"group": group, "tasks": members, "train_images": sum(tasks_out[t]["train_size"] for t in members),
                    "cg_models": cg_models, "cg_steps": cg_steps[0] if len(cg_steps) == 1 else cg_steps or None,
                    "rows": rows})
    return out


def _routing_out(routing: dict) -> dict:
    out = {}
    for paradigm, models in routing.items():
        for model_name, data in models.items():
            layers = {str(k): np.asarray(v, dtype=np.float64)
                      for k, v in sorted(data["layers"].items(), key=lambda kv: int(kv[0]))}
            out.setdefault(paradigm, {})[model_name] = {
                "tasks": list(data["tasks"]),
                "num_experts": int(data["num_experts"]),
                "shares": {layer: routing_shares(c).tolist() for layer, c in layers.items()},
                "affinity": task_affinity(layers).tolist() if layers else [],
            }
    return out


__all__ = ["BUDGETS", "CONTROL", "DEFAULT_NEGATIVE_THRESHOLD", "REFERENCES", "analyse", "changes_against",
           "compute_report", "group_table", "per_task_tests", "relative_change", "run_protocol"]
