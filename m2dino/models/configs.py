"""The model's hyperparameters as plain dataclasses, with no torch: the backbone presets
(DinoV3Config, PRESETS), M2DINOConfig, and the MoE auxiliary losses' default weights. The
command lines read them to build and check their options before torch is imported; backbone.py,
heads.py and the losses re-export them. M2DINOConfig's fields are declared as options here (their
help, type and parsing: m2dino.options), and the training command line is generated from them."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Literal, Optional

import yaml

from m2dino.options import as_number, option, split_words

# The MoE auxiliary losses' weights when none are given (training's defaults too; the names are
# m2dino.models.moe.AUX_NAMES): the per-task Switch load balance and the router z-loss on,
# Mod-Squad's task-expert mutual information and the all-token (global) balance off.
DEFAULT_AUX_WEIGHTS = {"load_balance": 0.01, "z_loss": 0.001, "mutual_information": 0.0, "global_load_balance": 0.0}


def default_neck_layers(depth: int) -> list[int]:
    """Four block indices spread over the depth, ending with the last block (DPT's choice)."""
    if depth < 4:
        raise ValueError(f"the neck needs a backbone of depth >= 4, got {depth}")
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DinoV3Config:
    name: str
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    ffn: str = "mlp"               # "mlp" (GELU) or "swiglu"
    rope_base: float = 100.0       # only used to initialise `periods` before a checkpoint loads
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-5
    official: bool = True          # False for our own CPU preset

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":  # official SwiGLUFFN: 2/3 of the ratio, rounded up to 8
            hidden = int(hidden * 2 / 3)
            hidden = (hidden + 7) // 8 * 8
        return hidden


PRESETS: dict[str, DinoV3Config] = {
    "dinov3_vits16": DinoV3Config("dinov3_vits16", embed_dim=384, depth=12, num_heads=6),
    "dinov3_vits16plus": DinoV3Config("dinov3_vits16plus", embed_dim=384, depth=12, num_heads=6,
                                      mlp_ratio=6.0, ffn="swiglu"),
    "dinov3_vitb16": DinoV3Config("dinov3_vitb16", embed_dim=768, depth=12, num_heads=12),
    "dinov3_vitl16": DinoV3Config("dinov3_vitl16", embed_dim=1024, depth=24, num_heads=16),
    "dinov3_vith16plus": DinoV3Config("dinov3_vith16plus", embed_dim=1280, depth=32,
                                      num_heads=20, mlp_ratio=6.0, ffn="swiglu"),
    # timm's distilled tiny DINOv3 (vit_tiny_patch16_dinov3_qkvb, not a Meta release): a fast
    # timm parity check.
    "dinov3_vitt16": DinoV3Config("dinov3_vitt16", embed_dim=192, depth=12, num_heads=3,
                                  official=False),
    # OURS, not an official model: the CPU preset for tests and the default small run.
    "dinov3_tiny": DinoV3Config("dinov3_tiny", patch_size=8, embed_dim=96, depth=6, num_heads=3,
                                official=False),
}


def _parse_neck_layers(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in split_words(value))
    except (TypeError, ValueError):
        raise ValueError(f"--neck-layers: expected 4 block indices separated by commas (2,5,8,11), "
                         f"got {value!r}") from None


def _parse_overrides(value) -> dict[str, Any]:
    """`depth=4,embed_dim=64` (values read as YAML scalars) or a mapping from YAML."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = []
        for part in (p.strip() for p in str(value).split(",")):
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"--backbone-overrides: expected field=value pairs separated by commas, "
                                 f"got {part!r}")
            k, v = part.split("=", 1)
            items.append((k.strip(), yaml.safe_load(v.strip())))
    kinds = {f.name: type(f.default) for f in fields(DinoV3Config) if f.default is not MISSING}
    out = {}
    for k, v in items:  # typed as the DinoV3Config field (YAML reads 1e-4 as a string)
        kind = kinds.get(k)
        if kind in (int, float) and not isinstance(v, bool):
            v = as_number("backbone_overrides", v, kind)
        out[k] = v
    return out


PresetName = Literal[tuple(PRESETS)]


@dataclass(frozen=True)
class M2DINOConfig:
    """Every hyperparameter of an M2DINO model, in one place: what create_model takes, what
    a checkpoint's <stem>.json stores (with the tasks) and what training resolves from its
    options. Defaults: M2DINO's own (8 experts, top-2, MoE in the last 6 blocks); the CPU demo's
    smaller model is m2dino.training.config's default. `img_size` and `neck_layers` left None
    follow the preset (64 px for dinov3_tiny, else 224; four blocks spread over the depth)."""
    name: PresetName = option("dinov3_tiny", "backbone preset; an official one takes its recipe's architecture and "
                                             "image size", name="model", metavar="PRESET")
    num_experts: int = option(8, "experts per MoE layer")
    top_k: int = option(2, "experts per token")
    moe_layers: int = option(6, "how many of the last blocks get a task-conditioned MoE MLP")
    img_size: Optional[int] = option(None, "input resolution (images are resized to S x S)",
                                     unset="the preset's: 64 for dinov3_tiny, else 224")
    neck_channels: int = option(64, "channels of the shared spatial neck and of the heads' conv blocks")
    neck_layers: Optional[tuple[int, ...]] = option(None, "the 4 blocks the neck reads, comma separated",
                                                    parse=_parse_neck_layers,
                                                    unset="4 spread over the depth, ending at the last")
    router_init_std: float = option(0.02, "standard deviation of the routers' initial weights")
    rope_rescale_coords: Optional[float] = option(None, "RoPE coordinate rescale R in training (log-uniform in "
                                                        "[1/R, R])", unset="off")
    backbone_overrides: dict[str, Any] = option(help="DinoV3Config fields to change on the preset, "
                                                     "field=value,field=value (e.g. depth=4)",
                                                factory=dict, parse=_parse_overrides)

    def __post_init__(self):
        if self.neck_layers is not None:  # a list from JSON/YAML: stored as a tuple (frozen)
            object.__setattr__(self, "neck_layers", tuple(int(i) for i in self.neck_layers))
        object.__setattr__(self, "backbone_overrides", dict(self.backbone_overrides or {}))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "M2DINOConfig":
        """A mapping (a checkpoint's json, a YAML section) -> config; keys that are not fields
        (format_version, tasks) are ignored, missing ones take the defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["neck_layers"] = None if self.neck_layers is None else list(self.neck_layers)
        return data

    def backbone_config(self) -> DinoV3Config:
        """The preset's DinoV3Config with the overrides applied."""
        if self.name not in PRESETS:
            raise ValueError(f"unknown backbone preset {self.name!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[self.name]
        unknown = sorted(set(self.backbone_overrides) - {f.name for f in fields(DinoV3Config)})
        if unknown:
            raise ValueError(f"backbone_overrides: {unknown} are not DinoV3Config fields")
        return replace(preset, **self.backbone_overrides) if self.backbone_overrides else preset

    def problems(self) -> list[tuple[str, str]]:
        """[(field, why)] for every impossible value (empty when the config is valid)."""
        out = []
        if self.name not in PRESETS:
            out.append(("name", f"unknown backbone preset {self.name!r}; choose one of {sorted(PRESETS)}"))
            return out
        for name in ("num_experts", "top_k", "neck_channels"):
            if int(getattr(self, name)) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.img_size is not None and self.img_size < 1:
            out.append(("img_size", f"must be >= 1, got {self.img_size}"))
        if self.top_k > self.num_experts:
            out.append(("top_k", f"must be <= num_experts ({self.num_experts}), got {self.top_k}"))
        try:
            depth = self.backbone_config().depth
        except (ValueError, TypeError) as e:
            return out + [("backbone_overrides", str(e))]
        if not 0 <= self.moe_layers <= depth:
            out.append(("moe_layers", f"must be in [0, depth={depth}], got {self.moe_layers}"))
        if self.neck_layers is not None and (len(self.neck_layers) != 4
                                             or not all(0 <= i < depth for i in self.neck_layers)):
            out.append(("neck_layers", f"must be 4 block indices in [0, {depth}), got {list(self.neck_layers)}"))
        if not (math.isfinite(self.router_init_std) and self.router_init_std >= 0):
            out.append(("router_init_std", f"must be a number >= 0, got {self.router_init_std}"))
        if self.rope_rescale_coords is not None and not self.rope_rescale_coords >= 1:
            out.append(("rope_rescale_coords", f"must be >= 1 (or unset), got {self.rope_rescale_coords}"))
        return out

    def validate(self) -> "M2DINOConfig":
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{name}: {why}" for name, why in problems))
        return self

    def resolved(self) -> "M2DINOConfig":
        """The same config with img_size and neck_layers filled in from the preset."""
        depth = self.backbone_config().depth
        img_size = self.img_size if self.img_size is not None else (64 if self.name == "dinov3_tiny" else 224)
        neck = self.neck_layers if self.neck_layers is not None else default_neck_layers(depth)
        return replace(self, img_size=img_size, neck_layers=neck)
