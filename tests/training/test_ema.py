"""Weight EMA: the update rule, exact resume (bit for bit on CPU), evaluation and saving with the
averaged weights."""
import io

import pytest
import torch

from m2dino.models.m2dino import create_model, load_model, save_model
from m2dino.training.ema import ModelEMA
from m2dino.training.losses import total_loss

TASKS = ["breast_3cls", "IUGC", "cardiac_multi"]
SIZE, DECAY = 16, 0.9


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("dinov3_tiny", TASKS, num_experts=4, top_k=2, moe_layers=2, neck_channels=16,
                        backbone_overrides={"depth": 4})


def _batches(count=4, batch=3):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        tasks = torch.randint(0, 3, (batch,), generator=g)
        targets = [{"label": torch.randint(0, 3, (), generator=g)} if t == 0 else
                   {"points": torch.rand(3, 2, generator=g)} if t == 1 else
                   {"mask": torch.randint(0, 4, (SIZE, SIZE), generator=g)} for t in tasks.tolist()]
        out.append((torch.randn(batch, 3, SIZE, SIZE, generator=g), tasks, targets))
    return out


def _train(model, optimizer, ema, batches):
    model.train()
    for images, tasks, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = total_loss(model(images, tasks), targets, model.tasks)
        loss.backward()
        optimizer.step()
        ema.update(model)


@pytest.mark.parametrize("warmup", [False, True])
def test_update_rule_first_copies_then_averages(warmup):
    model = torch.nn.Linear(3, 2).double()
    ema = ModelEMA(model, DECAY, warmup=warmup)
    assert ema.updates == 0
    expected = None
    for step in range(4):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
            model.bias.fill_(-2.0 * step)
        ema.update(model)
        current = torch.cat([model.weight.flatten(), model.bias])
        decay = min(DECAY, (1 + step) / (10 + step)) if warmup else DECAY
        expected = current.clone() if expected is None else decay * expected + (1 - decay) * current
        got = torch.cat([ema.module.weight.flatten(), ema.module.bias])
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    assert ema.updates == 4
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_warmup_decay_spans_a_tenth_of_the_steps_until_the_decay_caps_it():
    ema = ModelEMA(torch.nn.Linear(2, 2), 0.999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(90) == pytest.approx(0.91)          # about 1 / (1 - 0.91) = 11 steps
    assert ema.decay_at(10 ** 6) == 0.999                   # capped by the decay
    assert ModelEMA(torch.nn.Linear(2, 2), 0.999).decay_at(1) == 0.999


@pytest.mark.slow
def test_resume_mid_way_gives_the_uninterrupted_ema_bit_for_bit():
    batches = _batches()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = ModelEMA(model, DECAY, warmup=True)
    _train(model, optimizer, ema, batches)

    first = _model()
    optimizer = torch.optim.AdamW(first.parameters(), lr=1e-3)
    ema_first = ModelEMA(first, DECAY, warmup=True)
    _train(first, optimizer, ema_first, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema_first.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors and plain numbers only

    resumed = _model(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    optimizer.load_state_dict(saved["optimizer"])
    ema_resumed = ModelEMA(resumed, DECAY, warmup=True)
    ema_resumed.load_state_dict(saved["ema"])
    assert saved["ema"]["decay"] == DECAY and saved["ema"]["warmup"] and ema_resumed.updates == 2
    _train(resumed, optimizer, ema_resumed, batches[2:])

    assert ema_resumed.updates == ema.updates == 4
    want, got = ema.module.state_dict(), ema_resumed.module.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the EMA is not the model: it lags behind the trained weights
    assert not torch.equal(ema.module.heads["breast_3cls"].linear.weight, model.heads["breast_3cls"].linear.weight)


def test_evaluate_and_save_with_the_averaged_weights(tmp_path):
    model = _model()
    images, tasks, targets = _batches(1)[0]
    model.train()
    total_loss(model(images, tasks), targets, model.tasks)[0].backward()  # a graph left in the MoE layers
    ema = ModelEMA(model, DECAY)  # built after a forward: the bookkeeping with a graph is left out
    ema.update(model)
    model.eval()
    with torch.no_grad():
        same = ema.module(images, tasks)["tasks"]["breast_3cls"]["logits"]
        assert torch.equal(same, model(images, tasks)["tasks"]["breast_3cls"]["logits"])
        for p in model.parameters():
            p.add_(0.1)
        assert torch.equal(ema.module(images, tasks)["tasks"]["breast_3cls"]["logits"], same)  # not aliased
        ema.update(model)
        moved = ema.module(images, tasks)["tasks"]["breast_3cls"]["logits"]
    assert not torch.equal(moved, same)
    save_model(ema.module, tmp_path / "ema")
    loaded = load_model(tmp_path / "ema").eval()
    with torch.no_grad():
        assert torch.equal(loaded(images, tasks)["tasks"]["breast_3cls"]["logits"], moved)


def test_bad_decay_and_bad_state():
    model = torch.nn.Linear(2, 2)
    for bad in (0.0, 1.0, 1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\)"):
            ModelEMA(model, bad)
    ema = ModelEMA(model, 0.99)
    with pytest.raises(ValueError, match=r"EMA state lacks \['updates'\]"):
        ema.load_state_dict({"weights": model.state_dict()})
    with pytest.raises(RuntimeError, match="size mismatch"):
        ema.load_state_dict({"updates": 1, "weights": torch.nn.Linear(3, 2).state_dict()})
