"""QDoRA: DoRA (and LoRA, DVoRA, magnitude-only) on a 4-bit NF4 base, through bitsandbytes.

The frozen base is a ``bitsandbytes.nn.Linear4bit`` (quant_type "nf4"): W0 (out, in) is stored
packed, two 4-bit codes per byte, with one absmax per block of 64 values. The adapter never keeps
a dequantized copy of W0 across steps:

    ‖W0_i‖²      once, at attach time, from the dequantized weight (then freed)  -> buffer (out,)
    C = A W0ᵀ    (r, out) = base(A) − b: the 4-bit layer run on A's r rows as r input tokens
    y            = g ⊙ (base(x) − b + s · (x Aᵀ) Bᵀ) + b,   g = m / ‖W0 + s B A‖

so a training step touches W0 only through the quantized kernel, exactly as the base model's own
forward does (DESIGN.md section 2). Merging writes a plain nn.Linear whose weight is the
dequantized, merged W' (in the dtype the weight had before quantization): the merged model is no
longer quantized, and ``merge`` says so in one warning per model (not one per layer).

Two ways to a 4-bit base, both giving ``Linear4bit`` modules that ``dorafit.attach`` dispatches
to the adapters here (bitsandbytes 0.50 runs them on CPU and GPU):
- ``quantize_model(model, targets, "nf4")`` quantizes the chosen nn.Linear layers in place;
- transformers' ``from_pretrained(..., quantization_config=bnb_4bit_config())`` (see
  ``from_pretrained_4bit``) quantizes every linear layer of a checkpoint while loading it.

bitsandbytes is imported lazily: ``import dorafit`` never needs it.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Type, Union

import torch
from torch import nn

from .config import AdapterConfig
from .layers.base import AdapterError, AdapterLayer
from .layers.linear import LinearAdapter
from .layers.vera import VERA_CLASSES, VeraMixin

logger = logging.getLogger("dorafit")

QUANT_TYPES = ("nf4", "fp4")


class QuantizationError(ValueError):
    """A model or module that cannot be quantized or adapted as asked."""


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise QuantizationError(
            "4-bit bases need the bitsandbytes package (pip install 'bitsandbytes>=0.45'); "
            f"importing it failed: {exc}"
        ) from None
    return bitsandbytes


def is_quantized_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer (checked without importing bitsandbytes)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and getattr(weight, "quant_state", None) is not None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a 4-bit layer stands for, in its original dtype (a new tensor)."""
    bnb = _bitsandbytes()
    weight = module.weight
    if getattr(weight, "quant_state", None) is None:
        raise QuantizationError(f"{type(module).__name__} has no quantized weight (quant_state is missing)")
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


# ------------------------------------------------------------------------------------------------
# Adapters on a 4-bit base


