"""The numbers of the transfer report, as one JSON-ready dict (`compute_report`).

Definitions (also stated in the report itself):

* Change against TS, per task and metric: (value - TS) / |TS| for metrics where higher is
  better, (TS - value) / |TS| for HD and MRE, so a positive change is always an improvement.
  Undefined (NaN, JSON null) when TS is 0 or either value is missing.
* Intervals: 95% percentile bootstrap over the validation images, every metric recomputed on
  each resample, the same resamples for every paradigm and seed of a task, so that a change
  against TS gets a paired interval (m2dino.evaluation.bootstrap). Several run directories are
  seed replicates: a value is the mean over seeds, "spread" the standard deviation across
  them, and the interval a two-level bootstrap over images and seeds (bootstrap.pooled).
* Transfer: negative (positive) when the primary-metric change is below -threshold (above
  +threshold, default 0.05) AND its interval lies entirely below (above) 0; otherwise "n.s.".
  Without intervals (--bootstrap 0) the threshold alone decides, and the report says so.
* Data scale: a task is data-rich when its training size is >= the threshold (default the
  median training size of the reported tasks), data-scarce otherwise.
* Averages over tasks skip NaN values; their intervals average the tasks' bootstrap
  distributions resample by resample (tasks have disjoint images, resampled independently).
* Routing: the share of each task's routed tokens that went to each expert, per MoE layer.
  Task affinity = 1 - Jensen-Shannon divergence (base 2, so in [0, 1]; 1 = identical
  routing) between two tasks' expert distributions, averaged over the MoE layers.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from scipy.spatial.distance import jensenshannon

from m2dino.evaluation.bootstrap import (
    BOOTSTRAP_SEED,
    DEFAULT_LEVEL,
    bootstrap_task,
    change_vs_reference,
    percentile_interval,
    pooled,
    select,
    significance,
    task_seed,
)
from m2dino.evaluation.metrics import LOWER_IS_BETTER, METRIC_NAMES, as_float, nanmean
from m2dino.evaluation.report.runs import TRAINING_KEYS, load_runs
from m2dino.tasks import TaskTable, TaskType

PARADIGM_ORDER = ("ts", "cg", "au")
PARADIGM_LABELS = {"ts": "TS", "cg": "CG", "au": "AU", "ts_converged": "TS*"}
# The converged-TS control (--control ts-converged): its models are the second reference
CONTROL = "ts_converged"
DEFAULT_NEGATIVE_THRESHOLD = 0.05
AFFINITY_DEFINITION = ("1 - Jensen-Shannon divergence (base 2) of the tasks' expert-routing distributions, "
                       "mean over MoE layers")
INTERVAL_METHOD = ("95% percentile bootstrap over the validation images (every metric recomputed on each of the "
                   "{n} resamples; the same resamples under every paradigm and seed, so changes vs TS are paired)")
SEED_METHOD = ("over {s} training seeds: the value is the mean of the seeds' values, spread their standard "
               "deviation; the interval is a two-level bootstrap: each image resample is combined with a "
               "resample of the seeds, so it reflects both the validation images and the training seeds")


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
) -> dict:
    """All numbers of the report as one dict (NaN where undefined; null once written as JSON)."""
    if negative_threshold < 0:
        raise ValueError(f"negative_threshold must be >= 0, got {negative_threshold}")
    if n_resamples < 0:
        raise ValueError(f"--bootstrap must be >= 0, got {n_resamples}")
    runs, routing, training = load_runs(run_dirs)
    protocol = run_protocol(run_dirs)
    paradigms = [p for p in PARADIGM_ORDER if p in runs] + sorted(set(runs) - set(PARADIGM_ORDER))
    task_ids = sorted({t for tasks in runs.values() for t in tasks})
    replicates = sorted({r for tasks in runs.values() for reps in tasks.values() for r in reps})

    facts = {}
    for task_id in task_ids:
        source = next(iter(next(runs[p][task_id] for p in paradigms if task_id in runs[p]).values()))
        facts[task_id] = {k: source[k] for k in ("task_type", "group", "train_size", "primary_metric")}
    # Report order: by task type (segmentation, classification, detection, regression), then id.
    type_order = {t: i for i, t in enumerate(METRIC_NAMES)}
    task_ids.sort(key=lambda t: (type_order[facts[t]["task_type"]], t))
    scale = _scale_split([facts[t]["train_size"] for t in task_ids], scale_threshold)

    tasks_out, distributions, scores = {}, {}, {}
    for task_id in task_ids:
        fact = facts[task_id]
        by_paradigm = {p: runs[p][task_id] for p in paradigms if task_id in runs[p]}
        scored = scores[task_id] = _score_task(task_id, fact, by_paradigm, n_resamples, level)
        entry_out = {**fact, "scale": "data-rich" if fact["train_size"] >= scale["threshold"] else "data-scarce",
                     "paradigms": {}}
        for paradigm, reps in by_paradigm.items():
            result = _paradigm_result(task_id, fact, reps, scored.get(paradigm), training.get(paradigm, {}))
            if paradigm != "ts" and "ts" in by_paradigm:
                result.update(_against(task_id, fact, paradigm, "ts", by_paradigm, scored, distributions, level,
                                       negative_threshold))
            entry_out["paradigms"][paradigm] = result
        tasks_out[task_id] = entry_out

    averages = {
        "overall": _aggregate(tasks_out, paradigms, lambda t: "all", distributions, level),
        "by_group": _aggregate(tasks_out, paradigms, lambda t: t["group"], distributions, level),
        "by_task_type": _aggregate(tasks_out, paradigms, lambda t: t["task_type"], distributions, level),
        "by_scale": _aggregate(tasks_out, paradigms, lambda t: t["scale"], distributions, level),
    }
    comparisons = _comparisons(tasks_out, paradigms, distributions, level)
    negatives = [{"task_id": t, "paradigm": p, "metric": task["primary_metric"],
                  "change_vs_ts": r["change_vs_ts"].get(task["primary_metric"]),
                  "change_ci": r["change_ci"].get(task["primary_metric"])}
                 for t, task in tasks_out.items() for p, r in task["paradigms"].items() if r.get("negative_transfer")]
    report = {
        "paradigms": paradigms,
        "protocol": protocol,
        "replicates": replicates,
        "settings": {
            "scale_threshold": float(scale["threshold"]),
            "scale_threshold_rule": scale["rule"],
            "scale_counts": scale["counts"],
            "data_rich_rule": "train_size >= scale_threshold",
            "negative_transfer_threshold": float(negative_threshold),
            "transfer_rule": ("negative (positive): primary-metric change below -threshold (above +threshold) and its "
                              "95% interval entirely below (above) 0; otherwise n.s."
                              if n_resamples else "no intervals (--bootstrap 0): the threshold alone flags transfer"),
            "bootstrap": {"n_resamples": int(n_resamples), "level": level, "seed": BOOTSTRAP_SEED},
            "interval_method": INTERVAL_METHOD.format(n=n_resamples) if n_resamples else "none (--bootstrap 0)",
            "seed_method": SEED_METHOD.format(s=len(replicates)) if len(replicates) > 1 else "one training seed",
            "change_definition": "(value - TS) / |TS|, sign flipped for hd and mre: positive is better",
            "affinity_definition": AFFINITY_DEFINITION,
        },
        "tasks": tasks_out,
        "averages": averages,
        "comparisons": comparisons,
        "negative_transfer": negatives,
        "training": _training_table(training),
        "routing": _routing_out(routing),
    }
    if CONTROL in runs and "ts" in runs:
        report["control"] = _control(tasks_out, runs, scores, paradigms, level, negative_threshold)
    return report


def _against(task_id, fact, paradigm, reference, by_paradigm, scored, distributions, level, negative_threshold):
    """A paradigm's change against a reference paradigm (TS, or the control TS*) with its paired
    interval and transfer flag; the primary change's distribution goes into `distributions`."""
    change, change_dist = _change_vs_ts(fact, by_paradigm[paradigm], by_paradigm[reference], scored.get(paradigm),
                                        scored.get(reference), level, task_id)
    distributions[(task_id, paradigm)] = change_dist
    primary = fact["primary_metric"]
    value, interval = change["change_vs_ts"].get(primary), change["change_ci"].get(primary)
    change["transfer"] = (significance(interval, value, negative_threshold) if interval is not None
                          else _threshold_only(value, negative_threshold))
    change["negative_transfer"] = change["transfer"] == "negative"
    return change


