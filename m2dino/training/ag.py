"""AG, the affinity-grouping paradigm, and its null (--random-groupings): which tasks train
together, chosen from inter-task affinity measured early in training instead of the clinical
taxonomy.

Where the affinity comes from (the first that exists, in OUT, the run directory of one seed):
1. OUT/au/all/affinity.json: the study's AU model measured it (--affinity-steps N: every 10th of
   its first steps; when AG is asked and --affinity-steps is 0, AU_PROBE_STEPS). So in
   `--paradigm all --with-ag` the AG models train in a second phase, after TS, CG and AU;
2. OUT/ag/affinity.json: a short probe of its own, the AU model's first --affinity-steps (0:
   AFFINITY_PROBE_STEPS) steps, each measured (`run_probe`, what `python -m m2dino.affinity`
   runs), the probe's model trained in a temporary folder and not kept. `--paradigm ag` alone
   starts so; so does a study whose AU model left no affinity.json.

The groups: m2dino.evaluation.grouping.best_grouping on the lookahead affinity, as many groups as
the tasks' clinical groups (--num-groups K), written ONCE as OUT/ag/groups.yaml (the format
--groups reads) with OUT/ag/grouping.json (score, method, confidence, the affinity file used). A
resumed run reads groups.yaml back and never recomputes it. Under --seeds every seed's AG comes
from its own seed's probe: the grouping procedure's variance between training runs then enters
the report's intervals, as the paradigm's own does.

The null: --random-groupings N partitions the tasks at random into groups of AG's sizes (drawn
from the training seed and the grouping's index), each trained like CG into OUT/random_i/, its
groups written once as OUT/random_i/groups.yaml.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from m2dino.errors import InputError
from m2dino.evaluation.affinity import ag_affinity_candidates, read_affinity, write_affinity
from m2dino.evaluation.grouping import group_and_write, groups_from_labels, write_groups_file
from m2dino.paradigms import (
    AFFINITY_PROBE_STEPS,
    AG_PARADIGM,
    AU_PROBE_STEPS,
    GROUPING_FILE,
    GROUPING_MEASURE,
    GROUPS_FILE,
    random_grouping,
    trains_ag,
)
from m2dino.tasks import load_groups
from m2dino.training import distributed as dist_utils

# Bootstrap resamples of the measured steps behind grouping.json's confidence
CONFIDENCE_RESAMPLES = 20


def with_au_probe(config):
    """The config the study's models train with: when AG is asked and --affinity-steps is 0, the
    AU model measures AU_PROBE_STEPS steps for it."""
    if trains_ag(config) and config.affinity_steps == 0:
        return replace(config, affinity_steps=AU_PROBE_STEPS)
    return config


def run_probe(config, specs, data, scratch: Path, steps: int, device):
    """Train the AU model's first `steps` steps (the run's own schedule) into `scratch`,
    measuring each; the AffinityProbe with what it measured."""
    from m2dino.training.affinity import AffinityProbe, ProbeCallback
    from m2dino.training.trainer import ModelTrainer

    probe = AffinityProbe(tasks=[s.task_id for s in specs], every=1, until=steps)

    class Enough(Exception):
        """Raised by the last measured step's callback: the rest of the run is not needed."""

    def stop_after(event) -> None:
        if event.step >= steps:
            raise Enough

    trainer = ModelTrainer(config, "all", list(specs), data.train, data.val, scratch / "au", device,
                           step_callbacks=[ProbeCallback(probe, config.loss_weights), stop_after])
    try:
        trainer.run()
    except Enough:
        pass
    finally:
        trainer.log.close()
    return probe


def affinity_source(config, out: Path, specs: list, data, device) -> Path:
    """The affinity.json AG's groups come from (module docstring); runs the probe when there is none."""
    import tempfile

    candidates = ag_affinity_candidates(out)
    found = next((path for path in candidates if path.is_file()), None)
    if found:
        return found
    path = candidates[-1]  # AG's own probe's record
    steps = config.affinity_steps or AFFINITY_PROBE_STEPS
    with tempfile.TemporaryDirectory(prefix="m2dino-ag-probe-") as scratch:
        probe = run_probe(config, specs, data, Path(scratch), steps, device)
    if dist_utils.is_main():
        if not probe.accumulator.steps:
            raise InputError(f"AG's probe measured none of the AU model's first {steps} steps (non-finite losses?)")
        write_affinity(path, probe.accumulator.record(probe.how()))
    return path


def read_groups(path: Path, task_ids: list[str]) -> dict[str, list[str]]:
    """A groups file written by an earlier run of this study, checked to partition the tasks."""
    groups = load_groups(path)
    grouped = sorted(t for members in groups.values() for t in members)
    if grouped != sorted(task_ids):
        raise InputError(f"{path}: its groups hold tasks {grouped}, this run trains {sorted(task_ids)}; it is the "
                         f"study's grouping and is never recomputed on --resume (move it aside to regroup)")
    return groups


def choose_groups(source: Path, out: Path, num_groups: int) -> dict[str, list[str]]:
    """AG's groups from the affinity record at `source`, written as OUT/ag/groups.yaml and
    grouping.json."""
    record = read_affinity(source)
    k = min(num_groups, len(record.tasks))
    folder = out / AG_PARADIGM
    return group_and_write(record, k, GROUPING_MEASURE, folder / GROUPING_FILE, folder / GROUPS_FILE,
                           CONFIDENCE_RESAMPLES,
                           affinity=str(Path(source).resolve().relative_to(out.resolve())),
                           measured_steps=len(record.steps))[2]


def random_partition(groups: dict[str, list[str]], seed: int, index: int) -> dict[str, list[str]]:
    """The tasks of `groups` in random groups of the same sizes (the index-th draw of the seed)."""
    tasks = sorted(t for members in groups.values() for t in members)
    order = np.random.default_rng([seed, index]).permutation(len(tasks))
    labels = np.empty(len(tasks), dtype=int)
    start = 0
    for g, size in enumerate(len(members) for members in groups.values()):
        labels[order[start:start + size]] = g
        start += size
    return groups_from_labels(tasks, labels, prefix="group")


def grouped_paradigms(config, out: Path, specs: dict, data, device) -> dict[str, dict[str, list[str]]]:
    """{paradigm: its groups} of AG and its random groupings, each read from its groups.yaml
    when an earlier run wrote it, else chosen (AG: from the affinity, running the probe where
    needed) and written once."""
    out = Path(out)
    task_ids = sorted(specs)
    ag_file = out / AG_PARADIGM / GROUPS_FILE
    if not ag_file.is_file():
        ordered = [specs[t] for t in task_ids]
        source = affinity_source(config, out, ordered, data, device)
        if dist_utils.is_main():
            k = config.num_groups or len({s.group for s in ordered})  # as many as the clinical groups
            choose_groups(source, out, k)
    dist_utils.barrier()
    plans = {AG_PARADIGM: read_groups(ag_file, task_ids)}
    for index in range(1, config.random_groupings + 1):
        paradigm = random_grouping(index)
        path = out / paradigm / GROUPS_FILE
        if not path.is_file() and dist_utils.is_main():
            write_groups_file(path, random_partition(plans[AG_PARADIGM], config.seed, index))
        dist_utils.barrier()
        plans[paradigm] = read_groups(path, task_ids)
    return plans
