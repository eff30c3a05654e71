"""The m2dino wheel an entry installs: built from a clean copy of this checkout with
`M2DINO_BUILD_EXT=0` (pure Python, so it fits any torch ABI), or an existing wheel checked and
copied; and the entry's requirements.txt from the wheel's metadata."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from m2dino import io
from m2dino.export.options import ExportError

# What a wheel (and the --build-ext source copy) is built from, relative to the project root.
SOURCE_FILES = ("pyproject.toml", "setup.py", "README.md", "LICENSE")
SOURCE_TREES = ("m2dino", "m2dino_kernels", "csrc")
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".o")
# Files any m2dino wheel holds, and all an entry's model.py needs of it: the predictor and the kernels.
WHEEL_MUST_HOLD = ("m2dino/__init__.py", "m2dino/evaluation/predict.py", "m2dino_kernels/__init__.py")


def project_root() -> Path:
    """The source checkout this m2dino runs from (an editable install): the folder holding
    pyproject.toml above m2dino/."""
    root = Path(__file__).resolve().parents[2]
    if all((root / f).is_file() for f in ("pyproject.toml", "setup.py")) and (root / "m2dino_kernels").is_dir():
        return root
    raise ExportError(f"m2dino runs from {root}, not from a source checkout (no pyproject.toml and setup.py "
                      f"there), so no wheel can be built from it: pass --wheel PATH (a wheel built with "
                      f"`M2DINO_BUILD_EXT=0 pip wheel --no-build-isolation --no-deps -w DIR <checkout>`)")


def source_files(root: Path) -> list[Path]:
    """The files a wheel is built from, relative to the project root (no caches, no compiled
    objects, no hidden files: a stale extension or build folder never reaches the image)."""
    files = [Path(name) for name in SOURCE_FILES if (root / name).is_file()]
    for tree in SOURCE_TREES:
        for path in sorted((root / tree).rglob("*")):
            rel = path.relative_to(root)
            if (path.is_file() and path.suffix not in SKIP_SUFFIXES
                    and not any(part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info")
                                for part in rel.parts)):
                files.append(rel)
    return files


def copy_sources(root: Path, dest: Path) -> None:
    for rel in source_files(root):
        io.write_bytes(dest / rel, (root / rel).read_bytes())


def build_wheel(root: Path, dest: Path) -> Path:
    """`M2DINO_BUILD_EXT=0 pip wheel --no-build-isolation --no-deps` of a clean copy of the
    sources (the checkout is left untouched: setuptools builds in the source folder)."""
    with tempfile.TemporaryDirectory(prefix="m2dino-wheel-") as scratch:
        source = Path(scratch) / "source"
        copy_sources(root, source)
        built = Path(scratch) / "wheels"
        command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                   "--disable-pip-version-check", "-w", str(built), str(source.resolve())]
        proc = subprocess.run(command, env={**os.environ, "M2DINO_BUILD_EXT": "0"}, capture_output=True, text=True)
        wheels = sorted(built.glob("m2dino-*.whl")) if built.is_dir() else []
        if proc.returncode != 0 or len(wheels) != 1:
            raise ExportError(f"building the m2dino wheel failed ({' '.join(command)}):\n"
                              f"{(proc.stdout + proc.stderr)[-3000:]}")
        return copy_wheel(wheels[0], dest)


def wheel_metadata(wheel: Path) -> dict:
    """Name, version, dependencies and purity of an m2dino wheel; ExportError when it is not one."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
            metadata = archive.read(meta_name).decode("utf-8") if meta_name else ""
    except (OSError, zipfile.BadZipFile) as err:
        raise ExportError(f"{wheel} is not a readable wheel: {err}") from err
    fields = [line.split(":", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ":" in line]
    name = next((v.strip() for k, v in fields if k == "Name"), None)
    if name != "m2dino" or not all(n in names for n in WHEEL_MUST_HOLD):
        raise ExportError(f"{wheel} is not an m2dino wheel (name {name!r}; it must hold {list(WHEEL_MUST_HOLD)})")
    return {"name": name, "version": next((v.strip() for k, v in fields if k == "Version"), "?"),
            "requires": [v.strip() for k, v in fields if k == "Requires-Dist" and "extra ==" not in v],
            "pure": wheel.name.endswith("-none-any.whl"), "files": names}


def copy_wheel(wheel: Path, dest: Path) -> Path:
    wheel = Path(wheel)
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise ExportError(f"{wheel} is not a wheel file (*.whl)")
    wheel_metadata(wheel)
    return io.write_bytes(dest / wheel.name, wheel.read_bytes())


def requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0].strip()
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return name.strip().lower()


def requirements_text(meta: dict) -> str:
    # torch (and torchvision) come from the base image: installing another would replace its CUDA build
    requires = [r for r in meta["requires"] if requirement_name(r) not in ("torch", "torchvision")]
    return ("# The m2dino wheel's run-time dependencies (its metadata) except torch, which the base image\n"
            "# provides. Installed when the image is built; nothing is downloaded when it runs.\n"
            + "".join(f"{r}\n" for r in requires))
