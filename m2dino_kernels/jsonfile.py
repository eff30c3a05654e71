"""The kernels' one atomic JSON writer and their cache files.

A file is written whole or not at all: a temporary file in the same folder, flushed and
synced, then os.replace onto the name (readers never see half a file; a crash leaves the
old file or a stray temporary). A cache file (CacheFile: the autotune decisions, the
self-test verdicts) lives in $M2DINO_CACHE (default ~/.cache/m2dino), is read once when
first needed, is merged with what other processes wrote when written, and when it cannot be
parsed is ignored with one warning and rewritten at the next write. (m2dino has its own
writer in m2dino.io; this package does not import m2dino.)
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional


def cache_dir() -> Path:
    """$M2DINO_CACHE, default ~/.cache/m2dino (the same folder as m2dino's own cache)."""
    return Path(os.environ.get("M2DINO_CACHE") or Path.home() / ".cache" / "m2dino")


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


class CacheFile:
    """One table of a JSON cache file, key -> entry: {**stamp, table: {key: entry}}.

    name: the file in cache_dir() (or `path`, fixed); stamp: the payload's version fields (a
    file with others is not read: its entries need not hold here); entry_problem(entry) ->
    None or why it is not an entry; what: who is speaking, for warnings; read_entry: what an
    entry read from the file becomes (e.g. old names made new)."""

    def __init__(self, name: str, table: str, stamp: dict,
                 entry_problem: Callable[[object], Optional[str]], what: str, path=None,
                 read_entry: Callable = lambda entry: entry):
        self.name, self.table, self.stamp = name, table, dict(stamp)
        self._entry_problem, self._what, self._read_entry = entry_problem, what, read_entry
        self._path = None if path is None else Path(path)
        self._entries: Optional[dict] = None
        self._warned_write = False

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / self.name

    def _read(self, quiet: bool = False) -> dict:
        payload = read_cache_table(self.path, self.table, self._entry_problem, self._what, quiet)
        if not payload or any(payload.get(k) != v for k, v in self.stamp.items()):
            return {}
        return {key: self._read_entry(entry) for key, entry in payload[self.table].items()}

    def entries(self) -> dict:
        """Every entry of the file (read once)."""
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, key: str):
        return self.entries().get(key)

    def save(self, key: str, entry) -> None:
        """Add an entry, in memory and in the file (merged with what other processes wrote
        meanwhile); a file that cannot be written leaves it in memory, with one warning."""
        self.entries()[key] = entry
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(quiet=True), **self._entries}
            write_json(path, {**self.stamp, self.table: merged})
        except OSError as err:
            if not self._warned_write:
                self._warned_write = True
                warnings.warn(f"{self._what}: cannot write {path} ({err}); kept in memory only",
                              RuntimeWarning, stacklevel=3)

    def clear(self) -> None:
        """Forget what was read (the file stays)."""
        self._entries = None
