"""A run directory is never lost: what `python -m m2dino.train` does with an OUT that already
holds a trained run.

- Without --resume it stops, naming OUT and the two ways on: --resume continues the run,
  --overwrite moves it aside to OUT.old-<timestamp> (nothing is deleted) and starts over. The
  no-argument demo alone re-runs over an earlier demo run in its own OUT, and says so.
- With --resume (or a torchrun restart) the run continues with its own config.yaml. An option
  given again that differs from it stops the run with the list of differences, except those in
  RESUMABLE, which may change; each model logs them as a `resume` event in its metrics.jsonl.
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from m2dino import io
from m2dino.training import distributed as dist_utils
from m2dino.training.config import MODEL_OPTIONS, TrainConfig, read_config

# Options that may change when a run resumes: a longer schedule (or the control's extra models),
# and how the run is executed
RESUMABLE = ("epochs", "min_steps", "control", "workers", "jobs", "device", "progress", "checkpoint_every",
             "checkpoint_seconds")
# Given on every resume, never a difference
_ALWAYS = ("resume", "out")


class RunDirError(ValueError):
    """OUT holds a run that this command would overwrite or continue differently."""


def holds_checkpoint(out: Path) -> bool:
    """Whether OUT holds a trained model or a training checkpoint (any safetensors file)."""
    return out.is_dir() and next(out.rglob("*.safetensors"), None) is not None


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


def prepare_run_dir(config: TrainConfig, given: set[str], overwrite: bool = False, demo: bool = False) -> TrainConfig:
    """The config to run with in config.out (see the module doc); raises RunDirError when the
    directory holds a run this command may not touch. Rank 0 alone moves a run aside."""
    out = Path(config.out)
    restarted = dist_utils.restart_count() > 0  # torchrun restarted a crashed job: it continues
    if overwrite and config.resume:
        raise RunDirError("--overwrite and --resume: choose one (continue the run, or move it aside and start over)")
    if config.resume or restarted:
        saved_file = out / "config.yaml"
        if not saved_file.is_file():
            return replace(config, resume=True)  # nothing saved yet: the run starts from its first checkpoint
        saved = read_config(saved_file)
        changed = differences(config, saved, given)
        refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
        if refused:
            listed = "; ".join(f"{_flag(k)} {new!r} (the run has {old!r})" for k, (old, new) in refused.items())
            raise RunDirError(f"--resume {out}: the run was started with other values: {listed}. A resumed run keeps "
                              f"its config.yaml; only {', '.join(_flag(k) for k in RESUMABLE)} may change. To train "
                              f"with the new values, use another --out (or --overwrite instead of --resume)")
        return replace(saved, resume=True, out=config.out, **{k: getattr(config, k) for k in changed})
    if not holds_checkpoint(out):
        return config
    if overwrite:
        if os.environ.get("RANK", "0") == "0":
            moved = io.move_aside(out)
            print(f"m2dino.train: --overwrite: moved the run in {out} aside to {moved}", flush=True)
        return config
    if demo and _holds_demo_run(out):
        print(f"m2dino.train: {out} holds an earlier run of the no-argument demo; the demo runs again over it "
              f"(it overwrites only its own demo run: anything else needs --out, --resume or --overwrite)",
              file=sys.stdout, flush=True)
        return config
    raise RunDirError(f"{out} holds a trained run (checkpoints under it), and this command would train over it. "
                      f"To continue that run: --resume. To start over: --overwrite (moves it aside to "
                      f"{out}.old-<timestamp>; nothing is deleted). Or choose another --out")


def _holds_demo_run(out: Path) -> bool:
    try:
        return read_config(out / "config.yaml") == TrainConfig()
    except (OSError, ValueError):
        return False
