"""The kernels' one atomic JSON writer and the reading rule of their cache files.

A file is written whole or not at all: a temporary file in the same folder, flushed and
synced, then os.replace onto the name (readers never see half a file; a crash leaves the
old file or a stray temporary). A cache file that cannot be parsed is ignored with one
warning and rewritten at the next write. (m2dino has its own writer in m2dino.io; this
package does not import m2dino.)
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional


def write_json(path, payload) -> None:
    """Write `payload` as JSON to `path` atomically (raises OSError when it cannot)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_cache_table(path, table: str, entry_problem: Callable[[object], Optional[str]],
                     what: str, quiet: bool = False) -> Optional[dict]:
    """The JSON object at `path` when its `table` is a dict whose every entry passes
    `entry_problem` (None, or why not); {} when the file does not exist; None, with a warning
    naming `what`, the file and the fault (none when `quiet`), when it is unreadable or
    corrupt. The caller checks the payload's version fields."""
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as err:
        if not quiet:
            warnings.warn(f"{what}: cannot read {path} ({err}); starting afresh",
                          RuntimeWarning, stacklevel=4)
        return None
    try:
        payload = json.loads(text)
        if not isinstance(payload, dict) or not isinstance(payload.get(table), dict):
            raise ValueError(f"no {table!r} table")
        for key, entry in payload[table].items():
            problem = entry_problem(entry)
            if problem:
                raise ValueError(f"entry {key!r} {problem}")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        if not quiet:
            warnings.warn(f"{what}: ignoring the corrupt cache file {path} ({err}); it is "
                          "rewritten at the next write", RuntimeWarning, stacklevel=4)
        return None
    return payload
