"""A run directory is never lost, and never written by two runs: what `python -m m2dino.train`
does with an OUT that already holds something.

- A run of ours is an OUT whose config.yaml carries the header m2dino writes (RUN_CONFIG_HEADER),
  or, for runs written before that header existed, a config.yaml beside checkpoints.
- An OUT holding a trained run (checkpoints under it): without --resume the command stops, naming
  OUT and the two ways on: --resume continues the run, --overwrite moves it aside to
  OUT.old-<timestamp> (nothing is deleted) and starts over. The no-argument demo alone re-runs
  over an earlier demo run in its own OUT, and says so.
- An OUT holding files but no run of ours (a user's config.yaml, their notes, a data root) is
  refused the same way, naming the files: training would write among them, over some of them.
  --overwrite moves the folder aside. Only m2dino's own traces (a --dry-run's plan.json, a lock
  file) do not count.
- OUT may not be the data root, lie inside it or hold it; with --overwrite, no input (the data,
  --pretrained, --config, --groups) may lie inside OUT, which would move it aside with the run.
- With --resume (or a torchrun restart) the run continues with its own config.yaml. An option
  given again that differs from it stops the run with the list of differences, except those in
  RESUMABLE, which may change; each model logs them as a `resume` event in its metrics.jsonl.

`check_run_dir` decides all of this and writes nothing (a --dry-run calls it); `prepare_run_dir`
acts on its decision (moves a run aside) under the writer's lock. `run_dir_lock(out)` is that
lock: held by the study's main process (global rank 0) from before the first write of a run to
its end; the other torchrun ranks and the --jobs worker processes belong to the same run and
never take it (they write only their own model directories, under it).
"""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from m2dino import io
from m2dino.errors import InputError
from m2dino.training import distributed as dist_utils
from m2dino.training.config import MODEL_OPTIONS, RESUMABLE, RUN_CONFIG_HEADER, TrainConfig, read_config, weights_file

# RESUMABLE (re-exported): the options that may change when a run resumes, declared with
# `resumable=True` where each option is declared (m2dino.training.config)
# Given on every resume, never a difference
_ALWAYS = ("resume", "out")
# m2dino's own traces at the top of an OUT that holds no run yet: never a user's files
OWN_TRACES = (io.LOCK_FILE, "plan.json")
CONFIG_FILE = "config.yaml"
_LISTED = 8  # files named in a refusal


class RunDirError(InputError):
    """OUT holds a run or files that this command would overwrite or continue differently."""


@dataclass(frozen=True)
class RunDirPlan:
    """What check_run_dir decided: the config to run with (a resumed run's own, with the
    resumable changes), whether OUT moves aside first (--overwrite), and what to tell the user."""

    config: TrainConfig
    move_aside: bool = False
    note: str | None = None


def holds_checkpoint(out: Path) -> bool:
    """Whether OUT holds a trained model or a training checkpoint (any safetensors file)."""
    return out.is_dir() and next(out.rglob("*.safetensors"), None) is not None


