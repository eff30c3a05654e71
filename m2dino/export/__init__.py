"""From a checkpoint to an FM_UIA 2026 challenge entry: a self-contained predictor folder.

`export_predictor(checkpoint, out)` (and `python -m m2dino.export`) writes `out/`:

    model.py                      class Model: __init__() loads the weights from its folder,
                                  predict(data_root, output_dir, batch_size=None); `python
                                  model.py` predicts /input/ into /output/ (entry/model.py, as is)
    model.safetensors model.json  the weights and the model config (m2dino.save_model; no pickle)
    predictor.json                the defaults the Model runs with: device, batch_size, amp, tta
    wheels/m2dino-*.whl           m2dino, built from this checkout (or the --wheel given)
    requirements.txt Dockerfile   the image: a PyTorch CUDA runtime base, the wheel, `python model.py`
    README.md                     build, run, check, licences, and the measured time per image and peak memory
    src/                          (--build-ext only) the sources the Dockerfile compiles the kernels from

model.py is a thin wrapper over `predict_folder` (m2dino.evaluation.predict), the code behind
`python -m m2dino.predict`, so both write the same files for the same checkpoint, data and
settings; what differs between exports is in predictor.json, never in model.py.

The wheel. By default it is built with `M2DINO_BUILD_EXT=0`: pure Python, independent of the
torch ABI, which an image with its own torch needs (the extension compiled here against this
machine's torch would not load against the image's). The image then runs the `reference` kernel
backend (M2DINO_KERNELS_BACKEND=reference: the Triton backend needs a C compiler at run time,
which PyTorch's runtime images lack). `build_ext=True` writes a two-stage Dockerfile instead that
compiles the C++/CUDA kernels inside the matching `-devel` image for `cuda_arches`.

The modules, one job each: options (choices, defaults, ExportError), checkpoint (what may be
exported, through load_model), wheel (the wheel and requirements.txt), render (the Dockerfile
and README from the templates in entry/), measure and measure_child (time and memory of the
written entry), folder (export_predictor: the checks, then the folder written atomically), cli.
"""
from m2dino.export.options import (
    AMP_CHOICES,
    DEFAULT_BASE_IMAGE,
    DEFAULT_CUDA_ARCHES,
    DEVICES,
    MEASURE_ROWS,
    ExportError,
)

__all__ = ["AMP_CHOICES", "DEFAULT_BASE_IMAGE", "DEFAULT_CUDA_ARCHES", "DEVICES", "MEASURE_ROWS", "ExportError",
           "export_predictor", "main"]


def __getattr__(name: str):
    """export_predictor and main, imported on first use, so that `python -m m2dino.export --help`
    answers before torch is imported."""
    if name == "export_predictor":
        from m2dino.export.folder import export_predictor
        return export_predictor
    if name == "main":
        from m2dino.export.cli import main
        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
