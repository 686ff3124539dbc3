"""The import graph of btns_vici and btns_libreswan, computed from the sources (ast): no cycles,
and the pure core (btns_vici/core/) imports nothing but itself and the standard library.

Every import counts, at module level or inside a function (a lazy import that only hides a
cycle is still a cycle); only imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "btns_vici": ROOT / "src" / "btns_vici",
    "btns_libreswan": ROOT / "plugins" / "btns-libreswan" / "src" / "btns_libreswan",
}
CORE = "btns_vici.core"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for root in PACKAGES.values():
        assert root.is_dir(), root
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            package = parts[-1] == "__init__"
            if package:
                parts.pop()
            out[".".join(parts)] = (path, package)
    assert len(out) > 50 and set(PACKAGES) <= set(out)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, package: bool, known: dict[str, tuple[Path, bool]]) -> set[str]:
    """Every module ``name`` imports at run time: ours by module name, others by their top-level name."""
    here = name if package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.add(_ours(alias.name, known) or alias.name.partition(".")[0])
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here.split(".")[: len(here.split(".")) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    sub = f"{module}.{alias.name}"
                    found.add(sub if sub in known else _ours(module, known) or module.partition(".")[0])
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def _ours(module: str, known: dict[str, tuple[Path, bool]]) -> str | None:
    """The module of ours that importing ``module`` names (the longest known prefix), if any."""
    parts = module.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: {m for m in _imports(name, p, pkg, known) if m in known} for name, (p, pkg) in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(frozenset(component))
    return out


def _core_violations() -> set[tuple[str, str]]:
    known = _modules()
    bad = set()
    for name, (path, package) in known.items():
        if name != CORE and not name.startswith(CORE + "."):
            continue
        for module in _imports(name, path, package, known):
            inside = module == CORE or module.startswith(CORE + ".")
            if not inside and module not in sys.stdlib_module_names:
                bad.add((name, module))
    return bad


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_count_and_type_checking_ones_do_not(tmp_path: Path) -> None:
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "__init__.py").write_text("")
    (src / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\ndef f():\n    from . import b\n"
    )
    known = {"pkg": (src / "__init__.py", True), "pkg.a": (src / "a.py", False), "pkg.b": (src, False)}
    known["pkg.c"] = (src, False)
    assert _imports("pkg.a", src / "a.py", False, known) == {"typing", "pkg.b"}


def test_no_import_cycles() -> None:
    cycles = [sorted(c) for c in _cycles(_graph())]
    assert cycles == []


def test_core_imports_only_core_and_the_standard_library() -> None:
    assert _core_violations() == set()
