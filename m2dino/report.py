"""`python -m m2dino.report RUN_DIR... --out DIR`: the TS / CG / AU transfer report of one or more
run directories (m2dino.evaluation.report): report.md, report.csv, report.json and plots.

The command line is parsed before the report's libraries are imported: --help answers at once."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

DEFAULT_NEGATIVE_THRESHOLD = 0.05  # m2dino.evaluation.report's (a test holds them equal)
EXAMPLES = """examples:
  python -m m2dino.report runs/default --out runs/default/report
  python -m m2dino.report runs/s/seed-0 runs/s/seed-1 runs/s/seed-2 --out runs/s/report    several seeds, pooled
docs: docs/study.md"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.report", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by m2dino.train")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv, report.json and plots")
    parser.add_argument("--scale-threshold", type=float, default=None,
                        metavar="N", help="training size from which a task counts as data-rich (default: the median)")
    parser.add_argument("--negative-threshold", type=float, default=DEFAULT_NEGATIVE_THRESHOLD, metavar="T",
                        help="flag negative (positive) transfer when the primary-metric change vs TS is below minus "
                             "this (above it) and its interval excludes 0 (default: 0.05 = 5%%)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples of the validation images for the 95%% intervals "
                             "(0: none; default: 1000)")
    args = parser.parse_args(argv)
    import yaml

    from m2dino.errors import run_command
    from m2dino.evaluation.report import generate_report, render_markdown

    def body() -> None:
        report = generate_report(args.run_dirs, args.out, args.scale_threshold, args.negative_threshold,
                                 args.bootstrap)
        print(render_markdown(report))
        print(f"report written to {Path(args.out) / 'report.md'}")

    # a run directory's files that are not what the report reads: bad input, named
    return run_command("m2dino.report", body, codes=[((FileNotFoundError, ValueError, yaml.YAMLError), 2)])

if __name__ == "__main__":
    raise SystemExit(main())
