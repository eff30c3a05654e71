"""The plan before the run (`python -m m2dino.train ... --dry-run`): for every model of the
study, its tasks, training images, optimizer steps, parameters (total / active per token),
FLOPs per image for forward + backward and memory per GPU; then the study's total FLOPs and
the time they take at a stated sustained rate. Written to OUT/plan.json.

Nothing real is built or trained: the model lives on fake tensors (FakeTensorMode: shapes and
dtypes, no storage), torch.utils.flop_counter counts one training step's FLOPs, and the
activations are the bytes autograd saves for the backward pass of one batch. The study's
models share the backbone and differ in their heads and routers, so one step of the all-task
model, with every task in the batch, gives each model's numbers: the neck and every head are
counted on their own (forward + backward, from inputs that need gradients as in training), the
backbone is the step less those, and a model is charged its backbone, the neck only when it has
a spatial task, and its tasks' heads weighted by their training images (tested against a
direct count of real training steps, loss included).

The fine-tuning options: --grad-accum N runs a step's batch as N micro-batches, so the step's
images stay --batch-size while activations are those of one micro-batch (the step is measured
at the micro-batch); --drop-path runs each block's branches on the kept samples only, which the
fake step (the model in training mode at the run's rate) counts as it runs; --ema keeps an fp32
copy of the weights (+4 bytes per parameter); --compile changes neither FLOPs nor the plan's
memory, only adds a one-time compile at the first steps (noted).

The MoE counts what top-k uses: m2dino's fused ops get flop formulas here (each token through
its k experts, its task's router), as attention's CPU kernel does (flop_counter has none).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from m2dino import io
from m2dino.models.m2dino import SPATIAL_TYPES
from m2dino.paradigms import PARADIGMS

# the plan's options are declared with the command line's (torch-free): re-exported here
from m2dino.training.config import DEFAULT_TFLOPS, PLAN_OPTIONS, PlanOptions, TrainConfig, weights_file  # noqa: F401
from m2dino.training.flops import (  # noqa: F401 (the counter's names, re-exported)
    ModelShapes,
    count_parts,
    count_step,
    fake_model,
    image_flops,
    measure_shapes,
    micro_batch,
)

GIB = 2 ** 30
ADAMW_BYTES = 8   # exp_avg + exp_avg_sq, fp32, per trainable parameter


class PlanError(ValueError):
    """The study cannot run as stated (a model does not fit the GPU memory)."""


def plan_model(config: TrainConfig, options: PlanOptions, shapes: ModelShapes, task_ids: list[str],
               train_sizes: dict[str, int], spatial: bool) -> dict[str, Any]:
    """One model's entry of plan.json."""
    images = sum(train_sizes[t] for t in task_ids)
    flops_per_image = image_flops(shapes, task_ids, train_sizes, spatial)
    per_step = config.batch_size * options.nproc
    steps = config.steps if config.steps is not None else config.epochs * math.ceil(images / per_step)
    heads = sum(shapes.head_params[t] for t in task_ids)
    total = shapes.shared_params + shapes.router_params * len(task_ids) + shapes.neck_params + heads
    active = (shapes.shared_params + shapes.router_params - shapes.inactive_expert_params
              + (shapes.neck_params if spatial else 0) + max(shapes.head_params[t] for t in task_ids))
    trainable = total - (shapes.dense_backbone_params if config.freeze_backbone else 0)
    ema = 4 * total if config.ema is not None else 0  # the average's fp32 copy, never sharded (no --fsdp)
    memory = {}
    for fsdp in (False, True):
        for checkpointing in (False, True):
            state = 4 * total + (4 + ADAMW_BYTES) * trainable  # fp32 weights, grads, AdamW moments
            if fsdp:
                state /= options.nproc
            state += ema
            activations = shapes.activations[checkpointing] * micro_batch(config)
            key = "+".join(["fsdp"] * fsdp + ["grad_checkpointing"] * checkpointing) or "plain"
            memory[key] = {"params_gib": 4 * total / (options.nproc if fsdp else 1) / GIB,
                           "grads_gib": 4 * trainable / (options.nproc if fsdp else 1) / GIB,
                           "adamw_gib": ADAMW_BYTES * trainable / (options.nproc if fsdp else 1) / GIB,
                           "ema_gib": ema / GIB,
                           "activations_gib": activations / GIB, "total_gib": (state + activations) / GIB}
    chosen = "+".join(["fsdp"] * (config.fsdp and options.nproc > 1)
                      + ["grad_checkpointing"] * config.grad_checkpointing) or "plain"
    return {"tasks": list(task_ids), "train_images": images, "steps": int(steps), "images_per_step": per_step,
            "micro_batch": micro_batch(config),
            "parameters": {"total": int(total), "active_per_token": int(active), "trainable": int(trainable)},
            "flops_per_image": flops_per_image, "flops": flops_per_image * steps * per_step,
            "memory_per_gpu": memory, "memory_setting": chosen}


