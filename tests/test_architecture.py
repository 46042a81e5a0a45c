"""Structure rules of the package, read from the source: no import cycles, short functions.

Imports inside functions count as well: a lazy import hides a cycle from Python, not from the reader.
Entry-point modules (a subpackage's ``cli.py`` or ``__main__.py``) sit on top of every subpackage: they may import any
of them, and no library module imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "melecole"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, ast.Module]) -> str | None:
    """The melecole module a dotted name refers to: itself, or its parent for `from pkg import attr`."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """{module: modules of melecole it imports (anywhere in its source)}."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        is_package = (PACKAGE.parent / Path(*name.split("."), "__init__.py")).is_file()
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                if target == "melecole" or target.startswith("melecole."):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != name and resolved != "melecole":
                        graph[name].add(resolved)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


SCRIPTS = ("melecole.train", "melecole.train_distributed", "melecole.demo")


def is_entry_point(module: str) -> bool:
    """A script (``melecole/train.py``, ...) or a subpackage's command line (``cli``, ``__main__``);
    ``melecole.utils.cli`` is a helper for all of them."""
    if module in SCRIPTS:
        return True
    return module.rpartition(".")[2] in ("cli", "__main__") and not module.startswith("melecole.utils.")


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between subpackages (melecole.<sub>), ignoring imports inside one subpackage; an entry
    point module is a node of its own."""

    def subpackage(module: str) -> str:
        return module if is_entry_point(module) else ".".join(module.split(".")[:2])

    result: dict[str, set[str]] = {}
    for source, targets in graph.items():
        edges = result.setdefault(subpackage(source), set())
        edges.update(subpackage(t) for t in targets if subpackage(t) != subpackage(source))
    return result


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    graph = import_graph(_modules())
    assert len(graph) > 40 and graph["melecole.inference.pipeline"]  # the graph was really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph(import_graph(_modules()))
    assert "melecole.io" in graph and "melecole.inference" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)


def test_no_library_module_imports_an_entry_point():
    graph = import_graph(_modules())
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if is_entry_point(target) and not is_entry_point(module)
    ]
    assert not wrong, wrong


def test_io_is_the_bottom_layer():
    graph = subpackage_graph(import_graph(_modules()))
    assert graph["melecole.io"] <= {"melecole.errors", "melecole.utils"}, graph["melecole.io"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path: Path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions longer than {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
