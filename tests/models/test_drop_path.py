"""Stochastic depth in the DINOv3 blocks (dense and MoE): the official batch-subset semantics,
per sample, identity at eval, bit-identical and RNG-silent at rate 0, checkpointing-safe."""
import pytest
import torch
from test_moe_block import _randomised_tiny

from m2dino.models.backbone import drop_path_rates
from m2dino.models.m2dino import create_model
from m2dino.models.moe import upcycle_backbone

NUM_TASKS = 3


def _backbone(moe_layers=2):
    """dinov3_tiny with non-trivial LayerScale and biases (init 1e-5 would hide every block),
    MoE in its last `moe_layers` blocks with routers that spread the tokens."""
    torch.manual_seed(0)
    model = _randomised_tiny()
    upcycle_backbone(model, NUM_TASKS, num_experts=4, top_k=2, moe_layers=moe_layers, router_init_std=0.5)
    return model


def _inputs(batch=6, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, NUM_TASKS, (batch,), generator=g)


def _plain_block(block, x, rope, task_ids):
    """The block without stochastic depth, written out (the forward before the option existed)."""
    x = x + block.ls1(block.attn(block.norm1(x), rope))
    hidden = block.norm2(x)
    hidden = block.mlp(hidden, task_ids, False) if getattr(block.mlp, "task_conditioned", False) \
        else block.mlp(hidden)
    return x + block.ls2(hidden)


def _official_block(block, x, rope, task_ids, ratio):
    """The oracle: DINOv3's documented stochastic depth of a SelfAttentionBlock in training. Per
    residual branch, a random subset of the batch (the first max(int(B(1-p)), 1) entries of
    torch.randperm(B)) runs the branch, whose output is index-added to those rows scaled by
    B / subset; the attention subset is drawn first, the MLP subset after the attention update."""
    batch = x.shape[0]
    subset = max(int(batch * (1 - ratio)), 1)
    first = torch.randperm(batch)[:subset]
    branch = block.ls1(block.attn(block.norm1(x[first]), rope))
    x = x.index_add(0, first, branch, alpha=batch / subset)
    second = torch.randperm(batch)[:subset]
    hidden = block.norm2(x[second])
    hidden = (block.mlp(hidden, task_ids[second], False) if getattr(block.mlp, "task_conditioned", False)
              else block.mlp(hidden))
    return x.index_add(0, second, block.ls2(hidden), alpha=batch / subset)


def _official_backbone(backbone, images, task_ids, rates):
    tokens, (height, width) = backbone.prepare_tokens(images)
    rope = backbone.rope_embed(height, width)
    for block, rate in zip(backbone.blocks, rates):
        tokens = _official_block(block, tokens, rope, task_ids, rate) if rate > 0 else \
            _plain_block(block, tokens, rope, task_ids)
    return backbone.norm(tokens)


def test_drop_path_rates_by_schedule():
    assert drop_path_rates(0.2, 4) == [0.2] * 4
    assert drop_path_rates(0.3, 4, "linear") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.3, 1, "linear") == [0.3]
    assert drop_path_rates(0.0, 3, "linear") == [0.0] * 3
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        drop_path_rates(1.0, 4)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\)"):
        drop_path_rates(-0.1, 4)
    with pytest.raises(ValueError, match="drop_path_schedule must be one of"):
        drop_path_rates(0.1, 4, "cosine")
    backbone = _backbone()
    backbone.set_drop_path(0.3, "linear")
    assert [b.sample_drop_ratio for b in backbone.blocks] == pytest.approx(drop_path_rates(0.3, 6, "linear"))


@pytest.mark.parametrize("schedule", ["uniform", "linear"])
@pytest.mark.parametrize("batch", [6, 2])
def test_backbone_equals_official_formulation_at_the_same_seed(schedule, batch):
    backbone = _backbone().train()
    backbone.set_drop_path(0.4, schedule)
    images, task_ids = _inputs(batch)
    torch.manual_seed(7)
    got = backbone.forward_features(images, task_ids=task_ids)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = _official_backbone(backbone, images, task_ids, drop_path_rates(0.4, 6, schedule))
    torch.testing.assert_close(got["x_norm_patchtokens"], expected[:, 5:], rtol=0, atol=0)
    torch.testing.assert_close(got["x_norm_clstoken"], expected[:, 0], rtol=0, atol=0)
    # the rate matters: another seed gives other subsets
    torch.manual_seed(8)
    other = backbone.forward_features(images, task_ids=task_ids)["x_norm_clstoken"]
    assert not torch.equal(other, got["x_norm_clstoken"])


