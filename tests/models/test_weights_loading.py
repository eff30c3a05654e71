"""Backbone weight files: official keys round trip, timm conversion, strict errors, safety."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from m2dino.models import weights


def _random_tiny():
    model = weights.dinov3_tiny()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        model.rope_embed.periods.copy_(model.rope_embed.periods.bfloat16().float() * 1.01)
    return model.eval()


def _features(model, images):
    with torch.no_grad():
        return model.forward_features(images)["x_norm_patchtokens"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_keys_round_trip(tmp_path, suffix):
    source = _random_tiny()
    state = source.state_dict()
    # The official layout, key for key.
    for key in ("cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight",
                "rope_embed.periods", "blocks.0.attn.qkv.bias_mask", "blocks.5.ls2.gamma",
                "blocks.0.mlp.fc1.weight", "norm.bias"):
        assert key in state
    path = tmp_path / f"dinov3_tiny{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = weights.dinov3_tiny(weights=path).eval()
    # the periods buffer is taken from the file as is, not recomputed
    torch.testing.assert_close(loaded.rope_embed.periods, source.rope_embed.periods)
    images = torch.randn(1, 3, 32, 24)
    torch.testing.assert_close(_features(loaded, images), _features(source, images),
                               atol=0, rtol=0)


def test_training_checkpoint_container_is_unwrapped(tmp_path):
    source = _random_tiny()
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = weights.dinov3_tiny(weights=path)
    torch.testing.assert_close(loaded.cls_token, source.cls_token)


def test_timm_format_file_is_converted(tmp_path):
    # two blocks keep the file small; the key mapping is per block
    reference = timm.create_model("vit_small_plus_patch16_dinov3_qkvb", pretrained=False,
                                  depth=2).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "gamma" in name:
                param.uniform_(0.3, 1.0)
            elif "bias" in name:
                param.normal_(0.0, 0.1)
    path = tmp_path / "timm_splus.pth"
    torch.save(reference.state_dict(), path)
    ours = weights.dinov3_vits16plus(weights=path, depth=2).eval()
    assert torch.equal(ours.blocks[1].mlp.w1.weight, reference.blocks[1].mlp.fc1_g.weight)
    assert torch.equal(ours.blocks[1].mlp.w2.weight, reference.blocks[1].mlp.fc1_x.weight)
    assert torch.equal(ours.blocks[1].mlp.w3.weight, reference.blocks[1].mlp.fc2.weight)
    images = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = reference.forward_features(images)[:, 5:]
    torch.testing.assert_close(_features(ours, images), expected, atol=1e-4, rtol=0)


def test_wrong_preset_names_missing_unexpected_and_fitting_preset(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(_random_tiny().state_dict(), path)
    with pytest.raises(weights.WeightsError) as info:
        weights.dinov3_vits16(weights=path)
    message = str(info.value)
    assert str(path) in message
    assert "'dinov3_vits16'" in message
    assert "fits preset(s) ['dinov3_tiny']" in message
    assert "missing keys: blocks.10." in message  # blocks 6-11 are not in a 6-block file
    assert "in all)" in message
    assert "wrong shapes: blocks.0.attn.proj.bias: file [96] vs model [384]" in message


def test_extra_and_missing_keys_listed(tmp_path):
    state = _random_tiny().state_dict()
    state["head.weight"] = torch.zeros(3, 96)
    del state["norm.bias"]
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(weights.WeightsError, match=r"missing keys: norm\.bias\. unexpected keys: "
                                              r"head\.weight") as info:
        weights.dinov3_tiny(weights=path)
    assert "no preset fits" in str(info.value)


class _RunsCodeOnLoad:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = dict(_random_tiny().state_dict())
    state["payload"] = _RunsCodeOnLoad(marker)
    torch.save(state, path)
    assert not marker.exists()
    with pytest.raises(weights.WeightsError, match=r"refusing to load .*evil\.pth.*could run code"):
        weights.dinov3_tiny(weights=path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    state = _random_tiny().state_dict()
    path = tmp_path / f"cut{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightsError, match=r"cut\.(pth|safetensors).*(truncated|corrupt)"):
        weights.dinov3_tiny(weights=path)


def test_missing_file(tmp_path):
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.dinov3_tiny(weights=tmp_path / "nope.pth")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown backbone preset 'dinov3_vitx'"):
        weights.build_backbone("dinov3_vitx")


def test_timm_file_for_the_wrong_preset_names_the_right_one(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_dinov3_qkvb", pretrained=False)
    path = tmp_path / "timm_tiny.pth"
    torch.save(reference.state_dict(), path)
    with pytest.raises(weights.WeightsError, match=r"fits preset\(s\) \['dinov3_vitt16'\]"):
        weights.dinov3_vits16(weights=path)
