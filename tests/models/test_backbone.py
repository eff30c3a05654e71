"""DINOv3 backbone: parity with timm's independent port, official semantics, API shapes."""
import math

import pytest
import timm
import torch

from m2dino.models import backbone as bb
from m2dino.models import weights
from m2dino_kernels.attention import apply_rope


def _randomise(module):
    """Non-trivial weights: LayerScale ~1 (init 1e-5 would hide every block) and biases."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "gamma" in name:
                param.uniform_(0.3, 1.0)
            elif name.endswith("bias") or name.endswith(("q_bias", "v_bias")):
                param.normal_(0.0, 0.1)
            elif "token" in name:
                param.normal_(0.0, 0.5)
    return module


def _timm_and_ours(timm_name, preset):
    reference = _randomise(timm.create_model(timm_name, pretrained=False)).eval()
    ours = weights.build_backbone(preset)
    ours.load_state_dict(weights.convert_timm_state_dict(reference.state_dict(), ours.config))
    return reference, ours.eval()


def _all_tokens(features):
    return torch.cat([features["x_norm_clstoken"][:, None], features["x_storage_tokens"],
                      features["x_norm_patchtokens"]], dim=1)


@pytest.mark.parametrize("timm_name, preset", [
    ("vit_small_patch16_dinov3_qkvb", "dinov3_vits16"),
    ("vit_small_plus_patch16_dinov3_qkvb", "dinov3_vits16plus"),
    ("vit_tiny_patch16_dinov3_qkvb", "dinov3_vitt16"),
])
def test_forward_features_match_timm(timm_name, preset):
    reference, ours = _timm_and_ours(timm_name, preset)
    # 70 x 90 px is not a multiple of 16: ours floor-crops to 64 x 80 (4 x 5 patches) as
    # upstream does; timm insists on multiples, so it gets the crop.
    images = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        expected = reference.forward_features(images[:, :, :64, :80])
        features = ours.forward_features(images)
    assert expected.shape == (2, 5 + 20, ours.embed_dim)
    torch.testing.assert_close(_all_tokens(features), expected, atol=1e-4, rtol=0)
    assert features["x_norm_patchtokens"].shape == (2, 20, ours.embed_dim)
    assert features["x_storage_tokens"].shape == (2, 4, ours.embed_dim)
    assert features["x_prenorm"].shape == (2, 25, ours.embed_dim)


def test_intermediate_layers_match_timm():
    reference, ours = _timm_and_ours("vit_tiny_patch16_dinov3_qkvb", "dinov3_vitt16")
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(images, indices=[2, 7, 11], norm=True,
                                                   output_fmt="NCHW", intermediates_only=True)
        ours_maps = ours.get_intermediate_layers(images, n=[2, 7, 11], reshape=True, norm=True)
        last_two = ours.get_intermediate_layers(images, n=2, return_class_token=True)
    for got, want in zip(ours_maps, expected):
        assert got.shape == (1, 192, 3, 4)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert len(last_two) == 2
    patches, cls = last_two[1]
    assert patches.shape == (1, 12, 192) and cls.shape == (1, 192)
    with torch.no_grad():
        full = ours.forward_features(images)
    torch.testing.assert_close(patches, full["x_norm_patchtokens"])
    torch.testing.assert_close(cls, full["x_norm_clstoken"])


def test_intermediate_layers_bad_index():
    model = weights.dinov3_tiny()
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(torch.randn(1, 3, 16, 16), n=[6])
    with pytest.raises(ValueError, match="n must be in"):
        model.get_intermediate_layers(torch.randn(1, 3, 16, 16), n=7)


def test_rope_periods_and_coordinates_by_hand():
    rope = bb.RopePositionEmbedding(head_dim=8, base=100.0)
    # periods = 100 ** (2 i / (hd / 2)), i < hd / 4
    torch.testing.assert_close(rope.periods, torch.tensor([1.0, 10.0]))
    sin, cos = rope(1, 2)  # one row, two columns: y = 0; x = -0.5, +0.5
    assert sin.shape == (2, 8)
    angle = 2 * math.pi * torch.tensor([0.0, 0.0, -0.5 / 1.0, -0.5 / 10.0])
    torch.testing.assert_close(sin[0], torch.cat([angle.sin(), angle.sin()]))
    torch.testing.assert_close(cos[0], torch.cat([angle.cos(), angle.cos()]))


def test_periods_buffer_is_used_as_loaded():
    model = _randomise(weights.dinov3_tiny()).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(images)["x_norm_patchtokens"]
        model.rope_embed.periods.mul_(1.5)
        after = model.forward_features(images)["x_norm_patchtokens"]
    assert not torch.allclose(before, after)


def test_qkv_bias_mask_zeroes_the_key_bias():
    attention = bb.SelfAttention(dim=8, num_heads=2)
    with torch.no_grad():
        attention.qkv.weight.zero_()
        attention.qkv.bias.fill_(1.0)
    out = attention.qkv(torch.zeros(1, 1, 8))[0, 0]
    torch.testing.assert_close(out, torch.tensor([1.0] * 8 + [0.0] * 8 + [1.0] * 8))


def test_prefix_tokens_are_not_rotated():
    torch.manual_seed(1)
    q = torch.randn(1, 1, 7, 8)
    sin, cos = bb.RopePositionEmbedding(8)(1, 2)
    rotated = apply_rope(q, sin, cos, num_prefix_tokens=5)
    torch.testing.assert_close(rotated[:, :, :5], q[:, :, :5])
    assert not torch.allclose(rotated[:, :, 5:], q[:, :, 5:])


def test_rope_rescale_option_train_only():
    model = _randomise(weights.dinov3_tiny(rope_rescale_coords=2.0))
    images = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first = model.forward_features(images)["x_norm_clstoken"]
        second = model.forward_features(images)["x_norm_clstoken"]
    torch.testing.assert_close(first, second)
    model.train()
    sin_a, _ = model.rope_embed(4, 4)
    sin_b, _ = model.rope_embed(4, 4)
    assert not torch.allclose(sin_a, sin_b)
    default = weights.dinov3_tiny().train()  # off by default: train mode is deterministic too
    torch.testing.assert_close(default.rope_embed(4, 4)[0], default.rope_embed(4, 4)[0])


def test_tiny_preset_shapes_and_variable_size():
    model = weights.dinov3_tiny().eval()
    assert (model.patch_size, model.embed_dim, len(model.blocks)) == (8, 96, 6)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 40, 27))  # -> 5 x 3 patches
    assert feats["x_norm_patchtokens"].shape == (2, 15, 96)
    maps = model.get_intermediate_layers(torch.randn(1, 3, 40, 27), n=1, reshape=True)
    assert maps[0].shape == (1, 96, 5, 3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.forward_features(torch.randn(3, 32, 32))


def test_gradient_checkpointing_same_gradients():
    model = weights.dinov3_tiny()
    _randomise(model)
    images = torch.randn(2, 3, 32, 32)
    loss = model.forward_features(images)["x_norm_clstoken"].square().sum()
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model.forward_features(images)["x_norm_clstoken"].square().sum().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5)


def test_swiglu_hidden_sizes_as_upstream():
    assert bb.PRESETS["dinov3_vits16plus"].mlp_hidden == 1536
    assert bb.PRESETS["dinov3_vith16plus"].mlp_hidden == 5120
    assert bb.PRESETS["dinov3_vitb16"].mlp_hidden == 3072


def test_periods_stay_fp32_when_the_model_is_cast():
    model = weights.dinov3_tiny()
    with torch.no_grad():
        model.rope_embed.periods.add_(1e-3)  # not representable in bf16
    periods = model.rope_embed.periods.clone()
    model.to(torch.bfloat16)
    assert model.rope_embed.periods.dtype == torch.float32
    assert torch.equal(model.rope_embed.periods, periods)
    assert model.cls_token.dtype == torch.bfloat16
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 16, 16, dtype=torch.bfloat16))
    assert feats["x_norm_clstoken"].dtype == torch.bfloat16
