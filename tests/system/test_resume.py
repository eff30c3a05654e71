"""--resume continues exactly: the resumed run's losses and final weights equal the uninterrupted
run's, bit for bit, on CPU (model, optimizer, scheduler, sampler position, RNG, step)."""
import functools
import json

import pytest
import torch
from run_logs import step_losses
from safetensors.torch import load_file

from m2dino.training import checkpoint as ckpt
from m2dino.training import study
from m2dino.training.jobs import StudyContext
from m2dino.training.loop import TrainingLoop
from m2dino.training.study import run

TASKS = ["breast_2cls", "fetal_femur"]
SUITE = dict(tasks=TASKS, min_train=12, min_val=4)
RUN_OPTIONS = dict(epochs=2, checkpoint_every=2, warmup=2, lr=1e-3)


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, step):
    """Every model of the study stops (Interrupt) right after its training step `step`."""
    def callback(event):
        if event.step == step:
            raise Interrupt(f"interrupted at step {event.step}")
    monkeypatch.setattr(study, "StudyContext", functools.partial(StudyContext, step_callbacks=(callback,)))


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [9])  # mid-epoch of epoch 2, last checkpoint at step 8
def test_resume_equals_uninterrupted(suite, tmp_path, monkeypatch, stop_at, tiny_config):
    ref_cfg = tiny_config(suite, tmp_path / "ref")
    run(ref_cfg)
    ref_dir = tmp_path / "ref" / "au" / "all"
    ref = step_losses(ref_dir)
    assert sorted(ref) == list(range(1, 13))  # 24 samples / batch 4 = 6 steps x 2 epochs

    cfg = tiny_config(suite, tmp_path / "cut")
    interrupt_at(monkeypatch, stop_at)
    with pytest.raises(Interrupt):
        run(cfg)
    cut_dir = tmp_path / "cut" / "au" / "all"
    state = ckpt.read_train_state(ckpt.find_checkpoint(cut_dir))
    assert state["progress"]["step"] == 8 and state["progress"]["batches_done"] == 2
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["batches_done"] == 2

    monkeypatch.undo()
    run(tiny_config(suite, tmp_path / "cut", resume=True))
    resumed = step_losses(cut_dir)
    assert sorted(resumed) == sorted(ref)
    for s in ref:
        assert resumed[s] == ref[s], f"step {s}: resumed loss {resumed[s]!r} != uninterrupted {ref[s]!r}"
    a = load_file(str(ref_dir / "last" / "model.safetensors"))
    b = load_file(str(cut_dir / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((ref_dir / "eval.json").read_text()) == json.loads((cut_dir / "eval.json").read_text())
    events = [json.loads(x)["event"] for x in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert "resume" in events


def test_resume_skips_finished_models(suite, tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config(suite, tmp_path / "run", epochs=1)
    run(cfg)
    model_dir = tmp_path / "run" / "au" / "all"
    before = (model_dir / "metrics.jsonl").read_text()

    def fail(*a, **k):
        raise AssertionError("a finished model must not train again")
    monkeypatch.setattr(TrainingLoop, "run", fail)
    result = run(tiny_config(suite, tmp_path / "run", epochs=1, resume=True))
    assert set(result["au"]["tasks"]) == set(TASKS)
    assert (model_dir / "metrics.jsonl").read_text().startswith(before)


def test_checkpoint_errors_name_the_problem(suite, tmp_path, tiny_config):
    cfg = tiny_config(suite, tmp_path / "run", steps=2, checkpoint_every=1)
    run(cfg)
    last = tmp_path / "run" / "au" / "all" / "last"
    from m2dino.models.m2dino import create_model
    from m2dino.tasks import get_task
    other = create_model("dinov3_tiny", [get_task("lung")], num_experts=4, top_k=2, moe_layers=2, img_size=32)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_checkpoint(last, other)
    data = (last / ckpt.TRAIN_STATE).read_bytes()
    (last / ckpt.TRAIN_STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="train_state.pt"):
        ckpt.read_train_state(last)


@pytest.mark.parametrize("seconds, saves", [(0, 4), (1e9, 2)])
def test_epoch_checkpoints_follow_checkpoint_seconds(suite, tmp_path, monkeypatch, tiny_config, seconds, saves):
    """3 epochs: --checkpoint-seconds 0 saves at the start, after epochs 1 and 2, and at the
    end; a long interval leaves only the start and the end (the final state is always saved)."""
    steps = []
    real_save = ckpt.save_checkpoint

    def counting_save(model_dir, model, state, **kwargs):
        steps.append(state["progress"]["step"])
        return real_save(model_dir, model, state, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", counting_save)
    run(tiny_config(suite, tmp_path / "run", epochs=3, checkpoint_every=0, checkpoint_seconds=seconds))
    assert len(steps) == saves and steps[0] == 0 and steps[-1] == 18  # 6 steps per epoch
    if seconds == 0:
        assert steps == [0, 6, 12, 18]


@pytest.mark.slow
def test_a_converged_run_resumes_exactly_through_its_plateau_and_decay(suite, tmp_path, monkeypatch, tiny_config):
    """--budget converged keeps its rule's state (inner-split losses, the decay's start) in the
    checkpoint: a run cut before its plateau resumes to the same plateau, decay, rates, losses and
    weights as the uninterrupted run."""
    from run_logs import events

    from m2dino.training.loop import TrainingLoop

    # a learning rate of 1e-12 keeps the inner-split loss flat: a plateau at the sixth epoch end
    options = dict(budget="converged", lr=1e-12, checkpoint_every=2)
    run(tiny_config(suite, tmp_path / "ref", **options))
    ref_dir = tmp_path / "ref" / "au" / "all"
    ref_events = events(ref_dir)
    finished = ref_events[-1]
    assert finished["event"] == "finished" and finished["stopped"] == "plateau"

    account = TrainingLoop._account

    def cut(self, batch, result, progress, *args, **kwargs):
        account(self, batch, result, progress, *args, **kwargs)
        if progress.step == 15:
            raise Interrupt("interrupted at step 15")

    monkeypatch.setattr(TrainingLoop, "_account", cut)
    with pytest.raises(Interrupt):
        run(tiny_config(suite, tmp_path / "cut", **options))
    cut_dir = tmp_path / "cut" / "au" / "all"
    state = ckpt.read_train_state(ckpt.find_checkpoint(cut_dir))
    assert state["progress"]["step"] == 14 and state["progress"]["decay_start"] == -1
    assert state["progress"]["recent_losses"]  # the inner-split measurements so far travel with it
    monkeypatch.undo()
    run(tiny_config(suite, tmp_path / "cut", resume=True, **options))
    cut_events = events(cut_dir)
    train = lambda evs: {e["step"]: (e["loss"], e["lr"]) for e in evs if e["event"] == "train"}  # noqa: E731
    assert train(cut_events) == train(ref_events)
    assert {k: cut_events[-1][k] for k in ("step", "stopped", "final_lr")} == \
        {k: finished[k] for k in ("step", "stopped", "final_lr")}
    a = load_file(str(ref_dir / "last" / "model.safetensors"))
    b = load_file(str(cut_dir / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_state = ckpt.read_train_state(ckpt.find_checkpoint(ref_dir))["progress"]
    cut_state = ckpt.read_train_state(ckpt.find_checkpoint(cut_dir))["progress"]
    assert cut_state["decay_start"] == ref_state["decay_start"] > 14
