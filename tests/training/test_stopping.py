"""The stopping rules alone: the plateau test on loss curves, the step budget, the converged
rule's decay phase, and the reasons a model's training ends (epochs, plateau, cap)."""
import math
from types import SimpleNamespace

from m2dino.paradigms import PLATEAU_CAP_FACTOR, PLATEAU_WINDOW, WSD_DECAY_FRACTION
from m2dino.training.loop import Progress
from m2dino.training.stopping import (
    STOP_CAP,
    STOP_EPOCHS,
    STOP_PLATEAU,
    InnerSplitPlateau,
    StoppingRule,
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
    curve = [0.5 + math.exp(-i / 3) for i in range(100)]
    first = next(n for n in range(2 * w, len(curve)) if plateaued(curve[:n]))
    assert 2 * w < first < 40
    before, recent = sum(curve[first - 2 * w:first - w]) / w, sum(curve[first - w:first]) / w
    assert (before - recent) / before < 0.01
    # noise without a trend is a plateau; a rising loss too
    assert plateaued([1.0 + 0.05 * math.sin(2 * math.pi * i / w) for i in range(2 * w)])
    assert plateaued([1.0 + 0.01 * i for i in range(2 * w)])


def config(steps=None, epochs=3, min_steps=0):
    return SimpleNamespace(steps=steps, epochs=epochs, min_steps=min_steps)


def test_the_budget_is_steps_or_whole_epochs_up_to_min_steps():
    assert budget_steps(config(steps=7), steps_per_epoch=5) == 7
    assert budget_steps(config(epochs=3), steps_per_epoch=5) == 15
    assert budget_steps(config(epochs=3, min_steps=21), steps_per_epoch=5) == 25  # 5 whole epochs
    assert budget_steps(config(epochs=3, min_steps=10), steps_per_epoch=5) == 15


def test_the_budget_rule_never_stops_early_and_says_epochs():
    rule = stopping_rule(config(epochs=2), steps_per_epoch=4)
    assert type(rule) is StoppingRule and rule.total_steps == 8
    progress = Progress(step=8)
    for _ in range(4 * PLATEAU_WINDOW):
        rule.observe(progress, 1.0)
    assert progress.recent_losses == []  # it keeps nothing
    assert rule.stop_now(progress) is None and rule.ran_out() == STOP_EPOCHS


def test_the_converged_rule_measures_every_epoch_and_decays_after_a_plateau_past_the_budget():
    measured = iter([2.0, 1.5] + [1.0] * 20)
    rule = stopping_rule(config(epochs=4), steps_per_epoch=4, measure=lambda: next(measured))
    assert isinstance(rule, InnerSplitPlateau) and rule.cap == PLATEAU_CAP_FACTOR * 16
    progress = Progress()
    rule.bind(progress)
    cap_decay = math.ceil(WSD_DECAY_FRACTION * rule.cap)
    assert rule.decay_phase() == (rule.cap - cap_decay, cap_decay) and rule.total_steps == rule.cap
    rule.observe(progress, 0.0)  # training losses play no part
    assert progress.recent_losses == []
    for epoch_end in range(4, 4 * (2 * PLATEAU_WINDOW + 4), 4):
        progress.step = epoch_end
        assert rule.stop_now(progress) is None  # never stops at an epoch end: the decay ends the run
        if progress.decay_start >= 0:
            break
    # the first window with a 2 or a 1.5 in it still falls by more than 1%: the plateau is the
    # first epoch end whose two windows are both flat
    assert progress.decay_start == 4 * (2 * PLATEAU_WINDOW + 2)
    assert len(progress.recent_losses) == 2 * PLATEAU_WINDOW
    start = progress.decay_start
    decay = math.ceil(start * WSD_DECAY_FRACTION / (1 - WSD_DECAY_FRACTION))
    assert rule.decay_phase() == (start, decay) and rule.total_steps == start + decay
    assert rule.ran_out() == STOP_PLATEAU
    progress.step += 4
    before = list(progress.recent_losses)
    assert rule.stop_now(progress) is None and progress.recent_losses == before  # no more measurements


def test_the_converged_rule_waits_for_the_budget_and_without_a_plateau_decays_before_the_cap():
    rule = stopping_rule(config(epochs=2), steps_per_epoch=4, measure=lambda: 1.0)  # flat from the start
    progress = Progress()
    rule.bind(progress)
    for epoch_end in (4,):
        progress.step = epoch_end
        rule.stop_now(progress)
    assert progress.decay_start == -1  # flat, but inside the budget of 8 steps
    falling = iter(math.exp(-i) for i in range(1000))
    rule = stopping_rule(config(epochs=2), steps_per_epoch=4, measure=lambda: next(falling))
    progress = Progress()
    rule.bind(progress)
    for epoch_end in range(4, rule.cap + 1, 4):
        progress.step = epoch_end
        rule.stop_now(progress)
    assert progress.decay_start == -1 and rule.total_steps == rule.cap and rule.ran_out() == STOP_CAP
