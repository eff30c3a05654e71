"""m2dino.errors and the safe half of m2dino.io: which fault gets which exit code and message, a
full disk that names what was needed and leaves nothing behind, JSON that cannot hang or
recurse, and one writer per folder held by an flock the kernel releases."""
import errno
import json
import os
import signal
from pathlib import Path

import pytest
from locks import hold_lock

from m2dino import io
from m2dino.errors import (
    DirectoryBusyError,
    DiskFullError,
    InputError,
    describe,
    exit_code,
    format_bytes,
    run_command,
)

ROOT = Path(__file__).resolve().parents[1]


def raising(error):
    def body():
        raise error
    return body


@pytest.mark.parametrize("error, code, words", [
    (InputError("data.csv row 3: label 9 out of range"), 2, "data.csv row 3"),
    (FileNotFoundError("data root /x does not exist"), 2, "/x does not exist"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), 1, "cannot write /ro/out: it is on a read-only"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, "permission denied: /root/x"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/x.json"), 1, "/full/x.json: no space left"),
    (DiskFullError("/full/ckpt", 3 << 30, 1 << 20, what="the checkpoint"), 1, "needs about 3.0 GiB"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "/a" * 200), 2, "File name too long"),
])
def test_each_fault_gets_its_exit_code_and_one_line(error, code, words, capsys):
    assert run_command("prog", raising(error)) == code
    err = capsys.readouterr().err
    assert err.startswith("prog: error: ") and words in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_codes_come_first(capsys):
    with pytest.raises(KeyError):
        run_command("prog", raising(KeyError("a bug")))
    with pytest.raises(ZeroDivisionError):
        run_command("prog", lambda: 1 / 0)
    assert run_command("prog", raising(ValueError("x")), codes=[(ValueError, 1)]) == 1
    assert run_command("prog", raising(InputError("x")), codes=[(InputError, 2), (ValueError, 1)]) == 2
    assert run_command("prog", lambda: None) == 0 and run_command("prog", lambda: 1) == 1
    assert exit_code(KeyboardInterrupt()) is None
    capsys.readouterr()


def test_disk_full_names_what_was_needed_and_what_is_free():
    error = DiskFullError("/data/run/au/all/last", needed=1536 * 1024 ** 2, free=200 * 1024 ** 2,
                          what="the training checkpoint /data/run/au/all/last", advice="continue with --resume")
    text = describe(error)
    assert "the disk is full" in text and "needs about 1.5 GiB" in text and "200.0 MiB are free" in text
    assert "continue with --resume" in text and error.errno == errno.ENOSPC
    assert format_bytes(512) == "512 B" and format_bytes(2048) == "2.0 KiB"


def test_atomic_write_on_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    io.write_json(target, {"old": 1})

    def fill_up(tmp):
        tmp.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        io.atomic_write(target, fill_up, size=5000)
    assert "needs about 4.9 KiB" in str(info.value) and str(target) in str(info.value)
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_writer_that_hides_enospc_is_judged_by_the_space_left(tmp_path, monkeypatch):
    """torch.save's zip writer says 'unexpected pos', not ENOSPC: with no space left it is a full disk."""
    def torch_like(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # space left: a RuntimeError stays what it is
        io.atomic_write(tmp_path / "a.pt", torch_like)
    monkeypatch.setattr(io, "free_space", lambda folder: 4096)
    with pytest.raises(DiskFullError, match="4.0 KiB are free"):
        io.atomic_write(tmp_path / "a.pt", torch_like)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
    (b"[" * 100_000, "nested more than"),
    (b"[" * 80 + b"]" * 80, "nested more than"),
    (b'{"a": ', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
])
def test_read_json_names_the_file_and_never_recurses(tmp_path, content, words):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=words) as info:
        io.read_json(path)
    assert str(path) in str(info.value)
    if words == "expected a JSON object":
        assert io.read_json(path, expect=None) == [1, 2]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "eval.json"
    os.mkfifo(fifo)
    signal.alarm(10)  # a blocking open would hang here; the alarm fails the test instead
    try:
        with pytest.raises(InputError, match="FIFO"):
            io.read_json(fifo)
        assert io.file_kind(fifo) == "a FIFO (named pipe)"
    finally:
        signal.alarm(0)
    assert io.file_kind(tmp_path) == "a folder" and io.file_kind(tmp_path / "no") == "missing"
    assert "NUL" in io.file_kind("a\0b") and "too long" in io.file_kind(tmp_path / ("x" * 300))


def test_one_writer_per_folder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "out"
    holder = hold_lock(folder)
    try:
        with pytest.raises(DirectoryBusyError) as info:
            io.lock_directory(folder, "a second writer")
        message = str(info.value)
        assert str(folder) in message and f"pid {holder.pid}" in message and "a test holder" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (folder / io.LOCK_FILE).exists()  # the killed holder's file stays; its lock does not
    with io.lock_directory(folder, "after the kill") as lock:
        assert f"pid {os.getpid()}" in (folder / io.LOCK_FILE).read_text()
        with io.lock_directory(folder, "nested") as again:  # the same process: the same lock
            assert again is lock
        assert (folder / io.LOCK_FILE).exists()
    assert not (folder / io.LOCK_FILE).exists()  # released: removed


def test_a_lock_leaves_no_folder_it_made_for_nothing(tmp_path):
    with io.lock_directory(tmp_path / "a" / "b", "x"):
        assert (tmp_path / "a" / "b").is_dir()
    assert not (tmp_path / "a" / "b").exists()
    with io.lock_directory(tmp_path / "c", "x"):
        (tmp_path / "c" / "kept.txt").write_text("written under the lock")
    assert (tmp_path / "c" / "kept.txt").is_file() and not (tmp_path / "c" / io.LOCK_FILE).exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        io.lock_directory(tmp_path / "file", "x")


def test_a_folder_moved_aside_under_its_lock_keeps_no_lock_file(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    with io.lock_directory(folder, "x"):
        moved = io.move_aside(folder)
    assert sorted(p.name for p in moved.iterdir()) == ["mine.txt"] and not folder.exists()
