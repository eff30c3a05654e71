"""The study's five questions (arXiv 2603.18123), answered from the report's tables by rules.

`answers(report)` reads only what report.json holds, so the answers can be recomputed from the
file. Each answer is {"question", "rule", "verdict", "answer"}: verdict "answered" or
"inconclusive" (then the answer says why: one training seed, tests not significant after the
correction, too few tasks, no intervals).

Which evidence each question rests on:
- RQ1 (which tasks train together without loss) and RQ5 (guidelines per group) are claims
  about single tasks: the per-task non-inferiority and change tests, corrected. They need the
  variance between training runs: with one seed they are "inconclusive: one training seed".
- RQ2 (scale), RQ3 (type) and RQ4 (stability) are claims about tasks: tests over tasks
  (tasklevel.py), corrected as their own family. The spread between tasks they test against
  holds each task's noise, the seeds' included, so they stand with one seed too.
"""
from __future__ import annotations

import math
import re

from m2dino.evaluation.report.change import UNTESTED, Change
from m2dino.evaluation.report.compute import CONTROL, REFERENCES
from m2dino.evaluation.report.design import KEEP_TS
from m2dino.evaluation.report.tasklevel import find_test
from m2dino.paradigms import label

QUESTIONS = {
    "RQ1": "Which tasks can be trained together without loss?",
    "RQ2": "How does training-data scale drive positive or negative transfer under CG and AU?",
    "RQ3": "Does the task type matter?",
    "RQ4": "Is AU more stable than CG?",
    "RQ5": "Practical guidelines",
}
ONE_SEED = "inconclusive: one training seed"
STAR = label(CONTROL)
CONTROL_RULE = (f"with the converged-TS control, each question is answered again by the same rule against {STAR}: "
                f"'holds against {STAR}' when that answer reaches the same conclusions (its words, numbers aside), "
                "'only against TS' when it does not, 'inconclusive' when the answer against TS is inconclusive")


def answers(report: dict) -> dict:
    out = _answers(report, "ts")
    against = report.get("against") or {}
    if CONTROL in against and "ts" in against:
        against_control = _answers(report, CONTROL)
        for rq, item in out.items():
            other = against_control[rq]
            if item["verdict"] != "answered":
                survives = "inconclusive"
            elif other["verdict"] == "answered" and _conclusions(other["answer"]) == _conclusions(item["answer"]):
                survives = f"holds against {STAR}"
            else:
                survives = "only against TS"
            item.update(control=survives, control_answer=other["answer"], control_rule=CONTROL_RULE)
    return out


def _conclusions(answer: str) -> str:
    """An answer's words without its numbers and intervals: what it concludes."""
    return re.sub(r"\[[^\]]*\]|[-+]?\d+(\.\d+)?(e[-+]?\d+)?%?", "", answer)


def _answers(report: dict, reference: str) -> dict:
    view = (report.get("against") or {}).get(reference)
    aggregated = [p for p in (view or {}).get("compared", []) if p not in REFERENCES]
    if view is None or not aggregated:
        why = "inconclusive: the questions compare CG and AU against TS; this report lacks TS or both of them"
        return {rq: {"question": q, "rule": "-", "verdict": "inconclusive", "answer": why}
                for rq, q in QUESTIONS.items()}
    context = _Context(report, view, aggregated)
    out = {"RQ1": _rq1(context), "RQ2": _rq2(context), "RQ3": _rq3(context), "RQ4": _rq4(context)}
    out["RQ5"] = _rq5(context, out["RQ2"])
    return {rq: {"question": question, **out[rq]} for rq, question in QUESTIONS.items()}


class _Context:
    """What the rules read: the view against one reference, its changes as records."""

    def __init__(self, report: dict, view: dict, aggregated: list[str]):
        self.report, self.view, self.aggregated = report, view, aggregated
        self.reference = label(view["reference"])
        self.changes = {t: {p: Change.from_json(p, data) for p, data in per_task.items()}
                        for t, per_task in view["tasks"].items()}
        self.tasks = report["tasks"]
        self.tests = view["task_level_tests"]
        self.one_seed = report["settings"].get("n_seeds", 1) < 2
        self.alpha = report["settings"].get("alpha", 0.05)

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for task_id in self.changes:
            out.setdefault(self.tasks[task_id]["group"], []).append(task_id)
        return dict(sorted(out.items()))

    def overall(self, paradigm: str) -> dict:
        return self.view["averages"].get("overall", {}).get("all", {}).get(paradigm, {})


def _pct(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}%"


def _p(entry: dict | None) -> str:
    if not entry or entry.get("p") is None:
        return "not tested" + (f" ({entry['note']})" if entry and entry.get("note") else "")
    return f"p = {entry['p']:.3g}, adjusted {entry['p_adjusted']:.3g}"


