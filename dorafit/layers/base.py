"""AdapterLayer: one flat LoRA / DoRA adapter around one frozen base module.

For a base with weight W0 viewed as (out, in) (see ``functional``), the adapter holds

    lora_a     (r, in)   Kaiming-uniform (a = sqrt(5), as nn.Linear)
    lora_b     (out, r)  zeros, so the adapted layer equals the base at step 0
    magnitude  (out,)    DoRA only, initialised to ‖W0‖ per output feature

and computes, with s = alpha / r, x' = dropout(x) and g = m / ‖W0 + s B A‖,

    LoRA:            y = base(x) + s · B A x'
    DoRA:            y = g ⊙ (x W0ᵀ + s · B A x) + b                  (paper Eq. 5, bias not scaled)
    magnitude-only:  y = m / ‖W0‖ ⊙ x W0ᵀ + b

How a call computes it — which of the numeric paths runs, and when — is the table at the top of
``compose``; what is kept between calls (‖W0‖², the detached norm, g) and when it is still valid
is ``cache``. This class holds the parameters, the layout hooks that each layer type
(linear.py, conv.py, embedding.py) fills in, merging, and the reference forward that builds W'
of Eq. 5 outright and that every path is tested against.

Trainable tensors made in float32 (``adapter_dtype="float32"``, the default) stay float32 when
the model is cast to a lower precision afterwards (``model.to(torch.bfloat16)``, ``.half()``):
a bf16 magnitude moved by AdamW at lr 1e-4 would round back to itself every step.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Set, Tuple

import torch
from torch import nn

from .. import functional as DF
from . import compose, deferred
from .cache import NormCache, forget_on_load


class AdapterError(ValueError):
    """An adapter cannot be built or used on this module."""


def _check_rank(layer: "AdapterLayer", method: str, weight_shape) -> None:
    out_features, in_features = weight_shape
    if layer.rank > min(out_features, in_features) and method in ("lora", "dora"):
        raise AdapterError(
            f"rank {layer.rank} is larger than the layer allows: weight (out, in) = "
            f"({out_features}, {in_features}), rank must be ≤ {min(out_features, in_features)}"
        )


def not_materialized(layer: nn.Module) -> AdapterError:
    return AdapterError(
        f"{type(layer).__name__} was attached to a base on the meta device and is not initialised yet: "
        "load the base weights, then call dorafit.materialize(model) before the first forward")


def initial_lowrank(layer: "AdapterLayer", dtype: torch.dtype, device: torch.device) -> Tuple[nn.Parameter, nn.Parameter]:
    """A Kaiming-uniform (a = sqrt(5), as nn.Linear) and B = 0, so that ΔW = 0 at step 0."""
    a_shape, b_shape = layer.lora_shapes()
    a = deferred.draw_lora_a(a_shape, dtype, device)
    if layer.deferred is not None:
        layer.deferred.draws(a_shape, dtype)  # drawn by ``dorafit.materialize``, in this order
    return nn.Parameter(a), nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))


def initial_magnitude(layer: "AdapterLayer", dtype: torch.dtype) -> nn.Parameter:
    """m = ‖W0‖ per output feature, so that W' = W0 at step 0 (the one place a magnitude is made).
    On a base still on ``meta`` an empty (out,) tensor there, filled by ``dorafit.materialize``."""
    if layer.deferred is not None:
        return nn.Parameter(torch.empty(layer.lora_shapes()[1][0], dtype=dtype, device="meta"))
    return nn.Parameter(layer.w0_norm_sq.sqrt().to(dtype))


def _keep_float32(fn: Callable, masters: Set[int]) -> Callable:
    """``fn`` of ``nn.Module._apply`` for every tensor but the float32 masters in ``masters``,
    which it moves (device) without lowering their precision; float64 casts still apply."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in masters:
            return fn(t)
        target = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where fn sends this dtype
        if target.dtype.is_floating_point and target.dtype.itemsize < t.dtype.itemsize:
            return t.to(device=target.device)
        return fn(t)

    return apply


