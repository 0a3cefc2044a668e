"""The package's layers, read from its source with ``ast`` (nothing is imported).

Which imports count: every ``import`` and ``from ... import`` of a module of the package, at
module level and inside functions and classes alike (an import in a function still ties the two
modules together, only later); imports under ``if TYPE_CHECKING:`` do not count for cycles (they
never run), but do for what ``transport/`` may name. Importing ``a.b`` is an edge to ``a.b``
only: the parent package's ``__init__`` runs too, but ``torchrunx/__init__.py`` imports its public
names lazily, so that implicit edge would tie everything to everything and say nothing.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "torchrunx"
TRANSPORT = "torchrunx.transport"


@dataclass(frozen=True)
class Edge:
    """One import: ``source`` imports ``target`` at ``line``; ``typing``: under TYPE_CHECKING."""

    source: str
    target: str
    line: int
    typing: bool

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST], typing: bool = False) -> list[tuple[ast.stmt, bool]]:
    """Every import statement in ``nodes``, and whether it sits under ``if TYPE_CHECKING:``."""
    found: list[tuple[ast.stmt, bool]] = []
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, typing))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            found += _imports(node.body, typing=True) + _imports(node.orelse, typing)
        else:
            found += _imports(ast.iter_child_nodes(node), typing)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's modules that ``node`` (in ``module``) imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = []
    for name in names:
        module_of = name
        while module_of and module_of not in MODULES:  # a name inside a module: the module
            module_of = module_of.rpartition(".")[0]
        if module_of:
            found.append(module_of)
    return list(dict.fromkeys(found))


def edges() -> list[Edge]:
    found = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, typing in _imports(tree.body):
            assert isinstance(node, ast.Import | ast.ImportFrom)
            found += [Edge(module, t, node.lineno, typing) for t in _targets(module, node)]
    return [e for e in found if e.target != e.source]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules (more than one) that each reach each other: its import cycles."""
    reach = {v: reachable(v, graph) for v in graph}
    groups = {frozenset(w for w in reach[v] if v in reach[w]) for v in graph}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def shortest_cycle(start: str, graph: dict[str, set[str]]) -> list[str]:
    """A shortest way from ``start`` back to it, to name in a failure."""
    paths, pending = {start: [start]}, [start]
    while pending:
        v = pending.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                pending.append(w)
    return []


def runtime_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in edges():
        if not e.typing:
            graph[e.source].add(e.target)
    return graph


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, pending = {start}, [start]
    while pending:
        for target in graph[pending.pop()] - seen:
            seen.add(target)
            pending.append(target)
    return seen


def test_the_reader_sees_the_package() -> None:
    found = edges()
    assert {"torchrunx.transport.messages", "torchrunx.launcher", "torchrunx.agent"} <= set(MODULES)
    assert any(e.source == "torchrunx.pool" and e.target == "torchrunx.sync" for e in found)
    assert any(e.target == "torchrunx.transport.messages" and not e.typing for e in found)
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [["a", "b", "c"]]
    assert shortest_cycle("b", toy) == ["b", "c", "a", "b"]


def test_no_import_cycle() -> None:
    graph = runtime_graph()
    found = cycles(graph)
    described = [" -> ".join(shortest_cycle(group[0], graph)) for group in found]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_transport_imports_nothing_above_it() -> None:
    upward = [
        str(e)
        for e in edges()
        if (e.source == TRANSPORT or e.source.startswith(f"{TRANSPORT}."))
        and not (e.target == TRANSPORT or e.target.startswith(f"{TRANSPORT}."))
    ]
    assert not upward, "transport/ imports from above it:\n" + "\n".join(upward)


def test_the_hosts_receiver_stays_off_the_launchers_side() -> None:
    """``python -m torchrunx.sync_host`` on a host imports none of the launcher's modules.

    Python runs the package's ``__init__`` first: it imports its public names at first use only.
    """
    graph = runtime_graph()
    assert graph["torchrunx"] == set()
    reached = reachable("torchrunx.sync_host", graph)
    assert not reached & {"torchrunx.sync", "torchrunx.launcher", "torchrunx.pool"}, sorted(reached)
