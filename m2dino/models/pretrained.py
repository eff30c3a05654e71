"""The DINOv3 weights a model starts from: where Meta publishes them and which file fits each
preset, the check of a weights file before a run spends anything on it, and the record a
checkpoint keeps of it.

- `check_weights_file(path, model_config)`: the file exists and is readable, it is safetensors
  or a checkpoint that torch.load(weights_only=True) accepts (never a pickle that runs code),
  and its keys and shapes fit the preset. Only the file's header (safetensors) or its pickle
  (torch.load with the tensor bytes skipped) is read: seconds, whatever the file's size.
- `OFFICIAL_FILES` / `where_to_get(preset)`: the released file of each official preset and the
  page it is requested from. Nothing is ever downloaded.
- `pretrained_record(path, preset)`: what a checkpoint's json keeps under `pretrained`:
  {"file": name, "sha256": hex, "preset": name}, or `FROM_SCRATCH` ("none") for a model that
  started from random weights.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from m2dino.models.backbone import DinoV3ViT, M2DINOConfig
from m2dino.models.weights import (
    WeightsError,
    convert_timm_state_dict,
    is_timm_state_dict,
    presets_fitting,
    read_state_dict,
)

RELEASE_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
RELEASE_REPO = "https://github.com/facebookresearch/dinov3"
# Meta's released backbones (LVD-1689M pretraining), by the preset whose shapes they fit
OFFICIAL_FILES = {
    "dinov3_vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "dinov3_vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "dinov3_vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "dinov3_vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "dinov3_vith16plus": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
}
FROM_SCRATCH = "none"  # the `pretrained` record of a model that started from random weights


def where_to_get(preset: str) -> str:
    """Which file fits `preset` and where Meta publishes it (a sentence)."""
    name = OFFICIAL_FILES.get(preset)
    if name is None:
        return f"{preset} has no official DINOv3 release; weights of its shapes come from your own training"
    return (f"the official {preset} weights are {name}, published by Meta: request access at {RELEASE_PAGE} "
            f"(see {RELEASE_REPO}), which e-mails the download links; nothing is downloaded at run time")


def read_shapes(path) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a weights file, without reading its tensors: a .safetensors header, or a
    .pth/.pt unpickled with torch.load(weights_only=True) and the tensor bytes skipped
    (containers and key prefixes unwrapped as read_state_dict does for the real load)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise WeightsError(f"weights file {path} is not readable (permissions)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"weights file {path} is not a readable safetensors file "
                               f"(truncated or corrupt?): {err}") from err
    skip = getattr(torch.serialization, "skip_data", None)  # torch >= 2.5; else a full (safe) read
    if skip is None:
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    with skip():
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def check_weights_file(path, model: M2DINOConfig) -> None:
    """WeightsError naming the file and what is wrong unless `path` would load strictly into
    the backbone of `model` (its preset with its backbone_overrides): see the module doc."""
    try:
        shapes = read_shapes(path)
    except WeightsError as err:
        if model.name not in OFFICIAL_FILES:
            raise
        raise WeightsError(f"{err} ({where_to_get(model.name)})") from err
    config = model.backbone_config()
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    if is_timm_state_dict(state):
        state = convert_timm_state_dict(state, config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DinoV3ViT(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found == expected:
        return
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {list(found[k])} vs model {list(expected[k])}"
                   for k in set(found) & set(expected) if found[k] != expected[k])
    fits = presets_fitting({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    problems = [f"{what}: {', '.join(keys[:5])}{f' ... ({len(keys)} in all)' if len(keys) > 5 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", wrong)) if keys]
    fit = f"the file fits preset(s) {', '.join(fits)}" if fits else "no preset fits the file's keys and shapes"
    raise WeightsError(f"weights file {path} does not fit --model {model.name} ({fit}); "
                       + "; ".join(problems) + f". As for where to get weights: {where_to_get(model.name)}")


def file_sha256(path) -> str:
    """The sha256 of a file, read in 1 MiB blocks; remembered per (file, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_record(path, preset: str) -> dict | str:
    """A checkpoint's `pretrained` field: the weights file a model started from (its name, its
    sha256, the preset), or FROM_SCRATCH when `path` is None."""
    if path is None:
        return FROM_SCRATCH
    return {"file": Path(path).name, "sha256": file_sha256(path), "preset": preset}


def describe_record(record) -> str:
    """One phrase for a `pretrained` record (None: a checkpoint that predates the record)."""
    if record == FROM_SCRATCH:
        return "trained from random weights (no DINOv3 weights)"
    if isinstance(record, dict):
        return (f"fine-tuned from Meta's DINOv3 weights {record.get('file')} (preset {record.get('preset')}, "
                f"sha256 {str(record.get('sha256'))[:16]}...)")
    return "of unrecorded origin (the checkpoint predates the `pretrained` record)"
