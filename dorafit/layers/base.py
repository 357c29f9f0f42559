"""AdapterLayer: one flat LoRA / DoRA adapter around one frozen base module.

For a base with weight W0 viewed as (out, in) (see ``functional``), the adapter holds

    lora_a     (r, in)   Kaiming-uniform (a = sqrt(5), as nn.Linear)
    lora_b     (out, r)  zeros, so the adapted layer equals the base at step 0
    magnitude  (out,)    DoRA only, initialised to ‖W0‖ per output feature

and computes, with s = alpha / r and x' = dropout(x),

    LoRA:  y = base(x) + s · B A x'
    DoRA:  y = g ⊙ (x W0ᵀ + s · B A x) + b,  g = m / ‖W0 + s B A‖   (dropout 0 or eval)
           y = base(x) + (g − 1) ⊙ W0 x' + g ⊙ s B A x'             (dropout, "input" mode)
           y = g ⊙ (x W0ᵀ + s · B A x') + b                          (dropout, "lowrank" mode)
    magnitude-only: y = m / ‖W0‖ ⊙ x W0ᵀ + b

LoRA and DoRA run through the same forward so they are measured on equal terms. The DoRA norm
is the factored one of ``functional.factored_norm``; with ``detach_norm`` (paper section 4.3)
it is a constant in backward and is kept in the layer's ``NormCache`` while it is fresh (see there
for the rule), so it is paid once per optimizer step across gradient-accumulation micro-batches,
activation-checkpoint recomputation and evaluation. Calls without autograd (evaluation,
generation) also keep g = m / ‖W0 + s B A‖ itself under the same rule and scale LoRA's sum in
place (``forward_no_grad``), so that a layer decoding a few tokens costs LoRA's call plus one
elementwise pass.

Each layer type (linear.py, conv.py, embedding.py) only says how its weight is laid out, how
to run the low-rank path and how to get the cross term A W0ᵀ from the frozen base.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import functional as DF


class AdapterError(ValueError):
    """An adapter cannot be built or used on this module."""


class _OptimizerSteps:
    """Counts optimizer steps of any optimizer (fused ones update parameters without bumping
    their version counters) and marks the norms kept inside compiled graphs as stale.

    Its hook is registered when the first adapter is built, not when dorafit is imported.
    """

    def __init__(self) -> None:
        self.count = 0
        self._caches: "weakref.WeakSet[NormCache]" = weakref.WeakSet()
        self._hooked = False

    def watch(self, cache: "NormCache") -> None:
        if not self._hooked:
            register_optimizer_step_post_hook(self._after_step)
            self._hooked = True
        self._caches.add(cache)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.count += 1
        for cache in list(self._caches):
            cache.compiled_fresh = False


OPTIMIZER_STEPS = _OptimizerSteps()


class NormCache:
    """What one adapter keeps between forwards: ‖W0‖², the detached norm ‖W0 + s B A‖, for
    calls without autograd the scale g = m / ‖W0 + s B A‖ with the bias shift (1 − g) ⊙ b, and
    whether its magnitude has a zero.

    The rule: a kept value is fresh while nothing it was computed from has changed, i.e. no
    optimizer step has run since, and A, B and W0 are the same tensors (storage) at the same
    version (in-place writes bump it). Eager code checks this through ``key``; a torch.compile
    graph cannot read version counters and reads the ``compiled_fresh`` flag instead, which an
    optimizer step, a state-dict load, a move or cast and ``forget()`` clear. Writes that bypass
    autograd (through ``.data``, by a collective) are not seen: ``invalidate_norm_caches`` then
    forgets everything.
    """

    def __init__(self) -> None:
        self.w0: Optional[Tuple[tuple, torch.Tensor]] = None  # (key, ‖W0‖² float32)
        self.norm: Optional[Tuple[tuple, torch.Tensor]] = None  # (key, ‖W0 + sBA‖), eager
        # (key, g, (1 − g) ⊙ b or None), float32, made and read by no-grad calls only
        self.scale: Optional[Tuple[tuple, torch.Tensor, Optional[torch.Tensor]]] = None
        # Inside compiled graphs: (norm kept for training calls, norm kept for no-grad calls).
        self.compiled: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None
        self.compiled_fresh = False
        self.zero_magnitude: Tuple[Any, bool] = (None, False)  # (key, some m_i == 0)
        OPTIMIZER_STEPS.watch(self)

    @staticmethod
    def key(tensors: List[torch.Tensor], *extra) -> tuple:
        """What a kept value was computed from: each tensor's storage and version, plus ``extra``."""
        return tuple([(t.data_ptr(), t._version) for t in tensors]) + extra

    def forget_compiled(self) -> None:
        self.compiled, self.compiled_fresh = None, False

    def forget(self) -> None:
        self.w0 = self.norm = self.scale = None
        self.forget_compiled()


