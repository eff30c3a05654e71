"""The model: a faithful DINOv3 ViT (backbone.py) loaded from official weights (weights.py),
task-conditioned MoE MLPs upcycled from it (moe.py), the shared neck and task heads (heads.py),
and M2DINO with create/save/load (m2dino.py). Models never import training or evaluation.

The names below are imported on first use (PEP 562), so that importing a torch-free
submodule (the configs the command lines read) does not import torch."""
from __future__ import annotations

from m2dino._lazy import lazy_exports

_SOURCES = {
    "PRESETS": "m2dino.models.configs",
    "DinoV3Config": "m2dino.models.configs",
    "M2DINOConfig": "m2dino.models.configs",
    "DinoV3ViT": "m2dino.models.backbone",
    "M2DINO": "m2dino.models.m2dino",
    "create_model": "m2dino.models.m2dino",
    "load_model": "m2dino.models.m2dino",
    "save_model": "m2dino.models.m2dino",
    "AUX_NAMES": "m2dino.models.moe",
    "TaskMoE": "m2dino.models.moe",
    "WeightsError": "m2dino.models.weights",
    "build_backbone": "m2dino.models.weights",
    "dinov3_tiny": "m2dino.models.weights",
    "dinov3_vitb16": "m2dino.models.weights",
    "dinov3_vith16plus": "m2dino.models.weights",
    "dinov3_vitl16": "m2dino.models.weights",
    "dinov3_vits16": "m2dino.models.weights",
    "dinov3_vits16plus": "m2dino.models.weights",
    "dinov3_vitt16": "m2dino.models.weights",
    "load_weights": "m2dino.models.weights",
}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

