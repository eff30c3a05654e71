"""Files that are never half-written, JSON that is always valid, one writer per folder, and
reading that never hangs: the one place for each.

`atomic_write(path, write)` calls `write(tmp)` on a uniquely named temporary file in the same
folder as `path`, fsyncs it, renames it over `path` and fsyncs the folder. A reader (or a
run killed at any moment) sees the old file or the new one, never a part of one; two writers
never share a temporary name; a failed write leaves `path` as it was and no temporary file,
and a write that fails for want of space raises DiskFullError saying how much it needed.
Every file m2dino writes goes through it (`write_text`, `write_json`, a PNG, a safetensors
file); a folder of several files (the training checkpoint, an exported predictor) is written
complete under a temporary name and swapped in whole by `replace_directory`.

`lock_directory(folder, owner)`: the exclusive writer's lock of an output folder (train's run
directory, predict's and export's --out): an flock on `folder/.m2dino.lock`, which the kernel
releases when the process dies, so a killed run never leaves a stale lock. A second writer
stops at once (DirectoryBusyError naming the folder and the PID holding it).

`claim_files(folder, planned, writer, overwrite)`: a command that writes named files into a
user's folder (predict's and report's --out) replaces only files it wrote there itself, as
listed in its marker file (`.m2dino-predictions.json`, `.m2dino-report.json`); a file at a planned name that it did not
write stops it (InputError naming the file), or with the explicit flag the folder moves aside.

Reading: `open_regular` opens regular files only (a FIFO named *.csv or *.json would block a
plain open forever) and `file_kind` says what a path is when it is not one; `read_json` names
the file in every error (missing, not UTF-8, invalid, nested too deeply, not the type asked for).

JSON: `json_ready` turns NaN and infinities into null (JSON has no NaN; Python's `json` would
write the invalid token `NaN`), numpy scalars and arrays and tensors into plain numbers and
lists, and paths into strings.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from m2dino.errors import DirectoryBusyError, DiskFullError, InputError


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


def atomic_write(path, write: Callable[[Path], Any], size: int | None = None) -> Path:
    """Write `path` through `write(tmp)` so that it appears complete or not at all. `size`: the
    bytes it will take, when known, for the message of a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        written = _size_of(tmp)
        tmp.unlink(missing_ok=True)
        full = disk_full(path, error, size if size else written, at_least=not size)
        if full is not None:
            raise full from error
        raise
    fsync_dir(path.parent)
    return path


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def free_space(folder) -> int | None:
    """Bytes free to this user on the disk holding `folder` (None when it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


# A writer that does not raise ENOSPC itself (torch.save's zip writer: "unexpected pos ...",
# a safetensors serialisation error) is judged by the space left when it failed.
_NEARLY_FULL = 1 << 20


def disk_full(path, error: BaseException, needed: int | None = None, what: str | None = None,
              advice: str | None = None, at_least: bool = False) -> DiskFullError | None:
    """The DiskFullError to raise for a write of `path` that failed with `error` when the disk is
    full (ENOSPC / EDQUOT, or any writer's error with (nearly) no space left); else None."""
    if isinstance(error, DiskFullError) or not isinstance(error, Exception):
        return None
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    free = free_space(folder)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(path, needed, free, what, advice, at_least)
    if isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError":
        if free is not None and (free < _NEARLY_FULL or (needed and not at_least and free < needed)):
            return DiskFullError(path, needed, free, what, advice, at_least)
    return None


def replace_directory(tmp, final) -> Path:
    """Put the complete directory `tmp` at `final` (same filesystem), replacing what is there.

    `final` is first renamed to `.<name>.old-<host>-<pid>-<ns>`, then `tmp` renamed to `final`, the
    parent fsynced and the old directory removed: a kill at any moment leaves the new
    directory at `final`, or the complete old one (at `final` or under its .old name). The
    caller fsyncs `tmp`'s files before (atomic_write does) and removes `tmp` on failure."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():  # named by its writer (host, pid): a cleanup knows whose it is
        old = final.parent / f".{final.name}.old-{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}"
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


def files_written_by(folder: Path, writer: str, marker: str) -> frozenset:
    """What an earlier `writer` wrote into `folder` (the list in its marker file; empty without one)."""
    marker = Path(folder) / marker
    try:
        data = read_json(marker)
    except (OSError, ValueError):
        return frozenset()
    files = data.get("files") if data.get("written_by") == writer else None
    if not isinstance(files, list):
        return frozenset()
    return frozenset(f for f in files if isinstance(f, str)) | {marker.name}


def claim_files(folder, planned, writer: str, marker: str, overwrite: bool, flag: str = "--out",
                also_ours=frozenset()) -> frozenset:
    """Make sure writing the `planned` files (relative names) into `folder` replaces only files
    an earlier `writer` wrote there and nothing outside it (through a symlink).
    Returns the files the earlier run wrote. A file it did not write: InputError naming it, or
    (overwrite) the folder moves aside first. Call it under the folder's lock (lock_directory),
    then record_files under the lock of the folder that is there now. also_ours: files known to
    be the writer's without its list (what an older m2dino wrote, recognised by their content)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{flag} {folder} is a file, not a folder")
    planned = sorted(set(planned) | {marker})
    resolved = folder.resolve()
    escaping = [f for f in planned if resolved not in (folder / f).resolve().parents]
    if escaping:
        raise InputError(f"{flag} {folder}: writing {escaping[0]!r} would go through a symlink out of the folder "
                         f"({(folder / escaping[0]).resolve()}); choose another {flag}")
    ours = files_written_by(folder, writer, marker) | frozenset(also_ours)
    foreign = [f for f in planned if f not in ours and os.path.lexists(folder / f)]
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"{flag} {folder} holds files that {writer} would replace and did not write (its list, "
                         f"{marker}, does not name them; an older m2dino kept no list): {shown}. "
                         f"Choose another {flag}, or --overwrite to move the folder aside to "
                         f"{folder}.old-<timestamp> (nothing is deleted)")
    if foreign:
        moved = move_aside(folder)
        print(f"m2dino: --overwrite: moved {folder} aside to {moved}", file=sys.stderr)
        return frozenset()
    return ours


