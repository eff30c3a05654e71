"""The study: train M2DINO under the TS / CG / AU paradigms, evaluate, report (what
`python -m m2dino.train` runs).

With no arguments: the embedded default run (m2dino.training.config.TrainConfig defaults) on
the cached synthetic suite, all three paradigms, then the transfer report under OUT/report/.

Paradigms hold everything equal but which tasks share a model: TS trains one model per task,
CG one per clinical group, AU one for all tasks; the backbone, resolution, augmentation,
optimiser, schedule and seed are identical. Equal exposure: training is counted in epochs
and, with --task-alpha 1 (the default), the sampler shows every training sample exactly once
per epoch, so each sample is seen --epochs times in every paradigm (--steps, or alpha != 1,
give up that equality on purpose). --min-steps N repeats a model's epochs until it trains at
least N steps (equal exposure then holds only among models above N). --control ts-converged
also trains every TS model until its loss on an inner split of its training rows plateaus
(stopping.InnerSplitPlateau; no validation images in that choice) into OUT/ts_converged/, the
reference TS* of the report. --budget converged trains every model of every paradigm so.

Run directory (the contract with predict / evaluate / report):
    OUT/config.yaml, split.json, excluded_rows.json,
    OUT/<paradigm>/<model>/{best.safetensors, best.json, last/, metrics.jsonl, eval.json, routing.json},
    OUT/<paradigm>/metrics.json, OUT/report/.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from m2dino import io
from m2dino.data import ensure_synthetic, load_fmuia
from m2dino.data.fmuia import DataValidationError, FMUIAData
from m2dino.data.reader import csv_num_classes
from m2dino.data.roots import TRAINING_SEED
from m2dino.errors import InputError
from m2dino.evaluation.baselines import trivial_baselines
from m2dino.evaluation.metrics import as_float, higher_is_better
from m2dino.evaluation.report import generate_report
from m2dino.models.pretrained import OFFICIAL_FILES, check_weights_file, where_to_get
from m2dino.paradigms import AG_PARADIGM, CONTROL_PARADIGM, CONTROLS, PARADIGMS, is_random_grouping, trains_ag
from m2dino.tasks import apply_groups, load_groups
from m2dino.training import ag
from m2dino.training import distributed as dist_utils
from m2dino.training.config import SYNTHETIC_START, TrainConfig, as_one_run, save_config, weights_file
from m2dino.training.jobs import (
    ModelJob,
    StudyContext,
    resolve_jobs,
    side_by_side_possible,
    start_fork_server,
    threads_per_job,
    train_models,
)
from m2dino.training.rundir import check_run_dir, run_dir_lock

EXCLUDED_FILE = "excluded_rows.json"


def log(message: str) -> None:
    if dist_utils.is_main():
        tqdm.write(message, file=sys.stdout)  # above any progress bar, not through it
        sys.stdout.flush()


def data_root(config: TrainConfig) -> Path:
    """The FM_UIA root of --data: the cached synthetic suite (written on first use) for 'synthetic'."""
    if config.data == "synthetic":
        return ensure_synthetic(scale=config.synthetic_scale, seed=TRAINING_SEED)
    root = Path(config.data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: not a directory (an FM_UIA root or 'synthetic')")
    return root


def _split_seed(config: TrainConfig) -> int:
    return config.seed if config.split_seed is None else config.split_seed


# ------------------------------------------------------------------ the checks before anything runs

@dataclass
class Checked:
    """What the checks before a run found: the config to run with (a resumed run's own), the
    data's resolved root and the validated data (its split not yet written anywhere)."""
    config: TrainConfig
    data_root: Path
    data: FMUIAData


def check_pretrained(config: TrainConfig) -> None:
    """The weights the run starts from: --pretrained fits the preset (read from the file's
    header, m2dino.models.pretrained); an official preset without a file of its own needs
    --from-scratch."""
    model = config.model
    if config.from_scratch and config.pretrained not in (None, SYNTHETIC_START):
        raise InputError("--pretrained and --from-scratch: choose one (start from the weights, or from "
                         "random weights)")
    weights = weights_file(config)
    if model.name in OFFICIAL_FILES and not config.from_scratch and config.pretrained in (None, SYNTHETIC_START):
        given = "" if config.pretrained is None else f" ('{SYNTHETIC_START}', the default, is a dinov3_tiny start)"
        raise InputError(f"--model {model.name} starts from Meta's DINOv3 weights, and no --pretrained file was "
                         f"given{given}: {where_to_get(model.name)}. Pass --pretrained PATH to that file, or "
                         f"--from-scratch to train from random weights on purpose")
    if weights is not None:
        check_weights_file(weights, model)


def check_data(config: TrainConfig) -> tuple[Path, FMUIAData]:
    """The data root resolved (the synthetic suite written into its cache on first use) and
    every CSV row checked as the run will read it, but for decoding the images (the run
    decodes them all in load_data, before it writes anything); nothing is written into the
    run directory."""
    root = data_root(config)
    read = dict(policy=config.on_bad_sample, run_dir=None, tasks=config.tasks, val_fraction=config.val_fraction,
                seed=_split_seed(config))
    try:
        data = load_fmuia(root, **read, decode=False)
    except DataValidationError:
        load_fmuia(root, **read)  # every problem at once, the images' too: decoded only when some row is bad
        raise
    missing_train = sorted(t for t, n in data.task_counts("train").items() if n == 0)
    missing_val = sorted(t for t, n in data.task_counts("val").items() if n == 0)
    if missing_train or missing_val:
        raise InputError(f"{root}: task(s) without training rows {missing_train} or validation rows "
                         f"{missing_val}; drop them with --tasks")
    return root.resolve(), data


def check_start(config: TrainConfig) -> Checked:
    """The weights and the data, checked."""
    check_pretrained(config)
    root, data = check_data(config)
    return Checked(config, root, data)


def preflight(config: TrainConfig, given: set[str], overwrite: bool = False, demo: bool = False) -> Checked:
    """Everything a run checks before it writes anything or touches a GPU, in the order of
    their cost: the output directory's rules, the weights file, the data. Raises the first
    problem (RunDirError, WeightsError, DataValidationError, ValueError, FileNotFoundError);
    `python -m m2dino.train` runs it before the dry run's plan and before the real run."""
    return check_start(check_run_dir(config, given, overwrite=overwrite, demo=demo).config)


def load_data(config: TrainConfig, out: Path, root: Path | None = None):
    """The FM_UIA data for this run (the cached synthetic suite by default), every image
    decoded and checked; then (nothing is written before) the split and the excluded rows are
    written into the run directory by rank 0."""
    with dist_utils.main_first():
        root = data_root(config) if root is None else root
        data = load_fmuia(root, policy=config.on_bad_sample, run_dir=out if dist_utils.is_main() else None,
                          tasks=config.tasks, val_fraction=config.val_fraction, seed=_split_seed(config))
        if dist_utils.is_main() and config.on_bad_sample == "skip":
            io.write_json(out / EXCLUDED_FILE, [p.to_dict() for p in data.skipped])
    # every rank must train on rank 0's split (which may come from an earlier run's split.json)
    val_keys = dist_utils.broadcast_object(sorted((r.task_id, r.image_path) for r in data.val))
    if not dist_utils.is_main():
        wanted = set(val_keys)
        rows = data.train + data.val
        data.val = [r for r in rows if (r.task_id, r.image_path) in wanted]
        data.train = [r for r in rows if (r.task_id, r.image_path) not in wanted]
    return root, data


def plan_models(paradigm: str, task_ids: list[str], groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """{model_name: [task ids]}: a model per task (ts, and ts_converged, the control), per
    group of `groups` (cg: the clinical groups; ag and the random groupings: theirs), one (au)."""
    if paradigm in ("ts", CONTROL_PARADIGM):
        return {t: [t] for t in task_ids}
    if paradigm == "au":
        return {"all": list(task_ids)}
    if paradigm in ("cg", AG_PARADIGM) or is_random_grouping(paradigm):
        plan: dict[str, list[str]] = {}
        wanted = set(task_ids)
        for group, members in groups.items():
            chosen = [t for t in members if t in wanted]
            if chosen:
                plan[group] = chosen
        ungrouped = [t for t in task_ids if not any(t in m for m in plan.values())]
        if ungrouped:
            plan.setdefault("Other", []).extend(ungrouped)
        return plan
    raise ValueError(f"unknown paradigm {paradigm!r}")


def paradigm_summary(paradigm: str, plan: dict[str, list[str]], results: dict[str, dict], data, specs: dict,
                     baselines) -> dict:
    """OUT/<paradigm>/metrics.json's content from its models' results ({model name: result})."""
    train_sizes = data.task_counts("train")
    entries = {}
    for model_name, task_ids in plan.items():
        result = results[model_name]
        for t in task_ids:
            spec = specs[t]
            entries[t] = {"task_type": spec.task_type, "group": spec.group, "train_size": train_sizes.get(t, 0),
                          "num_classes": csv_num_classes(spec), "primary_metric": spec.primary_metric,
                          "model": model_name,
                          "metrics": result["tasks"].get(t, {}), "ci": result["ci"].get(t, {}),
                          "baseline": baselines.get(t, {})}
    return {"paradigm": paradigm, "models": dict(plan),
            "training": {name: results[name]["training"] for name in plan}, "tasks": entries}


def run_paradigms(config: TrainConfig, paradigms: list[str], data, specs: dict, groups, baselines, device,
                  out: Path, groups_of: dict | None = None) -> dict[str, dict]:
    """Train every model of the paradigms (--jobs at a time on the CPU); each paradigm's
    OUT/<paradigm>/metrics.json is written as soon as its last model is done. groups_of: the
    groups of a paradigm that does not train the clinical ones ({paradigm: groups})."""
    plans = {p: plan_models(p, sorted(specs), (groups_of or {}).get(p, groups)) for p in paradigms}
    train_sizes = data.task_counts("train")
    models = [ModelJob(p, name, tuple(task_ids), sum(train_sizes.get(t, 0) for t in task_ids))
              for p, plan in plans.items() for name, task_ids in plan.items()]
    n_jobs = resolve_jobs(config.jobs, device, len(models))
    if n_jobs > 1:
        log(f"training {len(models)} models {n_jobs} at a time, {threads_per_job(n_jobs)} thread(s) each")
    context = StudyContext(config, data.train, data.val, specs, baselines, device, out)
    done: dict[str, dict[str, dict]] = {p: {} for p in paradigms}
    summaries = {}
    t0 = time.perf_counter()
    for job, result, seconds in train_models(context, models, n_jobs):
        done[job.paradigm][job.name] = result
        log(f"[{job.paradigm}] {job.name}: {len(job.task_ids)} task(s) in {seconds:.1f} s")
        if len(done[job.paradigm]) == len(plans[job.paradigm]):
            summary = paradigm_summary(job.paradigm, plans[job.paradigm], done[job.paradigm], data, specs, baselines)
            if dist_utils.is_main():
                io.write_json(out / job.paradigm / "metrics.json", summary)
            summaries[job.paradigm] = summary
            log(f"[{job.paradigm}] done ({time.perf_counter() - t0:.1f} s into training)")
    return {p: summaries[p] for p in paradigms}


def baseline_table(summary: dict) -> tuple[str, bool]:
    """The 'every task beats its trivial baseline' check of a paradigm, as a text table."""
    lines = [f"{'task':<34} {'type':<15} {'metric':<9} {'model':>9} {'baseline':>9}  beats"]
    all_beat = True
    for task_id, e in sorted(summary["tasks"].items(), key=lambda kv: (kv[1]["task_type"], kv[0])):
        metric = e["primary_metric"]
        value = as_float(e["metrics"].get(metric))
        base = as_float(e["baseline"].get(metric))
        beats = (value > base) if higher_is_better(metric) else (value < base)
        beats = bool(beats) and math.isfinite(value)
        all_beat &= beats
        lines.append(f"{task_id:<34} {e['task_type']:<15} {metric:<9} {value:>9.4f} {base:>9.4f}  "
                     f"{'yes' if beats else 'NO'}")
    return "\n".join(lines), all_beat


def log_baseline_check(results: dict[str, dict], pooled_over: list[int] | None = None) -> None:
    """The run's closing check: the AU model (else the first paradigm) against every task's
    trivial baseline; `pooled_over`: results hold lists of per-seed summaries, checked on their mean."""
    check = "au" if "au" in results else next(iter(results))
    summary = mean_over_seeds(results[check]) if pooled_over else results[check]
    over = f", the mean over seeds {pooled_over} (the pooled report's value)" if pooled_over else ""
    table, all_beat = baseline_table(summary)
    log(f"\n{check.upper()} model vs trivial baselines{over} (primary metric; dice/f1_macro/iou higher, mre lower):")
    log(table)
    log(f"every task beats its trivial baseline{' (mean over the seeds)' if pooled_over else ''}: "
        f"{'yes' if all_beat else 'NO'}")


def mean_over_seeds(summaries: list[dict]) -> dict:
    """One paradigm's metrics.json summaries, one per seed -> a summary whose primary metric per
    task is the mean over the seeds (what the pooled report shows), for baseline_table."""
    pooled = {"tasks": {}}
    for task_id, entry in summaries[0]["tasks"].items():
        metric = entry["primary_metric"]
        values = [as_float(s["tasks"][task_id]["metrics"].get(metric)) for s in summaries]
        pooled["tasks"][task_id] = {**entry, "metrics": {metric: sum(values) / len(values)}}
    return pooled


def run(config: TrainConfig, checked: Checked | None = None) -> dict:
    """Run the study described by `config`; returns {paradigm: metrics.json content} (with
    --seeds: {seed: that}, each seed in OUT/seed-N/, and the pooled report in OUT/report/).
    checked: what preflight found for this config; without it the weights and the data are
    checked here first, before anything is written."""
    checked = checked or check_start(config)
    with run_dir_lock(config.out):  # one writer per run directory, from before its first write to its end
        return _run(config, checked)


def _run(config: TrainConfig, checked: Checked) -> dict:
    if config.seeds is not None and len(config.seeds) > 1:
        return run_seeds(config, checked)
    config = as_one_run(config)
    device = dist_utils.resolve_device(config.device)
    distributed = dist_utils.setup(device)
    if distributed and dist_utils.restart_count() > 0 and not config.resume:
        # torchrun restarted the job after a crashed rank: continue from the last checkpoints
        config.resume = True
    out = Path(config.out)
    t_start = time.perf_counter()
    if config.jobs != 1 and config.paradigm != "au" and side_by_side_possible(device):
        start_fork_server()  # several models to train side by side: get the workers' server ready meanwhile
    root, data = load_data(config, out, checked.data_root)  # a bad image stops the run here: nothing written yet
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml", data_root=root)
    groups = load_groups(config.groups)
    specs = {s.task_id: s for s in apply_groups(list(data.tasks.values()), groups)}
    log(f"data: {root} ({len(data.train)} train / {len(data.val)} val images, {len(specs)} tasks, "
        f"{len(data.skipped)} bad rows skipped); device {device}, world size {dist_utils.world_size()}")
    baselines = trivial_baselines(data.train, data.val, specs)
    paradigms = list(PARADIGMS) if config.paradigm == "all" else [config.paradigm]
    if config.control != CONTROLS[0]:  # a control: its models train as one more paradigm
        paradigms.append(CONTROL_PARADIGM)
    first = [p for p in paradigms if p != AG_PARADIGM]  # AG's groups come from the AU model's probe: after it
    results = run_paradigms(ag.with_au_probe(config), first, data, specs, groups, baselines, device,
                            out) if first else {}
    if trains_ag(config):
        grouped = ag.grouped_paradigms(config, out, specs, data, device)
        log("AG groups: " + "; ".join(f"{g}: {', '.join(m)}" for g, m in grouped[AG_PARADIGM].items()))
        results.update(run_paradigms(config, list(grouped), data, specs, groups, baselines, device, out, grouped))
        paradigms = first + list(grouped)
    if dist_utils.is_main():
        log_baseline_check({p: results[p] for p in paradigms})
        if sum(not is_random_grouping(p) for p in paradigms) > 1:
            generate_report([out], out / "report", n_resamples=config.bootstrap, correction=config.correction)
            log(f"report: {(out / 'report' / 'report.md').resolve()}")
        log(f"run directory: {out.resolve()} (total {time.perf_counter() - t_start:.1f} s)")
        log(next_commands(out, results, root))
    dist_utils.barrier()
    return results


def next_commands(out: Path, results: dict[str, dict], root: Path) -> str:
    """The closing lines: predict, score and export one model of this run (the AU model when
    there is one), the commands filled in with this run's paths."""
    paradigm = "au" if "au" in results else next(iter(results))
    model = next(iter(results[paradigm]["models"]))
    checkpoint = out / paradigm / model / "best.safetensors"
    predictions, entry = out / "submission", out / "fmuia-entry"
    return "\n".join([
        f"next: predict, score and export the {paradigm.upper()} model {model!r} (data: {root}):",
        f"  python -m m2dino.predict --checkpoint {checkpoint} --data-root {root} --out {predictions}",
        f"  python -m m2dino.evaluate --data-root {root} --predictions {predictions}",
        f"  python -m m2dino.export --checkpoint {checkpoint} --out {entry}"])


def run_seeds(config: TrainConfig, checked: Checked | None = None) -> dict:
    """Every paradigm once per seed, each a complete run directory OUT/seed-N/ (model init,
    sampling and augmentation follow the seed; the data and, without a val/ split, the split
    stay those of --seed), then one report pooling the seeds."""
    checked = checked or check_start(config)
    out = Path(config.out)
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml", data_root=checked.data_root)
    results, run_dirs = {}, []
    for seed in config.seeds:
        run_dir = out / f"seed-{seed}"
        log(f"=== seed {seed}: {run_dir}")
        # the same weights and data (the split stays that of --seed): checked once
        seed_config = replace(config, seed=seed, seeds=None, out=str(run_dir), split_seed=config.seed)
        results[seed] = run(seed_config, replace(checked, config=seed_config))
        run_dirs.append(run_dir)
    if dist_utils.is_main():
        per_paradigm = {p: [r[p] for r in results.values()] for p in results[config.seeds[0]]}
        log_baseline_check(per_paradigm, pooled_over=config.seeds)
    if dist_utils.is_main() and (config.paradigm == "all" or len(results) > 1):
        generate_report(run_dirs, out / "report", n_resamples=config.bootstrap,
                        correction=config.correction)
        log(f"pooled report over seeds {config.seeds}: {(out / 'report' / 'report.md').resolve()}")
    return results
