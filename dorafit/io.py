"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

The format is fixed:
- ``adapter_config.json``: {"format": "dorafit", "dorafit_version", "config": AdapterConfig,
  "base_model": {"class", "name_or_path"}, "modules": {name: {"type", "weight_shape", "method",
  "rank", "alpha", "base_dtype"}}}
- ``adapter_model.safetensors``: "<module>.lora_a", "<module>.lora_b", "<module>.magnitude"
  (and "<module>.trainable.<key>" for modules_to_save copies), tensors only, never pickled; its
  metadata ties it to the config it was saved with (``dorafit.adapter_files``).

``save_adapter`` writes this layout, PEFT's (``format="peft"``, ``dorafit.interop``), or
``format="auto"``: PEFT's wherever PEFT can hold the adapter (LoRA and DoRA), dorafit's for the
rest (VeRA, DVoRA, magnitude-only, mixed methods) — what ``dorafit train`` writes. The two files
are written as one pair into a folder (a new folder appears complete; in an existing one, other
files stay); a folder holding a model is refused. Loading reads both layouts, validates the
directory, the config, every module's base shape, every key, shape and value (finite) before any
weight is copied, and leaves the model untouched when something does not fit.
A 4-bit base is recorded per module ("quantization": {"quant_type", "blocksize",
"double_quant", "compute_dtype"}) and as "base_quantization", so that tools can quantize the
base the same way before loading; ``load_adapter`` warns when it is not. In a PEFT-layout file
dorafit wrote, this record travels in the weights' metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from . import __version__
from .config import AdapterConfig, ConfigError
from .adapter_files import (  # noqa: F401  (re-exported: dorafit.io is where users find them)
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    adapter_record,
    check_finite,
    read_adapter_config,
    read_adapter_files,
    read_safetensors,
    write_adapter_pair,
)
from .adapter_record import (  # noqa: F401  (re-exported)
    FORMAT,
    _weight_shape,
    adapter_record_of,
    base_quantization,
    recorded_quantization,
    warn_unquantized_base,
)
from .inject import adapter_modules, adapter_state_dict, attach, detach
from .sharding import written_by_one_rank


def _extra_tensors(model: nn.Module, names_only: bool = False):
    """Method-specific tensors stored beside the adapter parameters (VeRA's shared matrices when
    ``save_vera_matrices``): from the model-level hook and from adapters' ``extra_tensors()``.
    With ``names_only``, the set of keys a file may hold for them."""
    names, tensors = set(), {}
    extra = getattr(model, "dorafit_extra_tensors", None)
    if callable(extra):
        tensors.update(extra())
        names.update(tensors)
    for _, adapter in adapter_modules(model):
        if callable(getattr(adapter, "extra_tensor_names", None)):
            names.update(adapter.extra_tensor_names())
            if not names_only:
                tensors.update(adapter.extra_tensors())
    return names if names_only else tensors


