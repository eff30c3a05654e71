"""Does an AU model's routing recover the designed suite's relations? Compares aux-loss settings.

    python benchmarks/routing_design.py DESIGN_ROOT NAME=RUN_DIR[,RUN_DIR...] ...

Each NAME is one setting (e.g. default=runs/s0/default,runs/s1/default), each RUN_DIR an
`m2dino.train --paradigm au` run directory (one seed). Per setting and seed: the report's
routing affinity (m2dino.evaluation.report.compute.task_affinity, from au/all/routing.json)
against design.json (m2dino.evaluation.report.affinity.design_agreement: AUC of the designed
positive pairs over the unrelated ones, permutation p over tasks), its spread, and each task's
primary metric (au/all/eval.json). The first setting is the reference for the metrics: per
task, the setting minus the reference (oriented: positive is better; mean over the seeds),
Wilcoxon signed-rank over tasks (the unit is the task; per-metric medians in the metric's units).
"""
from __future__ import annotations

import sys

import numpy as np
import scipy.stats

from m2dino import io
from m2dino.data.synthetic.design import load_design
from m2dino.evaluation.metrics import LOWER_IS_BETTER
from m2dino.evaluation.report.affinity import design_agreement
from m2dino.evaluation.report.compute import routing_shares, task_affinity
from m2dino.tasks import resolve_tasks


def routing_of(run: str):
    data = io.read_json(f"{run}/au/all/routing.json")
    layers = {k: np.array(v) for k, v in data["layers"].items()}
    return data["tasks"], task_affinity(layers), layers


def primary(run: str, tasks) -> dict:
    metrics = io.read_json(f"{run}/au/all/eval.json")["tasks"]
    specs = {t.task_id: t for t in resolve_tasks(tasks)}
    out = {}
    for t in tasks:
        metric = specs[t].primary_metric
        value = metrics[t][metric]
        out[t] = (metric, -value if metric in LOWER_IS_BETTER else value)
    return out


def main(argv: list[str]) -> None:
    design = load_design(argv[0])
    settings = {name: runs.split(",") for name, runs in (a.split("=", 1) for a in argv[1:])}
    scores = {}
    for name, runs in settings.items():
        per_seed = []
        for run in runs:
            tasks, affinity, layers = routing_of(run)
            agreement = design_agreement(affinity, tasks, design, permutations=1999)
            off = affinity[~np.eye(len(tasks), dtype=bool)]
            uniform = max(np.abs(routing_shares(c) - 1 / c.shape[1]).max() for c in layers.values())
            print(f"{name:10s} {run}: routing AUC positive>none {agreement['auc_positive_vs_none']:.3f} "
                  f"(p {agreement['p']:.4f}, {agreement['pairs']}), off-diagonal {off.min():.3f}-{off.max():.3f} "
                  f"median {np.median(off):.3f}, largest expert share from uniform {uniform:.3f}, conflict rank "
                  f"{[c['rank'] for c in agreement['conflicts']]}")
            per_seed.append(primary(run, tasks))
        scores[name] = {t: (per_seed[0][t][0], float(np.mean([s[t][1] for s in per_seed]))) for t in per_seed[0]}
    reference = next(iter(scores))
    for name in list(scores)[1:]:
        tasks = sorted(scores[name])
        diff = np.array([scores[name][t][1] - scores[reference][t][1] for t in tasks])
        metric_of = {t: scores[name][t][0] for t in tasks}
        medians = {m: float(np.median([d for t, d in zip(tasks, diff) if metric_of[t] == m]))
                   for m in sorted(set(metric_of.values()))}
        p = scipy.stats.wilcoxon(diff).pvalue
        print(f"{name} vs {reference}: {int((diff > 0).sum())} tasks better, {int((diff < 0).sum())} worse; "
              f"Wilcoxon over {len(tasks)} tasks p {p:.3f}; median change per metric (oriented) "
              + ", ".join(f"{m} {v:+.4f}" for m, v in medians.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
