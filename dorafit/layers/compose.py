"""How an adapted layer computes its output: one function per method and mode, and the table of
every numeric path with the condition under which it runs. Read this table first.

Notation: x the input, x' = dropout(x) (x itself in evaluation or without dropout), W0 and b the
frozen base weight and bias, s the scaling, A (r, in) and B (out, r) the low-rank factors
(VeRA / DVoRA: A = Λ_d A_shared, B = Λ_b B_shared, s = 1), m the magnitude, n = ‖W0 + s B A‖
per output feature (detached and kept per optimizer step unless ``detach_norm=False``: see
``cache``), g = m / n.

    | path                | computes                                        | runs when                                           |
    |---------------------|-------------------------------------------------|-----------------------------------------------------|
    | base                | y = base(x)                                     | the adapter is disabled (``disable_adapter``)       |
    | lora-addmm          | y = x W0ᵀ + b + s (x' Aᵀ) Bᵀ in one autograd    | LoRA, VeRA on a plain linear layout (*)             |
    |                     | node, the sum made in place by the second       |                                                     |
    |                     | matmul (``functional.lora_linear``)             |                                                     |
    | lora                | y = base(x) + s B A x'                          | LoRA, VeRA otherwise                                |
    | magnitude           | y = (m / ‖W0‖) ⊙ (base(x) − b) + b              | magnitude-only                                      |
    | dora-no-grad-rows   | y = x (g ⊙ W0)ᵀ + b + (x Aᵀ)(g ⊙ s B)ᵀ          | DoRA, DVoRA, eager, no autograd, no dropout; plain  |
    |                     |                                                 | linear layout (*), more tokens than inputs          |
    | dora-no-grad-addmm  | t = x W0ᵀ + b + (x Aᵀ)(s B)ᵀ (addmm_), then     | DoRA, DVoRA, eager, no autograd, no dropout; plain  |
    |                     | y = g ⊙ t + (1 − g) ⊙ b in place, g and         | linear layout (*)                                   |
    |                     | (1 − g) ⊙ b kept                                |                                                     |
    | dora-no-grad        | the same with t = base(x) + s B A x             | DoRA, DVoRA, eager, no autograd, no dropout         |
    | dora-dropout        | y = base(x) + (g − 1) ⊙ W0 x' + g ⊙ s B A x'    | DoRA, DVoRA training with dropout > 0 on the whole  |
    |                     |                                                 | update (``dropout_mode="input"``, the default)      |
    | dora-keep-sum       | y = g ⊙ (t − b) + b, t = base(x) + s B A x',    | DoRA, DVoRA on convolutions (an in-place ReLU after |
    |                     | t kept for ∂L/∂m                                | a conv would overwrite a saved y), or where W0 has  |
    |                     |                                                 | a zero row (m_i = 0: y_i = b_i keeps no trace of t) |
    | dora-linear-rows    | y = x (g ⊙ W0)ᵀ + b + s (x' Aᵀ)(g ⊙ B)ᵀ in one  | DoRA, DVoRA with a detached norm on a plain linear  |
    |                     | autograd node (``functional.dora_linear_rows``) | layout (*), eager, more tokens than inputs          |
    | dora-linear         | y = g ⊙ (x W0ᵀ + s (x' Aᵀ) Bᵀ) + b in one       | DoRA, DVoRA with a detached norm on a plain linear  |
    |                     | autograd node (``functional.dora_linear``)      | layout (*), with autograd or compiled               |
    | dora                | y = g ⊙ (t − b) + b, t = base(x) + s B A x',    | DoRA, DVoRA otherwise (embeddings, quantized or     |
    |                     | y kept for ∂L/∂m                                | hooked bases, autocast, mixed dtypes, full norm     |
    |                     |                                                 | gradient)                                           |

(*) plain linear layout: the base is exactly ``nn.Linear`` or transformers' GPT-2 ``Conv1D``,
with a frozen dense weight and no hooks (so W0 may be read directly: quantized, sharded and
hooked bases are always called as modules), and x, A, B and W0 share one dtype outside autocast.
Every path has a reference: ``AdapterLayer.reference_forward`` builds W' of paper Eq. 5 and
``tests/layers/test_paths.py`` holds each row equal to it, outputs and gradients.

No path reads a tensor's value on the host: a zero magnitude is handled in the formulas
(``functional._DoraLinear``), never by asking whether there is one.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as DF
from .cache import base_bias, is_compiling


# One call for every device type (torch >= 2.4), asked first where most calls run outside autocast.
_IS_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_enabled(device_type: str) -> bool:
    """True inside an autocast region for this device type."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def no_autocast(device_type: str):
    """Autocast off (the norm is float32), entered only where it is on: entering torch.autocast
    costs as much as a small kernel."""
    if (_IS_ANY_AUTOCAST is not None and not _IS_ANY_AUTOCAST()) or not autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def dropping(layer) -> bool:
    """True when dropout changes the input (training with p > 0)."""
    return layer.training and isinstance(layer._modules["dropout"], nn.Dropout)


