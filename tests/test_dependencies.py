"""pyproject.toml declares every third-party module the code imports: a module that only
arrives as a dependency of a dependency disappears when that one stops needing it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"hps", "bot", "db", "pipeline", "cli", "tests", "bench"}
# What runs in the bot image (the base install, no torch) and what needs the worker extra.
BASE_ONLY = ("hps", "db", "bot")
WITH_WORKER = ("pipeline", "cli")
WITH_DEV = ("tests", "bench")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*groups: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for group in groups:
        requirements += project["optional-dependencies"][group]
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


def _third_party_imports(*folders: str) -> dict[str, str]:
    """Top-level module -> a file importing it, anywhere in the file (lazy imports too)."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PROJECT:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _undeclared(folders: tuple[str, ...], declared: set[str]) -> list[str]:
    providers = packages_distributions()
    missing = []
    for module, where in sorted(_third_party_imports(*folders).items()):
        dists = {_normalise(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing.append(f"{module} (imported by {where}; installed by {sorted(dists)})")
    return missing


def test_the_bot_image_s_code_imports_only_base_requirements() -> None:
    assert _undeclared(BASE_ONLY, _declared()) == []


def test_the_worker_code_imports_only_base_and_worker_requirements() -> None:
    assert _undeclared(WITH_WORKER, _declared("worker")) == []


def test_tests_and_benches_import_only_declared_requirements() -> None:
    assert _undeclared(WITH_DEV, _declared("worker", "dev")) == []


def test_the_check_sees_a_module_only_a_dependency_brings() -> None:
    """yarl comes with aiohttp, python-dotenv with pydantic-settings: without their own
    lines the check would name them."""
    declared = _declared() - {"yarl", "python-dotenv"}
    missing = _undeclared(BASE_ONLY, declared)
    assert [m.split()[0] for m in missing] == ["dotenv", "yarl"]


def _closure(requirements: set[str]) -> set[str]:
    """The distributions `requirements` install, their dependencies' too (extras aside)."""
    from importlib.metadata import PackageNotFoundError, requires

    seen: set[str] = set()
    stack = list(requirements)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        stack += [
            _normalise(re.match(r"[A-Za-z0-9._-]+", r).group())
            for r in needs
            if "extra ==" not in r
        ]
    return seen


# What the bot image (`pip install .`, no extras) runs: compose's migrate, bot and scheduler
# services, and the operators' commands run in that container.
BOT_IMAGE_MODULES = (
    "cli",
    "cli.bot",
    "cli.scheduler",
    "cli.db",
    "cli.health",
    "cli.jobs",
    "cli.users",
    "cli.config",
    "cli.models",
    "db.migrate",
    "pipeline.scheduler",
    "bot.client",
)


def test_the_bot_image_runs_without_the_worker_extra() -> None:
    """Importing what the bot, the scheduler and the database tools run, with every module
    only the worker extra installs (torch, numpy, ...) made unimportable, works: the bot
    image has none of them."""
    import json
    import subprocess

    from bot.client import INITIAL_EXTENSIONS

    base = _closure(_declared())
    worker_only = _closure(_declared("worker")) - base
    blocked = sorted(
        module
        for module, dists in packages_distributions().items()
        if {_normalise(d) for d in dists} <= worker_only
    )
    assert {"torch", "numpy", "diffusers"} <= set(blocked)
    script = """
import importlib, json, sys

blocked = set(json.loads(sys.argv[1]))


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the bot image)")
        return None


sys.meta_path.insert(0, NotInstalled())
for module in json.loads(sys.argv[2]):
    importlib.import_module(module)
"""
    modules = [*BOT_IMAGE_MODULES, *INITIAL_EXTENSIONS]
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(blocked), json.dumps(modules)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
