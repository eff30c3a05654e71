"""load_model trusts nothing in a checkpoint before checking it: every field of <stem>.json has
its shape checked, and its sizes are held to the tensor shapes in the weights file's own
safetensors header before any model is built (a config claiming embed_dim 12000000 allocates
nothing). The optional `pretrained` provenance record is accepted, checked, never required."""
import json

import pytest
import torch

import m2dino.models.m2dino as M
from m2dino.models.m2dino import check_pretrained_record, create_model, load_model, save_model
from m2dino.models.weights import WeightsError

SHA = "ab" * 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = create_model("dinov3_tiny", ["fetal_head", "breast_2cls"], num_experts=2, top_k=1, moe_layers=1,
                         img_size=32)
    stem = tmp_path_factory.mktemp("ckpt") / "best"
    save_model(model, stem)
    return stem, json.loads(stem.with_suffix(".json").read_text())


def with_config(saved, tmp_path, change):
    stem, config = saved
    target = tmp_path / "best"
    target.with_suffix(".safetensors").write_bytes(stem.with_suffix(".safetensors").read_bytes())
    data = json.loads(json.dumps(config))
    change(data)
    target.with_suffix(".json").write_text(json.dumps(data))
    return target


@pytest.fixture
def no_real_model(monkeypatch):
    """Fails the test if a model is built anywhere but on the meta device."""
    built = []
    real = M.build_backbone

    def spy(*args, **kwargs):
        built.append(torch.get_default_device().type)
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "build_backbone", spy)
    yield built
    assert all(device == "meta" for device in built), built


@pytest.mark.parametrize("field, value, words", [
    ("embed_dim", 12_000_000, "wrong shapes"),
    ("depth", 10 ** 9, "the weights hold 6 blocks"),
    ("num_heads", 4, "wrong shapes"),
])
def test_sizes_are_held_to_the_weights_before_anything_is_allocated(saved, tmp_path, no_real_model, field, value,
                                                                    words):
    stem = with_config(saved, tmp_path, lambda c: c["backbone_overrides"].update({field: value}))
    with pytest.raises(WeightsError, match=words) as info:
        load_model(stem)
    assert "best.safetensors do not match its config" in str(info.value)


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(num_experts=1000), "wrong shapes"),
    (lambda c: c.update(neck_channels=2 ** 20), "wrong shapes"),
    (lambda c: c["tasks"].append({**c["tasks"][0], "task_id": "lung"}), "are not the weights' heads"),
    (lambda c: c["tasks"][0].update(num_classes=10 ** 6), "wrong shapes"),
])
def test_every_size_is_bounded_by_the_weights(saved, tmp_path, no_real_model, change, words):
    with pytest.raises(WeightsError, match=words):
        load_model(with_config(saved, tmp_path, change))


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(tasks="fetal_head"), "tasks must be a non-empty list"),
    (lambda c: c.update(tasks=[]), "tasks must be a non-empty list"),
    (lambda c: c["tasks"].__setitem__(0, ["fetal_head"]), "task 0 must be an object"),
    (lambda c: c["tasks"][0].update(task_id=5), "task 0: task_id must be a str"),
    (lambda c: c["tasks"][0].update(num_classes="3"), "task 0: num_classes must be a int"),
    (lambda c: c["tasks"][0].update(num_classes=True), "task 0: num_classes must be a int"),
    (lambda c: c["tasks"][0].update(hflip="yes"), "task 0: hflip must be a bool"),
    (lambda c: c["tasks"][0].update(task_type="segmentaton"), "task 0:.*task_type"),
    (lambda c: c.update(name=["dinov3_tiny"]), "name must be one of the presets"),
    (lambda c: c.update(name="dinov3_huge"), "name must be one of the presets"),
    (lambda c: c.update(num_experts=2.5), "num_experts must be an integer"),
    (lambda c: c.update(top_k=None), "top_k must be an integer"),
    (lambda c: c.update(router_init_std=float("nan")), "router_init_std must be a finite number"),
    (lambda c: c.update(neck_layers="0,1,2,3"), "neck_layers must be a list"),
    (lambda c: c.update(backbone_overrides=[4]), "backbone_overrides must be a mapping"),
    (lambda c: c.update(backbone_overrides={"depth": "6"}), "backbone_overrides: depth must be a int"),
    (lambda c: c.update(backbone_overrides={"name": "x"}), "'name' is not a DinoV3Config field"),
    (lambda c: c.update(format_version=True), "format_version True"),
    (lambda c: c.pop("name"), "has no 'name'"),
    (lambda c: c.update(top_k=5), "top_k"),
    (lambda c: c.update(pretrained={"file": "W.pth"}), "pretrained must hold exactly file, sha256 and preset"),
    (lambda c: c.update(pretrained={"file": "W.pth", "sha256": "xyz", "preset": "dinov3_vitb16"}),
     "its sha256 must be 64 hexadecimal digits"),
    (lambda c: c.update(pretrained=None), 'pretrained must be "none" or a mapping'),
])
def test_every_field_has_its_shape_checked(saved, tmp_path, no_real_model, change, words):
    with pytest.raises(WeightsError, match=words) as info:
        load_model(with_config(saved, tmp_path, change))
    assert "best.json" in str(info.value)


@pytest.mark.parametrize("pretrained", ["none",
                                        {"file": "dinov3_vits16.pth", "sha256": SHA, "preset": "dinov3_vits16"}])
def test_the_pretrained_record_is_accepted_and_never_required(saved, tmp_path, pretrained):
    model = load_model(with_config(saved, tmp_path, lambda c: c.update(pretrained=pretrained)))
    assert [t.task_id for t in model.tasks] == ["fetal_head", "breast_2cls"]
    (tmp_path / "older").mkdir()
    older = with_config(saved, tmp_path / "older", lambda c: c.pop("pretrained"))  # checkpoints before the record
    assert load_model(older).config == model.config
    assert check_pretrained_record(pretrained) is None and check_pretrained_record("None") is not None


@pytest.mark.parametrize("content, words", [
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"\xff\xd8\xff\xe0 a jpeg", "not UTF-8 text"),
    (b"{" * 10 ** 5, "not valid JSON"),
    (b'{"a": ' * 100 + b"1" + b"}" * 100, "nested more than 64 levels"),
    (b" " * (M.CONFIG_MAX_BYTES + 1), "larger than"),
])
def test_a_config_that_is_no_json_object_is_named(saved, tmp_path, content, words):
    stem, _ = saved
    (tmp_path / "best.safetensors").write_bytes(stem.with_suffix(".safetensors").read_bytes())
    (tmp_path / "best.json").write_bytes(content)
    with pytest.raises(WeightsError, match=words) as info:
        load_model(tmp_path / "best")
    assert "best.json" in str(info.value)


def test_weights_of_the_wrong_kind_are_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    stem, config = saved
    state = load_file(str(stem.with_suffix(".safetensors")))
    state["backbone.cls_token"] = state["backbone.cls_token"].to(torch.int64)
    save_file(state, str(tmp_path / "best.safetensors"), metadata={"format": "m2dino"})
    (tmp_path / "best.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"wrong dtypes \['backbone.cls_token: I64'\]"):
        load_model(tmp_path / "best")
