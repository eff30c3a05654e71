"""Regional compilation (m2dino.training.compile.compile_blocks: torch.compile on each backbone
block) against eager: one full training step (mixed-task batch of the 27 tasks, forward, loss,
backward, AdamW step), the two variants timed round-robin in the same run (measure_peers), and
the compile time: the first compiled step, with an empty inductor cache (a fresh
TORCHINDUCTOR_CACHE_DIR), minus a steady compiled step. The 1-minute load average before and
after is recorded with the numbers (this machine is shared).
CPU: the default demo model (training's DEMO_MODEL: dinov3_tiny at 64 px, 4 experts, top-2, MoE
in the last 2 blocks) with the demo's 16 images per step. GPU: ViT-B at 224 px, 64 images, bf16
autocast, the paper's MoE (8 experts, top-2, last 6 blocks). No speed target is asserted: the
numbers are reported (compile time, speed-up)."""
import os
import time

import pytest
import torch
from harness import DEVICE, RESULTS, synchronize
from test_model_bench import TASK_LIST, make_batch

from m2dino.models.configs import M2DINOConfig
from m2dino.models.m2dino import M2DINO
from m2dino.training.compile import compile_blocks
from m2dino.training.config import DEMO_MODEL
from m2dino.training.losses import total_loss

if DEVICE == "cuda":
    CONFIG = M2DINOConfig(name="dinov3_vitb16", num_experts=8, top_k=2, moe_layers=6, img_size=224)
    CASE, BATCH = "train_step vitb16_224_b64", 64
else:
    CONFIG = DEMO_MODEL
    CASE, BATCH = "train_step demo_tiny_64_b16", 16


def _step(compiled: bool):
    torch.manual_seed(0)
    model = M2DINO(CONFIG, TASK_LIST).to(DEVICE).train()
    if compiled:
        compile_blocks(model)
    images, task_ids, targets = make_batch(model, CONFIG.img_size, BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = total_loss(model(images, task_ids), targets, model.tasks)
        loss.backward()
        optimizer.step()

    return step


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def test_compile_blocks_vs_eager(measure_peers, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold compile
    torch._dynamo.reset()
    load_before = os.getloadavg()
    eager, compiled = _step(False), _step(True)
    eager_first = _timed(eager)
    compiled_first = _timed(compiled)
    measure_peers(CASE, {"eager": eager, "compiled_blocks": compiled}, rounds=10 if DEVICE == "cuda" else 5)
    eager_s, compiled_s = RESULTS[CASE]["eager"].seconds, RESULTS[CASE]["compiled_blocks"].seconds
    RESULTS[CASE]["compiled_blocks"].extra.update(
        speedup_vs_eager=eager_s / compiled_s, compile_seconds=compiled_first - compiled_s,
        first_step_seconds=compiled_first, eager_first_step_seconds=eager_first, images=BATCH,
        load_avg_before=[round(v, 2) for v in load_before], load_avg_after=[round(v, 2) for v in os.getloadavg()])
    print(f"\n{CASE}: eager {eager_s * 1e3:.1f} ms, compiled blocks {compiled_s * 1e3:.1f} ms "
          f"({eager_s / compiled_s:.2f}x), compile {compiled_first - compiled_s:.1f} s, "
          f"load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()