def make_plan(config: TrainConfig, options: PlanOptions, train_sizes: dict[str, int], specs: dict,
              groups: dict[str, list[str]]) -> dict[str, Any]:
    """plan.json's content: every model of the study (config.paradigm), and the totals."""
    from m2dino.training.study import plan_models  # noqa: PLC0415 (the study imports the data stack)

    task_ids = sorted(specs)
    shapes = measure_shapes(config, task_ids)
    paradigms = list(PARADIGMS) if config.paradigm == "all" else [config.paradigm]
    models = {}
    for paradigm in paradigms:
        for name, members in plan_models(paradigm, task_ids, groups).items():
            spatial = any(specs[t].task_type in SPATIAL_TYPES for t in members)
            models[f"{paradigm}/{name}"] = plan_model(config, options, shapes, members, train_sizes, spatial)
    runs = len(config.seeds) if config.seeds else 1
    total = runs * sum(m["flops"] for m in models.values())
    seconds = total / (options.assume_tflops * 1e12 * options.nproc)
    limit = options.gpu_memory_gb * 0.9
    return {"model": config.model.resolved().to_dict(), "nproc": options.nproc, "batch_size": config.batch_size,
            "amp": config.amp, "grad_accum": config.grad_accum, "drop_path": config.drop_path,
            "drop_path_schedule": config.drop_path_schedule, "ema": config.ema, "compile": config.compile,
            "seeds": runs, "assume_tflops_per_gpu": options.assume_tflops,
            "gpu_memory_gib": options.gpu_memory_gb, "usable_memory_gib": limit, "models": models,
            "total_flops": total, "hours": seconds / 3600,
            "fits": all(m["memory_per_gpu"][m["memory_setting"]]["total_gib"] <= limit for m in models.values())}


def fitting_grad_accum(model: dict[str, Any], batch_size: int, grad_accum: int, limit: float) -> int | None:
    """The smallest --grad-accum (micro-batches per step) with which `model` (a plan entry) fits
    `limit` GiB in its memory setting, the step's batch unchanged; None when none does."""
    memory = model["memory_per_gpu"][model["memory_setting"]]
    state = memory["total_gib"] - memory["activations_gib"]
    per_image = memory["activations_gib"] / math.ceil(batch_size / grad_accum)
    for accum in range(1, batch_size + 1):
        if state + per_image * math.ceil(batch_size / accum) <= limit:
            return accum
    return None


