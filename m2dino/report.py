"""The transfer report: TS / CG / AU compared task by task, by clinical group, task type and data scale.

`python -m m2dino.report RUN_DIR... --out DIR` reads each run directory's
`<paradigm>/metrics.json` (and `<paradigm>/<model>/routing.json` where present) and writes
`report.md`, `report.csv`, `report.json` and PNG plots into DIR.

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

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.spatial.distance import jensenshannon

from m2dino.metrics import LOWER_IS_BETTER, METRIC_NAMES, PRIMARY_METRICS

PARADIGM_ORDER = ("ts", "cg", "au")
PARADIGM_LABELS = {"ts": "TS", "cg": "CG", "au": "AU"}
DEFAULT_NEGATIVE_THRESHOLD = 0.05
AFFINITY_DEFINITION = "1 - Jensen-Shannon divergence (base 2) of the tasks' expert-routing distributions, mean over MoE layers"


# ------------------------------------------------------------------------------ reading runs
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data


def find_paradigm_files(run_dirs: Sequence[os.PathLike]) -> list[Path]:
    """Every `<paradigm>/metrics.json` under the run directories (a paradigm folder itself is accepted)."""
    found = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        if (run_dir / "metrics.json").is_file():
            found.append(run_dir / "metrics.json")
            continue
        files = sorted(run_dir.glob("*/metrics.json"))
        if not files:
            raise FileNotFoundError(f"run directory {run_dir} holds no <paradigm>/metrics.json")
        found.extend(files)
    return found


def _validate_paradigm_metrics(data: dict, path: Path) -> None:
    for key in ("paradigm", "tasks"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    if not isinstance(data["tasks"], dict):
        raise ValueError(f"{path}: 'tasks' must map task_id to its entry")
    for task_id, entry in data["tasks"].items():
        for key in ("task_type", "metrics"):
            if key not in entry:
                raise ValueError(f"{path}: task {task_id!r} has no {key!r}")
        if entry["task_type"] not in METRIC_NAMES:
            raise ValueError(f"{path}: task {task_id!r} has unknown task_type {entry['task_type']!r}")


def load_runs(run_dirs: Sequence[os.PathLike]) -> tuple[dict, dict]:
    """(paradigm -> task_id -> merged entry, paradigm -> model -> routing.json data).

    Replicates of one paradigm are averaged metric by metric; `runs` counts them.
    """
    replicates: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    routing: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in find_paradigm_files(run_dirs):
        data = _read_json(path)
        _validate_paradigm_metrics(data, path)
        paradigm = str(data["paradigm"]).lower()
        for task_id, entry in data["tasks"].items():
            replicates[paradigm][task_id].append(entry)
        for routing_path in sorted(path.parent.glob("*/routing.json")):
            model_name = routing_path.parent.name
            key = model_name if model_name not in routing[paradigm] else f"{model_name}@{path.parent.parent.name}"
            routing[paradigm][key] = _read_routing(routing_path)
    merged = {p: {t: _merge_replicates(entries) for t, entries in tasks.items()} for p, tasks in replicates.items()}
    return merged, dict(routing)


def _merge_replicates(entries: list[dict]) -> dict:
    first = entries[0]

    def mean_of(key):
        names = {n for e in entries for n in (e.get(key) or {})}
        return {n: _nanmean([_as_float((e.get(key) or {}).get(n)) for e in entries]) for n in sorted(names)}

    return {
        "task_type": first["task_type"],
        "group": first.get("group", "Other"),
        "train_size": int(first.get("train_size", 0) or 0),
        "model": first.get("model", ""),
        "primary_metric": first.get("primary_metric") or PRIMARY_METRICS[first["task_type"]],
        "metrics": mean_of("metrics"),
        "baseline": mean_of("baseline"),
        "runs": len(entries),
    }


def _read_routing(path: Path) -> dict:
    data = _read_json(path)
    for key in ("tasks", "num_experts", "layers"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    num_tasks, num_experts = len(data["tasks"]), int(data["num_experts"])
    for layer, counts in data["layers"].items():
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (num_tasks, num_experts):
            raise ValueError(
                f"{path}: layer {layer} has counts of shape {counts.shape}, expected (tasks, experts) = "
                f"{(num_tasks, num_experts)}"
            )
        if (counts < 0).any():
            raise ValueError(f"{path}: layer {layer} has negative counts")
    return data


# ------------------------------------------------------------------------------- computation
def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value)


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def relative_change(value: float, reference: float, metric: str) -> float:
    """Signed relative change against the reference; positive = better, also for HD and MRE."""
    value, reference = _as_float(value), _as_float(reference)
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
    value, baseline = _as_float(value), _as_float(baseline)
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
                    metric_values[m].append(_as_float(v))
                for m, v in result.get("change_vs_ts", {}).items():
                    change_values[m].append(v)
                if "change_vs_ts" in result:
                    primary_changes.append(result["change_vs_ts"].get(task["primary_metric"], float("nan")))
            summary = {
                "n_tasks": len(results),
                "metrics": {m: _nanmean(v) for m, v in sorted(metric_values.items())},
            }
            if paradigm != "ts" and primary_changes:
                summary["change_vs_ts"] = {m: _nanmean(v) for m, v in sorted(change_values.items())}
                summary["primary_change_vs_ts"] = _nanmean(primary_changes)
                summary["negative_transfer_tasks"] = sum(
                    1 for _, r in results if r.get("negative_transfer")
                )
            out[key][paradigm] = summary
    return out


# ----------------------------------------------------------------------------------- writing
def _json_ready(value):
    """NaN and inf become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if percent:
        return f"{value * 100:+.1f}%"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def csv_rows(report: dict) -> list[dict]:
    """Long format: one row per task, paradigm and metric."""
    rows = []
    for task_id, task in report["tasks"].items():
        for paradigm, result in task["paradigms"].items():
            for metric, value in result["metrics"].items():
                change = result.get("change_vs_ts", {}).get(metric)
                rows.append({
                    "task_id": task_id,
                    "task_type": task["task_type"],
                    "group": task["group"],
                    "train_size": task["train_size"],
                    "scale": task["scale"],
                    "paradigm": paradigm,
                    "model": result["model"],
                    "metric": metric,
                    "primary": metric == task["primary_metric"],
                    "value": value,
                    "baseline": result["baseline"].get(metric),
                    "ts_value": task["paradigms"].get("ts", {}).get("metrics", {}).get(metric),
                    "change_vs_ts": change,
                    "negative_transfer": bool(result.get("negative_transfer")) if metric == task["primary_metric"] else "",
                })
    return rows


