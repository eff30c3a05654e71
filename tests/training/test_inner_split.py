"""The inner split: the rows of a model's training data held out to choose its best checkpoint and
to see its loss plateau; disjoint from the rows it trains on and from the validation rows, the
same in every paradigm and seed (a function of the split seed and the task alone)."""
import random

from m2dino.data.reader import Record
from m2dino.paradigms import INNER_FRACTION
from m2dino.training.scoring import inner_split


def rows(task_id, n, split="train"):
    return [Record(task_id, "classification", f"{task_id}/{split}{i}.png", f"/d/{task_id}/{split}{i}.png",
                   f"{task_id}.csv", i, split=split, label=0) for i in range(n)]


def test_the_inner_split_is_disjoint_sized_per_task_and_deterministic():
    train = rows("a", 40) + rows("b", 7) + rows("c", 1) + rows("d", 2)
    val = rows("a", 10, split="val")
    kept, inner = inner_split(train, seed=3)
    assert not set(kept) & set(inner) and set(kept) | set(inner) == set(train)
    assert not set(inner) & set(val)
    count = lambda rs, t: sum(r.task_id == t for r in rs)  # noqa: E731
    assert count(inner, "a") == round(INNER_FRACTION * 40) and count(inner, "b") == 1
    assert count(inner, "c") == 0 and count(kept, "c") == 1  # a single row trains
    assert count(inner, "d") == 1 and count(kept, "d") == 1  # every task keeps a training row
    # the same rows whatever order or company the task comes in (TS, CG, AU alike), and again
    shuffled = list(train)
    random.Random(0).shuffle(shuffled)
    assert {r for r in inner_split(shuffled, seed=3)[1]} == set(inner)
    assert {r for r in inner_split(rows("a", 40), seed=3)[1]} == {r for r in inner if r.task_id == "a"}
    assert inner_split(train, seed=3) == (kept, inner)
    # kept rows stay in their given order; another split seed draws other rows
    assert kept == [r for r in train if r in set(kept)]
    assert {r for r in inner_split(train, seed=4)[1] if r.task_id == "a"} != {r for r in inner if r.task_id == "a"}
