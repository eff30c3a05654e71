"""The transfer report as Markdown (report.md) and long-format CSV (report.csv).

report.md is a list of sections, each a function of the report dict returning its lines
(SECTIONS); a new section is a new function in that list. Sections about changes take the
reference they are against, so TS* (and any later reference) reuses them."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from m2dino.evaluation.metrics import LOWER_IS_BETTER, METRIC_NAMES
from m2dino.evaluation.report.answers import ONE_SEED
from m2dino.evaluation.report.change import UNTESTED, Change
from m2dino.evaluation.report.compute import CONTROL, REFERENCES, changes_against
from m2dino.paradigms import label

MARKS = {"negative": " !", "positive": " +", "n.s.": " n.s."}
SUMMARY_KEYS = (("overall", "all tasks"), ("by_group", "clinical group"), ("by_task_type", "task type"),
                ("by_scale", "data scale"))


# ------------------------------------------------------------------------------ number formats
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


def _units(value, metric: str) -> str:
    """An effect in the metric's units, signed: '+0.0255', or '+1.23 px' for HD and MRE."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.2f} px" if metric in LOWER_IS_BETTER else f"{value:+.4f}"


def _units_interval(interval, metric: str) -> str:
    if not interval or any(v is None or not math.isfinite(v) for v in interval):
        return ""
    digits = 2 if metric in LOWER_IS_BETTER else 4
    return f" [{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def _p(value) -> str:
    return "-" if value is None else f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _count(value, decimals: int = 0) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _millions(value) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f}M"


