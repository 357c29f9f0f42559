"""Adapters for linear maps: nn.Linear (weight (out, in)) and transformers' GPT-2 ``Conv1D``
(weight stored transposed, (in, out), y = x W + b). Both are linear layouts (``LinearLayout``):
they share every path of ``compose`` and differ only in how W0 is stored.

    lowrank(x) = (x Aᵀ) Bᵀ            A (r, in), B (out, r)
    cross      = A W0ᵀ  (r, out)      the frozen base applied to A's rows
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from .base import AdapterLayer


class LinearLayout(AdapterLayer):
    """What nn.Linear and GPT-2 Conv1D adapters share: y = x W0ᵀ + b with W0 (out, in)."""

    linear_layout = True
    base_type: type = nn.Linear  # exactly this type (not a quantized subclass) may be bypassed
    stores_out_in = True  # the base's weight is (out, in) as stored (Conv1D stores (in, out))

    def features(self) -> Tuple[int, int]:
        """(out, in) of the base layer, without dequantizing it."""
        raise NotImplementedError

    def lora_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        out_features, in_features = self.features()
        return (self.rank, in_features), (out_features, self.rank)

    def direct_weight(self) -> Optional[torch.Tensor]:
        """W0 as (out, in) where the base may be bypassed — exactly ``base_type`` (not a quantized
        or other subclass), a frozen dense weight, no hooks that expect the call — else None."""
        # Read as dict entries: this runs on every call, and nn.Module.__getattr__ costs about a
        # microsecond a lookup.
        base = self._modules["base"]
        if type(base) is not self.base_type or base._forward_hooks or base._forward_pre_hooks:
            return None
        w = base._parameters.get("weight")
        # A plain Parameter (not DTensor, not a quantized parameter class), frozen.
        if type(w) is not nn.Parameter or w.requires_grad:
            return None
        return w if self.stores_out_in else w.t()

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        """C = A W0ᵀ (r, out), float32, by running the frozen base layer on A's r rows.

        Through the module itself, so hooks that gather a sharded weight (ZeRO-3) run. Where the
        weight is plainly reachable it is read directly instead: a half-precision weight in
        float32 row chunks (the module would give a half-precision cross term), the weight of a
        plain layer in one matmul (no module call, no bias to add and take off).
        """
        base, w = self.base, self.base.weight
        hooked = bool(base._forward_hooks or base._forward_pre_hooks)
        if not hooked and (w.dtype != torch.float32 or self.direct_weight() is not None):
            return DF.rows_times_weight_t(a_2d, self.base_weight_2d())
        out = base(a_2d.to(w.dtype))
        if base.bias is not None:
            out = out - base.bias
        return out.to(torch.float32)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base_weight_2d())

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(a.dtype), a), b)  # (..., r) -> (..., out)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.base.bias if bias else None
        return F.linear(x.float(), weight_2d, None if b is None else b.float())


class LinearAdapter(LinearLayout):
    """LoRA / DoRA on nn.Linear (with or without bias)."""

    def features(self) -> Tuple[int, int]:
        return self.base.out_features, self.base.in_features

    def base_weight_2d(self) -> torch.Tensor:
        base = self._modules["base"]
        weight = base._parameters.get("weight")  # a dict entry: read on every call (cache keys)
        return weight if weight is not None else base.weight

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.to(self.base.weight.dtype)


@functools.lru_cache(maxsize=None)
def _conv1d_type() -> type:
    """transformers' GPT-2 Conv1D (a model that has one has imported transformers already)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


class Conv1DAdapter(LinearLayout):
    """LoRA / DoRA on transformers' ``Conv1D`` (GPT-2 style, weight (in, out), y = x W + b)."""

    stores_out_in = False

    @property
    def base_type(self) -> type:
        return _conv1d_type()

    def features(self) -> Tuple[int, int]:
        in_features, out_features = self.base.weight.shape
        return out_features, in_features

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight.t()  # (out, in) view

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.t().contiguous().to(self.base.weight.dtype)
