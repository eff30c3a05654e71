"""What a command answers when the user or the machine is at fault: one message, an exit code,
never a traceback. Bugs keep theirs.

- `InputError` (a ValueError) is bad input: a file, row, option or shape the message names, with
  what to do. Exit code 2. The package's own errors about input derive from it (WeightsError,
  PredictionError, EvaluationError, ExportError, RunDirError, DataValidationError, ImageError...).
- An OSError of the machine is an environment fault: the disk is full (`DiskFullError` says how
  much was needed and how much is free), a read-only file system, a permission, no file handles
  left. Exit code 1, one line naming the path.
- An OSError about a path the user gave (missing, not a folder, a name too long, a symlink loop)
  is bad input again: exit code 2.

`run_command(prog, body)` is the one place that turns these into `prog: error: ...` and the exit
code; everything else (a bug) propagates with its traceback. No torch here: every entry point
imports it before parsing its command line.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

EXIT_INPUT = 2
EXIT_ENVIRONMENT = 1

# The machine's faults, not the user's input: full, read-only, forbidden, broken, out of handles.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class InputError(ValueError):
    """Bad input: the message names the file, row, option or shape at fault and what to do."""


class DirectoryBusyError(InputError):
    """Another process holds the writer's lock of a directory (m2dino.io.lock_directory)."""


class DiskFullError(OSError):
    """A write failed for want of space. The message names the file, how much it needed and how
    much is free; the write left nothing half-written (m2dino.io.atomic_write)."""

    def __init__(self, path, needed: int | None, free: int | None, what: str | None = None,
                 advice: str | None = None, at_least: bool = False):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.needed, self.free = needed, free
        if needed:
            need = f"needed more than {format_bytes(needed)}" if at_least else f"needs about {format_bytes(needed)}"
        else:
            need = "could not be written"
        have = f" and {format_bytes(free)} are free" if free is not None else ""
        self.message = (f"the disk is full: {what or str(path)} {need}{have} (on the disk holding "
                        f"{os.path.dirname(str(path)) or '.'}). Nothing was half-written; "
                        f"{advice or 'free some space (or write elsewhere) and run the command again'}")

    def __str__(self) -> str:
        return self.message


def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB': sizes in the units a person reads."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # not reached


def is_environment_fault(error: BaseException) -> bool:
    """Whether `error` is the machine's fault (exit code 1), not the input's."""
    return isinstance(error, DiskFullError) or (isinstance(error, OSError)
                                                and error.errno in ENVIRONMENT_ERRNOS)


def describe(error: BaseException) -> str:
    """The one-line answer to a user's or the machine's fault (an OSError rephrased with its path
    and what to do; our own errors already say it)."""
    if isinstance(error, DiskFullError) or not isinstance(error, OSError) or error.errno is None:
        return str(error)
    path = error.filename if error.filename is not None else "a file"
    if error.filename2 is not None:
        path = f"{path} -> {error.filename2}"
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"{path}: no space left on the disk ({error.strerror}). Nothing was half-written; free some space "
                f"(or write elsewhere) and run the command again")
    if code == errno.EROFS:
        return (f"cannot write {path}: it is on a read-only file system. Choose an output on a writable disk "
                f"(the command's --out, --json or --predictions)")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path} ({error.strerror}); check its owner and mode, or choose another path"
    if code in (errno.EMFILE, errno.ENFILE):
        return f"{path}: too many open files ({error.strerror}); raise the limit (ulimit -n) or use fewer --workers"
    return f"{path}: {error.strerror}"


def exit_code(error: BaseException) -> int | None:
    """2 for bad input, 1 for an environment fault, None for a bug (keeps its traceback)."""
    if isinstance(error, InputError):
        return EXIT_INPUT
    if isinstance(error, OSError):
        return EXIT_ENVIRONMENT if is_environment_fault(error) else EXIT_INPUT
    return None


def run_command(prog: str, body: Callable[[], int | None],
                codes: Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = ()) -> int:
    """Run a command's `body()` (its exit status, None for 0). A user's or the machine's fault
    is printed as one `prog: error: ...` message on stderr and answered with its exit code;
    `codes` lists a command's own (exception types, exit code) first, e.g. a training failure's
    1. Anything else is a bug: it propagates with its traceback."""
    try:
        return int(body() or 0)
    except Exception as error:  # noqa: BLE001 -- classified below; the rest is re-raised
        code = next((c for kinds, c in codes if isinstance(error, kinds)), None)
        if code is None:
            code = exit_code(error)
        if code is None:
            raise
        print(f"{prog}: error: {describe(error)}", file=sys.stderr, flush=True)
        return code
