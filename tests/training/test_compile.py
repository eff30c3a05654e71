"""Regional compilation (compile_blocks): the compiled model trains like the eager one (losses and
gradients within fp32 reordering tolerance over a few AdamW steps), keeps its state-dict names,
and rejects what has no blocks."""
import pytest
import torch

from m2dino.models.m2dino import create_model
from m2dino.training.compile import compile_blocks
from m2dino.training.losses import total_loss

SIZE = 16


def _model():
    torch.manual_seed(0)
    return create_model("dinov3_tiny", ["breast_3cls", "IUGC"], num_experts=4, top_k=2, moe_layers=2,
                        neck_channels=16, img_size=SIZE, backbone_overrides={"depth": 4}).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    tasks = torch.tensor([0, 1, 0, 1])
    targets = [{"label": torch.tensor(1)}, {"points": torch.rand(3, 2, generator=g)},
               {"label": torch.tensor(2)}, {"points": torch.rand(3, 2, generator=g)}]
    return torch.randn(4, 3, SIZE, SIZE, generator=g), tasks, targets


@pytest.mark.slow
def test_compiled_blocks_train_like_eager():
    """3 AdamW steps: each step's loss within rtol 1e-5 of eager's and every gradient within
    rtol 1e-3 / atol 1e-5 (inductor fuses and reorders fp32 arithmetic; AdamW's normalised
    steps keep the two runs together at this horizon)."""
    eager, compiled = _model(), _model()
    keys = list(compiled.state_dict())
    assert compile_blocks(compiled) == 4
    assert list(compiled.state_dict()) == keys  # checkpoints, EMA and DDP see the same names
    images, tasks, targets = _batch()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    for step in range(3):
        losses, grads = [], []
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = total_loss(model(images, tasks), targets, model.tasks)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6, msg=f"step {step}")
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5,
                                       msg=f"step {step}: {name}")


def test_compile_blocks_needs_blocks():
    with pytest.raises(TypeError, match="compile_blocks needs a model with backbone.blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
