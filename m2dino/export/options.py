"""The exporter's choices and defaults, their checks, and the one error every part of it raises."""
from __future__ import annotations

from m2dino.errors import InputError

# A current PyTorch CUDA runtime image (torch 2.14.1, the torch this project is developed
# with). Docker Hub's tags read <torch>-cuda<major.minor>-cudnn<N>-runtime|devel.
DEFAULT_BASE_IMAGE = "pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime"
DEFAULT_CUDA_ARCHES = "8.0;8.6;8.9;9.0+PTX"
DEVICES = ("auto", "cpu", "cuda")
AMP_CHOICES = ("bf16", "fp16", "off")  # m2dino.evaluation.predict.AMP_DTYPES' keys (a test holds them equal)
MEASURE_ROWS = 4  # per task, on the synthetic folder


class ExportError(InputError):
    """The checkpoint, the output folder or the wheel cannot be exported; names the culprit."""


def check_options(device: str, amp: str, batch_size: int, base_image: str) -> None:
    """ExportError naming the first setting the entry could not run with."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {DEVICES}, got {device!r}")
    if amp not in AMP_CHOICES:
        raise ExportError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if int(batch_size) < 1:
        raise ExportError(f"batch size must be >= 1, got {batch_size}")
    if not base_image or any(c.isspace() for c in base_image):
        raise ExportError(f"base image {base_image!r} is not an image reference")