def _tested_loss(change: Change) -> bool:
    """A significant loss that a test showed (a flag of the threshold alone is no evidence)."""
    return change.transfer == "negative" and change.method != UNTESTED


def _significant(entry: dict | None) -> bool:
    return bool(entry and entry.get("significant"))


def _margins(context: _Context) -> str:
    margins = context.report["settings"].get("non_inferiority_margins", {})
    used = sorted({c.metric for per_task in context.changes.values() for c in per_task.values()})
    return ", ".join(f"{m} {margins[m]:g}" for m in used if m in margins)



def _answer(rule: str, decided: bool, text: str, undecided: str = "inconclusive: ") -> dict:
    """An answer: answered when some test decided it, else inconclusive (and its text says so)."""
    return {"rule": rule, "verdict": "answered" if decided else "inconclusive",
            "answer": ("" if decided else undecided) + text}

def _rq1(context: _Context) -> dict:
    rule = (f"a task trains together with others without loss under a paradigm when non-inferiority to "
            f"{context.reference} is shown: the effect (metric units) is significantly above -margin (margins: "
            f"{_margins(context)}), one-sided, after the correction; a significant loss is the change test's; "
            f"otherwise undecided")
    parts, decided = [], False
    for group, members in context.groups().items():
        cells = []
        for paradigm in context.aggregated:
            found = {t: context.changes[t][paradigm] for t in members if paradigm in context.changes[t]}
            shown = [t for t, c in found.items() if c.non_inferior]
            losses = [t for t, c in found.items() if _tested_loss(c)]
            decided |= bool(shown or losses)
            cell = f"{label(paradigm)} {len(shown)}/{len(found)} non-inferior"
            if losses:
                cell += f" (losses: {', '.join(losses)})"
            cells.append(cell)
        parts.append(f"{group}: " + "; ".join(cells))
    answer = "Tasks shown non-inferior, per clinical group: " + ". ".join(parts) + "."
    tested = any(c.non_inferior is not None for per_task in context.changes.values() for c in per_task.values())
    if context.one_seed:
        return {"rule": rule, "verdict": "inconclusive", "answer": f"{ONE_SEED} (a task's loss or its absence is a "
                f"claim about training runs; one run per paradigm cannot show it). {answer}"}
    if not tested:
        return {"rule": rule, "verdict": "inconclusive",
                "answer": "inconclusive: no change could be tested (no intervals). " + answer}
    return _answer(rule, decided, answer, undecided="inconclusive: nothing shown either way. ")


def _rq2(context: _Context) -> dict:
    rule = ("over the tasks not at chance, the gap share against each task's training size: scale drives transfer "
            "under a paradigm when both Spearman's rank correlation with log(train size) (permutation test over "
            "tasks) and the mixed model's log(train size) slope (clinical group as a random effect; a fit that "
            "converged) are significant after the correction, with the same sign; the data-scarce / data-rich split "
            "is descriptive only")
    parts, decided = [], False
    for paradigm in context.aggregated:
        rho = find_test(context.tests, "RQ2", "spearman_log_train_size", paradigm)
        slope = find_test(context.tests, "RQ2", "mixedlm_log_train_size", paradigm)
        group = find_test(context.tests, "RQ2", "spearman_log_group_size", paradigm)
        if rho is None or rho.get("statistic") is None:
            parts.append(f"{label(paradigm)}: {_p(rho)}")
            continue
        agree = bool(_significant(rho) and _significant(slope) and slope.get("converged")
                     and math.copysign(1, rho["statistic"]) == math.copysign(1, slope["slope"]))
        decided |= agree
        verdict = ("no relation shown" if not agree else
                   "data-scarce tasks gain more" if rho["statistic"] < 0 else "data-rich tasks gain more")
        split = context.view["comparisons"].get(paradigm, {}).get("scarce_minus_rich")
        described = (f"; data-scarce minus data-rich (descriptive): mean {_pct(split['value'])}, median "
                     f"{_pct(split['median_difference'])}" if split else "")
        slope_text = (f"mixed-model slope {_pct(slope['slope'])} per log unit ({_p(slope)})"
                      if slope and slope.get("slope") is not None else f"mixed model {_p(slope)}")
        group_text = (f"; with log(group size) rho {group['statistic']:+.2f} ({_p(group)})"
                      if group and group.get("statistic") is not None else "")
        parts.append(f"{label(paradigm)}: rho {rho['statistic']:+.2f} over {rho['n_tasks']} tasks ({_p(rho)}), "
                     f"{slope_text}: {verdict}{group_text}{described}")
    return _answer(rule, decided, ". ".join(parts) + ".")


