"""DINOv3 checkpoints in, a built preset out: safe reading of weight files, timm's key
layout converted to the official one, strict key checks that name the preset a file fits,
and the preset builders (`build_backbone`, `dinov3_vitb16(weights=...)`), kept apart from the
ViT itself as DINOv3's own hub builders are.

Nothing here runs code from a file: `.pth` files are read with torch.load(weights_only=True)
(a pickle of arbitrary objects is refused) and `.safetensors` with safetensors.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from m2dino import io
from m2dino.errors import InputError, is_environment_fault
from m2dino.models.backbone import PRESETS, DinoV3Config, DinoV3ViT, RopePositionEmbedding


class WeightsError(InputError):
    """A weights file that cannot be loaded; the message names the file and the problem."""


def read_state_dict(path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or .pth/.pt file. Never runs code: torch.load(weights_only=True)
    refuses pickles of arbitrary objects. Containers {"model"|"state_dict"|"teacher": sd}
    are unwrapped."""
    path = Path(path)
    kind = io.file_kind(path)
    if kind == "missing":
        raise WeightsError(f"weights file {path} does not exist")
    if kind:
        raise WeightsError(f"weights file {path} is {kind}, not a file of weights")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"weights file {path} is not a readable safetensors file "
                               f"(truncated or corrupt?): {err}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refusing to load {path}: it is a pickle holding Python objects that could run "
            f"code when loaded (torch.load(weights_only=True) rejected it). Save the weights "
            f"as a plain state dict of tensors or as .safetensors. Detail: "
            f"{str(err).splitlines()[0]}") from err
    except OSError as err:
        if is_environment_fault(err):
            raise
        raise WeightsError(f"weights file {path} could not be read (truncated or corrupt?): "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError, IndexError,
            AttributeError, MemoryError, OverflowError) as err:  # what torch.load's readers raise on garbage
        raise WeightsError(f"weights file {path} could not be read (truncated or corrupt?): "
                           f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}") from err
    if isinstance(state, dict):
        for key in ("model", "state_dict", "teacher"):
            if isinstance(state.get(key), dict) and not isinstance(state.get(key), Tensor):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    # Upstream training checkpoints prefix their keys; the hub files do not.
    for prefix in ("backbone.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def is_timm_state_dict(state: dict) -> bool:
    return "reg_token" in state or any(k.endswith(".gamma_1") for k in state)


def convert_timm_state_dict(state: dict, config: DinoV3Config) -> dict[str, Tensor]:
    """timm Eva (vit_*_patch16_dinov3*) keys -> official DINOv3 keys.

    timm drops `periods`, `bias_mask` and `mask_token`: periods are rebuilt from the formula
    (timm computes them the same way, in fp32), bias_mask is [1, 0, 1], mask_token zeros.
    """
    out = {}
    dim = config.embed_dim
    for key, value in state.items():
        if key.endswith((".q_bias", ".v_bias")):
            continue
        new = key.replace("reg_token", "storage_tokens")
        new = new.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        new = (new.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2."))
        if config.ffn == "swiglu":
            new = new.replace(".mlp.fc2.", ".mlp.w3.")
        out[new] = value
    for index in range(config.depth):
        prefix = f"blocks.{index}.attn.qkv."
        if prefix + "weight" not in out:
            continue
        q_bias = state.get(f"blocks.{index}.attn.q_bias")
        v_bias = state.get(f"blocks.{index}.attn.v_bias")
        if prefix + "bias" not in out:
            if q_bias is None:
                q_bias = v_bias = torch.zeros(dim)
            out[prefix + "bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        out[prefix + "bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim),
                                               torch.ones(dim)])
    out.setdefault("mask_token", torch.zeros(1, dim))
    out.setdefault("rope_embed.periods", RopePositionEmbedding(config.head_dim,
                                                               config.rope_base).periods)
    return out


def _expected_shapes(config: DinoV3Config) -> dict[str, tuple]:
    with torch.device("meta"):
        model = DinoV3ViT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def presets_fitting(state: dict) -> list[str]:
    """Names of the presets whose every key and shape match the (official or timm) state."""
    fits = []
    for name, cfg in PRESETS.items():
        candidate = convert_timm_state_dict(state, cfg) if is_timm_state_dict(state) else state
        shapes = {k: tuple(v.shape) for k, v in candidate.items()}
        if _expected_shapes(cfg) == shapes:
            fits.append(name)
    return fits


def load_weights(model: DinoV3ViT, path) -> DinoV3ViT:
    """Strictly load official, timm-format or safetensors weights into a dense backbone."""
    raw = state = read_state_dict(path)
    if is_timm_state_dict(state):
        state = convert_timm_state_dict(state, model.config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(f"{k}: file {list(state[k].shape)} vs model {list(expected[k])}"
                         for k in set(expected) & set(state)
                         if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong_shape:
        fits = presets_fitting(raw)
        hint = (f"the file fits preset(s) {fits}" if fits
                else "no preset fits the file's keys and shapes")

        def listed(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"weights file {path} does not match preset {model.config.name!r} "
                 f"({hint})."]
        if missing:
            parts.append(f"missing keys: {listed(missing)}.")
        if unexpected:
            parts.append(f"unexpected keys: {listed(unexpected)}.")
        if wrong_shape:
            parts.append(f"wrong shapes: {listed(wrong_shape)}.")
        raise WeightsError(" ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def build_backbone(name: str, weights=None, rope_rescale_coords: Optional[float] = None,
                   **overrides) -> DinoV3ViT:
    """A preset by name (`PRESETS`), optionally with config overrides and weights."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]
    if overrides:
        config = DinoV3Config(**{**asdict(config), **overrides})
    model = DinoV3ViT(config, rope_rescale_coords=rope_rescale_coords)
    if weights is not None:
        load_weights(model, weights)
    return model


def _preset_builder(name: str):
    def build(weights=None, rope_rescale_coords: Optional[float] = None, **overrides):
        return build_backbone(name, weights=weights, rope_rescale_coords=rope_rescale_coords,
                              **overrides)
    build.__name__ = name
    build.__doc__ = f"DINOv3 preset {name} ({PRESETS[name]}); weights=PATH loads a file."
    return build


dinov3_vits16 = _preset_builder("dinov3_vits16")
dinov3_vits16plus = _preset_builder("dinov3_vits16plus")
dinov3_vitb16 = _preset_builder("dinov3_vitb16")
dinov3_vitl16 = _preset_builder("dinov3_vitl16")
dinov3_vith16plus = _preset_builder("dinov3_vith16plus")
dinov3_vitt16 = _preset_builder("dinov3_vitt16")
dinov3_tiny = _preset_builder("dinov3_tiny")
