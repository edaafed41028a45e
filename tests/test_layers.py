"""The project's layers, read from the source: every import (module level, inside functions
and under `TYPE_CHECKING`) points down or sideways within its own package, and no modules
import each other in a circle.

    cli/               the `hps` command                              (top)
    bot/   pipeline/   side by side; neither imports the other
    db/                all SQL, the registry's rules
    hps/               the ground: settings, logging, the store       (bottom)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Package -> layer; an import may go to a lower layer or stay inside its own package.
LAYERS = {"cli": 3, "bot": 2, "pipeline": 2, "db": 1, "hps": 0}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (a `from package import x`
    names the module `package.x` when x is one, else the package)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                parent = ".".join([*base, *([node.module] if node.module else [])])
            else:
                parent = node.module or ""
            targets = [
                f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in modules else parent
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] not in LAYERS:
                continue
            # `import db.jobs` names db.jobs; a name inside a module names the module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for source, targets in graph().items():
        here = source.split(".")[0]
        for target in targets:
            there = target.split(".")[0]
            if there != here and LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles() -> None:
    cycles = strongly_connected(graph())
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(
        " <-> ".join(sorted(group)) for group in cycles
    )


def test_the_checker_sees_a_violation() -> None:
    """The two checks can fail: a made-up graph with an upward import and a cycle."""
    edges = {"db.a": {"db.b"}, "db.b": {"db.a"}, "hps.x": set()}
    assert strongly_connected(edges) == [{"db.a", "db.b"}]
    modules = {"hps.settings": ROOT / "hps/settings.py", "bot.client": ROOT / "bot/client.py"}
    source = ROOT / "hps" / "settings.py"
    assert "bot.client" not in imports_of("hps.settings", source, modules)
