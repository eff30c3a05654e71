"""DINOv3 ViT with the official state-dict keys and semantics, presets, and safe weight loading.

Read top to bottom: presets, RoPE, attention, MLPs, block, the ViT. Reading checkpoint files
and the preset builders (`build_backbone`, `dinov3_vitb16(weights=...)`) are in
m2dino.models.weights.

Faithful to facebookresearch/dinov3 (checked against timm's independent port in the tests):
tokens are `[cls, 4 storage, H*W patches]`; LayerNorm eps 1e-5; LayerScale `ls1`/`ls2`; the
qkv bias is multiplied by the saved `bias_mask` buffer (ones for q and v, zeros for k); axial
rotate-half RoPE with the `rope_embed.periods` buffer taken from the checkpoint as is (the
released values are bf16-rounded, so they are never recomputed), applied to patch tokens only;
GELU MLP (`fc1`, `fc2`) or SwiGLU (`w1`, `w2`, `w3`). Inputs of any size work; sizes that are
not a multiple of the patch are floor-cropped by the stride-`patch` convolution, as upstream.

RoPE coordinate rescale: the official pretraining multiplies the patch coordinates, in train()
mode only, by a random log-uniform factor in [1/R, R] (R = 2). Here it is an option,
`rope_rescale_coords`, OFF by default: fine-tuning on fixed-size ultrasound images wants the
same geometry in training and evaluation, and the augmentation was there to make the
pretrained features scale-robust, which they already are. eval() is always deterministic.

Stochastic depth (`drop_path_rate`, off by default), as the official blocks do it: in train()
mode each residual branch (attention, then MLP) runs on a random subset of the batch's samples,
`max(int(B * (1 - p)), 1)` of them drawn by `torch.randperm(B)`, and is added back to those rows
only, scaled by B / subset (the dropped samples keep their input: per-sample stochastic depth
that also skips the dropped samples' compute). The official backbone gives every block the same
rate ("uniform"); "linear" ramps it from 0 at the first block to the rate at the last (DINOv2's
and timm's fine-tuning rule). eval() is the identity; a rate of 0 runs the plain forward and
draws no random number.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from m2dino.models.configs import PRESETS, DinoV3Config, M2DINOConfig  # noqa: F401 (re-exported)
from m2dino.models.moe import validate_task_ids
from m2dino_kernels import attention as rope_attention  # RoPE applied (or fused) inside

NUM_STORAGE_TOKENS = 4
NUM_PREFIX_TOKENS = 1 + NUM_STORAGE_TOKENS


# ---------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------
class RopePositionEmbedding(nn.Module):
    """Axial RoPE over patch-centre coordinates in [-1, 1]; returns (sin, cos), [H*W, hd] fp32."""

    def __init__(self, head_dim: int, base: float = 100.0, rescale_coords: Optional[float] = None):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.rescale_coords = rescale_coords
        quarter = head_dim // 4
        periods = base ** (2 * torch.arange(quarter, dtype=torch.float32) / (head_dim // 2))
        self.register_buffer("periods", periods, persistent=True)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() must not round the periods: keep them fp32 (as loaded)
        periods = self.periods
        super()._apply(fn, recurse)
        if self.periods.dtype != torch.float32:
            self.periods = periods.to(device=self.periods.device, dtype=torch.float32)
        return self

    def forward(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        device = self.periods.device
        coords_h = torch.arange(0.5, height, device=device, dtype=torch.float32) / height
        coords_w = torch.arange(0.5, width, device=device, dtype=torch.float32) / width
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)
        coords = 2.0 * coords.flatten(0, 1) - 1.0                                # [HW, 2]
        if self.training and self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            factor = torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
            coords = coords * factor
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.flatten(1).tile(2)                                       # [HW, hd]
        return angles.sin(), angles.cos()


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
class LinearKMaskedBias(nn.Linear):
    """qkv projection whose effective bias is `bias * bias_mask` (the k part masked to 0)."""

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim, bias=True)
        self.register_buffer("bias_mask", torch.cat(
            [torch.ones(dim), torch.zeros(dim), torch.ones(dim)]), persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LinearKMaskedBias(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                   # [B, heads, N, hd]
        out = rope_attention(q, k, v, rope=rope, num_prefix_tokens=NUM_PREFIX_TOKENS)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    activation = "gelu"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    activation = "swiglu"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    `mlp` may be replaced by a task-conditioned MoE (m2dino.models.moe.TaskMoE); such a module says
    so with `task_conditioned = True` and receives the per-image task ids.
    """

    def __init__(self, config: DinoV3Config, drop_path: float = 0.0):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = SelfAttention(dim, config.num_heads)
        self.ls1 = LayerScale(dim, config.layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        ffn = SwiGLUFFN if config.ffn == "swiglu" else Mlp
        self.mlp = ffn(dim, config.mlp_hidden)
        self.ls2 = LayerScale(dim, config.layerscale_init)
        self.sample_drop_ratio = drop_path  # the official name: stochastic depth's rate

    def _mlp(self, hidden: Tensor, task_ids: Optional[Tensor], check_task_ids: bool) -> Tensor:
        if getattr(self.mlp, "task_conditioned", False):
            if task_ids is None:
                raise ValueError("this block's MLP is a task-conditioned MoE: pass task_ids "
                                 "(LongTensor[B], one task index per image)")
            return self.mlp(hidden, task_ids, check_task_ids)
        return self.mlp(hidden)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor],
                task_ids: Optional[Tensor] = None, check_task_ids: bool = True) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.0:
            return self._forward_drop_path(x, rope, task_ids, check_task_ids)
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self._mlp(self.norm2(x), task_ids, check_task_ids))

    def _forward_drop_path(self, x: Tensor, rope: tuple[Tensor, Tensor], task_ids: Optional[Tensor],
                           check_task_ids: bool) -> Tensor:
        """Each branch on a random subset of the samples, added back to them scaled by B / subset
        (see the module doc). The RoPE tables have no batch dimension: every subset shares them."""
        batch = x.shape[0]
        kept = max(int(batch * (1 - self.sample_drop_ratio)), 1)
        scale = batch / kept
        rows = torch.randperm(batch, device=x.device)[:kept]
        x = torch.index_add(x, 0, rows, self.ls1(self.attn(self.norm1(x[rows]), rope)), alpha=scale)
        rows = torch.randperm(batch, device=x.device)[:kept]
        subset_tasks = None if task_ids is None else task_ids[rows.to(task_ids.device)]
        hidden = self._mlp(self.norm2(x[rows]), subset_tasks, check_task_ids)
        return torch.index_add(x, 0, rows, self.ls2(hidden), alpha=scale)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)  # [B, D, H/p, W/p]; the stride floor-crops any remainder