def render_csv(report: dict) -> str:
    rows = csv_rows(report)
    buffer = io.StringIO()
    fields = ["task_id", "task_type", "group", "train_size", "scale", "paradigm", "model", "metric", "primary",
              "value", "baseline", "ts_value", "change_vs_ts", "negative_transfer"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in row.items()})
    return buffer.getvalue()


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    paradigms = report["paradigms"]
    settings = report["settings"]
    labels = [PARADIGM_LABELS.get(p, p) for p in paradigms]
    lines = ["# M2DINO transfer report", ""]
    lines += [
        f"Paradigms: {', '.join(labels)}. Change vs TS: {settings['change_definition']}. "
        f"Data-rich: training size >= {settings['scale_threshold']:g} ({settings['scale_threshold_rule']}). "
        f"Negative transfer: primary-metric change below -{settings['negative_transfer_threshold'] * 100:g}% "
        f"(marked with !). Baseline: the trivial baseline on the same validation rows.",
        "",
        "## Primary metric per task",
        "",
        "| task | type | group | train | scale | metric | " + " | ".join(labels) + " | baseline |",
        "|" + "---|" * (7 + len(labels)),
    ]
    for task_id, task in report["tasks"].items():
        primary = task["primary_metric"]
        cells = []
        baseline = None
        for paradigm in paradigms:
            result = task["paradigms"].get(paradigm)
            if result is None:
                cells.append("-")
                continue
            baseline = result["baseline"].get(primary, baseline)
            cell = _fmt(result["metrics"].get(primary))
            if "change_vs_ts" in result:
                cell += f" ({_fmt(result['change_vs_ts'].get(primary), percent=True)})"
            if result.get("negative_transfer"):
                cell += " !"
            cells.append(cell)
        lines.append(
            f"| {task_id} | {task['task_type']} | {task['group']} | {task['train_size']} | {task['scale']} | "
            f"{primary} | " + " | ".join(cells) + f" | {_fmt(baseline)} |"
        )
    compared = "ts" in paradigms and len(paradigms) > 1
    if not compared:
        lines += ["", "Changes against TS need a TS run and at least one CG or AU run; none are reported here."]
    for title, key in ((("clinical group", "by_group"), ("task type", "by_task_type"), ("data scale", "by_scale"),
                        ("overall", "overall")) if compared else ()):
        heading = "all tasks" if key == "overall" else f"by {title}"
        lines += ["", f"## Mean primary-metric change vs TS, {heading}", "",
                  "| " + title + " | tasks | " + " | ".join(labels[1:] if paradigms[:1] == ["ts"] else labels) + " |",
                  "|" + "---|" * (2 + len(paradigms) - (1 if paradigms[:1] == ["ts"] else 0))]
        for name, per_paradigm in report["averages"][key].items():
            n_tasks = max(s["n_tasks"] for s in per_paradigm.values())
            cells = []
            for paradigm in paradigms:
                if paradigm == "ts":
                    continue
                summary = per_paradigm.get(paradigm)
                if summary is None or "primary_change_vs_ts" not in summary:
                    cells.append("-")
                else:
                    cells.append(f"{_fmt(summary['primary_change_vs_ts'], percent=True)} "
                                 f"({summary['negative_transfer_tasks']} neg.)")
            lines.append(f"| {name} | {n_tasks} | " + " | ".join(cells) + " |")
    lines += ["", "## Mean metrics by task type", "", "| type | metric | " + " | ".join(labels) + " |",
              "|" + "---|" * (2 + len(labels))]
    for task_type, per_paradigm in report["averages"]["by_task_type"].items():
        for metric in METRIC_NAMES.get(task_type, ()):
            cells = [_fmt(per_paradigm.get(p, {}).get("metrics", {}).get(metric)) for p in paradigms]
            lines.append(f"| {task_type} | {metric} | " + " | ".join(cells) + " |")
    lines += ["", "## All metrics per task and paradigm", "", "| task | paradigm | model | metrics | baseline |",
              "|---|---|---|---|---|"]
    for task_id, task in report["tasks"].items():
        for paradigm, result in task["paradigms"].items():
            values = ", ".join(f"{m} {_fmt(v)}" for m, v in result["metrics"].items())
            baseline = ", ".join(f"{m} {_fmt(v)}" for m, v in result["baseline"].items()) or "-"
            lines.append(f"| {task_id} | {PARADIGM_LABELS.get(paradigm, paradigm)} | {result['model']} | {values} | {baseline} |")
    lines += ["", "## Negative transfer", ""]
    if report["negative_transfer"]:
        for item in report["negative_transfer"]:
            lines.append(f"- {item['task_id']} under {PARADIGM_LABELS.get(item['paradigm'], item['paradigm'])}: "
                         f"{item['metric']} {_fmt(item['change_vs_ts'], percent=True)} vs TS")
    else:
        lines.append("None past the threshold." if any(p != "ts" for p in paradigms) and "ts" in paradigms
                     else "Not assessed (needs TS and at least one of CG / AU).")
    if report["routing"]:
        lines += ["", "## Expert routing", "", f"Task affinity: {settings['affinity_definition']}.", ""]
        for paradigm, models in report["routing"].items():
            for model_name, data in models.items():
                if len(data["tasks"]) < 2:
                    continue
                lines.append(f"- {PARADIGM_LABELS.get(paradigm, paradigm)} model `{model_name}`: "
                             f"{len(data['tasks'])} tasks, {data['num_experts']} experts, MoE layers "
                             f"{', '.join(data['shares'])}; most similar pairs: {_top_pairs(data)}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _top_pairs(data: dict, k: int = 3) -> str:
    affinity = np.asarray(data["affinity"], dtype=np.float64)
    tasks = data["tasks"]
    pairs = [(affinity[i, j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))
             if np.isfinite(affinity[i, j])]
    pairs.sort(reverse=True)
    return ", ".join(f"{a}~{b} {v:.3f}" for v, a, b in pairs[:k]) or "n/a"


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    paradigms = [p for p in report["paradigms"] if p != "ts"]
    task_ids = list(report["tasks"])
    if "ts" in report["paradigms"] and paradigms and task_ids:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(task_ids) + 1.5))
        height = 0.8 / len(paradigms)
        for k, paradigm in enumerate(paradigms):
            values = []
            for task_id in task_ids:
                result = report["tasks"][task_id]["paradigms"].get(paradigm, {})
                value = result.get("change_vs_ts", {}).get(report["tasks"][task_id]["primary_metric"])
                values.append(100 * value if value is not None and math.isfinite(value) else 0.0)
            ax.barh(np.arange(len(task_ids)) + k * height, values, height, label=PARADIGM_LABELS.get(paradigm, paradigm))
        ax.axvline(-100 * report["settings"]["negative_transfer_threshold"], color="red", linestyle="--",
                   linewidth=0.8, label="negative-transfer threshold")
        ax.axvline(0, color="black", linewidth=0.6)
        ax.invert_yaxis()  # first task on top, as in the tables
        ax.set_yticks(np.arange(len(task_ids)) + 0.4 - height / 2, task_ids, fontsize=7)
        ax.set_xlabel("primary-metric change vs TS (%) — positive is better")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "change_vs_ts.png", plt))

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, (key, title) in zip(axes, (("by_group", "clinical group"), ("by_task_type", "task type"),
                                            ("by_scale", "data scale"))):
            names = list(report["averages"][key])
            for k, paradigm in enumerate(paradigms):
                values = [100 * (report["averages"][key][n].get(paradigm, {}).get("primary_change_vs_ts") or 0.0)
                          for n in names]
                values = [v if math.isfinite(v) else 0.0 for v in values]
                ax.bar(np.arange(len(names)) + k * height, values, height, label=PARADIGM_LABELS.get(paradigm, paradigm))
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(np.arange(len(names)) + 0.4 - height / 2, names, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"mean change vs TS by {title} (%)", fontsize=9)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "averages.png", plt))

    for paradigm, models in report["routing"].items():
        for model_name, data in models.items():
            stem = f"{paradigm}_{model_name}".replace(os.sep, "_").replace("@", "_")
            layers = list(data["shares"])
            if not layers or len(data["tasks"]) < 2:  # single-task (TS) models: numbers in report.json only
                continue
            fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers) + 1, 0.25 * len(data["tasks"]) + 1.5),
                                     squeeze=False)
            for ax, layer in zip(axes[0], layers):
                image = ax.imshow(np.asarray(data["shares"][layer]), vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_title(f"block {layer}", fontsize=8)
                ax.set_xlabel("expert", fontsize=7)
                ax.set_yticks(range(len(data["tasks"])), data["tasks"] if ax is axes[0][0] else [], fontsize=6)
            fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the task's tokens")
            written.append(_save(fig, out_dir / f"routing_{stem}.png", plt))

            fig, ax = plt.subplots(figsize=(0.3 * len(data["tasks"]) + 3, 0.3 * len(data["tasks"]) + 2.5))
            affinity = np.asarray(data["affinity"], dtype=np.float64)
            image = ax.imshow(affinity, vmin=0, vmax=1, cmap="magma")
            ax.set_xticks(range(len(data["tasks"])), data["tasks"], rotation=90, fontsize=6)
            ax.set_yticks(range(len(data["tasks"])), data["tasks"], fontsize=6)
            ax.set_title("task affinity (1 - JS divergence of routing)", fontsize=9)
            fig.colorbar(image, ax=ax, shrink=0.8)
            fig.tight_layout()
            written.append(_save(fig, out_dir / f"affinity_{stem}.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_report(report: dict, out_dir: os.PathLike) -> dict[str, Path]:
    """Write report.md, report.csv, report.json and the PNG plots; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out_dir)
    paths = {"json": out_dir / "report.json", "csv": out_dir / "report.csv", "markdown": out_dir / "report.md"}
    _atomic_write_text(paths["json"], json.dumps(_json_ready(report), indent=1) + "\n")
    _atomic_write_text(paths["csv"], render_csv(report))
    _atomic_write_text(paths["markdown"], render_markdown(report, [p.name for p in plots]))
    return {**paths, "plots": plots}


def generate_report(run_dirs: Sequence[os.PathLike], out_dir: os.PathLike, scale_threshold: float | None = None,
                    negative_threshold: float = DEFAULT_NEGATIVE_THRESHOLD) -> dict:
    """Build and write the report (what `m2dino.train --paradigm all` calls); returns the report dict."""
    report = build_report(run_dirs, scale_threshold=scale_threshold, negative_threshold=negative_threshold)
    write_report(report, out_dir)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by m2dino.train")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv, report.json and plots")
    parser.add_argument("--scale-threshold", type=float, default=None,
                        help="training size from which a task counts as data-rich (default: the median)")
    parser.add_argument("--negative-threshold", type=float, default=DEFAULT_NEGATIVE_THRESHOLD,
                        help="flag negative transfer when the primary-metric change vs TS is below minus this "
                             "(default 0.05 = 5%%)")
    args = parser.parse_args(argv)
    try:
        report = generate_report(args.run_dirs, args.out, args.scale_threshold, args.negative_threshold)
    except (FileNotFoundError, ValueError) as e:
        print(f"m2dino.report: error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(report))
    print(f"report written to {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