def check_fits(plan: dict[str, Any]) -> None:
    """PlanError naming every model that does not fit, and the settings under which it would."""
    limit = plan["usable_memory_gib"]
    problems = []
    for name, m in plan["models"].items():
        need = m["memory_per_gpu"][m["memory_setting"]]["total_gib"]
        if need > limit:
            fitting = [k for k, v in m["memory_per_gpu"].items() if v["total_gib"] <= limit
                       and ("fsdp" not in k or plan["nproc"] > 1)]
            accum = fitting_grad_accum(m, plan["batch_size"], plan["grad_accum"], limit)
            ways = fitting + ([f"--grad-accum {accum}"] if accum else [])
            none = "none of fsdp / grad_checkpointing / --grad-accum: lower --batch-size"
            problems.append(f"{name} needs {need:.1f} GiB per GPU with {m['memory_setting']}; fits with: "
                            f"{', '.join(ways) or none}")
    if problems:
        raise PlanError(f"the study does not fit {plan['gpu_memory_gib']:g} GiB GPUs (90% usable, the rest for the "
                        f"CUDA context and the allocator): " + "; ".join(problems))


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the table the dry run prints."""
    model = plan["model"]
    lines = [f"plan: {model['name']} at {model['img_size']} px, {model['num_experts']} experts top-{model['top_k']} "
             f"in the last {model['moe_layers']} blocks; batch {plan['batch_size']} per GPU x {plan['nproc']} GPU(s), "
             f"amp {plan['amp']}",
             f"{'model':<28} {'tasks':>5} {'images':>7} {'steps':>7} {'params':>8} {'active':>8} "
             f"{'GFLOP/img':>10} {'PFLOP':>9} {'GiB/GPU':>8}  memory setting"]
    for name, m in plan["models"].items():
        memory = m["memory_per_gpu"][m["memory_setting"]]["total_gib"]
        lines.append(f"{name:<28} {len(m['tasks']):>5} {m['train_images']:>7} {m['steps']:>7} "
                     f"{m['parameters']['total'] / 1e6:>7.1f}M {m['parameters']['active_per_token'] / 1e6:>7.1f}M "
                     f"{m['flops_per_image'] / 1e9:>10.1f} {m['flops'] / 1e15:>9.2f} {memory:>8.1f}  "
                     f"{m['memory_setting']}")
    largest = max(plan["models"].values(), key=lambda m: m["memory_per_gpu"]["plain"]["total_gib"])
    options = ", ".join(f"{k} {v['total_gib']:.1f}" for k, v in largest["memory_per_gpu"].items())
    lines.append(f"memory per GPU of the largest model (GiB): {options}")
    lines.append(f"study: {plan['total_flops'] / 1e18:.3f} EFLOP ({plan['seeds']} seed(s)), "
                 f"{format_duration(plan['hours'] * 3600)} on {plan['nproc']} GPU(s) at an assumed "
                 f"{plan['assume_tflops_per_gpu']:g} TFLOP/s sustained per GPU")
    if plan["grad_accum"] > 1:
        micro = math.ceil(plan["batch_size"] / plan["grad_accum"])
        lines.append(f"--grad-accum {plan['grad_accum']}: each step's {plan['batch_size']} images per GPU in "
                     f"micro-batches of at most {micro} (the memory above)")
    if plan["drop_path"]:
        lines.append(f"--drop-path {plan['drop_path']:g} ({plan['drop_path_schedule']}): the backbone FLOPs above "
                     f"count the kept samples only")
    if plan["ema"] is not None:
        lines.append(f"--ema {plan['ema']:g}: +4 bytes per parameter for the average (in the memory above)")
    if plan["compile"]:
        lines.append("--compile: the first steps of each model pay a one-time compile of its blocks (minutes), "
                     "not in the time above")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    """A duration in the unit that reads best: 40 s, 12 min, 3.4 h, 2.5 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def dry_run(checked, options: PlanOptions) -> dict[str, Any]:
    """Plan the study that passed the run's checks (m2dino.training.study.preflight: `checked`)
    without building or training anything real: print the plan, write OUT/plan.json, raise
    PlanError when a model does not fit the GPU memory."""
    from m2dino.tasks import apply_groups, load_groups  # noqa: PLC0415

    options.validate()
    config, data = checked.config, checked.data
    groups = load_groups(config.groups)
    specs = {s.task_id: s for s in apply_groups(list(data.tasks.values()), groups)}
    plan = make_plan(config, options, data.task_counts("train"), specs, groups)
    plan["data"] = str(checked.data_root)
    weights = weights_file(config)
    plan["pretrained"] = weights and str(Path(weights).resolve())
    print(format_plan(plan), flush=True)
    if weights:
        print(f"weights: {weights} fits {config.model.name} (checked from the file's header)", flush=True)
    path = io.write_json(Path(config.out) / "plan.json", plan)
    print(f"plan: {path}", flush=True)
    check_fits(plan)
    return plan
