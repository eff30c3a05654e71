"""`python -m m2dino.affinity --data ROOT [--config R] [--steps N] [--num-groups K] [--out DIR]`:
which of my tasks should train together? The short probe alone, for a user with new data.

It trains the first N steps of the AU model of the run that --config (else the default preset
and recipe) describes, with that run's learning-rate schedule, and measures inter-task
affinity after each of them (m2dino.training.affinity: lookahead affinity and gradient
cosine on the shared backbone). Then it prints the lookahead matrix, chooses K groups that
maximise the affinity onto each task from its group (m2dino.evaluation.grouping), says how
stable that choice is under bootstrap resamples of the measured steps, and writes into DIR:
affinity.json, affinity.png (the heatmap), grouping.json (the groups, their score and
confidence) and the groups file groups.yaml, which `python -m m2dino.train --groups` reads.
The probe's short model is trained in a temporary folder and not kept.

An existing output file is never replaced unless --overwrite is given, and then it is moved
aside (NAME.old-<timestamp>), never deleted; the check runs before any training.

The command line is parsed before torch is imported: --help answers at once."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from m2dino.paradigms import AFFINITY_PROBE_STEPS, GROUPING_FILE, GROUPS_FILE
from m2dino.paradigms import GROUPING_MEASURE as MEASURE
from m2dino.predict import positive_int

PROG = "m2dino.affinity"
DEFAULT_STEPS = AFFINITY_PROBE_STEPS
DEFAULT_RESAMPLES = 50
HEATMAP_FILE = "affinity.png"

EXAMPLES = """examples:
  python -m m2dino.affinity --data /data/FM_UIA --out affinity/
  python -m m2dino.affinity --data synthetic --steps 60 --num-groups 5 --out affinity/
  python -m m2dino.train --data /data/FM_UIA --paradigm cg --groups affinity/groups.yaml
docs: docs/study.md ("Which tasks should I train together?")"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="FM_UIA root (csv_files/ inside, or train/ and val/), or "
                                                      "'synthetic'")
    parser.add_argument("--config", help="a training recipe (YAML path or shipped recipe name): the model, "
                                         "schedule and data options of the run whose first steps are probed "
                                         "(default: the default preset and recipe)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help=f"training steps probed, each measured (default: {DEFAULT_STEPS}); a measured step "
                             f"costs several training steps (docs/study.md)")
    parser.add_argument("--num-groups", type=positive_int, default=None,
                        help="how many groups (default: as many as the clinical groups of the tasks)")
    parser.add_argument("--out", default="affinity", help="folder of the outputs (default: ./affinity)")
    parser.add_argument("--resamples", type=positive_int, default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples of the measured steps for the confidence (default: "
                             f"{DEFAULT_RESAMPLES})")
    parser.add_argument("--overwrite", action="store_true",
                        help="move existing output files aside (NAME.old-<timestamp>) instead of stopping; "
                             "nothing is deleted")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from m2dino.errors import run_command

    return run_command(PROG, lambda: probe_command(args))


def probe_config(args):
    """The TrainConfig of the probed run: --config's (or the defaults) with --data, AU."""
    from m2dino.training.config import find_config, load_yaml_config, resolve

    layers = [load_yaml_config(find_config(args.config))] if args.config else []
    return resolve(layers + [{"data": args.data, "paradigm": "au", "progress": False, "resume": False}])


def outputs(out: Path) -> dict[str, Path]:
    from m2dino.evaluation.affinity import AFFINITY_FILE

    return {name: out / name for name in (AFFINITY_FILE, HEATMAP_FILE, GROUPING_FILE, GROUPS_FILE)}


def clear_outputs(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse (InputError naming the files) where an output exists, unless `overwrite`: then
    move them aside."""
    from m2dino import io
    from m2dino.errors import InputError

    existing = [p for p in paths.values() if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise InputError(f"{', '.join(map(str, existing))} exist(s): not overwriting (pass --overwrite to move "
                         f"them aside and write new ones)")
    for path in existing:
        io.move_aside(path)


def probe_command(args) -> None:
    import tempfile
    import time

    from m2dino.errors import InputError
    from m2dino.evaluation.affinity import AFFINITY_FILE, write_affinity
    from m2dino.evaluation.grouping import group_and_write
    from m2dino.evaluation.report.affinity import format_matrix, format_recommendation, plot_heatmap
    from m2dino.io import lock_directory
    from m2dino.tasks import apply_groups, load_groups
    from m2dino.training import distributed as dist_utils
    from m2dino.training.ag import run_probe
    from m2dino.training.rundir import check_inputs_outside
    from m2dino.training.study import check_start, load_data

    config = probe_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: not a folder")
    check_inputs_outside(config, out, overwrite=False)  # the outputs never land in the data
    paths = outputs(out)
    clear_outputs(paths, args.overwrite)  # before anything runs: a refusal costs nothing
    checked = check_start(config)
    clinical = load_groups(config.groups)
    with tempfile.TemporaryDirectory(prefix="m2dino-affinity-") as scratch:
        _, data = load_data(config, Path(scratch), checked.data_root)
        specs = apply_groups(sorted(data.tasks.values(), key=lambda s: s.task_id), clinical)
        n = len(specs)
        k = args.num_groups or len({s.group for s in specs})
        if not 1 <= k <= n:
            raise InputError(f"--num-groups {k}: must be at most the number of tasks ({n})")
        if n < 2:
            raise InputError(f"{checked.data_root}: one task only ({specs[0].task_id}): nothing to group")
        t0 = time.perf_counter()
        probe = run_probe(config, specs, data, Path(scratch), args.steps, dist_utils.resolve_device(config.device))
        seconds = time.perf_counter() - t0
    record = probe.accumulator.record({**probe.how(), "run_seconds": round(seconds, 1)})
    if len(record.steps) < 2:
        raise InputError(f"only {len(record.steps)} step(s) could be measured (non-finite losses?): "
                         f"the probe needs at least 2; try more --steps")
    with lock_directory(out, PROG):  # one writer; a copy that finished meanwhile is checked for again
        clear_outputs(paths, args.overwrite)
        write_affinity(paths[AFFINITY_FILE], record)
        plot_heatmap(record, paths[HEATMAP_FILE], MEASURE)
        grouping, confidence, groups = group_and_write(record, k, MEASURE, paths[GROUPING_FILE],
                                                       paths[GROUPS_FILE], args.resamples)
    reference = {g: [s.task_id for s in specs if s.group == g] for g in sorted({s.group for s in specs})}
    print(format_matrix(record, MEASURE))
    print(f"\n{len(record.steps)} steps measured in {seconds:.1f} s (probe {probe.seconds:.1f} s of it)\n")
    print(format_recommendation(groups, grouping, confidence, reference=reference))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    print(f"next: python -m m2dino.train --data {args.data} --paradigm cg --groups {paths[GROUPS_FILE]}")


if __name__ == "__main__":
    raise SystemExit(main())
