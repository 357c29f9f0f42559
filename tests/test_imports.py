"""The shape of dorafit's imports: no cycles, the library never imports the CLI, fast help.

The graph is read from the source by AST (every ``import`` statement, at module level or
inside a function, except those under ``if TYPE_CHECKING:``), so a lazy import that closes a
cycle counts as much as a top-level one. ``from pkg import name`` is an edge to the submodule
``pkg.name`` when that file exists, else to ``pkg`` itself. Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``, so those are edges too, except for packages that contain the
importing module: Python has started them before the module's first line runs, so importing
them never runs their ``__init__`` again.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "dorafit"
HEAVY = ("transformers", "peft", "datasets")
SUBCOMMANDS = ("train", "eval", "merge", "convert", "analyze", "bench")


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the dorafit modules it imports}."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _resolve_from(name, is_package, node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                parts = target.split(".")
                for end in range(1, len(parts) + 1):
                    module = ".".join(parts[:end])
                    if module in modules and module != name and not name.startswith(module + "."):
                        edges.add(module)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_walker_sees_a_lazy_cycle(tmp_path):
    """The check itself: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycle_in_dorafit():
    graph = import_graph(module_files())
    assert "dorafit.train.trainer" in graph and graph["dorafit.train.trainer"]  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_the_cli():
    graph = import_graph(module_files())
    cli = {m for m in graph if m == "dorafit.cli" or m.startswith("dorafit.commands")} | {"dorafit.__main__"}
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if m not in cli for t in targets & cli)
    assert not offenders, offenders


def _modules_after_help(argv: list[str]) -> tuple[int, list[str]]:
    """Run the CLI's parser on ``argv`` in a fresh interpreter; (exit code, heavy modules loaded)."""
    code = (
        "import json, sys\n"
        "from dorafit.cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    rc = exit.code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "sys.stdout.write('\\n@@' + json.dumps([rc, heavy]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rc, heavy = json.loads(done.stdout.rsplit("@@", 1)[1])
    return rc, heavy


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS])
def test_help_imports_no_heavy_library(argv):
    rc, heavy = _modules_after_help(argv)
    assert rc == 0
    assert not heavy, f"dorafit {' '.join(argv)} imported {heavy[:5]}"


def test_import_registers_no_optimizer_hook():
    """The norm cache counts optimizer steps with a global hook: added by the first adapter built,
    not by ``import dorafit`` (a library import must not change every optimizer of the process)."""
    code = (
        "import torch\n"
        "import torch.optim.optimizer as o\n"
        "import dorafit\n"
        "before = len(o._global_optimizer_post_hooks)\n"
        "dorafit.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), dorafit.AdapterConfig(targets=['0'], rank=2))\n"
        "print(before, len(o._global_optimizer_post_hooks))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"]


def test_no_command_imports_another_command():
    """Each subcommand module stands alone: what several share lives in the library
    (``dorafit.loading``, ``dorafit.train.kinds``), never in another command module."""
    graph = import_graph(module_files())
    commands = {m for m in graph if m.startswith("dorafit.commands.")}
    offenders = sorted(f"{m} -> {t}" for m in commands for t in graph[m] & commands)
    assert commands and not offenders, offenders


@pytest.mark.parametrize("first", ["dorafit.merged_weights", "__import__('dorafit.merge')", "dorafit.export_lora"])
def test_a_public_function_is_not_shadowed_by_its_module(first):
    """``dorafit.merge`` is the function, whichever public name or submodule was loaded first:
    importing the submodule ``dorafit/merge.py`` (as ``merged_weights`` does) must not replace it."""
    code = f"import dorafit, types; {first}; assert callable(dorafit.merge) and not isinstance(dorafit.merge, types.ModuleType)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE_ROOT.parent)
    assert done.returncode == 0, done.stderr[-2000:]
