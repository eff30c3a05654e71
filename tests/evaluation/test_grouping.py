"""Groups from affinity: TAG's criterion, the exact search against brute force over every
label assignment, the local search against the exact optimum, confidence, the groups file."""
from itertools import product

import numpy as np
import pytest

from m2dino.errors import InputError
from m2dino.evaluation.affinity import AffinityAccumulator, StepAffinity
from m2dino.evaluation.grouping import (
    best_grouping,
    canonical,
    exact_grouping,
    group_scores,
    grouping_confidence,
    grouping_score,
    groups_from_labels,
    labels_from_groups,
    local_search_grouping,
    move_gains,
    partitions,
    stirling2,
    write_groups_file,
)
from m2dino.tasks import load_groups


def brute_force(affinity, k):
    """The best score over EVERY assignment of n labels in range(k) that uses all k labels
    (independent of `partitions`: k^n assignments, each partition k! times)."""
    n = len(affinity)
    best = -np.inf
    for labels in product(range(k), repeat=n):
        if len(set(labels)) == k:
            best = max(best, grouping_score(affinity, np.array(labels)))
    return best


def test_group_score_is_the_mean_affinity_onto_each_task_from_its_group():
    a = np.array([[9.0, 0.4, -0.2],
                  [0.1, 9.0, 0.6],
                  [0.3, -0.5, 9.0]])   # row i steps, column j served; the diagonal never counts
    scores = group_scores(a, [0, 0, 0])
    np.testing.assert_allclose(scores, [(0.1 + 0.3) / 2, (0.4 - 0.5) / 2, (-0.2 + 0.6) / 2])
    np.testing.assert_allclose(group_scores(a, [0, 0, 1]), [0.1, 0.4, 0.0])  # alone: 0
    assert grouping_score(a, [0, 1, 1]) == pytest.approx(0 + 0.6 - 0.5)
    assert np.isnan(a).sum() == 0
    with_nan = a.copy()
    with_nan[0, 1] = np.nan   # never measured together: counts as 0
    np.testing.assert_allclose(group_scores(with_nan, [0, 0, 1]), [0.1, 0.0, 0.0])


@pytest.mark.parametrize("n, k", [(1, 1), (4, 2), (5, 3), (6, 2), (6, 4), (7, 3)])
def test_partitions_are_all_distinct_and_counted_by_stirling(n, k):
    found = [tuple(p) for p in partitions(n, k)]
    assert len(found) == len(set(found)) == stirling2(n, k)
    assert all(len(set(p)) == k and tuple(canonical(p)) == p for p in found)


@pytest.mark.parametrize("seed", range(12))
def test_exact_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 8))
    k = int(rng.integers(1, min(n, 4) + 1))
    a = rng.normal(size=(n, n))
    result = exact_grouping(a, k)
    assert result.score == pytest.approx(brute_force(a, k))
    assert result.score == pytest.approx(grouping_score(a, result.labels))
    assert len(set(result.labels)) == k


def test_move_gains_equal_the_recomputed_scores():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n, k = int(rng.integers(3, 9)), int(rng.integers(2, 4))
        a = rng.normal(size=(n, n))
        labels = canonical(np.concatenate([np.arange(k), rng.integers(0, k, n - k)]))
        gains = move_gains(a, labels, k)
        base = grouping_score(a, labels)
        for x in range(n):
            for q in range(k):
                trial = labels.copy()
                trial[x] = q
                if q == labels[x] or len(set(trial)) < k:
                    assert gains[x, q] == -np.inf
                else:
                    assert gains[x, q] == pytest.approx(grouping_score(a, trial) - base, abs=1e-9)


def test_an_obvious_block_structure_is_found():
    blocks = [0, 0, 1, 1, 1, 2, 2]
    a = np.where(np.equal.outer(blocks, blocks), 0.5, -0.3) + np.random.default_rng(0).normal(0, 0.05, (7, 7))
    assert list(exact_grouping(a, 3).labels) == blocks
    assert list(local_search_grouping(a, 3, restarts=2).labels) == blocks


