"""What an adapter keeps between calls, and the rules that decide when it is still valid.

Per adapted layer (``AdapterLayer.norm_cache``) dorafit keeps

    ‖W0‖²              (out,) float32   from the frozen base, again only when W0 changes
    n² = ‖W0 + s B A‖² (out,) float32   detached (paper section 4.3) and floored at NORM_EPS, for
                                        calls with autograd and compiled calls: paid once per
                                        optimizer step, reused by the gradient-accumulation
                                        micro-batches, activation-checkpoint recomputation and
                                        evaluation that follow; n, its square root, beside it once
                                        a path asks for n (the one-node paths take g from n² alone)
    g, (1 − g) ⊙ b     (out,)           g = m / n for eager calls without autograd (evaluation,
                                        generation), in the output's dtype
    zeros              (out,) float32   batch norm's statistics in the one-node DoRA paths
    w0_zero_rows       bool             whether W0 has a zero row (``compose.keeps_sum``), read
                                        on the host when ‖W0‖² is computed for a new W0

The layer asks (``w0_norm_sq``, ``kept_norm_sq`` / ``keep_norm_sq``, ``norm_sq``, ``norm``,
``scale``, ``zeros``); the cache decides. The rule: a kept value is valid while nothing it was computed from changed — no optimizer
step ran since (any optimizer, fused ones included: ``OPTIMIZER_STEPS`` counts them), and A, B,
W0 (the layer's ``norm_inputs()``; for g also m and the bias) are the same tensors at the same
version (in-place writes bump it; a tensor-parallel layer compares the parameter objects rather
than their storage, so that every rank of its group decides alike). A value made under ``torch.inference_mode`` is not handed to
calls outside it (it could not be saved for backward).

Where the norm of a call comes from (kept as n²; ``dorafit.layers.compose`` asks):

    | the call                                     | its norm                                       |
    |----------------------------------------------|------------------------------------------------|
    | detach_norm=False, autograd recording        | computed with autograd, never kept             |
    | eager, a valid norm is kept                  | the kept one (no work)                         |
    | eager, none valid; plain linear, few tokens  | A W0ᵀ and A Aᵀ from the output's own matmuls   |
    |                                              | ([x; A] W0ᵀ, [x; A] Aᵀ), then kept             |
    | eager, none valid; otherwise                 | A W0ᵀ through the base layer, then kept        |
    | inside torch.compile                         | a slot per mode (autograd or not) on the cache,|
    |                                              | valid until the flag ``compiled_fresh`` drops  |

A graph cannot compare version counters, so compiled code reads ``compiled_fresh`` instead; an
optimizer step, ``load_state_dict``, a move or cast and ``forget`` clear it. Writes behind
autograd's back (through ``.data``, by a collective) are seen by neither rule:
``invalidate_norm_caches`` then forgets everything.

A cache is never copied: ``pickle`` and ``copy.deepcopy`` of an adapter give it a fresh one,
watched by the optimizer-step counter like any other (only ``w0_zero_rows`` carries over).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Tuple

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import functional as DF


def is_compiling() -> bool:
    """True while torch.compile traces (the version-counter rule is replaced by a flag there)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


