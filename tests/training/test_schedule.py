"""The learning-rate schedule alone: warmup then cosine, the per-group rates written before
each step by index, the same rates as torch's LambdaLR stepped once per step."""
import math
from types import SimpleNamespace

import pytest
import torch

from m2dino.training.schedule import StepSchedule, lr_factor, warmup_cosine, warmup_steps


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
    f = lr_factor(SimpleNamespace(warmup=0.1), 200)
    assert f(19) < 1.0 and f(20) == pytest.approx(1.0)


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
