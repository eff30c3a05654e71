"""Random task-MoE inputs for the kernel tests (extension, CUDA and public-API tests draw them
the same way)."""
from __future__ import annotations

import torch


def random_moe_inputs(T, D, H, E, NT, boost=None, pool=None, activation="gelu",
                      dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """x [T, D], task_ids [T] (drawn from `pool`, default every task), per-task gates [NT, E, D]
    with bias [NT, E] (+ `boost` per expert, to skew routing), experts in nn.Linear layout
    (fc1 rows 2H for swiglu). Names as the backend protocol's. Drawn in float64 and cast, so
    every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    H1 = 2 * H if activation == "swiglu" else H

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    pool_t = torch.tensor(pool if pool is not None else list(range(NT)))
    task_ids = pool_t[torch.randint(0, len(pool_t), (T,), generator=gen)]
    gate_bias = rand(NT, E, scale=0.5)
    if boost is not None:
        gate_bias = gate_bias + torch.tensor(boost, dtype=dtype)
    return dict(x=rand(T, D), task_ids=task_ids, gate_weight=rand(NT, E, D, scale=D ** -0.5),
                gate_bias=gate_bias, fc1_w=rand(E, H1, D, scale=D ** -0.5),
                fc1_b=rand(E, H1, scale=0.1), fc2_w=rand(E, D, H, scale=H ** -0.5),
                fc2_b=rand(E, D, scale=0.1))
