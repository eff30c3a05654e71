"""Auxiliary router losses of a task-conditioned MoE, returned separately for weighting.

- load_balance: the Switch Transformer loss computed per task, because each task has its own
  router: for each task t with tokens, E * sum_e f[t, e] * P[t, e], where f[t, e] is the share
  of task t's top-k assignments that went to expert e and P[t, e] the mean router
  probability of e over task t's tokens; averaged over the tasks that have tokens. It is 1
  for a perfectly balanced router and E when one expert takes everything. Gradient flows
  through P only (f counts discrete choices).
- z_loss: mean over tokens of logsumexp(logits)^2 (ST-MoE), keeps router logits small.
- mutual_information: Mod-Squad's task-expert loss, minus the mutual information between
  task and expert under the joint distribution P(t, e) = M[t, e] / sum(M), where M[t, e]
  sums the router probabilities of task t's tokens for expert e (so P(t) is task t's
  share of the tokens). Minimising it makes each task use a few experts and experts
  specialise, while different tasks spread over different experts.

Tasks with no token contribute nothing and never produce NaN; an empty batch gives zeros.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class MoEAuxLosses(NamedTuple):
    load_balance: Tensor
    z_loss: Tensor
    mutual_information: Tensor


def _plogp(p: Tensor) -> Tensor:
    """p * log(p) with 0 * log(0) = 0 and a zero (not NaN) gradient at p = 0."""
    positive = p > 0
    return torch.where(positive, p * torch.log(torch.where(positive, p, torch.ones_like(p))),
                       torch.zeros_like(p))


def _validate(routing, task_ids, num_tasks, check_task_ids):
    for name in ("probs", "logits", "experts"):
        if not isinstance(getattr(routing, name, None), Tensor):
            raise TypeError(f"routing must be the Routing returned by task_topk_route "
                            f"(missing tensor field {name!r})")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    if not isinstance(task_ids, Tensor) or task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise TypeError("task_ids must be an integer tensor")
    num_tokens = routing.probs.shape[0]
    if tuple(task_ids.shape) != (num_tokens,):
        raise ValueError(f"task_ids must have shape [T] = [{num_tokens}] (rows of "
                         f"routing.probs {list(routing.probs.shape)}), got {list(task_ids.shape)}")
    if task_ids.device != routing.probs.device:
        raise ValueError(f"task_ids is on {task_ids.device} but routing is on "
                         f"{routing.probs.device}")
    # The value check reads the ids on the host: eager only (under torch.compile it would
    # break the graph; task_topk_route has already range-checked the same ids in its op),
    # and not for a caller that has checked them already.
    if not check_task_ids or torch.compiler.is_compiling() or num_tokens == 0:
        return
    if int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks:
        raise ValueError(f"task_ids must be in [0, num_tasks) = [0, {num_tasks}), got values "
                         f"in [{int(task_ids.min())}, {int(task_ids.max())}]")


def moe_aux_losses(routing, task_ids, num_tasks: int, *, check_task_ids: bool = True) -> MoEAuxLosses:
    """Per-task load balancing, router z-loss and task-expert mutual information (fp32).
    check_task_ids=False skips the range check of the ids (a host read) for callers that
    have validated them."""
    _validate(routing, task_ids, num_tasks, check_task_ids)
    probs = routing.probs.float()
    logits = routing.logits.float()
    experts = routing.experts
    num_tokens, num_experts = probs.shape
    top_k = experts.shape[1]
    task_ids = task_ids.to(torch.int64)
    device = probs.device

    tokens_per_task = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    tokens_per_task.index_add_(0, task_ids, torch.ones(num_tokens, device=device))
    prob_sum = torch.zeros(num_tasks, num_experts, dtype=torch.float32, device=device)
    prob_sum = prob_sum.index_add(0, task_ids, probs)
    assignments = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=device)
    assignments.scatter_add_(1, experts, torch.ones(experts.shape, device=device))
    assign_sum = torch.zeros(num_tasks, num_experts, dtype=torch.float32, device=device)
    assign_sum.index_add_(0, task_ids, assignments)

    present = tokens_per_task > 0
    safe_tokens = tokens_per_task.clamp_min(1.0)[:, None]
    share = assign_sum / (safe_tokens * top_k)
    mean_prob = prob_sum / safe_tokens
    per_task = num_experts * (share * mean_prob).sum(dim=1)
    load_balance = (per_task * present).sum() / present.sum().clamp_min(1)

    z_loss = torch.logsumexp(logits, dim=-1).pow(2).sum() / max(num_tokens, 1)

    joint = prob_sum / prob_sum.sum().clamp_min(torch.finfo(torch.float32).tiny)
    p_task = joint.sum(dim=1)
    p_expert = joint.sum(dim=0)
    # MI = H(T) + H(E) - H(T, E)
    mutual_information = (_plogp(joint).sum() - _plogp(p_task).sum() - _plogp(p_expert).sum())
    return MoEAuxLosses(load_balance, z_loss, -mutual_information)
