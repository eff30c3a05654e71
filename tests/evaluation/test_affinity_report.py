"""The affinity report pieces on hand-built records and results: rank correlations against the
measured changes, agreement with a design, AG vs CG, AG vs random groupings, the printout."""
import numpy as np
import pytest
import scipy.stats

from m2dino.evaluation.affinity import AffinityAccumulator, StepAffinity
from m2dino.evaluation.grouping import best_grouping, grouping_confidence
from m2dino.evaluation.report.affinity import (
    against_random,
    compare_groupings,
    design_agreement,
    format_matrix,
    format_recommendation,
    mean_gap_share,
    pairwise_prediction,
    plot_heatmap,
    transfer_prediction,
)
from m2dino.evaluation.report.change import Change

TASKS = ["a", "b", "c", "d", "e", "f"]


def record_of(matrices, tasks=TASKS):
    acc = AffinityAccumulator(tasks)
    for step, z in enumerate(matrices):
        acc.add(step, StepAffinity(list(tasks), np.asarray(z, float), np.eye(len(tasks)), np.ones(len(tasks))), 0.01)
    return acc.record()


def change(units, gap_share=None):
    return Change(paradigm="ag", reference="ts", metric="dice", units=units, units_ci=None, relative={},
                  gap_share=gap_share)


def test_transfer_prediction_ranks_tasks_by_the_affinity_their_group_gives_them():
    z = np.zeros((6, 6))
    # group 1 = a, b, c with rising help onto a < b < c; group 2 = d, e, f with harm onto d, e, f
    z[:, 1], z[:, 2] = 0.1, 0.2
    z[:, 3], z[:, 4], z[:, 5] = -0.3, -0.2, -0.25
    groups = {"g1": ["a", "b", "c"], "g2": ["d", "e", "f"]}
    changes = {"a": change(0.0), "b": change(0.02), "c": change(0.05), "d": change(-0.06), "e": change(-0.01),
               "f": change(-0.03)}
    result = transfer_prediction(record_of([z, z]), groups, changes)
    expected = scipy.stats.spearmanr([0, 0.1, 0.2, -0.3, -0.2, -0.25], [0, 0.02, 0.05, -0.06, -0.01, -0.03])
    assert result["n"] == 6 and result["unit"] == "tasks"
    assert result["spearman"] == pytest.approx(1.0) == pytest.approx(expected.statistic)
    assert result["spearman_p"] == pytest.approx(expected.pvalue)
    assert result["kendall"] == pytest.approx(1.0)
    # a task alone in its group is TS itself: left out
    alone = transfer_prediction(record_of([z]), {"g1": ["a", "b", "c"], "g2": ["d", "e"], "g3": ["f"]}, changes)
    assert alone["n"] == 5 and "f" not in alone["tasks"]
    with pytest.raises(ValueError, match=r"\['f'\] of the affinity record are in no group"):
        transfer_prediction(record_of([z]), {"g1": ["a", "b", "c", "d", "e"]}, changes)


def test_pairwise_prediction_and_its_checks():
    z = np.arange(36, dtype=float).reshape(6, 6)
    transfers = {("a", "b"): 1.0, ("b", "a"): 5.0, ("c", "d"): 3.0, ("e", "f"): 4.0}
    result = pairwise_prediction(record_of([z]), transfers)
    assert result["n"] == 4 and result["unit"] == "task pairs"
    assert result["spearman"] == pytest.approx(scipy.stats.spearmanr([1, 6, 15, 29], [1, 5, 3, 4]).statistic)
    with pytest.raises(ValueError, match=r"\['zz'\]"):
        pairwise_prediction(record_of([z]), {("a", "zz"): 1.0})
    flat = pairwise_prediction(record_of([np.zeros((6, 6))]), transfers)
    assert flat["spearman"] is None  # no ranking to correlate


class Design:
    def __init__(self, positive, conflict=()):
        self.positive = {frozenset(p) for p in positive}
        self.conflict = {frozenset(p) for p in conflict}

    def relation(self, a, b):
        pair = frozenset((a, b))
        return "positive" if pair in self.positive else "conflict" if pair in self.conflict else "none"


