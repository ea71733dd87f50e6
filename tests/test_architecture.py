"""The floors of privdiff, checked by walking every import in the source (function-local ones too).

docs/architecture.md draws them. A package imports only from its own floor or the floors below;
no two packages import each other (directly or round a longer circle); no module imports itself
back through others; and nothing imports :mod:`privdiff.methods` but the command line (the method
registry names methods by module path, so the recipe checker below them can list them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "privdiff"

FLOORS: list[set[str]] = [
    {"__init__", "atomic", "distributed", "runtime", "method_registry"},  # plain values, files, processes
    {"data", "diffusion", "models"},  # data sets, diffusion math, networks
    {"config", "runs"},  # recipes and run directories
    {"privacy"},  # accounting, ledger, registry, clipping, DP-SGD, the budget guard
    {"core"},  # the training loop, generation, loading a run, shared stages
    {"methods", "attacks", "evaluation", "he"},  # methods, and what is done with their runs
    {"cli", "__main__"},  # the command line
]
FLOOR = {pkg: i for i, floor in enumerate(FLOORS) for pkg in floor}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The privdiff module ``name`` refers to (a module, or the package whose ``__init__`` it is)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The privdiff modules that ``module`` imports anywhere in its file (``from x import y`` counts y if it is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for name in names:
            if name == "privdiff" or name.startswith("privdiff."):
                target = _resolve(name, modules)
                if target is not None and target != module:
                    out.add(target)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_package_has_a_floor(graph):
    missing = sorted({_package(m) for m in graph} - set(FLOOR))
    assert not missing, f"packages with no floor in tests/test_architecture.py (and docs/architecture.md): {missing}"


def test_no_import_runs_up_a_floor(graph):
    up = [f"{m} -> {t}" for m, ts in graph.items() for t in ts if FLOOR[_package(t)] > FLOOR[_package(m)]]
    assert not up, "imports that run back up:\n" + "\n".join(sorted(up))


def test_only_the_command_line_imports_methods(graph):
    users = sorted(
        m for m, ts in graph.items() for t in ts if _package(t) == "methods" and _package(m) not in ("methods", "cli")
    )
    assert not users, (
        f"modules that import privdiff.methods (only the CLI may; others go through privdiff.method_registry): {users}"
    )


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for t in sorted(edges.get(n, ())):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_package_circle(graph):
    packages: dict[str, set[str]] = {}
    for m, ts in graph.items():
        packages.setdefault(_package(m), set()).update(_package(t) for t in ts if _package(t) != _package(m))
    cycle = _cycle(packages)
    assert cycle is None, "packages importing each other: " + " -> ".join(cycle)


def test_no_module_circle(graph):
    cycle = _cycle(graph)
    assert cycle is None, "modules importing each other: " + " -> ".join(cycle)


def test_the_walk_sees_the_arrows_it_checks():
    """The checker itself: it finds a relative, an absolute and a function-local import, and a planted circle."""
    modules = _modules()
    dpdm = _imports("privdiff.methods.dpdm", modules["privdiff.methods.dpdm"], modules)
    assert {"privdiff.core.training", "privdiff.privacy.budget", "privdiff.config"} <= dpdm
    cli = _imports("privdiff.cli", modules["privdiff.cli"], modules)  # its imports are inside the commands
    assert {"privdiff.method_registry", "privdiff.core.generation", "privdiff.runtime"} <= cli
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_tests_share_helpers_in_one_place():
    """A test file imports no other test module: shared helpers live in tests/helpers.py (conftest imports it too)."""
    tests = Path(__file__).resolve().parent
    bad = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.relative_to(tests)}: {n}" for n in names if n.startswith("tests") and n != "tests.helpers"]
    assert not bad, "test modules importing other test modules:\n" + "\n".join(bad)