def is_run_config(path: Path) -> bool:
    """Whether `path` is a config.yaml m2dino wrote (its first line is RUN_CONFIG_HEADER's)."""
    try:
        with io.open_regular(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().rstrip("\n") == RUN_CONFIG_HEADER.rstrip("\n")
    except (OSError, ValueError):
        return False


def run_in(out: Path) -> str | None:
    """What run of ours OUT holds: "trained" (checkpoints), "started" (our config.yaml, no
    checkpoint yet) or None (no run of ours: empty, missing, or someone else's files)."""
    config_file = out / CONFIG_FILE
    if not config_file.is_file():
        return None
    if is_run_config(config_file):
        return "trained" if holds_checkpoint(out) else "started"
    # a run written before config.yaml carried its header: its checkpoints say it is one
    return "trained" if holds_checkpoint(out) else None


def foreign_files(out: Path) -> list[str]:
    """The names at the top of OUT, m2dino's own traces (OWN_TRACES) left out."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in OWN_TRACES)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def differences(config: TrainConfig, saved: TrainConfig, given: set[str]) -> dict[str, tuple]:
    """{option: (saved value, new value)} for the options given that differ from the run's."""
    out = {}
    for option in sorted(given - set(_ALWAYS)):
        if option == "model" or option in MODEL_OPTIONS:
            if config.model != saved.model:
                new, old = config.model.to_dict(), saved.model.to_dict()
                for name in new:
                    if new[name] != old[name]:
                        out["model" if name == "name" else name] = (old[name], new[name])
            continue
        old, new = getattr(saved, option), getattr(config, option)
        if old != new:
            out[option] = (old, new)
    return out


def data_root_of(config: TrainConfig) -> Path | None:
    """The folder --data names, without writing anything (the synthetic suite's cache folder for
    'synthetic'); None when it cannot be said."""
    if config.data == "synthetic":
        from m2dino.data.synthetic.suite import default_cache_root

        return default_cache_root(config.synthetic_scale, 0)
    return Path(config.data) if config.data else None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_inputs_outside(config: TrainConfig, out: Path, overwrite: bool) -> None:
    """RunDirError when OUT and the data root overlap, or (--overwrite) an input lies in OUT."""
    here = out.resolve()
    root = data_root_of(config)
    if root is not None:
        data = root.resolve()
        if _inside(here, data) or _inside(data, here):
            where = "is" if here == data else ("lies inside" if _inside(here, data) else "holds")
            raise RunDirError(f"--out {out} {where} the data root {root}: m2dino writes into --out, and never "
                              f"into its input. Choose an --out outside the data")
    if not overwrite:
        return
    inputs = {"--data": root, "--pretrained": weights_file(config), "--groups": config.groups}
    for option, value in inputs.items():
        if value and _inside(Path(value).resolve(), here):
            raise RunDirError(f"{option} {value} lies inside --out {out}: --overwrite would move it aside with the "
                              f"old run. Move it out of {out} first, or choose another --out")


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def check_run_dir(config: TrainConfig, given: set[str], overwrite: bool = False, demo: bool = False) -> RunDirPlan:
    """What running `config` into config.out may do (see the module doc), decided without
    writing anything: a RunDirPlan, or RunDirError naming OUT, what it holds and the ways on."""
    out = Path(config.out)
    restarted = dist_utils.restart_count() > 0  # torchrun restarted a crashed job: it continues
    if overwrite and config.resume:
        raise RunDirError("--overwrite and --resume: choose one (continue the run, or move it aside and start over)")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder; choose another --out")
    check_inputs_outside(config, out, overwrite)
    run = run_in(out)
    foreign = foreign_files(out) if run is None else []
    if foreign and not overwrite:
        how = "continue" if config.resume or restarted else "train"
        raise RunDirError(f"{out} holds files that are not an m2dino run ({_listed(foreign)}): no {CONFIG_FILE} "
                          f"written by m2dino.train, no checkpoint. This command would {how} among them and replace "
                          f"some. Choose another --out, or --overwrite to move the folder aside to "
                          f"{out}.old-<timestamp> (nothing is deleted)")
    if foreign:
        return RunDirPlan(config, move_aside=True)
    if config.resume or restarted:
        saved_file = out / CONFIG_FILE
        if run is None:
            return RunDirPlan(replace(config, resume=True))  # nothing saved yet: the run starts from its beginning
        saved = _read_saved(saved_file)
        changed = differences(config, saved, given)
        refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
        if refused:
            listed = "; ".join(f"{_flag(k)} {new!r} (the run has {old!r})" for k, (old, new) in refused.items())
            raise RunDirError(f"--resume {out}: the run was started with other values: {listed}. A resumed run keeps "
                              f"its config.yaml; only {', '.join(_flag(k) for k in RESUMABLE)} may change. To train "
                              f"with the new values, use another --out (or --overwrite instead of --resume)")
        return RunDirPlan(replace(saved, resume=True, out=config.out, **{k: getattr(config, k) for k in changed}))
    if run != "trained":
        return RunDirPlan(config)  # empty, or a run of ours that saved no model yet: it starts over
    if overwrite:
        return RunDirPlan(config, move_aside=True)
    if demo and _holds_demo_run(out):
        return RunDirPlan(config, note=f"{out} holds an earlier run of the no-argument demo; the demo runs again over "
                                       f"it (it overwrites only its own demo run: anything else needs --out, --resume "
                                       f"or --overwrite)")
    raise RunDirError(f"{out} holds a trained run (checkpoints under it), and this command would train over it. "
                      f"To continue that run: --resume. To start over: --overwrite (moves it aside to "
                      f"{out}.old-<timestamp>; nothing is deleted). Or choose another --out")


def prepare_run_dir(config: TrainConfig, given: set[str], overwrite: bool = False, demo: bool = False) -> TrainConfig:
    """The config to run with in config.out: check_run_dir's decision, acted on. Rank 0 alone
    moves a run aside, under OUT's writer lock (never a folder another run is writing)."""
    plan = check_run_dir(config, given, overwrite=overwrite, demo=demo)
    out = Path(config.out)
    if plan.move_aside and _is_rank_zero():
        with io.lock_directory(out, "m2dino.train --overwrite"):
            moved = io.move_aside(out)
        print(f"m2dino.train: --overwrite: moved {'the run' if run_in(moved) else 'the folder'} in {out} aside to "
              f"{moved}", flush=True)
    if plan.note and _is_rank_zero():
        print(f"m2dino.train: {plan.note}", file=sys.stdout, flush=True)
    return plan.config


def run_dir_lock(out):
    """OUT's writer lock for a run (m2dino.io.lock_directory), taken by the study's main process
    only: torchrun's other ranks and the --jobs workers are part of the same run."""
    if not _is_rank_zero():
        return nullcontext()
    return io.lock_directory(out, "m2dino.train " + " ".join(sys.argv[1:])[:300])


def _is_rank_zero() -> bool:
    # read from the environment: the process group may not be up yet
    return os.environ.get("RANK", "0") == "0"


def _read_saved(path: Path) -> TrainConfig:
    try:
        return read_config(path)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        raise RunDirError(f"{path}: cannot be read back as this run's options ({e}). Continue it only with its own "
                          f"config.yaml; or --overwrite to move the run aside and start over") from None


def _holds_demo_run(out: Path) -> bool:
    try:
        return read_config(out / CONFIG_FILE) == TrainConfig()
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return False
