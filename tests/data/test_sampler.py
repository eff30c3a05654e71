"""MultiTaskBatchSampler: proportions, the epoch rule, determinism, resume, DDP partitioning."""
from collections import Counter

import numpy as np
import pytest

from m2dino.data.sampler import MultiTaskBatchSampler, largest_remainder, task_weights

SIZES = {"a": 50, "b": 20, "c": 7, "d": 3}


def task_list():
    out = []
    for t, n in SIZES.items():
        out += [t] * n
    # interleave so a task's indices are not contiguous
    rng = np.random.default_rng(1)
    return [out[i] for i in rng.permutation(len(out))]


TOI = task_list()


@pytest.mark.parametrize("mixed", [True, False])
def test_alpha_one_sees_every_sample_exactly_once_per_epoch(mixed):
    s = MultiTaskBatchSampler(TOI, batch_size=8, alpha=1.0, mixed=mixed, seed=3)
    for _epoch in range(3):
        batches = list(s)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(TOI)))
        assert len(batches) == len(s)
        if not mixed:
            assert all(len({TOI[i] for i in b}) == 1 for b in batches)
    assert s.epoch == 3


def test_mixed_batches_mix_tasks_and_epochs_differ():
    s = MultiTaskBatchSampler(TOI, batch_size=8, seed=0)
    e0, e1 = s.epoch_batches(0), s.epoch_batches(1)
    assert e0 != e1
    assert sum(len({TOI[i] for i in b}) > 1 for b in e0) >= len(e0) // 2


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_quota_follows_n_to_the_alpha(alpha):
    s = MultiTaskBatchSampler(TOI, batch_size=4, alpha=alpha, seed=0)
    n = np.array([SIZES[t] for t in s.tasks], float)
    expected = len(TOI) * n**alpha / (n**alpha).sum()
    counts = Counter(TOI[i] for b in s.epoch_batches(0) for i in b)
    got = np.array([counts[t] for t in s.tasks])
    assert got.sum() == len(TOI)
    assert np.all(np.abs(got - expected) < 1.0)  # largest-remainder rounding
    if alpha == 0:
        assert set(got) <= {20}  # uniform: 80 samples / 4 tasks


def test_alpha_below_one_still_visits_every_sample_of_large_tasks_over_epochs():
    s = MultiTaskBatchSampler(TOI, batch_size=4, alpha=0.0, seed=2)  # "a" gets 20 of its 50 per epoch
    seen = set()
    for e in range(3):
        seen |= {i for b in s.epoch_batches(e) for i in b if TOI[i] == "a"}
    assert len(seen) == 50  # 3 epochs x 20 >= 50, stream continues where it stopped
    small = Counter(i for b in s.epoch_batches(0) for i in b if TOI[i] == "d")
    assert sorted(small.values()) == [6, 7, 7]  # 20 draws of 3 samples: whole permutations first


def test_deterministic_for_a_seed():
    a = MultiTaskBatchSampler(TOI, 8, alpha=0.5, seed=7).epoch_batches(2)
    b = MultiTaskBatchSampler(TOI, 8, alpha=0.5, seed=7).epoch_batches(2)
    c = MultiTaskBatchSampler(TOI, 8, alpha=0.5, seed=8).epoch_batches(2)
    assert a == b and a != c


@pytest.mark.parametrize("mixed", [True, False])
def test_resume_mid_epoch_is_exact(mixed):
    ref = MultiTaskBatchSampler(TOI, 6, alpha=0.5, mixed=mixed, seed=5)
    full = [b for _ in range(2) for b in ref]  # epochs 0 and 1
    s = MultiTaskBatchSampler(TOI, 6, alpha=0.5, mixed=mixed, seed=5)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 4
    resumed = MultiTaskBatchSampler(TOI, 6, alpha=0.5, mixed=mixed, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a trainer calling set_epoch on the same epoch keeps the position
    rest = list(resumed) + list(resumed)
    assert head + rest == full
    with pytest.raises(ValueError, match="seed"):
        MultiTaskBatchSampler(TOI, 6, alpha=0.5, mixed=mixed, seed=6).load_state_dict(state)


def test_state_dict_can_record_trained_batches_not_prefetched_ones():
    s = MultiTaskBatchSampler(TOI, 6, seed=0)
    it = iter(s)
    for _ in range(5):
        next(it)
    assert s.state_dict(batches_done=3)["batches_done"] == 3


@pytest.mark.parametrize("mixed,drop_last", [(True, False), (True, True), (False, False), (False, True)])
def test_ddp_ranks_disjoint_with_equal_batch_counts(mixed, drop_last):
    R = 3
    samplers = [MultiTaskBatchSampler(TOI, 4, mixed=mixed, seed=1, num_replicas=R, rank=r, drop_last=drop_last)
                for r in range(R)]
    per_rank = [s.epoch_batches(0) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers))
    sets = [Counter(i for b in batches for i in b) for batches in per_rank]
    if drop_last or mixed:
        # 80 samples over 3 ranks x 4: the mixed tail of 8 splits into 3,3,2, no repeats needed
        for i in range(R):
            for j in range(i + 1, R):
                assert not set(sets[i]) & set(sets[j])
    union = set().union(*map(set, sets))
    if not drop_last:
        assert union == set(range(len(TOI)))
    if drop_last and mixed:
        assert all(len(b) == 4 for batches in per_rank for b in batches)


def test_ddp_tail_smaller_than_ranks_is_padded_so_every_rank_steps():
    toi = ["a"] * 13
    R = 4
    per_rank = [MultiTaskBatchSampler(toi, 3, num_replicas=R, rank=r).epoch_batches(0) for r in range(R)]
    assert [len(b) for b in per_rank] == [2, 2, 2, 2]  # 12 in one global step, then 1 + 3 repeats
    assert all(len(batches[-1]) == 1 for batches in per_rank)


def test_helpers_and_bad_arguments():
    assert largest_remainder(10, np.array([0.55, 0.25, 0.2])).tolist() == [6, 2, 2]
    assert largest_remainder(7, task_weights([1, 1, 1], 1.0)).sum() == 7
    with pytest.raises(ValueError, match="batch_size"):
        MultiTaskBatchSampler(TOI, 0)
    with pytest.raises(ValueError, match="rank"):
        MultiTaskBatchSampler(TOI, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="alpha"):
        MultiTaskBatchSampler(TOI, 4, alpha=-1)
    with pytest.raises(ValueError, match="empty"):
        MultiTaskBatchSampler([], 4)