def test_design_agreement_finds_planted_positive_pairs_and_not_random_ones():
    tasks = [f"t{i}" for i in range(12)]
    positive = [("t0", "t1"), ("t2", "t3"), ("t4", "t5"), ("t6", "t7"), ("t8", "t9")]
    design = Design(positive, conflict=[("t10", "t11")])
    rng = np.random.default_rng(0)
    planted = rng.normal(0, 0.1, (12, 12))
    for a, b in positive:
        i, j = tasks.index(a), tasks.index(b)
        planted[i, j] = planted[j, i] = 1.0
    planted[10, 11] = planted[11, 10] = -1.0
    found = design_agreement(planted, tasks, design, permutations=999)
    values = planted[np.triu_indices(12, 1)]
    relation = [design.relation(tasks[i], tasks[j]) for i, j in zip(*np.triu_indices(12, 1))]
    pos = [v for v, r in zip(values, relation) if r == "positive"]
    neg = [v for v, r in zip(values, relation) if r == "none"]
    assert found["auc_positive_vs_none"] == pytest.approx(scipy.stats.mannwhitneyu(pos, neg).statistic / (5 * 60))
    assert found["pairs"] == {"positive": 5, "conflict": 1, "none": 60}
    assert found["auc_positive_vs_none"] == pytest.approx(1.0)
    assert found["p"] < 0.01
    assert found["conflicts"][0]["rank"] == 66  # ranked last of the 66 pairs
    # no structure: the p-value is uniform; over 40 random matrices about 5% fall under 0.05
    p_values = [design_agreement(rng.normal(size=(12, 12)), tasks, design, permutations=199, seed=s)["p"]
                for s in range(40)]
    assert np.mean(np.array(p_values) < 0.05) <= 0.15
    assert 0.25 < np.mean(p_values) < 0.75


def test_ag_versus_cg_is_a_signed_rank_test_over_tasks():
    ag = {t: change(u) for t, u in zip(TASKS, [0.05, 0.04, 0.03, 0.02, 0.06, 0.01])}
    cg = {t: change(0.0) for t in TASKS[:5]}
    result = compare_groupings(ag, cg)
    assert result["n"] == 5 and result["better"] == 5 and result["worse"] == 0
    assert result["p"] == pytest.approx(scipy.stats.wilcoxon([0.05, 0.04, 0.03, 0.02, 0.06]).pvalue)
    same = compare_groupings(cg, cg)
    assert same["p"] is None and same["median_difference"] == 0.0


def test_against_random_groupings():
    random = [0.01, -0.02, 0.03, 0.0]
    result = against_random(0.05, random)
    assert result["p"] == pytest.approx(1 / 5) and result["at_least_as_good"] == 0
    assert against_random(0.02, random)["p"] == pytest.approx(2 / 5)
    assert against_random(float("nan"), random)["p"] is None
    shares = {"a": change(0.1, gap_share=0.2), "b": change(0.0, gap_share=-0.1), "c": change(0.0, gap_share=None)}
    assert mean_gap_share(shares) == pytest.approx(0.05)


def test_printout_matrix_heatmap_and_recommendation(tmp_path):
    blocks = [0, 0, 0, 1, 1, 1]
    rng = np.random.default_rng(1)
    base = np.where(np.equal.outer(blocks, blocks), 0.2, -0.1)
    matrices = [base + rng.normal(0, 0.02, base.shape) for _ in range(6)]
    matrices[0][0, 5] = np.nan
    record = record_of(matrices)
    text = format_matrix(record)
    lines = text.splitlines()
    assert "6 measured steps" in lines[0] and len(lines) == 2 + 6
    assert lines[2].split()[:2] == ["1", "a"] and "0.2" in lines[2]
    png = plot_heatmap(record, tmp_path / "affinity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    chosen = best_grouping(record.lookahead.mean, 2)
    groups = chosen.groups(record.tasks)
    assert groups == {"affinity_1": ["a", "b", "c"], "affinity_2": ["d", "e", "f"]}
    confidence = grouping_confidence(record, chosen, 2, resamples=20)
    text = format_recommendation(groups, chosen, confidence, reference={"x": ["a", "b", "c", "d"], "y": ["e", "f"]})
    assert "affinity_1: a, b, c" in text and "100% give the same groups" in text
    assert "agreement with the reference grouping (adjusted Rand index)" in text
