"""Data-parallel training with two CPU processes (gloo): the replicas stay identical, and the
loss and weights match one process trained on the same global batch."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from m2dino.training.config import TrainConfig

TASKS = ["breast_2cls", "fetal_femur", "uterine_fibroid_det"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(suite, out, batch_size) -> TrainConfig:
    # aux losses off: they are computed per process (the load-balance loss is not a mean over
    # samples), so only the task losses can equal the single-process ones
    return TrainConfig(data=str(suite), out=str(out), paradigm="au", img_size=32, batch_size=batch_size,
                       steps=3, log_every=1, progress=False, warmup=0, lr=1e-3,
                       aux_weights={"load_balance": 0.0, "z_loss": 0.0, "mutual_information": 0.0}).validate()


def _train(rank, world, port, suite, out, batch_size):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from m2dino.training import distributed as dist_utils
    from m2dino.evaluation.baselines import trivial_baselines
    from m2dino.tasks import apply_groups, load_groups
    from m2dino.training.study import load_data
    from m2dino.training.trainer import ModelTrainer

    config = _config(suite, out, batch_size)
    device = torch.device("cpu")
    dist_utils.setup(device)
    try:
        _, data = load_data(config, out)
        specs = apply_groups(sorted(data.tasks.values(), key=lambda s: s.task_id), load_groups())
        trainer = ModelTrainer(config, "all", specs, data.train, data.val, out / "au" / "all", device,
                               trivial_baselines(data.train, data.val, specs))
        trainer.run()
        torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
    finally:
        dist_utils.cleanup()


def _losses(model_dir):
    return [json.loads(x)["loss"] for x in (model_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "train"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path, tiny_suite):
    suite = tiny_suite(TASKS, min_train=8, min_val=3)
    mp.spawn(_train, args=(2, _free_port(), suite, tmp_path / "ddp", 4), nprocs=2, join=True)
    mp.spawn(_train, args=(1, _free_port(), suite, tmp_path / "one", 8), nprocs=1, join=True)

    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"
    # only rank 0 writes the run directory
    assert not (tmp_path / "ddp" / "rank1").exists()
    ddp_losses = _losses(tmp_path / "ddp" / "au" / "all")
    one_losses = _losses(tmp_path / "one" / "au" / "all")
    assert len(ddp_losses) == len(one_losses) == 3
    for a, b in zip(ddp_losses, one_losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    worst = max(float((r0[k].float() - one[k].float()).abs().max()) for k in r0)
    # Adam normalises each gradient, so fp32 summation-order noise in a near-zero gradient can
    # move a weight by a visible part of one step (lr): bound the drift at a tenth of the
    # largest possible total update (3 steps x lr 1e-3); a wrong reduction moves weights by ~lr.
    assert worst < 0.1 * 3 * 1e-3, f"two processes drift from one process by {worst}"
