"""The registry of MoE kernel backends: their names, the modules that implement them, the
dtypes they take, where they can run, and which carry compiled kernels of their own.

Built in (each a module with DESIGN.md's four protocol functions, imported on first use):
  "reference"   m2dino_kernels.reference   plain PyTorch, the oracle; runs everywhere
                                           ("torch" is its old name, still accepted)
  "cpp"         m2dino_kernels.extension   the C++ extension m2dino_kernels._C, CPU tensors
  "cuda"        m2dino_kernels.extension   the same extension's CUDA kernels (built with CUDA)
  "triton"      m2dino_kernels.triton.moe  Triton kernels: CUDA tensors, or CPU tensors under
                                           the Triton interpreter (slow; meant for tests)
  "grouped_mm"  m2dino_kernels.grouped_mm  the reference's routing, expert GEMMs through
                                           torch.nn.functional.grouped_mm: the library floor

A new backend is one `register_backend` call (the extension point): the name, the module,
the dtypes, the device types, whether its kernels are compiled (then `auto` trusts it on a
device only after it passed the self-test there, m2dino_kernels.gate) and where the fixed
`auto` rule tries it first. Availability per device type is computed once and kept in a
plain dict, so that resolving a backend inside a torch.compile'd function is a dict read.
Which backend runs (the selected one, the `auto` rule) is m2dino_kernels.selection's job.

If the extension fails to import, one warning is given when this module is imported.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, Union

import torch

REFERENCE = "reference"
# Old names still accepted wherever a backend is named (and read from autotune cache files).
BACKEND_ALIASES = {"torch": REFERENCE}
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "triton", REFERENCE)


def _load_extension():
    """Import m2dino_kernels._C once; on failure warn once and return None."""
    try:
        return importlib.import_module("m2dino_kernels._C")
    except (ImportError, OSError) as err:
        warnings.warn(
            f"m2dino_kernels._C could not be imported ({err}); the C++/CUDA kernel backends "
            f"are unavailable and the plain PyTorch backend {REFERENCE!r} is used instead. "
            "A wheel built with M2DINO_BUILD_EXT=0 (such as an exported challenge entry's) has none on "
            "purpose; in an m2dino checkout, `pip install --no-build-isolation -e .` builds them "
            "(docs/troubleshooting.md there).",
            RuntimeWarning, stacklevel=3)
        return None


_C = _load_extension()


# ---------------------------------------------------------------------------------------
# What identifies a build of a compiled backend (part of its self-test verdict's key)
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _digest(stamped: tuple) -> str:
    digest = hashlib.sha256()
    for path, _mtime, _size in stamped:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _file_digest(paths) -> str:
    """A hash of the files' contents (read again only when one's time or size changed)."""
    stamped = []
    for path in paths:
        stat = os.stat(path)
        stamped.append((str(path), stat.st_mtime_ns, stat.st_size))
    return _digest(tuple(stamped))


def extension_fingerprint() -> str:
    """The extension's build: a hash of the compiled library file."""
    if _C is None or not getattr(_C, "__file__", None):
        return "no-extension"
    return f"build {_file_digest((_C.__file__,))}"


def triton_fingerprint() -> str:
    """Triton's version and a hash of our Triton kernels' sources."""
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "no-triton"
    from importlib.metadata import version  # noqa: PLC0415

    folder = Path(__file__).parent / "triton"
    return f"triton {version('triton')} src {_file_digest(sorted(folder.glob('*.py')))}"


def module_fingerprint(module: str) -> str:
    """A hash of a backend module's source file (without importing it)."""
    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return f"{module} (no source)"
    return f"src {_file_digest((origin,))}"


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
class Backend(NamedTuple):
    """One registered MoE backend."""

    name: str
    module: str                       # import path of its four protocol functions
    dtypes: tuple                     # input dtypes it takes
    runs_on: Callable[[str], bool]    # device type -> whether it can run there
    compiled: bool                    # its own compiled kernels: vetted by the self-test
    fingerprint: Callable[[], str]    # its build, for the self-test verdict's key
    preferred_on: tuple = ()          # device types whose fixed `auto` rule tries it


