"""The numbers of the transfer report, as one JSON-ready dict (`build_report`).

Definitions (also stated in the report itself):

* Change against TS, per task and metric: (value - TS) / |TS| for metrics where higher is
  better, (TS - value) / |TS| for HD and MRE, so a positive change is always an improvement.
  Undefined (NaN, JSON null) when TS is 0 or either value is missing.
* Data scale: a task is data-rich when its training size is >= the threshold (default the
  median training size of the reported tasks), data-scarce otherwise.
* Negative transfer: a CG or AU task whose primary-metric change against TS is below
  -threshold (default 0.05, i.e. more than 5% worse than its task-specific model).
* Averages over tasks skip NaN values. A paradigm found in several run directories (seed
  replicates) is averaged over them per task and metric.
* Routing: the share of each task's routed tokens that went to each expert, per MoE layer.
  Task affinity = 1 - Jensen-Shannon divergence (base 2, so in [0, 1]; 1 = identical
  routing) between two tasks' expert distributions, averaged over the MoE layers.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon

from m2dino.evaluation.metrics import LOWER_IS_BETTER, METRIC_NAMES, as_float, nanmean
from m2dino.evaluation.report.runs import load_runs

PARADIGM_ORDER = ("ts", "cg", "au")
PARADIGM_LABELS = {"ts": "TS", "cg": "CG", "au": "AU"}
DEFAULT_NEGATIVE_THRESHOLD = 0.05
AFFINITY_DEFINITION = "1 - Jensen-Shannon divergence (base 2) of the tasks' expert-routing distributions, mean over MoE layers"


def relative_change(value: float, reference: float, metric: str) -> float:
    """Signed relative change against the reference; positive = better, also for HD and MRE."""
    value, reference = as_float(value), as_float(reference)
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return float("nan")
    delta = (reference - value) if metric in LOWER_IS_BETTER else (value - reference)
    return delta / abs(reference)


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


def build_report(
    run_dirs: Sequence[os.PathLike],
    scale_threshold: float | None = None,
    negative_threshold: float = DEFAULT_NEGATIVE_THRESHOLD,
) -> dict:
    """All numbers of the report as one JSON-ready dict (NaN where undefined)."""
    if negative_threshold < 0:
        raise ValueError(f"negative_threshold must be >= 0, got {negative_threshold}")
    by_paradigm, routing = load_runs(run_dirs)
    paradigms = [p for p in PARADIGM_ORDER if p in by_paradigm] + sorted(set(by_paradigm) - set(PARADIGM_ORDER))
    task_ids = sorted({t for tasks in by_paradigm.values() for t in tasks})

    # Task facts from the TS entry when there is one (every paradigm trains on the same rows).
    facts = {}
    for task_id in task_ids:
        source = next(by_paradigm[p][task_id] for p in paradigms if task_id in by_paradigm[p])
        facts[task_id] = {k: source[k] for k in ("task_type", "group", "train_size", "primary_metric")}
    # Report order: by task type (segmentation, classification, detection, regression), then id.
    type_order = {t: i for i, t in enumerate(METRIC_NAMES)}
    task_ids.sort(key=lambda t: (type_order[facts[t]["task_type"]], t))
    sizes = [facts[t]["train_size"] for t in task_ids]
    threshold_rule = "given"
    if scale_threshold is None:
        scale_threshold = float(np.median(sizes)) if sizes else 0.0
        threshold_rule = "median training size"

    tasks_out = {}
    negatives = []
    for task_id in task_ids:
        fact = facts[task_id]
        ts_entry = by_paradigm.get("ts", {}).get(task_id)
        entry_out = {**fact, "scale": "data-rich" if fact["train_size"] >= scale_threshold else "data-scarce", "paradigms": {}}
        for paradigm in paradigms:
            entry = by_paradigm[paradigm].get(task_id)
            if entry is None:
                continue
            primary = fact["primary_metric"]
            result = {
                "model": entry["model"],
                "runs": entry["runs"],
                "metrics": entry["metrics"],
                "baseline": entry["baseline"],
                "beats_baseline": _beats(entry["metrics"].get(primary), entry["baseline"].get(primary), primary),
            }
            if paradigm != "ts" and ts_entry is not None:
                change = {m: relative_change(v, ts_entry["metrics"].get(m), m) for m, v in entry["metrics"].items()}
                result["change_vs_ts"] = change
                primary_change = change.get(primary, float("nan"))
                result["negative_transfer"] = bool(primary_change < -negative_threshold)
                if result["negative_transfer"]:
                    negatives.append({"task_id": task_id, "paradigm": paradigm, "metric": primary, "change_vs_ts": primary_change})
            entry_out["paradigms"][paradigm] = result
        tasks_out[task_id] = entry_out

    averages = {
        "overall": _aggregate(tasks_out, paradigms, lambda t: "all"),
        "by_group": _aggregate(tasks_out, paradigms, lambda t: t["group"]),
        "by_task_type": _aggregate(tasks_out, paradigms, lambda t: t["task_type"]),
        "by_scale": _aggregate(tasks_out, paradigms, lambda t: t["scale"]),
    }
    routing_out = {}
    for paradigm, models in routing.items():
        for model_name, data in models.items():
            layers = {str(k): np.asarray(v, dtype=np.float64) for k, v in sorted(data["layers"].items(), key=lambda kv: int(kv[0]))}
            routing_out.setdefault(paradigm, {})[model_name] = {
                "tasks": list(data["tasks"]),
                "num_experts": int(data["num_experts"]),
                "shares": {layer: routing_shares(c).tolist() for layer, c in layers.items()},
                "affinity": task_affinity(layers).tolist() if layers else [],
            }
    return {
        "paradigms": paradigms,
        "settings": {
            "scale_threshold": float(scale_threshold),
            "scale_threshold_rule": threshold_rule,
            "data_rich_rule": "train_size >= scale_threshold",
            "negative_transfer_threshold": float(negative_threshold),
            "change_definition": "(value - TS) / |TS|, sign flipped for hd and mre: positive is better",
            "affinity_definition": AFFINITY_DEFINITION,
        },
        "tasks": tasks_out,
        "averages": averages,
        "negative_transfer": negatives,
        "routing": routing_out,
    }


def _beats(value, baseline, metric) -> bool | None:
    value, baseline = as_float(value), as_float(baseline)
    if math.isnan(value) or math.isnan(baseline):
        return None
    return bool(value < baseline) if metric in LOWER_IS_BETTER else bool(value > baseline)


def _aggregate(tasks_out: dict, paradigms: list[str], key_of) -> dict:
    """{key: {paradigm: {"n_tasks", "metrics": {m: mean}, "change_vs_ts": {m: mean},
    "primary_change_vs_ts": mean}}}; metric means only over the tasks that have the metric."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for task in tasks_out.values():
        grouped[key_of(task)].append(task)
    out = {}
    for key in sorted(grouped):
        out[key] = {}
        for paradigm in paradigms:
            results = [(t, t["paradigms"][paradigm]) for t in grouped[key] if paradigm in t["paradigms"]]
            if not results:
                continue
            metric_values, change_values, primary_changes = defaultdict(list), defaultdict(list), []
            for task, result in results:
                for m, v in result["metrics"].items():
                    metric_values[m].append(as_float(v))
                for m, v in result.get("change_vs_ts", {}).items():
                    change_values[m].append(v)
                if "change_vs_ts" in result:
                    primary_changes.append(result["change_vs_ts"].get(task["primary_metric"], float("nan")))
            summary = {
                "n_tasks": len(results),
                "metrics": {m: nanmean(v) for m, v in sorted(metric_values.items())},
            }
            if paradigm != "ts" and primary_changes:
                summary["change_vs_ts"] = {m: nanmean(v) for m, v in sorted(change_values.items())}
                summary["primary_change_vs_ts"] = nanmean(primary_changes)
                summary["negative_transfer_tasks"] = sum(
                    1 for _, r in results if r.get("negative_transfer")
                )
            out[key][paradigm] = summary
    return out
