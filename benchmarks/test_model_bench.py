"""A full M2DINO training step (mixed-task batch, forward, loss, backward, AdamW step) in
images/s, against dense DINOv3 of the same preset with the same heads (moe_layers=0). The MoE
overhead is reported against what the FLOP ratio predicts: M2DINO runs k times the MLP FLOPs in
its MoE layers, so its ideal throughput is dense throughput / FLOP ratio.
GPU: ViT-B, 64 images at 224 px, bf16 autocast, `auto` kernels measured afresh by the
autotuner in this run (its choices are recorded), and the host syncs of one step after the
warm-up counted with torch.cuda.set_sync_debug_mode. CPU: the default tiny preset at 64 px
and ViT-S at 224 px with a batch of 2."""
import warnings

import pytest
import torch
from harness import DEVICE, RESULTS, autotuned, choices, recorded
from torch.utils.flop_counter import FlopCounterMode

from m2dino import create_model, total_loss
from m2dino.tasks import TASKS

E, K, MOE_LAYERS = 8, 2, 6
if DEVICE == "cuda":
    CASES = {"vitb16_224_b64": ("dinov3_vitb16", 224, 64, 6)}
else:
    CASES = {"tiny_64_b32": ("dinov3_tiny", 64, 32, 2), "vits16_224_b2": ("dinov3_vits16", 224, 2, 6)}
TASK_LIST = list(TASKS.values())


def random_target(spec, size, g):
    kind = spec.task_type
    if kind == "segmentation":
        return {"mask": torch.randint(0, spec.num_classes, (size, size), generator=g)}
    if kind == "classification":
        return {"label": torch.randint(0, spec.num_classes, (), generator=g)}
    if kind == "detection":
        lo, hi = torch.rand(2, generator=g) * 0.4, 0.6 + torch.rand(2, generator=g) * 0.4
        return {"box": torch.cat([lo, hi])}
    return {"points": torch.rand(spec.num_points, 2, generator=g)}


def make_batch(model, size, batch):
    g = torch.Generator().manual_seed(0)
    specs = [TASK_LIST[i % len(TASK_LIST)] for i in range(batch)]  # 27 tasks mixed
    images = torch.randn(batch, 3, size, size, generator=g).to(DEVICE)
    task_ids = model.task_index([s.task_id for s in specs]).to(DEVICE)
    targets = [{k: v.to(DEVICE) for k, v in random_target(s, size, g).items()} for s in specs]
    return images, task_ids, targets


def mlp_flops_per_layer(model, tokens):
    """Forward FLOPs of one dense MLP over `tokens` tokens (the unit the MoE multiplies by k)."""
    block = model.backbone.blocks[0]
    return 2 * tokens * sum(p.numel() for n, p in block.mlp.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("variant", ["dense", "m2dino"])
@pytest.mark.parametrize("case", list(CASES))
def test_training_step(measure, case, variant):
    preset, size, batch, moe_layers = CASES[case]
    model = create_model(preset, TASK_LIST, num_experts=E, top_k=K, img_size=size,
                         moe_layers=0 if variant == "dense" else moe_layers).to(DEVICE).train()
    images, task_ids, targets = make_batch(model, size, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda")

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(images, task_ids)
            loss, _ = total_loss(outputs, targets, model.tasks)
        loss.backward()
        optimizer.step()

    step, tuner = autotuned(plain_step) if DEVICE == "cuda" else (plain_step, None)

    extra = {}
    if variant == "dense":  # count the dense FLOPs once; the MoE adds (k-1) MLPs per MoE layer
        with FlopCounterMode(display=False) as counter, autocast:
            model(images, task_ids)
        tokens = batch * (5 + (size // model.backbone.patch_size) ** 2)
        dense_fwd = counter.get_total_flops()
        extra = {"fwd_flops": dense_fwd,
                 "moe_extra_fwd_flops": (K - 1) * moe_layers * mlp_flops_per_layer(model, tokens)}
    measure(f"train_step {case}", variant, step, items=batch, rounds=5 if DEVICE == "cuda" else 3, **extra)
    record = RESULTS[f"train_step {case}"][variant].extra
    record.update(choices(tuner))
    if DEVICE == "cuda":
        record.update(host_syncs=count_host_syncs(step), tasks_present=len(set(task_ids.tolist())))


def count_host_syncs(step) -> int:
    """Synchronizing CUDA operations during one call of `step` (after its warm-up), as
    torch.cuda.set_sync_debug_mode("warn") reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("case", list(CASES))
def test_targets_training_step(case):
    """M2DINO throughput at least 90% of what its FLOP ratio to dense DINOv3 predicts: the
    issue's target for ViT-B, 64 images, on GPU. On CPU the share is reported, not asserted:
    at the few hundred tokens 2 cores can afford, the cost that scales with the expert
    parameters (E weight-gradient GEMMs with short K, AdamW over E copies of the MLP) dominates,
    and no FLOP ratio predicts it."""
    dense, moe = recorded(f"train_step {case}", "dense"), recorded(f"train_step {case}", "m2dino")
    flop_ratio = (dense.extra["fwd_flops"] + dense.extra["moe_extra_fwd_flops"]) / dense.extra["fwd_flops"]
    predicted = dense.per_second / flop_ratio
    share = moe.per_second / predicted
    RESULTS[f"train_step {case}"]["m2dino"].extra.update(flop_ratio=flop_ratio, share_of_flop_prediction=share)
    if DEVICE == "cuda":
        failures = []
        if share < 0.9:
            failures.append(f"M2DINO at {moe.per_second:.1f} img/s = {share:.0%} of the "
                            f"{predicted:.1f} img/s its FLOP ratio {flop_ratio:.3f} predicts "
                            "(target >= 90%)")
        syncs, tasks = moe.extra["host_syncs"], moe.extra["tasks_present"]
        if syncs > 2 + tasks:
            failures.append(f"{syncs} host syncs in one step with {tasks} tasks present "
                            f"(target <= 2 + one per task = {2 + tasks})")
        assert not failures, "; ".join(failures)
