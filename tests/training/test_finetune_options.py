"""The fine-tuning options wired into training: --grad-accum gives the whole batch's step,
--ema is validated, kept as best and resumed exactly, --drop-path and --compile reach the model,
each option's resume rule, and --ema refused with --fsdp."""
import json

import pytest
import torch
from safetensors.torch import load_file

from m2dino.training import checkpoint as ckpt
from m2dino.training.config import RESUMABLE, TrainConfig
from m2dino.training.trainer import ModelTrainer

TASKS = ["breast_2cls", "fetal_femur"]
SUITE = dict(tasks=TASKS, min_train=12, min_val=4)
LR = 1e-3


class Interrupt(Exception):
    pass


def _trainer(suite, out, step_callbacks=None, **options) -> ModelTrainer:
    from m2dino.evaluation.baselines import trivial_baselines
    from m2dino.training.study import load_data

    config = TrainConfig(data=str(suite), out=str(out), paradigm="au", img_size=32, batch_size=6, log_every=1,
                         progress=False, warmup=0, lr=LR, **options).validate()
    _, data = load_data(config, out)
    specs = sorted(data.tasks.values(), key=lambda s: s.task_id)
    return ModelTrainer(config, "all", specs, data.train, data.val, out / "au" / "all", torch.device("cpu"),
                        trivial_baselines(data.train, data.val, specs), step_callbacks=step_callbacks)


def _train_losses(model_dir):
    lines = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["event"] == "train"]


@pytest.mark.slow
def test_grad_accum_micro_batches_give_the_whole_batch_step(suite, tmp_path):
    # the batch-statistics aux losses (load balance, mutual information) are estimated per
    # micro-batch, as data parallelism estimates them per rank: off here; the z-loss is exact
    aux = {"load_balance": 0.0, "z_loss": 1e-3, "mutual_information": 0.0}
    steps = 3
    runs = {}
    for accum in (1, 3):
        trainer = _trainer(suite, tmp_path / f"accum{accum}", steps=steps, grad_accum=accum, aux_weights=aux)
        trainer.run()
        runs[accum] = trainer
    whole, micro = (_train_losses(tmp_path / f"accum{a}" / "au" / "all") for a in (1, 3))
    assert len(whole) == len(micro) == steps
    for a, b in zip(whole, micro):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert set(a["losses"]) == set(b["losses"])
        exact = [k for k in a["losses"] if not k.startswith("aux/") or k == "aux/z_loss"]
        for key in exact:  # the logged parts, merged over the micro-batches
            assert b["losses"][key] == pytest.approx(a["losses"][key], rel=1e-4, abs=1e-6), key
    one, three = (runs[a].model.state_dict() for a in (1, 3))
    worst = max(float((one[k].float() - three[k].float()).abs().max()) for k in one)
    # fp32 (the kernels have no float64 path in training): the micro-batches' gradients equal the
    # whole batch's up to summation order, and Adam's normalisation can turn that noise in a
    # near-zero gradient into a visible part of one step (the largest rate: the heads' lr x
    # head_lr_mult); a wrong scale moves weights by about that
    largest = LR * runs[1].config.head_lr_mult
    assert worst < 0.1 * steps * largest, f"3 micro-batches drift from the whole batch by {worst}"


@pytest.mark.slow
def test_ema_is_validated_kept_as_best_and_resumes_exactly(suite, tmp_path):
    options = dict(steps=5, ema=0.8, checkpoint_every=2)
    ref = _trainer(suite, tmp_path / "ref", **options)
    ref.run()
    ref_dir = tmp_path / "ref" / "au" / "all"
    # best/ holds the average, not the raw weights (the last step's raw weights are in last/)
    best = load_file(str(ref_dir / "best.safetensors"))
    averaged = ref.ema.module.state_dict()
    raw = ref.model.state_dict()
    assert all(torch.equal(best[k], averaged[k]) for k in best)
    assert any(not torch.equal(averaged[k], raw[k]) for k in best if raw[k].is_floating_point())
    assert ref.ema.updates == 5

    def interrupt(event):
        if event.step == 3:
            raise Interrupt
    cut_dir = tmp_path / "cut" / "au" / "all"
    with pytest.raises(Interrupt):
        _trainer(suite, tmp_path / "cut", step_callbacks=[interrupt], **options).run()
    saved = ckpt.read_train_state(ckpt.find_checkpoint(cut_dir))
    assert saved["progress"]["step"] == 2 and saved["ema"]["updates"] == 2
    resumed = _trainer(suite, tmp_path / "cut", resume=True, **options)
    resumed.run()
    assert resumed.ema.updates == 5
    a, b = ref.ema.state_dict()["weights"], resumed.ema.state_dict()["weights"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (ref_dir / "eval.json").read_bytes() == (cut_dir / "eval.json").read_bytes()


def test_drop_path_and_compile_reach_the_model(suite, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr("m2dino.training.trainer.compile_blocks", lambda model: compiled.append(model))
    trainer = _trainer(suite, tmp_path / "run", steps=1, drop_path=0.2, drop_path_schedule="linear", compile=True)
    model = trainer.build_model()
    rates = [block.sample_drop_ratio for block in model.backbone.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    trainer.run()
    assert compiled == [trainer.model]  # the blocks compiled before DDP/FSDP would wrap the model


def test_each_options_resume_rule():
    # layer decay changes the parameter groups, which the optimizer's saved state is laid out by
    assert "layer_decay" not in RESUMABLE
    # the same step's maths however it is cut, a training-time regulariser, the average's
    # decay (its weights are restored), how blocks run
    for name in ("grad_accum", "drop_path", "drop_path_schedule", "ema", "compile"):
        assert name in RESUMABLE, name


def test_options_are_off_by_default_and_checked():
    config = TrainConfig()
    assert (config.grad_accum, config.layer_decay, config.drop_path, config.drop_path_schedule, config.ema,
            config.compile) == (1, 1.0, 0.0, "uniform", None, False)
    with pytest.raises(ValueError, match="--ema"):
        TrainConfig(ema=0.999, fsdp=True).validate()
    with pytest.raises(ValueError, match="--grad-accum"):
        TrainConfig(batch_size=4, grad_accum=5).validate()
    for bad in (dict(layer_decay=0.0), dict(layer_decay=1.5), dict(drop_path=1.0), dict(ema=1.0)):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            TrainConfig(**bad).validate()
