"""`python -m m2dino.evaluate --data-root ROOT --predictions DIR [--json FILE]`: score a prediction
folder exactly as the FM_UIA challenge's evaluator does (m2dino.evaluation.evaluate); with
`--checkpoint CKPT` it first predicts into DIR (a temporary folder when --predictions is left
out) and scores the model's tasks.

The command line is parsed before torch is imported: --help answers at once."""
from __future__ import annotations

import argparse
import tempfile
from typing import Sequence

from m2dino.predict import add_tasks_option, positive_int, task_list

EXAMPLES = """examples:
  python -m m2dino.evaluate --data-root /data/FM_UIA --predictions submission/ --json scores.json
  python -m m2dino.evaluate --data-root /data/FM_UIA --checkpoint runs/default/au/all/best.safetensors
docs: docs/export.md"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m2dino.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    score = parser.add_argument_group("scoring")
    score.add_argument("--data-root", required=True,
                       help="FM_UIA root (csv_files/ inside, or train/ and val/), or 'synthetic': the synthetic suite "
                            "of the run the checkpoint or predictions come from (else the default run's)")
    score.add_argument("--predictions",
                       help="prediction folder (the submission format); with --checkpoint, where to write it")
    score.add_argument("--json", help="also write the results to this JSON file")
    score.add_argument("--split", help="sub-folder of --data-root to score (default: the root itself, else val/)")
    add_tasks_option(score, "task ids to score (default: every task in the CSVs, or the checkpoint's tasks with "
                            "--checkpoint)")
    predict = parser.add_argument_group("predicting first (with --checkpoint)")
    predict.add_argument("--checkpoint", help="predict with this checkpoint first, then score its tasks")
    predict.add_argument("--batch-size", type=positive_int, default=16, help="prediction batch size (default: 16)")
    predict.add_argument("--device", default=None, help="prediction device (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true",
                        help="move aside (to NAME.old-<timestamp>) a --json file, or a --predictions folder to "
                             "predict into, that holds files m2dino did not write; nothing is deleted")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.predictions):
        parser.error("--predictions is required without --checkpoint")
    from m2dino import io
    from m2dino.data import resolve_data_root
    from m2dino.errors import run_command
    from m2dino.evaluation.evaluate import check_results_path, evaluate_folder, format_results, write_json
    from m2dino.evaluation.predict import predict_folder

    def body() -> None:
        tasks = task_list(args.tasks)
        args.data_root = resolve_data_root(args.data_root, near=args.checkpoint or args.predictions)
        move_json = args.json and check_results_path(args.json, args.data_root, args.predictions, args.overwrite)
        with tempfile.TemporaryDirectory(prefix="m2dino-predictions-") as scratch:
            predictions = args.predictions
            if args.checkpoint:
                predictions = predictions or scratch
                written = predict_folder(args.checkpoint, args.data_root, predictions, split=args.split,
                                         batch_size=args.batch_size, device=args.device, tasks=tasks,
                                         overwrite=args.overwrite)
                tasks = tasks or written["tasks"]
            results = evaluate_folder(args.data_root, predictions, split=args.split, tasks=tasks)
        print(format_results(results))
        if args.json:
            if move_json:
                print(f"--overwrite: moved {args.json} aside to {io.move_aside(args.json)}")
            write_json(results, args.json)
            print(f"results written to {args.json}")

    return run_command("m2dino.evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
