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

Until then a forward raises an error that names ``dorafit.materialize``. This module keeps the
records; ``dorafit.deferred_init`` does the initialising.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn


def draw_lora_a(shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A of ``shape`` (r, in...), Kaiming-uniform (a = sqrt(5), as nn.Linear) from the global
    random generator (on ``meta`` nothing is drawn): the one place an A is drawn."""
    a = torch.empty(shape, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(a.view(shape[0], -1), a=math.sqrt(5))
    return a


class Group:
    """The layers made by one ``attach`` on ``meta``: the random state A is drawn from, and the
    shapes drawn in order (one per LoRA / DoRA layer)."""

    def __init__(self) -> None:
        self.rng_state = torch.get_rng_state()
        self.shapes: List[Tuple[Tuple[int, ...], torch.dtype]] = []

    def draw_all(self) -> List[torch.Tensor]:
        """Every layer's A, drawn as the eager attach drew them (the global generator untouched)."""
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
