"""The product's modules import one another one way: no loop, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("resumable", "cli")  # the library a user installs, and the text-training CLI built on it


def import_graph(directory: Path) -> dict[str, set[str]]:
    """Module name -> the modules of `directory` it imports anywhere in its text (top level or inside a function).

    The entry points beside launch.sh are named by file (`train_loop`), the packages' modules by package
    (`resumable.state`, `cli.config`); `from resumable import state` imports `resumable.state`.
    """
    modules = {path.stem: path for path in directory.glob("*.py")}
    for package in PACKAGES:
        modules.update({f"{package}.{path.stem}": path for path in (directory / package).glob("*.py") if path.stem != "__init__"})
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name if alias.name.split(".")[0] in PACKAGES else alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module in PACKAGES:
                    imported.update(f"{node.module}.{alias.name}" for alias in node.names)
                else:
                    imported.add(node.module if node.module.split(".")[0] in PACKAGES else node.module.split(".")[0])
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None (depth-first search, sorted for a stable message)."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph[name]):
            if cycle := visit(other):
                return cycle
        path.pop()
        done.add(name)
        return None

    return next((cycle for name in sorted(graph) if (cycle := visit(name))), None)


def test_find_cycle_sees_a_loop_through_a_lazy_import(tmp_path):
    (tmp_path / "config.py").write_text("import os\nfrom data import TASKS\n")
    (tmp_path / "data.py").write_text("def f():\n    from streaming import x\n")
    (tmp_path / "streaming.py").write_text("def g():\n    from config import UsageError\n")
    (tmp_path / "errors.py").write_text("")
    assert find_cycle(import_graph(tmp_path)) == ["config", "data", "streaming", "config"]
    (tmp_path / "streaming.py").write_text("def g():\n    from errors import UsageError\n")
    assert find_cycle(import_graph(tmp_path)) is None


@pytest.mark.quick
def test_the_product_has_no_import_loop():
    graph = import_graph(REPO)
    assert {"cli.config", "cli.data", "cli.streaming", "train_loop", "resumable.errors", "resumable.state", "resumable.run"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import loop: " + " -> ".join(cycle)
    assert graph["resumable.errors"] == set(), "resumable/errors.py is the ground floor: it imports nothing of ours"


@pytest.mark.quick
def test_the_library_imports_nothing_of_the_cli():
    """The layout's promise: resumable/ is what a user installs; the CLI (cli/ and the entry points beside launch.sh) is built on it, never the other way."""
    graph = import_graph(REPO)
    library = {name: imported for name, imported in graph.items() if name.startswith("resumable.")}
    reaching_out = {name: sorted(other for other in imported if not other.startswith("resumable.")) for name, imported in library.items()}
    assert {name: found for name, found in reaching_out.items() if found} == {}
