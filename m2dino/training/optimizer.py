"""The optimizer of one model: its parameter groups (`param_groups`, the one place that decides
each parameter's rate and weight decay) and AdamW over them (`build_optimizer`)."""
from __future__ import annotations

import torch

from m2dino.models.moe import TaskMoE


def param_groups(model, config) -> list[dict]:
    """Backbone at lr, everything else (neck, heads) at lr x head_lr_mult; no weight decay on
    1-d parameters (biases, norms, LayerScale) and tokens. --freeze-backbone freezes the dense
    backbone; its MoE layers (routers and experts: every TaskMoE's parameters) keep training.
    Each group has a "name" (backbone, head, with _no_decay); the order is fixed."""
    backbone = {id(p) for p in model.backbone.parameters()}
    moe = {id(p) for m in model.backbone.modules() if isinstance(m, TaskMoE) for p in m.parameters()}
    groups = {}
    for name, p in model.named_parameters():
        in_backbone = id(p) in backbone
        if config.freeze_backbone and in_backbone and id(p) not in moe:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        head = not in_backbone
        no_decay = p.ndim <= 1 or "token" in name or name.endswith("periods")
        key = (head, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": config.lr * (config.head_lr_mult if head else 1.0),
                           "weight_decay": 0.0 if no_decay else config.weight_decay,
                           "name": f"{'head' if head else 'backbone'}{'_no_decay' if no_decay else ''}"}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model, config) -> torch.optim.AdamW:
    """AdamW over `param_groups`; ValueError when nothing is trainable."""
    groups = param_groups(model, config)
    if not groups:
        raise ValueError("no trainable parameters")
    # fused: one kernel over all parameters. The default per-parameter loop, and even foreach,
    # cost a large share of a small model's step on a CPU.
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
