"""Package names imported on first use, so that `import m2dino` (and a CLI's --help) does not
import torch: a package's __init__ lists where each public name lives and gets its
`__getattr__` and `__dir__` from `lazy_exports`. Its `_SOURCES` table ({name: module}) is the one
list of its public names: `__all__ = sorted(_SOURCES)`, and the layering test reads the modules
named there as the package's imports."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, sources: dict[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: a name of `sources` ({name: module}) is imported from
    its module on first access and then kept in the package's namespace."""
    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(sources))

    return __getattr__, __dir__
