"""``dorafit.materialize``: initialise the adapters attached to a base on ``meta`` once the base
holds its values (what is pending and how it is filled: ``dorafit.layers.deferred``)."""

from __future__ import annotations

import torch

from . import sharding
from .inject import check_finite_base
from .layers import AdapterError, AdapterLayer
from .layers.vera import generate_shared_matrices

def _allocate_own(layer, device: torch.device) -> None:
    """The layer's own tensors still on ``meta`` (not its base) get memory on ``device``; a sharded
    one keeps its layout (each process allocates its shard)."""
    for module in [layer] + ([layer.vera_shared] if hasattr(layer, "vera_shared") else []):
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is not None and t.is_meta:
                    new = torch.empty_like(t, device=device)
                    store[key] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new


def _fill(target: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` (the value of the whole tensor) into ``target``: the slice this process
    holds where ``target`` is sharded."""
    local, index = sharding.local_slices(target)
    local.copy_(whole[index])


@torch.no_grad()
def materialize(model: torch.nn.Module) -> torch.nn.Module:
    """Initialise every adapter of ``model`` that was attached on ``meta`` (see the module
    docstring), once the base weights hold their values; returns ``model``.

    Call it on every process of a sharded model (a base split by columns sums its squared norms
    over the processes). Adapters attached to a real base are left alone; calling it again does
    nothing. Raises AdapterError naming the first module whose base weight is still on ``meta``,
    or whose base holds NaN or inf.
    """
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.deferred is not None]
    for name, layer in todo:
        if sharding.local_tensor(layer.base.weight).is_meta:
            raise AdapterError(
                f"module {name!r}: its base weight is still on the meta device; load the base weights "
                "(to_empty and load_state_dict, or dorafit.sharding.load_base) before dorafit.materialize")
    check_finite_base(model, {n: layer.base for n, layer in todo})
    draws: dict = {}
    shared_done: set = set()
    for name, layer in todo:
        _allocate_own(layer, sharding.local_tensor(layer.base.weight).device)
        _initialise(layer, name, draws, shared_done)
        layer.deferred = None
        layer.norm_cache.forget()
        layer.norm_cache.w0_zero_rows = None
    return model


def _initialise(layer, name: str, draws: dict, shared_done: set) -> None:
    """One layer's values (its shard of them): A from its group's draws (made once per group in
    ``draws``), zeros, VeRA's d and shared matrices (once per model), m from the loaded rows."""
    params, pending = layer._parameters, layer.deferred
    if pending.index is not None:
        if id(pending.group) not in draws:
            draws[id(pending.group)] = pending.group.draw_all()
        _fill(params["lora_a"], draws[id(pending.group)][pending.index])
    for key in ("lora_b", "vera_b"):
        if params.get(key) is not None:
            sharding.local_tensor(params[key]).zero_()
    if params.get("vera_d") is not None:
        sharding.local_tensor(params["vera_d"]).fill_(layer.vera_d_init)
        shared = layer.vera_shared
        if id(shared) not in shared_done:
            shared_done.add(id(shared))
            a, b = generate_shared_matrices(shared.seed, *shared.a.shape, shared.b.shape[0])
            shared.a.copy_(a)
            shared.b.copy_(b)
    if params.get("magnitude") is not None:
        norm_sq, rows = sharding.row_norms_sq(layer, name)
        local, index = sharding.local_slices(params["magnitude"])
        if index[0] != rows:
            raise sharding.ShardingError(
                f"module {name!r}: the magnitude holds output features {index[0].start}..{index[0].stop}, the base "
                f"weight's rows here are {rows.start}..{rows.stop}; shard both alike")
        local.copy_(norm_sq.sqrt())
