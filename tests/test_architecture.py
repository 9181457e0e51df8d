"""The package's shape: imports run one way, the schema imports nothing of the package, and no module
reaches into another's private names. Read from the source (every import statement, function-level
ones included), so a cycle that only closes at run time is found too."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "clipo_nemo"


def _modules() -> Dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(modules: Dict[str, Path]) -> Tuple[Dict[str, Set[str]], List[Tuple[str, str, str]]]:
    """(module -> the package modules it imports, [(importer, imported module, private name)]).

    Importing ``a.b.c`` also runs the packages ``a.b`` and ``a`` (their ``__init__``), so those count
    as imported too (but a module's own enclosing packages do not: Python has run them already)."""
    edges: Dict[str, Set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [(f"{module}.{alias.name}", None) if f"{module}.{alias.name}" in modules
                           else (module, alias.name) for alias in node.names]
            else:
                continue
            for target, imported_name in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                edges[name].add(target)
                parent = target.rpartition(".")[0]
                while parent:
                    if parent in modules and not name.startswith(parent + "."):
                        edges[name].add(parent)
                    parent = parent.rpartition(".")[0]
                if imported_name and imported_name.startswith("_") and not imported_name.startswith("__"):
                    private.append((name, target, imported_name))
    return edges, private


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_analysis_finds_a_cycle():
    """The checks below can fail: a two-module circle through a function-level import is found."""
    edges = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert _cycles(edges) == [["p.a", "p.b"]]
    assert _cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_no_import_cycles():
    edges, _ = _imports(_modules())
    assert _cycles(edges) == []


def test_config_schema_imports_nothing_of_the_package():
    edges, _ = _imports(_modules())
    assert edges["clipo_nemo.config"] <= {"clipo_nemo"}


def test_no_private_name_crosses_modules():
    _, private = _imports(_modules())
    assert private == []


def test_checkpoint_package_sits_below_the_trainer():
    edges, _ = _imports(_modules())
    upward = {(module, target) for module, targets in edges.items() if module.startswith("clipo_nemo.checkpoint")
              for target in targets if target.startswith("clipo_nemo.trainer")}
    assert upward == set()
