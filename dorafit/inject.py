"""Attach and detach adapters on any nn.Module by model surgery.

``attach`` finds the target modules by name, checks everything first (config, matches, module
types, ranks against each layer's shape, finite base weights, the adapter's name), then swaps
each target for an adapter with ``setattr(parent, name, adapter)``. Pattern matching is bounded in
time (``config.bounded_matching``), so a hostile pattern from a downloaded config cannot hang it.
Only adapter parameters (and ``modules_to_save`` copies) stay trainable. The single extension
point is ``ADAPTER_TYPES``: {module type -> adapter class}.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import nn

from .config import AdapterConfig, ConfigError, bounded_matching, pattern_matches, resolve_module_options
from .files import brief
from .layers import AdapterError, AdapterLayer, Conv1DAdapter, ConvAdapter, EmbeddingAdapter, LinearAdapter
from .layers.quantized import keep_4bit_layers_trainable, release_4bit_layers
from .layers.vera import build_vera_adapter, build_vera_shared

# Named adapters and the adapter-only save_pretrained (their own modules; no model class is
# subclassed).
from .adapters import (  # noqa: F401  (CONFIG_ATTR, ModulesToSave: re-exported, their home was here)
    ADAPTERS_ATTR,
    CONFIG_ATTR,
    DEFAULT_NAME,
    ModulesToSave,
    _check_name,
    active_adapter,
    check_adapter_name,
    adding_adapter,
    install_save_pretrained,
    register_active,
    registry,
    remove_save_pretrained,
    swap_in,
    swap_out,
)
from .adapters import clear as clear_adapters

ADAPTER_TYPES: Dict[Type[nn.Module], Type[AdapterLayer]] = {
    nn.Linear: LinearAdapter,
    nn.Conv1d: ConvAdapter,
    nn.Conv2d: ConvAdapter,
    nn.Conv3d: ConvAdapter,
    nn.Embedding: EmbeddingAdapter,
}

# Method -> factory(module, adapter class, options) for methods that need their own layer
# classes (VeRA-style); "lora", "dora" and "magnitude" use the classes above directly.
METHOD_BUILDERS: Dict[str, Callable[..., AdapterLayer]] = {
    "vera": build_vera_adapter,
    "dvora": build_vera_adapter,
}

# (factory, methods): state shared by all of a model's layers using any of ``methods``, built
# once per attach from [(name, module, rank)] and the config, and given to their builders as
# ``shared=`` (VeRA's frozen random matrices: one pair per model for "vera" and "dvora" alike).
SHARED_STATE_FACTORIES: List[Tuple[Callable[..., object], Tuple[str, ...]]] = [
    (build_vera_shared, ("vera", "dvora")),
]

# Attribute on the root module recording each parameter's requires_grad before attach.
REQUIRES_GRAD_ATTR = "_dorafit_requires_grad"


def adapter_types() -> Dict[Type[nn.Module], Type[AdapterLayer]]:
    """The dispatch table, plus transformers' GPT-2 Conv1D when transformers is loaded.

    A model containing a Conv1D has imported transformers already, so this never imports it.
    """
    table = dict(ADAPTER_TYPES)
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is not None and hasattr(pytorch_utils, "Conv1D"):
        table[pytorch_utils.Conv1D] = Conv1DAdapter
    # bitsandbytes' quantized layers subclass nn.Linear: their own entries must win the MRO walk.
    if "bitsandbytes" in sys.modules:
        from .layers.quantized import quantized_adapter_types

        table.update(quantized_adapter_types())
    return table


def adapter_class_for(module: nn.Module) -> Optional[Type[AdapterLayer]]:
    """The adapter class the dispatch table gives ``module`` (most specific type first), or None."""
    table = adapter_types()
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def adapter_modules(model: nn.Module) -> List[Tuple[str, AdapterLayer]]:
    """(qualified name, adapter) for every adapter in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _output_head_names(model: nn.Module) -> set:
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except Exception:  # some models raise NotImplementedError
            head = None
        if head is not None:
            for name, m in model.named_modules():
                if m is head:
                    names.add(name)
    return names


def _is_linear_like(module: nn.Module) -> bool:
    cls = adapter_class_for(module)
    return cls is not None and issubclass(cls, (LinearAdapter, Conv1DAdapter))


