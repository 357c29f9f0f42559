"""Several named adapters on one model, and switching them off for a block.

Each adapted layer stays one flat adapter (``lora_a``, ``lora_b``, ``magnitude``): a model with
adapters "math" and "code" holds two sets of adapter layers that wrap the same frozen base
modules, and only the active set sits in the module tree. The others are kept on the root
module in a plain dict (not registered as submodules), so ``parameters()``, ``state_dict()``,
optimizers and ``model.to`` see the active adapter alone, and its forward is exactly the
single-adapter forward: one active adapter costs what one adapter costs.

    attach(model, cfg, name="math")     the first adapter becomes active
    attach(model, cfg2, name="code")    later ones are added inactive (as PEFT's add_adapter)
    set_adapter(model, "code")          swap the layer sets: setattr per module, no copies
    delete_adapter(model, "math")
    with disable_adapter(model): ...    the base model's outputs (a flag per layer, no copies)

Adapter names are checked the same way by every call that takes one (``check_adapter_name``:
a non-empty identifier). ``disable_adapter`` holds for its whole block: an adapter activated,
attached or loaded inside the block computes the base's outputs too until the block ends.

A batch cannot mix adapters: every row of a forward goes through the active one. An inactive
adapter is moved to its base's device when it is activated (``model.to`` moved only the
active one).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

from torch import nn

from .config import AdapterConfig
from .files import brief
from .layers import AdapterError, AdapterLayer

# Attributes on the root module: {name: NamedAdapter} and the active adapter's name.
ADAPTERS_ATTR = "_dorafit_adapters"
ACTIVE_ATTR = "dorafit_active_adapter"
DEFAULT_NAME = "default"
# Attribute on the root module recording the config of the active adapter.
CONFIG_ATTR = "dorafit_config"
# Attribute on the root module: how many ``disable_adapter`` blocks are open around it.
DISABLED_ATTR = "_dorafit_disabled"
# What an adapter may be called: a non-empty identifier (letters, digits, "_", "-"), so that a name
# is the same word in every API, in PEFT's "lora_A.<name>.weight" keys and on the command line.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
# Marker of the instance-level ``save_pretrained`` that ``attach`` installs (see ``dorafit.hub``).
SAVE_HOOK_MARKER = "_dorafit_save_pretrained"
# The adapter-only writer ``model.save_pretrained`` becomes. ``dorafit.hub`` provides it when it is
# imported (``install_save_pretrained`` imports it on first need); this module stays below the
# file formats it needs.
_save_pretrained_writer: Optional[Callable] = None


class ModulesToSave(nn.Module):
    """A fully trainable copy of a module (e.g. a classification head) saved with the adapter.

    ``original`` is kept frozen so that ``detach`` can restore it (and ``disable_adapter``
    can compute with it).
    """

    adapter_disabled: bool = False  # set by ``dorafit.disable_adapter``

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.trainable = copy.deepcopy(original)
        for p in self.original.parameters():
            p.requires_grad_(False)
        for p in self.trainable.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        if self.adapter_disabled:
            return self.original(*args, **kwargs)
        return self.trainable(*args, **kwargs)



def set_save_pretrained_writer(writer: Callable) -> None:
    """Register the function that ``model.save_pretrained`` runs on an adapted transformers model."""
    global _save_pretrained_writer
    _save_pretrained_writer = writer


def _is_transformers_model(model: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, getattr(modeling, "PreTrainedModel", ()))


def install_save_pretrained(model: nn.Module) -> None:
    """Shadow ``model.save_pretrained`` with the adapter-only writer (transformers models only)."""
    if not _is_transformers_model(model) or SAVE_HOOK_MARKER in model.__dict__:
        return
    if _save_pretrained_writer is None:
        importlib.import_module(".hub", __package__)  # registers the writer (``import dorafit`` is lazy)
    # A partial, not a bound method: it pickles by reference (torch.save(model), copy.deepcopy).
    model.__dict__["save_pretrained"] = functools.partial(_save_pretrained_writer, model)
    model.__dict__[SAVE_HOOK_MARKER] = True


def remove_save_pretrained(model: nn.Module) -> None:
    """Give the model its class's ``save_pretrained`` back (after detach or merge)."""
    if model.__dict__.pop(SAVE_HOOK_MARKER, None):
        model.__dict__.pop("save_pretrained", None)


