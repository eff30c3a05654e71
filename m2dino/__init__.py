"""M2DINO: task-conditioned Mixture-of-Experts DINOv3 for multi-task ultrasound.

    model = m2dino.create_model("dinov3_vitb16", tasks, pretrained="dinov3_vitb16_....pth")
    outputs = model(images, model.task_index(task_names))
    loss, logs = m2dino.total_loss(outputs, targets, model.tasks)

The package follows the data flow: tasks.py (the registry) -> data/ -> models/ -> training/ ->
evaluation/, with `python -m m2dino.train | predict | evaluate | report` as thin entry points.

The names below are imported on first use (PEP 562), so that importing a torch-free
submodule (the configs the command lines read) does not import torch."""
from __future__ import annotations

from m2dino import models as _models  # torch-free: its names are lazy too
from m2dino._lazy import lazy_exports

# every public name of m2dino.models but its internals' (aux loss names, the raw weight loader)
_SOURCES = {**{name: "m2dino.models" for name in _models.__all__ if name not in ("AUX_NAMES", "load_weights")},
            "total_loss": "m2dino.training.losses"}
__all__ = sorted(_SOURCES)
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)
