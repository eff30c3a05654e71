"""The stopping rules alone: the plateau test on loss curves, the step budget, and the reasons
a model's training ends (epochs, plateau, cap)."""
import math
from types import SimpleNamespace

from m2dino.paradigms import PLATEAU_CAP_FACTOR, PLATEAU_WINDOW
from m2dino.training.loop import Progress
from m2dino.training.stopping import (
    STOP_CAP,
    STOP_EPOCHS,
    STOP_PLATEAU,
    StoppingRule,
    TrainingLossPlateau,
    budget_steps,
    plateaued,
    stopping_rule,
)


def test_plateau_rule_on_synthetic_loss_curves():
    w = PLATEAU_WINDOW
    assert not plateaued([1.0] * (2 * w - 1))  # too short to judge
    assert plateaued([1.0] * (2 * w))  # flat
    decaying = [math.exp(-i / 10) for i in range(2 * w)]
    assert not plateaued(decaying)  # still falling fast
    # an exponential approach to a floor: falling early, plateaued once the last windows are flat
    curve = [0.5 + math.exp(-i / 15) for i in range(400)]
    first = next(n for n in range(2 * w, len(curve)) if plateaued(curve[:n]))
    assert 2 * w < first < 200
    before, recent = sum(curve[first - 2 * w:first - w]) / w, sum(curve[first - w:first]) / w
    assert (before - recent) / before < 0.01
    # noise without a trend is a plateau; a rising loss too
    assert plateaued([1.0 + 0.05 * ((-1) ** i) for i in range(2 * w)])
    assert plateaued([1.0 + 0.01 * i for i in range(2 * w)])


def config(steps=None, epochs=3, min_steps=0):
    return SimpleNamespace(steps=steps, epochs=epochs, min_steps=min_steps)


def test_the_budget_is_steps_or_whole_epochs_up_to_min_steps():
    assert budget_steps(config(steps=7), steps_per_epoch=5) == 7
    assert budget_steps(config(epochs=3), steps_per_epoch=5) == 15
    assert budget_steps(config(epochs=3, min_steps=21), steps_per_epoch=5) == 25  # 5 whole epochs
    assert budget_steps(config(epochs=3, min_steps=10), steps_per_epoch=5) == 15


def test_the_budget_rule_never_stops_early_and_says_epochs():
    rule = stopping_rule(config(epochs=2), steps_per_epoch=4, until_plateau=False)
    assert type(rule) is StoppingRule and rule.total_steps == 8
    progress = Progress(step=8)
    for _ in range(4 * PLATEAU_WINDOW):
        rule.observe(progress, 1.0)
    assert progress.recent_losses == []  # it keeps nothing
    assert rule.stop_now(progress) is None and rule.ran_out() == STOP_EPOCHS


def test_the_plateau_rule_stops_after_the_budget_before_the_cap():
    rule = stopping_rule(config(epochs=2), steps_per_epoch=4, until_plateau=True)
    assert isinstance(rule, TrainingLossPlateau) and rule.total_steps == PLATEAU_CAP_FACTOR * 8
    progress = Progress()
    for loss in [None] + [1.0] * (3 * PLATEAU_WINDOW):  # a skipped step's loss is not kept
        rule.observe(progress, loss)
    assert progress.recent_losses == [1.0] * (2 * PLATEAU_WINDOW)  # the window it needs, no more
    progress.step = 7
    assert rule.stop_now(progress) is None  # a flat loss, but inside the budget
    progress.step = 8
    assert rule.stop_now(progress) == STOP_PLATEAU
    progress.step = rule.total_steps
    assert rule.stop_now(progress) is None and rule.ran_out() == STOP_CAP  # at the cap the run just ends
    falling = Progress(step=8, recent_losses=[math.exp(-i / 5) for i in range(2 * PLATEAU_WINDOW)])
    assert rule.stop_now(falling) is None
