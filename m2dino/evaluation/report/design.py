"""Designed vs measured transfer: on the synthetic suite, whose design.json declares which tasks
transfer to which (m2dino.data.synthetic.design), the study's measured changes read against
that known truth.

Per designed relation (a task pair the design calls `positive` or `conflict`, both tasks in
the run) and per aggregated paradigm that trains the pair in one model (CG when the run's
clinical groups put both tasks in one model, AU always), the relation is tested on the
per-task changes against TS the report already made (change.py: t over seeds, or with one seed
a permutation over images):

* Designed direction: positive -> the tasks gain, conflict -> the tasks lose.
* A task's one-sided p in a direction is half its two-sided p when the effect points that way,
  else 1 - half (exact for the t-test; the permutation test's null is symmetric).
* The relation's p in a direction: at least one of its k tasks moves that way, Bonferroni over
  them: min(1, k * the smallest one-sided p). A data-rich task whose TS is saturated cannot gain,
  so requiring both tasks would test saturation, not transfer.
* Both directions' p-values join the report's per-task family and are adjusted with it.
* Verdict: `contradicted` when the opposite direction's adjusted p is at most alpha (a task
  moved against the design, whatever the other did); else `recovered` when the designed
  direction's is; `missed` otherwise; `untested` when a task's change had no test. So a pair
  where one task gains and the other loses significantly is never called recovered. Under CG
  the change of a task is that of training with its whole group, so a pair's verdict is the
  pair's alone only where its group is the pair.

Groups are rows too (their designed relation and their tasks' changes), with no test of their
own: a group's verdicts are its pairs'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from m2dino.evaluation.report.change import UNTESTED, Change
from m2dino.paradigms import label

# The designed direction of each relation that the design expects to move a task
DIRECTION = {"positive": 1, "conflict": -1}
EXPECTED = {1: "gain", -1: "loss"}
AGGREGATED = ("cg", "au")
VERDICTS = ("recovered", "missed", "contradicted", "untested")
VERDICT_RULE = (
    "per designed pair and per paradigm that trains both tasks in one model (CG when the run's groups put them "
    "together, AU always), from the tasks' changes against TS in the metric's units: a task's one-sided p is half "
    "its two-sided p when the effect points that way, else 1 minus half; the pair moves in a direction when at least "
    "one of its tasks does, Bonferroni over its tasks (min(1, k x the smallest one-sided p)); both directions' "
    "p-values join the per-task family of the correction. recovered: the designed direction (positive: gain, "
    "conflict: loss) is significant after the correction and the opposite is not; contradicted: the opposite "
    "direction is significant (a task moved against the design, whatever the other did); missed: neither; "
    "untested: a task's change had no test. Under CG a task's change is that of "
    "training with its whole clinical group, so a pair's verdict is the pair's alone only where the group is the pair")
ONE_SEED_CAVEAT = (
    "one training seed: the tests cover the validation images only, so a verdict says what these trained models do "
    "on these images; the design's claims are about training runs (transfer is what a paradigm does on average over "
    "seeds), which one seed cannot support: a recovered or contradicted relation may be one seed's accident and a "
    "missed one may be one seed's bad luck; rerun with --seeds")


@dataclass
class OneSided:
    """One p-value of the family: a relation's test in one direction."""
    p: float | None
    p_adjusted: float | None = None


@dataclass
class RelationTest:
    """A designed relation under one paradigm: its tasks' changes and its two directions' tests."""
    paradigm: str
    direction: int                                 # +1: designed gain, -1: designed loss
    changes: dict                                  # task -> Change against TS
    designed: OneSided = field(default_factory=lambda: OneSided(None))
    opposite: OneSided = field(default_factory=lambda: OneSided(None))

    def test(self) -> None:
        """The raw p-values of both directions (before the correction)."""
        if any(c.method == UNTESTED or c.p is None or not math.isfinite(c.units) for c in self.changes.values()):
            return
        k = len(self.changes)
        for sided, sign in ((self.designed, self.direction), (self.opposite, -self.direction)):
            sided.p = min(1.0, k * min(one_sided_p(c, sign) for c in self.changes.values()))

    def verdict(self, alpha: float) -> str:
        if self.designed.p_adjusted is None:
            return "untested"
        if self.opposite.p_adjusted is not None and self.opposite.p_adjusted <= alpha:
            return "contradicted"  # against the design, even when the other task moved its way
        if self.designed.p_adjusted <= alpha:
            return "recovered"
        return "missed"

    def to_json(self, alpha: float) -> dict:
        return {"together": True, "verdict": self.verdict(alpha),
                "p_designed": self.designed.p, "p_designed_adjusted": self.designed.p_adjusted,
                "p_opposite": self.opposite.p, "p_opposite_adjusted": self.opposite.p_adjusted,
                "tasks": {t: _change_json(c) for t, c in self.changes.items()}}


