"""Validate an FM_UIA data root before training.

    python -m m2dino.data.check ROOT [--json] [--no-decode]

Prints the rows per task and every problem (csv file, 0-based data row, what is wrong).
Exit code 0 only when the data are clean, 1 when there are problems, 2 when ROOT is not a data
root (and 1 for a fault of the machine, a permission say, with one line naming the path).
`--json` prints {"tasks": {task_id: rows}, "problems": [{"csv", "row", "problem"}]} instead.
"""
from __future__ import annotations

import argparse
import json

from m2dino.data.reader import csv_num_classes
from m2dino.data.roots import resolve_data_root
from m2dino.data.validate import scan_dataset
from m2dino.errors import run_command


def check(root, decode: bool = True):
    """(the JSON-ready dict the CLI prints with --json, the full Scan)."""
    scan = scan_dataset(root, decode=decode)
    return {"tasks": scan.task_counts(), "problems": [p.to_dict() for p in scan.problems]}, scan


EXAMPLES = """examples:
  python -m m2dino.data.check /data/FM_UIA            per-task counts and every problem; exit 0 only when clean
  python -m m2dino.data.check /data/FM_UIA --json     {"tasks": {task_id: rows}, "problems": [...]}
docs: docs/data.md"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.data.check", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="data root (with csv_files/, or with train/ and val/), or 'synthetic': the "
                                     "default run's synthetic suite")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: {\"tasks\": {task_id: rows}, \"problems\": [{csv, row, problem}]}")
    parser.add_argument("--no-decode", action="store_true",
                        help="skip decoding images and masks (fast; misses corrupt files and size checks)")
    args = parser.parse_args(argv)
    return run_command("m2dino.data.check", lambda: _report(args))


def _report(args) -> int:
    """Print the check's result (text or --json); 1 when there are problems, else 0."""
    args.root = resolve_data_root(args.root)
    result, scan = check(args.root, decode=not args.no_decode)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        clean = scan.task_counts(clean=True)
        print(f"{args.root}: {len(scan.csv_files)} csv file(s), {sum(result['tasks'].values())} rows, "
              f"{len(result['tasks'])} task(s)")
        for tid, n in result["tasks"].items():
            spec = scan.tasks.get(tid)
            kind = f"{spec.task_type}, {csv_num_classes(spec)}" if spec else "undefined task"
            print(f"  {tid:<26} {n:>6} rows  {clean.get(tid, 0):>6} clean  ({kind})")
        if result["problems"]:
            print(f"{len(result['problems'])} problem(s):")
            for p in scan.problems:
                print(f"  {p}")
        else:
            print("no problems found")
    return 1 if result["problems"] else 0

if __name__ == "__main__":
    raise SystemExit(main())
