"""No two modules of rils_scale import each other, directly or through others.

Every ``import`` counts, at module level and inside functions: a lazy import only hides a
cycle until the day someone moves it to the top. A piece two modules both need goes to a
third module that both import (``ops/kl_backends.py``, ``data/stream_state.py``,
``checkpoint/export_common.py`` and ``checkpoint/timm_format.py`` came out of such pairs).
Imports under ``if TYPE_CHECKING:`` are not executed and are left out.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "rils_scale"


def _modules() -> Dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str, path: str, modules: Dict[str, str]) -> Dict[str, int]:
    """Modules of the package that ``name`` imports -> line of the first such import."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    skip = _type_checking_nodes(tree)
    deps: Dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            if t in modules and t != name:
                deps.setdefault(t, node.lineno)
    return deps


def _cycles(graph: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_inside_rils_scale():
    modules = _modules()
    assert len(modules) > 50  # the scan found the package
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "rils_scale.ops.kl_backends" in graph["rils_scale.ops.kl_select"]  # the scan sees function-level imports
    report = []
    for component in _cycles(graph):
        members = set(component)
        edges = [f"{a} -> {b} (line {graph[a][b]})" for a in component for b in sorted(graph[a]) if b in members]
        report.append("cycle: " + "; ".join(edges))
    assert report == [], "\n".join(report)


def test_the_scan_finds_a_cycle(tmp_path):
    """The detector itself: two modules that import each other (one lazily) form a cycle."""
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 7}, "d": {"a": 2}}
    assert _cycles(graph) == [["a", "b", "c"]]
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from .y import f\n")
    (pkg / "y.py").write_text("def f():\n    from . import x\n")
    mods = {"p": str(pkg / "__init__.py"), "p.x": str(pkg / "x.py"), "p.y": str(pkg / "y.py")}
    graph = {n: _imports(n, p, mods) for n, p in mods.items()}
    assert graph["p.x"] == {"p.y": 1} and graph["p.y"] == {"p.x": 2}
    assert _cycles(graph) == [["p.x", "p.y"]]
