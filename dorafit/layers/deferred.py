"""Adapters on a base that is not loaded yet (deferred initialisation).

A model built on the ``meta`` device (``torch.device("meta")``, accelerate's
``init_empty_weights``) holds shapes and no values. ``dorafit.attach`` adapts it all the same:
every adapter tensor is made on ``meta`` too, and each layer records what its initialisation
needs. Once the base weights are real (``to_empty`` plus a state-dict load, a broadcast from rank
0, ``dorafit.sharding.load_base``), ``dorafit.materialize`` fills the adapter exactly as an
ordinary attach would have:

    A          Kaiming-uniform from the random generator's state when ``attach`` ran, drawn on
               the CPU layer by layer in attach order: the A an attach of the loaded model on
               the CPU gives under the same seed, bit for bit
    B, VeRA b  zeros;  VeRA d: ``vera_d_init``;  VeRA's shared matrices: from ``vera_seed``
    m          ‖W0‖ per output feature of the loaded base

On a sharded model (FSDP2 rows, tensor-parallel shards, both on a 2-D mesh) each process fills
only its own shard: it draws the whole A (r × in, small) and keeps its slice, and computes ‖W0‖²
from the rows of W0 it holds, summing the partial squares over the processes that split those
rows by columns. No process gathers W0. The global random generator is left as it was.

Until then a forward raises an error that names ``dorafit.materialize``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional, Tuple

import torch


class Group:
    """The layers made by one ``attach`` on ``meta``: the random state A is drawn from, and the
    shapes drawn in order (one per LoRA / DoRA layer)."""

    def __init__(self) -> None:
        self.rng_state = torch.get_rng_state()
        self.shapes: List[Tuple[Tuple[int, ...], torch.dtype]] = []

    def draw_all(self) -> List[torch.Tensor]:
        """Every layer's A, drawn as the eager attach drew them (the global generator untouched)."""
        from .base import draw_lora_a

        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            return [draw_lora_a(shape, dtype, "cpu") for shape, dtype in self.shapes]


class Pending:
    """What one layer still needs: its group and, for a LoRA / DoRA layer, which draw is its A."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.index: Optional[int] = None

    def draws(self, shape: Tuple[int, ...], dtype: torch.dtype) -> None:
        self.index = len(self.group.shapes)
        self.group.shapes.append((tuple(shape), dtype))


_current = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Inside, the layers made on ``meta`` share one group (one ``attach``); the group takes the
    random state when its first layer is made, where an eager attach draws its first A."""
    previous = getattr(_current, "slot", None)
    _current.slot = [None]
    try:
        yield
    finally:
        _current.slot = previous


def pending(layer) -> Pending:
    """A new layer's record (joins the current attach's group, or one of its own)."""
    slot = getattr(_current, "slot", None)
    if slot is None:
        return Pending(Group())
    if slot[0] is None:
        slot[0] = Group()
    return Pending(slot[0])


def not_materialized(layer) -> ValueError:
    from .base import AdapterError

    return AdapterError(
        f"{type(layer).__name__} was attached to a base on the meta device and is not initialised yet: "
        "load the base weights, then call dorafit.materialize(model) before the first forward"
    )


# ------------------------------------------------------------------------------------------------
# Initialising what is pending


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
    from ..sharding import local_slices

    local, index = local_slices(target)
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
    from .. import sharding
    from ..inject import check_finite_base
    from .base import AdapterError, AdapterLayer

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
    from .. import sharding
    from .vera import generate_shared_matrices

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
