"""`python -m m2dino.predict --checkpoint CKPT --data-root ROOT --out DIR`: write FM_UIA challenge
submissions (the three prediction JSON files and the segmentation index PNGs) with a trained
M2DINO checkpoint (m2dino.evaluation.predict)."""
from __future__ import annotations

import argparse
from typing import Sequence

from m2dino.evaluation.predict import AMP_DTYPES, predict_folder, run_prediction


def task_list(text: str | None) -> list[str] | None:
    """A --tasks value "a,b" -> ["a", "b"] (None when not given)."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (e.g. runs/default/au/all/best.safetensors)")
    parser.add_argument("--data-root", required=True, help="FM_UIA root (csv_files/ inside, or train/ and val/)")
    parser.add_argument("--out", required=True, help="submission folder to write")
    parser.add_argument("--split", help="sub-folder of --data-root to predict (default: the root itself, else val/)")
    parser.add_argument("--tasks", help="comma-separated task ids (default: every task of the checkpoint in the data)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off", help="autocast dtype on CUDA (off)")
    parser.add_argument("--tta", action="store_true",
                        help="average each flip-safe task (TaskSpec.hflip) over the image and its horizontal mirror")
    args = parser.parse_args(argv)
    return run_prediction(lambda: predict_folder(
        args.checkpoint, args.data_root, args.out, split=args.split, batch_size=args.batch_size, device=args.device,
        tasks=task_list(args.tasks), workers=args.workers, progress=True, amp=args.amp, tta=args.tta), "m2dino.predict")


if __name__ == "__main__":
    raise SystemExit(main())