def find_targets(model: nn.Module, config: AdapterConfig) -> List[str]:
    """Names of the modules ``config`` selects, in model order. Raises when nothing matches."""
    heads = _output_head_names(model)
    selected = []
    for name, module in model.named_modules():
        if not name:
            continue
        hit = False
        for pattern in config.targets:
            if pattern == "all-linear":
                if _is_linear_like(module) and name.split(".")[-1] not in heads and name not in heads:
                    hit = True
            elif pattern_matches(pattern, name, "targets"):
                hit = True
        if hit and not any(pattern_matches(p, name, "exclude") for p in config.exclude):
            selected.append(name)
    # A pattern matching a container and one of its children would adapt both; keep leaves.
    if not selected:
        leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
        shown = ", ".join(leaves[:40]) + (f", ... ({len(leaves)} in all)" if len(leaves) > 40 else "")
        raise ConfigError(f"targets {brief(config.targets)} (exclude {brief(config.exclude)}) match no module; "
                          f"modules: {shown}")
    return selected


def check_patterns_match(model: nn.Module, config: AdapterConfig, selected: List[str]) -> None:
    """Every target pattern must select a module, and every key of rank_pattern, alpha_pattern
    and method_pattern must name one of the adapted modules: a pattern that matches nothing
    would otherwise be ignored without a word (a typo, or a regex written for another model)."""
    for pattern in config.targets:
        if pattern == "all-linear":
            continue
        if not any(pattern_matches(pattern, n, "targets") for n, _ in model.named_modules() if n):
            leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
            shown = ", ".join(leaves[:40]) + (f", ... ({len(leaves)} in all)" if len(leaves) > 40 else "")
            raise ConfigError(f"targets entry {brief(pattern)} matches no module; modules: {shown}")
    for field_name in ("rank_pattern", "alpha_pattern", "method_pattern"):
        for pattern in getattr(config, field_name):
            if not any(pattern_matches(pattern, n, field_name) for n in selected):
                shown = ", ".join(selected[:40]) + (f", ... ({len(selected)} in all)" if len(selected) > 40 else "")
                raise ConfigError(f"{field_name} key {brief(pattern)} matches none of the adapted modules: {shown}")


def _check_not_attached(model: nn.Module, name: str = DEFAULT_NAME) -> None:
    entry = registry(model).get(name)
    existing = list(entry.layers) if entry is not None else [n for n, _ in adapter_modules(model)]
    if existing:
        raise AdapterError(
            f"model already has dorafit adapters named {name!r} ({len(existing)}, e.g. {existing[0]}); "
            "call dorafit.detach(model) or dorafit.merge(model) first instead of stacking adapters, "
            "or attach with another name= to add a second adapter"
        )


def shared_states(modules: Dict[str, nn.Module], config: AdapterConfig) -> Dict[str, object]:
    """{method: shared state} for the methods of SHARED_STATE_FACTORIES that ``modules`` use."""
    states: Dict[str, object] = {}
    for factory, methods in SHARED_STATE_FACTORIES:
        members = []
        for name, module in modules.items():
            opts = resolve_module_options(config, name)
            if opts["method"] in methods:
                members.append((name, module, opts["rank"]))
        if members:
            state = factory(members, config)
            states.update({m: state for m in methods})
    return states


