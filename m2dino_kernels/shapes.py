"""The shapes the kernels are written for and checked at: one table, read by the attention
rules (m2dino_kernels.selection), the Triton attention kernels and m2dino_kernels.inspect.

No torch import: the command-line tools read this before anything heavy.
"""
from __future__ import annotations

from typing import NamedTuple

# Head dims the Triton attention kernels take (every official preset has 64).
TRITON_HEAD_DIMS = (32, 64, 128)


class PresetShape(NamedTuple):
    """One official backbone preset, as the kernels see it."""

    preset: str
    embed_dim: int     # D of the MoE ops
    mlp_hidden: int    # H of the expert MLPs
    activation: str    # "gelu" or "swiglu"
    head_dim: int


# The official DINOv3 presets (m2dino.models.configs.PRESETS; this package does not import
# m2dino, and tests/kernels/test_triton_compile.py keeps the two equal).
PRESET_SHAPES = (
    PresetShape("dinov3_vits16", 384, 1536, "gelu", 64),
    PresetShape("dinov3_vits16plus", 384, 1536, "swiglu", 64),
    PresetShape("dinov3_vitb16", 768, 3072, "gelu", 64),
    PresetShape("dinov3_vitl16", 1024, 4096, "gelu", 64),
    PresetShape("dinov3_vith16plus", 1280, 5120, "swiglu", 64),
)