def shaped(layer, v: Optional[torch.Tensor], ndim: int) -> Optional[torch.Tensor]:
    """An (out,) vector shaped to broadcast along the output-feature axis of an ndim-dim output."""
    axis = layer.output_axis(ndim)
    if v is None or axis in (-1, ndim - 1):
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def _base(layer) -> nn.Module:
    return layer._modules["base"]  # a dict entry: nn.Module.__getattr__ costs about a microsecond


def _adapter_dtype(layer) -> torch.dtype:
    params = layer._parameters  # dict entries: this runs on every call
    for name in ("magnitude", "lora_b", "vera_b"):
        p = params.get(name)
        if p is not None:
            return p.dtype
    raise AssertionError("an adapter without parameters")


def _any_autocast(x: torch.Tensor) -> bool:
    """Whether an autocast region is open (any device type: cheaper than asking x's, and a
    region for another device only sends the call to the generic path)."""
    return _IS_ANY_AUTOCAST() if _IS_ANY_AUTOCAST is not None else autocast_enabled(x.device.type)


def _direct(layer, x: torch.Tensor) -> bool:
    """True for a plain linear layout (see the table): W0 may be read directly."""
    if not layer.linear_layout:
        return False
    w = layer.direct_weight()
    return w is not None and w.dtype == x.dtype == _adapter_dtype(layer) and not _any_autocast(x)


def keeps_sum(layer) -> bool:
    """Keep z + s B A x rather than y for ∂L/∂m: convolutions (an in-place ReLU after a conv
    would overwrite a saved y), and a W0 with a zero row (there y_i = b_i whatever B A x is)."""
    cache = layer.norm_cache
    if cache.w0_zero_rows is None and not is_compiling():
        cache.w0_norm_sq(layer)  # reads it, once per base weight
    return layer.always_keep_sum or bool(cache.w0_zero_rows)


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def _scale_rows(x: torch.Tensor) -> bool:
    """More tokens than input features: the (out, in) g ⊙ W0 is then smaller than the
    (tokens, out) output, so g goes on the rows of W0 and B (the ``-rows`` paths)."""
    return _tokens(x) > x.shape[-1]


# ------------------------------------------------------------------------------------------------
# LoRA, VeRA, magnitude-only


def base_only(layer, x: torch.Tensor) -> torch.Tensor:
    """y = base(x): the frozen base module alone."""
    return _base(layer)(x)


def lora(layer, x: torch.Tensor) -> torch.Tensor:
    """y = base(x) + s · B A x'   (LoRA; VeRA with A = Λ_d A_shared, B = Λ_b B_shared, s = 1)."""
    a, b = layer.lowrank_factors()
    xd = layer.dropout(x) if dropping(layer) else x
    base_out = _base(layer)(x)
    return base_out + layer.lowrank(xd, a, b * layer.scaling).to(base_out.dtype)


