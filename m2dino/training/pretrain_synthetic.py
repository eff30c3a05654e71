"""Pretrain the `dinov3_tiny` backbone self-supervised on the unlabeled synthetic pool: the start
every paradigm of the default run fine-tunes, as the M2DINO paper fine-tunes DINOv3.

    python -m m2dino.training.pretrain_synthetic --out FILE [--images 8192] [--epochs 12] [--seed 0]

The pool (m2dino.data.synthetic.pool) holds images of every scene family through every group's
scanner and none of the suite's images. The objective is masked-image modelling (SimMIM: Xie et
al., 2022): half of the 8x8 patch grid is hidden in 2x2-patch blocks, the hidden patches enter
the ViT as DINOv3's own `mask_token`, and a linear layer on the final normalised tokens predicts
each hidden patch's pixels with an L1 loss. The pixels are averaged over 2x2 (at 64 px the speckle
grain is about a pixel: noise no model can predict, while the structure under it can be) and
standardised per image. Why this rather than a
DINO-style self-distillation: one network and one view per image (a teacher and multi-crop
would cost several times the CPU time this pretraining can have); no collapse to watch for at
a small batch; it trains the checkpoint's `mask_token` as DINOv3's masked-token branch does;
and its features are known to fine-tune well on dense tasks, which are 18 of the 27. Views are
random resized crops (scale 0.5-1) with horizontal flips and brightness/contrast/gamma jitter.

The file written is the backbone's state dict under the official DINOv3 keys (parameters in
fp16, buffers as kept: a model loading it casts), so it loads through `--pretrained` like
Meta's weights. Its safetensors metadata and a JSON beside it (`<stem>.json`) hold the
provenance: the command, commit, recipe, seed, threads, per-epoch loss and wall time. The
shipped start is m2dino.data.synthetic.PRETRAINED_WEIGHTS, made by this command's defaults.
The run is deterministic for a recipe and a thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PRESET = "dinov3_tiny"
FORMAT = "m2dino-synthetic-pretraining/1"
TARGET_POOL = 2  # the pixel targets are averaged over 2x2 pixels


@dataclass(frozen=True)
class Recipe:
    """Everything the pretrained weights are a function of (with the generator version and threads)."""

    images: int = 8192           # pool images 0..images-1
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1.5e-3           # AdamW peak, cosine to 1% after a linear warmup
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    mask_ratio: float = 0.5      # share of the 2x2-patch blocks hidden
    mask_block: int = 2          # mask unit, in patches
    crop_scale: float = 0.5      # random resized crops keep this much of the image area at least
    img_size: int = 64
    seed: int = 0                # the pool's seed and the training's

    def problems(self) -> list[str]:
        out = [f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
               for name in ("images", "epochs", "batch_size", "mask_block", "img_size") if getattr(self, name) < 1]
        if not 0 < self.mask_ratio < 1:
            out.append(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 < self.crop_scale <= 1:
            out.append(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"--lr must be a positive number, got {self.lr}")
        return out


# ============================================================================ the objective


def _torch():
    import torch

    return torch


def views(images, generator, recipe: Recipe):
    """uint8 [B, S, S] pool images -> normalised 3-channel views [B, 3, S, S] (crops, flips, jitter)."""
    torch = _torch()
    import torch.nn.functional as F

    from m2dino.data.transforms import IMAGE_MEAN, IMAGE_STD

    x = images.float().div_(255).unsqueeze(1)
    b = x.shape[0]
    u = torch.rand(b, 6, generator=generator)
    area = recipe.crop_scale + (1 - recipe.crop_scale) * u[:, 0]
    log_ratio = (u[:, 1] * 2 - 1) * math.log(4 / 3)
    sx = torch.sqrt(area * log_ratio.exp()).clamp(max=1)
    sy = torch.sqrt(area / log_ratio.exp()).clamp(max=1)
    tx, ty = (u[:, 2] * 2 - 1) * (1 - sx), (u[:, 3] * 2 - 1) * (1 - sy)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    jitter = torch.rand(b, 3, generator=generator)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * (0.8 + 0.4 * jitter[:, 0]).view(b, 1, 1, 1) + mean + (jitter[:, 1] - 0.5).view(b, 1, 1, 1) * 0.2)
    x = x.clamp(0, 1).pow((0.75 + 0.6 * jitter[:, 2]).view(b, 1, 1, 1))
    mean_t = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std_t = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean_t) / std_t, x


def block_masks(batch: int, grid: int, recipe: Recipe, generator):
    """bool [B, grid*grid]: a random `mask_ratio` of the (block x block)-patch units hidden per image."""
    torch = _torch()
    units = grid // recipe.mask_block
    hidden = max(1, round(recipe.mask_ratio * units * units))
    order = torch.rand(batch, units * units, generator=generator).argsort(dim=1)
    unit_mask = torch.zeros(batch, units * units, dtype=torch.bool)
    unit_mask.scatter_(1, order[:, :hidden], True)
    unit_mask = unit_mask.view(batch, units, 1, units, 1)
    full = unit_mask.expand(batch, units, recipe.mask_block, units, recipe.mask_block)
    return full.reshape(batch, grid * grid)


class MaskedImageModel:
    """The backbone plus SimMIM's linear pixel decoder; `loss(images_uint8, generator)`."""

    def __init__(self, recipe: Recipe):
        torch = _torch()
        from m2dino.models.weights import build_backbone

        torch.manual_seed(recipe.seed)
        self.recipe = recipe
        self.backbone = build_backbone(PRESET)
        self.patch = self.backbone.patch_size
        self.decoder = torch.nn.Linear(self.backbone.embed_dim, (self.patch // TARGET_POOL) ** 2)
        self.modules = torch.nn.ModuleDict({"backbone": self.backbone, "decoder": self.decoder})

    def targets(self, pixels):
        """Each patch's pixels, 2x2-averaged (the speckle grain is about a pixel at 64 px and cannot be
        predicted; the structure can) and standardised per image (brightness jitter is not structure):
        [B, HW, (p/2)^2]."""
        import torch.nn.functional as F

        x = F.avg_pool2d(pixels, TARGET_POOL)[:, 0]                                       # [B, S/2, S/2]
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-6)
        q = self.patch // TARGET_POOL
        b, grid = x.shape[0], x.shape[-1] // q
        return x.unfold(1, q, q).unfold(2, q, q).reshape(b, grid * grid, q * q)

    def loss(self, images, generator):
        x, pixels = views(images, generator, self.recipe)
        b, p = x.shape[0], self.patch
        grid = x.shape[-1] // p
        masks = block_masks(b, grid, self.recipe, generator)
        tokens = self.backbone.forward_features(x, masks=masks)["x_norm_patchtokens"]      # [B, HW, D]
        predicted = self.decoder(tokens)                                                  # [B, HW, q*q]
        per_patch = (predicted - self.targets(pixels)).abs().mean(-1)
        return (per_patch * masks).sum() / masks.sum().clamp(min=1)


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(recipe: Recipe, epoch: int):
    """The pool indices of an epoch, shuffled by (seed, epoch) alone."""
    torch = _torch()
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + epoch)
    return torch.randperm(recipe.images, generator=generator)