def one_sided_p(change: Change, sign: int) -> float:
    """The one-sided p of the change pointing in direction `sign` (+1 gain, -1 loss), from its
    two-sided p: half when the effect points that way, else 1 - half."""
    half = change.p / 2
    return half if change.units * sign > 0 else 1.0 - half


def _change_json(change: Change) -> dict:
    return {"metric": change.metric, "effect_units": change.units, "ci": change.units_ci, "p": change.p,
            "p_adjusted": change.p_adjusted, "method": change.method, "n_seeds": change.n_seeds}


# ------------------------------------------------------------------------------ finding the design
def find_design(configs: dict):
    """The design of the runs' data (m2dino.data.synthetic.design.Design), None when the data is
    not the synthetic suite (no design.json at config.yaml's data_root) or the runs record none."""
    from m2dino.data.synthetic.design import find_design as design_file
    from m2dino.data.synthetic.design import load_design

    for config in configs.values():
        root = config.get("data_root")
        if root and Path(root).exists() and design_file(root) is not None:
            return load_design(root)
    return None


# ------------------------------------------------------------------------------ the relations and their tests
class DesignedTransfer:
    """The designed relations among the run's tasks and their tests against TS.

    design: the suite's Design; tasks_out: the report's tasks (group, and per paradigm the model
    that trained the task). `tests(against)` makes the tests from the per-task changes (called
    before the correction; returns the OneSided p-values to adjust with the per-task family);
    `to_json(alpha)` is report.json's `designed_transfer` once they are adjusted."""

    def __init__(self, design, tasks_out: dict):
        self.design, self.tasks_out = design, tasks_out
        present = set(tasks_out)
        self.pairs = [p for p in design.pairs if p["relation"] in DIRECTION and set(p["tasks"]) <= present]
        self.groups = {name: [t for t in g["tasks"] if t in present] for name, g in design.groups.items()}
        self.groups = {name: tasks for name, tasks in self.groups.items() if len(tasks) >= 2}
        self.measured: dict = {}  # (pair index, paradigm) -> RelationTest
        self.changes: dict = {}   # task -> paradigm -> Change against TS

    def together(self, tasks, paradigm: str) -> bool:
        """Whether one model of the paradigm trained every one of the tasks."""
        models = {self.tasks_out[t]["paradigms"].get(paradigm, {}).get("model") for t in tasks}
        return len(models) == 1 and None not in models

    def tests(self, against: dict) -> list[OneSided]:
        view = against.get("ts")
        if view is None:
            return []
        self.changes = view["changes"]
        for i, pair in enumerate(self.pairs):
            for paradigm in AGGREGATED:
                if not (self.together(pair["tasks"], paradigm)
                        and all(paradigm in self.changes.get(t, {}) for t in pair["tasks"])):
                    continue
                relation = RelationTest(paradigm, DIRECTION[pair["relation"]],
                                        {t: self.changes[t][paradigm] for t in pair["tasks"]})
                relation.test()
                self.measured[(i, paradigm)] = relation
        return [s for r in self.measured.values() for s in (r.designed, r.opposite)]

    def to_json(self, alpha: float) -> list[dict]:
        out = []
        for name, tasks in self.groups.items():
            group = self.design.groups[name]
            out.append({"level": "group", "group": name, "tasks": tasks, "relation": group["relation"],
                        "factor": ", ".join(sorted({f for p in self.pairs if p["group"] == name for f in p["factors"]}))
                        or None,
                        "expected": None, "pairs": [p["tasks"] for p in self.pairs if p["group"] == name],
                        "paradigms": {paradigm: {"together": self.together(tasks, paradigm),
                                                 "tasks": {t: _change_json(self.changes[t][paradigm]) for t in tasks
                                                           if paradigm in self.changes.get(t, {})}}
                                      for paradigm in AGGREGATED}})
        for i, pair in enumerate(self.pairs):
            out.append({"level": "pair", "group": pair["group"], "tasks": pair["tasks"], "relation": pair["relation"],
                        "factor": _factor(pair), "factors": pair["factors"],
                        "expected": EXPECTED[DIRECTION[pair["relation"]]],
                        "paradigms": {paradigm: (self.measured[(i, paradigm)].to_json(alpha)
                                                 if (i, paradigm) in self.measured
                                                 else {"together": False, "verdict": None})
                                      for paradigm in AGGREGATED}})
        return out


def _factor(pair: dict) -> str:
    """The factor behind a pair, in words: the shared factor(s), or a conflict's variable and cues."""
    if pair["relation"] == "conflict":
        cues = " vs ".join(c["cue"] for c in pair["conflicting"])
        return f"{pair.get('variable') or 'one variable'}: {cues}"
    return ", ".join(pair["factors"])


def settings(n_seeds: int) -> dict:
    """What the report states about the section: the verdict rule, and with one seed what it cannot support."""
    return {"verdict_rule": VERDICT_RULE, "caveat": ONE_SEED_CAVEAT if n_seeds < 2 else None}


