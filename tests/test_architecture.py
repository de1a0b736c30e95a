"""The package's layering: model → trace → match → plan → rewrite → ops → kernels, no arrow back up.

The import graph is read from the source with `ast` (imports inside functions included), so a
lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "facto_fx"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """Every module's facto_fx imports: (imported module, names taken from it)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("facto_fx"):
                edges.append((node.module, [alias.name for alias in node.names]))
            elif isinstance(node, ast.Import):
                edges += [(alias.name, []) for alias in node.names if alias.name.startswith("facto_fx")]
        found[_module_name(path)] = edges
    return found


def _graph() -> nx.DiGraph:
    modules = _imports()
    graph = nx.DiGraph()
    for module, edges in modules.items():
        graph.add_node(module)
        for target, names in edges:
            # `from facto_fx.ops import relu` imports the module facto_fx.ops.relu when there is one
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for imported in submodules or [target]:
                if imported != module and not module.startswith(imported + "."):
                    graph.add_edge(module, imported)
    return graph


def test_the_import_graph_has_no_cycle():
    """Package __init__ files re-export their children; every other import points one way only."""
    graph = _graph()
    inits = {m for m in graph if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}
    cycles = list(nx.simple_cycles(graph.subgraph(set(graph) - inits)))
    assert cycles == [], cycles


def test_kernels_import_nothing_above_them():
    """triton_ops (kernels) read only the shared shape and codec-format facts, never the ops that call them."""
    for module, edges in _imports().items():
        if module.startswith("facto_fx.triton_ops"):
            shared = ("facto_fx.triton_ops", "facto_fx.shapes", "facto_fx.eb_format")
            outside = [t for t, _ in edges if not t.startswith(shared)]
            assert outside == [], (module, outside)


def test_no_module_imports_another_modules_private_names():
    for module, edges in _imports().items():
        private = [(t, n) for t, names in edges for n in names if n.startswith("_")]
        assert private == [], (module, private)


def test_what_a_match_is_is_a_leaf_that_methods_read_instead_of_the_matcher():
    """facto_fx.matches (match kinds, Match, call arguments) imports no facto_fx module, and no method
    imports the matcher (passes.match), which imports the tracer."""
    modules = _imports()
    assert modules["facto_fx.matches"] == []
    for module, edges in modules.items():
        if module.startswith("facto_fx.methods"):
            assert "facto_fx.passes.match" not in [t for t, _ in edges], module
