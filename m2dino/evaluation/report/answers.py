"""The study's five questions (arXiv 2603.18123), answered from the report's tables by rules.

`answers(report)` reads only what report.json holds (values and their 95% intervals), so the
answers can be recomputed from the file. Each answer is {"question", "rule", "verdict",
"answer"}: verdict "answered" or "inconclusive" (then the answer says why: intervals that
include 0, too few tasks on a side, no intervals at all).
"""
from __future__ import annotations

import math
import re

from m2dino.evaluation.report.compute import CONTROL
from m2dino.paradigms import label

QUESTIONS = {
    "RQ1": "Which tasks can be trained together without loss?",
    "RQ2": "How does training-data scale drive positive or negative transfer under CG and AU?",
    "RQ3": "Does the task type matter?",
    "RQ4": "Is AU more stable than CG?",
    "RQ5": "Practical guidelines",
}
MIN_TASKS_PER_SIDE = 3
CONTROL_RULE = ("with the converged-TS control, each question is answered again by the same rule against TS*: "
                "'holds against TS*' when that answer reaches the same conclusions (its words, numbers aside), "
                "'only against TS' when it does not, 'inconclusive' when the answer against TS is inconclusive")


def answers(report: dict) -> dict:
    out = _answers(report)
    if report.get("control") and "ts" in report["paradigms"]:
        against_control = _answers(control_view(report))
        for rq, item in out.items():
            other = against_control[rq]
            if item["verdict"] != "answered":
                survives = "inconclusive"
            elif other["verdict"] == "answered" and _conclusions(other["answer"]) == _conclusions(item["answer"]):
                survives = "holds against TS*"
            else:
                survives = "only against TS"
            item.update(control=survives, control_answer=other["answer"], control_rule=CONTROL_RULE)
    return out


def control_view(report: dict) -> dict:
    """The report with its changes, averages and contrasts taken against TS* (report["control"])."""
    control = report["control"]
    tasks = {t: {**task, "paradigms": {p: {**r, **control["tasks"].get(t, {}).get(p, {})}
                                       for p, r in task["paradigms"].items() if p in control["tasks"].get(t, {})}}
             for t, task in report["tasks"].items()}
    return {**report, "tasks": tasks, "averages": control["averages"], "comparisons": control["comparisons"],
            "paradigms": [p for p in report["paradigms"] if p != CONTROL], "control": None}


def _conclusions(answer: str) -> str:
    """An answer's words without its numbers and intervals: what it concludes."""
    return re.sub(r"\[[^\]]*\]|[-+]?\d+(\.\d+)?%?", "", answer)


def _answers(report: dict) -> dict:
    aggregated = [p for p in report["paradigms"] if p not in ("ts", CONTROL)]
    if "ts" not in report["paradigms"] or not aggregated:
        why = "inconclusive: the questions compare CG and AU against TS; this report lacks TS or both of them"
        return {rq: {"question": q, "rule": "-", "verdict": "inconclusive", "answer": why}
                for rq, q in QUESTIONS.items()}
    has_intervals = report["settings"]["bootstrap"]["n_resamples"] > 0
    out = {
        "RQ1": _rq1(report, aggregated, has_intervals),
        "RQ2": _rq2(report, aggregated),
        "RQ3": _rq3(report, aggregated),
        "RQ4": _rq4(report),
    }
    out["RQ5"] = _rq5(report, aggregated, out)
    for rq, question in QUESTIONS.items():
        out[rq] = {"question": question, **out[rq]}
    return out


def _label(paradigm: str) -> str:
    return label(paradigm)


def _pct(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}%"


def _ci(interval) -> str:
    if _missing(interval):
        return "no interval"
    return f"[{100 * interval[0]:+.1f}%, {100 * interval[1]:+.1f}%]"


def _missing(interval) -> bool:
    return not interval or any(v is None or not math.isfinite(v) for v in interval)


def _excludes_zero(interval) -> int:
    """+1 when the interval lies above 0, -1 below, 0 when it includes 0 or is missing."""
    if _missing(interval):
        return 0
    return 1 if interval[0] > 0 else -1 if interval[1] < 0 else 0


