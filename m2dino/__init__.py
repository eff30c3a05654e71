"""M2DINO: task-conditioned Mixture-of-Experts DINOv3 for multi-task ultrasound."""
from m2dino.backbone import (
    PRESETS,
    DinoV3ViT,
    WeightsError,
    build_backbone,
    dinov3_tiny,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vits16,
    dinov3_vits16plus,
    dinov3_vitt16,
)
from m2dino.losses import total_loss
from m2dino.model import M2DINO, create_model, load_model, save_model
from m2dino.moe import TaskMoE

__all__ = [
    "M2DINO",
    "PRESETS",
    "DinoV3ViT",
    "TaskMoE",
    "WeightsError",
    "build_backbone",
    "create_model",
    "dinov3_tiny",
    "dinov3_vitb16",
    "dinov3_vith16plus",
    "dinov3_vitl16",
    "dinov3_vits16",
    "dinov3_vits16plus",
    "dinov3_vitt16",
    "load_model",
    "save_model",
    "total_loss",
]
