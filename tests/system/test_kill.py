"""SIGKILL at random moments (one of them inside a checkpoint write) always leaves a loadable
last checkpoint, and --resume reproduces the uninterrupted run's losses exactly; a rank that
dies under `torchrun --max-restarts=1` is restarted from the last checkpoint and the job ends."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import child_env
from run_logs import step_losses

from m2dino.training import checkpoint as ckpt

TASKS = ["breast_2cls", "fetal_femur"]
SUITE = dict(tasks=TASKS, min_train=12, min_val=4)
ARGS = ["--paradigm", "au", "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--log-every", "1",
        "--checkpoint-every", "1", "--warmup", "2", "--no-progress", "--seeds", "0"]


def start(suite, out, resume: bool, checkpoint_sleep: float = 0.4) -> subprocess.Popen:
    env = {**child_env(checkpoint_sleep=checkpoint_sleep), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "m2dino.train", "--data", str(suite), "--out", str(out), *ARGS]
    if resume:
        cmd.append("--resume")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(condition, proc, timeout=300.0):
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill: {proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the moment to kill")
        time.sleep(0.01)


def assert_loadable(model_dir: Path):
    from m2dino.models.m2dino import create_model
    from m2dino.tasks import get_task

    found = ckpt.find_checkpoint(model_dir)
    assert found is not None, f"no usable checkpoint in {sorted(p.name for p in model_dir.iterdir())}"
    model = create_model("dinov3_tiny", [get_task(t) for t in sorted(TASKS)], num_experts=4, top_k=2,
                         moe_layers=2, img_size=32)
    state = ckpt.load_checkpoint(found, model)
    return state["progress"]["step"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(suite, tmp_path):
    # the uninterrupted reference is the same command in the same kind of process: a run inside
    # this pytest process would share whatever state earlier tests left in it
    reference = tmp_path / "ref"
    proc = start(suite, reference, resume=False, checkpoint_sleep=0)
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    ref = step_losses(reference / "au" / "all")
    assert sorted(ref) == list(range(1, 13))

    out = tmp_path / "killed"
    model_dir = out / "au" / "all"
    rng = random.Random(0)
    resume = False
    moments = ["during-checkpoint-write", "random-after-step", "during-checkpoint-write"]
    for moment in moments:
        done = max(step_losses(model_dir), default=0)
        proc = start(suite, out, resume)
        if moment == "during-checkpoint-write":
            wait_for(lambda done=done: max(step_losses(model_dir), default=0) > done
                     and any(p.name.startswith(".last.tmp-") for p in model_dir.iterdir()), proc)
        else:
            target = done + rng.randint(1, 3)
            wait_for(lambda target=target: max(step_losses(model_dir), default=0) >= target, proc)
            time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_loadable(model_dir)
        resume = True
    proc = start(suite, out, resume=True)
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    resumed = step_losses(model_dir)
    assert sorted(resumed) == sorted(ref)
    for s in ref:
        assert resumed[s] == ref[s], f"step {s}: {resumed[s]!r} after kills vs {ref[s]!r} uninterrupted"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".last.")]


@pytest.mark.slow
def test_crashed_rank_restarts_from_last_checkpoint(suite, tmp_path):
    out = tmp_path / "elastic"
    env = {**child_env(crash_rank_at_step="1:5"), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "-m", "m2dino.train", "--data", str(suite), "--out", str(out),
           "--paradigm", "au", "--img-size", "32", "--batch-size", "2", "--epochs", "1", "--log-every", "1",
           "--checkpoint-every", "2", "--no-progress", "--seeds", "0"]
    # own session: on a timeout the agent AND its workers are killed, nothing is left behind
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        raise AssertionError(f"torchrun job did not finish in 300 s: {log[-4000:]}") from None
    assert proc.returncode == 0, log[-4000:]
    model_dir = out / "au" / "all"
    events = [json.loads(x) for x in (model_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 4  # the last checkpoint before the crash at step 5
    assert any(e["event"] == "finished" for e in events)
    steps = sorted({e["step"] for e in events if e["event"] == "train"})
    assert steps == list(range(1, 7))  # 24 samples / (2 ranks x 2) = 6 steps
    assert (model_dir / "eval.json").is_file() and (out / "au" / "metrics.json").is_file()