def _control(tasks_out, runs, scores, paradigms, level, negative_threshold) -> dict:
    """The study's numbers against TS* instead of TS: the same per-task changes, averages and
    contrasts, for the aggregated paradigms ("change_vs_ts" here is the change vs TS*)."""
    aggregated = [p for p in paradigms if p not in ("ts", CONTROL)]
    view, distributions = {}, {}
    for task_id, task in tasks_out.items():
        by_paradigm = {p: runs[p][task_id] for p in paradigms if task_id in runs[p]}
        if CONTROL not in by_paradigm:
            continue
        fact = {k: task[k] for k in ("task_type", "group", "train_size", "primary_metric")}
        results = {}
        for paradigm in aggregated:
            if paradigm in by_paradigm:
                results[paradigm] = {**task["paradigms"][paradigm],
                                     **_against(task_id, fact, paradigm, CONTROL, by_paradigm, scores[task_id],
                                                distributions, level, negative_threshold)}
        view[task_id] = {**task, "paradigms": results}
    averages = {
        "overall": _aggregate(view, aggregated, lambda t: "all", distributions, level),
        "by_group": _aggregate(view, aggregated, lambda t: t["group"], distributions, level),
        "by_task_type": _aggregate(view, aggregated, lambda t: t["task_type"], distributions, level),
        "by_scale": _aggregate(view, aggregated, lambda t: t["scale"], distributions, level),
    }
    tasks = {t: {p: {k: r[k] for k in ("change_vs_ts", "change_ci", "transfer", "negative_transfer")}
                 for p, r in task["paradigms"].items()} for t, task in view.items()}
    return {"reference": CONTROL, "tasks": tasks, "averages": averages,
            "comparisons": _comparisons(view, aggregated, distributions, level)}