def _table(head: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ------------------------------------------------------------------------------ CSV
def csv_rows(report: dict) -> list[dict]:
    """Long format: one row per task, paradigm and metric (changes against TS)."""
    rows = []
    for task_id, task in report["tasks"].items():
        for paradigm, result in task["paradigms"].items():
            change = Change.from_json(paradigm, result) if "effect_units" in result else None
            for metric, value in result["metrics"].items():
                ci = result.get("ci", {}).get(metric) or [None, None]
                change_ci = (change.relative_ci.get(metric) if change else None) or [None, None]
                primary = metric == task["primary_metric"] and change is not None
                effect_ci = (change.units_ci or [None, None]) if primary else [None, None]
                rows.append({
                    "task_id": task_id, "task_type": task["task_type"], "group": task["group"],
                    "train_size": task["train_size"], "scale": task["scale"], "paradigm": paradigm,
                    "model": result["model"], "runs": result.get("runs", 1), "metric": metric,
                    "primary": metric == task["primary_metric"],
                    "value": value, "ci_low": ci[0], "ci_high": ci[1],
                    "spread": result.get("spread", {}).get(metric),
                    "baseline": result["baseline"].get(metric),
                    "ts_value": task["paradigms"].get("ts", {}).get("metrics", {}).get(metric),
                    "change_vs_ts": change.relative.get(metric) if change else None,
                    "change_ci_low": change_ci[0], "change_ci_high": change_ci[1],
                    "transfer": change.transfer if primary else "",
                    "negative_transfer": change.transfer == "negative" if primary else "",
                    "effect_units": change.units if primary else None,
                    "effect_ci_low": effect_ci[0], "effect_ci_high": effect_ci[1],
                    "p": change.p if primary else None,
                    "p_adjusted": change.p_adjusted if primary else None,
                    "gap_share": change.gap_share if primary else None,
                    "non_inferior": change.non_inferior if primary else None,
                    "at_chance": task.get("at_chance") if metric == task["primary_metric"] else None,
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


# ------------------------------------------------------------------------------ Markdown sections
def _header(report: dict) -> list[str]:
    settings = report["settings"]
    labels = [label(p) for p in report["paradigms"]]
    counts = settings["scale_counts"]
    scale = (f"Data scale (descriptive): a task is data-rich when its training size is >= "
             f"{settings['scale_threshold']:g} ({settings['scale_threshold_rule']}): {counts['data-rich']} data-rich, "
             f"{counts['data-scarce']} data-scarce.")
    if min(counts.values()) == 0:
        empty = "data-scarce" if counts["data-scarce"] == 0 else "data-rich"
        scale += (f" Every task is on one side, so there is no {empty} task and no comparison by data scale "
                  f"(set --scale-threshold to split the tasks).")
    correction = settings.get("correction") or {}
    margins = ", ".join(f"{m} {v:g}" for m, v in settings.get("non_inferiority_margins", {}).items())
    seeds = report.get("seeds") or report.get("replicates") or []
    brief = _answers_in_brief(report)
    return [
        f"Protocol: {report.get('protocol', 'unknown')}.",
        "",
    ] + (["The study's questions in brief (the answers, with their rules and numbers, close the report):", ""]
         + brief + [""] if brief else []) + [
        "How to read a cell: `0.7860 [0.71, 0.84]` is the metric (the mean over the seeds) and its 95% interval; "
        "`(+0.0420 [+0.0110, +0.0730]) +` is the effect against TS in the metric's units (MRE: pixels saved) with "
        "the interval of its test, here a significant gain after the correction.",
        "",
        "### How the numbers were made",
        "",
        f"- **Seeds**: {', '.join(str(s) for s in seeds) or 'n/a'} ({len(seeds)} training seed(s)); "
        f"{settings['seed_method']}.",
        f"- **Budget**: {report.get('budget', 'equal-exposure')}. **Correction** for multiple tests: "
        f"{correction.get('name', 'n/a')} (`--correction {correction.get('method', '?')}`; the default is bh) over "
        f"{correction.get('n_per_task_tests', 0)} per-task tests; families: {correction.get('families', '')}.",
        f"- **Effects** ({', '.join(labels)}): {settings.get('effect_definition', '')}; "
        f"{settings.get('gap_share_definition', '')}; {settings['change_definition']}.",
        f"- **Intervals** of a value: {settings['interval_method']}. **Tests** of a change: "
        f"{settings.get('change_test', '')}; {settings.get('p_value_rule', '')}.",
        f"- **Flags**: {settings['transfer_rule']} (threshold {settings['negative_transfer_threshold'] * 100:g}%). "
        f"Marks: `!` significant loss, `+` significant gain, `n.s.` not significant (the change may be large, "
        f"but the evidence does not carry it after the correction, or it is within the threshold).",
        f"- **Non-inferiority** margins (metric units, `--non-inferiority-margin`): {margins}; "
        f"{settings.get('non_inferiority_rule', '')}.",
        f"- **At chance**: {settings.get('chance_rule', '')}.",
        f"- **Tasks as the unit**: {settings.get('task_unit', '')}.",
        f"- {scale}",
    ]


def _answers_in_brief(report: dict) -> list[str]:
    answers = report.get("answers") or {}
    star = label(CONTROL)
    rows = [[rq, item["question"],
             (ONE_SEED if item["answer"].startswith(ONE_SEED) else item["verdict"])
             + (f"; against {star}: {item['control']}" if "control" in item else "")]
            for rq, item in answers.items()]
    return _table(["RQ", "question", "verdict"], rows) if rows else []


def _primary_table(report: dict) -> list[str]:
    paradigms = report["paradigms"]
    rows = []
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
            if "effect_units" in result:
                change = Change.from_json(paradigm, result)
                mark = MARKS.get(change.transfer, "")
                if change.method == UNTESTED and mark == MARKS["n.s."]:
                    mark = ""  # no test was made: only the threshold flags
                cell += f" ({_units(change.units, primary)}{_units_interval(change.units_ci, primary)}){mark}"
            cells.append(cell)
        chance = {True: "yes", False: "no", None: "?"}[task.get("at_chance")]
        rows.append([task_id, task["task_type"], task["group"], task["train_size"], task["scale"], primary, *cells,
                     _fmt(baseline), chance])
    lines = ["", "## Primary metric per task", ""]
    lines += _table(["task", "type", "group", "train", "scale", "metric", *map(label, paradigms), "baseline",
                     "TS at chance"], rows)
    if "ts" not in report.get("against", {}) or len(paradigms) < 2:
        lines += ["", "Changes against TS need a TS run and at least one CG or AU run; none are reported here."]
    return lines


def _effects_section(report: dict, reference: str) -> list[str]:
    """Per task and compared paradigm: the effect in metric units with its test, the gap share and
    the relative change, non-inferiority and the flag."""
    view = report.get("against", {}).get(reference)
    if not view:
        return []
    name = label(reference)
    rows = []
    for task_id, per_task in changes_against(report, reference).items():
        chance = view["at_chance"].get(task_id, {}).get("at_chance")
        for paradigm, c in per_task.items():
            non_inferior = {True: "yes", False: "not shown", None: "-"}[c.non_inferior]
            rows.append([task_id, c.metric, label(paradigm),
                         f"{_units(c.units, c.metric)}{_units_interval(c.units_ci, c.metric)}",
                         c.method, f"{_p(c.p)} / {_p(c.p_adjusted)}",
                         "at chance" if chance else _fmt(c.gap_share, percent=True),
                         _fmt(c.relative_primary, percent=True) + _interval(c.relative_ci.get(c.metric), percent=True),
                         non_inferior, MARKS.get(c.transfer, "").strip()])
    return ["", f"## Effects against {name} per task, in the metric's units", "",
            f"Effect: the paired difference against {name} (positive is better; MRE: pixels saved), its 95% "
            "interval and test; p: raw / adjusted; gap share: the effect over the reference's margin above the "
            "trivial baseline (not where the reference is at chance); relative change: secondary; non-inferior: "
            "the effect is significantly above -margin.", ""] + _table(
        ["task", "metric", "paradigm", "effect [95% CI]", "test", "p / adjusted", "gap share", "relative change",
         "non-inferior", "flag"], rows)


def _summaries_section(report: dict, reference: str) -> list[str]:
    """Means and medians over tasks (intervals resample the tasks) against a reference."""
    view = report.get("against", {}).get(reference)
    if not view or not view["compared"]:
        return []
    compared, name = view["compared"], label(reference)
    gap_rows, unit_rows, relative_rows, count_rows, left_out = [], [], [], [], set()
    for key, title in SUMMARY_KEYS:
        if key == "by_scale" and min(report["settings"]["scale_counts"].values()) == 0:
            continue
        for group, per_paradigm in view["averages"].get(key, {}).items():
            row_name = title if key == "overall" else f"{title}: {group}"
            n = max(s["n_tasks"] for s in per_paradigm.values())
            gap, units, relative, counts = [], [], [], []
            for paradigm in compared:
                s = per_paradigm.get(paradigm) or {}
                left_out.update(s.get("at_chance_tasks", []))
                gap.append(_mean_median(s.get("gap_share"), percent=True))
                relative.append(_mean_median(s.get("relative_change"), percent=True))
                effect = s.get("effect_units")
                units.append(_mean_median(effect, metric=effect["metric"]) if effect else "-")
                counts.append(f"{s.get('significant_gains', 0)} +, {s.get('significant_drops', 0)} !, "
                              f"NI {s.get('non_inferior', 0)}/{s.get('non_inferiority_tested', 0)}" if s else "-")
            gap_rows.append([row_name, n, *gap])
            relative_rows.append([row_name, n, *relative])
            count_rows.append([row_name, n, *counts])
            if key == "by_task_type":
                unit_rows.append([group, *units])
    heads = [label(p) for p in compared]
    lines = ["", f"## Over tasks, against {name}: gap share (mean and median)", "",
             "Each cell: mean [95% CI] / median [95% CI] (n tasks); the intervals resample the tasks. Tasks where "
             f"{name} is at chance are left out"
             + (f": {', '.join(sorted(left_out))}." if left_out else " (none here)."), ""]
    lines += _table(["summary", "tasks", *heads], gap_rows)
    lines += ["", f"### Effect in the metric's units by task type, against {name} (all tasks)", ""]
    lines += _table(["task type", *heads], unit_rows)
    lines += ["", f"### Relative change against {name} (secondary; tasks at chance left out)", ""]
    lines += _table(["summary", "tasks", *heads], relative_rows)
    lines += ["", f"### Per-task flags against {name} (after the correction)", "",
              "`+` significant gains, `!` significant losses, NI: tasks shown non-inferior / tested.", ""]
    lines += _table(["summary", "tasks", *heads], count_rows)
    return lines


def _mean_median(summary: dict | None, percent: bool = False, metric: str | None = None) -> str:
    if not summary:
        return "-"

    def one(value, interval):
        if metric is not None:
            return _units(value, metric) + _units_interval(interval, metric)
        return _fmt(value, percent) + _interval(interval, percent)

    return (f"{one(summary['mean'], summary.get('ci_mean'))} / {one(summary['median'], summary.get('ci_median'))} "
            f"({summary['n_tasks']})")


def _task_level_section(report: dict) -> list[str]:
    tests = report.get("task_level_tests") or []
    if not tests:
        return []
    rows = [[e["question"], label(e["reference"]), e["test"], "-".join(label(p) for p in e["paradigm"].split("-")),
             "-" if e.get("statistic") is None else f"{e['statistic']:+.3f}", _p(e.get("p")), _p(e.get("p_adjusted")),
             e.get("n_tasks", "-"), e.get("note") or e.get("method", "")] for e in tests]
    lines = ["", "## Tests over tasks (RQ2 scale, RQ3 type, RQ4 stability)", "",
             "The task is the unit: each test treats the tasks' gap shares (tasks not at chance) as the data; "
             "p-values adjusted together per reference. Spearman: rank correlation with log(train size), "
             "log(clinical-group size) and the task's share of its group; mixedlm: slope per log unit of train size "
             "(z); kruskal: task types; paired_permutation_iqr: AU's spread over tasks minus CG's.", ""]
    lines += _table(["RQ", "vs", "test", "paradigm", "statistic", "p", "p adjusted", "tasks", "method"], rows)
    split_rows = []
    for paradigm, entry in (report.get("comparisons") or {}).items():
        split = entry.get("scarce_minus_rich")
        if split:
            split_rows.append([label(paradigm), split["n_tasks"].get("data-scarce"), split["n_tasks"].get("data-rich"),
                               _fmt(split["value"], percent=True), _fmt(split["median_difference"], percent=True)])
    if split_rows:
        lines += ["", "Descriptive only (no test; RQ2 rests on the tests above): gap share of the data-scarce minus "
                      "the data-rich tasks at the header's threshold.", ""]
        lines += _table(["paradigm", "data-scarce tasks", "data-rich tasks", "mean difference", "median difference"],
                        split_rows)
    return lines


def _type_metrics_section(report: dict) -> list[str]:
    paradigms = report["paradigms"]
    rows = [[task_type, metric, *[_fmt(per_paradigm.get(p, {}).get("metrics", {}).get(metric)) for p in paradigms]]
            for task_type, per_paradigm in report.get("averages", {}).get("by_task_type", {}).items()
            for metric in METRIC_NAMES.get(task_type, ())]
    if not rows:
        return []
    return ["", "## Mean metrics by task type", ""] + _table(["type", "metric", *map(label, paradigms)], rows)


def _group_table_section(report: dict) -> list[str]:
    """The paper's per-group table: absolute primary metric per task."""
    table = report.get("group_table") or []
    if not table:
        return []
    paradigms = report["paradigms"]
    rows = []
    for group in table:
        steps = group["cg_steps"]
        steps = _count(steps) if isinstance(steps, (int, float)) else ", ".join(_count(s) for s in steps or []) or "-"
        for i, row in enumerate(group["rows"]):
            first = i == 0
            rows.append([group["group"] if first else "", len(group["tasks"]) if first else "",
                         group["train_images"] if first else "", steps if first else "", row["task"], row["metric"],
                         row["train_images"], *[_fmt(row["values"].get(p)) for p in paradigms], _fmt(row["baseline"])])
    return (["", "## Per clinical group (the paper's table)", "",
             "Absolute primary metric per task (mean over the seeds); CG steps: the group model's optimizer steps.", ""]
            + _table(["group", "tasks", "training images", "CG steps", "task", "metric", "train",
                      *map(label, paradigms), "baseline"], rows))


def _training_section(report: dict) -> list[str]:
    """Training length per model: what tells transfer from the amount of training apart."""
    training = report.get("training") or {}
    entries = [(p, m, t) for p in report["paradigms"] for m, t in (training.get(p) or {}).items() if t]
    if not entries:
        return []
    budget = report.get("budget", "equal-exposure")
    why = ("every sample is seen the same number of epochs in every paradigm, so a TS model of a small task takes "
           "few optimizer steps and the AU model many; read a change against TS with its steps"
           if budget == "equal-exposure" else
           "every model trains until its loss plateaus on its inner split, or its cap")
    rows = []
    for paradigm, model, t in entries:
        capacity = t.get("capacity") or {}
        rows.append([label(paradigm), model, _count(t["train_images"]), _count(t["epochs"], 2), _count(t["steps"]),
                     _count(t["samples_seen"]), _count(t["seconds"], 1), t.get("stop_reason") or "not recorded",
                     "not recorded" if t.get("final_lr") is None else f"{t['final_lr']:.3g}",
                     _millions(capacity.get("params_total"))])
    return (["", "## Training length per model", "", f"Budget {budget}: {why}.", ""]
            + _table(["paradigm", "model", "train images", "epochs", "optimizer steps", "samples seen",
                      "wall time (s)", "stop reason", "final lr", "parameters"], rows))


def _capacity_section(report: dict) -> list[str]:
    capacity = report.get("capacity") or {}
    if not capacity:
        return []
    rows = []
    for paradigm in report["paradigms"]:
        c = capacity.get(paradigm)
        if not c:
            continue
        active = _millions(c["params_active_per_token"])
        if c.get("params_active_per_token_min") not in (None, c["params_active_per_token"]):
            active = f"{_millions(c['params_active_per_token_min'])}-{active}"
        flops = "not recorded" if c["train_flops"] is None else f"{c['train_flops'] / 1e12:.2f} TFLOP"
        rows.append([label(paradigm), c["models"], _millions(c["params_total"]), active, flops,
                     ", ".join(c["sources"])])
    return (["", "## Capacity per paradigm", "",
             "Parameters: the sum over the paradigm's models; active per token: what one token passes through (its "
             "task's router, top-k of the E experts, the neck for spatial tasks, its head), the range over the models; "
             "training FLOPs: summed over models and seeds, as training recorded them.", ""]
            + _table(["paradigm", "models", "parameters", "active per token", "training FLOPs", "source"], rows))


def _all_metrics_section(report: dict) -> list[str]:
    rows = []
    for task_id, task in report["tasks"].items():
        for paradigm, result in task["paradigms"].items():
            values = ", ".join(f"{m} {_fmt(v)}{_interval(result.get('ci', {}).get(m))}"
                               for m, v in result["metrics"].items())
            baseline = ", ".join(f"{m} {_fmt(v)}" for m, v in result["baseline"].items()) or "-"
            rows.append([task_id, label(paradigm), result["model"], values, baseline])
    return ["", "## All metrics per task and paradigm", ""] + _table(["task", "paradigm", "model", "metrics",
                                                                       "baseline"], rows)


def _losses_section(report: dict) -> list[str]:
    lines = ["", "## Significant losses against TS", ""]
    if report["negative_transfer"]:
        for item in report["negative_transfer"]:
            lines.append(f"- {item['task_id']} under {label(item['paradigm'])}: {item['metric']} "
                         f"{_units(item.get('effect_units'), item['metric'])}"
                         f"{_units_interval(item.get('effect_ci'), item['metric'])} "
                         f"({_fmt(item['change_vs_ts'], percent=True)}; adjusted p {_p(item.get('p_adjusted'))}) vs TS")
    elif "ts" in report.get("against", {}) and len(report["paradigms"]) > 1:
        lines.append("None: no change is both beyond the threshold and significantly below 0 after the correction.")
    else:
        lines.append("Not assessed (needs TS and at least one of CG / AU).")
    return lines


def _routing_section(report: dict) -> list[str]:
    if not report["routing"]:
        return []
    lines = ["", "## Expert routing", "", f"Task affinity: {report['settings']['affinity_definition']}.", ""]
    for paradigm, models in report["routing"].items():
        for model_name, data in models.items():
            if len(data["tasks"]) < 2:
                continue
            lines.append(f"- {label(paradigm)} model `{model_name}`: {len(data['tasks'])} tasks, {data['num_experts']} "
                         f"experts, MoE layers {', '.join(data['shares'])}; most similar pairs: {_top_pairs(data)}")
    return lines


def _designed_section(report: dict) -> list[str]:
    """On the synthetic suite: per group and designed pair, the designed relation next to CG's and
    AU's measured change against TS, and the verdict per pair (design.py)."""
    relations = report.get("designed_transfer")
    if not relations:
        return []
    rule = report["settings"]["designed_transfer"]

    def cell(entry: dict, paradigm: str) -> str:
        measured = entry["paradigms"][paradigm]
        if not measured.get("together"):
            return "not trained together"
        changes = "; ".join(f"{t} {_units(c['effect_units'], c['metric'])}{_units_interval(c['ci'], c['metric'])} "
                            f"(p adj. {_p(c['p_adjusted'])})" for t, c in measured["tasks"].items())
        if entry["level"] == "group":
            return changes
        return (f"**{measured['verdict']}** ({entry['expected']}: p adj. {_p(measured['p_designed_adjusted'])}; "
                f"opposite: {_p(measured['p_opposite_adjusted'])}): {changes}")

    rows = [[r["group"] or "across groups", "group" if r["level"] == "group" else " / ".join(r["tasks"]),
             r["relation"], r["factor"] or "-", cell(r, "cg"), cell(r, "au")] for r in relations]
    return (["", "## Designed vs measured transfer", "",
             "The data is the synthetic suite, whose design.json declares which tasks transfer (docs/data.md). Per "
             "clinical group (its tasks' changes) and per designed pair, the designed relation next to CG's and AU's "
             "measured change against TS in the metric's units (95% interval; p adjusted with the per-task family), "
             "and the verdict.", "", f"_Verdict rule: {rule['verdict_rule']}._", ""]
            + ([f"**Caveat**: {rule['caveat']}.", ""] if rule.get("caveat") else [])
            + _table(["group", "pair", "designed", "factor", "CG vs TS", "AU vs TS"], rows)
            + ["", "Each answer at the end says whether the design agrees with it."])


def _correlation(result: dict | None) -> str:
    if not result or result.get("spearman") is None:
        return f"n = {(result or {}).get('n', 0)}: too few to rank"
    return (f"Spearman {result['spearman']:+.2f} (p {_p(result['spearman_p'])}), Kendall {result['kendall']:+.2f} "
            f"(p {_p(result['kendall_p'])}), n = {result['n']}")


def _affinity_groups_section(report: dict) -> list[str]:
    """AG (groups from early inter-task affinity): its groups per seed, whether the affinity
    predicts the measured transfer, AG vs CG and AG vs the random groupings (groupings.py)."""
    section = report.get("affinity_groupings")
    if not section:
        return []
    lines = ["", "## Affinity groups (AG)", "",
             f"AG trains one model per group chosen to maximise the {section['measure']} affinity measured early in "
             f"the AU model's training (each seed from its own probe); its changes against TS are in every table "
             f"above. Unit: {section['unit']}. These tests are outside the report's multiplicity families.", ""]
    for rep, by_paradigm in section["groups"].items():
        groups = by_paradigm.get("ag", {})
        lines.append(f"- {rep}: " + "; ".join(f"{g}: {', '.join(m)}" for g, m in groups.items())
                     + f" (affinity: {section['affinity_files'].get(rep) or 'not found'})")
    lines += ["", "Does the affinity predict the transfer? (predicted: the mean affinity onto a task from its group; "
                  "measured: its change against TS)", ""]
    for rep, per_paradigm in section["prediction"].items():
        for paradigm, result in per_paradigm.items():
            lines.append(f"- {rep}, {label(paradigm)} groups: {_correlation(result)}")
    pairwise = section.get("pairwise") or {}
    lines.append(f"- task pairs trained as a two-task group: {pairwise.get('note') or _correlation(pairwise)}")
    for measure, result in (section.get("design") or {}).items():
        lines.append(f"- designed relations (design.json), {measure}: AUC of the {result['pairs']['positive']} "
                     f"positive pairs over the {result['pairs']['none']} unrelated ones "
                     f"{_fmt(result['auc_positive_vs_none'])} (permutation p over tasks {_p(result['p'])})")
    versus = section.get("ag_vs_cg")
    if versus:
        lines.append(f"- AG vs CG (Wilcoxon signed-rank over {versus['n']} tasks of AG's change minus CG's, metric "
                     f"units): median {_fmt(versus['median_difference'])}, AG better on {versus['better']}, worse on "
                     f"{versus['worse']}, p {_p(versus['p'])}")
    null = section.get("ag_vs_random")
    if null and null.get("p") is not None:
        lines.append(f"- AG vs {len(null['random'])} random groupings of AG's sizes ({null['statistic']}): AG "
                     f"{_fmt(null['observed'])}, random mean {_fmt(null['random_mean'])}; Monte-Carlo p "
                     f"{_p(null['p'])} ({null['rule']})")
    elif not section["random_groupings"]:
        lines.append("- AG vs chance: no random groupings trained (--random-groupings N)")
    return lines


def _answers_section(report: dict) -> list[str]:
    if not report.get("answers"):
        return []
    lines = ["", "## Answers", ""]
    for rq, item in report["answers"].items():
        lines += [f"**{rq}. {item['question']}** ({item['verdict']}) {item['answer']}", "", f"_Rule: {item['rule']}._",
                  ""]
        if "designed_truth" in item:
            lines += [item["designed_truth"], ""]
        if "control" in item:
            lines += [f"Against {label(CONTROL)}: **{item['control']}**. {item['control_answer']}", ""]
    if any("control" in item for item in report["answers"].values()):
        lines += [f"_Control rule: {next(iter(report['answers'].values()))['control_rule']}._", ""]
    return lines


def _against_references(section):
    """A section about changes, once per reference the report holds (TS, then TS*, ...)."""
    return lambda report: [line for reference in REFERENCES for line in section(report, reference)]


SECTIONS = (_primary_table, _against_references(_effects_section), _against_references(_summaries_section),
            _task_level_section, _group_table_section, _type_metrics_section, _training_section, _capacity_section,
            _all_metrics_section, _losses_section, _routing_section, _designed_section, _affinity_groups_section)


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    lines = ["# M2DINO transfer report", ""] + _header(report)
    for section in SECTIONS:
        lines += section(report)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += _answers_section(report)
    return "\n".join(lines).rstrip() + "\n"


def _top_pairs(data: dict, k: int = 3) -> str:
    affinity = np.asarray(data["affinity"], dtype=np.float64)
    tasks = data["tasks"]
    pairs = [(affinity[i, j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i + 1, len(tasks))
             if np.isfinite(affinity[i, j])]
    pairs.sort(reverse=True)
    return ", ".join(f"{a}~{b} {v:.3f}" for v, a, b in pairs[:k]) or "n/a"