def build_adapter(
    module: nn.Module, name: str, config: AdapterConfig, shared: Optional[Dict[str, object]] = None
) -> AdapterLayer:
    """The adapter for one module under ``config`` (after per-module patterns).

    ``shared`` holds the per-model state of ``shared_states`` (built on demand when omitted).
    """
    cls = adapter_class_for(module)
    if cls is None:
        supported = ", ".join(sorted(c.__name__ for c in adapter_types()))
        raise AdapterError(f"module {name!r} is a {type(module).__name__}, which dorafit cannot adapt (supported: {supported})")
    opts = resolve_module_options(config, name)
    kwargs = dict(
        method=opts["method"],
        rank=opts["rank"],
        alpha=opts["alpha"],
        scaling=opts["scaling"],
        dropout=config.dropout,
        dropout_mode=config.dropout_mode,
        detach_norm=config.detach_norm,
        adapter_dtype=config.adapter_dtype,
    )
    builder = METHOD_BUILDERS.get(opts["method"])
    try:
        if shared is None:
            shared = shared_states({name: module}, config)
        if opts["method"] in shared:
            kwargs["shared"] = shared[opts["method"]]
        if builder is not None:
            return builder(module, cls, config, name, **kwargs)
        return cls(module, **kwargs)
    except AdapterError as exc:
        raise AdapterError(f"module {name!r}: {exc}") from None


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def weight_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(out, in) of the matrix an adapter of ``module`` factors (in flattened over a conv's kernel),
    from the module's attributes and the weight's shape alone (no weight is read)."""
    if isinstance(module, nn.Linear):  # 4-bit subclasses store the weight packed: trust the attributes
        return module.out_features, module.in_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    if type(module).__name__ == "Conv1D":  # transformers GPT-2: (in, out)
        return weight.shape[1], weight.shape[0]
    inner = 1
    for size in weight.shape[1:]:
        inner *= size
    return weight.shape[0], inner


def check_ranks(modules: Dict[str, nn.Module], config: AdapterConfig) -> None:
    """Every rank (VeRA's included) is at most min(out, in) of its layer: checked before any adapter
    tensor, or VeRA's shared matrices sized by the largest rank, is allocated."""
    for name, module in modules.items():
        opts = resolve_module_options(config, name)
        dims = weight_dims(module)
        if opts["method"] == "magnitude" or dims is None:
            continue
        if opts["method"] in METHOD_BUILDERS and adapter_class_for(module) not in (LinearAdapter, Conv1DAdapter) \
                and not isinstance(module, nn.Linear):
            continue  # VeRA-style methods refuse this layer type with their own message
        if opts["rank"] > min(dims):
            source = "rank_pattern" if config.rank_pattern and opts["rank"] != config.rank else "rank"
            raise AdapterError(
                f"module {name!r}: {source} {opts['rank']} is larger than the layer allows: weight (out, in) = "
                f"({dims[0]}, {dims[1]}), rank must be ≤ {min(dims)}")


def non_finite_weights(modules: Dict[str, nn.Module]) -> List[Tuple[str, int]]:
    """(name, count) of the modules among ``modules`` whose own floating-point parameters hold NaN or
    inf (4-bit packed weights and weights on the meta device are not values yet: skipped)."""
    bad = []
    for name, module in modules.items():
        count = 0
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.device.type != "meta":
                count += int((~torch.isfinite(p.detach())).sum())
        if count:
            bad.append((name, count))
    return bad


def check_finite_base(model: nn.Module, modules: Optional[Dict[str, nn.Module]] = None) -> None:
    """Raise AdapterError naming the base modules (all of the model's by default) whose weights hold
    NaN or inf: such a base makes every loss NaN, which would otherwise be blamed on the learning rate."""
    if modules is None:
        modules = dict(model.named_modules())
    bad = non_finite_weights(modules)
    if bad:
        listed = ", ".join(f"{name or '<root>'} ({count:,})" for name, count in bad[:5])
        more = f" and {len(bad) - 5} more modules" if len(bad) > 5 else ""
        raise AdapterError(
            f"the base model's weights hold NaN or inf values in {listed}{more}: the base itself is damaged "
            "(a diverged fine-tune or a broken conversion); no adapter can train or run on it")


def attach(model: nn.Module, config: AdapterConfig, name: str = DEFAULT_NAME) -> nn.Module:
    """Attach adapters to ``model`` in place and return it; only adapter parameters train.

    Everything is validated before the first module is replaced: on error the model is untouched.
    The adapter is called ``name``. On a model that has adapters already, another ``name`` adds
    a second adapter, inactive until ``dorafit.set_adapter(model, name)`` (see ``adapters``);
    the same name raises.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a dorafit.AdapterConfig, got {type(config).__name__}")
    check_adapter_name(name)
    with bounded_matching():
        return _attach(model, config, name)


def _attach(model: nn.Module, config: AdapterConfig, name: str) -> nn.Module:
    if registry(model):
        if name in registry(model):
            _check_not_attached(model, name)
        with adding_adapter(model, name):
            attach(model, config)
        return model
    _check_not_attached(model)
    names = find_targets(model, config)
    # Leaves only: adapting a container and its child at once is ambiguous.
    names = [n for n in names if not any(o.startswith(n + ".") for o in names)]
    check_patterns_match(model, config, names)
    modules = {n: model.get_submodule(n) for n in names}
    save_names = []
    for pattern in config.modules_to_save:
        hits = [n for n, _ in model.named_modules()
                if n and pattern_matches(pattern, n, "modules_to_save") and n not in modules]
        hits = [n for n in hits if not any(n.startswith(o + ".") for o in hits if o != n)]
        if not hits:
            raise ConfigError(f"modules_to_save entry {brief(pattern)} matches no module")
        save_names.extend(hits)
    check_ranks(modules, config)
    check_finite_base(model, modules)
    # Remember which parameters trained, so that a failed attach and ``detach`` give the model
    # back as it was (building an adapter freezes its base).
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        shared = shared_states(modules, config)  # one VeRA matrix pair per model
        adapters = {n: build_adapter(m, n, config, shared) for n, m in modules.items()}  # nothing swapped yet
    except BaseException:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        release_4bit_layers(model)  # a 4-bit base built before the failure gets its switch back
        raise

    # Every check passed: from here on the model changes.
    setattr(model, REQUIRES_GRAD_ATTR, flags)
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, adapter in adapters.items():
        _set_submodule(model, module_name, adapter)
    for module_name in dict.fromkeys(save_names):
        _set_submodule(model, module_name, ModulesToSave(model.get_submodule(module_name)))
    for _, adapter in adapter_modules(model):
        for pname in adapter.adapter_parameter_names():
            getattr(adapter, pname).requires_grad_(True)
    # Frozen 4-bit layers carry the gradient to earlier adapters: bnb must not repack them.
    keep_4bit_layers_trainable(model)
    setattr(model, CONFIG_ATTR, config)
    register_active(model, name, config)
    install_save_pretrained(model)  # save_pretrained writes the adapter (see ``hub``)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove all adapters (every named one) and restore the untouched base modules (and their
    original weights)."""
    for name, adapter in adapter_modules(model):
        _set_submodule(model, name, adapter.base)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        _set_submodule(model, name, module.original)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    release_4bit_layers(model)
    flags = getattr(model, REQUIRES_GRAD_ATTR, None)
    if flags is not None:
        for p in model.parameters():
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        delattr(model, REQUIRES_GRAD_ATTR)
    clear_adapters(model)
    remove_save_pretrained(model)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``. Deleting the active one activates the first remaining adapter
    (as PEFT does); deleting the last one is ``detach``."""
    _check_name(model, name)
    if list(registry(model)) == [name]:
        return detach(model)
    if active_adapter(model) == name:
        swap_out(model)
        adapters = {k: v for k, v in registry(model).items() if k != name}
        model.__dict__[ADAPTERS_ATTR] = adapters
        swap_in(model, next(iter(adapters)))
    else:
        model.__dict__[ADAPTERS_ATTR] = {k: v for k, v in registry(model).items() if k != name}
    return model


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{"<module>.<param>": tensor} of every adapter parameter and modules_to_save copy."""
    state = {}
    for name, adapter in adapter_modules(model):
        for pname in adapter.adapter_parameter_names():
            state[f"{name}.{pname}"] = getattr(adapter, pname).detach()
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            for key, t in module.trainable.state_dict().items():
                state[f"{name}.trainable.{key}"] = t.detach()
    return state


@dataclass
class TrainableReport:
    """What ``attach`` made trainable: adapted modules and parameter counts."""

    modules: List[str] = field(default_factory=list)
    methods: Dict[str, int] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        methods = ", ".join(f"{m} × {k}" for m, k in sorted(self.methods.items())) or "none"
        return (
            f"adapted modules   {len(self.modules)} ({methods})\n"
            f"trainable params  {self.trainable:,}\n"
            f"all params        {self.total:,}\n"
            f"trainable %       {self.percent:.4f}"
        )


def trainable_report(model: nn.Module) -> TrainableReport:
    """Adapted modules, trainable parameter count and share of all parameters."""
    report = TrainableReport()
    for name, adapter in adapter_modules(model):
        report.modules.append(name)
        report.methods[adapter.method] = report.methods.get(adapter.method, 0) + 1
    seen = set()
    for p in model.parameters():  # parameters() de-duplicates shared tensors
        if id(p) in seen:
            continue
        seen.add(id(p))
        # A bitsandbytes 4-bit weight packs two codes per uint8 element, so its numel() is half
        # the layer's weight count; its quant_state keeps the real (out, in) shape.
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        count = int(torch.Size(shape).numel()) if shape is not None else p.numel()
        report.total += count
        if p.requires_grad:
            report.trainable += count
    return report
