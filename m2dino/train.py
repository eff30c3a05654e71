"""`python -m m2dino.train [options]`: the TS / CG / AU study (m2dino.training.study), with the
options of m2dino.training.config. With no arguments: the embedded default run.

The command line is parsed and checked before torch is imported: --help and a bad option
answer at once."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from m2dino.training.config import describe_model, parse_command


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, run_options, given = parse_command(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 2
    return _train(config, run_options, given, demo=not argv)


def _train(config, run_options: dict, given: set[str], demo: bool) -> int:
    from m2dino.training import distributed
    from m2dino.training.checkpoint import CheckpointError
    from m2dino.training.plan import PLAN_OPTIONS, PlanError, PlanOptions, dry_run
    from m2dino.training.rundir import RunDirError, prepare_run_dir
    from m2dino.training.study import preflight, run
    from m2dino.training.trainer import TrainingError

    try:
        plan_options = PlanOptions(**{k: v for k, v in run_options.items() if k in PLAN_OPTIONS}).validate()
    except (ValueError, FileNotFoundError) as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 2
    overwrite, planning = run_options.get("overwrite", False), run_options.get("dry_run", False)
    try:  # what the run needs (the output directory, the weights, the data) before anything is written
        checked = preflight(config, given, overwrite=overwrite, demo=demo)
    except RunDirError as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 1
    if planning:
        try:
            dry_run(checked, plan_options)
        except (PlanError, ValueError, FileNotFoundError) as e:
            print(f"m2dino.train: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        config = prepare_run_dir(config, given, overwrite=overwrite, demo=demo)
    except (RunDirError, ValueError, FileNotFoundError) as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 2
    if distributed.local_rank() == 0 and os.environ.get("RANK", "0") == "0":
        print(f"m2dino.train: model {describe_model(config.model)}; saved in full as {config.out}/config.yaml",
              flush=True)
    try:
        run(config, checked)
    except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        # DataValidationError is a ValueError: it lists every bad row with its csv and row
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