def invalidate_norm_caches(model: nn.Module) -> None:
    """Forget every cached norm and ‖W0‖² of ``model``'s adapters.

    Needed only after writing parameters behind autograd's back (through ``.data``, or with a
    collective such as ``broadcast``); optimizer steps and in-place ops are detected.
    """
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            module.norm_cache.forget()


def is_compiling() -> bool:
    """True while torch.compile traces (the version-counter cache is replaced by a flag there)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def autocast_enabled(device_type: str) -> bool:
    """True inside an autocast region for this device type."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _no_autocast(device_type: str):
    # Entering torch.autocast costs as much as a small kernel: only where it is on.
    if not autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _forget_compiled_norm(module: "AdapterLayer", incompatible_keys) -> None:
    module.norm_cache.compiled_fresh = False


class AdapterLayer(nn.Module):
    """Base class: parameters, norm cache, the shared forward, reference forward and merge.

    Subclasses define the layout hooks below; everything about the method lives here.
    """

    # Which axis of the layer's output holds the output features (-1 linear, 1 conv).
    out_axis: int = -1

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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        weight = self.base_weight_2d()
        if weight.device.type == "meta":
            raise AdapterError(
                f"{type(base).__name__}: base weights are on the meta device; load the base weights "
                "before attaching (the magnitude is initialised from ‖W0‖)"
            )
        out_features, in_features = weight.shape
        if self.rank > min(out_features, in_features) and method in ("lora", "dora"):
            raise AdapterError(
                f"rank {self.rank} is larger than the layer allows: weight (out, in) = "
                f"({out_features}, {in_features}), rank must be ≤ {min(out_features, in_features)}"
            )
        dtype = torch.float32 if adapter_dtype == "float32" else self.base_dtype()
        device = weight.device

        # ‖W0‖² per output feature (float32, DESIGN.md §2) and the detached norm, kept while
        # fresh. A plain object, not buffers, so that ``model.to(torch.bfloat16)`` cannot turn
        # them into half precision.
        self.norm_cache = NormCache()
        self.register_load_state_dict_post_hook(_forget_compiled_norm)
        self.lora_a: Optional[nn.Parameter] = None
        self.lora_b: Optional[nn.Parameter] = None
        self.magnitude: Optional[nn.Parameter] = None
        if method in ("lora", "dora"):
            a = torch.empty(self.lora_a_shape(), dtype=dtype, device=device)
            nn.init.kaiming_uniform_(a.view(self.rank, -1), a=math.sqrt(5))
            self.lora_a = nn.Parameter(a)
            self.lora_b = nn.Parameter(torch.zeros(self.lora_b_shape(), dtype=dtype, device=device))
        if method in ("dora", "magnitude"):
            self.magnitude = nn.Parameter(self.w0_norm_sq.sqrt().to(dtype))
        self.norm_cache.zero_magnitude = (None, self.magnitude is not None and bool((self.magnitude == 0).any()))
        for p in self.base.parameters():  # last, after every check (``attach`` undoes it on failure)
            p.requires_grad_(False)

    # ----------------------------------------------------------------------------------------
    # Layout hooks (subclasses)
    def base_weight_2d(self) -> torch.Tensor:
        """W0 as (out, in_flat), a view of the base weight (no copy)."""
        raise NotImplementedError

    def lora_a_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def lora_b_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def base_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base, "bias", None)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        """x W0ᵀ without the bias, in the output layout."""
        raise NotImplementedError

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(x Aᵀ) Bᵀ in the output layout (unscaled), in the adapter dtype."""
        raise NotImplementedError

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        """C = A W0ᵀ, (r, out) float32, from the base weight (layer types override this to run
        the frozen base layer itself on A's rows)."""
        return DF.rows_times_weight_t(a_2d, self.base_weight_2d())

    def initial_weight_norm_sq(self) -> torch.Tensor:
        """‖W0_i‖² per output feature, float32 (quantized layers override this)."""
        return DF.weight_norm_sq_per_output(self.base_weight_2d().detach())

    @property
    def w0_norm_sq(self) -> torch.Tensor:
        """‖W0‖² per output feature, float32, recomputed only when the base weight changed."""
        cached = self.norm_cache.w0
        if is_compiling() and cached is not None:
            return cached[1]  # traced as a constant; data pointers cannot be compared in a graph
        w = self.base.weight
        key = NormCache.key([w], w.device, w.dtype)
        if cached is None or cached[0] != key or (cached[1].is_inference() and not torch.is_inference_mode_enabled()):
            with torch.no_grad(), _no_autocast(w.device.type):
                cached = (key, self.initial_weight_norm_sq().to(torch.float32))
            self.norm_cache.w0 = cached
        return cached[1]

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
    # Method hooks (VeRA-style subclasses override these two)
    def lowrank_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The A (r, in...) and B (out, r...) of the directional update."""
        return self.lora_a, self.lora_b

    def norm_dependencies(self) -> List[torch.Tensor]:
        """Tensors whose change invalidates the cached norm."""
        deps = [self.lora_a, self.lora_b, self.base_weight_2d()]
        return [t for t in deps if t is not None]  # magnitude-only has no A and B

    def adapter_parameter_names(self) -> List[str]:
        """Names of this adapter's own trainable parameters (what save/freeze/report use)."""
        return [n for n in ("lora_a", "lora_b", "magnitude") if getattr(self, n) is not None]

    # ----------------------------------------------------------------------------------------
    def base_dtype(self) -> torch.dtype:
        return self.base_weight_2d().dtype

    def dropping(self) -> bool:
        """True when dropout changes the input (training with p > 0)."""
        return self.training and isinstance(self.dropout, nn.Dropout)

    def output_axis(self, ndim: int) -> int:
        """The axis of an ndim-dim output that holds the output features."""
        return self.out_axis

    def scale_shape(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """Shape an (out,) vector to broadcast along the output axis of an ndim-dim output."""
        axis = self.output_axis(ndim)
        if axis in (-1, ndim - 1):
            return v
        shape = [1] * ndim
        shape[axis] = -1
        return v.view(shape)

    def shaped_bias(self, ndim: int) -> Optional[torch.Tensor]:
        bias = self.base_bias()
        return None if bias is None else self.scale_shape(bias, ndim)

    def _compute_norm(self, cross: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.method == "magnitude":
            return self.w0_norm_sq.clamp_min(DF.NORM_EPS).sqrt()
        a, b = self.lowrank_factors()
        a_2d = a.reshape(a.shape[0], -1)
        b_2d = b.reshape(b.shape[0], -1)
        # float32 throughout, also inside an autocast region (section 2: never half precision).
        with _no_autocast(a_2d.device.type):
            if cross is None:
                cross = self.cross_term(a_2d)
            return DF.factored_norm(self.w0_norm_sq, cross, a_2d, b_2d, self.scaling)

    def _cache_key(self) -> tuple:
        # A magnitude-only norm depends on the frozen W0 alone, not on optimizer steps.
        step = OPTIMIZER_STEPS.count if self.method != "magnitude" else 0
        return NormCache.key(self.norm_dependencies(), self.scaling, step)

    def weight_norm(self, cross: Optional[torch.Tensor] = None, checked: bool = False) -> torch.Tensor:
        """‖W0 + s B A‖ per output feature, (out,) float32 (factored, never materialised).

        Detached (paper section 4.3) and cached until A, B or W0 change, unless the full
        gradient is asked for while autograd records. ``cross`` (A W0ᵀ) may be passed in when
        it was computed together with the base output; ``checked``: ``norm_is_stale()`` has
        just found the cache valid, so it is not checked again.
        """
        if not self.detach_norm and torch.is_grad_enabled():
            return self._compute_norm()
        if is_compiling():
            return self._compiled_weight_norm(cross)
        cache = self.norm_cache
        if cache.norm is not None and (checked or self._cache_valid(cache.norm)):
            return cache.norm[1]
        key = self._cache_key()
        with torch.no_grad():
            norm = self._compute_norm(cross)
        cache.norm = (key, norm)
        cache.compiled_fresh = False  # A, B or W0 changed: so is the norm a graph kept
        return norm

    def _compiled_weight_norm(self, cross: Optional[torch.Tensor]) -> torch.Tensor:
        """The detached norm inside a torch.compile graph: computed by the first call after a
        step and kept on the module (an attribute write that dynamo replays after the graph),
        read by the calls that follow until the flag is cleared. Training and no-grad calls keep
        their own copy: one made under inference_mode could not be saved for backward."""
        norm = self._compiled_norm_kept()
        if norm is not None:
            return norm
        slot = 0 if torch.is_grad_enabled() else 1
        with torch.no_grad():
            norm = self._compute_norm(cross)
        cache = self.norm_cache
        kept = cache.compiled
        if not cache.compiled_fresh or kept is None:
            kept = (None, None)
        cache.compiled = (norm, kept[1]) if slot == 0 else (kept[0], norm)
        cache.compiled_fresh = True
        return norm

    def _compiled_norm_kept(self) -> Optional[torch.Tensor]:
        """The norm kept for this mode (training or no-grad) since the last step, or None."""
        cache = self.norm_cache
        kept = cache.compiled
        if not cache.compiled_fresh or kept is None:
            return None
        return kept[0 if torch.is_grad_enabled() else 1]

    def _apply(self, fn, *args, **kwargs):
        self.norm_cache.forget_compiled()  # moved or cast: recompute
        self.norm_cache.scale = None
        return super()._apply(fn, *args, **kwargs)

    @staticmethod
    def _kept_is_fresh(kept: tuple, key: tuple) -> bool:
        """Whether a kept (key, tensor, ...) entry may be used now: computed from what ``key``
        describes, and not an inference tensor outside inference mode (a norm or scale kept under
        inference_mode cannot be saved for backward by a later training step)."""
        if kept[1].is_inference() and not torch.is_inference_mode_enabled():
            return False
        return kept[0] == key

    def _cache_valid(self, cached: Tuple[tuple, torch.Tensor]) -> bool:
        return self._kept_is_fresh(cached, self._cache_key())

    def norm_is_stale(self) -> bool:
        """True when the next ``weight_norm()`` computes a detached norm (cache empty or outdated)."""
        if self.magnitude is None or self.method == "magnitude":
            return False
        if not self.detach_norm and torch.is_grad_enabled():
            return False
        if is_compiling():
            return self._compiled_norm_kept() is None
        cached = self.norm_cache.norm
        return cached is None or not self._cache_valid(cached)

    def base_and_cross(self, x: torch.Tensor, a: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(base(x), A W0ᵀ) from one pass over W0, where the layer type can; else None."""
        return None

    def forward_scaled_weight(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """DoRA's output without autograd by scaling the weights' rows by g (default
        ``magnitude_scale()``) instead of the output, where the layer type can and that is the
        cheaper pass; else None."""
        return None

    def magnitude_scale(self, cross: Optional[torch.Tensor] = None, checked: bool = False) -> torch.Tensor:
        """g = m / ‖W0 + s B A‖, (out,) float32 (arguments: see ``weight_norm``)."""
        return DF.magnitude_scale(self.magnitude, self.weight_norm(cross, checked))

    def _scale_key(self) -> tuple:
        # g and (1 − g) ⊙ b depend on what the norm depends on, plus the magnitude and the bias
        # (one key, built once per call: this check is most of a no-grad call's own cost).
        deps = self.norm_dependencies()
        deps.append(self.magnitude)
        bias = self.base_bias()
        if bias is not None:
            deps.append(bias)
        return NormCache.key(deps, self.scaling, OPTIMIZER_STEPS.count)

    def kept_scale(self, key: tuple) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(g, (1 − g) ⊙ b) kept by an earlier no-grad call, if still fresh for ``key``; else None."""
        kept = self.norm_cache.scale
        if kept is None or not self._kept_is_fresh(kept, key):
            return None
        return kept[1], kept[2]

    def keep_scale(self, key: tuple, cross: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Compute g = m / ‖W0 + s B A‖ and (1 − g) ⊙ b (float32, no autograd) and keep them."""
        g = self.magnitude_scale(cross)
        bias = self.base_bias()
        shift = None if bias is None else (1 - g) * bias.to(torch.float32)
        self.norm_cache.scale = (key, g, shift)
        return g, shift

    def forward_no_grad(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """DoRA without autograd (evaluation, generation): y = g ⊙ (t − b) + b, t = base(x) + (x Aᵀ) Bᵀ.

        g and (1 − g) ⊙ b are kept between calls while fresh (the norm's rule, plus the magnitude
        and bias versions), and t is scaled in place, so a call costs LoRA's call plus one
        elementwise pass: a model decoding a few tokens at a time through many small layers
        pays little more per layer than LoRA does. The call that finds g stale gets the norm's
        A W0ᵀ from the base matmul where the layer type can (``base_and_cross``).
        """
        key = self._scale_key()
        kept = self.kept_scale(key)
        base_out = None
        if kept is None:
            fused = self.base_and_cross(x, a) if self.norm_is_stale() else None
            cross = None
            if fused is not None:
                base_out, cross = fused
            kept = self.keep_scale(key, cross)
        g, shift = kept
        if base_out is None:
            y = self.forward_scaled_weight(x, a, b, g)
            if y is not None:
                return y
            base_out = self.base(x)
        t = self.add_lowrank(base_out, x, a, b)  # a new tensor: scaling it in place is safe
        ndim = t.dim()
        return DF.dora_scale_shift_(t, self.scale_shape(g, ndim), None if shift is None else self.scale_shape(shift, ndim))

    # ----------------------------------------------------------------------------------------
    # Set by ``dorafit.disable_adapter`` for the duration of its block: the layer then computes
    # its frozen base module's output alone (a flag, so entering copies no weights).
    adapter_disabled: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_disabled:
            return self.base(x)
        if self.method == "magnitude":
            base_out = self.base(x)
            g = self.scale_shape(self.magnitude_scale(), base_out.dim())
            return DF.dora_scale_shift(base_out, g, self.shaped_bias(base_out.dim()), self.keep_sum())
        a, b = self.lowrank_factors()
        b_scaled = b * self.scaling  # (out, r): cheaper than scaling the (tokens, out) product
        if self.magnitude is not None and not torch.is_grad_enabled() and not is_compiling() and not self.dropping():
            return self.forward_no_grad(x, a, b_scaled)
        fused = cross = None
        checked = False  # the norm cache was found valid just now
        if self.magnitude is not None and (self.detach_norm or not torch.is_grad_enabled()):
            # The same operations whether or not the norm is cached, so that activation
            # checkpointing recomputes exactly what the first forward saved; only the rows
            # differ: the first forward after A or B changed gets the cross term A W0ᵀ along.
            stale = self.norm_is_stale()
            checked = not stale and not is_compiling()
            fused = self.base_and_cross(x, a if stale else a[:0])
            if fused is not None and stale:
                cross = fused[1]
        base_out = fused[0] if fused is not None else self.base(x)
        xd = self.dropout(x) if self.dropping() else x
        if self.magnitude is None:  # LoRA / VeRA: y = base(x) + s B A x'
            return self.add_lowrank(base_out, xd, a, b_scaled)
        g = self.scale_shape(self.magnitude_scale(cross, checked), base_out.dim())
        if xd is not x and self.dropout_mode == "input":
            # Dropout on the input of the whole DoRA update: W0 drop(x) needs a second matmul.
            lowrank = self.lowrank(xd, a, b_scaled)
            return DF.dora_compose_dropout(base_out, self.base_nobias(xd), lowrank, g)
        return self.scale_lowrank(base_out, xd, a, b_scaled, g)

    def add_lowrank(self, base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """base_out + (x Aᵀ) Bᵀ in base_out's dtype, a new tensor (layer types may fuse the sum
        into a matmul)."""
        return base_out + self.lowrank(x, a, b).to(base_out.dtype)

    def scale_lowrank(self, base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """y = g ⊙ (t − b) + b with t = base_out + (x Aᵀ) Bᵀ (layer types may fuse it further)."""
        t = self.add_lowrank(base_out, x, a, b)
        return DF.dora_scale_shift(t, g, self.shaped_bias(base_out.dim()), self.keep_sum())

    # Whether DoRA's backward may rebuild z + BAx from the layer output y instead of keeping it
    # (section "memory" of docs/performance.md). Conv nets often apply ReLU(inplace=True) to a
    # conv's output, which would invalidate a saved y, so conv adapters keep the sum instead.
    save_output_for_backward: bool = True

    def keep_sum(self) -> bool:
        """True when the compose must keep z + BAx: y cannot be used, or some g_i = 0."""
        if not self.save_output_for_backward:
            return True
        if not torch.is_grad_enabled() or not self.magnitude.requires_grad:
            return False
        cache = self.norm_cache
        if is_compiling():
            return cache.zero_magnitude[1]  # the last value seen eagerly (or at attach)
        # g = m / n is 0 exactly where m is (e.g. a zero row of W0); (y − b) / g is then undefined.
        # Checked once per magnitude value, not per forward (a device sync on GPUs).
        key = NormCache.key([self.magnitude], OPTIMIZER_STEPS.count)
        if cache.zero_magnitude[0] != key:
            cache.zero_magnitude = (key, not bool(self.magnitude.all()))
        return cache.zero_magnitude[1]

    def merged_weight_2d(self) -> torch.Tensor:
        """The adapted weight as (out, in_flat), float32: W0 + sBA, or g ⊙ (W0 + sBA)."""
        w0 = self.base_weight_2d()
        if self.method == "magnitude":
            return (self.magnitude.float() / self.w0_norm_sq.clamp_min(DF.NORM_EPS).sqrt()).unsqueeze(1) * w0.float()
        a, b = self.lowrank_factors()
        return DF.merged_weight_2d(w0, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), self.scaling, self.magnitude)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward by materialising W' (paper Eq. 5) and running the base op with it.

        Kept deliberately plain for tests: it must equal ``forward`` (outputs and gradients).
        """
        w0 = self.base_weight_2d()
        xd = self.dropout(x) if self.dropping() else x
        if self.method == "magnitude":
            norm = self.w0_norm_sq.sqrt()
            w = (self.magnitude.float() / norm).unsqueeze(1) * w0.float()
            return self.apply_weight(x, w)
        a, b = self.lowrank_factors()
        a_2d, b_2d = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        if self.magnitude is None:
            w = w0.float() + self.scaling * (b_2d.float() @ a_2d.float())
            return self.apply_weight(x, w0.float()) + self.apply_weight(xd, w - w0.float(), bias=False)
        delta = self.scaling * (b_2d.float() @ a_2d.float())  # s B A, materialised (reference only)
        if xd is x or self.dropout_mode == "lowrank":
            # g ⊙ (W0 x + s B A x') + b, with x' = x except on the low-rank path in "lowrank" mode.
            norm = torch.linalg.vector_norm(w0.float() + delta, dim=1)
            if self.detach_norm:
                norm = norm.detach()
            g = (self.magnitude.float() / norm).unsqueeze(1)
            return self.apply_weight(x, g * w0.float()) + self.apply_weight(xd, g * delta, bias=False)
        # "input" dropout: y = W0 x + b + (W' − W0) drop(x), W' from paper Eq. 5
        w_prime = DF.reference_dora_weight(w0, a_2d, b_2d, self.scaling, self.magnitude, self.detach_norm)
        return self.apply_weight(x, w0.float()) + self.apply_weight(xd, w_prime - w0.float(), bias=False)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Run the base op with another (out, in_flat) float32 weight (reference path)."""
        raise NotImplementedError

    def to_plain_module(self) -> nn.Module:
        """The base module with the merged weight (a new Parameter; the bias is unchanged)."""
        with torch.no_grad():
            merged = self.merged_weight_2d()
        return self.write_merged(merged)

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
            f"detach_norm={self.detach_norm}, dropout_mode={self.dropout_mode}"
        )
