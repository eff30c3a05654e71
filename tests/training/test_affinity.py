"""The affinity probe: lookahead affinity and gradient cosine against closed forms, on a
hand-made two-task problem whose steps provably help or harm; the model left untouched; the
accumulator and affinity.json (shape checks name the file)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from m2dino.errors import InputError
from m2dino.evaluation.affinity import AFFINITY_FILE, AffinityAccumulator, StepAffinity, read_affinity, write_affinity
from m2dino.models.m2dino import create_model
from m2dino.training.affinity import AffinityProbe, measure_step, shared_parameters, trainer_task_losses


class Shared(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))


class Quadratic(nn.Module):
    """Task t's loss: 0.5 ||w - target_t||^2 + 0.5 ||head_t||^2 with w shared, head_t its own."""

    def __init__(self, targets: dict, dropout: float = 0.0):
        super().__init__()
        dim = len(next(iter(targets.values())))
        self.shared = Shared(dim)
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.ones(dim)) for t in targets})
        self.register_buffer("targets", torch.tensor(list(targets.values()), dtype=torch.float64).float())
        self.names = list(targets)
        self.dropout = nn.Dropout(dropout)

    def forward(self, w_start):
        w = self.shared.weight + w_start
        return {"tasks": {t: 0.5 * (self.dropout(w - self.targets[i]) ** 2).sum() + 0.5 * self.heads[t].square().sum()
                          for i, t in enumerate(self.names)}}


def quadratic(start, targets, lr, dropout=0.0):
    model = Quadratic(targets, dropout)
    shared = shared_parameters(model, types=(Shared,))
    result = measure_step(model, (torch.tensor(start),), lambda out: out["tasks"], shared, lr)
    return model, result


def closed_form(start, targets, lr):
    """Z[i, j] = 1 - L_j(w - lr (w - t_i)) / L_j(w) for L = 0.5||w - t||^2 + 0.5||head||^2."""
    w = np.array(start, dtype=float)
    names = sorted(targets)
    head = 0.5 * len(w)
    loss = lambda j, v: 0.5 * np.sum((v - np.array(targets[j])) ** 2) + head  # noqa: E731
    z = np.array([[1 - loss(j, w - lr * (w - np.array(targets[i]))) / loss(j, w) for j in names] for i in names])
    g = [w - np.array(targets[i]) for i in names]
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in g] for a in g])
    return z, cos


def test_a_helpful_step_has_positive_affinity_a_harmful_one_negative():
    # from w = 0: task B's target lies beside A's (a step on B moves w toward A's target, so it
    # lowers L_A); task C's target lies opposite (a step on C moves w away from A's target)
    targets = {"A": [2.0, 0.0], "B": [1.5, 0.5], "C": [-2.0, 0.0]}
    start, lr = [0.0, 0.0], 0.1
    model, result = quadratic(start, targets, lr)
    z, cos = closed_form(start, targets, lr)
    assert result.tasks == ["A", "B", "C"]
    np.testing.assert_allclose(result.lookahead, z, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.cosine, cos, rtol=1e-5, atol=1e-7)
    a, b, c = 0, 1, 2
    assert result.lookahead[b, a] > 0 and result.lookahead[c, a] < 0   # B helps A, C harms A
    assert result.cosine[a, b] > 0 and result.cosine[a, c] < 0
    assert result.cosine[a, c] == pytest.approx(-1.0)
    np.testing.assert_allclose(np.diag(result.cosine), 1.0, rtol=1e-6)
    assert np.all(np.diag(result.lookahead) > 0)   # a small step lowers the task's own loss