def _rq1(report, aggregated, has_intervals):
    rule = ("a task trains together with others without loss under a paradigm when its primary-metric change "
            "against TS is not significantly negative (not flagged: below -threshold with its whole interval below 0)")
    groups = {}
    for task_id, task in report["tasks"].items():
        groups.setdefault(task["group"], []).append((task_id, task))
    parts = []
    for group in sorted(groups):
        members = groups[group]
        cells = []
        for paradigm in aggregated:
            scored = [(t, task["paradigms"][paradigm]) for t, task in members if paradigm in task["paradigms"]]
            drops = [t for t, r in scored if r.get("transfer") == "negative"]
            cells.append(f"{_label(paradigm)} {len(scored) - len(drops)}/{len(scored)}"
                         + (f" (drops: {', '.join(drops)})" if drops else ""))
        parts.append(f"{group}: " + "; ".join(cells))
    answer = "Tasks without a significant loss, per clinical group: " + ". ".join(parts) + "."
    if not has_intervals:
        return {"rule": rule, "verdict": "inconclusive",
                "answer": answer + " Without intervals (--bootstrap 0) losses are judged by the threshold alone, "
                                   "so this is not evidence."}
    return {"rule": rule, "verdict": "answered", "answer": answer}


def _rq2(report, aggregated):
    rule = ("compare the mean primary-metric change of data-scarce and data-rich tasks (split at the stated "
            "threshold): scale drives transfer under a paradigm when the interval of the difference "
            f"(scarce - rich) excludes 0; with fewer than {MIN_TASKS_PER_SIDE} tasks on a side it cannot be decided")
    counts = report["settings"]["scale_counts"]
    if min(counts.get("data-rich", 0), counts.get("data-scarce", 0)) < MIN_TASKS_PER_SIDE:
        return {"rule": rule, "verdict": "inconclusive",
                "answer": f"inconclusive: too few tasks on a side ({counts.get('data-scarce', 0)} data-scarce, "
                          f"{counts.get('data-rich', 0)} data-rich)."}
    parts, decided = [], False
    by_scale = report["averages"]["by_scale"]
    for paradigm in aggregated:
        contrast = report["comparisons"].get(paradigm, {}).get("scarce_minus_rich")
        if contrast is None:
            continue
        scarce = by_scale.get("data-scarce", {}).get(paradigm, {})
        rich = by_scale.get("data-rich", {}).get(paradigm, {})
        sign = _excludes_zero(contrast["ci"])
        decided |= sign != 0
        verdict = ("data-scarce tasks gain more from aggregation" if sign > 0 else
                   "data-scarce tasks gain less (lose more)" if sign < 0
                   else "no difference shown (the interval includes 0)")
        parts.append(f"{_label(paradigm)}: data-scarce {_pct(scarce.get('primary_change_vs_ts'))} "
                     f"({scarce.get('significant_gains', 0)} significant gains, {scarce.get('significant_drops', 0)} "
                     f"drops) vs data-rich {_pct(rich.get('primary_change_vs_ts'))} "
                     f"({rich.get('significant_gains', 0)} "
                     f"gains, {rich.get('significant_drops', 0)} drops); difference {_pct(contrast['value'])} "
                     f"{_ci(contrast['ci'])}: {verdict}")
    return {"rule": rule, "verdict": "answered" if decided else "inconclusive",
            "answer": ("" if decided else "inconclusive: ") + ". ".join(parts) + "."}


def _rq3(report, aggregated):
    rule = ("task type matters under a paradigm when two task types' mean primary-metric changes have intervals "
            "that do not overlap (types with one task are left out)")
    parts, decided = [], False
    for paradigm in aggregated:
        types = {t: s[paradigm] for t, s in report["averages"]["by_task_type"].items()
                 if paradigm in s and s[paradigm].get("n_tasks", 0) >= 2 and "primary_change_vs_ts" in s[paradigm]}
        cells = ", ".join(f"{t} {_pct(s['primary_change_vs_ts'])} {_ci(s.get('primary_change_ci'))}"
                          for t, s in sorted(types.items()))
        apart = []
        names = sorted(types)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ca, cb = types[a].get("primary_change_ci"), types[b].get("primary_change_ci")
                if not _missing(ca) and not _missing(cb) and (ca[0] > cb[1] or cb[0] > ca[1]):
                    high, low = (a, b) if ca[0] > cb[1] else (b, a)
                    apart.append(f"{high} above {low}")
        decided |= bool(apart)
        parts.append(f"{_label(paradigm)}: {cells or 'fewer than two types with two tasks'}; "
                     + (f"it matters ({'; '.join(apart)})" if apart else "no pair of types apart (intervals overlap)"))
    return {"rule": rule, "verdict": "answered" if decided else "inconclusive",
            "answer": ("" if decided else "inconclusive: ") + ". ".join(parts) + "."}


