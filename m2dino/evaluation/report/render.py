"""The transfer report as Markdown (report.md) and long-format CSV (report.csv)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dino.evaluation.metrics import METRIC_NAMES
from m2dino.evaluation.report.compute import PARADIGM_LABELS


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
