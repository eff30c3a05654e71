"""Task groups from inter-task affinity: the search, its confidence, the groups file.

The criterion is TAG's (Fifty et al., NeurIPS 2021): a task j in group G is served by the mean
affinity onto it from the other members, s_j = mean_{i in G, i != j} A[i, j] (A[i, j]: a step
on i changes j's loss; m2dino.evaluation.affinity), and a grouping scores sum_j s_j. Unlike
TAG, whose groups may overlap (a task trained in several, served by its best), the study
trains a PARTITION (a task in one group, as --groups requires), so the search is over
partitions of the n tasks into exactly k non-empty groups. A task alone scores 0: nothing
helps or harms it. A pair never measured together (NaN) counts as 0, no evidence either way.

Search: `exact_grouping` enumerates every partition (restricted growth strings; Stirling
S(n, k) of them) and is used up to EXACT_LIMIT partitions (n = 10, k = 4: 34,105); above it,
`local_search_grouping`: from several starts (a greedy agglomerative one, each given start,
random ones) it makes the best single move of a task to another group while one improves
(all moves scored at once, `move_gains`), then the best swap of two tasks, until neither
improves, and keeps the best local optimum. tests/evaluation/test_grouping.py
measures how often it finds the exact optimum on random small problems.

Confidence (`grouping_confidence`): the probe's measured steps are resampled with
replacement (the unit is the measured step: the claim is about the probe's step-to-step
variation at this data, seed and model, not about other seeds or data), each resample's
mean affinity is grouped again, and the result compared with the chosen grouping: the
share of identical partitions and the adjusted Rand index (scikit-learn), with how often
each pair ends up together.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb, factorial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from m2dino import io
from m2dino.errors import InputError
from m2dino.tasks import load_groups

EXACT_LIMIT = 50_000
DEFAULT_RESTARTS = 24
GROUP_PREFIX = "affinity"


@dataclass
class Grouping:
    labels: np.ndarray   # [n] group index of each task, canonical (groups numbered by first member)
    score: float         # sum over tasks of the mean affinity onto it from its group
    method: str          # "exact" or "local search (...)"

    def groups(self, tasks: Sequence[str], prefix: str = GROUP_PREFIX) -> dict[str, list[str]]:
        """{group name: [task ids]}, groups named prefix_1.. in the order of their first task."""
        return groups_from_labels(tasks, self.labels, prefix)


def _checked(affinity) -> np.ndarray:
    a = np.array(affinity, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"the affinity matrix must be square [n, n] with n >= 1, got shape {list(a.shape)}")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def canonical(labels) -> np.ndarray:
    """Relabel so that groups are numbered 0, 1, ... in the order of their first task."""
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(v), len(order)) for v in labels], dtype=int)


def _task_scores(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
    together = labels[:, None] == labels[None, :]
    np.fill_diagonal(together, False)
    helpers = together.sum(axis=0)
    return np.where(helpers > 0, (a * together).sum(axis=0) / np.maximum(helpers, 1), 0.0)


def group_scores(affinity, labels) -> np.ndarray:
    """s_j per task: mean affinity onto j from the other members of its group (0 alone)."""
    return _task_scores(_checked(affinity), np.asarray(labels))


def grouping_score(affinity, labels) -> float:
    return float(group_scores(affinity, labels).sum())


def stirling2(n: int, k: int) -> int:
    """The number of partitions of n items into k non-empty groups."""
    return sum((-1) ** i * comb(k, i) * (k - i) ** n for i in range(k + 1)) // factorial(k)


def partitions(n: int, k: int) -> Iterator[np.ndarray]:
    """Every partition of range(n) into exactly k non-empty groups, as canonical labels."""
    labels = [0] * n

    def extend(position: int, used: int):
        if n - position < k - used:  # not enough tasks left to open the missing groups
            return
        if position == n:
            yield np.array(labels)
            return
        for group in range(min(used + 1, k)):
            labels[position] = group
            yield from extend(position + 1, max(used, group + 1))

    if n == 0 or not 1 <= k <= n:
        return
    labels[0] = 0
    yield from extend(1, 1)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"the number of groups must be in [1, {n}] (the number of tasks), got {k}")


def exact_grouping(affinity, k: int) -> Grouping:
    """The best partition into k groups by enumeration (all S(n, k) partitions)."""
    a = _checked(affinity)
    _check_k(len(a), k)
    best, best_score = None, -np.inf
    for labels in partitions(len(a), k):
        score = _score(a, labels)
        if score > best_score + 1e-12:
            best, best_score = labels, score
    return Grouping(canonical(best), best_score, "exact")


def greedy_start(affinity, k: int) -> np.ndarray:
    """Agglomerative start: from singletons, merge the two groups with the largest mean mutual
    affinity (both directions) until k groups are left."""
    a = _checked(affinity)
    groups = [[i] for i in range(len(a))]
    mutual = a + a.T
    while len(groups) > k:
        best, pair = -np.inf, (0, 1)
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                value = mutual[np.ix_(groups[x], groups[y])].mean()
                if value > best:
                    best, pair = value, (x, y)
        x, y = pair
        groups[x] = groups[x] + groups.pop(y)
    labels = np.empty(len(a), dtype=int)
    for index, members in enumerate(groups):
        labels[members] = index
    return canonical(labels)


def _score(a: np.ndarray, labels: np.ndarray) -> float:
    """grouping_score on a checked matrix (the search's inner loop)."""
    return float(_task_scores(a, labels).sum())


def move_gains(affinity, labels, k: int) -> np.ndarray:
    """[n, k] change of the grouping score when task x moves to group q, for every x and q at
    once (-inf where x is in q already or alone in its group: moving it would empty a group).
    With S[j, g] the affinity onto j from g's other members and s_j the scores: x's own score
    becomes S[x, q] / n_q; each other member of its old group p loses A[x, j] and one helper,
    each member of q gains A[x, j] and one helper."""
    a = _checked(affinity)
    labels = np.asarray(labels)
    n = len(labels)
    rows = np.arange(n)
    member = np.zeros((n, k))
    member[rows, labels] = 1.0
    off = a - np.diag(np.diag(a))
    onto = off.T @ member          # [j, g]: sum of A[i, j] over i in g, i != j
    from_x = off @ member          # [x, g]: sum of A[x, j] over j in g, j != x
    size = member.sum(axis=0)
    own = size[labels] - 1
    scores = np.where(own > 0, onto[rows, labels] / np.maximum(own, 1), 0.0)
    onto_total = (onto * member).sum(axis=0)     # [g]: sum over members j of onto[j, g]
    score_total = member.T @ scores              # [g]
    left = size[labels] - 2
    leave = (np.where(left > 0, (onto_total[labels] - onto[rows, labels] - from_x[rows, labels]) / np.maximum(left, 1),
                      0.0) - (score_total[labels] - scores))
    with np.errstate(divide="ignore", invalid="ignore"):
        join = (onto_total[None, :] + from_x) / size[None, :] - score_total[None, :]
        gains = -scores[:, None] + onto / size[None, :] + leave[:, None] + join
    gains[rows, labels] = -np.inf
    gains[size[labels] == 1, :] = -np.inf
    return gains


def _improve(a: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Local search: the best single move while one improves; at a move optimum, the best
    improving swap of two tasks between groups; until neither improves."""
    labels = labels.copy()
    score = _score(a, labels)
    n = len(labels)
    while True:
        gains = move_gains(a, labels, k)
        task, group = np.unravel_index(np.argmax(gains), gains.shape)
        if gains[task, group] > 1e-12:
            labels[task] = group
            score = _score(a, labels)
            continue
        best, best_labels = score, None
        for x in range(n):
            for y in range(x + 1, n):
                if labels[x] != labels[y]:
                    trial = labels.copy()
                    trial[x], trial[y] = labels[y], labels[x]
                    value = _score(a, trial)
                    if value > best + 1e-12:
                        best, best_labels = value, trial
        if best_labels is None:
            return labels, score
        labels, score = best_labels, best


def local_search_grouping(affinity, k: int, restarts: int = DEFAULT_RESTARTS, seed: int = 0,
                          starts: Sequence[Sequence[int]] = ()) -> Grouping:
    """The best local optimum from the greedy start, the given `starts` and `restarts` random
    partitions (seeded)."""
    a = _checked(affinity)
    n = len(a)
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    candidates = [greedy_start(a, k)] + [np.asarray(s, dtype=int) for s in starts]
    for _ in range(restarts):
        labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
        candidates.append(rng.permutation(labels))
    best, best_score = None, -np.inf
    for start in candidates:
        labels, score = _improve(a, canonical(start), k)
        if score > best_score + 1e-12:
            best, best_score = labels, score
    return Grouping(canonical(best), best_score,
                    f"local search (moves and swaps from a greedy start and {restarts} random starts)")


def best_grouping(affinity, k: int, exact_limit: int = EXACT_LIMIT, restarts: int = DEFAULT_RESTARTS,
                  seed: int = 0, starts: Sequence[Sequence[int]] = ()) -> Grouping:
    """Exact when S(n, k) <= exact_limit, else local search (module docstring)."""
    n = len(_checked(affinity))
    _check_k(n, k)
    if stirling2(n, k) <= exact_limit:
        return exact_grouping(affinity, k)
    return local_search_grouping(affinity, k, restarts=restarts, seed=seed, starts=starts)


def groups_from_labels(tasks: Sequence[str], labels, prefix: str = GROUP_PREFIX) -> dict[str, list[str]]:
    labels = canonical(labels)
    if len(labels) != len(tasks):
        raise ValueError(f"{len(labels)} group labels for {len(tasks)} tasks")
    return {f"{prefix}_{g + 1}": [t for t, v in zip(tasks, labels) if v == g] for g in range(labels.max() + 1)}


def labels_from_groups(tasks: Sequence[str], groups: dict[str, Sequence[str]]) -> np.ndarray:
    """Canonical labels of `tasks` under a {group: [task ids]} mapping (every task in one group)."""
    where = {t: i for i, members in enumerate(groups.values()) for t in members}
    missing = [t for t in tasks if t not in where]
    if missing:
        raise ValueError(f"tasks {missing} are in no group")
    return canonical([where[t] for t in tasks])


@dataclass
class Confidence:
    resamples: int
    identical_share: float       # share of resamples whose grouping equals the chosen one
    ari_mean: float              # adjusted Rand index against the chosen grouping
    ari_interval: tuple          # its 2.5 and 97.5 percentiles
    together: np.ndarray         # [n, n] share of resamples that put i and j in one group
    unit: str = "measured probe steps, resampled with replacement"

    def to_json(self) -> dict:
        return {"resamples": self.resamples, "identical_share": self.identical_share, "ari_mean": self.ari_mean,
                "ari_interval": list(self.ari_interval), "together": self.together, "unit": self.unit}


def grouping_confidence(record, chosen: Grouping, k: int, measure: str = "lookahead", resamples: int = 100,
                        seed: int = 0, restarts: int = 1) -> Confidence:
    """How stable `chosen` is under bootstrap resamples of the probe's measured steps (an
    AffinityRecord), each regrouped with best_grouping: from the chosen grouping, the greedy
    start and `restarts` random ones when the search is not exact (27 tasks in 7 groups: about
    1.5 s per resample on the 2-core VM under load)."""
    from sklearn.metrics import adjusted_rand_score

    steps = len(record.steps)
    if steps < 2:
        raise ValueError(f"the grouping's confidence needs at least 2 measured steps, the record has {steps}")
    rng = np.random.default_rng(seed)
    n = len(record.tasks)
    identical, ari, together = 0, [], np.zeros((n, n))
    for _ in range(resamples):
        draw = record.resampled(rng.integers(0, steps, steps)).measure(measure).mean
        labels = best_grouping(draw, k, restarts=restarts, seed=int(rng.integers(2**31)),
                               starts=[chosen.labels]).labels
        identical += int(np.array_equal(labels, chosen.labels))
        ari.append(adjusted_rand_score(chosen.labels, labels))
        together += labels[:, None] == labels[None, :]
    ari = np.array(ari)
    return Confidence(resamples, identical / resamples, float(ari.mean()),
                      (float(np.percentile(ari, 2.5)), float(np.percentile(ari, 97.5))), together / resamples)


def group_and_write(record, k: int, measure: str, grouping_path, groups_path, resamples: int,
                    **recorded) -> tuple[Grouping, Confidence | None, dict[str, list[str]]]:
    """The best grouping of an AffinityRecord's mean `measure` into k groups, its confidence over
    `resamples` resamples of the measured steps (None with fewer than 2), written as the
    grouping's JSON (with `recorded` beside it) and the groups file --groups reads."""
    grouping = best_grouping(record.measure(measure).mean, k)
    confidence = (grouping_confidence(record, grouping, k, measure, resamples=resamples)
                  if len(record.steps) >= 2 else None)
    groups = grouping.groups(record.tasks)
    io.write_json(grouping_path, {"measure": measure, "num_groups": k, "groups": groups, "score": grouping.score,
                                  "method": grouping.method,
                                  "confidence": confidence.to_json() if confidence else None, **recorded})
    write_groups_file(groups_path, groups)
    return grouping, confidence, groups


def write_groups_file(path, groups: dict[str, list[str]], overwrite: bool = False) -> Path:
    """A groups file that --groups reads (m2dino.tasks.load_groups): YAML for .yaml/.yml, JSON
    otherwise, written atomically. An existing file is kept unless `overwrite`, and then moved
    aside (io.move_aside), never deleted. Read back through load_groups before returning."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise InputError(f"{path} exists: not overwriting a groups file (pass the overwrite flag to move it "
                             f"aside and write a new one)")
        io.move_aside(path)
    plain = {str(g): [str(t) for t in members] for g, members in groups.items()}
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        io.write_text(path, yaml.safe_dump(plain, sort_keys=False))
    else:
        io.write_json(path, plain)
    load_groups(path)
    return path
