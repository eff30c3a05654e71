"""m2dino_kernels: fused task-conditioned MoE routing, grouped expert MLPs and RoPE attention.

Every op has a plain PyTorch reference (the oracle) and faster backends behind one API.
"""
from m2dino_kernels.attention import attention
from m2dino_kernels.aux_losses import MoEAuxLosses, moe_aux_losses
from m2dino_kernels.moe import ExpertWeights, Routing, expert_mlp, task_topk_route
from m2dino_kernels.registry import available_backends
from m2dino_kernels.selection import get_backend, set_backend, use_backend

__all__ = [
    "ExpertWeights",
    "MoEAuxLosses",
    "Routing",
    "attention",
    "available_backends",
    "expert_mlp",
    "get_backend",
    "moe_aux_losses",
    "set_backend",
    "task_topk_route",
    "use_backend",
]