def test_each_sample_gets_its_whole_branch_or_none_of_it():
    """Per-sample stochastic depth: with the MLP branch silenced (ls2 = 0), every output row is
    either its input (dropped) or input + (B/subset) x its attention branch, and exactly
    max(int(B(1-p)), 1) rows got the branch."""
    backbone = _backbone(moe_layers=0)
    block = backbone.blocks[0].train()
    block.sample_drop_ratio = 0.5
    with torch.no_grad():
        block.ls2.gamma.zero_()
    tokens, (height, width) = backbone.prepare_tokens(_inputs(7)[0])
    rope = backbone.rope_embed(height, width)
    branch = block.ls1(block.attn(block.norm1(tokens), rope))
    for seed in range(5):
        torch.manual_seed(seed)
        out = block(tokens, rope)
        kept = 0
        for i in range(tokens.shape[0]):
            if torch.equal(out[i], tokens[i]):
                continue
            torch.testing.assert_close(out[i], tokens[i] + branch[i] * (7 / 3), rtol=1e-5, atol=1e-6)
            kept += 1
        assert kept == max(int(7 * 0.5), 1) == 3


def test_rate_zero_is_the_plain_forward_bit_for_bit_and_draws_no_random_number():
    images, task_ids = _inputs()
    plain = _backbone().train()
    switched_off = _backbone().train()
    switched_off.set_drop_path(0.3)
    switched_off.set_drop_path(0.0)
    tokens, (height, width) = plain.prepare_tokens(images)
    rope = plain.rope_embed(height, width)
    expected = tokens
    with torch.no_grad():
        for block in plain.blocks:
            expected = _plain_block(block, expected, rope, task_ids)
    for model in (plain, switched_off):
        state = torch.get_rng_state()
        got = model.forward_features(images, task_ids=task_ids)["x_prenorm"]
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(got, expected)


def test_eval_is_the_identity_whatever_the_rate():
    images, task_ids = _inputs()
    reference = _backbone().eval()
    dropping = _backbone().eval()
    dropping.set_drop_path(0.9)
    state = torch.get_rng_state()
    with torch.no_grad():
        got = dropping.forward_features(images, task_ids=task_ids)["x_prenorm"]
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        assert torch.equal(got, reference.forward_features(images, task_ids=task_ids)["x_prenorm"])


def test_model_argument_every_parameter_gets_a_gradient_and_checkpointing_recomputes_the_same_subsets():
    """M2DINO(drop_path_rate=...) sets the blocks; a subset is never empty, so every backbone
    parameter (experts and routers included) stays in the graph (DDP without unused
    parameters); gradient checkpointing recomputes each block with the subsets it drew."""
    tasks = ["breast_3cls", "IUGC", "thyroid_nodule_det"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("dinov3_tiny", tasks, num_experts=4, top_k=2, moe_layers=2, neck_channels=16,
                             drop_path_rate=0.5, drop_path_schedule="linear").train()
        assert [b.sample_drop_ratio for b in model.backbone.blocks] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
        model.backbone.set_grad_checkpointing(checkpointing)
        images, _ = _inputs(4)
        torch.manual_seed(3)
        out = model(images, torch.tensor([0, 1, 2, 0]))
        loss = sum(v.float().square().mean() for o in out["tasks"].values() for k, v in o.items()
                   if k != "indices" and torch.is_tensor(v) and v.is_floating_point())
        loss.backward()
        missing = [n for n, p in model.backbone.named_parameters() if p.grad is None and n != "mask_token"]
        assert not missing
        grads.append({n: p.grad.clone() for n, p in model.backbone.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
