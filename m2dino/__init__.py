"""M2DINO: task-conditioned Mixture-of-Experts DINOv3 for multi-task ultrasound.

    model = m2dino.create_model("dinov3_vitb16", tasks, pretrained="dinov3_vitb16_....pth")
    outputs = model(images, model.task_index(task_names))
    loss, logs = m2dino.total_loss(outputs, targets, model.tasks)

The package follows the data flow: tasks.py (the registry) -> data/ -> models/ -> training/ ->
evaluation/, with `python -m m2dino.train | predict | evaluate | report` as thin entry points.

The names below are imported on first use (PEP 562), so that importing a torch-free
submodule (the configs the command lines read) does not import torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from m2dino._lazy import lazy_exports

if TYPE_CHECKING:
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

_SOURCES = {
    "M2DINO": "m2dino.models",
    "PRESETS": "m2dino.models",
    "DinoV3Config": "m2dino.models",
    "DinoV3ViT": "m2dino.models",
    "M2DINOConfig": "m2dino.models",
    "TaskMoE": "m2dino.models",
    "WeightsError": "m2dino.models",
    "build_backbone": "m2dino.models",
    "create_model": "m2dino.models",
    "dinov3_tiny": "m2dino.models",
    "dinov3_vitb16": "m2dino.models",
    "dinov3_vith16plus": "m2dino.models",
    "dinov3_vitl16": "m2dino.models",
    "dinov3_vits16": "m2dino.models",
    "dinov3_vits16plus": "m2dino.models",
    "dinov3_vitt16": "m2dino.models",
    "load_model": "m2dino.models",
    "save_model": "m2dino.models",
    "total_loss": "m2dino.training.losses",
}
__all__ = [
    "DinoV3Config",
    "DinoV3ViT",
    "M2DINO",
    "M2DINOConfig",
    "PRESETS",
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
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