def lora_addmm(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x W0ᵀ + b + (x' Aᵀ)(s B)ᵀ in one autograd node (``functional.lora_linear``): the sum made
    in place by the second matmul, s its alpha, and no elementwise pass forward or backward."""
    a, b = layer.lowrank_factors()
    x_2d = x.reshape(-1, x.shape[-1])
    low_2d = layer.dropout(x).reshape(x_2d.shape) if dropping(layer) else None
    y = DF.lora_linear(x_2d, low_2d, a, b, layer.direct_weight(), base_bias(layer), layer.scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


def magnitude_only(layer, x: torch.Tensor) -> torch.Tensor:
    """y = (m / ‖W0‖) ⊙ (base(x) − b) + b   (magnitude-only DoRA: W' = m ⊙ W0 / ‖W0‖)."""
    base_out = _base(layer)(x)
    ndim = base_out.dim()
    g = shaped(layer, DF.magnitude_scale(layer.magnitude, layer.weight_norm()), ndim)
    return DF.dora_scale_shift(base_out, g, shaped(layer, base_bias(layer), ndim), keeps_sum(layer))


# ------------------------------------------------------------------------------------------------
# DoRA and DVoRA without autograd (eager evaluation and generation)


def _scale_in_place(layer, t: torch.Tensor) -> torch.Tensor:
    g, shift = layer.norm_cache.scale(layer, t.dtype)  # kept between calls
    ndim = t.dim()
    return DF.dora_scale_shift_(t, shaped(layer, g, ndim), shaped(layer, shift, ndim))


def dora_no_grad(layer, x: torch.Tensor) -> torch.Tensor:
    """y = g ⊙ t + (1 − g) ⊙ b with t = base(x) + s B A x, scaled in place.

    g and (1 − g) ⊙ b are kept between calls while valid (``cache``), and t is a new tensor
    (never the base module's own output, which a hook may hold), so a call costs LoRA's call
    plus one elementwise pass.
    """
    a, b = layer.lowrank_factors()
    base_out = _base(layer)(x)
    return _scale_in_place(layer, base_out + layer.lowrank(x, a, b * layer.scaling).to(base_out.dtype))


def dora_no_grad_addmm(layer, x: torch.Tensor) -> torch.Tensor:
    """y = g ⊙ t + (1 − g) ⊙ b with t = x W0ᵀ + b + (x Aᵀ)(s B)ᵀ, the sum made in place by the
    second matmul (``functional.lora_sum``, LoRA's forward), then scaled in place (g and (1 − g) ⊙ b kept
    as in ``dora_no_grad``). W0 is read directly, so t is this call's own tensor."""
    a, b = layer.lowrank_factors()
    x_2d = x.reshape(-1, x.shape[-1])
    t, _ = DF.lora_sum(x_2d, None, a, b, layer.direct_weight(), base_bias(layer), layer.scaling)
    g, shift = layer.norm_cache.scale(layer, t.dtype)  # kept between calls; features are t's last axis
    return DF.dora_scale_shift_(t, g, shift).view(*x.shape[:-1], t.shape[-1])


def dora_no_grad_rows(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x (g ⊙ W0)ᵀ + b + (x Aᵀ)(g ⊙ s B)ᵀ: g scales the rows of W0 and B instead of the output.

    With more tokens than input features the (out, in) temporary g ⊙ W0 is smaller than the
    (tokens, out) output, and the low-rank product is added in place: evaluation costs what
    LoRA's does. g is kept in W0's dtype (computed in float32, as everywhere).
    """
    a, b = layer.lowrank_factors()
    w, bias = layer.direct_weight(), base_bias(layer)
    g = layer.norm_cache.scale(layer, w.dtype)[0].unsqueeze(1)  # (out, 1)
    x_2d = x.reshape(-1, x.shape[-1])
    w_scaled = w * g
    y = torch.mm(x_2d, w_scaled.t()) if bias is None else torch.addmm(bias, x_2d, w_scaled.t())
    del w_scaled
    y.addmm_(F.linear(x_2d, a), (b * g).t(), alpha=layer.scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------------------------
# DoRA and DVoRA with autograd, or compiled


def dora(layer, x: torch.Tensor, keep_sum: bool = False) -> torch.Tensor:
    """y = g ⊙ (t − b) + b,  t = base(x) + s · B A x'   (paper Eq. 5 without building W').

    The bias is never scaled by g. The autograd node (``functional.dora_scale_shift``) keeps y
    for ∂L/∂m, or t with ``keep_sum``. With ``detach_norm=False`` n carries its own gradient.
    """
    a, b = layer.lowrank_factors()
    xd = layer.dropout(x) if dropping(layer) else x
    base_out = _base(layer)(x)
    ndim = base_out.dim()
    g = shaped(layer, layer.magnitude_scale(), ndim)
    t = base_out + layer.lowrank(xd, a, b * layer.scaling).to(base_out.dtype)
    return DF.dora_scale_shift(t, g, shaped(layer, base_bias(layer), ndim), keep_sum)


def dora_dropout(layer, x: torch.Tensor) -> torch.Tensor:
    """y = base(x) + (g − 1) ⊙ W0 x' + g ⊙ s B A x'   (dropout on the input of the whole update,
    as the official code and PEFT: W0 x' costs a second base matmul)."""
    a, b = layer.lowrank_factors()
    xd = layer.dropout(x)
    base_out = _base(layer)(x)
    g = shaped(layer, layer.magnitude_scale(), base_out.dim())
    return DF.dora_compose_dropout(base_out, layer.base_nobias(xd), layer.lowrank(xd, a, b * layer.scaling), g)


def _stack_norm_rows(x_2d: torch.Tensor, w: torch.Tensor) -> bool:
    """Fewer tokens than a quarter of the output features: A's r rows then ride in the output's
    matmul ([x; A] W0ᵀ), which saves a second read of W0 but copies x and makes y outside z's
    storage. Measured on a CPU (``benchmarks/results/cross-layout.md``): the stacked rows cost
    less at 64–256 tokens through 1024² and 4096² layers, more at 512 tokens × 576 → 1536 and
    1024 tokens × 1024 → 2816, where W0 Aᵀ is its own matmul."""
    return 4 * x_2d.shape[0] < w.shape[0]


def _linear_products(layer, x_2d, low_2d, a, w):
    """x W0ᵀ, x' Aᵀ and the detached n², without autograd: n² kept, or computed now (its A W0ᵀ
    and A Aᵀ from the output's own matmuls where there are few tokens)."""
    kept = layer.norm_cache.kept_norm_sq(layer)
    with torch.no_grad():
        if kept is None and low_2d is None and _stack_norm_rows(x_2d, w):
            z, h, cross, gram = DF.stacked_products(x_2d, a, w)
            norm_sq = layer._compute_norm_sq(cross, gram)
        else:
            z, h = x_2d @ w.t(), (x_2d if low_2d is None else low_2d) @ a.t()
            norm_sq = layer._compute_norm_sq() if kept is None else kept
    return z, h, kept if kept is not None else layer.norm_cache.keep_norm_sq(layer, norm_sq)


def dora_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """y = g ⊙ (x W0ᵀ + s (x' Aᵀ) Bᵀ) + b in one autograd node (``functional.dora_linear``).

    LoRA's three matmuls forward (their products made without autograd, the norm's rows stacked
    on the tokens where the norm is due), then g and one in-place scaling; backward one more
    elementwise pass than LoRA's and the magnitude's reduction. The operations saved for
    backward are the same whether or not the norm was due, so activation checkpointing
    recomputes what the first forward saved.
    """
    a, b = layer.lowrank_factors()
    w = layer.direct_weight()
    x_2d = x.reshape(-1, x.shape[-1])
    low_2d = layer.dropout(x).reshape(x_2d.shape) if dropping(layer) else None  # "lowrank" mode
    z, h, norm_sq = _linear_products(layer, x_2d, low_2d, a, w)
    own_z = not is_compiling() and not z._is_view()  # y is made in z's storage (not the stacked rows')
    zeros = layer.norm_cache.zeros(norm_sq)
    y = DF.dora_linear(x_2d, low_2d, a, b, layer.magnitude, z, h, norm_sq, w, base_bias(layer), layer.scaling, own_z, zeros)
    return y.view(*x.shape[:-1], y.shape[-1])


def dora_linear_rows(layer, x: torch.Tensor) -> torch.Tensor:
    """y = x (g ⊙ W0)ᵀ + b + s (x' Aᵀ)(g ⊙ B)ᵀ in one autograd node (``functional.dora_linear_rows``).

    With more tokens than input features g scales the rows of W0 and B, forward and backward,
    instead of the output and its gradient: no elementwise pass over (tokens, out) is left but
    the magnitude's reduction, as evaluation does (``dora_no_grad_rows``). The norm is the kept
    one or computed now (A W0ᵀ in its own matmul: the output's matmul uses g ⊙ W0).
    """
    a, b = layer.lowrank_factors()
    x_2d = x.reshape(-1, x.shape[-1])
    low_2d = layer.dropout(x).reshape(x_2d.shape) if dropping(layer) else None  # "lowrank" mode
    norm_sq = layer.norm_cache.norm_sq(layer)
    with torch.no_grad():
        h = (x_2d if low_2d is None else low_2d) @ a.t()
    w, bias = layer.direct_weight(), base_bias(layer)
    zeros = layer.norm_cache.zeros(norm_sq)
    y = DF.dora_linear_rows(x_2d, low_2d, a, b, layer.magnitude, h, norm_sq, w, bias, layer.scaling, zeros)
    return y.view(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------------------------
# The table and the choice


@dataclass(frozen=True)
class Path:
    """One numeric path: what it computes is its function's docstring; ``when`` its condition."""

    name: str
    when: str
    run: Callable[..., torch.Tensor]


PATHS: Dict[str, Path] = {
    p.name: p
    for p in (
        Path("base", "the adapter is disabled", base_only),
        Path("lora-addmm", "LoRA / VeRA, plain linear layout", lora_addmm),
        Path("lora", "LoRA / VeRA otherwise", lora),
        Path("magnitude", "magnitude-only", magnitude_only),
        Path("dora-no-grad-rows", "DoRA eager without autograd, plain linear layout, tokens > in", dora_no_grad_rows),
        Path("dora-no-grad-addmm", "DoRA eager without autograd, plain linear layout", dora_no_grad_addmm),
        Path("dora-no-grad", "DoRA eager without autograd otherwise", dora_no_grad),
        Path("dora-dropout", "DoRA training, dropout on the whole update", dora_dropout),
        Path("dora-keep-sum", "DoRA on convolutions, or W0 with a zero row", functools.partial(dora, keep_sum=True)),
        Path("dora-linear-rows", "DoRA, detached norm, plain linear layout, eager, tokens > in", dora_linear_rows),
        Path("dora-linear", "DoRA, detached norm, plain linear layout", dora_linear),
        Path("dora", "DoRA otherwise", dora),
    )
}


def choose_path(layer, x: torch.Tensor) -> str:
    """The name of the row of ``PATHS`` this call runs (conditions in the table above)."""
    if layer.adapter_disabled:
        return "base"
    direct = _direct(layer, x)
    if layer.magnitude is None:
        return "lora-addmm" if direct else "lora"
    if layer.method == "magnitude":
        return "magnitude"
    drop, grad = dropping(layer), torch.is_grad_enabled()
    if not grad and not drop and not is_compiling():
        if direct and _scale_rows(x):
            return "dora-no-grad-rows"
        return "dora-no-grad-addmm" if direct else "dora-no-grad"
    if drop and layer.dropout_mode == "input":
        return "dora-dropout"
    if keeps_sum(layer):
        return "dora-keep-sum"
    if direct and (layer.detach_norm or not grad):
        return "dora-linear-rows" if _scale_rows(x) and not is_compiling() else "dora-linear"
    return "dora"


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer's output: the path ``choose_path`` picks."""
    return PATHS[choose_path(layer, x)].run(layer, x)
