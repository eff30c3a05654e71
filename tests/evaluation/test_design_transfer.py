"""The report's "designed vs measured transfer" (m2dino/evaluation/report/design.py) on
hand-built studies (conftest.simulate_study) with a hand-built design: a planted gain of a
designed positive pair and a planted loss of a designed conflict are recovered, an effect
against the design is called contradicted, and with no effect the verdicts other than
"missed" stay at the nominal rate."""
import json
import math

import numpy as np
import pytest

from m2dino.data.synthetic.design import SCHEMA_VERSION, Design
from m2dino.evaluation.report import build_report, write_report
from m2dino.evaluation.report.change import DEFAULT_MARGINS, Change
from m2dino.evaluation.report.compute import analyse, per_task_tests
from m2dino.evaluation.report.design import DesignedTransfer, OneSided, RelationTest, one_sided_p

ALPHA = 0.05
PARADIGMS = ["ts", "cg", "au"]
# simulate_study puts task i in group G(i % 4): G0 = t00, t04; G1 = t01, t05; G2 = t02, t06; G3 = t03, t07
N_TASKS, POSITIVE, CONFLICT = 8, ("t00", "t04"), ("t01", "t05")
FIVE_SEEDS = (0, 1, 2, 3, 4)  # the power of a t-test over 3 seeds (2 degrees of freedom) is low


def design_data() -> dict:
    tasks = [f"t{i:02d}" for i in range(N_TASKS)]
    group = {t: f"G{i % 4}" for i, t in enumerate(tasks)}
    pairs = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            relation = "positive" if {a, b} == set(POSITIVE) else "conflict" if {a, b} == set(CONFLICT) else "none"
            pairs.append({"tasks": [a, b], "group": group[a] if group[a] == group[b] else None, "relation": relation,
                          "factors": ["shape"] if relation == "positive" else ["cue_a", "cue_b"] if relation ==
                          "conflict" else [], "variable": "grade" if relation == "conflict" else None,
                          "conflicting": [{"cue": "cue_a", "read_by": a, "ignored_by": b},
                                          {"cue": "cue_b", "read_by": b, "ignored_by": a}] if relation == "conflict"
                          else []})
    groups = {g: {"tasks": [t for t in tasks if group[t] == g],
                  "relation": {"G0": "positive", "G1": "conflict"}.get(g, "none")} for g in ("G0", "G1", "G2", "G3")}
    return {"schema_version": SCHEMA_VERSION, "factors": {}, "tasks": {t: {"group": group[t]} for t in tasks},
            "groups": groups, "pairs": pairs}


def planted(gain: float, loss: float):
    """A shift of the latent quality under CG and AU: +gain on the positive pair, -loss on the conflict."""
    def effect(paradigm, i, size, task_type):
        if paradigm == "ts":
            return 0.0
        return gain if f"t{i:02d}" in POSITIVE else -loss if f"t{i:02d}" in CONFLICT else 0.0
    return effect


def verdicts(study, n_resamples=0) -> dict:
    """{(pair, paradigm): verdict} of the study read against the design (per_task_tests and the
    relations' tests adjusted as one family, as the report does)."""
    tasks_out = {t.task_id: {"paradigms": {p: {"model": study.model(p, t)} for p in PARADIGMS}} for t in study.tasks}
    relations = DesignedTransfer(Design(None, design_data()), tasks_out)
    per_task_tests(study.task_runs(n_resamples), PARADIGMS, DEFAULT_MARGINS, more_tests=relations.tests)
    return {(tuple(r["tasks"]), p): r["paradigms"][p]["verdict"] for r in relations.to_json(ALPHA)
            if r["level"] == "pair" for p in ("cg", "au")}


def test_one_sided_p_halves_the_two_sided_p_in_the_effect_s_direction():
    change = Change("cg", "ts", "dice", 0.1, None, {}, p=0.04)
    assert one_sided_p(change, +1) == pytest.approx(0.02)
    assert one_sided_p(change, -1) == pytest.approx(0.98)


