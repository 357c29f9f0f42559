"""dorafit's record of an adapter: what ``adapter_config.json`` of the dorafit layout holds
besides the tensors, and what a PEFT-layout file dorafit writes carries in its metadata.

    {"format": "dorafit", "dorafit_version", "config": AdapterConfig, "base_model": {"class",
     "name_or_path", "model_type"}, "modules": {name: {"type", "weight_shape", "method", "rank",
     "alpha", "base_dtype", ["quantization"]}}, "base_quantization"}

A 4-bit base is recorded per module ("quantization": {"quant_type", "blocksize", "double_quant",
"compute_dtype"}), so that tools quantize the base the same way before loading the adapter.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from . import __version__
from .adapter_files import AdapterFileError, adapter_record
from .inject import CONFIG_ATTR, adapter_modules
from .sharding import model_class

FORMAT = "dorafit"


def _base_identity(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return {
        "class": model_class(model).__name__,
        "name_or_path": str(name) if name else None,
        "model_type": getattr(cfg, "model_type", None),
    }


def _weight_shape(module: nn.Module) -> Optional[list]:
    """The logical shape of a module's weight; a 4-bit weight is stored packed, its quant_state
    knows the shape it stands for (so an adapter trained on a 4-bit base loads on a full one)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    quant_state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)  # FSDP2: the layer's
    shape = getattr(quant_state, "shape", None)
    return list(shape if shape is not None else weight.shape)


def base_quantization(module: nn.Module) -> Optional[Dict[str, Any]]:
    """How a 4-bit (bitsandbytes) base layer is quantized, or None for a full-precision one."""
    quant_state = getattr(getattr(module, "weight", None), "quant_state", None) or getattr(module, "quant_state", None)
    if quant_state is None:
        return None
    compute = getattr(module, "compute_dtype", None)
    return {
        "quant_type": str(getattr(quant_state, "quant_type", "nf4")),
        "blocksize": int(getattr(quant_state, "blocksize", 64)),
        "double_quant": bool(getattr(quant_state, "nested", False)),
        "compute_dtype": str(compute).replace("torch.", "") if compute is not None else None,
    }


def _module_record(adapter) -> Dict[str, Any]:
    record = {
        "type": type(adapter.base).__name__,
        "weight_shape": _weight_shape(adapter.base),
        "method": adapter.method,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "base_dtype": str(getattr(adapter.base.weight, "dtype", "")).replace("torch.", ""),
    }
    quantization = base_quantization(adapter.base)
    if quantization is not None:
        record["quantization"] = quantization
    return record


def recorded_quantization(data: Union[Dict[str, Any], str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """{module name: quantization record} of an adapter: its folder (either layout), or a dorafit
    record (an adapter config read by ``read_adapter_config``, or ``adapter_record(folder)``)."""
    if not isinstance(data, dict):
        data = adapter_record(data)
    modules = data.get("modules") if isinstance(data.get("modules"), dict) else {}
    return {name: rec["quantization"] for name, rec in modules.items()
            if isinstance(rec, dict) and isinstance(rec.get("quantization"), dict)}


def adapter_record_of(model: nn.Module) -> Dict[str, Any]:
    """dorafit's record of the model's active adapter: the ``adapter_config.json`` dict of the
    dorafit layout (also carried in the metadata of a PEFT-layout file dorafit writes)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not adapter_modules(model):
        raise AdapterFileError("model has no dorafit adapters to save (attach or load an adapter first)")
    meta = {
        "format": FORMAT,
        "dorafit_version": __version__,
        "config": config.to_dict(),
        "base_model": _base_identity(model),
        "modules": {name: _module_record(a) for name, a in adapter_modules(model)},
    }
    quantized = sorted({r["quantization"]["quant_type"] for r in meta["modules"].values() if "quantization" in r})
    meta["base_quantization"] = quantized[0] if len(quantized) == 1 else (quantized or None)
    return meta


def warn_unquantized_base(model: nn.Module, data: Dict[str, Any], source: Path) -> None:
    """One warning when the adapter was trained on a 4-bit base and this base is not 4-bit: the
    model then computes something other than what was trained."""
    recorded = recorded_quantization(data)
    plain = []
    for name in recorded:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        module = getattr(module, "base", module)  # the adapted layer's frozen base
        if base_quantization(module) is None:
            plain.append(name)
    if plain:
        kind = sorted({recorded[n]["quant_type"] for n in plain})
        warnings.warn(
            f"{source}: the adapter was trained on a 4-bit {'/'.join(kind)} base ({len(plain)} modules, e.g. "
            f"{plain[0]!r}) but this base is full precision, so its outputs differ from the trained model's; "
            "quantize the base first: dorafit.quant.quantize_model(model, names, quant_type)",
            UserWarning, stacklevel=3)
