"""The learning-rate schedule: a factor of the step index (0-based), times each parameter group's
base rate, written into the optimizer before every step.

A schedule is one function of its shape's steps -> factor(step) -> float: `warmup_cosine` over a
known length (equal exposure), `warmup_stable_decay` for a model whose length is decided while it
trains (a converged model: the decay starts when its stopping rule sees a plateau, or before its
cap, so a plateau stop still ends at a low rate). `lr_factor(config, stopping)` picks the run's.
Every schedule warms up at least one step (a tiny model's share of --warmup rounds up)."""
from __future__ import annotations

import math
from typing import Callable

import torch

LRFactor = Callable[[int], float]


def warmup_steps(warmup: float, total_steps: int) -> int:
    """--warmup: a share of the schedule below 1, else a number of steps; at least one step
    (the first step never runs at the full rate) unless --warmup is 0."""
    steps = int(warmup * total_steps) if warmup < 1 else int(warmup)
    return max(1, steps) if warmup > 0 else 0


def warmup_cosine(total_steps: int, warmup_steps: int) -> LRFactor:
    """lr factor: linear warmup from ~0 to 1, then cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def warmup_stable_decay(warmup_steps: int, decay_start: int, decay_steps: int) -> LRFactor:
    """lr factor: linear warmup from ~0 to 1 (as warmup_cosine's), the full rate until
    `decay_start`, then linear decay over `decay_steps` steps to 0 at the stop
    (decay_start + decay_steps, the floor; the last trained step runs at 1 / (decay_steps + 1))."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step < decay_start:
            return 1.0
        return max(0.0, (decay_start + decay_steps - step) / (decay_steps + 1))
    return factor


def lr_factor(config, stopping) -> LRFactor:
    """The run's schedule for its stopping rule: warmup-cosine over the rule's length, or, for a
    rule that decides its stop while training (`stopping.decay_phase()`), warmup-stable-decay
    with the decay the rule sets (warmup a share of the equal-exposure budget)."""
    if not stopping.anneals:
        return warmup_cosine(stopping.total_steps, warmup_steps(config.warmup, stopping.total_steps))
    warmup = warmup_steps(config.warmup, stopping.budget)
    return lambda step: warmup_stable_decay(warmup, *stopping.decay_phase())(step)


class StepSchedule:
    """The learning rate of each training step as a function of its index (0-based), written
    into the optimizer's groups before the step: each group's own base rate x `factor(index)`.

    Not a torch LRScheduler, which advances by one call after each optimizer.step(): a step
    skipped for a non-finite loss or gradient has no optimizer step, yet keeps its place in the
    schedule (the schedule follows the step count), and advancing a scheduler for it is the
    "lr_scheduler.step() before optimizer.step()" misuse PyTorch warns about. Here each step's
    rate depends on its index alone: the same rates as LambdaLR stepped once per step, skipped
    or not, with nothing to keep in a checkpoint beyond the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: LRFactor):
        self.optimizer = optimizer
        self.factor = factor
        # "initial_lr", as torch's schedulers keep it: a resumed optimizer's groups carry it
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]

    def lr_at(self, index: int) -> float:
        """The first group's (the backbone's) rate at step `index`."""
        return self.base_lrs[0] * self.factor(index)

    def apply(self, index: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(index)
