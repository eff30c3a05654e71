"""`python -m m2dino.export` writes over none of its inputs, one export per folder at a time, and
answers a read-only or full disk with one line (exit 1), leaving nothing half-written."""
import hashlib
import signal

import pytest
from faults import disk_full, read_only
from test_errors import hold_lock
from test_export import trained  # noqa: F401 (the module's fixture)

from m2dino import export as export_cli


def export(checkpoint, out, wheel, *extra):
    return export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--wheel", str(wheel), *extra])


def checksums(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_writes_over_none_of_its_inputs(trained, tmp_path, capsys):  # noqa: F811
    suite, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    run_dir = checkpoint.parent
    before = checksums(run_dir)
    for out, words in ((run_dir, "lies inside the output folder"), (run_dir.parent, "lies inside the output folder"),
                       (suite / "val" / "entry", "overlap"), (suite, "overlap")):
        assert export(checkpoint, out, wheel, "--force", "--measure", str(suite / "val")) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (out, err)
    assert checksums(run_dir) == before and not (suite / "val" / "entry").exists()


def test_one_export_per_folder(trained, tmp_path, capsys):  # noqa: F811
    _, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    out = tmp_path / "entry"
    holder = hold_lock(out)
    try:
        assert export(checkpoint, out, wheel, "--no-measure") == 2
        assert f"is being written by another process (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert [p.name for p in out.iterdir()] == [".m2dino.lock"]
    assert export(checkpoint, out, wheel, "--no-measure") == 0  # the killed holder's lock went with it
    assert (out / "model.py").is_file() and not (out / ".m2dino.lock").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".entry.")]


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_export_on_a_read_only_or_full_disk(trained, tmp_path, monkeypatch, capsys, fault):  # noqa: F811
    _, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    disk = tmp_path / "disk"
    (read_only if fault == "read-only" else disk_full)(monkeypatch, disk)
    assert export(checkpoint, disk / "entry", wheel, "--no-measure") == 1
    err = capsys.readouterr().err
    words = "read-only file system" if fault == "read-only" else "the disk is full"
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    monkeypatch.undo()
    assert not disk.exists() or not any(disk.rglob("*"))  # nothing half-written, no staging left

