"""The command line: write a synthetic suite into a new or empty folder.

    python -m m2dino.data.synthetic --out DIR [--scale 0.06] [--seed 0] [--tasks ID ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import m2dino.data.synthetic as synthetic
from m2dino.data.synthetic.suite import DEFAULT_SCALE, DEFAULT_SEED, MIN_TRAIN, MIN_VAL, write_suite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2dino.data.synthetic", description=synthetic.__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (train/ and val/ go inside)")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                   help=f"the largest task's share of its real size; smaller tasks shrink less (see suite.py) "
                        f"(default {DEFAULT_SCALE})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--min-train", type=int, default=None,
                   help=f"training minimum per task (default {MIN_TRAIN})")
    p.add_argument("--min-val", type=int, default=MIN_VAL)
    p.add_argument("--tasks", nargs="*", default=None, help="only these task ids")
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"--out {out} exists and is not empty")
    s = write_suite(out, a.scale, a.seed, tasks=a.tasks, min_train=a.min_train, min_val=a.min_val, workers=a.workers)
    print(f"wrote {s['total_train']} train + {s['total_val']} val images for {len(s['sizes'])} tasks "
          f"to {out} in {s['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
