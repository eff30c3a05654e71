"""Files that are never half-written, and JSON that is always valid: the one place for both.

`atomic_write(path, write)` calls `write(tmp)` on a uniquely named temporary file in the same
folder as `path`, fsyncs it, renames it over `path` and fsyncs the folder. A reader (or a
run killed at any moment) sees the old file or the new one, never a part of one; two writers
never share a temporary name; a failed write leaves `path` as it was and no temporary file.
Every file m2dino writes goes through it (`write_text`, `write_json`, a PNG, a safetensors
file); a folder of several files (the training checkpoint, an exported predictor) is written
complete under a temporary name and swapped in whole by `replace_directory`.

JSON: `json_ready` turns NaN and infinities into null (JSON has no NaN; Python's `json` would
write the invalid token `NaN`), numpy scalars and arrays and tensors into plain numbers and
lists, and paths into strings.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable


def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(path) -> None:
    """fsync every file directly in `path`, then `path` itself."""
    for child in Path(path).iterdir():
        if child.is_file():
            fsync_file(child)
    fsync_dir(path)


def atomic_write(path, write: Callable[[Path], Any]) -> Path:
    """Write `path` through `write(tmp)` so that it appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def replace_directory(tmp, final) -> Path:
    """Put the complete directory `tmp` at `final` (same filesystem), replacing what is there.

    `final` is first renamed to `.<name>.old-<pid>-<ns>`, then `tmp` renamed to `final`, the
    parent fsynced and the old directory removed: a kill at any moment leaves the new
    directory at `final`, or the complete old one (at `final` or under its .old name). The
    caller fsyncs `tmp`'s files before (atomic_write does) and removes `tmp` on failure."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def move_aside(path) -> Path:
    """Rename `path` to `<path>.old-<timestamp>` (a counter added if that exists already) and
    return the new name: how a command given an explicit flag replaces a user's run or folder
    without deleting anything."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    path.rename(target)
    return target


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_ready(value):
    """A copy of `value` that json.dumps writes as valid JSON (see the module docstring)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return json_ready(value.tolist())
    raise TypeError(f"cannot write {type(value).__name__} as JSON: {value!r}")


def dumps(data, indent: int | None = 1) -> str:
    """JSON text of `data` (through json_ready; never writes NaN)."""
    return json.dumps(json_ready(data), indent=indent, allow_nan=False)


def write_json(path, data, indent: int | None = 1) -> Path:
    """`data` as JSON (NaN as null) with a final newline, atomically."""
    return write_text(path, dumps(data, indent) + "\n")


def read_json(path, expect: type | None = dict):
    """The JSON in `path`; errors name the file (missing, invalid, or not an `expect`)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if expect is not None and not isinstance(data, expect):
        raise ValueError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__} "
                         f"at the top level, got {type(data).__name__}")
    return data
