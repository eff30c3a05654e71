"""Task-conditioned Mixture-of-Experts MLP and sparse upcycling of a dense DINOv3 backbone.

`TaskMoE` replaces `block.mlp` (norm2 and ls2 stay outside, in the block). Every token is
routed by the router of its image's task (per-task gate [num_tasks, E, D] + bias), to its
top-k experts, dropless, through the m2dino_kernels ops. Experts are stored in the kernels'
layout, one tensor per weight over all experts: fc1 [E, H1, D], fc2 [E, D, H]; a SwiGLU
expert's fc1 is cat(w1, w2) (H1 = 2H).

Upcycling (`TaskMoE.from_dense`, `upcycle_backbone`): every expert is a copy of the
pretrained MLP. Because the top-k weights are renormalised to sum to 1, identical experts
give exactly the dense output WHATEVER the router says, so the routers start from small
random weights (`router_init_std`, default 0.02; 0 gives all-zero routers). Random rather
than zero: zero routers tie every token to experts 0 and 1, which then get identical
gradients forever; small random routers spread the tokens, so the experts diverge.

Task ids are checked once per forward, on the B per-image values, by whoever enters first
(`validate_task_ids`: M2DINO on its host copy, else the backbone, else TaskMoE itself); the layers
below run with the kernels' checks off and read nothing back to the host.

Bookkeeping per forward (read by M2DINO after the backbone pass, so that gradient
checkpointing's recomputation cannot double count):
- `last_aux`: LayerAuxLosses(load_balance, z_loss, mutual_information, global_load_balance) of
  this layer: the kernels' three (m2dino_kernels.moe_aux_losses) and the Switch loss over ALL
  tokens (`global_load_balance`). The per-task balance pushes every task's router toward
  uniform use, which erases task structure from routing; the global one only asks the
  experts to be evenly used overall, so tasks may specialise (Mod-Squad's setting).
- `last_counts`: LongTensor[num_tasks, E], top-k assignments of each task's tokens.

DDP: all experts live in four tensors and all routers in two, and the kernels' backward
returns full-size gradients (zero rows for an expert that got no token, for a task with no
token), so every MoE parameter is always part of the graph: DistributedDataParallel works
with find_unused_parameters=False.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from m2dino_kernels import expert_mlp, moe_aux_losses, task_topk_route


class LayerAuxLosses(NamedTuple):
    load_balance: Tensor
    z_loss: Tensor
    mutual_information: Tensor
    global_load_balance: Tensor


# The auxiliary losses every MoE layer reports (their weights live in m2dino.training.losses).
AUX_NAMES = LayerAuxLosses._fields


def global_load_balance(routing) -> Tensor:
    """The Switch Transformer balance loss over all tokens, whatever their task:
    E * sum_e f[e] * P[e], f[e] the share of the top-k assignments that went to expert e,
    P[e] the mean router probability of e. 1 when balanced, E when one expert takes all;
    gradient through P only (fp32; 0 for no token)."""
    probs = routing.probs.float()
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum()
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
    assigned.index_add_(0, routing.experts.reshape(-1),
                        torch.ones(routing.experts.numel(), dtype=torch.float32, device=probs.device))
    share = assigned / routing.experts.numel()
    return num_experts * (share * probs.mean(dim=0)).sum()


def validate_task_ids(task_ids: Tensor, batch: int, num_tasks: int) -> None:
    """Raise naming the problem unless task_ids is an integer tensor [batch] with values in
    [0, num_tasks). One host read (min and max together); none under torch.compile tracing."""
    if not isinstance(task_ids, Tensor) or task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise TypeError("task_ids must be an integer tensor of task indices "
                        "(use model.task_index(list_of_task_names))")
    if tuple(task_ids.shape) != (batch,):
        raise ValueError(f"task_ids must have shape [B] = [{batch}] (one per image), got {list(task_ids.shape)}")
    if batch == 0 or torch.compiler.is_compiling():
        return
    low, high = torch.stack(torch.aminmax(task_ids)).tolist()
    if low < 0 or high >= num_tasks:
        raise ValueError(f"task_ids must be in [0, {num_tasks}), got values in [{low}, {high}]")


class TaskMoE(nn.Module):
    task_conditioned = True  # Block passes the per-image task ids

    def __init__(self, dim: int, hidden: int, num_tasks: int, num_experts: int = 8,
                 top_k: int = 2, activation: str = "gelu", router_init_std: float = 0.02):
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim, self.hidden = dim, hidden
        self.num_tasks, self.num_experts, self.top_k = num_tasks, num_experts, top_k
        self.activation = activation
        hidden_in = 2 * hidden if activation == "swiglu" else hidden
        self.gate_weight = nn.Parameter(torch.randn(num_tasks, num_experts, dim) * router_init_std)
        self.gate_bias = nn.Parameter(torch.zeros(num_tasks, num_experts))
        self.fc1_weight = nn.Parameter(torch.randn(num_experts, hidden_in, dim) * 0.02)
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_in))
        self.fc2_weight = nn.Parameter(torch.randn(num_experts, dim, hidden) * 0.02)
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.last_aux = None
        self.last_counts = None

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_tasks: int, num_experts: int = 8, top_k: int = 2,
                   router_init_std: float = 0.02) -> "TaskMoE":
        """Sparse upcycling: every expert a copy of the dense `Mlp` (fc1, fc2) or
        `SwiGLUFFN` (w1, w2, w3)."""
        if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
            activation = "gelu"
            fc1_w, fc1_b = mlp.fc1.weight, mlp.fc1.bias
            fc2_w, fc2_b = mlp.fc2.weight, mlp.fc2.bias
        elif all(hasattr(mlp, name) for name in ("w1", "w2", "w3")):
            activation = "swiglu"
            fc1_w = torch.cat([mlp.w1.weight, mlp.w2.weight], dim=0)
            fc1_b = torch.cat([mlp.w1.bias, mlp.w2.bias], dim=0)
            fc2_w, fc2_b = mlp.w3.weight, mlp.w3.bias
        else:
            raise TypeError(f"cannot upcycle {type(mlp).__name__}: expected an MLP with fc1/fc2 "
                            f"or a SwiGLU FFN with w1/w2/w3")
        dim, hidden = fc2_w.shape
        moe = cls(dim, hidden, num_tasks, num_experts, top_k, activation, router_init_std)
        moe.to(device=fc1_w.device, dtype=fc1_w.dtype)
        with torch.no_grad():
            moe.fc1_weight.copy_(fc1_w.detach().expand(num_experts, -1, -1))
            moe.fc1_bias.copy_(fc1_b.detach().expand(num_experts, -1))
            moe.fc2_weight.copy_(fc2_w.detach().expand(num_experts, -1, -1))
            moe.fc2_bias.copy_(fc2_b.detach().expand(num_experts, -1))
        return moe

    def forward(self, x: Tensor, task_ids: Tensor, check_task_ids: bool = True) -> Tensor:
        """x [B, N, D]; task_ids [B] task indices, one per image (repeated over its tokens).
        check_task_ids=False: the caller has range-checked task_ids (see the module doc)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"TaskMoE input must have shape [B, N, {self.dim}], "
                             f"got {list(x.shape)}")
        batch, tokens, dim = x.shape
        if check_task_ids:
            validate_task_ids(task_ids, batch, self.num_tasks)
        elif task_ids.shape != (batch,):
            raise ValueError(f"task_ids must have shape [B] = [{batch}] (one per image), "
                             f"got {list(task_ids.shape)}")
        # Under autocast the experts run in the autocast dtype (LayerNorm hands us fp32), so
        # the grouped GEMMs get bf16/fp16 tensor-core rates like the dense nn.Linear they replace.
        dtype = (torch.get_autocast_dtype(x.device.type)
                 if torch.is_autocast_enabled(x.device.type) else x.dtype)
        flat = x.reshape(batch * tokens, dim).to(dtype)
        token_tasks = task_ids.to(device=x.device, dtype=torch.int64).repeat_interleave(tokens)
        # the ids are checked above (or by the caller), the routing is the op's own: the kernels
        # need not read anything back to the host
        routing = task_topk_route(flat, token_tasks, self.gate_weight.to(dtype),
                                  self.gate_bias.to(dtype), top_k=self.top_k, check_task_ids=False)
        out = expert_mlp(flat, routing, self.fc1_weight.to(dtype), self.fc1_bias.to(dtype),
                         self.fc2_weight.to(dtype), self.fc2_bias.to(dtype),
                         activation=self.activation, check_routing=False)
        self.last_aux = LayerAuxLosses(*moe_aux_losses(routing, token_tasks, self.num_tasks, check_task_ids=False),
                                       global_load_balance(routing))
        with torch.no_grad():
            counts = torch.zeros(self.num_tasks, self.num_experts, dtype=torch.int64,
                                 device=x.device)
            counts.index_put_((token_tasks[:, None].expand_as(routing.experts), routing.experts),
                              torch.ones_like(routing.experts), accumulate=True)
        self.last_counts = counts
        return out.reshape(batch, tokens, dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_tasks={self.num_tasks}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={self.activation}")


def upcycle_backbone(backbone: nn.Module, num_tasks: int, num_experts: int = 8, top_k: int = 2,
                     moe_layers: int = 6, router_init_std: float = 0.02) -> list[int]:
    """Replace the MLP of the last `moe_layers` blocks by upcycled TaskMoEs; returns their
    block indices. moe_layers=0 leaves the backbone dense."""
    depth = len(backbone.blocks)
    if not 0 <= moe_layers <= depth:
        raise ValueError(f"moe_layers must be in [0, depth={depth}], got {moe_layers}")
    indices = list(range(depth - moe_layers, depth))
    for index in indices:
        block = backbone.blocks[index]
        block.mlp = TaskMoE.from_dense(block.mlp, num_tasks, num_experts, top_k,
                                       router_init_std)
    return indices


def num_tasks_of(backbone: nn.Module) -> int | None:
    """The task count of a backbone's MoE layers (None for a dense backbone)."""
    layers = moe_modules(backbone)
    return next(iter(layers.values())).num_tasks if layers else None


def moe_modules(backbone: nn.Module) -> dict[int, TaskMoE]:
    """{block index: TaskMoE} of the backbone's MoE blocks."""
    return {index: block.mlp for index, block in enumerate(backbone.blocks)
            if isinstance(block.mlp, TaskMoE)}
