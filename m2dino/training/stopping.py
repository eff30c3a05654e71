"""When a model's training ends: its step budget (--epochs or --steps, see `budget_steps`), or,
for a converged model (--budget converged, and the TS* control), the plateau of its loss on an
inner split of its own training rows after that budget, capped.

A rule gives the schedule's length (`total_steps`), sees each step's training loss
(`observe`), is asked at every epoch end whether to stop there (`stop_now`: a reason or None)
and names why a run that went its whole length ended (`ran_out`). The reasons are
STOP_EPOCHS, STOP_PLATEAU and STOP_CAP; the trainer keeps the reason in Progress.stopped and
logs it with the final learning rate. A rule that `anneals` decides its length while training:
it gives the schedule its decay phase (`decay_phase`, m2dino.training.schedule's
warmup_stable_decay) and ends when the decay does. Rules keep their state in Progress (saved in
every checkpoint; `bind` hands it to them), never in themselves, so a resumed run goes on exactly."""
from __future__ import annotations

import math
from typing import Callable

from m2dino.paradigms import PLATEAU_CAP_FACTOR, PLATEAU_REL_TOL, PLATEAU_WINDOW, WSD_DECAY_FRACTION

STOP_EPOCHS = "epochs"    # the budget was trained
STOP_PLATEAU = "plateau"  # the training loss plateaued
STOP_CAP = "cap"          # no plateau before the cap


def plateaued(losses: list[float], window: int = PLATEAU_WINDOW, rel_tol: float = PLATEAU_REL_TOL) -> bool:
    """Whether a loss curve has plateaued: the mean of its last `window` values is
    less than `rel_tol` (relative) below the mean of the `window` before (False while the curve
    is shorter than 2 x window)."""
    if len(losses) < 2 * window:
        return False
    recent = sum(losses[-window:]) / window
    before = sum(losses[-2 * window:-window]) / window
    return (before - recent) < rel_tol * abs(before)


def budget_steps(config, steps_per_epoch: int) -> int:
    """--steps, else --epochs epochs, repeated as whole epochs up to at least --min-steps: the
    same training exposure in every paradigm."""
    if config.steps is not None:
        return int(config.steps)
    return max(int(config.epochs), -(-int(config.min_steps) // max(1, steps_per_epoch))) * steps_per_epoch


class StoppingRule:
    """Train the budget: `budget` steps, no earlier stop."""

    anneals = False  # whether the rule sets the schedule's decay (decay_phase)

    def __init__(self, budget: int):
        self.budget = budget
        self.progress = None

    def bind(self, progress) -> None:
        """The Progress of the run this rule ends (its state lives there)."""
        self.progress = progress

    @property
    def total_steps(self) -> int:
        """The most steps the model trains: the schedule's length."""
        return self.budget

    def observe(self, progress, loss: float | None) -> None:
        """A training step's loss (None for a skipped step)."""

    def stop_now(self, progress) -> str | None:
        """At an epoch end: the reason to stop there, or None to train on."""
        return None

    def ran_out(self) -> str:
        """Why a model that trained `total_steps` steps stopped."""
        return STOP_EPOCHS


class InnerSplitPlateau(StoppingRule):
    """A converged model: its loss on the inner split (`measure()`, the mean over the split) is
    measured at every epoch end until its decay starts; from its equal-exposure `budget` on, a
    plateau (`plateaued` over the measurements) starts the decay, WSD_DECAY_FRACTION of the
    total steps, and training stops at its end (STOP_PLATEAU). Without a plateau the decay is
    the last WSD_DECAY_FRACTION of the cap, PLATEAU_CAP_FACTOR x budget steps (STOP_CAP)."""

    anneals = True

    def __init__(self, budget: int, measure: Callable[[], float]):
        super().__init__(budget)
        self.measure = measure
        self.cap = PLATEAU_CAP_FACTOR * budget

    def _cap_decay(self) -> tuple[int, int]:
        steps = max(1, math.ceil(WSD_DECAY_FRACTION * self.cap))
        return self.cap - steps, steps

    def decay_phase(self) -> tuple[int, int]:
        """(the step the decay starts at, its length in steps)."""
        start = -1 if self.progress is None else self.progress.decay_start
        if start < 0:
            return self._cap_decay()
        # the decay is WSD_DECAY_FRACTION of the total: start + steps
        steps = max(1, math.ceil(start * WSD_DECAY_FRACTION / (1 - WSD_DECAY_FRACTION)))
        return start, min(steps, self.cap - start)

    @property
    def total_steps(self) -> int:
        return sum(self.decay_phase())

    def stop_now(self, progress) -> str | None:
        if progress.decay_start >= 0 or progress.step >= self._cap_decay()[0]:
            return None  # decaying: the run ends with the decay
        progress.recent_losses = (progress.recent_losses + [float(self.measure())])[-2 * PLATEAU_WINDOW:]
        if progress.step >= self.budget and plateaued(progress.recent_losses):
            progress.decay_start = progress.step
        return None

    def ran_out(self) -> str:
        return STOP_PLATEAU if self.progress is not None and self.progress.decay_start >= 0 else STOP_CAP


def stopping_rule(config, steps_per_epoch: int, measure: Callable[[], float] | None = None) -> StoppingRule:
    """The rule of one model: its budget, or for a converged model (given the measure of its
    inner-split loss) the plateau of that loss."""
    budget = budget_steps(config, steps_per_epoch)
    return StoppingRule(budget) if measure is None else InnerSplitPlateau(budget, measure)
