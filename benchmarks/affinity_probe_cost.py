"""The affinity probe's cost against a training step, on the default run's model.

    python benchmarks/affinity_probe_cost.py [--tasks-per-batch K] [--repeats N]

The default run's AU model (dinov3_tiny, 4 experts, top-2, 2 MoE layers, 64 px, 27 tasks),
one mixed batch of 16 images over K distinct tasks (the trainer's mixed batches of 16 over 27
tasks hold about 11), random images and targets of each task's type. A training step is
forward + total_loss + backward + AdamW step; a probe step is measure_step on the same batch
(1 forward with graph, K backward passes, K forwards without graph). Prints the fastest of N
repeats of each and their ratio.
"""
from __future__ import annotations

import argparse
import time

import torch

from m2dino.models.m2dino import create_model
from m2dino.tasks import TaskType, resolve_tasks
from m2dino.training.affinity import measure_step, shared_parameters, trainer_task_losses
from m2dino.training.losses import total_loss


def target(task, size: int) -> dict:
    kind = task.task_type
    if kind is TaskType.SEGMENTATION:
        return {"mask": torch.randint(0, task.num_classes, (size, size))}
    if kind is TaskType.CLASSIFICATION:
        return {"label": torch.tensor(int(torch.randint(0, task.num_classes, ())))}
    if kind is TaskType.LANDMARKS:
        return {"points": torch.rand(task.num_points, 2)}
    return {"box": torch.tensor([0.2, 0.2, 0.6, 0.7])}


def fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks-per-batch", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from m2dino.tasks import _load_registry

    tasks = resolve_tasks(sorted(_load_registry()))
    torch.manual_seed(0)
    model = create_model("dinov3_tiny", tasks, num_experts=4, top_k=2, moe_layers=2, img_size=64, neck_channels=64)
    model.train()
    order = [i % args.tasks_per_batch for i in range(16)]
    images = torch.randn(16, 3, 64, 64)
    targets = [target(tasks[i], 64) for i in order]
    task_ids = torch.tensor(order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(images, task_ids)
            loss, _ = total_loss(outputs, targets, tasks)
        loss.backward()
        optimizer.step()

    shared = shared_parameters(model)
    losses = trainer_task_losses(tasks, targets)

    def probe_step():
        measure_step(model, (images, task_ids), losses, shared, 1e-3,
                     autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))

    train_step()  # warm-up
    train = fastest(train_step, args.repeats)
    probe = fastest(probe_step, args.repeats)
    print(f"threads {torch.get_num_threads()}, {args.tasks_per_batch} tasks in the batch, "
          f"{sum(p.numel() for p in shared.values())} shared parameters")
    print(f"training step {train * 1000:.0f} ms, probe step {probe * 1000:.0f} ms, ratio {probe / train:.1f}x")


if __name__ == "__main__":
    main()
