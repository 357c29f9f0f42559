"""Merge adapters into plain modules for serving.

    LoRA:  W = W0 + s B A           DoRA:  W = g ⊙ (W0 + s B A),  g = m / ‖W0 + s B A‖

rows scaled per output feature, bias unchanged. The result is made of the original module
classes (nn.Linear, Conv1D, ...), so ``save_pretrained`` after a merge writes a checkpoint that
loads without dorafit. Merging a model without adapters changes nothing (idempotent). Merging
4-bit layers dequantizes them; ``merge`` says so in one warning for the whole model.
``merged_weights`` is the pure function; ``merge`` applies it. ``unmerge`` inverts a merge made
with ``keep_adapter=True``:  W0 = W / g − s B A.

Before any module is replaced, every merged weight is checked to be finite and to fit the dtype
it is stored in (a float16 base cannot hold a value above 65504): otherwise ``merge`` raises
naming the module and leaves the model as it was, instead of writing inf into a checkpoint.

A model split over processes merges where it lies, every rank calling ``merge``. Tensor
parallel: each rank merges its part of each weight (a rowwise part's row norms summed over the
ranks). FSDP2: each block is held whole while its layers merge (``FSDPModule.unshard``), and each
rank writes its rows into the parameters FSDP2 keeps, so the next forward computes the merged
model and no process ever holds more than one block whole. Afterwards ``model.save_pretrained``
(every rank) gathers the state and rank 0 writes the files a one-process merge would. A problem
on any rank is raised on every rank. Not on split models: ``keep_adapter`` (unmerge's record)
and 4-bit bases under FSDP2 (the dequantized layer would replace one FSDP2 holds): save the
adapter and merge it on one process.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from . import sharding
from .adapters import DEFAULT_NAME, active_adapter, register_active, registry
from .adapters import clear as clear_adapters
from .adapters import install_save_pretrained, remove_save_pretrained
from .inject import CONFIG_ATTR, REQUIRES_GRAD_ATTR, ModulesToSave, _set_submodule, adapter_modules
from .layers import AdapterError, AdapterLayer
from .layers.quantized import Linear4bitAdapter


def _stored_dtype(adapter: AdapterLayer) -> torch.dtype:
    """The dtype a merged weight is stored in: the base weight's, or a 4-bit base's compute dtype."""
    weight = adapter.base_weight_2d()
    if weight.is_floating_point():
        return weight.dtype
    compute = getattr(adapter.base, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) else torch.float32


def merge_problem(name: str, adapter: AdapterLayer, merged_2d: torch.Tensor) -> Optional[str]:
    """Why the merged (out, in) float32 weight of module ``name`` cannot be stored, or None."""
    finite = torch.isfinite(merged_2d)
    if not bool(finite.all()):
        count = int((~finite).sum())
        rows = (~finite).any(dim=1).nonzero().flatten().tolist()
        return (f"module {name!r}: the merged weight holds {count:,} NaN/inf values (output features {rows[:8]}); "
                "the adapter or the base is damaged")
    dtype = _stored_dtype(adapter)
    limit = torch.finfo(dtype).max
    peak = float(merged_2d.abs().max()) if merged_2d.numel() else 0.0
    if peak > limit:
        count = int((merged_2d.abs() > limit).sum())
        return (f"module {name!r}: {count:,} merged values exceed what {str(dtype).replace('torch.', '')} can hold "
                f"(largest {peak:.4g}, limit {limit:.4g}); load the base in float32 or bfloat16 to merge")
    return None


def _each_merged(model: nn.Module) -> Iterator[Tuple[str, AdapterLayer, torch.Tensor, Optional[torch.Tensor]]]:
    """(name, adapter, merged (out, in_flat) float32, FSDP2's sharded weight or None) for every
    adapter, one layer's merged weight at a time. Layers under FSDP2 are computed while their
    block is held whole (``sharding.held_whole``); the fourth item is the parameter FSDP2 keeps."""
    layers = adapter_modules(model)
    with torch.no_grad():
        for owners, group in itertools.groupby(layers, key=lambda item: sharding.fsdp_owners(model, item[0])):
            group = list(group)
            for module in owners:  # resharded, so that the parameters below are the ones FSDP2 keeps
                module.reshard()
            kept = [adapter.base._parameters["weight"] if owners else None for _, adapter in group]
            with sharding.held_whole(owners):
                for (name, adapter), weight in zip(group, kept):
                    yield name, adapter, adapter.merged_weight_2d(), weight


def _placement_problem(name: str, adapter: AdapterLayer, merged: torch.Tensor,
                       kept: Optional[torch.Tensor]) -> Optional[str]:
    """Why this rank's part of the merged weight cannot go into FSDP2's parameter ``kept``, or None."""
    if kept is None:
        return None
    try:
        sharding.fsdp_chunk(name, adapter.weight_from_2d(merged), kept)
    except sharding.ShardingError as err:
        return str(err)
    return None


def _quantized_under_fsdp(model: nn.Module) -> Optional[str]:
    """Why a 4-bit layer sharded by FSDP2 cannot merge (its merge is a new, dequantized layer
    FSDP2 does not hold), or None. Asked before any block is gathered: a gathered 4-bit weight
    has lost its quantization state."""
    for name, adapter in adapter_modules(model):
        if isinstance(adapter, Linear4bitAdapter) and sharding.fsdp_owners(model, name):
            return (f"module {name!r}: its base is quantized and sharded by FSDP2, and a merge replaces it by a "
                    "dequantized layer FSDP2 does not hold; save the adapter (dorafit.save_adapter) and merge it on "
                    "one process (dorafit merge)")
    return None


def check_mergeable(model: nn.Module) -> None:
    """Raise AdapterError (the model untouched) when a merged weight would be non-finite or out of
    its dtype's range. Each layer's merged weight is built, checked and freed in turn. On a model
    split over processes every rank raises, or none does."""
    problem = _quantized_under_fsdp(model)
    if problem is None:
        for name, adapter, merged, kept in _each_merged(model):
            problem = (problem or merge_problem(name, adapter, merged)
                       or _placement_problem(name, adapter, merged, kept))
    if sharding.is_split(model):  # every rank merges (a DDP replica merged by rank 0 alone asks no one)
        problem = sharding.agree(problem)
    if problem:
        raise AdapterError(f"cannot merge: {problem}; nothing was merged")


def merged_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{"<module>.weight": merged weight in the base layout and dtype}, leaving the model as is.
    Raises AdapterError where a merged weight is non-finite or out of its dtype's range."""
    out = {}
    with torch.no_grad():
        for name, a in adapter_modules(model):
            if sharding.fsdp_owners(model, name):
                raise AdapterError(f"merged_weights gives whole tensors, and module {name!r} is sharded by FSDP2: merge "
                                   "it in place with dorafit.merge(model), then save it with model.save_pretrained")
            merged = a.merged_weight_2d()
            problem = merge_problem(name, a, merged)
            if problem:
                raise AdapterError(f"cannot merge: {problem}")
            out[f"{name}.weight"] = a.weight_from_2d(merged)
    return out


def _untie_shared_weights(model: nn.Module) -> None:
    """A merged weight that was shared (an output head tied to the embedding) is untied.

    The adapted model used the merged table in one place and the original in the other, so the
    merged model keeps both; a transformers config is told not to tie them again at load.
    """
    adapted = {id(a.base.weight) for _, a in adapter_modules(model)}
    users: Dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    if not any(users.get(i, 0) > 1 for i in adapted):
        return
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
        text_config = getattr(config, "get_text_config", None)
        if callable(text_config) and text_config() is not config:
            text_config().tie_word_embeddings = False
    warnings.warn(
        "dorafit.merge: an adapted weight was shared with another module (tied embeddings); the merged "
        "model keeps the two apart" + (" and its config now says tie_word_embeddings=False" if config is not None else ""),
        stacklevel=3,
    )


def _warn_dequantized(model: nn.Module) -> None:
    """One warning for all 4-bit layers of a merge (a 30-layer model would otherwise print 200)."""
    states = [getattr(getattr(a.base, "weight", None), "quant_state", None) for _, a in adapter_modules(model)]
    states = [q for q in states if q is not None]
    if not states:
        return
    dtypes = ", ".join(sorted({str(q.dtype) for q in states}))
    warnings.warn(
        f"dorafit.merge: {len(states)} layers in 4-bit (bitsandbytes Linear4bit) were merged into dequantized "
        f"nn.Linear layers of dtype {dtypes}; the merged model is no longer quantized",
        UserWarning, stacklevel=3,
    )


def merge(model: nn.Module, keep_adapter: bool = False) -> nn.Module:
    """Replace every adapter by its base module carrying the merged weight; returns the model.

    The active adapter is merged; other named adapters are dropped. modules_to_save copies
    replace their originals. Calling it again is a no-op. ``keep_adapter=True`` also keeps,
    outside the module tree, what ``unmerge`` needs to give the adapted model back: the adapter
    layers and each row's scale g (m / ‖W0 + s B A‖, or 1 for LoRA), (out,) float32 per module.
    Raises AdapterError, with the model untouched, where a merged weight would hold NaN/inf or
    values its dtype cannot hold.
    """
    split = sharding.is_split(model)
    if keep_adapter and split:
        raise AdapterError("merge(keep_adapter=True) keeps what unmerge needs on one process; this model is split "
                           "over processes (FSDP2 or tensor parallel): merge it without keep_adapter")
    check_mergeable(model)
    _untie_shared_weights(model)
    _warn_dequantized(model)
    record: Dict[str, Tuple[AdapterLayer, torch.Tensor]] = {}
    saves: Dict[str, ModulesToSave] = {}
    config = getattr(model, CONFIG_ATTR, None)
    plain: Dict[str, nn.Module] = {}
    for name, adapter, merged, kept in _each_merged(model):
        if keep_adapter:
            record[name] = (adapter, _row_scale(adapter))
        if kept is None:
            plain[name] = adapter.write_merged(merged)
        else:  # into the parameter FSDP2 gathers, in place
            kept.to_local().copy_(sharding.fsdp_chunk(name, adapter.weight_from_2d(merged), kept))
            plain[name] = adapter.base
    for name, module in plain.items():
        _set_submodule(model, name, module)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        for p in module.trainable.parameters():
            p.requires_grad_(False)
        saves[name] = module
        _set_submodule(model, name, module.trainable)
    if keep_adapter and (record or saves):
        model.__dict__[MERGED_ATTR] = {
            "config": config,
            "name": active_adapter(model) or DEFAULT_NAME,
            "requires_grad": getattr(model, REQUIRES_GRAD_ATTR, None),
            "layers": {n: (a, g, _weight_key(a.base.weight)) for n, (a, g) in record.items()},
            "saves": saves,
        }
    for attr in (CONFIG_ATTR, REQUIRES_GRAD_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    clear_adapters(model)
    remove_save_pretrained(model)
    if split:
        sharding.install_whole_writer(model)
    return model


# ------------------------------------------------------------------------------------------------
# Unmerge. The merged row is W_i = g_i (W0_i + s (BA)_i); ‖W_i‖ = m_i fixes only the direction of
# W0_i + s (BA)_i, not its length, so W0 cannot be recovered from W, A, B and m alone: ``merge``
# must keep g. Then W0 = W / g − s B A (rows), exact up to the float error of W's dtype.
MERGED_ATTR = "_dorafit_merged"


def _row_scale(adapter: AdapterLayer) -> torch.Tensor:
    """g per output feature, (out,) float32: m / ‖W0 + s B A‖ (DoRA), m / ‖W0‖ (magnitude-only), 1 (LoRA)."""
    if adapter.magnitude is None:
        return torch.ones(adapter.base_weight_2d().shape[0], dtype=torch.float32, device=adapter.base_weight_2d().device)
    return adapter.magnitude_scale().detach().float().clone()


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version)


def _unmerge_problem(name: str, adapter: AdapterLayer, g: torch.Tensor, key: tuple, module: nn.Module) -> Optional[str]:
    """Why module ``name`` cannot be unmerged exactly, or None."""
    if module is not adapter.base:
        return f"module {name!r} was replaced after the merge (now a {type(module).__name__})"
    if type(adapter).write_merged is not AdapterLayer.write_merged:
        return f"module {name!r}: its base is quantized; the merged weight is not in the base's format (merge without a quantized base to unmerge)"
    if _weight_key(module.weight) != key:
        return f"module {name!r}: its merged weight was changed after the merge (trained or loaded)"
    bad = (~torch.isfinite(g)) | (g == 0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        return (
            f"module {name!r}: output feature(s) {rows[:8]} have scale g = m / ‖W0 + sBA‖ of 0 (zero magnitude or "
            "a zero row), so the merged row is 0 and W0's row cannot be recovered"
        )
    return None


def unmerge(model: nn.Module) -> nn.Module:
    """Give back the adapted (unmerged) model of ``merge(model, keep_adapter=True)``; returns it.

    Each merged weight becomes W0 = W / g − s B A again and its adapter is put back, active, under
    its name; the outputs are the adapted model's up to float error. Raises AdapterError, leaving
    the merged model as it is, where that cannot be done: a model merged without
    ``keep_adapter=True`` (W0's row lengths are lost), rows with g = 0 (zero magnitude or zero
    norm), quantized bases, merged weights changed after the merge.
    """
    state = model.__dict__.get(MERGED_ATTR)
    if state is None:
        raise AdapterError(
            "the model holds no merged adapter to unmerge: merge it with dorafit.merge(model, keep_adapter=True) "
            "(a merged weight alone does not determine W0: the norm ‖W0 + sBA‖ of each row is lost)"
        )
    if registry(model) or adapter_modules(model):
        raise AdapterError("the model has dorafit adapters attached; detach them before unmerging")
    layers = state["layers"]
    for name, (adapter, g, key) in layers.items():
        problem = _unmerge_problem(name, adapter, g, key, model.get_submodule(name))
        if problem:
            raise AdapterError(f"cannot unmerge: {problem}")
    with torch.no_grad():
        for name, (adapter, g, _) in layers.items():
            w0 = unmerged_weight_2d(adapter, adapter.base_weight_2d(), g)
            adapter.base.weight = nn.Parameter(adapter.weight_from_2d(w0), requires_grad=False)
            _set_submodule(model, name, adapter)
    for name, module in state["saves"].items():
        _set_submodule(model, name, module)
        for p in module.trainable.parameters():
            p.requires_grad_(True)
    del model.__dict__[MERGED_ATTR]
    if state["requires_grad"] is not None:
        setattr(model, REQUIRES_GRAD_ATTR, state["requires_grad"])
    config = state["config"]
    setattr(model, CONFIG_ATTR, config)
    register_active(model, state["name"], config)
    install_save_pretrained(model)
    return model


def unmerged_weight_2d(adapter: AdapterLayer, merged_2d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W0 = W / g − s B A per output feature, (out, in_flat) float32 (W / g for magnitude-only).

    Computed in float64: W0 is often small beside W / g and s B A, and the subtraction would
    otherwise add float32's rounding of those larger terms to the one of the stored W."""
    w = merged_2d.double() / g.to(merged_2d.device).double().unsqueeze(1)
    if adapter.method == "magnitude":
        return w.float()
    a, b = adapter.lowrank_factors()
    return (w - adapter.scaling * (b.reshape(b.shape[0], -1).double() @ a.reshape(a.shape[0], -1).double())).float()
