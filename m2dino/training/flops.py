"""The FLOP and activation counter of a study's models, on fake tensors (FakeTensorMode: shapes
and dtypes, no storage): torch.utils.flop_counter counts one training step's FLOPs, and the
activations are the bytes autograd saves for the backward pass of one batch. The study's models
share the backbone and differ in their heads and routers, so one step of the all-task model, with
every task in the batch, gives each model's numbers (`measure_shapes`): the neck and every head
are counted on their own (forward + backward, from inputs that need gradients as in training), the
backbone is the step less those, and a model is charged its backbone, the neck only when it has a
spatial task, and its tasks' heads weighted by their training images (`image_flops`).

The MoE counts what top-k uses: m2dino's fused ops get flop formulas here (each token through
its k experts, its task's router), as attention's CPU kernel does (flop_counter has none).
Used by the plan before a run (m2dino.training.plan) and by the trainer for a finished model's
training FLOPs."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter

from m2dino.models.m2dino import M2DINO
from m2dino.models.moe import moe_modules
from m2dino.training.config import TrainConfig
from m2dino_kernels import ExpertWeights, Routing

# ------------------------------------------------------------------ FLOP formulas of the fused ops

def _sdpa_shapes(q, k, v):
    return tuple(q.shape), tuple(k.shape), tuple(v.shape)


def _experts_flops(x, routing, weights) -> int:
    """2 x MACs of the two expert GEMMs over the T*k routed rows (the ops carry Routing and
    ExpertWeights as tensor lists)."""
    rows = Routing.from_tensors(routing).sorted_slots.shape[0]
    fc1, fc2 = ExpertWeights(*weights).fc1_weight, ExpertWeights(*weights).fc2_weight
    return 2 * rows * (x.shape[1] * fc1.shape[1] + fc2.shape[2] * fc2.shape[1])


def _register_flop_formulas() -> None:
    registry = flop_counter.flop_registry
    aten, m2 = torch.ops.aten, torch.ops.m2dino
    formulas = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(*_sdpa_shapes(q, k, v)),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(tuple(g.shape), *_sdpa_shapes(q, k, v)),
        m2.rope_flash_attention:
            lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(*_sdpa_shapes(q, k, v)),
        m2.rope_flash_attention_backward:
            lambda g, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(tuple(g.shape), *_sdpa_shapes(q, k, v)),
        # routing: each token's logits against its own task's router [E, D]
        m2.task_topk_route:
            lambda x, task_ids, gate_weight, *a, **kw: 2 * x.shape[0] * x.shape[1] * gate_weight.shape[1],
        m2.task_topk_route_backward:  # grad of the input and of the router weights
            lambda gl, gp, gw, x, task_ids, gate_weight, *a, **kw: 4 * x.shape[0] * x.shape[1] * gate_weight.shape[1],
        m2.expert_mlp:
            lambda x, routing, weights, *a, **kw: _experts_flops(x, routing, weights),
        m2.expert_mlp_backward:  # grads of the inputs and of the weights: twice the forward
            lambda g, x, routing, weights, *a, **kw: 2 * _experts_flops(x, routing, weights),
    }
    for op, formula in formulas.items():
        if op not in registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


# ------------------------------------------------------------------ one fake training step

def fake_model(model_config, tasks) -> tuple[M2DINO, FakeTensorMode]:
    """M2DINO built on the meta device, then given fake CPU storage: no memory, real shapes."""
    with torch.device("meta"):
        model = M2DINO(model_config, tasks)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model.to_empty(device="cpu")
    return model.train(), mode


def _loss_of(outputs) -> torch.Tensor:
    """A scalar that every floating output feeds (nested dicts and lists), for the backward pass."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float().sum() if torch.is_floating_point(outputs) else 0.0
    values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (list, tuple)) else ()
    return sum((_loss_of(v) for v in values), 0.0)


def _count_flops(run, bf16: bool) -> int:
    """Forward + backward FLOPs of `run()`: its outputs summed into a loss, backward outside
    autocast as training does; bf16: the forward under bf16 autocast, as on a GPU."""
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _loss_of(run())
        loss.backward()
    return counter.get_total_flops()


@dataclass
class StepCount:
    flops: int              # forward + backward FLOPs of the whole step
    saved_bytes: int        # activations autograd keeps for backward (parameters excluded)
    images: Counter         # images of the batch per task index


def count_step(model: M2DINO, mode: FakeTensorMode, task_indices: list[int], bf16: bool = False,
               checkpointing: bool = False) -> StepCount:
    """Count one training step (forward + backward) of `model` on a batch with one image per
    entry of task_indices, at the model's image size; bf16: under bf16 autocast, as on a GPU."""
    _register_flop_formulas()
    size = model.img_size
    with mode:
        images = torch.empty(len(task_indices), 3, size, size)
    task_ids = torch.tensor(task_indices, dtype=torch.int64)  # a real host tensor, as task_index gives
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    saved = 0

    def pack(t):
        nonlocal saved
        key = t.untyped_storage()._cdata
        if key not in seen and key not in param_storages:
            seen.add(key)
            saved += t.untyped_storage().nbytes()
        return t

    model.backbone.set_grad_checkpointing(checkpointing)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            flops = _count_flops(lambda: model(images, task_ids), bf16)
    finally:
        model.backbone.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
    return StepCount(flops, saved, Counter(task_indices))


