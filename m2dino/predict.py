"""`python -m m2dino.predict --checkpoint CKPT --data-root ROOT --out DIR`: write FM_UIA challenge
submissions (the three prediction JSON files and the segmentation index PNGs) with a trained
M2DINO checkpoint (m2dino.evaluation.predict).

The command line is parsed before torch is imported: --help answers at once."""
from __future__ import annotations

import argparse
from typing import Sequence

AMP_CHOICES = ("off", "bf16", "fp16")  # m2dino.evaluation.predict.AMP_DTYPES' keys
EXAMPLES = """examples:
  python -m m2dino.predict --checkpoint runs/default/au/all/best.safetensors --data-root /data/FM_UIA --out submission/
  python -m m2dino.predict --checkpoint best.safetensors --data-root /data/FM_UIA --split val --tasks fetal_head,IUGC \\
      --out preds/ --tta
docs: docs/export.md"""


def task_list(value) -> list[str] | None:
    """--tasks values, each "a,b" or "a" (so `a,b`, `a b` and `a, b` all work) -> ["a", "b"];
    None when not given."""
    if not value:
        return None
    items = [value] if isinstance(value, str) else value
    return [t.strip() for item in items for t in item.split(",") if t.strip()] or None


def add_tasks_option(parser, help_text: str) -> None:
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help=help_text + " (space or comma separated)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m m2dino.predict", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", required=True, help="model checkpoint (e.g. runs/default/au/all/best.safetensors)")
    io.add_argument("--data-root", required=True,
                    help="FM_UIA root (csv_files/ inside, or train/ and val/), or 'synthetic': the synthetic suite "
                         "the checkpoint's run trained on")
    io.add_argument("--out", required=True, help="submission folder to write")
    io.add_argument("--split", help="sub-folder of --data-root to predict (default: the root itself, else val/)")
    add_tasks_option(io, "task ids to predict (default: every task of the checkpoint in the data)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass (default: 16)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    run.add_argument("--workers", type=nonnegative_int, default=0, help="data-loading worker processes (default: 0)")
    run.add_argument("--amp", choices=AMP_CHOICES, default="off", help="autocast dtype on CUDA (default: off)")
    run.add_argument("--tta", action="store_true",
                     help="average each flip-safe task (TaskSpec.hflip) over the image and its horizontal mirror")
    io.add_argument("--overwrite", action="store_true",
                    help="move an --out folder holding files m2dino.predict did not write aside to "
                         "OUT.old-<timestamp> (nothing is deleted), then predict into a fresh one")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from m2dino.data import resolve_data_root
    from m2dino.evaluation.predict import predict_folder, run_prediction

    return run_prediction(lambda: predict_folder(
        args.checkpoint, resolve_data_root(args.data_root, near=args.checkpoint), args.out, split=args.split,
        batch_size=args.batch_size, device=args.device, tasks=task_list(args.tasks), workers=args.workers,
        progress=True, amp=args.amp, tta=args.tta, overwrite=args.overwrite), "m2dino.predict")


if __name__ == "__main__":
    raise SystemExit(main())