def triton_runs_on(device_type: str) -> bool:
    """Triton is installed and can take `device_type` tensors: CUDA, or CPU under the
    interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _grouped_mm_runs_on(device_type: str) -> bool:
    return importlib.import_module("m2dino_kernels.grouped_mm").runs_on(device_type)


_HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_BUILT_IN = (
    Backend(REFERENCE, "m2dino_kernels.reference", _HALF_AND_FLOAT + (torch.float64,),
            lambda device_type: True, False, lambda: "pytorch"),
    Backend("cpp", "m2dino_kernels.extension", _HALF_AND_FLOAT + (torch.float64,),
            lambda device_type: _C is not None and device_type == "cpu", True,
            extension_fingerprint, preferred_on=("cpu",)),
    Backend("cuda", "m2dino_kernels.extension", _HALF_AND_FLOAT,
            lambda device_type: (_C is not None and device_type == "cuda"
                                 and bool(getattr(_C, "with_cuda", False))), True,
            extension_fingerprint),
    Backend("triton", "m2dino_kernels.triton.moe", _HALF_AND_FLOAT, triton_runs_on, True,
            triton_fingerprint),
    # what torch.nn.functional.grouped_mm takes
    Backend("grouped_mm", "m2dino_kernels.grouped_mm", _HALF_AND_FLOAT, _grouped_mm_runs_on,
            False, lambda: "pytorch"),
)
_BACKENDS: dict = {spec.name: spec for spec in _BUILT_IN}
CONCRETE_BACKENDS = tuple(_BACKENDS)  # the built-in ones
_BUILT_IN_NAMES = frozenset(CONCRETE_BACKENDS)
# Input dtypes of each backend, kept as a plain dict (written by register_backend only) so
# that checking it never imports a backend module: an import inside a torch.compile'd call
# would be a graph break.
BACKEND_DTYPES = {name: spec.dtypes for name, spec in _BACKENDS.items()}


def backend(name: str) -> Backend:
    """The registry entry of concrete backend `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown concrete kernel backend {name!r}; "
                         f"expected one of {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def backend_module(name: str):
    """The module implementing concrete backend `name` (imported on first use)."""
    return importlib.import_module(backend(name).module)


def concrete_backends() -> tuple:
    """Every registered backend name, built-in first, then in the order registered."""
    return tuple(_BACKENDS)


def backend_names() -> tuple:
    """What set_backend accepts (aliases aside): "auto" and every registered backend."""
    return ("auto",) + tuple(_BACKENDS)


def compiled_backends() -> tuple:
    """The backends with compiled kernels of their own: what the self-test vets."""
    return tuple(name for name, spec in _BACKENDS.items() if spec.compiled)


def is_compiled(name: str) -> bool:
    """Whether `name` is a registered backend with compiled kernels of its own (attention's
    sdpa and xformers are PyTorch's and xformers' own, not ours)."""
    spec = _BACKENDS.get(name)
    return spec is not None and spec.compiled


def _compute_preferred(device_type: str) -> tuple:
    names = [n for n, s in _BACKENDS.items() if device_type in s.preferred_on]
    return tuple([n for n in names if n not in _BUILT_IN_NAMES]
                 + [n for n in names if n in _BUILT_IN_NAMES])


def preferred_backends(device_type: str) -> tuple:
    """The backends the unmeasured `auto` rule tries on `device_type`, in order: those
    registered with it in `preferred_on` first (in the order registered), then the built-in
    ones (CPU: cpp). A plain dict read once computed."""
    if device_type not in _preferred_cache:
        _preferred_cache[device_type] = _compute_preferred(device_type)
    return _preferred_cache[device_type]


def register_backend(name: str, module: str, dtypes: Sequence[torch.dtype],
                     devices: Union[Sequence[str], Callable[[str], bool]], *,
                     compiled: bool = True, preferred_on: Sequence[str] = ()) -> None:
    """Add a MoE backend: `module` (an import path) implements the four protocol functions
    (DESIGN.md, "Kernel backend protocol"); it takes `dtypes` and runs on `devices` (device
    types, or a callable device type -> bool). compiled: its kernels are its own (C++, CUDA,
    Triton...): `auto` then uses it on a device only after it passed the self-test there
    (run once in a child process, m2dino_kernels.gate), keyed by a hash of the module's
    source. preferred_on: device types whose fixed `auto` rule (CPU's) tries it before the
    built-in choice. On CUDA `auto` measures every available backend anyway."""
    if not isinstance(name, str) or not name or name == "auto" or name in BACKEND_ALIASES:
        raise ValueError(f"register_backend: {name!r} cannot name a backend")
    if name in _BUILT_IN_NAMES:
        raise ValueError(f"register_backend: {name!r} is a built-in backend")
    runs_on = devices if callable(devices) else (lambda device_type, d=tuple(devices): device_type in d)
    _BACKENDS[name] = Backend(name, module, tuple(dtypes), runs_on, bool(compiled),
                              functools.partial(module_fingerprint, module), tuple(preferred_on))
    BACKEND_DTYPES[name] = tuple(dtypes)
    refresh_available_backends()


def unregister_backend(name: str) -> None:
    """Remove a backend added by register_backend (tests; a plugin being unloaded)."""
    if name in _BUILT_IN_NAMES:
        raise ValueError(f"unregister_backend: {name!r} is a built-in backend")
    _BACKENDS.pop(name, None)
    BACKEND_DTYPES.pop(name, None)
    refresh_available_backends()



def canonical_name(name, choices, source: str) -> str:
    """`name` with aliases resolved, or ValueError naming `source` and the choices."""
    name = BACKEND_ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(name, str) or name not in choices:
        aliases = ", ".join(f"{old!r} for {new!r}" for old, new in BACKEND_ALIASES.items())
        raise ValueError(f"{source}: unknown kernel backend {name!r}; expected one of "
                         f"{', '.join(choices)} (or {aliases})")
    return name


# ---------------------------------------------------------------------------------------
# Where each backend can run
# ---------------------------------------------------------------------------------------
EXCLUDE_ENV = "M2DINO_KERNELS_EXCLUDE"


def excluded_backends() -> tuple:
    """Backends $M2DINO_KERNELS_EXCLUDE (comma-separated) leaves out everywhere, as if they
    could not run (benchmarks/gpu_check.sh names those that failed the self-test)."""
    return tuple(n for n in os.environ.get(EXCLUDE_ENV, "").replace(" ", "").split(",") if n)


def _compute_available(device_type: str) -> tuple:
    excluded = excluded_backends()
    return tuple(name for name, spec in _BACKENDS.items()
                 if name not in excluded and spec.runs_on(device_type))


# Filled eagerly for the device types present (see the module docstring).
_preferred_cache: dict = {}
_available_cache = {"cpu": _compute_available("cpu")}
if torch.cuda.is_available():
    _available_cache["cuda"] = _compute_available("cuda")


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def available_backends(device="cpu") -> list:
    """Names of the MoE backends that can run on tensors of `device` ("reference" first;
    none that $M2DINO_KERNELS_EXCLUDE names)."""
    device_type = _device_type(device)
    if device_type not in _available_cache:
        _available_cache[device_type] = _compute_available(device_type)
    return list(_available_cache[device_type])


def refresh_available_backends() -> None:
    """Recompute availability (e.g. after setting TRITON_INTERPRET in a running process)."""
    for device_type in list(_available_cache):
        _available_cache[device_type] = _compute_available(device_type)
    _preferred_cache.clear()


def interpreter_bf16(backend: str, device_type: str, dtype: torch.dtype) -> bool:
    """True for bf16 Triton on CPU: the Triton interpreter's bf16 dot is wrong, so bf16 Triton
    runs (and is held to the contract) on GPUs only."""
    return backend == "triton" and device_type == "cpu" and dtype == torch.bfloat16


def has_attention(backend: str) -> bool:
    """Whether a MoE backend also implements attention (attention(backend=...)): triton."""
    return backend in ATTENTION_BACKENDS and backend != REFERENCE


def xformers_available() -> bool:
    """True when the optional xformers package is installed (it still needs CUDA tensors)."""
    return importlib.util.find_spec("xformers") is not None