def start(recipe: Recipe):
    """The model at initialisation and the generator of views and masks (both seeded by the recipe)."""
    model = MaskedImageModel(recipe)
    return model, _torch().Generator().manual_seed(recipe.seed)


def pretrain(recipe: Recipe, pool, max_steps: int | None = None, log=print) -> tuple[dict, dict]:
    """Train on `pool` (uint8 [images, S, S] tensor); returns (backbone state dict, history)."""
    torch = _torch()
    model, generator = start(recipe)
    decay = [p for n, p in model.modules.named_parameters() if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.modules.named_parameters() if not (p.ndim >= 2 and "token" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    steps_per_epoch = recipe.images // recipe.batch_size or 1
    total = steps_per_epoch * recipe.epochs
    warmup = max(1, round(recipe.warmup_epochs * steps_per_epoch))
    history = {"epoch_loss": [], "first_step_loss": None, "steps": 0}
    model.modules.train()
    step = 0
    began = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = epoch_order(recipe, epoch)
        running = 0.0
        for k in range(steps_per_epoch):
            batch = pool[order[k * recipe.batch_size:(k + 1) * recipe.batch_size]]
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * _schedule(step, total, warmup)
            loss = model.loss(batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.modules.parameters(), 3.0)
            optimizer.step()
            value = loss.detach().item()
            if history["first_step_loss"] is None:
                history["first_step_loss"] = value
            running += value
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        history["epoch_loss"].append(round(running / max(1, k + 1), 5))
        log(f"epoch {epoch + 1}/{recipe.epochs}: loss {history['epoch_loss'][-1]:.4f} "
            f"({time.perf_counter() - began:.0f} s)")
        if max_steps is not None and step >= max_steps:
            break
    history["steps"] = step
    history["seconds"] = round(time.perf_counter() - began, 1)
    return model.backbone.state_dict(), history


# ============================================================================ the file


def storable(backbone) -> dict:
    """The backbone's state dict as the file holds it: parameters fp16, buffers as the model keeps them."""
    torch = _torch()
    parameters = {name for name, _ in backbone.named_parameters()}
    return {k: (v.to(torch.float16) if k in parameters else v).contiguous()
            for k, v in backbone.state_dict().items()}


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+changes" if dirty and commit else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(recipe: Recipe, history: dict, threads: int, argv: list[str], seconds: dict, commit: str) -> dict:
    from m2dino.data.synthetic import GENERATOR_VERSION

    return {"format": FORMAT, "preset": PRESET, "objective": "SimMIM masked-image modelling (L1 on 2x2-averaged "
                                                              "pixels standardised per image) on the synthetic pool",
            "command": "python -m m2dino.training.pretrain_synthetic " + " ".join(argv),
            "commit": commit, "generator_version": GENERATOR_VERSION, "recipe": asdict(recipe),
            "threads": threads, "torch": _torch().__version__, "machine": f"{platform.machine()} "
                                                                         f"{platform.processor() or ''}".strip(),
            "first_step_loss": history["first_step_loss"], "epoch_loss": history["epoch_loss"],
            "steps": history["steps"], "seconds": seconds}


def save(path: Path, backbone_state: dict, info: dict) -> None:
    """The weights (safetensors, provenance in the metadata) and <stem>.json, each written whole."""
    from safetensors.torch import save_file

    from m2dino.io import atomic_write, write_json
    from m2dino.models.weights import build_backbone

    backbone = build_backbone(PRESET)
    backbone.load_state_dict(backbone_state, strict=True)
    tensors = storable(backbone)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"m2dino_provenance": json.dumps(info)}))
    write_json(path.with_suffix(".json"), info)