def run_protocol(run_dirs: Sequence[os.PathLike]) -> str:
    """The training-length protocol of the runs, in one line, from their config.yaml."""
    lines = set()
    for run_dir in map(Path, run_dirs):
        path = run_dir / "config.yaml"
        try:
            config = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not the run's options (not valid YAML: {str(e).splitlines()[0]})") from None
        if not isinstance(config, dict) or not all(
                config.get(k) is None or isinstance(config[k], (int, float)) and not isinstance(config[k], bool)
                for k in ("steps", "min_steps", "epochs")) or not isinstance(config.get("control") or "", str):
            raise ValueError(f"{path}: not the run's options (a mapping of option: value, with numbers for "
                             f"steps, min_steps and epochs)")
        if config.get("steps") is not None:
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
                     f"plateaus (or 5x its steps)")
        lines.add(line)
    return " / ".join(sorted(lines))


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


def _score_task(task_id: str, fact: dict, by_paradigm: dict, n_resamples: int, level: float) -> dict:
    """{paradigm: {replicate: bootstrap_task result}} on the images every run of the task
    predicted, in one order (so the same resample is the same images everywhere); {} when
    the bootstrap is off or a run has no per-image values."""
    entries = [e for reps in by_paradigm.values() for e in reps.values()]
    if not n_resamples or any(e.get("values") is None for e in entries):
        return {}
    common = sorted(set.intersection(*(set(e["values"]["image_path"]) for e in entries)))
    if not common:
        return {}
    seed = task_seed(BOOTSTRAP_SEED, task_id)
    out = {}
    for paradigm, reps in by_paradigm.items():
        out[paradigm] = {}
        for rep, entry in reps.items():
            position = {path: i for i, path in enumerate(entry["values"]["image_path"])}
            values = select(entry["values"], [position[path] for path in common])
            num_classes = _num_classes(fact["task_type"], entry, values)
            out[paradigm][rep] = bootstrap_task(fact["task_type"], num_classes, values,
                                                n_resamples=n_resamples, seed=seed, level=level)
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


