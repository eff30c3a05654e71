"""The package layout holds: every module imports on its own in a fresh interpreter, no module
reaches itself through its imports (a cycle), and each folder imports only what DESIGN.md
allows it to.

The walk is static (ast) and counts every import, the lazy ones inside functions too: a cycle
through a function-level import still ties two modules into one.
"""
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("m2dino", "m2dino_kernels")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of both packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def bound_names(path: Path) -> set[str]:
    """Names a module binds at its top level (defs, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


# A package that re-exports a name from one of its modules binds that name over the
# submodule's (m2dino_kernels.attention is the function once the package is imported).
BOUND = {name: bound_names(path) for name, path in MODULES.items() if path.name == "__init__.py"}


def imports_of(name: str, path: Path) -> set[str]:
    """The modules of both packages that `name` imports anywhere in its source (a lazy
    package's `_SOURCES` table included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_SOURCES"]:
            # a lazy package's {name: module} table (m2dino._lazy): it imports those modules
            targets = [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and c.value in MODULES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule, unless the package binds that name
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES
                       and a.name not in BOUND.get(module, ()) else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a name inside a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == 0:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if colour[start] == 0:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_walk_sees_imports_and_finds_a_planted_cycle():
    """The checker itself: it resolves the import forms we use, and a cycle is found."""
    assert "m2dino.models.weights" in GRAPH["m2dino.models"]
    assert "m2dino.io" in GRAPH["m2dino.models.m2dino"]                 # from m2dino import io
    assert "m2dino_kernels" in GRAPH["m2dino.models.backbone"]
    planted = {name: set(edges) for name, edges in GRAPH.items()}
    planted["m2dino.models.backbone"].add("m2dino.models.m2dino")
    cycle = find_cycle(planted)
    assert cycle is not None and cycle[0] == cycle[-1] and "m2dino.models.backbone" in cycle


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Which folders of m2dino each may import (besides itself, m2dino.tasks, m2dino.paradigms,
# m2dino.options, m2dino.io, m2dino.errors, m2dino._lazy): the
# data flow tasks -> data -> models -> training -> evaluation, with evaluation reading
# checkpoints through models and the data through data, and training validating with
# evaluation's metrics; export packages a checkpoint into a challenge entry, through models,
# evaluation's predictor and data's synthetic folder, never training. The entry points
# (m2dino.train, ..., the export package's front: its __init__, cli and __main__) are imported
# by nobody inside.
ALLOWED = {
    "m2dino.data": set(),
    "m2dino.models": set(),
    "m2dino.evaluation": {"m2dino.data", "m2dino.models"},
    "m2dino.training": {"m2dino.data", "m2dino.models", "m2dino.evaluation"},
    "m2dino.export": {"m2dino.data", "m2dino.models", "m2dino.evaluation"},
}
ENTRY_POINTS = {"m2dino.train", "m2dino.predict", "m2dino.evaluate", "m2dino.report", "m2dino.export",
                "m2dino.export.cli", "m2dino.export.__main__", "m2dino.affinity"}
FOUNDATION = {"m2dino", "m2dino.tasks", "m2dino.paradigms", "m2dino.options", "m2dino.io", "m2dino.errors",
              "m2dino._lazy"}


def _folder(module: str) -> str:
    return next((f for f in ALLOWED if module == f or module.startswith(f + ".")), module)


def test_layers_import_only_what_they_may():
    bad = []
    for name, targets in GRAPH.items():
        for target in targets:
            if (name.startswith("m2dino_kernels") and target.startswith("m2dino")
                    and not target.startswith("m2dino_kernels")):
                bad.append(f"{name} -> {target} (the kernels know nothing of m2dino)")
            if not name.startswith("m2dino.") and name != "m2dino":
                continue
            if target.startswith("m2dino_kernels.") and not name.startswith("m2dino_kernels"):
                bad.append(f"{name} -> {target} (m2dino uses the public `m2dino_kernels` names only)")
            if target in ENTRY_POINTS and name not in ENTRY_POINTS:
                bad.append(f"{name} -> {target} (entry points are imported by nobody inside the package)")
            folder, target_folder = _folder(name), _folder(target)
            if folder in ALLOWED and target_folder in ALLOWED and target_folder != folder \
                    and target_folder not in ALLOWED[folder]:
                bad.append(f"{name} -> {target} ({folder} may not import {target_folder})")
            if folder in ALLOWED and target_folder not in ALLOWED and target not in FOUNDATION \
                    and not target.startswith("m2dino_kernels"):
                bad.append(f"{name} -> {target} ({folder} may not import an entry point or {target})")
    assert bad == [], "\n".join(sorted(bad))


def _import_alone(module: str) -> tuple[str, int, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "error::ImportWarning"}
    proc = subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({module!r})"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return module, proc.returncode, proc.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = sorted(n for n in MODULES if not n.endswith("__main__"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failed = [(m, err) for m, rc, err in pool.map(_import_alone, names) if rc != 0]
    assert failed == [], "\n\n".join(f"{m}:\n{err}" for m, err in failed)
