"""The test environment itself: a child interpreter made the way the export test makes one
(conftest.make_child_venv) imports torch and m2dino from the same places as this one, whether
the suite runs in a venv, a conda env or the system Python."""
import json
import os
import subprocess
import sys

import torch

import m2dino

PROBE = "import json, m2dino, torch; print(json.dumps({'torch': torch.__file__, 'm2dino': m2dino.__file__}))"


def test_child_venv_sees_the_parents_torch_and_m2dino(tmp_path, child_venv):
    python = child_venv(tmp_path / "venv")
    assert python.exists() and os.path.realpath(python) != os.path.realpath(tmp_path)
    proc = subprocess.run([str(python), "-c", PROBE], cwd=os.getcwd(), env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child == {"torch": torch.__file__, "m2dino": m2dino.__file__}
    # and it is a separate environment: its prefix is the new venv, not this interpreter's
    prefix = subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True, timeout=60).stdout.strip()
    assert os.path.samefile(prefix, tmp_path / "venv") and not os.path.samefile(prefix, sys.prefix)