def read_provenance(path) -> dict:
    """The provenance stored in a pretrained file's safetensors metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "m2dino_provenance" not in metadata:
        raise ValueError(f"{path}: no m2dino_provenance in its metadata (not written by pretrain_synthetic)")
    return json.loads(metadata["m2dino_provenance"])


# ============================================================================ the command

RECIPE_HELP = {
    "images": "pool images to pretrain on (pool indices 0..N-1)",
    "epochs": "passes over the pool",
    "batch_size": "images per step",
    "lr": "AdamW peak learning rate (linear warmup, cosine to 1%%)",
    "warmup_epochs": "epochs of linear warmup",
    "weight_decay": "AdamW weight decay (not on norms, biases, tokens)",
    "mask_ratio": "share of the mask blocks hidden per image",
    "mask_block": "side of a mask block, in patches",
    "crop_scale": "the smallest share of the image area a random crop keeps",
    "img_size": "image side in pixels (the default run's 64)",
    "seed": "seed of the pool and of the training",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = Recipe()
    p = argparse.ArgumentParser(prog="python -m m2dino.training.pretrain_synthetic",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="weights file to write (.safetensors); <stem>.json goes beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (it is moved aside first)")
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=RECIPE_HELP[name])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: the result is exact for a thread count (one: the same on any machine)")
    p.add_argument("--workers", type=int, default=None, help="processes drawing the pool (default: up to 2)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a = p.parse_args(argv)
    recipe = Recipe(**{name: getattr(a, name) for name in asdict(Recipe())})
    problems = recipe.problems() + ([f"--threads must be >= 1, got {a.threads}"] if a.threads < 1 else [])
    if problems:
        p.error("; ".join(problems))
    out = Path(a.out)
    if out.suffix != ".safetensors":
        p.error(f"--out {out}: the weights are written as .safetensors")
    if out.exists() and not a.overwrite:
        p.error(f"--out {out} exists; pass --overwrite to replace it (the old file is moved aside, not deleted)")
    torch = _torch()
    from m2dino.data.synthetic.pool import pool_images

    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    commit = _commit()  # the code this run runs
    began = time.perf_counter()
    pool = torch.from_numpy(pool_images(recipe.images, recipe.seed, recipe.img_size, workers=a.workers))
    pool_seconds = round(time.perf_counter() - began, 1)
    print(f"pool: {recipe.images} images drawn in {pool_seconds} s")
    state, history = pretrain(recipe, pool)
    info = provenance(recipe, history, a.threads, argv, {"pool": pool_seconds, "training": history["seconds"],
                                                         "total": round(time.perf_counter() - began, 1)}, commit)
    if out.exists():  # --overwrite: moved aside with its JSON, never deleted
        aside = f"{out.stem}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        for old in (out, out.with_suffix(".json")):
            if old.exists():
                old.replace(old.with_name(aside + old.suffix))
    save(out, state, info)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {info['seconds']['total']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
