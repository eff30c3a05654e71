"""The transfer report as Markdown (report.md) and long-format CSV (report.csv)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dino.evaluation.metrics import METRIC_NAMES
from m2dino.paradigms import label


def _fmt(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if percent:
        return f"{value * 100:+.1f}%"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def _interval(interval, percent: bool = False) -> str:
    if not interval or any(v is None for v in interval):
        return ""
    if percent:
        return f" [{interval[0] * 100:+.1f}, {interval[1] * 100:+.1f}]"
    return f" [{_fmt(interval[0])}, {_fmt(interval[1])}]"


MARKS = {"negative": " !", "positive": " +", "n.s.": " n.s."}


def csv_rows(report: dict) -> list[dict]:
    """Long format: one row per task, paradigm and metric."""
    rows = []
    for task_id, task in report["tasks"].items():
        for paradigm, result in task["paradigms"].items():
            for metric, value in result["metrics"].items():
                ci = result.get("ci", {}).get(metric) or [None, None]
                change_ci = result.get("change_ci", {}).get(metric) or [None, None]
                primary = metric == task["primary_metric"]
                rows.append({
                    "task_id": task_id, "task_type": task["task_type"], "group": task["group"],
                    "train_size": task["train_size"], "scale": task["scale"], "paradigm": paradigm,
                    "model": result["model"], "runs": result.get("runs", 1), "metric": metric, "primary": primary,
                    "value": value, "ci_low": ci[0], "ci_high": ci[1],
                    "spread": result.get("spread", {}).get(metric),
                    "baseline": result["baseline"].get(metric),
                    "ts_value": task["paradigms"].get("ts", {}).get("metrics", {}).get(metric),
                    "change_vs_ts": result.get("change_vs_ts", {}).get(metric),
                    "change_ci_low": change_ci[0], "change_ci_high": change_ci[1],
                    "transfer": result.get("transfer", "") if primary else "",
                    "negative_transfer": bool(result.get("negative_transfer")) if primary else "",
                })
    return rows


def render_csv(report: dict) -> str:
    rows = csv_rows(report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["task_id"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                         for k, v in row.items()})
    return buffer.getvalue()


def _header(report: dict) -> list[str]:
    settings = report["settings"]
    labels = [label(p) for p in report["paradigms"]]
    counts = settings["scale_counts"]
    scale = (f"Data scale: a task is data-rich when its training size is >= {settings['scale_threshold']:g} "
             f"({settings['scale_threshold_rule']}): {counts['data-rich']} data-rich, {counts['data-scarce']} "
             f"data-scarce.")
    if min(counts.values()) == 0:
        empty = "data-scarce" if counts["data-scarce"] == 0 else "data-rich"
        scale += (f" Every task is on one side, so there is no {empty} task and no comparison by data scale "
                  f"(set --scale-threshold to split the tasks).")
    return [
        f"Protocol: {report.get('protocol', 'unknown')}.",
        "",
        f"Paradigms: {', '.join(labels)}. Change vs TS: {settings['change_definition']}.",
        "",
        f"Intervals: {settings['interval_method']}. Seeds: {settings['seed_method']}.",
        "",
        f"Transfer: {settings['transfer_rule']} (threshold {settings['negative_transfer_threshold'] * 100:g}%). "
        f"Marks: `!` significant loss, `+` significant gain, `n.s.` not significant (the change may be large, "
        f"but the interval includes 0 or the change is within the threshold: no evidence either way).",
        "",
        scale,
        "",
        "How to read a cell: `0.7860 [0.71, 0.84]` is the metric on the validation images and its 95% interval "
        "(where the metric would land for another draw of validation images like these); `(+8.7% [+2.1, +15.3]) +` "
        "is the change against TS with its paired interval, here a significant gain.",
    ]


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    paradigms = report["paradigms"]
    labels = [label(p) for p in paradigms]
    lines = ["# M2DINO transfer report", ""] + _header(report)
    lines += ["", "## Primary metric per task", "",
              "| task | type | group | train | scale | metric | " + " | ".join(labels) + " | baseline |",
              "|" + "---|" * (7 + len(labels))]
    for task_id, task in report["tasks"].items():
        primary = task["primary_metric"]
        cells, baseline = [], None
        for paradigm in paradigms:
            result = task["paradigms"].get(paradigm)
            if result is None:
                cells.append("-")
                continue
            baseline = result["baseline"].get(primary, baseline)
            cell = _fmt(result["metrics"].get(primary)) + _interval(result.get("ci", {}).get(primary))
            if "change_vs_ts" in result:
                interval = result.get("change_ci", {}).get(primary)
                mark = MARKS.get(result.get("transfer"), "")
                if not interval and mark == MARKS["n.s."]:
                    mark = ""  # no interval (--bootstrap 0): no test was made, only the threshold flags
                cell += (f" ({_fmt(result['change_vs_ts'].get(primary), percent=True)}"
                         f"{_interval(interval, percent=True)}){mark}")
            cells.append(cell)
        lines.append(f"| {task_id} | {task['task_type']} | {task['group']} | {task['train_size']} | {task['scale']} | "
                     f"{primary} | " + " | ".join(cells) + f" | {_fmt(baseline)} |")
    compared = "ts" in paradigms and len(paradigms) > 1
    if not compared:
        lines += ["", "Changes against TS need a TS run and at least one CG or AU run; none are reported here."]
    others = [p for p in paradigms if p != "ts"]
    sections = (("clinical group", "by_group"), ("task type", "by_task_type"), ("data scale", "by_scale"),
                ("overall", "overall")) if compared else ()
    for title, key in sections:
        if key == "by_scale" and min(report["settings"]["scale_counts"].values()) == 0:
            lines += ["", "## Mean primary-metric change vs TS, by data scale", "",
                      "Not reported: every task is on one side of the threshold (see the header)."]
            continue
        heading = "all tasks" if key == "overall" else f"by {title}"
        lines += ["", f"## Mean primary-metric change vs TS, {heading}", "",
                  f"| {title} | tasks | " + " | ".join(label(p) for p in others) + " |",
                  "|" + "---|" * (2 + len(others))]
        for name, per_paradigm in report["averages"][key].items():
            n_tasks = max(s["n_tasks"] for s in per_paradigm.values())
            cells = []
            for paradigm in others:
                summary = per_paradigm.get(paradigm)
                if summary is None or "primary_change_vs_ts" not in summary:
                    cells.append("-")
                else:
                    cells.append(f"{_fmt(summary['primary_change_vs_ts'], percent=True)}"
                                 f"{_interval(summary.get('primary_change_ci'), percent=True)} "
                                 f"({summary['significant_drops']} !, {summary['significant_gains']} +)")
            lines.append(f"| {name} | {n_tasks} | " + " | ".join(cells) + " |")
    lines += ["", "## Mean metrics by task type", "", "| type | metric | " + " | ".join(labels) + " |",
              "|" + "---|" * (2 + len(labels))]
    for task_type, per_paradigm in report["averages"]["by_task_type"].items():
        for metric in METRIC_NAMES.get(task_type, ()):
            cells = [_fmt(per_paradigm.get(p, {}).get("metrics", {}).get(metric)) for p in paradigms]
            lines.append(f"| {task_type} | {metric} | " + " | ".join(cells) + " |")
    lines += _training_section(report)
    lines += _control_section(report)
    lines += ["", "## All metrics per task and paradigm", "", "| task | paradigm | model | metrics | baseline |",
              "|---|---|---|---|---|"]
    for task_id, task in report["tasks"].items():
        for paradigm, result in task["paradigms"].items():
            values = ", ".join(f"{m} {_fmt(v)}{_interval(result.get('ci', {}).get(m))}"
                               for m, v in result["metrics"].items())
            baseline = ", ".join(f"{m} {_fmt(v)}" for m, v in result["baseline"].items()) or "-"
            name = label(paradigm)
            lines.append(f"| {task_id} | {name} | {result['model']} | {values} | {baseline} |")
    lines += ["", "## Significant losses against TS", ""]
    if report["negative_transfer"]:
        for item in report["negative_transfer"]:
            lines.append(f"- {item['task_id']} under {label(item['paradigm'])}: "
                         f"{item['metric']} {_fmt(item['change_vs_ts'], percent=True)}"
                         f"{_interval(item.get('change_ci'), percent=True)} vs TS")
    else:
        lines.append("None: no change is both below the threshold and significantly below 0." if compared
                     else "Not assessed (needs TS and at least one of CG / AU).")
    if report["routing"]:
        lines += ["", "## Expert routing", "", f"Task affinity: {report['settings']['affinity_definition']}.", ""]
        for paradigm, models in report["routing"].items():
            for model_name, data in models.items():
                if len(data["tasks"]) < 2:
                    continue
                lines.append(f"- {label(paradigm)} model `{model_name}`: "
                             f"{len(data['tasks'])} tasks, {data['num_experts']} experts, MoE layers "
                             f"{', '.join(data['shares'])}; most similar pairs: {_top_pairs(data)}")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    if report.get("answers"):
        lines += ["", "## Answers", ""]
        for rq, item in report["answers"].items():
            lines += [f"**{rq}. {item['question']}** ({item['verdict']}) {item['answer']}", "",
                      f"_Rule: {item['rule']}._", ""]
            if "control" in item:
                lines += [f"Against TS*: **{item['control']}**. {item['control_answer']}", ""]
        if any("control" in item for item in report["answers"].values()):
            lines += [f"_Control rule: {next(iter(report['answers'].values()))['control_rule']}._", ""]
    return "\n".join(lines).rstrip() + "\n"


def _control_section(report: dict) -> list[str]:
    """CG and AU against TS and against TS* (the converged-TS control), side by side."""
    control = report.get("control")
    if not control:
        return []
    aggregated = [p for p in report["paradigms"] if p not in ("ts", control["reference"])]
    heads = [f"{label(p)} vs {ref}" for p in aggregated for ref in ("TS", "TS*")]
    lines = ["", "## Against the converged-TS control (TS*)", "",
             "TS* trains every TS model on until its training loss plateaus (or its step cap); changes are paired "
             "as against TS.", "",
             "| task | metric | TS | TS* | " + " | ".join(heads) + " |", "|" + "---|" * (4 + len(heads))]

    def change(result):
        if not result or "change_vs_ts" not in result:
            return "-"
        primary_change = result["change_vs_ts"].get(metric)
        mark = MARKS.get(result.get("transfer"), "")
        interval = _interval(result.get("change_ci", {}).get(metric), percent=True)
        return f"{_fmt(primary_change, percent=True)}{interval}{mark}"

    for task_id, task in report["tasks"].items():
        metric = task["primary_metric"]
        ts, star = task["paradigms"].get("ts", {}), task["paradigms"].get(control["reference"], {})
        cells = []
        for p in aggregated:
            cells += [change(task["paradigms"].get(p)), change(control["tasks"].get(task_id, {}).get(p))]
        lines.append(f"| {task_id} | {metric} | {_fmt(ts.get('metrics', {}).get(metric))} | "
                     f"{_fmt(star.get('metrics', {}).get(metric))} | " + " | ".join(cells) + " |")
    lines += ["", "| mean over tasks | " + " | ".join(heads) + " |", "|" + "---|" * (1 + len(heads))]
    for key, title in (("overall", "all tasks"), ("by_scale", None)):
        names = sorted(set(report["averages"][key]) | set(control["averages"][key]))
        for name in names:
            cells = []
            for p in aggregated:
                for averages in (report["averages"], control["averages"]):
                    s = averages[key].get(name, {}).get(p)
                    cells.append("-" if not s or "primary_change_vs_ts" not in s else
                                 f"{_fmt(s['primary_change_vs_ts'], percent=True)}"
                                 f"{_interval(s.get('primary_change_ci'), percent=True)} "
                                 f"({s['significant_drops']} !, {s['significant_gains']} +)")
            lines.append(f"| {title or name} | " + " | ".join(cells) + " |")
    return lines


def _training_section(report: dict) -> list[str]:
    """Training length per model: what tells transfer from the amount of training apart."""
    training = report.get("training") or {}
    rows = [(p, m, t) for p in report["paradigms"] for m, t in (training.get(p) or {}).items() if t]
    if not rows:
        return []
    lines = ["", "## Training length per model", "",
             "Equal exposure: every sample is seen the same number of epochs in every paradigm, so a TS model of a "
             "small task takes few optimizer steps and the AU model many; read a change against TS with its steps.",
             "", "| paradigm | model | train images | epochs | optimizer steps | samples seen | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for paradigm, model, t in rows:
        lines.append(f"| {label(paradigm)} | {model} | {_count(t['train_images'])} | "
                     f"{_count(t['epochs'], 2)} | {_count(t['steps'])} | {_count(t['samples_seen'])} | "
                     f"{_count(t['seconds'], 1)} |")
    return lines


def _count(value, decimals: int = 0) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _top_pairs(data: dict, k: int = 3) -> str:
    affinity = np.asarray(data["affinity"], dtype=np.float64)
    tasks = data["tasks"]
    pairs = [(affinity[i, j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))
             if np.isfinite(affinity[i, j])]
    pairs.sort(reverse=True)
    return ", ".join(f"{a}~{b} {v:.3f}" for v, a, b in pairs[:k]) or "n/a"