def test_local_search_finds_the_exact_optimum_on_most_random_problems():
    """Measured rate on 40 random problems (n 6-8, k 2-4, Gaussian affinities): the local search
    (greedy start + 24 random starts) matches the exact optimum's score on RATE of them when this
    test was written; the test asks for >= 95% and never an invalid partition."""
    rng = np.random.default_rng(123)
    hits, trials = 0, 40
    for _ in range(trials):
        n = int(rng.integers(6, 9))
        k = int(rng.integers(2, 5))
        a = rng.normal(size=(n, n))
        exact = exact_grouping(a, k)
        found = local_search_grouping(a, k, seed=int(rng.integers(1000)))
        assert sorted(set(found.labels)) == list(range(k)) and len(found.labels) == n
        assert found.score <= exact.score + 1e-9
        hits += found.score >= exact.score - 1e-9
    assert hits / trials >= 0.95


def test_27_tasks_use_the_local_search_and_give_a_valid_partition():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(27, 27))
    result = best_grouping(a, 7)
    assert result.method.startswith("local search")
    assert sorted(set(result.labels)) == list(range(7))
    # no single move or swap improves it (a local optimum)
    for task in range(27):
        for group in range(7):
            trial = result.labels.copy()
            trial[task] = group
            if len(set(trial)) == 7:
                assert grouping_score(a, trial) <= result.score + 1e-9
    assert best_grouping(a[:6, :6], 3).method == "exact"
    with pytest.raises(ValueError, match=r"number of groups must be in \[1, 27\]"):
        best_grouping(a, 28)


def test_groups_and_labels_round_trip():
    tasks = ["a", "b", "c", "d"]
    groups = groups_from_labels(tasks, [2, 0, 2, 1])
    assert groups == {"affinity_1": ["a", "c"], "affinity_2": ["b"], "affinity_3": ["d"]}
    assert list(labels_from_groups(tasks, groups)) == [0, 1, 0, 2]
    with pytest.raises(ValueError, match=r"\['d'\] are in no group"):
        labels_from_groups(tasks, {"x": ["a", "b", "c"]})


def _record(blocks, steps, noise, seed=0):
    rng = np.random.default_rng(seed)
    tasks = [f"t{i}" for i in range(len(blocks))]
    acc = AffinityAccumulator(tasks)
    base = np.where(np.equal.outer(blocks, blocks), 0.2, -0.1)
    for step in range(steps):
        z = base + rng.normal(0, noise, base.shape)
        acc.add(step, StepAffinity(tasks, z, np.eye(len(tasks)), np.ones(len(tasks))), lr=0.01)
    return acc.record()


def test_confidence_is_high_for_a_clear_structure_and_low_for_noise():
    blocks = [0, 0, 0, 1, 1, 1]
    clear = _record(blocks, steps=20, noise=0.05)
    chosen = best_grouping(clear.lookahead.mean, 2)
    assert list(chosen.labels) == blocks
    confident = grouping_confidence(clear, chosen, 2, resamples=40)
    assert confident.identical_share == 1.0 and confident.ari_mean == pytest.approx(1.0)
    assert confident.together[0, 1] == 1.0 and confident.together[0, 3] == 0.0
    noisy = _record(blocks, steps=20, noise=2.0)
    unsure = grouping_confidence(noisy, best_grouping(noisy.lookahead.mean, 2), 2, resamples=40)
    assert unsure.identical_share < 0.6 and unsure.ari_mean < 0.6
    with pytest.raises(ValueError, match="at least 2 measured steps"):
        grouping_confidence(_record(blocks, 1, 0.1), chosen, 2)


@pytest.mark.parametrize("name", ["groups.json", "groups.yaml"])
def test_groups_file_is_read_by_load_groups_and_never_overwritten_without_the_flag(tmp_path, name):
    groups = {"affinity_1": ["fetal_head", "IUGC"], "affinity_2": ["lung"]}
    path = write_groups_file(tmp_path / name, groups)
    assert load_groups(path) == groups
    path.write_text(path.read_text())  # the user's file now
    before = path.read_text()
    with pytest.raises(InputError, match="exists: not overwriting"):
        write_groups_file(path, {"g": ["lung"]})
    assert path.read_text() == before
    write_groups_file(path, {"g": ["lung"]}, overwrite=True)
    assert load_groups(path) == {"g": ["lung"]}
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(name + ".old-")]
    assert len(kept) == 1 and kept[0].read_text() == before