def _rq4(report):
    rule = ("per paradigm, the spread (standard deviation) of the clinical-group mean changes and the count of "
            "significant drops: AU is more stable than CG when the interval of (AU spread - CG spread) lies "
            "below 0 and AU has no more significant drops than CG (and the reverse for CG)")
    comparisons = report["comparisons"]
    if "au" not in comparisons or "cg" not in comparisons:
        return {"rule": rule, "verdict": "inconclusive", "answer": "inconclusive: needs both a CG and an AU run."}
    spread_au = comparisons["au"].get("group_spread")
    spread_cg = comparisons["cg"].get("group_spread")
    difference = comparisons.get("au_minus_cg_spread")
    overall = report["averages"]["overall"].get("all", {})
    drops_au = overall.get("au", {}).get("significant_drops", 0)
    drops_cg = overall.get("cg", {}).get("significant_drops", 0)
    if not (spread_au and spread_cg and difference):
        return {"rule": rule, "verdict": "inconclusive",
                "answer": f"inconclusive: fewer than two clinical groups "
                          f"(significant drops: AU {drops_au}, CG {drops_cg})."}
    sign = _excludes_zero(difference["ci"])
    facts = (f"spread of the group means AU {_pct(spread_au['value'])} {_ci(spread_au['ci'])}, CG "
             f"{_pct(spread_cg['value'])} {_ci(spread_cg['ci'])}; AU - CG {_pct(difference['value'])} "
             f"{_ci(difference['ci'])}; significant drops AU {drops_au}, CG {drops_cg}")
    if sign < 0 and drops_au <= drops_cg:
        return {"rule": rule, "verdict": "answered", "answer": f"AU is more stable than CG: {facts}."}
    if sign > 0 and drops_cg <= drops_au:
        return {"rule": rule, "verdict": "answered", "answer": f"CG is more stable than AU: {facts}."}
    return {"rule": rule, "verdict": "inconclusive", "answer": f"inconclusive: {facts}."}


def _rq5(report, aggregated, answered):
    rule = ("per clinical group, recommend the aggregated paradigm with the highest mean change whose group "
            "interval lies above 0 and which has no significant drop in the group; if none helps significantly but "
            "one has no significant drop, aggregation is safe but not shown to help; tasks with a significant drop "
            "under every aggregated paradigm keep their own model (TS)")
    lines = []
    for group, per_paradigm in sorted(report["averages"]["by_group"].items()):
        candidates = [(per_paradigm[p]["primary_change_vs_ts"], p) for p in aggregated
                      if p in per_paradigm and _excludes_zero(per_paradigm[p].get("primary_change_ci")) > 0
                      and per_paradigm[p].get("significant_drops", 0) == 0]
        safe = [p for p in aggregated if p in per_paradigm and per_paradigm[p].get("significant_drops", 0) == 0]
        if candidates:
            value, best = max(candidates)
            lines.append(f"{group}: train {_label(best)} ({_pct(value)}, "
                         f"{_ci(per_paradigm[best].get('primary_change_ci'))})")
        elif safe:
            lines.append(f"{group}: no significant loss under {' or '.join(_label(p) for p in safe)}, and no "
                         f"significant gain: either, or TS")
        else:
            lines.append(f"{group}: every aggregated paradigm drops a task significantly; see RQ1")
    keep_ts = [t for t, task in report["tasks"].items()
               if all(task["paradigms"].get(p, {}).get("transfer") == "negative" for p in aggregated)]
    scale = answered["RQ2"]
    text = "; ".join(lines) + "."
    if keep_ts:
        text += f" Keep a task-specific model for: {', '.join(keep_ts)}."
    text += (f" Data scale: {scale['answer']}" if scale["verdict"] == "answered"
             else " Data scale: no guideline (RQ2 is inconclusive).")
    decided = any(not line.endswith("either, or TS") for line in lines) or bool(keep_ts)
    return {"rule": rule, "verdict": "answered" if decided else "inconclusive", "answer": text}