class _OptimizerSteps:
    """Counts optimizer steps of any optimizer (fused ones update parameters without bumping
    their version counters) and marks the norms kept inside compiled graphs as stale.

    Its hook is registered when the first cache is made, not when dorafit is imported.
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


def base_bias(layer: nn.Module) -> Optional[torch.Tensor]:
    """The base module's bias, or None (read as a dict entry where it is a parameter: this runs
    on every call, and nn.Module.__getattr__ costs about a microsecond a lookup)."""
    base = layer._modules["base"]
    params = base._parameters
    return params["bias"] if "bias" in params else getattr(base, "bias", None)


def _key(tensors, *extra, by_identity: bool = False) -> tuple:
    """What a kept value was computed from: each tensor's storage and version, plus ``extra``.
    ``by_identity``: each tensor object and its version instead of its storage (a layer whose
    storage moves between calls differently on each rank, see ``_keyed_by_identity``)."""
    if by_identity:
        return tuple([(id(t), t._version) for t in tensors]) + extra
    return tuple([(t.data_ptr(), t._version) for t in tensors]) + extra


def _keyed_by_identity(layer: nn.Module) -> bool:
    """A tensor-parallel layer whose recomputed norm runs a collective must decide hits and misses
    alike on every rank of its group. Under FSDP2 its parameters' storage is gathered anew for
    each forward, at addresses that differ from rank to rank, so a storage key would hit on one
    rank and miss (and all-reduce) on another; the parameter objects and their versions change
    at the same points on every rank. Such a layer keys by identity (``keys_by_identity``) and
    lists its parameters, not their local parts, in ``norm_inputs``."""
    return getattr(layer, "keys_by_identity", False)


def _usable(kept: Optional[tuple], key: tuple) -> bool:
    """A kept (key, tensor, ...) entry computed from what ``key`` describes, and not an inference
    tensor outside inference mode."""
    if kept is None or kept[0] != key:
        return False
    return not kept[1].is_inference() or torch.is_inference_mode_enabled()


class NormCache:
    """The kept values of one adapter layer (see the module docstring for the rules)."""

    def __init__(self, w0_zero_rows: Optional[bool] = None) -> None:
        self.w0: Optional[Tuple[tuple, torch.Tensor]] = None  # (key, ‖W0‖²)
        # Whether W0 has a zero row (then m_i = 0 and y_i = b_i keeps no trace of s (BA)_i x, so
        # the output cannot stand in for z + s B A x in backward: ``compose`` keeps the sum).
        # Read on the host when ‖W0‖² is computed for a new W0, never in a step.
        self.w0_zero_rows = w0_zero_rows
        self.norm_entry: Optional[tuple] = None  # (key, n², n or None), eager
        self.scale_entry: Optional[tuple] = None  # (key, g, (1 − g) ⊙ b or None), eager, no autograd
        self.zero_entry: Optional[torch.Tensor] = None
        # Inside compiled graphs: (n² kept for calls with autograd, n² kept for calls without).
        self.compiled: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
        self.compiled_fresh = False
        self._pending: Optional[tuple] = None  # the key ``kept_norm_sq`` found invalid, for ``keep_norm_sq``
        OPTIMIZER_STEPS.watch(self)

    def __reduce__(self):
        return (NormCache, (self.w0_zero_rows,))  # copies and unpickled adapters start empty

    # ---------------------------------------------------------------------------------------
    # What a layer asks
    def w0_norm_sq(self, layer: nn.Module) -> torch.Tensor:
        """‖W0‖² per output feature, float32, recomputed only when the base weight changed."""
        if is_compiling() and self.w0 is not None:
            return self.w0[1]  # a constant of the graph: data pointers cannot be compared there
        w = layer.base.weight
        if _keyed_by_identity(layer):
            key = _key([w], w.device, w.dtype, by_identity=True)
        else:
            if hasattr(w, "device_mesh"):  # a DTensor: its local part has the storage
                w = w.to_local()
            key = _key([w], w.device, w.dtype)
        if not _usable(self.w0, key):
            new_weight = self.w0 is not None or self.w0_zero_rows is None  # not a move after ``forget``
            with torch.no_grad():
                norm_sq = layer.initial_weight_norm_sq().to(torch.float32)
            if new_weight and not is_compiling() and norm_sq.device.type != "meta":
                self.w0_zero_rows = bool((norm_sq == 0).any())
            self.w0 = (key, norm_sq)
        return self.w0[1]

    def kept_norm_sq(self, layer: nn.Module) -> Optional[torch.Tensor]:
        """The detached, floored n² = ‖W0 + s B A‖² valid for this call, or None (then
        ``keep_norm_sq``)."""
        if is_compiling():
            return self.compiled[0 if torch.is_grad_enabled() else 1] if self.compiled_fresh else None
        key = self._norm_key(layer)
        if _usable(self.norm_entry, key):
            return self.norm_entry[1]
        self._pending = key
        return None

    def keep_norm_sq(self, layer: nn.Module, norm_sq: torch.Tensor) -> torch.Tensor:
        """Keep an n² this call computed (after ``kept_norm_sq`` found none); returns it. Called
        in the call's own grad mode (not inside its ``no_grad`` block)."""
        if is_compiling():
            # Training and no-grad calls keep their own: one made without autograd (under
            # inference_mode) could not be saved for backward. Dynamo replays this write.
            slots = self.compiled if self.compiled_fresh else (None, None)
            self.compiled = (norm_sq, slots[1]) if torch.is_grad_enabled() else (slots[0], norm_sq)
            self.compiled_fresh = True
            return norm_sq
        key = self._pending if self._pending is not None else self._norm_key(layer)
        self.norm_entry, self._pending = (key, norm_sq, None), None
        self.compiled_fresh = False  # A, B or W0 changed: so has the norm a graph kept
        return norm_sq

    def norm_sq(self, layer: nn.Module) -> torch.Tensor:
        """The detached, floored n² of this call: the kept one, or computed through the base
        layer and kept."""
        norm_sq = self.kept_norm_sq(layer)
        if norm_sq is None:
            with torch.no_grad():
                norm_sq = layer._compute_norm_sq()
            norm_sq = self.keep_norm_sq(layer, norm_sq)  # outside no_grad: the compiled slot is per mode
        return norm_sq

    def norm(self, layer: nn.Module) -> torch.Tensor:
        """The norm n of this call: with its gradient where ``detach_norm=False`` and autograd
        records (never kept), else the square root of ``norm_sq``, kept beside it."""
        if not layer.detach_norm and torch.is_grad_enabled():
            return layer._compute_norm()
        norm_sq = self.norm_sq(layer)
        if is_compiling():
            return norm_sq.sqrt()
        key, kept_sq, norm = self.norm_entry
        if norm is None:
            norm = kept_sq.sqrt()
            self.norm_entry = (key, kept_sq, norm)
        return norm

    def zeros(self, like: torch.Tensor) -> torch.Tensor:
        """An (out,) zero vector like ``like`` (n²), made once rather than in every step: batch
        norm's mean and variance in the one-node DoRA paths. Made in the graph when compiled."""
        if is_compiling():
            return torch.zeros_like(like)
        kept = self.zero_entry
        alike = kept is not None and (kept.shape, kept.dtype, kept.device) == (like.shape, like.dtype, like.device)
        if not alike or (kept.is_inference() and not torch.is_inference_mode_enabled()):
            kept = self.zero_entry = torch.zeros_like(like)
        return kept

    def scale(self, layer: nn.Module, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(g, (1 − g) ⊙ b) in ``dtype`` for an eager call without autograd, kept while valid.

        g = m / n by a division (n = √n², kept), not by ``scale_from_squares``: the division is
        correctly rounded, so g is exactly 1 where m = ‖W0‖ and B = 0, and an adapter just
        attached evaluates bit for bit as its base. Batch norm's m · (1 / √n²) can be 1 ulp off.
        Made once per refresh, so the extra operator is not paid per call."""
        bias = base_bias(layer)
        deps = layer.norm_inputs() + [layer.magnitude] + ([bias] if bias is not None else [])
        key = _key(deps, layer.scaling, OPTIMIZER_STEPS.count, dtype, by_identity=_keyed_by_identity(layer))
        if _usable(self.scale_entry, key):
            return self.scale_entry[1], self.scale_entry[2]
        g = DF.magnitude_scale(layer.magnitude, self.norm(layer))
        shift = None if bias is None else ((1 - g) * bias.to(torch.float32)).to(dtype)
        self.scale_entry = (key, g.to(dtype), shift)
        return self.scale_entry[1], shift

    # ---------------------------------------------------------------------------------------
    def forget_compiled(self) -> None:
        self.compiled, self.compiled_fresh = (None, None), False

    def forget(self) -> None:
        self.w0 = self.norm_entry = self.scale_entry = self.zero_entry = self._pending = None
        self.forget_compiled()

    def _norm_key(self, layer: nn.Module) -> tuple:
        # A magnitude-only norm depends on the frozen W0 alone, not on optimizer steps.
        step = OPTIMIZER_STEPS.count if layer.method != "magnitude" else 0
        return _key(layer.norm_inputs(), layer.scaling, step, by_identity=_keyed_by_identity(layer))


def forget_on_load(layer: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook of every adapter: loaded values replace what graphs kept."""
    layer.norm_cache.compiled_fresh = False


def invalidate_norm_caches(model: nn.Module) -> None:
    """Forget every cached norm and ‖W0‖² of ``model``'s adapters.

    Needed only after writing parameters behind autograd's back (through ``.data``, or with a
    collective such as ``broadcast``); optimizer steps and in-place ops are detected.
    """
    for module in model.modules():
        cache = getattr(module, "norm_cache", None)
        if isinstance(cache, NormCache):
            cache.forget()
            cache.w0_zero_rows = None  # W0 may have been written too: read it again