def test_the_model_is_left_untouched():
    targets = {"A": [2.0, 0.0], "B": [-1.0, 3.0]}
    model = Quadratic(targets, dropout=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    shared = shared_parameters(model, types=(Shared,))
    assert list(shared) == ["shared.weight"]  # the heads are not shared
    first = measure_step(model, (torch.tensor([0.5, 0.5]),), lambda out: out["tasks"], shared, 0.05)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random draws go on as before
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    # the same random state for every forward: a measurement repeats exactly, dropout and all
    again = measure_step(model, (torch.tensor([0.5, 0.5]),), lambda out: out["tasks"], shared, 0.05)
    np.testing.assert_array_equal(first.lookahead, again.lookahead)


def test_with_dropout_the_lookahead_sees_the_same_masks():
    """Dropout masks differ between forwards unless the state is replayed: with zero lr the
    stepped model is the model itself, so Z must be exactly 0 (it is not with fresh masks)."""
    targets = {"A": [2.0, 0.0, 1.0, 1.0], "B": [-1.0, 3.0, 0.0, 1.0]}
    model = Quadratic(targets, dropout=0.5)
    result = measure_step(model, (torch.tensor([0.5, 0.5, 0.0, 0.0]),), lambda out: out["tasks"],
                          shared_parameters(model, types=(Shared,)), 1e-30)
    np.testing.assert_allclose(result.lookahead, 0.0, atol=1e-12)


def test_bad_learning_rate_and_no_shared_parameters():
    model = Quadratic({"A": [1.0], "B": [2.0]})
    with pytest.raises(ValueError, match="learning rate"):
        measure_step(model, (torch.tensor([0.0]),), lambda out: out["tasks"],
                     shared_parameters(model, types=(Shared,)), 0.0)
    model.shared.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter inside a Shared"):
        shared_parameters(model, types=(Shared,))


TASK_IDS = ["cardiac_multi", "breast_3cls", "IUGC", "thyroid_nodule_det"]
SIZE = 32


def _m2dino_batch(order=(0, 1, 2, 3, 0, 2)):
    torch.manual_seed(1)
    images = torch.randn(len(order), 3, SIZE, SIZE)
    targets = []
    for i in order:
        targets.append([{"mask": torch.randint(0, 4, (SIZE, SIZE))}, {"label": torch.tensor(2)},
                        {"points": torch.rand(3, 2)}, {"box": torch.tensor([0.1, 0.2, 0.5, 0.7])}][i])
    return images, torch.tensor(order), targets


def test_m2dino_probe_on_a_mixed_batch_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = create_model("dinov3_tiny", TASK_IDS, num_experts=4, top_k=2, moe_layers=2, neck_channels=16)
    model.train()
    shared = shared_parameters(model)
    assert shared and all(name.startswith("backbone.") for name in shared)
    assert any("gate_weight" in name for name in shared) and any("fc1_weight" in name for name in shared)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, task_ids, targets = _m2dino_batch()
    probe = AffinityProbe(tasks=TASK_IDS, every=2)
    assert [s for s in range(6) if probe.due(s)] == [0, 2, 4]
    result = probe.measure(0, model, (images, task_ids), trainer_task_losses(model.tasks, targets), lr=1e-3)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert result.tasks == sorted(TASK_IDS)
    assert np.isfinite(result.lookahead).all() and np.isfinite(result.cosine).all()
    np.testing.assert_allclose(np.diag(result.cosine), 1.0, rtol=1e-6)
    # first order: a small step on a task's own gradient lowers its own loss
    assert np.all(np.diag(result.lookahead) > 0)
    record = probe.accumulator.record(probe.how())
    assert record.measured["shared_parameters"] == sum(p.numel() for p in shared.values())


def test_accumulator_and_file_round_trip(tmp_path):
    acc = AffinityAccumulator(["a", "b", "c"])
    acc.add(0, StepAffinity(["a", "b"], np.array([[0.2, 0.1], [-0.1, 0.3]]), np.array([[1, 0.5], [0.5, 1]]),
                            np.array([1.0, 2.0])), lr=0.01)
    acc.add(5, StepAffinity(["a", "b", "c"], np.array([[0.4, 0.3, 0.0], [0.1, 0.1, 0.2], [0.0, 0.0, 0.1]]),
                            np.eye(3), np.array([1.0, 2.0, 3.0])), lr=0.02)
    with pytest.raises(ValueError, match="must increase"):
        acc.add(5, StepAffinity(["a"], np.zeros((1, 1)), np.ones((1, 1)), np.ones(1)), lr=0.01)
    record = acc.record({"every": 5})
    path = write_affinity(tmp_path / AFFINITY_FILE, record)
    back = read_affinity(path)
    assert back.tasks == ["a", "b", "c"] and back.steps == [0, 5] and back.lr == [0.01, 0.02]
    assert back.lookahead.mean[0, 1] == pytest.approx(0.2)
    assert back.lookahead.std[0, 1] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert back.lookahead.count[0, 2] == 1 and np.isnan(back.lookahead.std[0, 2])
    assert back.cosine.count[1, 0] == 2
    assert np.isnan(back.losses[0, 2])
    data = json.loads(path.read_text())
    assert set(data) == {"format", "tasks", "steps", "lr", "losses", "lookahead", "cosine", "measured"}
    assert data["lookahead"]["per_step"][0][2][2] is None  # c was not in step 0's batch
    assert back.resampled(np.array([1, 1])).lookahead.count[0, 1] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format=2), "format is 2"),
    (lambda d: d.update(tasks=["a", "a", "c"]), "distinct task ids"),
    (lambda d: d["lookahead"].update(mean=[[0.0]]), r"'lookahead.mean' must be numbers .* of shape \[3, 3\]"),
    (lambda d: d["cosine"]["per_step"].pop(), r"'cosine.per_step' .* shape \[2, 3, 3\]"),
    (lambda d: d.update(steps=[5, 0]), "'steps' must increase"),
    (lambda d: d["lookahead"]["per_step"][0][0].__setitem__(0, "x"), "'lookahead.per_step' must be numbers"),
])
def test_bad_affinity_files_name_the_file_and_the_field(tmp_path, edit, message):
    acc = AffinityAccumulator(["a", "b", "c"])
    for step in (0, 1):
        acc.add(step, StepAffinity(["a", "b", "c"], np.zeros((3, 3)), np.eye(3), np.ones(3)), lr=0.1)
    data = json.loads(json.dumps(acc.record().to_json(), default=lambda a: a.tolist()))
    edit(data)
    path = tmp_path / "affinity.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=message) as err:
        read_affinity(path)
    assert str(path) in str(err.value)