class AdapterLayer(nn.Module):
    """Base class: parameters, layout hooks, the forward's entry, merge and the reference forward."""

    # Which axis of the layer's output holds the output features (-1 linear, 1 conv).
    out_axis: int = -1
    # Linear layouts (nn.Linear, GPT-2 Conv1D) define ``direct_weight`` and share the fused paths.
    linear_layout: bool = False
    # Keep z + s B A x rather than y for the magnitude's gradient (conv: see ``ConvAdapter``).
    always_keep_sum: bool = False
    # Set by ``dorafit.disable_adapter`` for the duration of its block: the layer then computes
    # its frozen base module's output alone (a flag, so entering copies no weights).
    adapter_disabled: bool = False
    # The axis of the base module's weight tensor that holds the output features (0 for
    # nn.Linear and convolutions; 1 where the weight is stored transposed).
    weight_out_dim: int = 0
    # ``deferred.Pending`` while the adapter waits for ``dorafit.materialize``, else None.
    deferred = None

    def __init__(
        self,
        base: nn.Module,
        *,
        method: str = "dora",
        rank: int = 8,
        alpha: float = 16.0,
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        dropout_mode: str = "input",
        detach_norm: bool = True,
        adapter_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.base = base
        self.method = method
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = float(scaling if scaling is not None else alpha / rank)
        self.dropout_mode = dropout_mode
        self.detach_norm = bool(detach_norm)
        self.adapter_dtype = adapter_dtype
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        weight = self.base_weight_2d()
        # A base on ``meta``: the adapter is made there too, ``dorafit.materialize`` fills it.
        self.deferred = deferred.pending(self) if weight.device.type == "meta" else None
        _check_rank(self, method, weight.shape)
        dtype = torch.float32 if adapter_dtype == "float32" else self.base_dtype()
        self.norm_cache = NormCache()  # a plain object, not buffers: casts never reach it
        self.register_load_state_dict_post_hook(forget_on_load)
        self.lora_a: Optional[nn.Parameter] = None
        self.lora_b: Optional[nn.Parameter] = None
        self.magnitude: Optional[nn.Parameter] = None
        if method in ("lora", "dora"):
            self.lora_a, self.lora_b = initial_lowrank(self, dtype, weight.device)
        if method in ("dora", "magnitude"):
            self.magnitude = initial_magnitude(self, dtype)
        for p in self.base.parameters():  # last, after every check (``attach`` undoes it on failure)
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deferred is not None:
            raise not_materialized(self)
        return compose.forward(self, x)

    # ----------------------------------------------------------------------------------------
    # Layout hooks (layer types)
    def base_weight_2d(self) -> torch.Tensor:
        """W0 as (out, in_flat), a view of the base weight (no copy)."""
        raise NotImplementedError

    def lora_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """The shapes of A (r, in...) and B (out, r...)."""
        raise NotImplementedError

    def base_dtype(self) -> torch.dtype:
        return self.base_weight_2d().dtype

    def output_axis(self, ndim: int) -> int:
        """The axis of an ndim-dim output that holds the output features."""
        return self.out_axis

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        """x W0ᵀ without the bias, in the output layout."""
        raise NotImplementedError

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(x Aᵀ) Bᵀ in the output layout (B as given), in the adapter dtype."""
        raise NotImplementedError

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        """C = A W0ᵀ, (r, out) float32, from the base weight (layer types override this to run
        the frozen base layer itself on A's rows)."""
        return DF.rows_times_weight_t(a_2d, self.base_weight_2d())

    def initial_weight_norm_sq(self) -> torch.Tensor:
        """‖W0_i‖² per output feature, float32, from the weight (quantized layers override this)."""
        return DF.weight_norm_sq_per_output(self.base_weight_2d().detach())

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Run the base op with another (out, in_flat) float32 weight (reference path)."""
        raise NotImplementedError

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        """An (out, in_flat) weight in the base module's own layout and dtype."""
        raise NotImplementedError

    def write_merged(self, merged_2d: torch.Tensor) -> nn.Module:
        """Put a merged (out, in_flat) weight into the base module as a new frozen Parameter.

        A new Parameter rather than an in-place copy: a weight tied elsewhere (an output head
        tied to the embedding) keeps the value it had in the adapted model.
        """
        self.base.weight = nn.Parameter(self.weight_from_2d(merged_2d), requires_grad=False)
        return self.base

    # ----------------------------------------------------------------------------------------
    # Method hooks (VeRA-style subclasses override these)
    def lowrank_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The A (r, in...) and B (out, r...) of the directional update."""
        params = self._parameters  # dict entries: read on every call
        return params.get("lora_a"), params.get("lora_b")

    def norm_inputs(self) -> List[torch.Tensor]:
        """The stored tensors ‖W0 + s B A‖ is computed from (besides the scaling)."""
        params = self._parameters
        inputs = [params.get("lora_a"), params.get("lora_b"), self.base_weight_2d()]
        return [t for t in inputs if t is not None]  # magnitude-only has no A and B

    def adapter_parameter_names(self) -> List[str]:
        """Names of this adapter's own trainable parameters (what save/freeze/report use)."""
        return [n for n in ("lora_a", "lora_b", "magnitude") if getattr(self, n) is not None]

    # ----------------------------------------------------------------------------------------
    # The DoRA norm
    @property
    def w0_norm_sq(self) -> torch.Tensor:
        """‖W0‖² per output feature, float32 (kept by the cache until W0 changes)."""
        return self.norm_cache.w0_norm_sq(self)

    def _compute_norm_sq(self, cross: Optional[torch.Tensor] = None, gram: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖W0 + s B A‖² per output feature floored at NORM_EPS, (out,) float32, computed now (the
        cache decides when).

        The one place a layer's norm is computed: ``functional.factored_norm_sq``, then
        ``floor_squares``; a layer with a column-sharded W0 all-reduces the squares in between.
        ``cross`` = A W0ᵀ and ``gram`` = A Aᵀ where the caller got them from its own matmuls.
        Float32 even inside autocast.
        """
        if self.method == "magnitude":
            return DF.floor_squares(self.w0_norm_sq)
        a, b = self.lowrank_factors()
        a_2d = a if a.dim() == 2 else a.reshape(a.shape[0], -1)  # conv factors are (r, in, k...), (out, r, 1...)
        b_2d = b if b.dim() == 2 else b.reshape(b.shape[0], -1)
        with compose.no_autocast(a.device.type):
            if cross is None:
                cross = self.cross_term(a_2d)
            return DF.floor_squares(DF.factored_norm_sq(self.w0_norm_sq, cross, a_2d, b_2d, self.scaling, gram=gram))

    def _compute_norm(self, cross: Optional[torch.Tensor] = None, gram: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖W0 + s B A‖ per output feature, (out,) float32: the square root of ``_compute_norm_sq``,
        with its gradient where autograd records (``detach_norm=False``)."""
        return self._compute_norm_sq(cross, gram).sqrt()

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + s B A‖ per output feature, (out,) float32 (factored, never materialised).

        Detached (paper section 4.3) and kept by the cache, unless the full gradient is asked
        for (``detach_norm=False``) while autograd records: the cache decides.
        """
        return self.norm_cache.norm(self)

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ‖W0 + s B A‖, (out,) float32."""
        return DF.magnitude_scale(self.magnitude, self.weight_norm())

    # ----------------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """Moves and casts (``model.to``, ``.half()``): the base follows; float32 adapter tensors
        keep their precision (moved, not rounded); kept norms are forgotten."""
        self.norm_cache.forget()
        if self.adapter_dtype != "float32":
            return super()._apply(fn, recurse)
        own = [p for p in self._parameters.values() if p is not None]
        masters = {id(p) for p in own} | {id(p.grad) for p in own if p.grad is not None}
        return super()._apply(_keep_float32(fn, masters), recurse)

    def merged_weight_2d(self) -> torch.Tensor:
        """The adapted weight as (out, in_flat), float32: W0 + sBA, or g ⊙ (W0 + sBA)."""
        w0 = self.base_weight_2d()
        if self.method == "magnitude":
            return (self.magnitude.float() / DF.norm_from_squares(self.w0_norm_sq)).unsqueeze(1) * w0.float()
        a, b = self.lowrank_factors()
        return DF.merged_weight_2d(w0, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), self.scaling, self.magnitude)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward by materialising W' (paper Eq. 5) and running the base op with it.

        Kept deliberately plain for tests: it must equal ``forward`` (outputs and gradients).
        """
        w0 = self.base_weight_2d().float()
        xd = self.dropout(x) if compose.dropping(self) else x
        if self.method == "magnitude":
            return self.apply_weight(x, (self.magnitude.float() / self.w0_norm_sq.sqrt()).unsqueeze(1) * w0)
        a, b = self.lowrank_factors()
        a_2d, b_2d = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        delta = self.scaling * (b_2d.float() @ a_2d.float())  # s B A, materialised (reference only)
        if self.magnitude is None:
            return self.apply_weight(x, w0) + self.apply_weight(xd, delta, bias=False)
        if xd is x or self.dropout_mode == "lowrank":
            # g ⊙ (W0 x + s B A x') + b, with x' = x except on the low-rank path in "lowrank" mode.
            norm = torch.linalg.vector_norm(w0 + delta, dim=1)
            if self.detach_norm:
                norm = norm.detach()
            g = (self.magnitude.float() / norm).unsqueeze(1)
            return self.apply_weight(x, g * w0) + self.apply_weight(xd, g * delta, bias=False)
        # "input" dropout: y = W0 x + b + (W' − W0) drop(x), W' from paper Eq. 5
        w_prime = DF.reference_dora_weight(w0, a_2d, b_2d, self.scaling, self.magnitude, self.detach_norm)
        return self.apply_weight(x, w0) + self.apply_weight(xd, w_prime - w0, bias=False)

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"detach_norm={self.detach_norm}, dropout_mode={self.dropout_mode}"
        )
