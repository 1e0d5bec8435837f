"""Properties of the code's shape that keep it easy to change."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fused_ls"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, modules) -> set[str]:
    """The modules of `modules` that `source` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fused_ls import x` imports the module fused_ls.x where there is one.
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path.read_text(), modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_imports_inside_the_package_flow_one_way():
    graph = _import_graph()
    assert "fused_ls._core" in graph and graph["fused_ls.functional"], "the graph was not read"
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import():
    # The check itself can fail: a back edge inside a function counts as much as one at the top.
    modules = {"fused_ls", "fused_ls.functional", "fused_ls.parallel", "fused_ls._core"}
    sources = {
        "fused_ls.functional": "from fused_ls import _core\ndef f():\n    from fused_ls.parallel import g\n",
        "fused_ls.parallel": "import torch\ndef g():\n    from fused_ls import functional, _core\n",
        "fused_ls._core": "import math\n",
    }
    graph = {name: _imports(source, modules) for name, source in sources.items()}
    assert graph["fused_ls.parallel"] == {"fused_ls.functional", "fused_ls._core"}
    assert _cycles(graph) == [["fused_ls.functional", "fused_ls.parallel", "fused_ls.functional"]]
