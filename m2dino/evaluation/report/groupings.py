"""The report's affinity-groups section (report.json `affinity_groupings`): does the affinity
that chose AG's groups predict transfer, and does AG beat CG and chance?

Read from the run directories (one replicate per seed; each seed's AG has its own probe and
groups, m2dino.training.ag): each paradigm's groups from its metrics.json (every task's model),
the affinity record named by OUT/ag/grouping.json (else OUT/au/all/affinity.json, else
OUT/ag/affinity.json). The statistics are m2dino.evaluation.report.affinity's:
- `prediction` (per replicate, its own record and groups): rank correlation over tasks of the
  affinity a task's AG (and CG) group gives it and its measured change against TS (pooled over
  the seeds, metric units);
- `pairwise`: over ordered pairs (source, target) that trained as a two-task group of AG, CG or a
  random grouping in every replicate of that paradigm: A[source, target] against target's change
  vs TS there;
- `design` (the synthetic suite): the mean lookahead and cosine matrices over the replicates
  against design.json's relations (AUC of positive over unrelated pairs, permutation p over
  tasks);
- `ag_vs_cg`: Wilcoxon signed-rank over tasks of AG's change vs TS minus CG's;
- `ag_vs_random`: AG's mean gap share against the random groupings' (--random-groupings), the
  Monte-Carlo p. The random groupings are the null only: they appear in no other table.
These p-values are not in the report's multiplicity families (each answers its own question).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from m2dino import io
from m2dino.evaluation.affinity import ag_affinity_candidates, read_affinity
from m2dino.evaluation.report.affinity import (
    against_random,
    compare_groupings,
    design_agreement,
    mean_gap_share,
    pairwise_prediction,
    transfer_prediction,
)
from m2dino.evaluation.report.runs import Runs
from m2dino.paradigms import AG_PARADIGM, GROUPING_FILE, is_random_grouping, random_grouping_index
from m2dino.paradigms import GROUPING_MEASURE as MEASURE


def split_nulls(runs: Runs) -> tuple[Runs, Runs]:
    """(the runs of the report's paradigms, those of the random groupings: AG's null)."""
    def part(null: bool) -> Runs:
        def keep(by_paradigm: dict) -> dict:
            return {p: v for p, v in by_paradigm.items() if is_random_grouping(p) == null}
        return Runs(keep(runs.results), keep(runs.routing), keep(runs.training), keep(runs.folders), runs.configs)
    return part(False), part(True)


def groups_of(results: dict, paradigm: str, replicate: str) -> dict[str, list[str]]:
    """{model: [task ids]} of a paradigm in one replicate, from its metrics.json entries."""
    groups: dict[str, list[str]] = {}
    for task_id, reps in sorted(results.get(paradigm, {}).items()):
        if replicate in reps:
            groups.setdefault(reps[replicate].get("model") or task_id, []).append(task_id)
    return groups


def affinity_file(folder: Path) -> Path | None:
    """The affinity.json AG's groups came from (folder: a replicate's OUT/ag)."""
    run_dir = folder.parent
    grouping = folder / GROUPING_FILE
    named = io.read_json(grouping).get("affinity") if grouping.is_file() else None
    for path in ([run_dir / named] if named else []) + ag_affinity_candidates(run_dir):
        if path.is_file():
            return path
    return None


def _pair_transfers(results: dict, paradigms: list[str], replicates: list[str], changes: dict) -> dict:
    """{(source, target): target's change vs TS (units)} where the two trained as a pair in
    every replicate of a paradigm (its change pooled over those replicates)."""
    transfers = {}
    for paradigm in paradigms:
        pairs = None
        for rep in replicates:
            found = {tuple(sorted(m)) for m in groups_of(results, paradigm, rep).values() if len(m) == 2}
            pairs = found if pairs is None else pairs & found
        for a, b in sorted(pairs or ()):
            for source, target in ((a, b), (b, a)):
                change = changes.get(target, {}).get(paradigm)
                if change is not None and np.isfinite(change.units):
                    transfers.setdefault((source, target), change.units)
    return transfers


class MeanRecord:
    """The replicates' affinity records (of the same tasks) as one: each measure's mean matrix
    averaged over them (a pair measured in no replicate stays NaN)."""

    def __init__(self, records: list):
        self.tasks = list(records[0].tasks)
        self.records = records

    def measure(self, name: str) -> SimpleNamespace:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the mean of a pair never measured: NaN
            return SimpleNamespace(mean=np.nanmean([r.measure(name).mean for r in self.records], axis=0))


def _by_task(null_changes: dict) -> dict:
    """{random grouping: {task: Change}} -> {task: {random grouping: Change}}."""
    out: dict = {}
    for paradigm, per_task in null_changes.items():
        for task_id, change in per_task.items():
            out.setdefault(task_id, {})[paradigm] = change
    return out


def affinity_groupings(runs: Runs, null_results: dict, changes: dict, null_changes: dict, design=None) -> dict:
    """report.json's `affinity_groupings` (module docstring). changes: {task: {paradigm: Change}}
    against TS; null_results and null_changes: the random groupings' (split_nulls) and their
    {random grouping: {task: Change}} against TS."""
    results = runs.results
    folders = runs.folders.get(AG_PARADIGM, {})
    replicates = sorted(folders)
    grouped = [p for p in ("cg", AG_PARADIGM) if p in results]
    nulls = sorted(null_changes, key=random_grouping_index)
    out = {"measure": MEASURE, "random_groupings": nulls, "groups": {}, "affinity_files": {}, "prediction": {},
           "unit": "tasks (the change vs TS pooled over the seeds; each seed's AG from its own probe)"}
    records = {}
    for rep in replicates:
        out["groups"][rep] = {p: groups_of(results, p, rep) for p in grouped}
        out["groups"][rep].update({p: groups_of(null_results, p, rep) for p in nulls})
        path = affinity_file(folders[rep])
        out["affinity_files"][rep] = None if path is None else str(path)
        if path is None:
            continue
        record = records[rep] = read_affinity(path)
        per_paradigm = {}
        for paradigm in grouped:
            groups = out["groups"][rep][paradigm]
            if all(any(t in m for m in groups.values()) for t in record.tasks):
                per_paradigm[paradigm] = transfer_prediction(
                    record, groups, {t: c[paradigm] for t, c in changes.items() if paradigm in c}, MEASURE)
        out["prediction"][rep] = per_paradigm
    pooled = MeanRecord(list(records.values())) if records and len({tuple(r.tasks) for r in records.values()}) == 1 \
        else None
    null_by_task = _by_task(null_changes)
    every_change = {t: {**changes.get(t, {}), **null_by_task.get(t, {})} for t in set(changes) | set(null_by_task)}
    transfers = _pair_transfers({**results, **null_results}, grouped + nulls, replicates, every_change)
    out["pairwise"] = (pairwise_prediction(pooled, transfers, MEASURE) if pooled and transfers
                       else {"n": len(transfers), "note": "no task pair trained as a two-task group in every seed"})
    if design is not None and pooled:
        out["design"] = {measure: design_agreement(pooled.measure(measure).mean, pooled.tasks, design)
                         for measure in ("lookahead", "cosine")}
    ag = {t: c[AG_PARADIGM] for t, c in changes.items() if AG_PARADIGM in c}
    cg = {t: c["cg"] for t, c in changes.items() if "cg" in c}
    out["ag_vs_cg"] = compare_groupings(ag, cg) if ag and cg else None
    out["ag_vs_random"] = ({**against_random(mean_gap_share(ag), [mean_gap_share(null_changes[p]) for p in nulls]),
                            "statistic": "mean gap share over the tasks not at chance (vs TS)"}
                           if ag and nulls else None)
    return out
