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

from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .config import AdapterConfig
from .layers.quantized import (  # noqa: F401  (re-exported: the adapters on a 4-bit base)
    Linear4bitAdapter,
    Linear8bitUnsupported,
    QuantizationError,
    VeraLinear4bitAdapter,
    _bitsandbytes,
    dequantize_weight,
    is_quantized_4bit,
    quantized_adapter_types,
)

QUANT_TYPES = ("nf4", "fp4")


# ------------------------------------------------------------------------------------------------
# Getting a 4-bit base


def quantize_linear(
    linear: nn.Linear,
    quant_type: str = "nf4",
    compute_dtype: Optional[torch.dtype] = None,
    double_quant: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """A frozen ``Linear4bit`` holding ``linear``'s weight quantized (on the weight's device).

    compute_dtype defaults to the weight's dtype (bf16 base -> bf16 matmuls). ``quant_storage``
    is the dtype the packed codes are stored as; FSDP shards a bfloat16 storage like the model's
    other bf16 tensors (QLoRA-with-FSDP's convention). The quantization state is registered on
    the layer too, so that bitsandbytes finds it again when FSDP2 replaces the weight by its
    gathered copy in forward.
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
        quant_storage=quant_storage,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.contiguous(), requires_grad=False, quant_type=quant_type,
        compress_statistics=double_quant, blocksize=blocksize, quant_storage=quant_storage, module=layer,
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
    quant_storage: torch.dtype = torch.uint8,
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
        _set_submodule(model, name, quantize_linear(module, quant_type, compute_dtype, double_quant,
                                                    quant_storage=quant_storage))
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
