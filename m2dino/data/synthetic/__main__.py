"""The command line: write a synthetic suite into a new or empty folder.

    python -m m2dino.data.synthetic --out DIR [--scale 0.06] [--seed 0] [--tasks ID ...]

The command line is parsed before the image libraries are imported: --help answers at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import m2dino.data.synthetic as synthetic

# suite.py's defaults, spelled here so that --help does not import the generators (a test holds
# them equal). Training's --synthetic-scale defaults to 0.03: the default run's suite is half this.
DEFAULT_SCALE = 0.06
DEFAULT_SEED = 0
MIN_TRAIN = 16
MIN_VAL = 100
EXAMPLES = """examples:
  python -m m2dino.data.synthetic --out /tmp/synthetic                    the 27 tasks at scale 0.06
  python -m m2dino.data.synthetic --out /tmp/small --scale 0.03 --tasks fetal_head,IUGC breast_3cls
  python -m m2dino.data.check /tmp/synthetic/train                        check it like real data
docs: docs/data.md"""


def _tasks(values) -> list[str] | None:
    items = [t.strip() for v in values or () for t in v.split(",") if t.strip()]
    return items or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m2dino.data.synthetic",
                                description=synthetic.__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (train/ and val/ go inside); must be new or empty")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help="the largest task's share of its real size; smaller tasks shrink less (see suite.py). "
                        "Training's --synthetic-scale defaults to 0.03 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="seed of every image and label (default: %(default)s)")
    p.add_argument("--min-train", type=int, default=None,
                   help=f"training images per task at least (default: {MIN_TRAIN})")
    p.add_argument("--min-val", type=int, default=MIN_VAL, help="validation images per task at least "
                                                                "(default: %(default)s)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", default=None,
                   help="only these task ids, space or comma separated (default: all 27)")
    p.add_argument("--workers", type=int, default=None, help="processes drawing images (default: up to 2)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.scale > 0:
        p.error(f"--scale must be > 0, got {a.scale}")
    tasks = _tasks(a.tasks)
    from m2dino.tasks import TASKS

    unknown = sorted(set(tasks or ()) - set(TASKS))
    if unknown:
        p.error(f"--tasks: unknown task id(s) {unknown}; known: {', '.join(sorted(TASKS))}")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} exists and is not empty")
    from m2dino.data.synthetic.suite import write_suite

    s = write_suite(out, a.scale, a.seed, tasks=tasks, min_train=a.min_train, min_val=a.min_val, workers=a.workers)
    print(f"wrote {s['total_train']} train + {s['total_val']} val images for {len(s['sizes'])} tasks "
          f"to {out} in {s['seconds']} s; the transfer design is {out / s['design']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
