"""`python -m m2dino.report RUN_DIR... --out DIR`: the TS / CG / AU transfer report of one or more
run directories (m2dino.evaluation.report): report.md, report.csv, report.json and plots.

The command line is parsed before the report's libraries are imported: --help answers at once."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from m2dino.paradigms import CORRECTIONS, DEFAULT_CORRECTION

# m2dino.evaluation.report's defaults, spelled here so that --help needs no import (a test holds them equal)
DEFAULT_NEGATIVE_THRESHOLD = 0.05
DEFAULT_MARGINS = {"dice": 0.02, "iou": 0.02, "f1_macro": 0.02, "mre": 1.0, "hd": 1.0}
EXAMPLES = """examples:
  python -m m2dino.report runs/default --out runs/default/report
  python -m m2dino.report runs/s/seed-0 runs/s/seed-1 runs/s/seed-2 --out runs/s/report    several seeds, pooled
  python -m m2dino.report runs/s --out runs/s/report            the same: a folder of seed-N run directories
  python -m m2dino.report runs/s --out runs/s/holm --correction holm --non-inferiority-margin dice=0.05
docs: docs/study.md"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.report", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by m2dino.train")
    parser.add_argument("--out", required=True,
                        help="folder for report.md, report.csv, report.json and plots (other files there are kept)")
    parser.add_argument("--scale-threshold", type=float, default=None,
                        metavar="N", help="training size from which a task counts as data-rich (default: the median)")
    parser.add_argument("--negative-threshold", type=float, default=DEFAULT_NEGATIVE_THRESHOLD, metavar="T",
                        help="flag negative (positive) transfer when the primary-metric change vs TS is below minus "
                             "this (above it) and its interval excludes 0 (default: 0.05 = 5%%)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the validation images for the 95%% intervals "
                             "(0: none; default: 1000)")
    parser.add_argument("--correction", choices=CORRECTIONS, default=DEFAULT_CORRECTION,
                        help="multiplicity correction over every per-task test (and, separately, over the tests over "
                             "tasks): bh = Benjamini-Hochberg (false discovery rate), holm = Holm (family-wise "
                             f"error rate), none (default: {DEFAULT_CORRECTION})")
    parser.add_argument("--non-inferiority-margin", type=_margins, default={}, metavar="METRIC=M,...",
                        help="non-inferiority margins in the metric's units (pixels for mre and hd), e.g. "
                             "dice=0.05,mre=2 (default: " + ",".join(f"{k}={v:g}" for k, v in DEFAULT_MARGINS.items())
                             + ")")
    parser.add_argument("--overwrite", action="store_true",
                        help="move --out aside (to OUT.old-<timestamp>) when it holds files at the report's names "
                             "that no m2dino report wrote; nothing is deleted")
    args = parser.parse_args(argv)
    import yaml

    from m2dino.errors import run_command
    from m2dino.evaluation.report import generate_report, render_markdown

    def body() -> None:
        report = generate_report(args.run_dirs, args.out, args.scale_threshold, args.negative_threshold,
                                 args.bootstrap, correction=args.correction, margins=args.non_inferiority_margin,
                                 overwrite=args.overwrite)
        print(render_markdown(report))
        print(f"report written to {Path(args.out) / 'report.md'}")

    # a run directory's files that are not what the report reads: bad input, named
    return run_command("m2dino.report", body, codes=[((FileNotFoundError, ValueError, yaml.YAMLError), 2)])

def _margins(text: str) -> dict[str, float]:
    """'dice=0.05,mre=2' -> {"dice": 0.05, "mre": 2.0}."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        metric, _, value = item.partition("=")
        if metric not in DEFAULT_MARGINS:
            raise argparse.ArgumentTypeError(f"unknown metric {metric!r} in {item!r}; one of {sorted(DEFAULT_MARGINS)}")
        try:
            out[metric] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected METRIC=NUMBER, e.g. dice=0.05") from None
        if not out[metric] >= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a margin must be >= 0")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
