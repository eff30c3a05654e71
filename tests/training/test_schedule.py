"""The learning-rate schedule alone: warmup then cosine, warmup-stable-decay, the per-group rates
written before each step by index, the same rates as torch's LambdaLR stepped once per step."""
import math
from types import SimpleNamespace

import pytest
import torch

from m2dino.training.loop import Progress
from m2dino.training.schedule import StepSchedule, lr_factor, warmup_cosine, warmup_stable_decay, warmup_steps
from m2dino.training.stopping import InnerSplitPlateau, StoppingRule


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=110, warmup_steps=10)
    assert [f(i) for i in range(3)] == pytest.approx([1 / 11, 2 / 11, 3 / 11])
    assert f(10) == pytest.approx(1.0)  # warmup done: the full rate
    assert f(60) == pytest.approx(0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.0) and f(500) == pytest.approx(0.0)  # 0 at the end and after
    assert all(f(i) >= f(i + 1) for i in range(10, 120))
    assert warmup_cosine(5, 0)(0) == pytest.approx(1.0)


def test_warmup_is_a_share_below_one_else_steps():
    assert warmup_steps(0.1, 200) == 20
    assert warmup_steps(7, 200) == 7
    f = lr_factor(SimpleNamespace(warmup=0.1), StoppingRule(200))
    assert f(19) < 1.0 and f(20) == pytest.approx(1.0)


def test_every_model_warms_up_at_least_one_step():
    # a tiny model's 5% of 14 steps rounds to 0: it still gets one step of warmup
    assert warmup_steps(0.05, 14) == 1 and warmup_steps(0.05, 1) == 1
    assert warmup_steps(0, 14) == 0  # --warmup 0 turns it off on purpose
    f = lr_factor(SimpleNamespace(warmup=0.05), StoppingRule(14))
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)


def test_warmup_stable_decay_shape():
    f = warmup_stable_decay(warmup_steps=4, decay_start=20, decay_steps=9)
    assert [f(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(f(i) == 1.0 for i in range(4, 20))  # stable
    assert [f(i) for i in range(20, 30)] == pytest.approx([(29 - i) / 10 for i in range(20, 30)])
    assert f(28) == pytest.approx(0.1)  # the last trained step: the lowest positive rate
    assert f(29) == 0.0 and f(100) == 0.0  # the floor at the stop and after
    assert warmup_stable_decay(1, 1, 1)(0) == pytest.approx(0.5)


def test_a_converged_rule_gets_warmup_stable_decay_that_follows_its_plateau():
    rule = InnerSplitPlateau(budget=40, measure=lambda: 1.0)
    progress = Progress()
    rule.bind(progress)
    f = lr_factor(SimpleNamespace(warmup=0.1), rule)  # warmup: 10% of the equal-exposure budget
    assert f(3) < 1.0 and f(4) == 1.0
    assert f(150) == 1.0 and f(rule.cap - 1) > 0.0 and f(rule.cap) == 0.0  # no plateau: the decay ends at the cap
    progress.decay_start = 80  # a plateau at step 80: decay over 20 steps, 20% of the 100
    assert f(79) == 1.0 and f(80) < 1.0 and f(99) == pytest.approx(1 / 21) and f(100) == 0.0
    assert rule.total_steps == 100


def optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1.0}], lr=0.1)


def test_each_group_gets_its_base_rate_times_the_factor_of_the_step_index():
    opt = optimizer()
    factor = warmup_cosine(20, 4)
    schedule = StepSchedule(opt, factor)
    reference = torch.optim.lr_scheduler.LambdaLR(optimizer(), factor)
    for index in range(20):
        schedule.apply(index)
        rates = [g["lr"] for g in opt.param_groups]
        assert rates == pytest.approx([g["lr"] for g in reference.optimizer.param_groups])
        assert schedule.lr_at(index) == pytest.approx(rates[0])
        reference.optimizer.step()
        reference.step()
    # a resumed optimizer keeps its base rates ("initial_lr") whatever rate it was saved at
    resumed = StepSchedule(opt, factor)
    assert resumed.base_lrs == [0.1, 1.0]
    assert math.isclose(resumed.lr_at(0), 0.1 * factor(0))
