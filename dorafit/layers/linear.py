"""Adapters for linear maps: nn.Linear (weight (out, in)) and transformers' GPT-2 ``Conv1D``
(weight stored transposed, (in, out), y = x W + b).

    lowrank(x) = (x Aᵀ) Bᵀ            A (r, in), B (out, r)
    cross      = A W0ᵀ  (r, out)      the frozen base applied to A's rows
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from .base import AdapterLayer, autocast_enabled


def _cross_through_base(layer: AdapterLayer, a_2d: torch.Tensor) -> torch.Tensor:
    """C = A W0ᵀ (r, out), float32, by running the frozen base layer on A's r rows.

    Through the module itself, so hooks that gather a sharded weight (ZeRO-3) run. Where the
    weight is plainly reachable (no hooks) it is read directly instead: a half-precision weight
    in float32 row chunks (the module would give a half-precision cross term), the float32
    weight of a plain nn.Linear in one matmul (no module call, no bias to add and take off).
    """
    base = layer.base
    w = base.weight
    hooked = bool(base._forward_hooks or base._forward_pre_hooks)
    plain_linear = type(base) is nn.Linear and type(w.data) is torch.Tensor  # not a sharded or subclassed weight
    if not hooked and (w.dtype != torch.float32 or plain_linear):
        return DF.rows_times_weight_t(a_2d, layer.base_weight_2d())
    out = base(a_2d.to(w.dtype))
    if base.bias is not None:
        out = out - base.bias
    return out.to(torch.float32)


def _add_lowrank_addmm(base_out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """base_out + (x Aᵀ) Bᵀ with the sum inside the second matmul (addmm), where dtypes allow."""
    h = F.linear(x.to(a.dtype), a)  # (..., r)
    if base_out.dtype != b.dtype or not base_out.is_contiguous() or autocast_enabled(base_out.device.type):
        return base_out + F.linear(h, b).to(base_out.dtype)
    out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t())
    return out.view(base_out.shape)


def _tokens(x: torch.Tensor) -> int:
    """Rows of the input once its leading axes are flattened."""
    return x.numel() // max(1, x.shape[-1])


def _scale_lowrank_fused(layer: AdapterLayer, base_out, x, a, b, g):
    """DoRA's y = g ⊙ (base_out − b + (x Aᵀ) Bᵀ) + b with the second low-rank matmul and the
    scaling in one autograd node, where dtypes allow (base output, B and g of one dtype, no
    autocast, no g_i = 0); elsewhere the generic compose."""
    if base_out.dtype != b.dtype or g.dtype != b.dtype or autocast_enabled(base_out.device.type) or layer.keep_sum():
        return AdapterLayer.scale_lowrank(layer, base_out, x, a, b, g)
    h = F.linear(x.to(a.dtype), a)  # (..., r)
    return DF.dora_lowrank_linear(base_out, h, b, g, layer.base_bias())


class LinearAdapter(AdapterLayer):
    """LoRA / DoRA on nn.Linear (with or without bias)."""

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight

    def lora_a_shape(self) -> Tuple[int, ...]:
        return (self.rank, self.base.in_features)

    def lora_b_shape(self) -> Tuple[int, ...]:
        return (self.base.out_features, self.rank)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.base.weight)

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        return _cross_through_base(self, a_2d)

    def _plain_float32_weight(self, x: torch.Tensor, a: torch.Tensor) -> Optional[torch.Tensor]:
        """W0 where the base is a plain float32 nn.Linear that may be bypassed: a frozen dense
        weight, no hooks, float32 input and A, no autocast. Else None (half precision: the
        cross term must be float32; quantized or sharded weights; hooks that expect the call)."""
        base, w = self.base, self.base.weight
        plain = type(base) is nn.Linear and type(w.data) is torch.Tensor and not w.requires_grad
        if not plain or base._forward_hooks or base._forward_pre_hooks:
            return None
        if w.dtype != torch.float32 or x.dtype != torch.float32 or a.dtype != torch.float32:
            return None
        if autocast_enabled(x.device.type):
            return None
        return w

    def base_and_cross(self, x: torch.Tensor, a: torch.Tensor):
        """One matmul [x; A] W0ᵀ for a plain float32 nn.Linear; anything else takes the
        separate path."""
        # Worth it while reading W0 a second time (for A W0ᵀ alone) costs more than copying x
        # into the stacked input: fewer tokens than half the output features.
        if 2 * _tokens(x) >= self.base.out_features:
            return None
        w = self._plain_float32_weight(x, a)
        if w is None:
            return None
        return DF.linear_with_rows(x, a, w, self.base.bias)

    def forward_scaled_weight(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, g: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """DoRA without autograd, for more tokens than input features on a plain float32 linear:
        g scales W0's rows and B's rows instead of the (tokens, out) output.

            y = x (g ⊙ W0)ᵀ + b + (x Aᵀ)(g ⊙ B)ᵀ        (B already scaled by s)

        The (out, in) temporary g ⊙ W0 is smaller than the output, and the low-rank product is
        added in place, so evaluation costs what LoRA's does. Where tokens ≤ in, scaling the
        output is the cheaper pass and the caller does that instead.
        """
        if _tokens(x) <= x.shape[-1] or b.dtype != torch.float32:  # the cheap test first: decoding
            return None
        w = self._plain_float32_weight(x, a)
        if w is None:
            return None
        x_2d = x.reshape(-1, x.shape[-1])
        g = (self.magnitude_scale() if g is None else g).unsqueeze(1)  # (out, 1)
        w_scaled = w * g
        bias = self.base.bias
        y = torch.mm(x_2d, w_scaled.t()) if bias is None else torch.addmm(bias, x_2d, w_scaled.t())
        del w_scaled
        y.addmm_(F.linear(x_2d, a), (b * g).t())
        return y.view(*x.shape[:-1], y.shape[-1])

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(a.dtype), a), b)  # (..., r) -> (..., out)

    def add_lowrank(self, base_out, x, a, b):
        return _add_lowrank_addmm(base_out, x, a, b)

    def scale_lowrank(self, base_out, x, a, b, g):
        return _scale_lowrank_fused(self, base_out, x, a, b, g)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.base.bias if bias else None
        return F.linear(x.float(), weight_2d, None if b is None else b.float())

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.to(self.base.weight.dtype)


class Conv1DAdapter(AdapterLayer):
    """LoRA / DoRA on transformers' ``Conv1D`` (GPT-2 style, weight (in, out), y = x W + b)."""

    def base_weight_2d(self) -> torch.Tensor:
        return self.base.weight.t()  # (out, in) view

    def lora_a_shape(self) -> Tuple[int, ...]:
        return (self.rank, self.base.weight.shape[0])

    def lora_b_shape(self) -> Tuple[int, ...]:
        return (self.base.weight.shape[1], self.rank)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base.weight

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        return _cross_through_base(self, a_2d)

    def lowrank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(a.dtype), a), b)

    def add_lowrank(self, base_out, x, a, b):
        return _add_lowrank_addmm(base_out, x, a, b)

    def scale_lowrank(self, base_out, x, a, b, g):
        return _scale_lowrank_fused(self, base_out, x, a, b, g)

    def apply_weight(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.base.bias if bias else None
        return F.linear(x.float(), weight_2d, None if b is None else b.float())

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.t().contiguous().to(self.base.weight.dtype)