def count_parts(model: M2DINO, mode: FakeTensorMode, bf16: bool = False) -> tuple[int, dict[str, int]]:
    """(the neck's, {task: its head's}) forward + backward FLOPs for one image, each counted on
    its own, from inputs that need gradients as the backbone's outputs do in training.

    Counted apart because FlopCounterMode books a backward op under the module whose hooks saw
    it last: much of the neck's backward lands outside `neck`, and a plan built on that would
    charge the models without a spatial task for it."""
    _register_flop_formulas()
    grid = model.img_size // model.backbone.patch_size
    dim = model.backbone.embed_dim
    size = (model.img_size, model.img_size)
    with mode:
        layers = [torch.empty(1, dim, grid, grid, requires_grad=True) for _ in model.neck_layers]
        cls_token = torch.empty(1, dim, requires_grad=True)
        patch_tokens = torch.empty(1, grid * grid, dim, requires_grad=True)
        maps = {s: f.detach().requires_grad_() for s, f in model.neck(layers).items()}
    try:
        neck = _count_flops(lambda: model.neck(layers), bf16)
        heads = {t: _count_flops(lambda h=head: h(maps, cls_token, patch_tokens, size), bf16)
                 for t, head in model.heads.items()}
    finally:
        model.zero_grad(set_to_none=True)
    return neck, heads


# ------------------------------------------------------------------ the study's plan

@dataclass
class ModelShapes:
    """What one fake step of the all-task model tells about every model of the study."""
    trunk_flops: float               # backbone (routing, top-k experts) per image, forward + backward
    neck_flops: float                # per image, when the model has a spatial task
    head_flops: dict[str, float]     # per image of that task
    activations: dict[bool, float]   # bytes per image saved for backward, without / with grad checkpointing
    shared_params: int               # backbone without routers
    router_params: int               # one task's routers over all MoE layers
    inactive_expert_params: int      # the E - k experts a token skips, over all MoE layers
    dense_backbone_params: int       # the backbone outside its MoE layers' experts and routers
    neck_params: int
    head_params: dict[str, int]


def micro_batch(config: TrainConfig) -> int:
    """Images per forward pass on one GPU: --batch-size cut by --grad-accum (the largest part)."""
    return math.ceil(config.batch_size / config.grad_accum)


_measured: dict[str, ModelShapes] = {}


def study_shapes(config: TrainConfig, task_ids: list[str]) -> ModelShapes:
    """measure_shapes of the all-task model of `task_ids`, once per process for one model config:
    every model of a study is charged from it (its tasks' heads, the one trunk), as the plan does."""
    key = repr((config.model, config.drop_path, config.drop_path_schedule, micro_batch(config), config.amp,
                sorted(task_ids)))
    if key not in _measured:
        _measured[key] = measure_shapes(config, sorted(task_ids))
    return _measured[key]


def measure_shapes(config: TrainConfig, task_ids: list[str]) -> ModelShapes:
    model, mode = fake_model(config.model, task_ids)
    model.backbone.set_drop_path(config.drop_path, config.drop_path_schedule)
    n_tasks = len(task_ids)
    batch = [i % n_tasks for i in range(max(micro_batch(config), n_tasks))]  # every task in the batch
    bf16 = config.amp == "bf16"
    plain = count_step(model, mode, batch, bf16=bf16)
    checkpointed = count_step(model, mode, batch, bf16=bf16, checkpointing=True)
    neck, heads = count_parts(model, mode, bf16=bf16)  # per image
    # the all-task step runs the neck on the whole batch, and each head on its task's images
    head_total = sum(heads[t] * plain.images[i] for i, t in enumerate(task_ids))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    layers = moe_modules(model.backbone).values()
    routers = sum(m.gate_weight.numel() + m.gate_bias.numel() for m in layers)
    experts = [sum(getattr(m, n).numel() for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")) for m in layers]
    inactive = sum(e * (m.num_experts - m.top_k) // m.num_experts for e, m in zip(experts, layers))
    backbone = count(model.backbone)
    return ModelShapes(
        trunk_flops=(plain.flops - neck * len(batch) - head_total) / len(batch), neck_flops=float(neck),
        head_flops={t: float(f) for t, f in heads.items()},
        activations={False: plain.saved_bytes / len(batch), True: checkpointed.saved_bytes / len(batch)},
        shared_params=backbone - routers, router_params=routers // n_tasks, inactive_expert_params=inactive,
        dense_backbone_params=backbone - routers - sum(experts), neck_params=count(model.neck),
        head_params={t: count(model.heads[t]) for t in task_ids})


def image_flops(shapes: ModelShapes, task_ids: list[str], train_sizes: dict[str, int], spatial: bool) -> float:
    """Forward + backward FLOPs of one training image of the model: the trunk, the neck when the
    model has a spatial task, and its tasks' heads weighted by their share of the training images."""
    images = sum(train_sizes[t] for t in task_ids)
    return (shapes.trunk_flops + (shapes.neck_flops if spatial else 0.0)
            + sum(train_sizes[t] / max(1, images) * shapes.head_flops[t] for t in task_ids))
