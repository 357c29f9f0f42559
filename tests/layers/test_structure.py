"""The shape of ``dorafit.layers``, held so that it stays readable.

- ``AdapterLayer`` keeps the parameters, the layout hooks, merge and the reference forward: at
  most 25 methods, none about caching (that is ``cache``), and a forward of a few lines (which
  path runs is ``compose``);
- no function in the package is longer than 40 lines; ``base.py`` stays under 350;
- ``is_compiling()`` is asked only by the cache and the compose module;
- GPT-2's Conv1D shares the linear paths: its adapter only says how its weight is stored.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import dorafit
from dorafit.layers import AdapterLayer, Conv1DAdapter, LinearAdapter
from dorafit.layers.linear import LinearLayout

PACKAGE = pathlib.Path(dorafit.__file__).parent
LAYERS = PACKAGE / "layers"


def _functions(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_adapter_layer_methods_are_few_and_none_about_caching():
    methods = [name for name, value in vars(AdapterLayer).items() if inspect.isfunction(value) or isinstance(value, property)]
    assert len(methods) <= 25, methods
    caching = [m for m in methods if re.search(r"cache|stale|fresh|kept|keep|key", m)]
    assert not caching, caching


def test_adapter_layer_forward_is_short():
    lines = inspect.getsource(AdapterLayer.forward).strip().splitlines()
    assert len(lines) <= 12, lines


def test_no_function_in_layers_is_over_40_lines():
    long = [
        (path.name, f.name, f.end_lineno - f.lineno + 1)
        for path in sorted(LAYERS.glob("*.py"))
        for f in _functions(path)
        if f.end_lineno - f.lineno + 1 > 40
    ]
    assert not long, long


def test_base_module_stays_small():
    assert len((LAYERS / "base.py").read_text().splitlines()) <= 350


def test_is_compiling_only_in_cache_and_compose():
    users = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "is_compiling(" in path.read_text()
    )
    assert users == ["layers/cache.py", "layers/compose.py"], users


def test_gpt2_conv1d_shares_the_linear_paths():
    assert issubclass(Conv1DAdapter, LinearLayout) and issubclass(LinearAdapter, LinearLayout)
    own = {name for name, value in vars(Conv1DAdapter).items() if callable(value) or isinstance(value, property)}
    assert own <= {"base_type", "features", "base_weight_2d", "weight_from_2d"}, own