def record_files(folder, writer: str, marker: str, files) -> None:
    """Write the writer's marker: the files it writes into `folder` (claim_files reads it)."""
    write_json(Path(folder) / marker, {"written_by": writer, "files": sorted(set(files) | {marker})})


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def write_text(path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data))


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


MAX_JSON_DEPTH = 64  # m2dino's own files nest 6 deep; a deeper file is not one of them


def read_json(path, expect: type | None = dict, max_bytes: int | None = None):
    """The JSON in `path`; errors name the file: missing (FileNotFoundError), or (InputError) not
    a regular file, larger than `max_bytes`, not UTF-8, not valid JSON, nested deeper than
    MAX_JSON_DEPTH, or not an `expect` at the top level."""
    path = Path(path)
    try:
        with open_regular(path, "rb") as handle:
            raw = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise InputError(f"{path}: larger than {max_bytes} bytes, too large for what it should hold")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text: byte {raw[err.start]:#04x} at offset "
                         f"{err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    except RecursionError:
        raise InputError(f"{path}: not valid JSON for m2dino (nested more than {MAX_JSON_DEPTH} levels deep)") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise InputError(f"{path}: not valid JSON for m2dino (nested more than {MAX_JSON_DEPTH} levels deep)")
    if expect is not None and not isinstance(data, expect):
        raise InputError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__} "
                         f"at the top level, got {type(data).__name__}")
    return data


