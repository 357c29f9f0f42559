"""LoRA / DoRA / magnitude-only on an nn.Linear split by tensor parallelism.

torch's ``parallelize_module`` (``ColwiseParallel`` / ``RowwiseParallel``, or a transformers
``tp_plan``) replaces a linear layer's weight by a DTensor: each of the N tensor-parallel ranks
holds out/N rows (colwise) or in/N columns (rowwise), and the layer's hooks hand it its input and
take its output as plain local tensors. The adapter follows that split (the table of
``dorafit.sharding.TensorParallel``): its parameters are DTensors placed to match — B and m
row-split with a colwise base, A column-split with a rowwise one, the rest replicated — so that
optimizers, ``torch.distributed.checkpoint`` and the adapter writers see whole-model tensors, and
the forward works on the local parts:

    h = x Aᵀ            colwise: whole on every rank (its gradient, from this rank's output
                        rows only, summed over the ranks); rowwise: partial sums over the
                        columns, summed in forward
    ‖W0 + s B A‖²       colwise: complete for this rank's rows; rowwise: the partial squares of
                        the local columns (cross term A W0ᵀ, A Aᵀ) summed over the ranks before
                        the floor and square root (``functional.factored_norm_sq`` then
                        ``functional.floor_squares``; the cache keeps n² and takes n from it)
    g = m / ‖·‖         per output feature of this rank's output (its rows, or all of them)

The base is always called as a module (its hooks do the redistribution), so the layer runs the
generic paths of ``compose``: "lora" and "dora" (or "dora-dropout", "dora-keep-sum",
"magnitude"), never the fused ones that read W0 directly.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from ..sharding import local_tensor as _local
from . import compose
from .base import AdapterError, not_materialized
from .linear import LinearAdapter


class TensorParallelLinearAdapter(LinearAdapter):
    """An adapter on a tensor-parallel nn.Linear (``parallel``: its ``sharding.TensorParallel``)."""

    def __init__(self, base: nn.Module, *, parallel, **kwargs) -> None:
        self.parallel = parallel  # read by the hooks that the base class's __init__ calls
        super().__init__(base, **kwargs)
        if self.method not in ("lora", "dora", "magnitude"):
            raise AdapterError(f"method {self.method!r} on a tensor-parallel layer: use lora, dora or magnitude")
        params = self._parameters
        with torch.no_grad():
            if params.get("lora_a") is not None:
                self.lora_a = nn.Parameter(parallel.distribute(params["lora_a"].data, "in", dim=1))
                self.lora_b = nn.Parameter(parallel.distribute(params["lora_b"].data, "out", dim=0))
            m = params.get("magnitude")
            if m is not None and self.deferred is not None:  # (out,) on meta
                self.magnitude = nn.Parameter(parallel.distribute(m.data, "out", dim=0))
            elif m is not None:  # the norms of the rows this rank's output holds
                self.magnitude = nn.Parameter(self._placed_magnitude(m.data))

    def _placed_magnitude(self, local_rows: torch.Tensor) -> torch.Tensor:
        """m from the values of the rows this rank's output holds (all of them unless colwise)."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = self.parallel.mesh
        if self.parallel.style != "colwise":
            return DTensor.from_local(local_rows, mesh, [Replicate()], run_check=False)
        out = self.base.out_features
        return DTensor.from_local(local_rows.contiguous(), mesh, [Shard(0)], run_check=False, shape=(out,), stride=(1,))

    # ---- layout hooks: the local parts (``base_weight_2d`` stays the whole DTensor: its shape
    # is the layer's, for the checks)
    def local_weight(self) -> torch.Tensor:
        return _local(self.base._parameters["weight"])

    def direct_weight(self):
        return None  # the base runs as a module: its hooks redistribute input and output

    def lowrank_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        params = self._parameters
        a, b = params.get("lora_a"), params.get("lora_b")
        return (None if a is None else _local(a)), (None if b is None else _local(b))

    def local_magnitude(self) -> torch.Tensor:
        return _local(self._parameters["magnitude"])

    def local_bias(self):
        bias = self.base._parameters.get("bias")
        return None if bias is None else _local(bias)

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = self.parallel.lowrank_input(F.linear(x.to(a.dtype), a))
        return F.linear(h, b)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.local_linear(x, self.local_weight())

    def initial_weight_norm_sq(self) -> torch.Tensor:
        from ..sharding import row_norms_sq

        return row_norms_sq(self)[0]

    def _compute_norm_sq(self, cross=None, gram=None) -> torch.Tensor:
        """‖W0 + s B A‖², floored, for this rank's output features (see the module docstring)."""
        w0_sq = self.w0_norm_sq
        if self.method == "magnitude":
            return DF.floor_squares(w0_sq)
        a, b = self.lowrank_factors()
        tp, s = self.parallel, self.scaling
        with compose.no_autocast(a.device.type):
            if tp.style == "rowwise":  # partial over the columns: summed, then W0's complete squares
                a, b_used = a.float(), tp.replicated_use(b)
                part = DF.factored_norm_sq(torch.zeros_like(w0_sq), DF.rows_times_weight_t(a, self.local_weight()), a, b_used, s)
                return DF.floor_squares(w0_sq + tp.complete_norm_sq(part))
            a_used = tp.replicated_use(a)
            return DF.floor_squares(DF.factored_norm_sq(w0_sq, DF.rows_times_weight_t(a_used, self.local_weight()), a_used, b, s))

    def magnitude_scale(self) -> torch.Tensor:
        return DF.magnitude_scale(self.local_magnitude(), self.weight_norm())

    # The cache keys this layer by its parameter objects (see ``cache._keyed_by_identity``).
    keys_by_identity = True

    def norm_inputs(self) -> List[torch.Tensor]:
        params = self._parameters
        return [t for t in (params.get("lora_a"), params.get("lora_b"), self.base._parameters["weight"]) if t is not None]

    # ---- the forward: the generic paths on local tensors
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deferred is not None:
            raise not_materialized(self)
        base = self.base
        if self.adapter_disabled:
            return base(x)
        a, b = self.lowrank_factors()
        xd = self.dropout(x) if compose.dropping(self) else x
        base_out = base(x)
        if self.magnitude is None:
            return base_out + self.lowrank(xd, a, b * self.scaling).to(base_out.dtype)
        bias = self.local_bias()
        if self.method == "magnitude":
            g = DF.magnitude_scale(self.local_magnitude(), DF.norm_from_squares(self.w0_norm_sq))
            return DF.dora_scale_shift(base_out, g, bias, compose.keeps_sum(self))
        g = self.magnitude_scale()
        low = self.lowrank(xd, a, b * self.scaling)
        if xd is not x and self.dropout_mode == "input":
            return DF.dora_compose_dropout(base_out, self.base_nobias(xd), low, g)
        return DF.dora_scale_shift(base_out + low.to(base_out.dtype), g, bias, compose.keeps_sum(self))

    # ---- merging: the local part of the merged weight, placed as the base weight is
    def merged_weight_2d(self) -> torch.Tensor:
        w0 = self.local_weight().float()
        if self.method == "magnitude":
            return (self.local_magnitude().float() / DF.norm_from_squares(self.w0_norm_sq)).unsqueeze(1) * w0
        a, b = self.lowrank_factors()
        w = w0 + self.scaling * (b.float() @ a.float())
        if self.magnitude is None:
            return w
        norm_sq = self.parallel.complete_norm_sq(w.pow(2).sum(dim=1))
        return (self.local_magnitude().float() / DF.norm_from_squares(norm_sq, DF.NORM_EPS)).unsqueeze(1) * w

    def write_merged(self, merged_2d: torch.Tensor) -> nn.Module:
        from torch.distributed.tensor import DTensor

        weight = self.base.weight
        local = merged_2d.to(weight.dtype).contiguous()
        placed = DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                    shape=weight.shape, stride=weight.stride())
        self.base.weight = nn.Parameter(placed, requires_grad=False)
        return self.base

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AdapterError("the reference forward builds W' whole: run it on one process")