def test_a_planted_positive_and_a_planted_conflict_are_recovered(simulate):
    rng = np.random.default_rng(11)
    found = [verdicts(simulate(rng, n_tasks=N_TASKS, seeds=FIVE_SEEDS, effect=planted(0.15, 0.15)))
             for _ in range(10)]
    for pair in (POSITIVE, CONFLICT):
        for paradigm in ("cg", "au"):
            hits = [f[pair, paradigm] == "recovered" for f in found]
            assert np.mean(hits) >= 0.8, f"{pair} under {paradigm}: recovered in {sum(hits)}/10"


def test_an_effect_against_the_design_is_contradicted_never_recovered(simulate):
    rng = np.random.default_rng(12)
    found = [verdicts(simulate(rng, n_tasks=N_TASKS, seeds=FIVE_SEEDS, effect=planted(-0.15, -0.15)))
             for _ in range(10)]
    for pair in (POSITIVE, CONFLICT):
        seen = [f[pair, "au"] for f in found]
        assert "recovered" not in seen and seen.count("contradicted") >= 8, seen


def test_a_pair_whose_tasks_move_apart_is_contradicted_never_recovered(simulate):
    """One task of the designed positive pair gains and the other loses, both clearly: the design
    (both gain) is not what happened, so the pair is contradicted, not recovered by its gaining task."""
    def apart(paradigm, i, size, task_type):
        if paradigm == "ts":
            return 0.0
        return {POSITIVE[0]: 0.3, POSITIVE[1]: -0.3}.get(f"t{i:02d}", 0.0)

    rng = np.random.default_rng(14)
    found = [verdicts(simulate(rng, n_tasks=N_TASKS, seeds=FIVE_SEEDS, effect=apart)) for _ in range(10)]
    for paradigm in ("cg", "au"):
        seen = [f[POSITIVE, paradigm] for f in found]
        assert seen.count("contradicted") >= 9, seen
    # the rule itself: both directions significant is contradicted, whichever p is smaller
    relation = RelationTest("au", +1, {}, OneSided(0.01, 0.001), OneSided(0.04, 0.04))
    assert relation.verdict(ALPHA) == "contradicted"
    relation.opposite = OneSided(0.2, 0.2)
    assert relation.verdict(ALPHA) == "recovered"


@pytest.mark.parametrize("seeds, sigma_seed, n_resamples, n_studies", [((0, 1, 2), 0.04, 0, 200),
                                                                       ((0,), 0.0, 200, 60)],
                         ids=["t-over-3-seeds", "permutation-one-seed"])
def test_no_effect_is_missed_but_at_the_nominal_rate(simulate, seeds, sigma_seed, n_resamples, n_studies):
    """Under the null (no paradigm differs) a relation is called recovered or contradicted in at
    most alpha of the studies, within three Monte-Carlo standard errors."""
    rng = np.random.default_rng(13)
    called = []
    for _ in range(n_studies):
        found = verdicts(simulate(rng, n_tasks=N_TASKS, seeds=seeds, sigma_seed=sigma_seed), n_resamples)
        assert set(found.values()) <= {"recovered", "missed", "contradicted"}
        called += [v != "missed" for v in found.values()]
    rate, n = np.mean(called), len(called)
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n), f"called in {sum(called)}/{n}"