@dataclass
class NamedAdapter:
    """One adapter of a model: its config, its layers and modules_to_save copies by module name."""

    config: AdapterConfig
    layers: Dict[str, AdapterLayer] = field(default_factory=dict)
    saves: Dict[str, nn.Module] = field(default_factory=dict)
    trainable: bool = True


def check_adapter_name(name) -> None:
    """Raise AdapterError unless ``name`` is a valid adapter name (every API that takes one calls this)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"adapter name {brief(name)} is not valid: use a non-empty identifier of letters, digits, '_' and '-' "
            "(not starting with a digit or '-', at most 64 characters), e.g. 'math'")


def _is_disabled(model: nn.Module) -> bool:
    return model.__dict__.get(DISABLED_ATTR, 0) > 0


def _set_disabled(modules, disabled: bool) -> None:
    for m in modules:
        if isinstance(m, (AdapterLayer, ModulesToSave)):
            m.adapter_disabled = disabled


def registry(model: nn.Module) -> Dict[str, NamedAdapter]:
    """The model's {name: NamedAdapter} (empty when it has none); stored outside the module tree."""
    return model.__dict__.get(ADAPTERS_ATTR, {})


def active_adapter(model: nn.Module) -> Optional[str]:
    """The name of the adapter the model computes with, or None."""
    return model.__dict__.get(ACTIVE_ATTR)


def list_adapters(model: nn.Module) -> List[str]:
    """Names of the model's adapters, in the order they were attached."""
    return list(registry(model))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def register_active(model: nn.Module, name: str, config: AdapterConfig) -> None:
    """Record the adapter layers now in the tree as adapter ``name`` (called by ``attach``)."""
    entry = NamedAdapter(config=config)
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            entry.layers[module_name] = module
        elif isinstance(module, ModulesToSave):
            entry.saves[module_name] = module
    adapters = dict(registry(model))
    adapters[name] = entry
    model.__dict__[ADAPTERS_ATTR] = adapters
    model.__dict__[ACTIVE_ATTR] = name
    if _is_disabled(model):  # attached or loaded inside ``disable_adapter``: off until the block ends
        _set_disabled(list(entry.layers.values()) + list(entry.saves.values()), True)


def swap_out(model: nn.Module) -> Optional[str]:
    """Put the base modules back in place of the active adapter's; returns its name (or None)."""
    name = active_adapter(model)
    if name is None:
        return None
    entry = registry(model)[name]
    for module_name, layer in entry.layers.items():
        _set_submodule(model, module_name, layer.base)
    for module_name, saved in entry.saves.items():
        _set_submodule(model, module_name, saved.original)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    model.__dict__[ACTIVE_ATTR] = None
    return name


