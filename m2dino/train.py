"""`python -m m2dino.train [options]`: the TS / CG / AU study (m2dino.training.study), with the
options of m2dino.training.config. With no arguments: the embedded default run.

The command line is parsed and checked before torch is imported: --help and a bad option
answer at once."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from m2dino.training.config import describe_model, parse_command

PROG = "m2dino.train"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, run_options, given = parse_command(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 2
    return _train(config, run_options, given, demo=not argv)


def _train(config, run_options: dict, given: set[str], demo: bool) -> int:
    from m2dino.errors import InputError, run_command
    from m2dino.training import distributed
    from m2dino.training.checkpoint import CheckpointError
    from m2dino.training.plan import PLAN_OPTIONS, PlanError, PlanOptions, dry_run
    from m2dino.training.rundir import prepare_run_dir, run_dir_lock
    from m2dino.training.study import preflight, run
    from m2dino.training.trainer import TrainingError

    try:
        plan_options = PlanOptions(**{k: v for k, v in run_options.items() if k in PLAN_OPTIONS}).validate()
    except (ValueError, FileNotFoundError) as e:
        print(f"m2dino.train: error: {e}", file=sys.stderr)
        return 2
    overwrite = run_options.get("overwrite", False)
    # bad input (the run directory, the weights, the data, a checkpoint's files): 2; the run
    # failing once it started: 1. DataValidationError lists every bad row with its csv and row.
    codes = [(InputError, 2), ((TrainingError, CheckpointError, PlanError, ValueError, FileNotFoundError), 1)]
    if run_options.get("dry_run"):
        def plan() -> None:
            dry_run(preflight(config, given, overwrite=overwrite, demo=demo), plan_options)
        return run_command(PROG, plan, codes=codes)

    def study() -> None:
        # what the run needs (the output directory, the weights, the data), checked before
        # anything is written: refusals write nothing, not even OUT
        checked = preflight(config, given, overwrite=overwrite, demo=demo)
        # then OUT's writer lock, from the decision (checked again under it) to the run's end: no
        # other run can start, finish or write in it meanwhile
        with run_dir_lock(config.out):
            prepared = prepare_run_dir(config, given, overwrite=overwrite, demo=demo)
            if distributed.local_rank() == 0 and os.environ.get("RANK", "0") == "0":
                print(f"m2dino.train: model {describe_model(prepared.model)}; saved in full as "
                      f"{prepared.out}/config.yaml", flush=True)
            run(prepared, checked)

    try:
        return run_command(PROG, study, codes=codes)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
