"""Layering: no import cycles between the modules of tvm_hapm (lazy, function-level imports
included), and no private name used outside its module (package, tests, benchmarks, examples)."""

from __future__ import annotations

import ast
from pathlib import Path

import tvm_hapm

ROOT = Path(tvm_hapm.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = ".".join(filter(None, [base if node.level else "", node.module or ""]))
                for alias in node.names:  # "from pkg import module" imports the module
                    sub = f"{target}.{alias.name}"
                    graph[name].add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names)
        graph[name] = {m for m in graph[name] if m in modules and m != name}
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph):
    """Drop the edges into package ``__init__`` modules from their own submodules (a submodule
    reading a sibling through its package, ``from . import x``, is resolved to ``x`` above)."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_no_import_cycles():
    assert _cycles(_without_package_inits(_import_graph())) == []


def test_the_checker_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def _private_uses() -> list[str]:
    """``file:line name`` of every private name (``_x``, not dunder) of a tvm_hapm module used
    outside the module that defines it: imported by name, read as an attribute of an imported
    module, or a private module imported from outside its package."""
    modules = {_module_name(p) for p in ROOT.rglob("*.py")}
    repo = ROOT.parent
    files = [*ROOT.rglob("*.py")]
    for folder in ("tests", "benchmarks", "examples"):
        files += sorted((repo / folder).rglob("*.py"))
    found = []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for path in files:
        inside = path.is_relative_to(ROOT)
        me = _module_name(path) if inside else ""
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        aliases = {}  # local name -> tvm_hapm module
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = ".".join(filter(None, [base if node.level else "", node.module or ""]))
                if target not in modules:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        aliases[alias.asname or alias.name] = sub
                    # a private module is its package's; a private name its module's
                    owner = target if sub in modules else sub
                    if private(alias.name) and not (me + ".").startswith(
                        owner.rpartition(".")[0] + "."
                    ):
                        found.append(f"{path.relative_to(repo)}:{node.lineno} {sub}")
                    if any(private(part) for part in target.split(".")) and not (
                        (me + ".").startswith(target.rpartition(".")[0] + ".")
                    ):
                        found.append(f"{path.relative_to(repo)}:{node.lineno} {target}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and private(node.attr)
                and aliases[node.value.id] != me
            ):
                found.append(
                    f"{path.relative_to(repo)}:{node.lineno} {aliases[node.value.id]}.{node.attr}"
                )
    return sorted(set(found))


def test_no_private_name_is_used_outside_its_module():
    assert _private_uses() == []


def test_production_modules_do_not_import_the_test_oracles():
    """The direct generator and the scalar mid model live in ``tvm_hapm.testing``: oracles the
    tests compare the production path against, outside its import graph (one production path:
    every accelerated layer is compiled through TIR)."""
    graph = _import_graph()
    production = {m for m in graph if not m.startswith("tvm_hapm.testing")}
    assert "tvm_hapm.testing.direct_codegen" in graph
    oracle_users = {
        m: sorted(d for d in graph[m] if d.startswith("tvm_hapm.testing")) for m in production
    }
    assert {m: deps for m, deps in oracle_users.items() if deps} == {}
    assert not any(name.endswith("codegen") for name in graph if name.startswith("tvm_hapm.target"))