def json_depth(data) -> int:
    """How deep lists and objects nest in `data` (0 for a number or a string), level by level."""
    depth, level = 0, [data]
    while True:
        containers = [item for item in level if isinstance(item, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]


# ------------------------------------------------------------------ reading regular files only

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path) -> str | None:
    """None when `path` is a regular file (through symlinks); else what it is instead: 'missing',
    'a folder', 'a FIFO (named pipe)', ..., or why it cannot be looked at (a name too long, a
    symlink loop, a NUL byte)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except ValueError:  # an embedded NUL byte
        return "not a valid path (it holds a NUL byte)"
    except OSError as err:
        return f"not usable ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path, mode: str = "r", **kwargs):
    """open(path, mode) for reading a regular file; InputError naming the path for anything else.
    The file is opened non-blocking first and checked, so a FIFO never blocks the reader."""
    if any(c in mode for c in "wax+"):
        raise ValueError(f"open_regular reads only, not mode {mode!r}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            what = next((w for test, w in _KINDS if test(info.st_mode)), "not a regular file")
            raise InputError(f"{path} is {what}, not a regular file; not read")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return open(fd, mode, closefd=True, **kwargs)
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------ one writer per folder

LOCK_FILE = ".m2dino.lock"
_held: dict[tuple[int, int], "DirectoryLock"] = {}  # this process's locks, by the folder's (device, inode)


class DirectoryLock:
    """The writer's lock of a folder held by this process (see `lock_directory`); a context
    manager. Nested acquisitions of the same folder by the same process share it."""

    def __init__(self, folder: Path, fd: int | None, dir_fd: int, key: tuple[int, int], created: list[Path]):
        self.folder, self.fd, self.dir_fd, self.key, self.created = folder, fd, dir_fd, key, created
        self.pid = os.getpid()
        self.depth = 1

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the lock back (the outermost holder only): the lock file is removed, then closed;
        the folders this lock created and nothing else filled are removed too."""
        if self.pid != os.getpid() or self.depth == 0:  # a forked child never releases its parent's lock
            return
        self.depth -= 1
        if self.depth:
            return
        _held.pop(self.key, None)
        if self.fd is not None:
            try:
                if os.stat(LOCK_FILE, dir_fd=self.dir_fd).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(LOCK_FILE, dir_fd=self.dir_fd)
            except OSError:
                pass  # the folder went (moved aside and removed, or swapped by export): nothing to remove
            os.close(self.fd)
        _remove_empty(self.created)  # a failed command leaves no trace
        os.close(self.dir_fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (the deepest first) while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            break


def lock_directory(folder, owner: str) -> DirectoryLock:
    """Make `folder` (and its parents) if needed and hold its exclusive writer's lock: an flock on
    `folder/.m2dino.lock` holding this process's PID, host and `owner` (the command). Another
    process holding it: DirectoryBusyError naming the folder and that process, at once. The
    kernel releases an flock when its process dies, so a SIGKILLed writer leaves no stale lock.
    A file system without flock (some network mounts) gets a warning and no lock."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder; choose another output")
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    info = os.fstat(dir_fd)
    key = (info.st_dev, info.st_ino)
    held = _held.get(key)
    if held is not None and held.pid == os.getpid():
        os.close(dir_fd)
        held.depth += 1
        return held
    try:
        fd = _take_lock_file(folder, dir_fd)
    except BaseException:
        os.close(dir_fd)
        _remove_empty(created)
        raise
    if fd is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {owner}\n".encode(), 0)
    lock = _held[key] = DirectoryLock(folder, fd, dir_fd, key, created)
    return lock


def _take_lock_file(folder: Path, dir_fd: int) -> int | None:
    while True:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process that has not said"
            os.close(fd)
            raise DirectoryBusyError(f"{folder} is being written by another process ({holder}). One writer per "
                                     f"folder: wait for it to finish (or stop it), or choose another output "
                                     f"folder") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"m2dino: warning: cannot lock {folder} ({err.strerror}): a second writer into it would not be "
                  f"stopped", file=sys.stderr)
            return None
        # the previous holder may have removed the file between our open and our flock: then
        # the lock is on a file nobody else will open, and the one at the path is taken again
        try:
            same = os.stat(LOCK_FILE, dir_fd=dir_fd).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
