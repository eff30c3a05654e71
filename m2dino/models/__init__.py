"""The model: a faithful DINOv3 ViT (backbone.py) loaded from official weights (weights.py),
task-conditioned MoE MLPs upcycled from it (moe.py), the shared neck and task heads (heads.py),
and M2DINO with create/save/load (m2dino.py). Models never import training or evaluation."""
from m2dino.models.backbone import PRESETS, DinoV3Config, DinoV3ViT, M2DINOConfig
from m2dino.models.m2dino import M2DINO, create_model, load_model, save_model
from m2dino.models.moe import AUX_NAMES, TaskMoE
from m2dino.models.weights import (
                                   WeightsError,
                                   build_backbone,
                                   dinov3_tiny,
                                   dinov3_vitb16,
                                   dinov3_vith16plus,
                                   dinov3_vitl16,
                                   dinov3_vits16,
                                   dinov3_vits16plus,
                                   dinov3_vitt16,
                                   load_weights,
)

__all__ = [
    "AUX_NAMES", "DinoV3Config", "DinoV3ViT", "M2DINO", "M2DINOConfig", "PRESETS", "TaskMoE", "WeightsError",
    "build_backbone", "create_model", "dinov3_tiny", "dinov3_vitb16", "dinov3_vith16plus", "dinov3_vitl16",
    "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitt16", "load_model", "load_weights", "save_model",
]
