"""Which checkpoints may be exported: an m2dino safetensors pair that `load_model` loads (its
checks name the file at fault: missing, unreadable, not matching its config) and that
`save_model` wrote (its metadata); a pickle is refused by name, never opened."""
from __future__ import annotations

from pathlib import Path

from m2dino.export.options import ExportError
from m2dino.models.m2dino import M2DINO, load_model

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def check_checkpoint(path) -> tuple[M2DINO, Path]:
    """The model of the checkpoint at `path` (its stem, <stem>.safetensors or <stem>.json) and
    its weights file, or ExportError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ExportError(f"{path} is not a safetensors m2dino checkpoint (a {suffix} file is a pickle, which is "
                          f"never loaded); export the <stem>.safetensors + <stem>.json pair that training writes "
                          f"(e.g. runs/default/au/all/best.safetensors)")
    if suffix not in ("", ".safetensors", ".json"):
        raise ExportError(f"{path} is not a safetensors m2dino checkpoint (expected <stem>.safetensors with "
                          f"<stem>.json beside it)")
    stem = path.with_suffix("") if suffix else path
    weights, config = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    try:
        model = load_model(stem)
    except (KeyError, TypeError, ValueError) as err:  # WeightsError is a ValueError
        raise ExportError(f"{weights} cannot be exported (an m2dino checkpoint is {weights.name}, the weights, "
                          f"+ {config.name}, the model config): {err}") from err
    # load_model has read the file, so it opens; the metadata tells whether save_model wrote it
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != "m2dino":
        raise ExportError(f"{weights} is a safetensors file but not an m2dino checkpoint: its metadata is "
                          f"{metadata!r}, m2dino.save_model writes {{'format': 'm2dino'}}")
    return model, weights
