"""The training loop alone, on a one-parameter model and batches made in memory: step
callbacks, the epoch-end order (validation, the stopping rule, the checkpoint), the stop
reasons and final rate in the log, and skipped non-finite steps ending in TrainingDiverged
after a checkpoint of the last good state."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from m2dino.paradigms import PLATEAU_CAP_FACTOR, PLATEAU_WINDOW, WSD_DECAY_FRACTION
from m2dino.training.loop import LoopSettings, Progress, TrainData, TrainingDiverged, TrainingLoop
from m2dino.training.metrics_log import MetricsLog
from m2dino.training.schedule import StepSchedule, lr_factor, warmup_cosine
from m2dino.training.stopping import InnerSplitPlateau, StoppingRule


class Scale(torch.nn.Module):
    """output = w * images; its tasks are indexed by position."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, task_ids):
        return self.w * images

    def task_index(self, tasks):
        return torch.arange(len(tasks))


class Batches:
    """`per_epoch` batches of 2 images (the sampler, the dataset and the loader in one)."""

    def __init__(self, per_epoch: int):
        self.per_epoch = per_epoch
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return self.per_epoch

    def __iter__(self):
        for _ in range(self.per_epoch):
            yield {"images": torch.ones(2), "targets": {}, "tasks": ["a", "b"]}


def make_loop(tmp_path, stopping, loss_fn=None, calls=None, **settings):
    model = Scale()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = [] if calls is None else calls
    loop = TrainingLoop(
        name="m", model=model, forward=model, optimizer=optimizer,
        schedule=StepSchedule(optimizer, lr_factor(SimpleNamespace(warmup=0), stopping)),
        scaler=torch.amp.GradScaler("cuda", enabled=False), stopping=stopping,
        loss_fn=loss_fn or (lambda forward, outputs, batch: ((outputs - 0.5).pow(2).mean(), {})),
        device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
        settings=LoopSettings(**{**dict(grad_clip=1.0, log_every=1, max_bad_steps=3, checkpoint_every=0,
                                        eval_every=1, progress_bar=False), **settings}),
        log=MetricsLog(tmp_path, enabled=True),
        save=lambda progress: calls.append(("save", progress.step)),
        evaluate=lambda progress: calls.append(("eval", progress.step)),
        checkpoint_due=lambda: True, diverged_advice="advice")
    batches = Batches(4)
    return loop, TrainData(batches, batches, batches), calls


