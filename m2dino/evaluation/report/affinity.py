"""Does measured affinity predict transfer? And its printout: the matrix, the heatmap, the
recommended groups.

- `transfer_prediction`: rank correlation over TASKS between the affinity a task's group
  gives it (the grouping criterion's s_j, m2dino.evaluation.grouping) and its measured change
  under that group's model against TS (the report's `Change`, in the metric's units: rank
  statistics need no common unit). Tasks alone in their group are left out (their "group" is
  TS). Spearman and Kendall (scipy.stats), two-sided p, n the tasks.
- `pairwise_prediction`: the same over ordered task pairs where a pair's transfer was measured.
- `design_agreement`: on the designed suite, whether a task-pair matrix (lookahead, cosine or
  the routing affinity of the report) ranks the designed positive pairs above the unrelated
  ones: AUC = U / (n_pos n_none) of scipy.stats.mannwhitneyu, and its p from a permutation
  test over TASK labels (scipy.stats.permutation_test: the matrix's rows and columns permuted
  together), because pairs sharing a task are not independent; conflict pairs listed with
  their rank among all pairs.
- `compare_groupings` (AG vs CG): per task, the difference of the two groupings' changes vs
  TS (metric units), Wilcoxon signed-rank over tasks (scipy.stats.wilcoxon).
- `against_random` (AG vs chance): a grouping's summary (`mean_gap_share`) against the same
  summary of N random groupings of the same sizes: the Monte-Carlo p (b + 1) / (N + 1), b the
  random groupings at least as good (Phipson & Smyth 2010; with N random groupings the
  smallest p is 1 / (N + 1)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

from m2dino.evaluation.grouping import group_scores, labels_from_groups

PERMUTATIONS = 9999


def _correlation(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    x, y = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"n": int(len(x)), "spearman": None, "spearman_p": None, "kendall": None, "kendall_p": None}
    if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        rho = scipy.stats.spearmanr(x, y)
        tau = scipy.stats.kendalltau(x, y)
        out.update(spearman=float(rho.statistic), spearman_p=float(rho.pvalue),
                   kendall=float(tau.statistic), kendall_p=float(tau.pvalue))
    return out


def transfer_prediction(record, groups: Mapping[str, Sequence[str]], changes: Mapping[str, object],
                        measure: str = "lookahead") -> dict:
    """Rank correlation over tasks of predicted affinity (s_j under `groups`) and the measured
    change vs TS (changes: task_id -> Change of the paradigm that trained `groups`)."""
    tasks = list(record.tasks)
    grouped = {t for members in groups.values() for t in members}
    missing = [t for t in tasks if t not in grouped]
    if missing:
        raise ValueError(f"tasks {missing} of the affinity record are in no group")
    labels = labels_from_groups(tasks, groups)
    scores = group_scores(record.measure(measure).mean, labels)
    sizes = np.bincount(labels)
    rows = [(t, float(scores[i]), float(getattr(changes[t], "units", np.nan)))
            for i, t in enumerate(tasks) if sizes[labels[i]] > 1 and t in changes]
    result = _correlation([r[1] for r in rows], [r[2] for r in rows])
    result.update(measure=measure, unit="tasks", tasks={t: {"predicted": p, "measured": m} for t, p, m in rows})
    return result


def pairwise_prediction(record, transfers: Mapping[tuple[str, str], float], measure: str = "lookahead") -> dict:
    """Rank correlation over ordered pairs (source, target) of A[source, target] and a measured
    transfer of source onto target (e.g. target's change when trained with source vs alone)."""
    index = {t: i for i, t in enumerate(record.tasks)}
    unknown = sorted({t for pair in transfers for t in pair} - set(index))
    if unknown:
        raise ValueError(f"measured pairs name tasks {unknown} that the affinity record does not have")
    mean = record.measure(measure).mean
    pairs = list(transfers)
    result = _correlation([mean[index[s], index[t]] for s, t in pairs], [transfers[p] for p in pairs])
    result.update(measure=measure, unit="task pairs")
    return result


def symmetric(matrix) -> np.ndarray:
    """(A + A^T) / 2: one value per unordered pair."""
    a = np.asarray(matrix, dtype=float)
    return (a + a.T) / 2


def design_agreement(matrix, tasks: Sequence[str], design, permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """How well a task-pair matrix ranks the design's positive pairs above its unrelated ones
    (module docstring). design: m2dino.data.synthetic.design.Design (its relation(a, b))."""
    a = symmetric(matrix)
    tasks = list(tasks)
    n = len(tasks)
    if a.shape != (n, n):
        raise ValueError(f"a matrix of shape {list(a.shape)} for {n} tasks")
    upper = np.triu_indices(n, 1)
    relation = np.array([design.relation(tasks[i], tasks[j]) for i, j in zip(*upper)])
    positive, none = relation == "positive", relation == "none"

    def auc(matrix_values: np.ndarray) -> float:
        """Mann-Whitney's U of the positive pairs over the unrelated ones / (n_pos n_none), ties
        counted half (U from the ranks, as scipy.stats.mannwhitneyu computes it)."""
        pos, neg = matrix_values[positive], matrix_values[none]
        pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
        if not len(pos) or not len(neg):
            return np.nan
        ranks = scipy.stats.rankdata(np.concatenate([pos, neg]))
        u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
        return float(u / (len(pos) * len(neg)))

    values = a[upper]
    observed = auc(values)
    result = {"pairs": {"positive": int(positive.sum()), "conflict": int((relation == "conflict").sum()),
                        "none": int(none.sum())},
              "auc_positive_vs_none": observed, "p": None, "permutations": permutations,
              "unit": "tasks (rows and columns permuted together)"}
    if np.isfinite(observed) and permutations > 0:
        test = scipy.stats.permutation_test(
            (np.arange(n),), lambda order: auc(a[np.ix_(order, order)][upper]), permutation_type="pairings",
            n_resamples=permutations, alternative="greater", random_state=seed)
        result["p"] = float(test.pvalue)
    order = scipy.stats.rankdata(-np.nan_to_num(values, nan=-np.inf))
    result["conflicts"] = [{"tasks": [tasks[i], tasks[j]], "value": float(values[k]),
                            "rank": int(order[k]), "of": len(values)}
                           for k, (i, j) in enumerate(zip(*upper)) if relation[k] == "conflict"]
    return result


def compare_groupings(first: Mapping[str, object], second: Mapping[str, object]) -> dict:
    """Paired over tasks: first's change vs TS minus second's (metric units, positive: first
    better), Wilcoxon signed-rank over the tasks both have (e.g. AG vs CG)."""
    tasks = [t for t in first if t in second]
    diff = np.array([float(first[t].units) - float(second[t].units) for t in tasks])
    keep = np.isfinite(diff)
    tasks, diff = [t for t, k in zip(tasks, keep) if k], diff[keep]
    out = {"n": len(tasks), "unit": "tasks", "differences": dict(zip(tasks, diff.tolist())),
           "median_difference": float(np.median(diff)) if len(diff) else None,
           "better": int((diff > 0).sum()), "worse": int((diff < 0).sum()), "p": None}
    if len(diff) and np.any(diff != 0):
        out["p"] = float(scipy.stats.wilcoxon(diff).pvalue)
    return out


def mean_gap_share(changes: Mapping[str, object]) -> float:
    """A grouping's summary over tasks: the mean gap share (unitless; tasks at chance, whose gap
    share is None, left out)."""
    shares = [c.gap_share for c in changes.values() if c.gap_share is not None and np.isfinite(c.gap_share)]
    return float(np.mean(shares)) if shares else float("nan")


def against_random(observed: float, random_values: Sequence[float]) -> dict:
    """One-sided Monte-Carlo test of `observed` (higher is better) against random groupings."""
    values = np.asarray([v for v in random_values if np.isfinite(v)], dtype=float)
    if not np.isfinite(observed) or not len(values):
        return {"observed": observed, "random": values.tolist(), "p": None}
    at_least = int((values >= observed).sum())
    return {"observed": float(observed), "random": values.tolist(), "random_mean": float(values.mean()),
            "percentile": float(scipy.stats.percentileofscore(values, observed, kind="weak")),
            "at_least_as_good": at_least, "p": (at_least + 1) / (len(values) + 1),
            "rule": "p = (b + 1) / (N + 1), b of N random groupings at least as good"}


# --------------------------------------------------------------------------- the printout

def format_matrix(record, measure: str = "lookahead", digits: int = 2) -> str:
    """The mean matrix as text: rows numbered with their task ids, columns by number; '.' for a
    pair never measured. Row i, column j: a step on i's loss changes j's loss by that share."""
    mean = record.measure(measure).mean
    n = len(record.tasks)
    width = max(digits + 4, len(str(n)) + 1)
    label_width = max(len(t) for t in record.tasks) + len(str(n)) + 2
    lines = [f"{measure} affinity over {len(record.steps)} measured steps (row: the task that steps; "
             f"column: the task served)",
             " " * label_width + "".join(f"{j + 1:>{width}}" for j in range(n))]
    for i, task in enumerate(record.tasks):
        cells = "".join(f"{v:>{width}.{digits}f}" if np.isfinite(v) else f"{'.':>{width}}" for v in mean[i])
        lines.append(f"{i + 1:>{len(str(n))}} {task:<{label_width - len(str(n)) - 1}}{cells}")
    return "\n".join(lines)


def plot_heatmap(record, path, measure: str = "lookahead") -> Path:
    """A heatmap PNG of the mean matrix (diverging colours around 0, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from m2dino.evaluation.report.plots import _save

    mean = record.measure(measure).mean
    n = len(record.tasks)
    limit = float(np.nanmax(np.abs(mean))) if np.isfinite(mean).any() else 1.0
    fig, ax = plt.subplots(figsize=(0.32 * n + 3, 0.32 * n + 2))
    image = ax.imshow(np.ma.masked_invalid(mean), cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(n), record.tasks, rotation=90, fontsize=7)
    ax.set_yticks(range(n), record.tasks, fontsize=7)
    ax.set_xlabel("task served (its loss changes)")
    ax.set_ylabel("task that steps")
    ax.set_title(f"{measure} affinity, mean over {len(record.steps)} steps")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, Path(path), plt)


def format_recommendation(groups: Mapping[str, Sequence[str]], grouping, confidence=None,
                          reference: Mapping[str, Sequence[str]] | None = None) -> str:
    """The recommended groups, how they were found, how stable they are, and (optionally) how
    they differ from a reference grouping such as the clinical one."""
    lines = [f"recommended groups ({len(groups)}, {grouping.method}; score {grouping.score:.4f}):"]
    lines += [f"  {name}: {', '.join(members)}" for name, members in groups.items()]
    if confidence is not None:
        low, high = confidence.ari_interval
        lines.append(f"confidence over {confidence.resamples} bootstrap resamples of the {confidence.unit}: "
                     f"{confidence.identical_share:.0%} give the same groups; adjusted Rand index "
                     f"{confidence.ari_mean:.2f} [{low:.2f}, {high:.2f}]")
    if reference:
        from sklearn.metrics import adjusted_rand_score

        tasks = [t for members in groups.values() for t in members]
        in_reference = [t for t in tasks if any(t in m for m in reference.values())]
        if in_reference:
            ari = adjusted_rand_score(labels_from_groups(in_reference, reference),
                                      labels_from_groups(in_reference, groups))
            lines.append(f"agreement with the reference grouping (adjusted Rand index): {ari:.2f}")
    return "\n".join(lines)