# ------------------------------------------------------------------------------ the answers read against it
KEEP_TS = "Keep a task-specific model for: "  # RQ5's tasks that keep TS (answers.py writes it)


def _guideline_reading(group: str, tasks: list[str], guideline: dict) -> str:
    """What RQ5's guideline for a group holding a designed conflict (a predicted loss) says of
    the design, from answers.py's wording: "<group>: train <paradigm>", "<group>: no loss
    under ...", "<group>: undecided", and the tasks it keeps on TS. Not recommending aggregation
    agrees with the design only when a loss is shown; for want of evidence it is no evidence."""
    answer = guideline.get("answer", "")
    kept = answer.split(KEEP_TS, 1)[1].split(".", 1)[0].split(", ") if KEEP_TS in answer else []
    if f"{group}: train " in answer:
        return "recommends aggregating it: disagrees with the design"
    if guideline.get("verdict") != "answered":
        return "is inconclusive, so the design has nothing to check it against"
    if set(tasks) & set(kept):
        return (f"keeps a task-specific model for {', '.join(sorted(set(tasks) & set(kept)))} (a loss shown): "
                f"agrees with the design")
    if f"{group}: no loss under " in answer:
        return "finds no loss in aggregating it: disagrees with the design, which predicts one"
    return ("does not recommend aggregating it, but only for want of evidence (undecided: no loss and no "
            "non-inferiority shown): neither agrees nor disagrees with the design")
def read_answers(report: dict) -> dict:
    """{RQ: one sentence saying whether the designed truth agrees with the answer}; {} when the
    report has no designed relations."""
    relations = report.get("designed_transfer")
    if not relations:
        return {}
    pairs = [r for r in relations if r["level"] == "pair"]
    tested = [(r, p, r["paradigms"][p]) for r in pairs for p in AGGREGATED if r["paradigms"][p].get("together")]

    def tally(relation: str, paradigm: str | None = None, cross_group: bool | None = None) -> str:
        chosen = [v["verdict"] for r, p, v in tested if r["relation"] == relation and paradigm in (None, p)
                  and (cross_group is None or (r["group"] is None) == cross_group)]
        return (", ".join(f"{chosen.count(v)} {v}" for v in VERDICTS if chosen.count(v)) or "none tested")

    out = {}
    conflicts = [(r, p, v) for r, p, v in tested if r["relation"] == "conflict"]
    rq1 = []
    for r, p, v in conflicts:
        shown = [report["tasks"][t]["paradigms"][p].get("non_inferiority", {}).get("shown") for t in r["tasks"]]
        truth = ("agrees: a loss is shown" if v["verdict"] == "recovered" else
                 "disagrees: both are shown non-inferior, which the design rules out" if all(shown) else
                 "neither agrees nor disagrees: no loss and no non-inferiority shown for both")
        rq1.append(f"the designed conflict {' / '.join(r['tasks'])} ({r['factor']}) under {label(p)}: {truth}")
    out["RQ1"] = ("Read against the design: " + "; ".join(rq1) + "." if rq1 else
                  f"Read against the design: no designed conflict is trained together here; designed positive "
                  f"pairs: {tally('positive')}.")
    out["RQ2"] = (f"Read against the design: the design declares relations, not a law of data scale; its positive "
                  f"pairs under CG: {tally('positive', 'cg')}; under AU: {tally('positive', 'au')}, so a scale "
                  f"answer is the design's only as far as those relations are recovered.")
    out["RQ3"] = ("Read against the design: the design declares relations by latent factor, not by task type, so a "
                  "difference between task types found here is not designed (it comes from the heads, losses or "
                  "metrics).")
    out["RQ4"] = (f"Read against the design: AU holds what CG cannot, the designed positive pairs across groups "
                  f"({tally('positive', 'au', cross_group=True)} under AU), and every conflict CG holds "
                  f"(under CG: {tally('conflict', 'cg')}; under AU: {tally('conflict', 'au')}); the design says "
                  f"nothing of stability itself.")
    guideline = (report.get("answers") or {}).get("RQ5") or {}
    rq5 = []
    for name in sorted({r["group"] for r, _, _ in conflicts if r["group"]}):
        tasks = sorted({t for r, _, _ in conflicts if r["group"] == name for t in r["tasks"]})
        rq5.append(f"{name} holds a designed conflict and the guideline "
                   f"{_guideline_reading(name, tasks, guideline)}")
    out["RQ5"] = ("Read against the design: " + "; ".join(rq5) + "." if rq5 else
                  "Read against the design: no group with a designed conflict is in the run, so the design has no "
                  "guideline to check.")
    return out


__all__ = ["AGGREGATED", "DesignedTransfer", "OneSided", "RelationTest", "VERDICTS", "VERDICT_RULE", "find_design",
           "one_sided_p", "read_answers", "settings"]
