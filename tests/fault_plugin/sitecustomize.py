"""Faults for the tests' child processes (`python -m m2dino.train`, torchrun's ranks, the fork
server of --jobs workers): put this folder on a child's PYTHONPATH with `faults.child_env`.

Python imports `sitecustomize` at start-up; this one patches m2dino right after the modules
concerned are imported (nothing is imported early), as the test's environment asks:
- M2DINO_TEST_CRASH_RANK_AT_STEP="RANK:STEP": that rank exits (os._exit(1)) after training step
  STEP, on torchrun's first attempt only, through a step callback of every ModelTrainer;
- M2DINO_TEST_CHECKPOINT_SLEEP=SECONDS: every training checkpoint write sleeps that long after
  the weights and before the training state, so a test can kill a run mid-write.
The variables are the tests' own: production code reads neither."""
import importlib.abc
import importlib.util
import os
import sys

CRASH = "M2DINO_TEST_CRASH_RANK_AT_STEP"
SLOW_CHECKPOINT = "M2DINO_TEST_CHECKPOINT_SLEEP"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` once `name` has been imported."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        execute, patch = spec.loader.exec_module, self.patch

        def exec_module(module):
            execute(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec


def _crash_after_step(trainer_module):
    crash_rank, crash_step = (int(v) for v in os.environ[CRASH].split(":"))
    init = trainer_module.ModelTrainer.__init__

    def crash(event):
        if (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
                and int(os.environ.get("RANK", "0")) == crash_rank and event.step == crash_step):
            os._exit(1)

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.step_callbacks.append(crash)
    trainer_module.ModelTrainer.__init__ = __init__


def _slow_checkpoint(checkpoint_module):
    import time

    seconds = float(os.environ[SLOW_CHECKPOINT])
    save_model = checkpoint_module.save_model

    def slow_save_model(*args, **kwargs):
        result = save_model(*args, **kwargs)
        time.sleep(seconds)
        return result
    checkpoint_module.save_model = slow_save_model


if os.environ.get(CRASH):
    sys.meta_path.insert(0, _AfterImport("m2dino.training.trainer", _crash_after_step))
if float(os.environ.get(SLOW_CHECKPOINT) or 0) > 0:
    sys.meta_path.insert(0, _AfterImport("m2dino.training.checkpoint", _slow_checkpoint))
