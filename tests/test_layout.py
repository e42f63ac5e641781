"""The tree reads as the architecture: one folder per concern, no module over 400 lines, no import cycle (not even
one that only the type checker follows), and tests that mirror the packages. Pure: reads the source, imports
nothing of it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import REPO_ROOT

MAX_LINES = 400
CODE = ("pipeline", "connectors")
# What stands at the top of pipeline/: the entry points and what every concern shares.
TOP_MODULES = {"__init__.py", "__main__.py", "cli", "config", "domain.py", "errors.py", "metrics.py"}
CONCERNS = {"api", "bench", "console", "kafka", "ops", "policy", "process", "stack", "stages", "state"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in CODE:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules `name` imports at module level, `if TYPE_CHECKING:` blocks included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def walk(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            if isinstance(node, ast.If | ast.Try):
                yield from walk(node.body)
                yield from walk(node.orelse)
            yield node

    for node in walk(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:  # relative: from the package, one level up per extra dot
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                # `from package import module` needs the module; `from module import name` needs the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            if component:
                found.append(sorted([*component, node]))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_is_over_400_lines() -> None:
    long = {name: lines for name, path in modules().items()
            if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_import_cycle_not_even_for_types() -> None:
    known = modules()
    assert cycles({name: imports_of(name, path, known) for name, path in known.items()}) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_pipeline_top_level_holds_only_the_shared_modules_and_one_folder_per_concern() -> None:
    entries = {p.name for p in (REPO_ROOT / "pipeline").iterdir() if p.name != "__pycache__"}
    assert entries == TOP_MODULES | CONCERNS
    for concern in CONCERNS:
        assert (REPO_ROOT / "pipeline" / concern / "__init__.py").read_text().startswith('"""'), concern


def test_tests_mirror_the_packages() -> None:
    tests = REPO_ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in ("__pycache__", ".pytest_cache")}
    # a folder per package (plus connectors/, e2e/ for the whole pipeline, support/ for shared helpers)
    assert folders <= CONCERNS | {"connectors", "e2e", "support"}, folders - CONCERNS
    at_top = {p.name for p in tests.glob("*.py")}
    # only the shared fixtures and the tests of what stands at pipeline/'s top
    assert at_top == {"conftest.py", "test_layout.py", "test_metrics_policy.py"}
