"""The layering of docs/architecture.md, checked on the source: every import (function-level ones
included) goes down the layer list, the packages import each other without cycles, and no function
outside a model's forward pass is longer than about 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxalign"

#: Top to bottom; a unit imports only units of its own or lower layers, without cycles. A unit is a top-level module or package of jaxalign.
LAYERS = (
    ("cli",),
    ("demo",),
    ("jobs", "online"),
    ("train",),
    ("analysis",),
    ("data",),
    ("models",),
    ("pairs", "losses"),
    ("logprobs",),
    ("parallel", "store", "config", "errors", "plots", "report", "hostmem", "__init__"),
)
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
MAX_LINES = 80
#: Model forward passes read like the paper in one piece (issue 17 allows them to be longer).
LONG_OK = {("models", "__call__"), ("models", "forward")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        yield name, path, ast.parse(path.read_text(), filename=str(path))


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(name: str, tree: ast.AST):
    """``(line, imported module)`` of every jaxalign import in the module, at any depth."""
    package = name if name == "jaxalign" or (PACKAGE / Path(*name.split(".")[1:]) / "__init__.py").exists() \
        else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*full.split("."))).with_suffix(".py").exists() or \
                    (PACKAGE.parent / Path(*full.split(".")) / "__init__.py").exists()
                yield node.lineno, full if is_module else base


def _edges():
    for name, path, tree in _modules():
        src = _unit(name)
        for line, target in _imports(name, tree):
            if target == "jaxalign" or target.startswith("jaxalign."):
                dst = _unit(target)
                if dst != src:
                    yield src, dst, f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"


def test_every_unit_has_a_layer():
    units = {_unit(name) for name, _, _ in _modules()}
    assert units <= set(RANK), f"add these to LAYERS (and docs/architecture.md): {sorted(units - set(RANK))}"


def test_imports_go_down_the_layers():
    upward = [where for src, dst, where in _edges() if src in RANK and dst in RANK and RANK[dst] < RANK[src]]
    assert not upward, "imports against the layer list:\n" + "\n".join(upward)


def test_no_cycles_between_units():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(u, path):
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cycle.extend(path[path.index(v):] + [u, v] if v in path else [u, v])
                return True
            if state.get(v) is None and visit(v, path + [u]):
                return True
        state[u] = 2
        return False

    for u in sorted(graph):
        if state.get(u) is None and visit(u, []):
            break
    assert not cycle, "import cycle between units: " + " -> ".join(cycle)


def test_functions_are_short():
    long = []
    for name, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and (_unit(name), node.name) not in LONG_OK:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source,expected", [
    ("from jaxalign.train import step\n", ("train", "jaxalign.train.step")),
    ("def f():\n    from jaxalign.analysis.ches import make_scorer\n", ("analysis", "jaxalign.analysis.ches")),
    ("import jaxalign.store\n", ("store", "jaxalign.store")),
])
def test_the_walker_sees_function_level_imports(source, expected):
    """The checker itself: module-level and function-level imports are both found, names resolved."""
    found = [(_unit(t), t) for _, t in _imports("jaxalign.x", ast.parse(source))]
    assert expected in found
