"""How large a model is: its parameters in total and those one token passes through.

`parameter_counts(model_or_config)` counts an M2DINO, or builds one on the meta device (no
memory, no weights) from a checkpoint's config (best.json, as `save_model` writes it) or from an
M2DINOConfig and its tasks. Training records the counts in each model's metrics.json entry; the
report reads them there, or counts them from best.json for runs that predate that.

Active per token: a token of task t passes through the backbone outside its MoE layers, in each
MoE layer task t's router and top_k of the E experts (so top_k / E of the experts' parameters),
the neck when t is a spatial task (segmentation, landmarks, detection), and t's head. The count
is the largest over the model's tasks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields

import torch
from torch import nn

from m2dino.models.configs import M2DINOConfig
from m2dino.models.m2dino import M2DINO, SPATIAL_TYPES
from m2dino.models.moe import moe_modules
from m2dino.tasks import TaskSpec

EXPERT_PARAMETERS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def parameter_counts(model_or_config, tasks: Sequence | None = None) -> dict[str, int]:
    """{"total", "active_per_token"} parameters of a model.

    model_or_config: an M2DINO; a checkpoint config mapping (best.json: the config's fields and
    "tasks"); or an M2DINOConfig, then with `tasks` (TaskSpecs or registry task ids).
    """
    model = _model(model_or_config, tasks)
    layers = list(moe_modules(model.backbone).values())
    routers = sum(_count_of(m, ("gate_weight", "gate_bias")) for m in layers)
    experts = sum(_count_of(m, EXPERT_PARAMETERS) for m in layers)
    dense_backbone = _count(model.backbone) - routers - experts
    # one task's router and top_k / E of the experts, per MoE layer
    routed = sum(_count_of(m, ("gate_weight", "gate_bias")) / m.num_tasks
                 + _count_of(m, EXPERT_PARAMETERS) * m.top_k / m.num_experts for m in layers)
    neck = _count(model.neck)
    per_task = [dense_backbone + routed + (neck if task.task_type in SPATIAL_TYPES else 0)
                + _count(model.heads[task.task_id]) for task in model.tasks]
    return {"total": _count(model), "active_per_token": int(round(max(per_task)))}


def _model(model_or_config, tasks) -> M2DINO:
    if isinstance(model_or_config, M2DINO):
        return model_or_config
    if isinstance(model_or_config, M2DINOConfig):
        if tasks is None:
            raise ValueError("parameter_counts(config, tasks): an M2DINOConfig needs the model's tasks")
        config = model_or_config
    elif isinstance(model_or_config, Mapping):
        if "tasks" not in model_or_config and tasks is None:
            raise ValueError("parameter_counts: the checkpoint config has no 'tasks' (expected best.json's content)")
        config = M2DINOConfig.from_dict(model_or_config)
        if tasks is None:
            known = {f.name for f in fields(TaskSpec)}
            tasks = [TaskSpec.from_dict({k: v for k, v in t.items() if k in known}) for t in model_or_config["tasks"]]
    else:
        raise TypeError(f"parameter_counts: expected an M2DINO, a checkpoint config mapping or an M2DINOConfig, "
                        f"got {type(model_or_config).__name__}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return M2DINO(config, tasks)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_of(module: nn.Module, names: Sequence[str]) -> int:
    return sum(getattr(module, name).numel() for name in names)
