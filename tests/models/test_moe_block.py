"""TaskMoE: upcycling identity, routing by each image's task, usage counts, gradients."""
import pytest
import torch
import torch.nn.functional as F

from m2dino.models import weights
from m2dino.models.moe import TaskMoE, moe_modules, upcycle_backbone


def _randomised_tiny(**overrides):
    model = weights.build_backbone("dinov3_tiny", **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gamma" in name:
                param.uniform_(0.3, 1.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"ffn": "swiglu", "mlp_ratio": 6.0}])
@pytest.mark.parametrize("router_init_std", [0.0, 0.5])
def test_upcycled_backbone_equals_dense(overrides, router_init_std):
    dense = _randomised_tiny(**overrides)
    images = torch.randn(3, 3, 32, 24)
    with torch.no_grad():
        expected = dense.forward_features(images)
    indices = upcycle_backbone(dense, num_tasks=4, num_experts=4, top_k=2, moe_layers=3,
                               router_init_std=router_init_std)
    assert indices == [3, 4, 5]
    assert set(moe_modules(dense)) == {3, 4, 5}
    for task_ids in (torch.tensor([0, 1, 3]), torch.tensor([2, 2, 2])):
        with torch.no_grad():
            got = dense.forward_features(images, task_ids=task_ids)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=1e-5)


def test_moe_block_needs_task_ids():
    model = _randomised_tiny()
    upcycle_backbone(model, num_tasks=2, num_experts=2, top_k=1, moe_layers=1)
    with pytest.raises(ValueError, match="pass task_ids"):
        model.forward_features(torch.randn(1, 3, 16, 16))


def _naive_task_moe(moe, x, task_ids):
    """Token by token: the task's router, top-k, renormalised weights, experts."""
    batch, tokens, dim = x.shape
    out = torch.zeros_like(x)
    for b in range(batch):
        task = int(task_ids[b])
        for n in range(tokens):
            logits = moe.gate_weight[task] @ x[b, n] + moe.gate_bias[task]
            probs = logits.softmax(-1)
            top, experts = probs.topk(moe.top_k)
            for weight, e in zip(top / top.sum(), experts):
                hidden = F.gelu(moe.fc1_weight[e] @ x[b, n] + moe.fc1_bias[e])
                out[b, n] += weight * (moe.fc2_weight[e] @ hidden + moe.fc2_bias[e])
    return out


def test_task_moe_matches_naive_routing_by_image_task():
    moe = TaskMoE(dim=8, hidden=16, num_tasks=3, num_experts=4, top_k=2, router_init_std=1.0)
    with torch.no_grad():
        moe.gate_bias.normal_()
        moe.fc1_bias.normal_(0, 0.1)
    x = torch.randn(2, 5, 8)
    task_ids = torch.tensor([2, 0])
    with torch.no_grad():
        got = moe(x, task_ids)
        expected = _naive_task_moe(moe, x, task_ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the other task's router gives another result: routing really follows the task
    with torch.no_grad():
        swapped = moe(x, torch.tensor([0, 2]))
    assert not torch.allclose(swapped, got)


def test_task_moe_runs_in_the_autocast_dtype():
    """LayerNorm hands the MoE fp32 under autocast; the experts must still run in bf16 (the
    dtype the dense MLP's nn.Linear would run in), with fp32-close results."""
    moe = TaskMoE(dim=16, hidden=32, num_tasks=2, num_experts=4, top_k=2, router_init_std=0.5)
    x = torch.randn(2, 6, 16)
    task_ids = torch.tensor([1, 0])
    with torch.no_grad():
        full = moe(x, task_ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = moe(x, task_ids)
    assert full.dtype == torch.float32 and mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), full, atol=5e-2, rtol=5e-2)


def test_usage_counts_by_hand_and_aux_losses():
    moe = TaskMoE(dim=4, hidden=8, num_tasks=3, num_experts=3, top_k=1, router_init_std=0.0)
    with torch.no_grad():
        moe.gate_bias.copy_(torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0]]))
    x = torch.randn(3, 4, 4)
    moe(x, torch.tensor([0, 1, 1]))
    expected = torch.tensor([[4, 0, 0], [0, 0, 8], [0, 0, 0]])
    assert torch.equal(moe.last_counts, expected)
    aux = moe.last_aux
    # each present task puts all its tokens on one expert: per-task balance loss = E * 1 * p
    p_top = torch.softmax(torch.tensor([5.0, 0, 0]), 0)[0]
    torch.testing.assert_close(aux.load_balance, 3 * p_top)
    assert torch.isfinite(aux.z_loss) and torch.isfinite(aux.mutual_information)


def test_global_balance_sees_the_experts_use_over_all_tasks():
    """Two tasks, each on its own expert: per-task balance is at its worst (E x p), the global
    one is balanced over the tasks' union (f = 1/2 each); the gradient reaches the routers."""
    moe = TaskMoE(dim=4, hidden=8, num_tasks=2, num_experts=2, top_k=1, router_init_std=0.0)
    with torch.no_grad():
        moe.gate_bias.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0]]))
    moe(torch.randn(2, 3, 4), torch.tensor([0, 1]))
    p_top = torch.softmax(torch.tensor([5.0, 0.0]), 0)[0]
    torch.testing.assert_close(moe.last_aux.load_balance, 2 * p_top)
    # f = [1/2, 1/2], P = [1/2, 1/2] (the two tasks' probabilities mirror each other)
    torch.testing.assert_close(moe.last_aux.global_load_balance, torch.tensor(1.0))
    moe(torch.randn(2, 3, 4), torch.tensor([0, 0]))  # one task: global = per-task
    torch.testing.assert_close(moe.last_aux.global_load_balance, moe.last_aux.load_balance)
    moe.last_aux.global_load_balance.backward()
    assert moe.gate_bias.grad[0].abs().sum() > 0


def test_every_moe_parameter_gets_a_gradient_even_unused_experts():
    moe = TaskMoE(dim=4, hidden=8, num_tasks=2, num_experts=4, top_k=1, router_init_std=0.0)
    with torch.no_grad():
        moe.gate_bias.copy_(torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0]]))
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = moe(x, torch.tensor([0, 0]))  # only task 0, only expert 0
    (out.square().sum() + moe.last_aux.load_balance).backward()
    for name, param in moe.named_parameters():
        assert param.grad is not None, name
    assert moe.fc1_weight.grad[0].abs().sum() > 0
    assert torch.count_nonzero(moe.fc1_weight.grad[1:]) == 0  # no token: zero, not None
    assert torch.count_nonzero(moe.gate_weight.grad[1]) == 0  # absent task
    assert x.grad is not None


def test_bad_inputs():
    moe = TaskMoE(dim=4, hidden=8, num_tasks=2, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match=r"task_ids must have shape \[B\] = \[2\]"):
        moe(torch.randn(2, 3, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        moe(torch.randn(2, 3, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="top_k"):
        TaskMoE(dim=4, hidden=8, num_tasks=2, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="moe_layers"):
        upcycle_backbone(weights.dinov3_tiny(), num_tasks=2, moe_layers=7)
