"""The two files of an adapter folder: their names, and reading them with clear errors.

    adapter_config.json          the configuration (dorafit's or PEFT's layout)
    adapter_model.safetensors    the tensors

Shared by the dorafit format (``dorafit.io``) and the PEFT format (``dorafit.interop``), which
both read these files and must not import each other for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .files import read_json_object

# Metadata key in a PEFT-layout adapter_model.safetensors naming its writer (dorafit's own layout
# says "format": "dorafit"): a file with neither was not written by dorafit.
WRITER_KEY = "writer"
WRITER = "dorafit"

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory or file that cannot be loaded onto this model."""


def read_adapter_config(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The parsed ``adapter_config.json`` of an adapter directory, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"adapter path {path} does not exist")
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not an adapter directory (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} is not an adapter directory: {CONFIG_NAME} is missing")
    return read_json_object(cfg_file, AdapterFileError)


def read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or an AdapterFileError naming the file."""
    if not file.is_file():
        raise AdapterFileError(f"adapter weights file {file} is missing")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt data
        raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read as safetensors: {exc}") from None
    check_finite(tensors, file)
    return tensors


def check_finite(tensors: Dict[str, torch.Tensor], source: Path) -> None:
    """Raise AdapterFileError naming the first key holding NaN or inf: such a weight would turn
    every output of the model into NaN without a word."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterFileError(f"{source}: key {key!r} holds {bad} non-finite value(s) (NaN or inf); "
                                   "the adapter was saved from a diverged model")
