"""The package's architecture, checked from its source: no import cycle between sparsebench's
modules or between its subpackages, the result storage (results/) independent of measuring and of
torch, and no module reaching into another subpackage's private (``_``) modules. Imports are read
with ``ast``, at module level and inside functions alike: a lazy import is still a dependency. An
import under ``if TYPE_CHECKING:`` is not (it names a type for annotations and never runs)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparsebench"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module ``name`` (a module, or a name inside one) is found in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> dict[str, set[str]]:
    """{imported name: ...} of one module: every ``sparsebench`` module it imports (resolved to
    modules) and, under the key "", every outside top-level package it imports."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    inside: set[str] = set()
    outside: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n) for block in ast.walk(tree) if _is_type_checking(block) for stmt in block.body for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "sparsebench" or name.startswith("sparsebench."):
                inside.add(_resolve(name))
            else:
                outside.add(name.split(".")[0])
    inside.discard(module)
    return {"sparsebench": inside, "": outside}


GRAPH = {m: _imports(m)["sparsebench"] for m in MODULES}


def _unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: sparsebench.measure, sparsebench.scenario."""
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _edges_within(cycle: list[str], graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle]


def test_the_walker_sees_lazy_and_relative_imports():
    assert "sparsebench.results.folder" in GRAPH["sparsebench.measure.runner"]  # imported inside run()
    assert "sparsebench.backends.block_sparse" in GRAPH["sparsebench.measure.environment"]  # inside collect()
    # a name imported under `if TYPE_CHECKING:` (for annotations only) is no dependency
    assert "sparsebench.patterns.base" not in GRAPH["sparsebench.patterns.geometry"]
    assert "sparsebench.scenario" in GRAPH["sparsebench.measure.harness"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(", ".join(_edges_within(c, GRAPH)) for c in cycles)


def test_no_import_cycle_between_subpackages():
    units: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for module, targets in GRAPH.items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b:
                units.setdefault(a, set()).add(b)
                why.setdefault((a, b), f"{module} -> {target}")
    cycles = _cycles(units)
    assert not cycles, "subpackage cycles: " + "; ".join(
        ", ".join(why[(a, b)] for a in c for b in sorted(units[a]) if b in c) for c in cycles
    )


def test_results_depend_on_neither_measuring_nor_torch():
    """Result folders are read where no benchmark runs (CI, a laptop): storage imports nothing
    that measures, no backend or pattern, and not torch."""
    for module in (m for m in MODULES if m.startswith("sparsebench.results")):
        imports = _imports(module)
        bad = sorted(
            t
            for t in imports["sparsebench"]
            if t.startswith(("sparsebench.measure", "sparsebench.backends", "sparsebench.patterns"))
        )
        assert not bad, f"{module} imports {bad}"
        assert "torch" not in imports[""], f"{module} imports torch"


def test_no_private_module_is_imported_from_outside_its_subpackage():
    for module, targets in GRAPH.items():
        for target in targets:
            private = [p for p in target.split(".") if p.startswith("_")]
            if private and _unit(module) != _unit(target):
                raise AssertionError(f"{module} imports {target}, private to {_unit(target)}")
