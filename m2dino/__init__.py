"""M2DINO: task-conditioned Mixture-of-Experts DINOv3 for multi-task ultrasound.

    model = m2dino.create_model("dinov3_vitb16", tasks, pretrained="dinov3_vitb16_....pth")
    outputs = model(images, model.task_index(task_names))
    loss, logs = m2dino.total_loss(outputs, targets, model.tasks)

The package follows the data flow: tasks.py (the registry) -> data/ -> models/ -> training/ ->
evaluation/, with `python -m m2dino.train | predict | evaluate | report` as thin entry points.
"""
from m2dino.models import (
    M2DINO,
    PRESETS,
    DinoV3Config,
    DinoV3ViT,
    M2DINOConfig,
    TaskMoE,
    WeightsError,
    build_backbone,
    create_model,
    dinov3_tiny,
    dinov3_vitb16,
    dinov3_vith16plus,
    dinov3_vitl16,
    dinov3_vits16,
    dinov3_vits16plus,
    dinov3_vitt16,
    load_model,
    save_model,
)
from m2dino.training.losses import total_loss

__all__ = [
    "M2DINO",
    "PRESETS",
    "DinoV3Config",
    "DinoV3ViT",
    "M2DINOConfig",
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
