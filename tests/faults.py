"""Faults of the machine, made on purpose for the tests: a read-only file system and a full disk
under chosen folders.

The tests run as root, for whom a chmod blocks nothing, and no small tmpfs can be mounted here,
so the calls that write are patched to fail as the kernel fails them: `read_only` makes every
os-level write under the folders (mkdir, open for writing or creating, rename, unlink...) raise
EROFS, so the error comes from the very call the code makes; `disk_full` makes the writers m2dino
uses (Path.write_bytes/write_text, PIL's save, torch.save, safetensors' save_file) raise ENOSPC
part-way, as a full disk does, after leaving a partial file, and reports `free` bytes free.
"""
from __future__ import annotations

import builtins
import errno
import io as _io
import os
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(path, roots, dir_fd=None) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    path = Path(os.fsdecode(path))
    if dir_fd is not None and not path.is_absolute():
        path = Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / path
    path = Path(os.path.abspath(path))
    return any(path == root or root in path.parents for root in roots)


def read_only(monkeypatch, *folders) -> None:
    """Every write under `folders` fails with EROFS from here on (the test's monkeypatch undoes it)."""
    roots = [Path(os.path.abspath(f)) for f in folders]

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def guard(real, writes=lambda *a, **k: True):
        def call(path, *args, **kwargs):
            if writes(*args, **kwargs) and _under(path, roots, kwargs.get("dir_fd")):
                refuse(path)
            return real(path, *args, **kwargs)
        return call

    def opens_for_writing(flags=0, *args, **kwargs):
        return bool(flags & _WRITE_FLAGS)

    def mode_writes(mode="r", *args, **kwargs):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "remove", "symlink", "link", "truncate"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
    monkeypatch.setattr(os, "open", guard(os.open, opens_for_writing))
    monkeypatch.setattr(builtins, "open", guard(builtins.open, mode_writes))
    monkeypatch.setattr(_io, "open", guard(_io.open, mode_writes))


def disk_full(monkeypatch, *folders, free: int = 0) -> None:
    """Every file m2dino writes under `folders` fails with ENOSPC after a partial write; the disk
    reports `free` bytes free."""
    import safetensors.torch
    import torch
    from PIL import Image

    from m2dino import io

    roots = [Path(os.path.abspath(f)) for f in folders]

    def fill(path):
        with builtins.open(path, "wb") as handle:
            handle.write(b"\0" * 16)  # what fitted before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))

    def guard(real):
        def call(*args, **kwargs):
            target = _target(args, kwargs)
            if target is not None and _under(target, roots):
                fill(target)
            return real(*args, **kwargs)
        return call

    def _target(args, kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, (str, os.PathLike)) and not isinstance(value, bool):
                return value
        return None

    real_write_bytes, real_write_text, real_save = Path.write_bytes, Path.write_text, Image.Image.save
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: fill(self) if _under(self, roots)
                        else real_write_bytes(self, data))
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: fill(self) if _under(self, roots)
                        else real_write_text(self, *a, **k))
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: fill(fp) if _under(fp, roots)
                        else real_save(self, fp, *a, **k))
    monkeypatch.setattr(torch, "save", guard(torch.save))
    monkeypatch.setattr(safetensors.torch, "save_file", guard(safetensors.torch.save_file))
    real_free = io.free_space
    monkeypatch.setattr(io, "free_space", lambda folder: free if _under(folder, roots) else real_free(folder))


# ------------------------------------------------------------------ faults in child processes

PLUGIN = Path(__file__).parent / "fault_plugin"


def child_env(crash_rank_at_step: str | None = None, checkpoint_sleep: float = 0.0, base=None) -> dict:
    """The environment of a child process (a training command, torchrun and its ranks) with
    fault_plugin/sitecustomize.py on its PYTHONPATH: `crash_rank_at_step` "RANK:STEP" makes that
    rank exit after step STEP on torchrun's first attempt; `checkpoint_sleep` seconds pass in the
    middle of every checkpoint write (after the weights)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN), env.get("PYTHONPATH", "")) if p)
    for name in ("M2DINO_TEST_CRASH_RANK_AT_STEP", "M2DINO_TEST_CHECKPOINT_SLEEP"):
        env.pop(name, None)
    if crash_rank_at_step:
        env["M2DINO_TEST_CRASH_RANK_AT_STEP"] = crash_rank_at_step
    if checkpoint_sleep:
        env["M2DINO_TEST_CHECKPOINT_SLEEP"] = str(checkpoint_sleep)
    return env


def crash_at_step(step: int, event) -> None:
    """A step callback (functools.partial(crash_at_step, STEP)) that ends its process after
    training step STEP, as a machine fault would: picklable, so it reaches --jobs workers."""
    if event.step == step:
        os._exit(1)
