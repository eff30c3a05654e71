"""Another process holding a folder's writer lock (m2dino.io.lock_directory), for the tests of
what a second writer sees."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOLD = textwrap.dedent("""
    import sys, time
    from m2dino import io
    lock = io.lock_directory(sys.argv[1], "a test holder")
    print("locked", flush=True)
    time.sleep(120)
""")


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process holding `folder`'s writer lock (killed by the caller)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc
