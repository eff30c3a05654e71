"""Atomic training checkpoints and exact resume.

A training checkpoint is a directory `last/` holding
    model.safetensors + model.json   the weights (m2dino.save_model, stem "model")
    train_state.pt                   optimizer, sampler position, RNG states, step (the lr follows from it),
                                     counters; torch.save of tensors and plain types only,
                                     read back with weights_only=True (never runs code)

Atomicity. The new checkpoint is written completely into a fresh temporary directory
(`.last.tmp-<host>-<pid>-*`) and fsynced; then `last` is renamed to `.last.old-<host>-<pid>-*`,
the temporary directory renamed to `last`, and the old one removed. A kill at any moment leaves
either a complete `last/` or (between the two renames) a complete `.last.old-*`;
`find_checkpoint` returns whichever is complete, newest step first, and temporary directories
are never read. Temporary names carry their writer (host and PID): a cleanup removes only its
own process's and those of writers on this host that are gone, never another live writer's.
A write that fails for want of space says how much the checkpoint needs (DiskFullError) and
leaves the last complete checkpoint as it was.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2dino import io
from m2dino.errors import DiskFullError
from m2dino.models.m2dino import save_model
from m2dino.training.distributed import unwrap

TRAIN_STATE = "train_state.pt"
MODEL_STEM = "model"
LAST = "last"
_TMP_PREFIX = ".last.tmp-"
_OLD_PREFIX = ".last.old-"


class CheckpointError(RuntimeError):
    """A training checkpoint that cannot be used (missing file, truncated, wrong model)."""


# ------------------------------------------------------------------ RNG state


def rng_state() -> dict[str, Any]:
    """Every RNG the training step may touch, as tensors and plain types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state):
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(plain):
    return plain["version"], tuple(plain["internal"]), plain["gauss"]


# ------------------------------------------------------------------ writing


def save_checkpoint(model_dir, model, train_state: dict[str, Any], model_state: dict | None = None) -> Path:
    """Write `model_dir/last/` atomically (see the module docstring); returns its path.

    train_state: tensors and plain Python types only (it is loaded with weights_only=True);
    model_state: the full weights when `model` is sharded (m2dino.training.distributed).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + writer_tag(), dir=model_dir))
    try:
        save_model(unwrap(model), tmp / MODEL_STEM, state_dict=model_state)
        torch.save(train_state, tmp / TRAIN_STATE)
        io.fsync_tree(tmp)
        final = io.replace_directory(tmp, model_dir / LAST)  # the old one becomes .last.old-*
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        full = error if isinstance(error, DiskFullError) else io.disk_full(tmp / TRAIN_STATE, error)
        if full is not None:
            kept = find_checkpoint(model_dir)
            raise DiskFullError(model_dir / LAST, tensor_bytes(model_state or unwrap(model).state_dict(), train_state),
                                io.free_space(model_dir), what=f"the training checkpoint {model_dir / LAST}",
                                advice=(f"the last complete checkpoint {kept} is intact: free some space and "
                                        f"continue with --resume" if kept else
                                        "free some space (or choose another --out) and run again")) from error
        raise
    cleanup_stale(model_dir)
    return final


def tensor_bytes(*values) -> int:
    """The bytes of every tensor in nested dicts, lists and tuples: what a checkpoint of them needs."""
    total, stack = 0, list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def writer_tag() -> str:
    """`<host>-<pid>-`: what temporary names start with, so that each writer knows its own."""
    return f"{socket.gethostname()}-{os.getpid()}-"


def _writer_gone(name: str, prefix: str) -> bool:
    """Whether the writer that named a temporary directory `name` is this process or a process
    of this host that is gone (names without a writer, from older versions, count as gone)."""
    host, _, rest = name[len(prefix):].rpartition("-")  # <host>-<pid>-<suffix>: drop the suffix
    host, _, pid = host.rpartition("-")
    if not pid.isdigit() or not host:
        return True
    if host != socket.gethostname():
        return False  # another machine's writer (a shared file system): not ours to judge
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def cleanup_stale(model_dir) -> None:
    """Remove temporary directories of interrupted writes: this process's and those whose writer
    is gone; never the checkpoint in use, never a live writer's."""
    model_dir = Path(model_dir)
    keep = find_checkpoint(model_dir)
    for d in model_dir.glob(".last.*"):
        if not d.is_dir() or d == keep:
            continue
        if d.name.startswith(_TMP_PREFIX) and _writer_gone(d.name, _TMP_PREFIX):
            shutil.rmtree(d, ignore_errors=True)
        elif d.name.startswith(_OLD_PREFIX) and keep is not None and _writer_gone(d.name, _OLD_PREFIX):
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ reading


def read_train_state(ckpt_dir) -> dict[str, Any]:
    """train_state.pt of a checkpoint directory, loaded with weights_only=True."""
    path = Path(ckpt_dir) / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete training checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a training state ({type(e).__name__}: {e})") from e


def _is_complete(ckpt_dir: Path) -> bool:
    return all((ckpt_dir / name).is_file() for name in (TRAIN_STATE, MODEL_STEM + ".safetensors", MODEL_STEM + ".json"))


def find_checkpoint(model_dir) -> Path | None:
    """The usable training checkpoint of a model directory: `last/` when complete, else a
    complete `.last.old-*` left by a kill between the two renames; None when there is none."""
    model_dir = Path(model_dir)
    candidates = [model_dir / LAST] + sorted(model_dir.glob(_OLD_PREFIX + "*"))
    for c in candidates:
        if c.is_dir() and _is_complete(c):
            return c
    return None


def read_checkpoint(ckpt_dir, model) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the weights, the training state) of a checkpoint, the weights checked against `model`'s
    names and shapes (strict). Errors name the file and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    weights = ckpt_dir / (MODEL_STEM + ".safetensors")
    state = read_train_state(ckpt_dir)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot be read ({e})") from e
    own = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items()}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k] != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append("wrong shape " + ", ".join(
                f"{k}: saved {tuple(tensors[k].shape)} vs model {own[k]}" for k in wrong[:5]))
        raise CheckpointError(f"{weights}: does not fit this model ({'; '.join(details)})")
    return tensors, state


def load_checkpoint(ckpt_dir, model) -> dict[str, Any]:
    """Load the weights into `model` (strict: names and shapes must match) and return the
    training state. Errors name the file and the problem."""
    tensors, state = read_checkpoint(ckpt_dir, model)
    unwrap(model).load_state_dict(tensors, strict=True)
    return state
