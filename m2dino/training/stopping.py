"""When a model's training ends: its step budget (--epochs or --steps, see `budget_steps`), or,
for the converged-TS control, the training-loss plateau after that budget, capped.

A rule gives the schedule's length (`total_steps`), sees each step's training loss
(`observe`), is asked at every epoch end whether to stop there (`stop_now`: a reason or None)
and names why a run that went its whole length ended (`ran_out`). The reasons are
STOP_EPOCHS, STOP_PLATEAU and STOP_CAP; the trainer keeps the reason in Progress.stopped and
logs it with the final learning rate. Another rule (a plateau of a score on an inner split of
the training data, say) is one more subclass of `StoppingRule`, chosen in `stopping_rule`.
Rules keep their state in Progress (saved in every checkpoint), never in themselves."""
from __future__ import annotations

from m2dino.paradigms import PLATEAU_CAP_FACTOR, PLATEAU_REL_TOL, PLATEAU_WINDOW

STOP_EPOCHS = "epochs"    # the budget was trained
STOP_PLATEAU = "plateau"  # the training loss plateaued
STOP_CAP = "cap"          # no plateau before the cap


def plateaued(losses: list[float], window: int = PLATEAU_WINDOW, rel_tol: float = PLATEAU_REL_TOL) -> bool:
    """Whether a training-loss curve has plateaued: the mean of its last `window` values is
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

    def __init__(self, budget: int):
        self.budget = budget

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


class TrainingLossPlateau(StoppingRule):
    """Train on past the budget until the training loss plateaus (`plateaued`, checked at epoch
    ends), at most PLATEAU_CAP_FACTOR x budget steps."""

    @property
    def total_steps(self) -> int:
        return PLATEAU_CAP_FACTOR * self.budget

    def observe(self, progress, loss: float | None) -> None:
        if loss is not None:
            progress.recent_losses = (progress.recent_losses + [loss])[-2 * PLATEAU_WINDOW:]

    def stop_now(self, progress) -> str | None:
        if self.budget <= progress.step < self.total_steps and plateaued(progress.recent_losses):
            return STOP_PLATEAU
        return None

    def ran_out(self) -> str:
        return STOP_CAP


def stopping_rule(config, steps_per_epoch: int, until_plateau: bool) -> StoppingRule:
    """The rule of one model: its budget, or for the converged-TS control the plateau."""
    budget = budget_steps(config, steps_per_epoch)
    return TrainingLossPlateau(budget) if until_plateau else StoppingRule(budget)
