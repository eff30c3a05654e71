"""`python -m m2dino.export --checkpoint CKPT --out DIR`: write an FM_UIA 2026 challenge entry, a
self-contained predictor folder (model.py with the challenge's `Model` class, the weights as
safetensors, a Dockerfile, requirements.txt, the m2dino wheel and a README with the measured
time per image and peak memory) from a trained checkpoint (m2dino.export.folder).

The command line is parsed before torch is imported: --help answers at once."""
from __future__ import annotations

import argparse
from typing import Sequence

from m2dino.export.options import (
    AMP_CHOICES,
    DEFAULT_BASE_IMAGE,
    DEFAULT_CUDA_ARCHES,
    DEVICES,
    MEASURE_ROWS,
)

EXAMPLES = """examples:
  python -m m2dino.export --checkpoint runs/default/au/all/best.safetensors --out fmuia-entry
  python -m m2dino.export --checkpoint best.safetensors --out fmuia-entry --tta --device cuda --amp bf16 --build-ext
  docker build -t m2dino-fmuia fmuia-entry
docs: docs/export.md"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2dino.export", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="m2dino checkpoint (<stem>.safetensors + <stem>.json)")
    parser.add_argument("--out", required=True, help="predictor folder to write (must not exist or be empty)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --out folder (the old one moves aside to OUT.old-<timestamp>)")
    parser.add_argument("--tta", action="store_true", help="average flip-safe tasks over a horizontal flip")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="the predictor's device (auto: cuda when available; default: auto)")
    parser.add_argument("--batch-size", type=int, default=8, help="the predictor's default batch size (default: 8)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off", help="autocast dtype on CUDA (default: off)")
    parser.add_argument("--wheel", help="use this m2dino wheel instead of building one from the checkout")
    parser.add_argument("--base-image", default=DEFAULT_BASE_IMAGE,
                        help=f"the image's FROM (default: {DEFAULT_BASE_IMAGE})")
    parser.add_argument("--build-ext", action="store_true",
                        help="compile the C++/CUDA kernels inside the image (two-stage Dockerfile, -devel image)")
    parser.add_argument("--cuda-arches", default=DEFAULT_CUDA_ARCHES,
                        help="TORCH_CUDA_ARCH_LIST with --build-ext; wider than a local build's 8.0;9.0+PTX "
                             "because the challenge's GPU is not known in advance (default: %(default)s)")
    measure = parser.add_mutually_exclusive_group()
    measure.add_argument("--measure", metavar="DIR",
                         help="measure time and memory on this data root "
                              "(default: a small synthetic folder of the checkpoint's tasks)")
    measure.add_argument("--no-measure", action="store_true", help="skip the measurement")
    parser.add_argument("--measure-rows", type=int, default=MEASURE_ROWS,
                        help="synthetic rows per task to measure on (default: %(default)s)")
    args = parser.parse_args(argv)
    from m2dino.errors import run_command
    from m2dino.export.folder import export_predictor

    def body() -> None:
        result = export_predictor(args.checkpoint, args.out, tta=args.tta, device=args.device,
                                  batch_size=args.batch_size, amp=args.amp, force=args.force, wheel=args.wheel,
                                  base_image=args.base_image, build_ext=args.build_ext, cuda_arches=args.cuda_arches,
                                  measure=None if args.no_measure else (args.measure or "synthetic"),
                                  measure_rows=args.measure_rows,
                                  progress=lambda message: print(f"m2dino.export: {message}", flush=True))
        measured = result["measured"]
        if measured:
            print(f"measured on {measured['rows']} images ({measured['device']}): "
                  f"{measured['seconds_per_image'] * 1000:.1f} ms per image (median of {len(measured['again_s'])} "
                  f"passes after a warm-up; 1-minute load average {measured['load_average']:.1f} on "
                  f"{measured['cores']} cores), peak memory {measured['max_rss_kib'] / 1024:.0f} MiB")
        print(f"predictor written to {result['out']} (docker build -t m2dino-fmuia {result['out']}; see its "
              f"README.md)")

    return run_command("m2dino.export", body)
