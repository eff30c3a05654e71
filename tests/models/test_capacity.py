"""parameter_counts: the total and what one token passes through (top_k / E of the experts, its
task's router, the neck for a spatial task, its own head), from a model or from its checkpoint
config without building real weights."""
import pytest

from m2dino.models import M2DINOConfig, create_model
from m2dino.models.capacity import parameter_counts


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_a_dense_single_task_model_is_active_whole():
    model = create_model("dinov3_tiny", ["lung"], moe_layers=0)
    assert parameter_counts(model) == {"total": count(model), "active_per_token": count(model)}


def test_moe_experts_count_as_top_k_of_e_and_each_token_takes_its_own_task_path():
    model = create_model("dinov3_tiny", ["lung", "breast_2cls"], moe_layers=2, num_experts=4, top_k=1)
    layers = [block.mlp for block in model.backbone.blocks[-2:]]
    experts = sum(m.fc1_weight.numel() + m.fc1_bias.numel() + m.fc2_weight.numel() + m.fc2_bias.numel()
                  for m in layers)
    routers = sum(m.gate_weight.numel() + m.gate_bias.numel() for m in layers)
    unused_experts = experts * 3 // 4
    segmentation = count(model) - unused_experts - routers // 2 - count(model.heads["breast_2cls"])
    classification = (count(model) - unused_experts - routers // 2 - count(model.heads["lung"])
                      - count(model.neck))  # a classification token never reaches the neck
    counts = parameter_counts(model)
    assert counts["total"] == count(model)
    assert counts["active_per_token"] == max(segmentation, classification)


def test_counted_from_the_checkpoint_config_or_a_config_and_tasks():
    model = create_model("dinov3_tiny", ["lung", "fetal_femur"], moe_layers=3, num_experts=4, top_k=2)
    expected = parameter_counts(model)
    assert parameter_counts(model.checkpoint_config()) == expected   # best.json's content
    config = M2DINOConfig(moe_layers=3, num_experts=4, top_k=2)
    assert parameter_counts(config, ["lung", "fetal_femur"]) == expected
    with pytest.raises(ValueError, match="needs the model's tasks"):
        parameter_counts(config)
    with pytest.raises(TypeError, match="expected an M2DINO"):
        parameter_counts("dinov3_tiny")
