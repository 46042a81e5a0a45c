"""Structure rules of the package, read from the source: no import cycles, short functions.

Imports inside functions count as well: a lazy import hides a cycle from Python, not from the reader.
Every command line is in ``melecole.cli``, the top layer: it may import any subpackage and nothing imports it but
the script shims (``SHIMS``), which import only ``melecole.cli``. An ``if __name__ == "__main__":`` block runs as the
program, never on import, so its imports are those of the node ``<module>:__main__``.
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
        main_block = {id(node) for block in tree.body if _is_main_block(block) for node in ast.walk(block)}
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
                        graph.setdefault(f"{name}:__main__" if id(node) in main_block else name, set()).add(resolved)
    return graph


def _is_main_block(statement: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` at module level."""
    return isinstance(statement, ast.If) and ast.unparse(statement.test) == "__name__ == '__main__'"


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


# The script paths kept as shims of melecole.cli: python melecole/train.py, python melecole/train_distributed.py,
# python -m melecole.demo, python -m melecole.blockwise, python -m melecole.data.synthetic.
SHIMS = (
    "melecole.train",
    "melecole.train_distributed",
    "melecole.demo",
    "melecole.blockwise.__main__",
    "melecole.mesh.__main__",
    "melecole.data.synthetic:__main__",
)


def is_cli(module: str) -> bool:
    """``melecole.cli`` or one of its modules (``melecole.utils.cli`` is a helper below every layer)."""
    return module == "melecole.cli" or module.startswith("melecole.cli.")


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between subpackages (melecole.<sub>), ignoring imports inside one subpackage; a shim is a
    node of its own (``melecole.blockwise.__main__`` is a script, not part of ``melecole.blockwise``)."""

    def subpackage(module: str) -> str:
        return module if module in SHIMS else ".".join(module.split(".")[:2])

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


def test_nothing_imports_melecole_cli_but_the_shims():
    graph = import_graph(_modules())
    wrong = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if (is_cli(target) and not is_cli(module) and module not in SHIMS) or target in SHIMS
    ]
    assert not wrong, wrong


def test_shims_only_import_melecole_cli():
    graph = import_graph(_modules())
    for shim in SHIMS:
        assert graph.get(shim), f"{shim}: no such shim, or it imports nothing (tests/test_architecture.py SHIMS)"
        assert all(is_cli(target) for target in graph[shim]), f"{shim} imports {sorted(graph[shim])}"


def test_io_is_the_bottom_layer():
    graph = subpackage_graph(import_graph(_modules()))
    assert graph["melecole.io"] <= {"melecole.errors", "melecole.utils"}, graph["melecole.io"]


STORAGE_LIBRARIES = ("zarr", "h5py", "cloudvolume", "cloudfiles")


def storage_imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """{module: storage libraries it imports anywhere in its source (lazy imports and
    ``importlib.import_module("zarr")`` count)}."""
    found: dict[str, set[str]] = {}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("import_module", "__import__")):
                first = node.args[0] if node.args else None
                targets = [first.value] if isinstance(first, ast.Constant) and isinstance(first.value, str) else []
            for target in targets:
                if target.split(".")[0] in STORAGE_LIBRARIES:
                    found.setdefault(name, set()).add(target.split(".")[0])
    return found


def test_only_melecole_io_imports_zarr_h5py_or_cloudvolume():
    planted = ast.parse("import os\ndef f():\n    from zarr.storage import X\n    importlib.import_module('h5py')\n")
    assert storage_imports({"melecole.x": planted}) == {"melecole.x": {"zarr", "h5py"}}
    found = storage_imports(_modules())
    assert {"zarr", "h5py", "cloudvolume"} <= set().union(*found.values())  # the imports were really read
    outside = {
        module: sorted(names) for module, names in found.items() if module.split(".")[:2] != ["melecole", "io"]
    }
    assert not outside, f"only melecole.io may import {', '.join(STORAGE_LIBRARIES)}: {outside}"


# The layer table of docs/ARCHITECTURE.md: a subpackage imports only its own layer or lower ones (and, inside a
# layer, no cycle: test_no_import_cycle_between_subpackages). The shims and melecole.testing (helpers for tests and
# benches) sit on top with melecole.cli.
LAYERS = {
    "melecole.errors": 0,
    "melecole.utils": 0,
    "melecole.config": 0,
    "melecole.io": 1,
    "melecole.zoo": 1,
    "melecole.segmentation": 2,
    "melecole.evaluation": 2,
    "melecole.models": 2,
    "melecole.data": 3,
    "melecole.losses": 3,
    "melecole.engine": 4,
    "melecole.inference": 5,
    "melecole.visualization": 5,
    "melecole.blockwise": 6,
    "melecole.export": 6,
    "melecole.mesh": 6,
    "melecole.cli": 7,
    "melecole.testing": 7,
    **dict.fromkeys(SHIMS, 7),
}


def test_every_subpackage_has_a_layer_and_imports_none_above_it():
    graph = subpackage_graph(import_graph(_modules()))
    missing = sorted(set(graph) - set(LAYERS) - {"melecole"})
    assert not missing, f"subpackages without a layer (add them to LAYERS and docs/ARCHITECTURE.md): {missing}"
    upward = [
        f"{source} (layer {LAYERS[source]}) -> {target} (layer {LAYERS[target]})"
        for source, targets in graph.items()
        if source in LAYERS
        for target in targets
        if target in LAYERS and LAYERS[target] > LAYERS[source]
    ]
    assert not upward, upward


def test_segmentation_imports_no_deep_learning_and_no_file_format():
    graph = import_graph(_modules())
    for module, tree in _modules().items():
        if not module.startswith("melecole.segmentation"):
            continue
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"torch", "h5py", "zarr", "cloudvolume"}, (module, imported)
        assert all(
            target.split(".")[1] in ("segmentation", "io", "utils", "errors") for target in graph[module]
        ), (module, graph[module])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_short(path: Path):
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions longer than {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