# ---------------------------------------------------------------------------------------
# The ViT
# ---------------------------------------------------------------------------------------
DROP_PATH_SCHEDULES = ("uniform", "linear")


def drop_path_rates(rate: float, depth: int, schedule: str = "uniform") -> list[float]:
    """Stochastic depth's rate of each of `depth` blocks: "uniform" (the official DINOv3 rule,
    every block at `rate`) or "linear" (0 at the first block up to `rate` at the last)."""
    if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate!r}")
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"drop_path_schedule must be one of {DROP_PATH_SCHEDULES}, got {schedule!r}")
    if schedule == "uniform" or depth == 1:
        return [float(rate)] * depth
    return [float(rate) * i / (depth - 1) for i in range(depth)]


class DinoV3ViT(nn.Module):
    def __init__(self, config: DinoV3Config, rope_rescale_coords: Optional[float] = None,
                 drop_path_rate: float = 0.0, drop_path_schedule: str = "uniform"):
        super().__init__()
        if config.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"config.ffn must be 'mlp' or 'swiglu', got {config.ffn!r}")
        if config.embed_dim % config.num_heads:
            raise ValueError(f"embed_dim {config.embed_dim} is not divisible by num_heads "
                             f"{config.num_heads}")
        self.config = config
        self.embed_dim = dim = config.embed_dim
        self.patch_size = config.patch_size
        self.num_prefix_tokens = NUM_PREFIX_TOKENS
        self.n_storage_tokens = NUM_STORAGE_TOKENS
        self.grad_checkpointing = False

        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, NUM_STORAGE_TOKENS, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.rope_embed = RopePositionEmbedding(config.head_dim, config.rope_base,
                                                rope_rescale_coords)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.set_drop_path(drop_path_rate, drop_path_schedule)
        self._init_weights()

    def set_drop_path(self, rate: float, schedule: str = "uniform") -> None:
        """Stochastic depth at `rate` over the blocks by `schedule` (drop_path_rates); 0 turns
        it off. A training setting, not part of the weights: set it on a loaded model too."""
        for block, block_rate in zip(self.blocks, drop_path_rates(rate, len(self.blocks), schedule)):
            block.sample_drop_ratio = block_rate

    def _init_weights(self):
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block in the backward pass (less memory, ~30% more compute)."""
        self.grad_checkpointing = enable

    def prepare_tokens(self, x: Tensor, masks: Optional[Tensor] = None):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(x.shape)}")
        if x.shape[2] < self.patch_size or x.shape[3] < self.patch_size:
            raise ValueError(f"images of {x.shape[2]}x{x.shape[3]} px are smaller than one "
                             f"{self.patch_size} px patch")
        patches = self.patch_embed(x)
        height, width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)                          # [B, HW, D]
        if masks is not None:
            patches = torch.where(masks[..., None], self.mask_token.to(patches.dtype), patches)
            cls_token = self.cls_token
        else:
            # As upstream: keeps mask_token in the graph (DDP without unused parameters).
            cls_token = self.cls_token + 0 * self.mask_token
        batch = patches.shape[0]
        tokens = torch.cat([cls_token.expand(batch, -1, -1),
                            self.storage_tokens.expand(batch, -1, -1), patches], dim=1)
        return tokens, (height, width)

    def _run_block(self, block: Block, x: Tensor, rope, task_ids):
        # task_ids were checked once at the entry (_blocks_forward): the blocks skip the check
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, rope, task_ids, False, use_reentrant=False)
        return block(x, rope, task_ids, False)

    def _blocks_forward(self, x: Tensor, task_ids: Optional[Tensor], masks: Optional[Tensor] = None,
                        keep=(), check_task_ids: bool = True):
        tokens, (height, width) = self.prepare_tokens(x, masks)
        if check_task_ids and task_ids is not None:
            num_tasks = next((b.mlp.num_tasks for b in self.blocks
                              if getattr(b.mlp, "task_conditioned", False)), None)
            if num_tasks is not None:
                validate_task_ids(task_ids, x.shape[0], num_tasks)
        rope = self.rope_embed(height, width)
        kept = []
        for index, block in enumerate(self.blocks):
            tokens = self._run_block(block, tokens, rope, task_ids)
            if index in keep:
                kept.append(tokens)
        return tokens, kept, (height, width)

    def forward_features(self, x: Tensor, masks: Optional[Tensor] = None,
                         task_ids: Optional[Tensor] = None, check_task_ids: bool = True) -> dict:
        """Official output dict. task_ids [B] are needed only once MoE blocks are installed;
        check_task_ids=False when the caller has range-checked them (M2DINO does)."""
        tokens, _, _ = self._blocks_forward(x, task_ids, masks, check_task_ids=check_task_ids)
        normed = self.norm(tokens)
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_storage_tokens": normed[:, 1:NUM_PREFIX_TOKENS],
            "x_norm_patchtokens": normed[:, NUM_PREFIX_TOKENS:],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def get_intermediate_layers(self, x: Tensor, n=1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True,
                                return_extra_tokens: bool = False,
                                task_ids: Optional[Tensor] = None, check_task_ids: bool = True):
        """Outputs of blocks: int n = the last n, a list = those indices. Prefix tokens are
        stripped; reshape=True gives [B, D, H/p, W/p]. Returns a tuple per block of the patch
        tokens, plus the class token and/or the storage tokens when asked (upstream order)."""
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n must be in [1, depth={depth}], got {n}")
            take = list(range(depth - n, depth))
        else:
            take = [int(i) for i in n]
            bad = [i for i in take if not 0 <= i < depth]
            if bad:
                raise ValueError(f"block indices {bad} out of range [0, {depth})")
        _, kept, (height, width) = self._blocks_forward(x, task_ids, keep=set(take),
                                                        check_task_ids=check_task_ids)
        by_index = dict(zip(sorted(set(take)), kept))
        outputs = [by_index[i] for i in take]
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:NUM_PREFIX_TOKENS] for out in outputs]
        outputs = [out[:, NUM_PREFIX_TOKENS:] for out in outputs]
        if reshape:
            batch = x.shape[0]
            outputs = [out.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
                       for out in outputs]
        if return_class_token and return_extra_tokens:
            return tuple(zip(outputs, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        if return_extra_tokens:
            return tuple(zip(outputs, extra_tokens))
        return tuple(outputs)

    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        return self.forward_features(x, task_ids=task_ids)["x_norm_clstoken"]