class Linear4bitAdapter(LinearAdapter):
    """LoRA / DoRA / magnitude-only on ``bitsandbytes.nn.Linear4bit`` (QDoRA).

    Only the layout hooks differ from ``LinearAdapter``: W0 is reached through the quantized
    layer itself (cross term, dropout path) and dequantized only at attach, merge and in the
    reference path of the tests.
    """

    def __init__(self, base: nn.Module, **kwargs) -> None:
        if not is_quantized_4bit(base):
            raise AdapterError(
                f"{type(base).__name__}: the 4-bit weight is not quantized yet (move the layer to a device, "
                "e.g. .to('cpu') or .cuda(), before attaching)"
            )
        super().__init__(base, **kwargs)

    def base_weight_2d(self) -> torch.Tensor:
        # Materialised (dequantized) copy: attach (‖W0‖² once), merge and reference tests only.
        return dequantize_weight(self.base)

    def base_dtype(self) -> torch.dtype:
        return self.base.weight.quant_state.dtype

    def compute_dtype(self) -> torch.dtype:
        return getattr(self.base, "compute_dtype", None) or self.base_dtype()

    def norm_dependencies(self) -> List[torch.Tensor]:
        # The packed weight's version counter stands for W0: never dequantize to build the key.
        return [t for t in (self.lora_a, self.lora_b, self.base.weight) if t is not None]

    def _without_bias(self, out: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias
        return out if bias is None else out - bias.to(out.dtype)

    def cross_term(self, a_2d: torch.Tensor) -> torch.Tensor:
        """C = A W0ᵀ (r, out), float32: the 4-bit layer applied to A's r rows, minus its bias."""
        return self._without_bias(self.base(a_2d.to(self.compute_dtype()))).to(torch.float32)

    def base_nobias(self, x: torch.Tensor) -> torch.Tensor:
        return self._without_bias(self.base(x))

    def weight_from_2d(self, weight_2d: torch.Tensor) -> torch.Tensor:
        return weight_2d.to(self.base_dtype())

    def write_merged(self, merged_2d: torch.Tensor) -> nn.Module:
        """A plain nn.Linear with the dequantized merged weight: the 4-bit storage is gone."""
        out_features, in_features = merged_2d.shape
        dtype = self.base_dtype()
        plain = nn.Linear(in_features, out_features, bias=self.base.bias is not None, device="meta")
        plain.weight = nn.Parameter(merged_2d.to(dtype), requires_grad=False)
        if self.base.bias is not None:
            plain.bias = nn.Parameter(self.base.bias.detach().to(dtype).clone(), requires_grad=False)
        # dorafit.merge warns once for the whole model; one line per layer goes to the log only.
        logger.debug("merged 4-bit layer (out, in) = (%d, %d) into a dequantized nn.Linear of dtype %s",
                     out_features, in_features, dtype)
        return plain


class VeraLinear4bitAdapter(VeraMixin, Linear4bitAdapter):
    """VeRA / DVoRA on a 4-bit base (QDVoRA)."""


VERA_CLASSES[Linear4bitAdapter] = VeraLinear4bitAdapter


class Linear8bitUnsupported(LinearAdapter):
    """bitsandbytes' 8-bit layers subclass nn.Linear too: refuse them instead of adapting int8 codes."""

    def __init__(self, base: nn.Module, **kwargs) -> None:
        raise AdapterError(
            f"{type(base).__name__} (8-bit bitsandbytes) bases are not supported; load the model in 4-bit "
            "(bnb_4bit_quant_type='nf4') or in full precision"
        )


def quantized_adapter_types() -> Dict[Type[nn.Module], Type[AdapterLayer]]:
    """Dispatch entries for bitsandbytes' layers (used by ``dorafit.inject.adapter_types``)."""
    bnb = _bitsandbytes()
    table: Dict[Type[nn.Module], Type[AdapterLayer]] = {bnb.nn.Linear4bit: Linear4bitAdapter}
    for name in ("Linear8bitLt", "Linear8bit"):
        if hasattr(bnb.nn, name):
            table[getattr(bnb.nn, name)] = Linear8bitUnsupported
    return table


# ------------------------------------------------------------------------------------------------
# Getting a 4-bit base


def quantize_linear(
    linear: nn.Linear,
    quant_type: str = "nf4",
    compute_dtype: Optional[torch.dtype] = None,
    double_quant: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """A frozen ``Linear4bit`` holding ``linear``'s weight quantized (on the weight's device).

    compute_dtype defaults to the weight's dtype (bf16 base -> bf16 matmuls).
    """
    bnb = _bitsandbytes()
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise QuantizationError("cannot quantize a layer whose weight is on the meta device (load the weights first)")
    device = weight.device
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype or weight.dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.contiguous(), requires_grad=False, quant_type=quant_type,
        compress_statistics=double_quant, blocksize=blocksize,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # Params4bit quantizes when it is moved to a real device


def quantize_model(
    model: nn.Module,
    targets: Union[str, Sequence[str]],
    quant_type: str = "nf4",
    *,
    exclude: Iterable[str] = (),
    compute_dtype: Optional[torch.dtype] = None,
    double_quant: bool = True,
) -> List[str]:
    """Quantize the nn.Linear layers that ``targets`` select (AdapterConfig's matching rules:
    exact names, dotted suffixes, regexes, "all-linear") to 4-bit in place; returns their names.

    Use the same targets as the adapter config so that exactly the adapted layers are 4-bit, or
    "all-linear" to quantize every linear layer except the output head.
    """
    from .inject import _set_submodule, find_targets

    matcher = AdapterConfig(targets=[targets] if isinstance(targets, str) else list(targets), exclude=list(exclude))
    names = find_targets(model, matcher)
    names = [n for n in names if not any(o.startswith(n + ".") for o in names)]  # leaves only
    modules = {n: model.get_submodule(n) for n in names}
    for name, module in modules.items():  # check everything before changing anything
        if is_quantized_4bit(module):
            raise QuantizationError(f"module {name!r} is already 4-bit quantized")
        if not isinstance(module, nn.Linear):
            raise QuantizationError(
                f"module {name!r} is a {type(module).__name__}; only nn.Linear layers can be quantized to 4-bit"
            )
    for name, module in modules.items():
        _set_submodule(model, name, quantize_linear(module, quant_type, compute_dtype, double_quant))
    return names


def bnb_4bit_config(compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4", double_quant: bool = True):
    """transformers' ``BitsAndBytesConfig`` for a 4-bit base (QLoRA's settings: NF4, double quant)."""
    from transformers import BitsAndBytesConfig

    _bitsandbytes()
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def from_pretrained_4bit(model_class, path, compute_dtype: torch.dtype = torch.bfloat16, device_map=None, **kwargs):
    """``model_class.from_pretrained(path)`` with every linear layer but the head in 4-bit NF4.

    model_class is a transformers class (e.g. AutoModelForCausalLM). device_map defaults to the
    GPU when there is one, else the CPU (bitsandbytes' CPU kernels).
    """
    if device_map is None:
        device_map = {"": 0} if torch.cuda.is_available() else "cpu"
    return model_class.from_pretrained(
        path, quantization_config=bnb_4bit_config(compute_dtype), device_map=device_map, **kwargs
    )


def quantized_modules(model: nn.Module) -> List[str]:
    """Names of the 4-bit layers of ``model`` (adapted or not)."""
    return [n for n, m in model.named_modules() if is_quantized_4bit(m)]
