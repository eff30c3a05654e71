"""What a data-root argument names: a folder, or `synthetic`, the cached synthetic suite.

`python -m m2dino.train` with `--data synthetic` (the default) trains on the suite cached under
$M2DINO_CACHE (synthetic-<scale>-<seed>), and records that folder in its config.yaml as
`data_root`. The commands that read a data root (predict, evaluate, data.check) accept
`synthetic` too: the suite of the run the command's checkpoint or predictions come from, or
else the default run's suite (written into the cache first if it is not there).
"""
from __future__ import annotations

from pathlib import Path

import yaml

SYNTHETIC = "synthetic"
TRAINING_SCALE = 0.03  # --synthetic-scale's default: the suite the default run trains on
TRAINING_SEED = 0      # the seed of every suite training writes
RUN_CONFIG = "config.yaml"
_RUN_DEPTH = 4  # a checkpoint lies at most this deep in its run: OUT/seed-N/<paradigm>/<model>/best.safetensors


def run_config_near(path) -> dict | None:
    """The config.yaml of the run that `path` (a checkpoint, a prediction folder) lies in, as
    a mapping; None when there is none within a few folders above it."""
    if path is None:
        return None
    folder = Path(path).absolute()
    for candidate in [folder, *folder.parents][:_RUN_DEPTH + 1]:
        config = candidate / RUN_CONFIG
        if config.is_file():
            try:
                data = yaml.safe_load(config.read_text())
            except (OSError, yaml.YAMLError):
                return None
            return data if isinstance(data, dict) else None
    return None


def resolve_data_root(text, near=None) -> Path:
    """The folder a data-root argument names. `synthetic`: the synthetic suite of the run that
    `near` (a checkpoint or prediction folder) belongs to (its config.yaml's `data_root`, or its
    scale), else the default run's; written into the cache when absent. Anything else: that path."""
    if str(text) != SYNTHETIC:
        return Path(text)
    run = run_config_near(near) or {}
    recorded = run.get("data_root")
    if run.get("data") == SYNTHETIC and recorded and Path(recorded).is_dir():
        return Path(recorded)
    from m2dino.data.synthetic import ensure_synthetic

    scale = run.get("synthetic_scale", TRAINING_SCALE) if run.get("data") == SYNTHETIC else TRAINING_SCALE
    return ensure_synthetic(scale=float(scale), seed=TRAINING_SEED)
