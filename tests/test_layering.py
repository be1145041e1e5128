"""The import graph of core, tune and serve: no cycles, and only tune -> core and serve -> core between them;
core's packages a one-way stack (CORE_STACK), with the command lines on top.

Every import counts, including those inside functions (a lazy import still ties two modules together).
Read with ast from the source tree, so nothing is imported and no third-party tool is needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "tune", "serve")
ALLOWED = {"core": set(), "tune": {"core"}, "serve": {"core"}}  # which other packages each may import
FORBIDDEN_IN_CORE = ("ray.tune", "ray.serve")  # core trains and serves without them (DESIGN.md)
# core's floors, bottom to top (DESIGN.md): a node (each subpackage and top-level module of core) imports
# only nodes on lower floors; nodes on one floor import neither each other nor anything above.
CORE_STACK: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("core.io",), ("core.config",), ("core.runtime",),  # plain helpers
    ("core.formats", "core.networks"),  # file codecs; architectures
    ("core.bundle",),  # the contract: read, write, build a model through networks
    ("core.data",), ("core.inference",), ("core.evaluation",), ("core.training",),  # the stages
    ("core.cli",), ("core.__main__",),  # the command line
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


def imported_names(path: Path, modules: dict[str, Path]) -> set[str]:
    """Dotted names a module imports: ``from a.b import c`` gives ``a.b.c`` when that is a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the project uses absolute imports only")
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(path, modules):
            # `import core.x.y` runs core, core.x and core.x.y; only the deepest project module is the edge.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def core_node(module: str) -> str:
    """The stack node of a core module: its subpackage or top-level module (``core.data.prepare`` -> ``core.data``)."""
    return ".".join(module.split(".")[:2])


def stack_violations(graph: dict[str, set[str]], stack: tuple[tuple[str, ...], ...]) -> list[str]:
    """Imports of core modules that do not point to a lower floor of ``stack``, and nodes it leaves out."""
    floor = {node: level for level, nodes in enumerate(stack) for node in nodes}
    bad = []
    for name, targets in sorted(graph.items()):
        if not name.startswith("core"):
            continue
        here = core_node(name)
        if here not in floor:
            bad.append(f"{name}: {here} has no floor in CORE_STACK (place it there)")
            continue
        for target in sorted(targets):
            there = core_node(target)
            if target.startswith("core") and there != here and floor.get(there, len(stack)) >= floor[here]:
                bad.append(f"{name} -> {target} ({here} may not import {there})")
    return bad


def test_core_packages_form_a_one_way_stack() -> None:
    assert stack_violations(import_graph(), CORE_STACK) == []


def test_only_the_command_lines_import_the_clis() -> None:
    """Each stage's ``cli`` module is on top: only ``core.cli.dispatch`` loads it (by name), nothing imports it;
    ``core.cli`` itself is imported by the ``__main__`` modules alone."""
    bad = []
    for name, targets in import_graph().items():
        for target in targets:
            stage_cli = target.startswith("core.") and target.endswith(".cli") and target != "core.cli"
            if stage_cli or (target == "core.cli" and not name.endswith("__main__")):
                bad.append(f"{name} -> {target}")
    assert bad == []


@pytest.mark.parametrize("edges, expected", [
    ({"core.data.x": {"core.io"}, "core.io": set()}, []),
    ({"core.io": {"core.data.x"}}, ["core.io -> core.data.x (core.io may not import core.data)"]),
    ({"core.formats.a": {"core.networks.b"}}, ["core.formats.a -> core.networks.b (core.formats may not import "
                                               "core.networks)"]),
    ({"core.data.x": {"core.data.y"}}, []),
    ({"core.new": set()}, ["core.new: core.new has no floor in CORE_STACK (place it there)"]),
])
def test_stack_check_finds_what_is_there(edges: dict[str, set[str]], expected: list[str]) -> None:
    assert stack_violations(edges, CORE_STACK) == expected


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(import_graph()) == []


def test_packages_import_only_along_the_allowed_lines() -> None:
    crossings = []
    for name, targets in import_graph().items():
        package = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                crossings.append(f"{name} -> {target}")
    assert crossings == []


def test_core_imports_neither_ray_tune_nor_ray_serve() -> None:
    modules = project_modules()
    bad = [f"{name} -> {imported}" for name, path in modules.items() if name.startswith("core")
           for imported in imported_names(path, modules) if imported.startswith(FORBIDDEN_IN_CORE)]
    assert bad == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder_finds_what_is_there(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected


def test_graph_sees_lazy_imports_and_from_imports_of_submodules(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from core.inference import slices\n    import core.bundle\n")
    names = imported_names(source, {"core.inference.slices": source, "core.bundle": source})
    assert {"core.inference.slices", "core.bundle"} <= names