def adapter_file_contents(model: nn.Module):
    """(the ``adapter_config.json`` dict, the tensors) of the model's active adapter, dorafit layout."""
    meta = adapter_record_of(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    # method-specific tensors (e.g. VeRA's shared matrices when asked to store them)
    state.update({k: v.detach().cpu().contiguous() for k, v in _extra_tensors(model).items()})
    return meta, state


@written_by_one_rank
def save_adapter(model: nn.Module, path: Union[str, os.PathLike], format: str = "dorafit") -> Path:
    """Write the model's adapters to folder ``path``; returns the path.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are written, as one pair
    (``dorafit.adapter_files``); other files in an existing folder stay untouched. A folder that
    holds a model (config.json and weights) is refused: save the adapter beside it, or in a
    subfolder.

    ``format``: "dorafit" (this module's layout), "peft" (PEFT's, ``dorafit.interop``; LoRA and
    DoRA only), or "auto": PEFT's where it can hold the adapter, else dorafit's.
    On a model sharded over processes (FSDP2, tensor parallel) every rank calls it and rank 0
    writes whole tensors.
    """
    if format not in ("dorafit", "peft", "auto"):
        raise ValueError(f"format must be 'dorafit', 'peft' or 'auto', got {format!r}")
    if format != "dorafit":
        from .interop import PeftFormatError, save_peft_adapter

        try:
            return save_peft_adapter(model, path)
        except PeftFormatError:  # raised before anything is written
            if format == "peft":
                raise
    meta, state = adapter_file_contents(model)
    return write_adapter_pair(Path(path), meta, state, {"format": FORMAT, "dorafit_version": __version__})


def recorded_base_model(path: Union[str, os.PathLike]) -> Optional[str]:
    """The base model an adapter folder records (dorafit's ``base_model.name_or_path`` or PEFT's
    ``base_model_name_or_path``), or None when it records none or is no adapter folder."""
    try:
        data = read_adapter_config(path)
    except AdapterFileError:
        return None
    base = data.get("base_model")
    name = base.get("name_or_path") if isinstance(base, dict) else None
    name = name or data.get("base_model_name_or_path")
    return name if isinstance(name, str) and name else None


def _check_base(model: nn.Module, modules: Dict[str, Any], source: Path) -> None:
    for name, record in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterFileError(f"{source}: module {name!r} of the adapter does not exist in this base model") from None
        shape = _weight_shape(module)
        want = record.get("weight_shape")
        if shape is None or (want is not None and shape != list(want)):
            got = None if shape is None else tuple(shape)
            raise AdapterFileError(
                f"{source}: module {name!r} has weight shape {got} in this base model but the adapter "
                f"was trained on shape {tuple(want)} (a base model of another shape?)"
            )


def load_adapter(
    base_model: nn.Module,
    path: Union[str, os.PathLike],
    name: str = "default",
    trainable: bool = True,
    revision: Optional[str] = None,
    allow_base_mismatch: bool = False,
) -> nn.Module:
    """Attach the adapter stored in ``path`` (a folder, or a hub repository id) to ``base_model``
    and load its weights.

    Validates everything first; on any mismatch raises AdapterFileError naming the module, key or
    shape, and leaves ``base_model`` as it was. On a model that has adapters already, the new
    one is added under ``name`` and stays inactive (``dorafit.set_adapter`` switches).
    ``trainable=False`` loads it for inference: its parameters never require gradients.

    A pre-normalized DoRA folder (``dorafit export --to dora-normalized``: the magnitude key holds
    g = m / ‖W0 + s B A‖) gets its magnitude rebuilt, m = g ⊙ ‖W0 + s B A‖ on this base, so the
    model computes g ⊙ (W0 x + s B A x) + b exactly as an engine serving the folder does. g is
    tied to the base it was computed against: a base whose weights hash differently is refused
    unless ``allow_base_mismatch=True``.
    """
    from .adapters import adding_adapter, check_adapter_name, registry, set_trainable
    from .remote import resolve_adapter_path

    check_adapter_name(name)  # before anything is read
    path = resolve_adapter_path(path, revision=revision)
    if registry(base_model):
        with adding_adapter(base_model, name):
            _load_adapter_files(base_model, path, allow_base_mismatch)
    else:
        _load_adapter_files(base_model, path, allow_base_mismatch)
        if name != "default":
            from .adapters import rename_adapter

            rename_adapter(base_model, "default", name)
    set_trainable(base_model, name, trainable)
    return base_model


def _load_adapter_files(base_model: nn.Module, path: Path, allow_base_mismatch: bool = False) -> nn.Module:
    """``load_adapter`` on a model without adapters: the new one is attached as "default"."""
    from .interop import load_peft_adapter, read_peft_files

    files = read_peft_files(path)  # the config and the weights of one save, read once
    data = files.config
    if "peft_type" in data:
        return load_peft_adapter(base_model, path, allow_base_mismatch=allow_base_mismatch, files=files)
    if data.get("format") != FORMAT or "config" not in data:
        raise AdapterFileError(f"{path / CONFIG_NAME} is not a dorafit adapter config (no \"format\": \"dorafit\")")
    try:
        config = AdapterConfig.from_dict(data["config"])
    except (ConfigError, TypeError) as exc:
        raise AdapterFileError(f"{path / CONFIG_NAME}: invalid adapter config: {exc}") from None
    modules = data.get("modules") or {}
    if not isinstance(modules, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME}: \"modules\" must be an object")
    _check_base(base_model, modules, path)
    tensors = files.tensors

    attach(base_model, config)
    try:
        attached = {name: a for name, a in adapter_modules(base_model)}
        if modules and set(attached) != set(modules):
            extra = sorted(set(attached) - set(modules))
            absent = sorted(set(modules) - set(attached))
            raise AdapterFileError(
                f"{path}: the config's targets select other modules on this model than the adapter holds "
                f"(only in the model: {extra[:10]}, only in the adapter: {absent[:10]})"
            )
        for name, a in attached.items():
            record = modules.get(name, {})
            for field_name in ("method", "rank"):
                if field_name in record and record[field_name] != getattr(a, field_name):
                    raise AdapterFileError(
                        f"{path}: module {name!r} is recorded with {field_name} {record[field_name]!r} but the "
                        f"config gives {getattr(a, field_name)!r}"
                    )
        expected = adapter_state_dict(base_model)
        optional = _extra_tensors(base_model, names_only=True)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected) - optional)
        if missing or unexpected:
            raise AdapterFileError(
                f"{path / WEIGHTS_NAME} does not match the config (method {config.method!r}, rank {config.rank}): "
                f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            )
        for key, want in expected.items():
            got = tensors[key]
            if tuple(got.shape) != tuple(want.shape):
                raise AdapterFileError(
                    f"{path / WEIGHTS_NAME}: key {key!r} has shape {tuple(got.shape)} but this model and config "
                    f"(method {config.method!r}, rank {config.rank}) need {tuple(want.shape)}"
                )
            if not got.is_floating_point():
                raise AdapterFileError(f"{path / WEIGHTS_NAME}: key {key!r} has dtype {got.dtype}, expected floating point")
        with torch.no_grad():
            for key, want in expected.items():
                want.copy_(tensors[key].to(device=want.device, dtype=want.dtype))
            stored_extra = {k: v for k, v in tensors.items() if k in optional}
            load_extra = getattr(base_model, "dorafit_load_extra_tensors", None)
            if callable(load_extra):
                load_extra(stored_extra)
            for _, adapter in adapter_modules(base_model):
                if callable(getattr(adapter, "load_extra_tensors", None)):
                    try:
                        adapter.load_extra_tensors(stored_extra)
                    except ValueError as exc:
                        raise AdapterFileError(f"{path / WEIGHTS_NAME}: {exc}") from None
    except BaseException:
        detach(base_model)
        raise
    warn_unquantized_base(base_model, data, path)
    return base_model