def _rq3(context: _Context) -> dict:
    rule = ("over the tasks not at chance, the gap share by task type (types with at least two tasks): the type "
            "matters under a paradigm when the Kruskal-Wallis permutation test over tasks is significant after "
            "the correction")
    parts, decided = [], False
    for paradigm in context.aggregated:
        test = find_test(context.tests, "RQ3", "kruskal_task_type", paradigm)
        if test is None or test.get("p") is None:
            parts.append(f"{label(paradigm)}: {_p(test)}")
            continue
        medians = ", ".join(f"{t} {_pct(v)}" for t, v in test.get("medians", {}).items())
        decided |= _significant(test)
        parts.append(f"{label(paradigm)}: median gap share {medians}; H = {test['statistic']:.2f} over "
                     f"{test['n_tasks']} tasks ({_p(test)}): "
                     + ("the type matters" if _significant(test) else "no difference between types shown"))
    return _answer(rule, decided, ". ".join(parts) + ".")


def _rq4(context: _Context) -> dict:
    rule = ("stability is the spread of the gap share over the tasks (interquartile range): AU is more stable than "
            "CG when the paired permutation test over tasks finds AU's spread smaller, significant after the "
            "correction, and AU has no more significant per-task losses than CG (and the reverse for CG)")
    test = find_test(context.tests, "RQ4", "paired_permutation_iqr", "au-cg")
    if test is None:
        return {"rule": rule, "verdict": "inconclusive", "answer": "inconclusive: needs both a CG and an AU run."}
    drops = {p: context.overall(p).get("significant_drops", 0) for p in ("au", "cg")}
    if test.get("p") is None:
        return {"rule": rule, "verdict": "inconclusive",
                "answer": f"inconclusive: {_p(test)} (significant losses: AU {drops['au']}, CG {drops['cg']})."}
    facts = (f"interquartile range of the gap share over {test['n_tasks']} tasks AU {_pct(test['iqr']['au'])}, CG "
             f"{_pct(test['iqr']['cg'])}; AU - CG {_pct(test['statistic'])} ({_p(test)}); significant losses AU "
             f"{drops['au']}, CG {drops['cg']}")
    if _significant(test) and test["statistic"] < 0 and drops["au"] <= drops["cg"]:
        return {"rule": rule, "verdict": "answered", "answer": f"AU is more stable than CG: {facts}."}
    if _significant(test) and test["statistic"] > 0 and drops["cg"] <= drops["au"]:
        return {"rule": rule, "verdict": "answered", "answer": f"CG is more stable than AU: {facts}."}
    return {"rule": rule, "verdict": "inconclusive", "answer": f"inconclusive: {facts}."}


def _rq5(context: _Context, scale: dict) -> dict:
    rule = ("per clinical group, recommend the aggregated paradigm under which every task of the group is shown "
            "non-inferior and at least one gains significantly (the highest median gap share among them); when "
            "every task is non-inferior but none gains, aggregation is safe but not shown to help; tasks with a "
            "significant loss under every aggregated paradigm keep their own model (TS); otherwise undecided")
    lines, decided = [], False
    for group, members in context.groups().items():
        helps, safe, unshown = [], [], {}
        for paradigm in context.aggregated:
            found = [context.changes[t][paradigm] for t in members if paradigm in context.changes[t]]
            if not found:
                continue
            if all(c.non_inferior for c in found):
                gains = sum(c.transfer == "positive" for c in found)
                share = context.view["averages"]["by_group"].get(group, {}).get(paradigm, {}).get("gap_share")
                (helps if gains else safe).append((share["median"] if share else -math.inf, paradigm, gains,
                                                   len(found)))
            else:
                unshown[paradigm] = [t for t in members if paradigm in context.changes[t]
                                     and not context.changes[t][paradigm].non_inferior]
        if helps:
            median, best, gains, n = max(helps)
            lines.append(f"{group}: train {label(best)} (every task non-inferior, {gains} of {n} gain significantly, "
                         f"median gap share {_pct(median)})")
        elif safe:
            lines.append(f"{group}: no loss under {' or '.join(label(p) for _, p, _, _ in safe)} and no significant "
                         f"gain: either, or TS")
        else:
            lines.append(f"{group}: undecided (non-inferiority not shown: "
                         + "; ".join(f"{label(p)} {', '.join(t)}" for p, t in unshown.items()) + ")")
        decided |= bool(helps or safe)
    keep_ts = [t for t, per_task in context.changes.items()
               if per_task and all(p in per_task and _tested_loss(per_task[p]) for p in context.aggregated)]
    text = "; ".join(lines) + "."
    if keep_ts:
        text += f" {KEEP_TS}{', '.join(keep_ts)}."
    text += (f" Data scale: {scale['answer']}" if scale["verdict"] == "answered"
             else " Data scale: no guideline (RQ2 is inconclusive).")
    if context.one_seed:
        return {"rule": rule, "verdict": "inconclusive", "answer": f"{ONE_SEED} (the guidelines rest on per-task "
                f"non-inferiority). {text}"}
    decided |= bool(keep_ts)
    return _answer(rule, decided, text)
