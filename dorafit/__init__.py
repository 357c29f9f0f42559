"""dorafit: DoRA (Weight-Decomposed Low-Rank Adaptation, Liu et al., ICML 2024) for PyTorch.

The public names below are imported on first use (PEP 562), so that ``import dorafit`` and the
command line's start cost nothing until torch is needed, and a Ctrl-C while torch loads reaches
the command line's one-line handler instead of a traceback from the package's first line.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "active_adapter": "adapters", "disable_adapter": "adapters", "list_adapters": "adapters",
    "set_adapter": "adapters",
    "AdapterConfig": "config", "ConfigError": "config",
    "TrainableReport": "inject", "adapter_modules": "inject", "adapter_state_dict": "inject",
    "attach": "inject", "delete_adapter": "inject", "detach": "inject", "trainable_report": "inject",
    "AdapterFileError": "io", "load_adapter": "io", "save_adapter": "io",
    "AdapterError": "layers", "AdapterLayer": "layers",
    "invalidate_norm_caches": "layers.cache", "materialize": "deferred_init",
    "push_adapter_to_hub": "hub",
    "merge": "merge", "merged_weights": "merge", "unmerge": "merge",
    "export_lora": "export",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Relative to this package, whatever its name: a copy loaded beside dorafit under another name
    # (``dorafit.bench.load_dorafit_copy``) must use its own modules, not the installed ones.
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """The package object. Importing a submodule sets it as an attribute of the package; where a
    public function bears the submodule's name (``dorafit.merge``, the function, is defined in
    ``dorafit/merge.py``), the function stays the attribute, whichever is loaded first."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
