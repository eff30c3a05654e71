"""Data-parallel training with two CPU processes (gloo), through DDP and through FSDP2: the
replicas (the gathered shards) stay identical, and the loss and weights match one process
trained on the same global batch."""
import copy
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


def _config(suite, out, batch_size, fsdp=False, grad_accum=1) -> TrainConfig:
    # aux losses off: they are computed per process (the load-balance loss is not a mean over
    # samples), so only the task losses can equal the single-process ones
    return TrainConfig(data=str(suite), out=str(out), paradigm="au", img_size=32, batch_size=batch_size,
                       steps=3, log_every=1, progress=False, warmup=0, lr=1e-3, fsdp=fsdp, grad_accum=grad_accum,
                       aux_weights={"load_balance": 0.0, "z_loss": 0.0, "mutual_information": 0.0}).validate()


def _train(rank, world, port, suite, out, batch_size, fsdp=False, grad_accum=1):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from m2dino.evaluation.baselines import trivial_baselines
    from m2dino.tasks import apply_groups, load_groups
    from m2dino.training import distributed as dist_utils
    from m2dino.training.study import load_data
    from m2dino.training.trainer import ModelTrainer

    config = _config(suite, out, batch_size, fsdp, grad_accum)
    device = torch.device("cpu")
    dist_utils.setup(device)
    try:
        _, data = load_data(config, out)
        specs = apply_groups(sorted(data.tasks.values(), key=lambda s: s.task_id), load_groups())
        trainer = ModelTrainer(config, "all", specs, data.train, data.val, out / "au" / "all", device,
                               trivial_baselines(data.train, data.val, specs))
        trainer.run()
        if fsdp and world > 1:
            assert dist_utils.is_sharded(trainer.train_model)
        else:
            assert isinstance(trainer.train_model, torch.nn.parallel.DistributedDataParallel) == (world > 1)
        state, _ = dist_utils.full_state_dicts(trainer.train_model, trainer.optimizer)  # gathers shards
        torch.save(state, out / f"rank{rank}.pt")
    finally:
        dist_utils.cleanup()


def _losses(model_dir):
    return [json.loads(x)["loss"] for x in (model_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp,grad_accum", [(False, 1), (True, 1), (False, 2), (True, 2)],
                         ids=["ddp", "fsdp2", "ddp-grad-accum", "fsdp2-grad-accum"])
def test_two_gloo_processes_equal_one_process_with_the_global_batch(tmp_path, tiny_suite, fsdp, grad_accum):
    # with --grad-accum 2 each rank's 4 images go in two micro-batches of 2, synchronised once
    suite = tiny_suite(TASKS, min_train=8, min_val=3)
    mp.spawn(_train, args=(2, _free_port(), suite, tmp_path / "ddp", 4, fsdp, grad_accum), nprocs=2, join=True)
    mp.spawn(_train, args=(1, _free_port(), suite, tmp_path / "one", 8), nprocs=1, join=True)

    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    if fsdp:  # each rank holds a shard; the gathered full state exists on rank 0 only
        assert r1 == {} and set(r0) == set(one)
    else:
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
    # move a weight by a visible part of one step: bound the drift at a tenth of the largest
    # possible total update (3 steps x the heads' rate, lr 1e-3 x head_lr_mult); a wrong
    # reduction moves weights by about that.
    largest = 1e-3 * TrainConfig().head_lr_mult
    assert worst < 0.1 * 3 * largest, f"two processes drift from one process by {worst}"


def _fsdp_resume(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from m2dino import create_model, total_loss
    from m2dino.training import distributed as dist_utils

    device = torch.device("cpu")
    dist_utils.setup(device)
    try:
        def build():
            torch.manual_seed(0)
            model = dist_utils.parallelize(create_model("dinov3_tiny", ["breast_2cls"], moe_layers=2, img_size=32),
                                           device, fsdp=True)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

        gen = torch.Generator().manual_seed(rank)
        images = torch.randn(2, 3, 32, 32, generator=gen)
        targets = [{"label": torch.tensor(i % 2)} for i in range(2)]

        def step(model, optimizer):
            optimizer.zero_grad()
            loss, _ = total_loss(model(images, torch.zeros(2, dtype=torch.long)), targets, model.tasks)
            loss.backward()
            optimizer.step()

        model, optimizer = build()
        step(model, optimizer)
        # what a checkpoint holds (rank 0; on CPU the gathered optimizer state may alias the live
        # one, so copy it as writing it to disk does), then what every rank reads back
        saved = dist_utils.broadcast_object(copy.deepcopy(dist_utils.full_state_dicts(model, optimizer)))
        step(model, optimizer)
        continued = dist_utils.full_state_dicts(model, optimizer)[0]

        resumed, resumed_optimizer = build()
        dist_utils.load_full_state_dicts(resumed, resumed_optimizer, *saved)
        step(resumed, resumed_optimizer)
        again = dist_utils.full_state_dicts(resumed, resumed_optimizer)[0]
        if rank == 0:
            torch.save({"continued": continued, "resumed": again}, out / "resume.pt")
    finally:
        dist_utils.cleanup()


@pytest.mark.slow
def test_fsdp2_state_gathered_and_scattered_back_resumes_exactly(tmp_path):
    mp.spawn(_fsdp_resume, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    result = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert set(result["continued"]) == set(result["resumed"]) and result["continued"]
    for k, v in result["continued"].items():
        assert torch.equal(v, result["resumed"][k]), k
