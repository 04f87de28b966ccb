"""No import circles between the package's files, and no import up the layers.

Parsed with ``ast``, nothing imported. Every import counts, inside functions too: an import
deferred into a function still ties the two files together and only hides the circle until the
call. Only imports under ``if TYPE_CHECKING:`` are exempt, since they never run. An import of
``a.b.c`` (or ``from a.b import c``) is an edge to the file of ``a.b.c``; the ``__init__.py``
files of ``a`` and ``a.b`` that Python runs first are not counted, or a package's ``__init__``
that imports its own modules would close a circle with each of them.

The layers: ``runtime/cache``, ``runtime/models`` and ``runtime/distributed`` are below
``runtime/stages``, ``runtime/pipelines``, ``runtime/entrypoints`` and ``cli`` and never import
them (the distributed layer is handed what it builds). ``configs/`` sits below the runtime and
uses only its cache registry (to validate strategy names), nothing else of it.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "python"
PREFIX = "sglang.multimodal_gen."
LOWER = ("runtime.cache", "runtime.models", "runtime.distributed")
UPPER = ("runtime.stages", "runtime.pipelines", "runtime.entrypoints", "sglang.cli")


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Every module under ``root`` by dotted name (a package by its own name)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except those that only run for a type
    checker (the ``else`` of an ``if TYPE_CHECKING:`` does run and counts)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for statement in child.orelse:
                found.extend(_imports(ast.Module(body=[statement], type_ignores=[])))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        found.extend(_imports(child))
    return found


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the module ``name`` (source ``source``) imports."""
    targets = set()
    for node in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in modules)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        for alias in node.names:
            if f"{base}.{alias.name}" in modules:
                targets.add(f"{base}.{alias.name}")
            elif base in modules:
                targets.add(base)
    targets.discard(name)
    return targets


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    names = set(files)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", names)
            for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _layer(module: str, layers: tuple[str, ...]) -> str | None:
    short = module.removeprefix(PREFIX)
    return next((layer for layer in layers if short == layer or short.startswith(layer + ".")), None)


def test_no_import_circles_between_files():
    assert circles(import_graph()) == []


def test_lower_layers_never_import_upper_ones():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items() if _layer(module, LOWER)
        for target in targets if _layer(target, UPPER)
    )
    assert upward == []


def test_configs_use_only_the_cache_of_the_runtime():
    reaching = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items() if _layer(module, ("configs",))
        for target in targets
        if (target.removeprefix(PREFIX).startswith("runtime") and not _layer(target, ("runtime.cache",)))
        or _layer(target, UPPER)
    )
    assert reaching == []


def test_the_checker_sees_imports_in_functions_and_skips_type_checking_ones(tmp_path):
    """A circle closed only inside a function is found; one closed only for the type checker is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import pkg.b\n")
    (package / "b.py").write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg import c
        def later():
            from pkg.a import anything
    """))
    (package / "c.py").write_text("from . import b\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.b"}
    assert circles(graph) == [["pkg.a", "pkg.b"]]


# What strategies, tests and tools imported from ``runtime.cache.base`` before it was split.
CACHE_BASE_NAMES = (
    "CALIBRATION_WINDOW", "COND", "UNCOND", "_REGISTRY", "BranchStats", "CacheConfigError", "CacheStats",
    "CalibrationRecord", "NameRegistry", "StepFeatures", "TimestepCache", "budget_passes", "format_steps",
    "get_cache_class", "is_number", "is_whole", "local_decision", "local_statistic", "n_steps", "register_cache",
    "registered_caches", "threshold_above",
)


@pytest.mark.parametrize("name", CACHE_BASE_NAMES)
def test_cache_base_keeps_exporting_what_was_imported_from_it(name):
    from sglang.multimodal_gen.runtime.cache import base

    assert getattr(base, name) is not None