def _seed_spread(values) -> float:
    """Standard deviation across seeds (ddof 1) of the finite values; NaN with fewer than two
    (a metric undefined in some seeds, e.g. HD of an empty mask)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _paradigm_result(task_id: str, fact: dict, reps: dict, scored: dict | None, training: dict) -> dict:
    """A task under one paradigm: metrics pooled over the seed replicates, with intervals."""
    primary = fact["primary_metric"]
    names = sorted({m for e in reps.values() for m in e["metrics"]})
    metrics, spread, intervals = {}, {}, {}
    for name in names:
        values = [as_float(e["metrics"].get(name)) for e in reps.values()]
        metrics[name] = nanmean(values)
        if len(values) > 1:
            spread[name] = _seed_spread(values)
        if scored:
            dists = [scored[rep][name]["distribution"] for rep in reps]
            intervals[name] = (pooled(dists, values, seed=task_seed(BOOTSTRAP_SEED, f"{task_id}/{name}"))["ci"]
                               if len(dists) > 1
                               else scored[next(iter(reps))][name]["ci"])
    baseline = {m: nanmean([as_float(e["baseline"].get(m)) for e in reps.values()])
                for m in sorted({m for e in reps.values() for m in (e.get("baseline") or {})})}
    model = next(iter(reps.values())).get("model", "")
    lengths = [training.get(rep, {}).get(model) for rep in reps]
    result = {"model": model, "runs": len(reps), "metrics": metrics, "ci": intervals, "baseline": baseline,
              "beats_baseline": _beats(metrics.get(primary), baseline.get(primary), primary),
              "training": _mean_training([t for t in lengths if t])}
    if spread:
        result["spread"] = spread
    return result


def _change_vs_ts(fact, reps, ts_reps, scored, ts_scored, level, task_id) -> tuple[dict, np.ndarray | None]:
    """({"change_vs_ts", "change_ci"[, "change_spread"]}, the primary change's distribution).
    Seed replicates are paired by name (seed N of a paradigm against seed N of TS); unless every
    replicate has its TS partner, the change is that of the means over replicates, without interval."""
    paired = [rep for rep in reps if rep in ts_reps]
    if len(paired) != len(reps):
        paired = []
    change, intervals, spread, primary_dist = {}, {}, {}, None
    for name in sorted(next(iter(reps.values()))["metrics"]):
        if paired:
            values = [relative_change(reps[r]["metrics"].get(name), ts_reps[r]["metrics"].get(name), name)
                      for r in paired]
        else:  # different seeds: the change of the means, no interval
            values = [relative_change(nanmean([as_float(e["metrics"].get(name)) for e in reps.values()]),
                                      nanmean([as_float(e["metrics"].get(name)) for e in ts_reps.values()]), name)]
        change[name] = nanmean(values)
        if len(values) > 1:
            spread[name] = _seed_spread(values)
        if scored and ts_scored and paired:
            dists = [change_vs_reference(scored[r][name]["distribution"], ts_scored[r][name]["distribution"], name)
                     for r in paired]
            pool = pooled(dists, values, seed=task_seed(BOOTSTRAP_SEED, f"{task_id}/{name}"), level=level)
            intervals[name] = pool["ci"]
            if name == fact["primary_metric"]:
                primary_dist = pool["distribution"]
    out = {"change_vs_ts": change, "change_ci": intervals}
    if spread:
        out["change_spread"] = spread
    return out, primary_dist


def _threshold_only(change, threshold: float) -> str:
    if change is None or not math.isfinite(change):
        return "n.s."
    return "negative" if change < -threshold else "positive" if change > threshold else "n.s."


def _beats(value, baseline, metric) -> bool | None:
    value, baseline = as_float(value), as_float(baseline)
    if math.isnan(value) or math.isnan(baseline):
        return None
    return bool(value < baseline) if metric in LOWER_IS_BETTER else bool(value > baseline)


# ------------------------------------------------------------------------------ over tasks
def _interval(distributions: list, level: float):
    """The interval of the mean over tasks: their distributions averaged resample by resample."""
    if not distributions or any(d is None for d in distributions):
        return None
    length = min(len(d) for d in distributions)
    with warnings.catch_warnings():  # a resample where every task's change is undefined is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(percentile_interval(np.nanmean(np.stack([d[:length] for d in distributions]), axis=0), level))


def _aggregate(tasks_out: dict, paradigms: list[str], key_of, distributions: dict, level: float) -> dict:
    """{key: {paradigm: {"n_tasks", "metrics": {m: mean}, "change_vs_ts": {m: mean},
    "primary_change_vs_ts", "primary_change_ci", "significant_drops", "significant_gains"}}}."""
    grouped: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for task_id, task in tasks_out.items():
        grouped[key_of(task)].append((task_id, task))
    out = {}
    for key in sorted(grouped):
        out[key] = {}
        for paradigm in paradigms:
            results = [(tid, t, t["paradigms"][paradigm]) for tid, t in grouped[key] if paradigm in t["paradigms"]]
            if not results:
                continue
            metric_values, change_values = defaultdict(list), defaultdict(list)
            primary, dists = [], []
            for task_id, task, result in results:
                for m, v in result["metrics"].items():
                    metric_values[m].append(as_float(v))
                for m, v in result.get("change_vs_ts", {}).items():
                    change_values[m].append(as_float(v))
                if "change_vs_ts" in result:
                    primary.append(as_float(result["change_vs_ts"].get(task["primary_metric"])))
                    dists.append(distributions.get((task_id, paradigm)))
            summary = {"n_tasks": len(results), "tasks": [tid for tid, _, _ in results],
                       "metrics": {m: nanmean(v) for m, v in sorted(metric_values.items())}}
            if paradigm != "ts" and primary:
                summary["change_vs_ts"] = {m: nanmean(v) for m, v in sorted(change_values.items())}
                summary["primary_change_vs_ts"] = nanmean(primary)
                summary["primary_change_ci"] = _interval(dists, level)
                summary["significant_drops"] = sum(1 for *_, r in results if r.get("transfer") == "negative")
                summary["significant_gains"] = sum(1 for *_, r in results if r.get("transfer") == "positive")
                summary["negative_transfer_tasks"] = summary["significant_drops"]
            out[key][paradigm] = summary
    return out


def _comparisons(tasks_out: dict, paradigms: list[str], distributions: dict, level: float) -> dict:
    """The contrasts the answers need, each a value with its interval, per paradigm:
    scarce_minus_rich (mean primary change of the data-scarce tasks minus the data-rich ones),
    group_spread (standard deviation of the clinical-group mean changes), and
    au_minus_cg_spread (AU's group spread minus CG's)."""
    out = {}
    for paradigm in paradigms:
        if paradigm == "ts":
            continue
        by_scale, by_group = defaultdict(list), defaultdict(list)
        for task_id, task in tasks_out.items():
            result = task["paradigms"].get(paradigm)
            if not result or "change_vs_ts" not in result:
                continue
            item = (as_float(result["change_vs_ts"].get(task["primary_metric"])),
                    distributions.get((task_id, paradigm)))
            by_scale[task["scale"]].append(item)
            by_group[task["group"]].append(item)
        entry = {}
        if by_scale.get("data-scarce") and by_scale.get("data-rich"):
            entry["scarce_minus_rich"] = _contrast(lambda side: side["data-scarce"] - side["data-rich"],
                                                   {k: v for k, v in by_scale.items()}, level)
            entry["scarce_minus_rich"]["n_tasks"] = {k: len(v) for k, v in by_scale.items()}
        if len(by_group) >= 2:
            entry["group_spread"] = _contrast(lambda side: _std(list(side.values())), dict(by_group), level)
            entry["group_spread"]["n_groups"] = len(by_group)
        out[paradigm] = entry
    if "au" in out and "cg" in out and "group_spread" in out["au"] and "group_spread" in out["cg"]:
        au, cg = out["au"]["group_spread"], out["cg"]["group_spread"]
        value = au["value"] - cg["value"]
        ci = None
        if au.get("_distribution") is not None and cg.get("_distribution") is not None:
            ci = list(percentile_interval(au["_distribution"] - cg["_distribution"], level))
        out["au_minus_cg_spread"] = {"value": value, "ci": ci}
    for entry in out.values():
        for item in entry.values() if isinstance(entry, dict) else ():
            if isinstance(item, dict):
                item.pop("_distribution", None)
    return out


def _contrast(statistic, groups: dict[str, list], level: float) -> dict:
    """statistic({group: mean}) on the point values and on every resample."""
    means = {g: nanmean([v for v, _ in items]) for g, items in groups.items()}
    result = {"value": float(statistic(means)), "ci": None, "_distribution": None}
    if all(d is not None for items in groups.values() for _, d in items):
        length = min(len(d) for items in groups.values() for _, d in items)
        with warnings.catch_warnings():  # NaN resamples (undefined changes) stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            dist = {g: np.nanmean(np.stack([d[:length] for _, d in items]), axis=0) for g, items in groups.items()}
            resampled = np.asarray(statistic(dist), dtype=np.float64)
        result["_distribution"] = resampled
        result["ci"] = list(percentile_interval(resampled, level))
    return result


def _std(columns: list):
    """Standard deviation across groups (ddof 0) of floats or of resample arrays."""
    stacked = np.stack([np.asarray(c, dtype=np.float64) for c in columns])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(stacked, axis=0)


# ------------------------------------------------------------------------------ training, routing
def _mean_training(lengths: list[dict]) -> dict | None:
    if not lengths:
        return None
    return {k: nanmean([as_float(t.get(k)) for t in lengths]) for k in TRAINING_KEYS}


def _training_table(training: dict) -> dict:
    """{paradigm: {model: training length, the mean over seed replicates}}."""
    out = {}
    for paradigm, reps in training.items():
        models = sorted({m for rep in reps.values() for m in rep})
        out[paradigm] = {m: _mean_training([rep[m] for rep in reps.values() if m in rep]) for m in models}
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
