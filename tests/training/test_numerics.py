"""Non-finite loss / gradient steps are skipped, counted and logged; too many in a row stop the
run with a clear message and a checkpoint of the last good state; an out-of-memory error ends
with advice and leaves only complete checkpoints."""

import pytest
import torch
from run_logs import events
from safetensors.torch import load_file

from m2dino.train import main
from m2dino.training import checkpoint as ckpt
from m2dino.training.loop import TrainingLoop
from m2dino.training.study import run
from m2dino.training.trainer import ModelTrainer, TrainingDiverged, TrainingOOM

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=4)
RUN_OPTIONS = dict(steps=6, warmup=0, max_bad_steps=3)


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a non-finite gradient."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, bad_steps: dict):
    """Make compute_loss return a NaN loss ("loss") or a NaN gradient ("grad") at given steps."""
    original = ModelTrainer.compute_loss
    counter = {"step": 0}

    def compute_loss(self, model, outputs, batch):
        counter["step"] += 1
        loss, logged = original(self, model, outputs, batch)
        kind = bad_steps.get(counter["step"])
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":
            loss = _NaNGrad.apply(loss)
        return loss, logged
    monkeypatch.setattr(ModelTrainer, "compute_loss", compute_loss)


def test_bad_steps_are_skipped_counted_and_logged(suite, tmp_path, monkeypatch, tiny_config):
    poison(monkeypatch, {2: "loss", 4: "grad", 5: "grad"})
    params_seen = []
    original_step = TrainingLoop.step

    def step(self, batch, progress):
        before = {n: p.detach().clone() for n, p in self.forward.named_parameters()}
        out = original_step(self, batch, progress)
        changed = any(not torch.equal(before[n], p) for n, p in self.forward.named_parameters())
        params_seen.append((out.bad, changed))
        return out
    monkeypatch.setattr(TrainingLoop, "step", step)
    run(tiny_config(suite, tmp_path / "run"))
    # a skipped step leaves every weight untouched; a good step changes them
    assert params_seen == [(None, True), ("non-finite loss", False), (None, True),
                           ("non-finite gradient", False), ("non-finite gradient", False), (None, True)]
    ev = events(tmp_path / "run" / "au" / "all")
    bad = [(e["step"], e["bad"], e["bad_total"]) for e in ev if e["event"] == "train" and "bad" in e]
    assert bad == [(2, "non-finite loss", 1), (4, "non-finite gradient", 2), (5, "non-finite gradient", 3)]
    finished = [e for e in ev if e["event"] == "finished"]
    assert finished and finished[0]["bad_steps"] == 3


def test_too_many_bad_steps_stop_with_last_good_state(suite, tmp_path, monkeypatch, tiny_config):
    poison(monkeypatch, {3: "loss", 4: "grad", 5: "loss"})
    good = {}
    original_step = TrainingLoop.step

    def step(self, batch, progress):
        out = original_step(self, batch, progress)
        if progress.step == 1:  # after the 2nd (last good) step
            good.update({n: p.detach().clone() for n, p in self.forward.state_dict().items()})
        return out
    monkeypatch.setattr(TrainingLoop, "step", step)
    with pytest.raises(TrainingDiverged, match=r"3 training steps in a row.*non-finite.*last good state"):
        run(tiny_config(suite, tmp_path / "run", steps=10))
    model_dir = tmp_path / "run" / "au" / "all"
    last = ckpt.find_checkpoint(model_dir)
    assert last is not None
    saved = load_file(str(last / "model.safetensors"))
    for k, v in good.items():
        assert torch.equal(saved[k], v), k
    state = ckpt.read_train_state(last)
    assert state["progress"]["bad_in_row"] == 3 and state["progress"]["step"] == 5


def test_cli_reports_divergence_as_an_error(suite, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {1: "loss", 2: "loss"})
    rc = main(["--data", str(suite), "--out", str(tmp_path / "run"), "--paradigm", "au", "--img-size", "32",
               "--batch-size", "4", "--steps", "4", "--max-bad-steps", "2", "--no-progress", "--seeds", "0"])
    assert rc == 1
    assert "2 training steps in a row" in capsys.readouterr().err


def test_out_of_memory_suggests_smaller_batch_and_keeps_checkpoints_complete(suite, tmp_path, monkeypatch, tiny_config):
    original_step = TrainingLoop.step

    def step(self, batch, progress):
        if progress.step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_step(self, batch, progress)
    monkeypatch.setattr(TrainingLoop, "step", step)
    with pytest.raises(TrainingOOM, match=r"--batch-size.*--grad-checkpointing"):
        run(tiny_config(suite, tmp_path / "run", checkpoint_every=2))
    model_dir = tmp_path / "run" / "au" / "all"
    last = ckpt.find_checkpoint(model_dir)
    assert last == model_dir / "last"
    assert ckpt.read_train_state(last)["progress"]["step"] == 2
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no partial write left
    assert not (model_dir / "best.safetensors").exists()  # nothing half-trained saved as "best"