def swap_in(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one (nothing else may be active)."""
    entry = registry(model)[name]
    for module_name, layer in list(entry.layers.items()) + list(entry.saves.items()):
        inner = layer.base if isinstance(layer, AdapterLayer) else layer.original
        current = model.get_submodule(module_name)
        if current is not inner:
            raise AdapterError(
                f"adapter {name!r}: module {module_name!r} is no longer the base module it was attached to "
                f"(now a {type(current).__name__}); was the model changed by hand?"
            )
    for module_name, layer in entry.layers.items():
        weight = getattr(layer.base, "weight", None)
        if weight is not None:
            layer.to(device=weight.device)  # model.to moved only the active adapter
        for pname in layer.adapter_parameter_names():
            getattr(layer, pname).requires_grad_(entry.trainable)
        _set_submodule(model, module_name, layer)
    for module_name, saved in entry.saves.items():
        for p in saved.trainable.parameters():
            p.requires_grad_(entry.trainable)
        _set_submodule(model, module_name, saved)
    _set_disabled(list(entry.layers.values()) + list(entry.saves.values()), _is_disabled(model))
    setattr(model, CONFIG_ATTR, entry.config)
    model.__dict__[ACTIVE_ATTR] = name


def _check_name(model: nn.Module, name: str) -> NamedAdapter:
    check_adapter_name(name)
    adapters = registry(model)
    if name not in adapters:
        raise AdapterError(f"the model has no adapter named {name!r} (it has: {list(adapters) or 'none'})")
    return adapters[name]


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the one the model computes and trains with; returns the model."""
    _check_name(model, name)
    if active_adapter(model) != name:
        swap_out(model)
        swap_in(model, name)
    return model


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Whether adapter ``name``'s parameters require gradients (now and whenever it is active)."""
    entry = _check_name(model, name)
    entry.trainable = bool(trainable)
    for layer in entry.layers.values():
        for pname in layer.adapter_parameter_names():
            getattr(layer, pname).requires_grad_(entry.trainable)
    for saved in entry.saves.values():
        for p in saved.trainable.parameters():
            p.requires_grad_(entry.trainable)


def clear(model: nn.Module) -> None:
    """Forget every adapter record (after ``detach`` or ``merge`` put plain modules back)."""
    model.__dict__.pop(ADAPTERS_ATTR, None)
    model.__dict__.pop(ACTIVE_ATTR, None)


def rename_adapter(model: nn.Module, old: str, new: str) -> None:
    """File adapter ``old`` under the name ``new`` (order and activity kept)."""
    _check_name(model, old)
    check_adapter_name(new)
    if new != old and new in registry(model):
        raise AdapterError(f"the model has an adapter named {new!r} already")
    model.__dict__[ADAPTERS_ATTR] = {(new if k == old else k): v for k, v in registry(model).items()}
    if active_adapter(model) == old:
        model.__dict__[ACTIVE_ATTR] = new


# What ``attach`` records on the root module besides the registry; set aside while a further
# adapter is built on the bare model, so that the first attach's records survive.
_ROOT_RECORDS = (ADAPTERS_ATTR, ACTIVE_ATTR, "_dorafit_requires_grad")


@contextlib.contextmanager
def adding_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Build one more adapter: inside the block the model is bare (no adapter in the tree, no
    records), so ``attach`` / ``load_adapter`` work as on a fresh model; after it, what they
    attached is filed under ``name``, inactive, and the previously active adapter is back.
    On error nothing new is kept."""
    check_adapter_name(name)
    if name in registry(model):
        raise AdapterError(
            f"the model has an adapter named {name!r} already; delete it first or choose another name"
        )
    previous = swap_out(model)
    stash = {k: model.__dict__.pop(k) for k in _ROOT_RECORDS if k in model.__dict__}
    entry = None
    try:
        yield
        built = active_adapter(model)
        if built is not None:
            entry = registry(model)[built]
            entry.trainable = True
    finally:
        if active_adapter(model) is not None:
            swap_out(model)
        for k in _ROOT_RECORDS:
            model.__dict__.pop(k, None)
        model.__dict__.update(stash)
        if entry is not None:
            model.__dict__[ADAPTERS_ATTR] = {**registry(model), name: entry}
        if previous is not None:
            swap_in(model, previous)


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model):`` the model computes its base model's outputs exactly.

    Each adapter layer forwards to its frozen base module and modules_to_save copies to their
    originals; entering sets one flag per module of every adapter (active or not: no weights are
    copied or moved), leaving clears it, also on error. The block holds whatever happens inside
    it: an adapter activated with ``set_adapter`` or added by ``attach`` / ``load_adapter`` is
    disabled too until the block ends. Blocks nest. Used as the reference model of DPO-style training.
    """
    model.__dict__[DISABLED_ATTR] = model.__dict__.get(DISABLED_ATTR, 0) + 1
    _set_disabled(_all_adapter_modules(model), True)
    try:
        yield model
    finally:
        depth = model.__dict__.get(DISABLED_ATTR, 1) - 1
        if depth > 0:
            model.__dict__[DISABLED_ATTR] = depth
        else:
            model.__dict__.pop(DISABLED_ATTR, None)
            _set_disabled(_all_adapter_modules(model), False)


def _all_adapter_modules(model: nn.Module) -> List[nn.Module]:
    """Every adapter layer and modules_to_save copy of the model: in the tree and of inactive adapters."""
    found = {id(m): m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSave))}
    for entry in registry(model).values():
        for m in list(entry.layers.values()) + list(entry.saves.values()):
            found.setdefault(id(m), m)
    return list(found.values())