def test_report_has_the_section_only_on_the_synthetic_suite(simulate, tmp_path):
    rng = np.random.default_rng(14)
    study = simulate(rng, n_tasks=N_TASKS, seeds=FIVE_SEEDS, effect=planted(0.15, 0.15))
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "design.json").write_text(json.dumps(design_data()))
    run_dirs = study.write(tmp_path / "runs", config={"data_root": str(suite)})
    report = build_report(run_dirs, n_resamples=0)
    relations = report["designed_transfer"]
    pair = next(r for r in relations if r["level"] == "pair" and r["relation"] == "conflict")
    assert pair["tasks"] == list(CONFLICT) and pair["group"] == "G1" and pair["expected"] == "loss"
    assert pair["factor"] == "grade: cue_a vs cue_b"
    au = pair["paradigms"]["au"]
    assert au["verdict"] == "recovered" and au["p_designed_adjusted"] <= ALPHA
    assert set(au["tasks"]) == set(CONFLICT) and all(c["effect_units"] < 0 and c["ci"][1] < 0
                                                     for c in au["tasks"].values())
    assert {r["group"] for r in relations if r["level"] == "group"} == {"G0", "G1", "G2", "G3"}
    # the relations' tests are in the family the correction adjusts
    correction = report["settings"]["correction"]
    assert "8 tests of the designed relations" in correction["families"]  # 2 pairs x 2 paradigms x 2 directions
    assert all("designed_truth" in item for item in report["answers"].values())
    assert "the designed conflict t01 / t05" in report["answers"]["RQ1"]["designed_truth"]
    assert "agrees: a loss is shown" in report["answers"]["RQ1"]["designed_truth"]
    assert "G1 holds a designed conflict" in report["answers"]["RQ5"]["designed_truth"]
    paths = write_report(report, tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert "## Designed vs measured transfer" in markdown and "**recovered**" in markdown
    assert "Caveat" not in markdown  # several seeds
    # the same runs without the suite's design (real data): no section, no extra tests
    plain = analyse_without_design(study)
    assert "designed_transfer" not in plain
    assert plain["settings"]["correction"]["n_per_task_tests"] == correction["n_per_task_tests"] - 8


def analyse_without_design(study) -> dict:
    return analyse(study.runs(), n_resamples=0)


def test_one_seed_says_what_the_design_cannot_support(simulate, tmp_path):
    rng = np.random.default_rng(15)
    study = simulate(rng, n_tasks=N_TASKS, seeds=(0,), sigma_seed=0.0, effect=planted(0.15, 0.15))
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "design.json").write_text(json.dumps(design_data()))
    report = build_report(study.write(tmp_path / "runs", config={"data_root": str(suite)}), n_resamples=200)
    assert "one training seed" in report["settings"]["designed_transfer"]["caveat"]
    markdown = write_report(report, tmp_path / "out")["markdown"].read_text()
    assert "**Caveat**: one training seed" in markdown


@pytest.mark.parametrize("answer, verdict, reading", [
    ("G1: train AU (every task non-inferior, 1 of 2 gain significantly, median gap share +3.0%).", "answered",
     "recommends aggregating it: disagrees"),
    ("G1: no loss under CG or AU and no significant gain: either, or TS.", "answered", "finds no loss in aggregating "
     "it: disagrees"),
    ("G1: undecided (non-inferiority not shown: CG t01). Keep a task-specific model for: t01, t09.", "answered",
     "keeps a task-specific model for t01 (a loss shown): agrees"),
    ("G1: undecided (non-inferiority not shown: CG t01); G0: train AU (...).", "answered",
     "only for want of evidence (undecided: no loss and no non-inferiority shown): neither agrees nor disagrees"),
    ("G1: undecided (non-inferiority not shown: CG t01).", "inconclusive", "is inconclusive"),
])
def test_rq5_is_read_against_a_designed_conflict_for_what_it_shows(answer, verdict, reading):
    """A guideline that does not aggregate a conflicting group agrees with the design only when a
    loss is shown; undecided for want of evidence is no evidence either way."""
    from m2dino.evaluation.report.design import read_answers

    pair = {"level": "pair", "relation": "conflict", "tasks": list(CONFLICT), "group": "G1", "factor": "x",
            "paradigms": {p: {"together": True, "verdict": "missed"} for p in ("cg", "au")}}
    report = {"designed_transfer": [pair], "answers": {"RQ5": {"verdict": verdict, "answer": answer}},
              "tasks": {t: {"paradigms": {p: {"non_inferiority": {"shown": False}} for p in ("cg", "au")}}
                        for t in CONFLICT}}
    assert reading in read_answers(report)["RQ5"]