def events(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_callbacks_see_every_step_and_epoch_ends_validate_then_checkpoint(tmp_path):
    loop, data, calls = make_loop(tmp_path, StoppingRule(8))
    seen = []
    loop.step_callbacks.append(lambda e: seen.append((e.step, e.epoch, e.images, e.result.bad, e.loop is loop)))
    progress = Progress()
    loop.run(progress, data)
    assert seen == [(s, (s - 1) // 4, 2, None, True) for s in range(1, 9)]
    # epoch 1 ends: validate, then checkpoint; epoch 2 is the last: the final validation and checkpoint
    assert calls == [("eval", 4), ("save", 4), ("eval", 8), ("save", 8)]
    assert progress.finished and progress.stopped == "epochs" and progress.samples_seen == 16
    finished = events(tmp_path)[-1]
    assert finished["event"] == "finished" and finished["stopped"] == "epochs"
    assert finished["final_lr"] == pytest.approx(0.1 * warmup_cosine(8, 0)(7))
    train = [e["step"] for e in events(tmp_path) if e["event"] == "train"]
    assert train == list(range(1, 9))


def test_a_budget_ending_inside_an_epoch_skips_that_epoch_end(tmp_path):
    loop, data, calls = make_loop(tmp_path, StoppingRule(6), checkpoint_every=5)
    progress = Progress()
    loop.run(progress, data)
    assert progress.step == 6 and progress.epoch == 1 and progress.batches_done == 2
    assert calls == [("eval", 4), ("save", 4), ("save", 5), ("eval", 6), ("save", 6)]


def test_a_converged_rule_decays_after_its_plateau_and_stops_at_the_decay_end(tmp_path):
    budget = 8  # two epochs of 4 steps; a flat inner loss plateaus at the first epoch end past 2 x window
    flat = lambda forward, outputs, batch: (outputs.sum() * 0 + 1.0, {})  # noqa: E731
    loop, data, calls = make_loop(tmp_path, InnerSplitPlateau(budget, measure=lambda: 1.0), loss_fn=flat,
                                  eval_every=0)
    progress = Progress()
    loop.run(progress, data)
    start = 4 * 2 * PLATEAU_WINDOW
    decay = math.ceil(start * WSD_DECAY_FRACTION / (1 - WSD_DECAY_FRACTION))
    assert progress.decay_start == start and progress.step == start + decay and progress.stopped == "plateau"
    finished = events(tmp_path)[-1]
    assert finished["stopped"] == "plateau" and finished["final_lr"] == pytest.approx(0.1 / (decay + 1))
    # a falling inner loss never plateaus: the run goes to the cap, its last 20% the decay
    falling = iter(math.exp(-i) for i in range(1000))
    loop, data, _ = make_loop(tmp_path / "cap", InnerSplitPlateau(2, measure=lambda: next(falling)), loss_fn=flat,
                              eval_every=0)
    progress = Progress()
    loop.run(progress, data)
    assert progress.step == PLATEAU_CAP_FACTOR * 2 and progress.stopped == "cap" and progress.decay_start == -1


def test_non_finite_steps_are_skipped_then_the_run_stops_with_the_last_good_state(tmp_path):
    step = {"n": 0}

    def loss_fn(forward, outputs, batch):
        step["n"] += 1
        loss = (outputs - 0.5).pow(2).mean()
        return (loss * float("nan") if step["n"] >= 3 else loss), {}

    loop, data, calls = make_loop(tmp_path, StoppingRule(8), loss_fn=loss_fn)
    weights = []
    loop.step_callbacks.append(lambda e: weights.append(float(loop.model.w.detach())))
    progress = Progress()
    with pytest.raises(TrainingDiverged, match="3 training steps in a row.*advice"):
        loop.run(progress, data)
    assert weights[2:] == [weights[1]] * 3  # skipped steps change nothing
    assert calls[-1] == ("save", 5) and progress.bad_in_row == 3 and progress.bad_total == 3
    bad = [(e["step"], e["bad"]) for e in events(tmp_path) if e["event"] == "train" and "bad" in e]
    assert bad == [(3, "non-finite loss"), (4, "non-finite loss"), (5, "non-finite loss")]


def test_settings_come_from_the_config():
    config = SimpleNamespace(grad_clip=1.0, log_every=5, max_bad_steps=2, checkpoint_every=0, eval_every=1,
                             progress=False, grad_accum=3)
    assert LoopSettings.from_config(config) == LoopSettings(1.0, 5, 2, 0, 1, False, 3)


def test_gradient_sync_is_off_inside_for_ddp_and_fsdp2_and_restored():
    import contextlib

    from m2dino.training.loop import gradient_sync

    calls = []

    class DDPLike:
        @contextlib.contextmanager
        def no_sync(self):
            calls.append("no_sync in")
            yield
            calls.append("no_sync out")

    class FSDP2Like:
        def set_requires_gradient_sync(self, flag):
            calls.append(f"sync {flag}")

    for forward in (DDPLike(), FSDP2Like(), torch.nn.Linear(1, 1)):
        with gradient_sync(forward, enabled=True):
            calls.append("last")
        with gradient_sync(forward, enabled=False):
            calls.append("inner")
    assert calls == ["last", "no_sync in", "inner", "no_sync out",
                     "last", "sync False", "inner", "sync True",
                     "last", "inner"]
