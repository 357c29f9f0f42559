"""The two files of an adapter folder, written and read as one pair.

    adapter_config.json          the configuration (dorafit's or PEFT's layout)
    adapter_model.safetensors    the tensors; its metadata holds "adapter_config_sha256", the
                                 hash of the config it was saved with (``config_tie``)

Shared by the dorafit format (``dorafit.io``) and the PEFT format (``dorafit.interop``), which
both read and write these files and must not import each other for it.

An adapter folder always holds one adapter:

- **Tied files.** The weights record the hash of the config written with them. A reader reads
  both and compares; a config of one save beside the weights of another (a concurrent writer, a
  write killed between the two renames) is read again until the pair agrees, then refused with
  one line. A reader during a rewrite gets the old adapter, the new one, or that error; never a
  mix. The hash leaves out where the base model lives (``base_model_name_or_path``, dorafit's
  ``base_model.name_or_path``, ``revision``), which users edit by hand; any other change to the
  config is refused as not belonging to the weights. Files without the record (PEFT's own
  ``save_pretrained``) are read as they are.
- **Private temporaries.** Each file is written through ``dorafit.files`` (a temporary created
  exclusively in the target folder, named after the writing process, flushed, renamed over the
  target): the weights first, the config last. Leftovers are removed only once the process that
  made them has ended, so two writers never delete each other's temporaries.
- **A new folder appears complete**; if another writer created it meanwhile, the files are
  renamed into it one by one.
- **Never where it changes how other tools read a folder.** A folder holding a model (its
  config.json and weights) is refused as a target: ``from_pretrained`` on it would then load the
  model with the adapter applied, or fail. Targets that are links, devices or other non-regular
  files are refused, never written through or over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .files import (
    OLD_SUFFIX,
    check_file_target,
    check_folder_target,
    kind_of,
    read_json_object,
    remove_leftovers,
    write_file_atomic,
    write_into_directory,
)

# Metadata key in a PEFT-layout adapter_model.safetensors naming its writer (dorafit's own layout
# says "format": "dorafit"): a file with neither was not written by dorafit.
WRITER_KEY = "writer"
WRITER = "dorafit"
# Metadata key: the hash of the adapter_config.json saved together with these weights (config_tie).
TIE_KEY = "adapter_config_sha256"
# Config keys left out of that hash: where the base model lives, which users edit by hand.
PROVENANCE_KEYS = ("base_model_name_or_path", "revision")
# Metadata key of a PEFT-layout file written by dorafit: dorafit's own record of the adapter
# (its AdapterConfig, base model identity and per-module records, as JSON), for what PEFT's
# config has no field for (the 4-bit base of a QDoRA adapter, dorafit's training options).
RECORD_KEY = "dorafit_adapter"

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# Files that make a folder a model checkpoint for transformers (next to config.json).
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

# A reader that finds the two files of different saves reads again this many times, waiting a
# little longer each time, before it gives up (a writer's two renames are microseconds apart).
READ_ATTEMPTS = 8


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
    if not _regular_file(cfg_file, "adapter config"):
        raise AdapterFileError(f"{path} is not an adapter directory: {CONFIG_NAME} is missing")
    return read_json_object(cfg_file, AdapterFileError)


def _regular_file(file: Path, what: str) -> bool:
    """Whether ``file`` (links followed) exists; AdapterFileError when it is there but is no
    regular file (a FIFO, a device, a folder), so a reader never blocks on it or calls it missing."""
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise AdapterFileError(f"{what} ({file}) cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise AdapterFileError(f"{what} ({file}) is a {kind_of(mode)}, not a regular file; nothing was read from it")
    return True


def read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or an AdapterFileError naming the file."""
    if not _regular_file(file, "adapter weights file"):
        raise AdapterFileError(f"adapter weights file {file} is missing")
    return _tensors_from_bytes(file.read_bytes(), file)


def check_finite(tensors: Dict[str, torch.Tensor], source: Path) -> None:
    """Raise AdapterFileError naming the first key holding NaN or inf: such a weight would turn
    every output of the model into NaN without a word."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterFileError(f"{source}: key {key!r} holds {bad} non-finite value(s) (NaN or inf); "
                                   "the adapter was saved from a diverged model")


# ------------------------------------------------------------------------------------------------
# Reading the pair
@dataclass
class AdapterFiles:
    """One adapter as read from its folder: the config, the tensors and the weights' metadata."""

    path: Path
    config: Dict[str, Any]
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)

    def record(self) -> Dict[str, Any]:
        """dorafit's own record: the config itself (dorafit layout) or, for a PEFT-layout file
        dorafit wrote, the record in its metadata; {} for PEFT's own files."""
        if self.config.get("format") == WRITER:
            return self.config
        return parse_record(self.metadata, self.path / WEIGHTS_NAME)


def parse_record(metadata: Dict[str, str], source: Path) -> Dict[str, Any]:
    """The dorafit record (RECORD_KEY) in a PEFT-layout file's metadata, or {} without one."""
    text = metadata.get(RECORD_KEY) if metadata.get(WRITER_KEY) == WRITER else None
    if not text:
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{source}: metadata {RECORD_KEY!r} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise AdapterFileError(f"{source}: metadata {RECORD_KEY!r} must be a JSON object")
    return record


def safetensors_metadata(data: bytes, source: Path) -> Dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (8-byte little-endian header length, JSON header)."""
    if len(data) < 8:
        raise AdapterFileError(f"{source} is truncated or corrupt and cannot be read as safetensors (shorter than its header)")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise AdapterFileError(f"{source} is truncated or corrupt and cannot be read as safetensors "
                               f"(header of {size} bytes in a file of {len(data)})")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{source} is truncated or corrupt and cannot be read as safetensors: {exc}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _tensors_from_bytes(data: bytes, source: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt data
        raise AdapterFileError(f"{source} is truncated or corrupt and cannot be read as safetensors: {exc}") from None
    check_finite(tensors, source)
    return tensors


def config_tie(config: Dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON, without the base model's location (PROVENANCE_KEYS
    and dorafit's ``base_model.name_or_path``)."""
    kept = {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}
    if isinstance(kept.get("base_model"), dict):
        kept["base_model"] = {k: v for k, v in kept["base_model"].items() if k != "name_or_path"}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_adapter_files(path: Union[str, os.PathLike], attempts: int = READ_ATTEMPTS) -> AdapterFiles:
    """Read an adapter folder's config and safetensors weights as one pair.

    When the weights record the hash of their config and the config on disk is another one (a
    writer between its two renames, or one killed there), both are read again, up to
    ``attempts`` times; then AdapterFileError says so. Raises AdapterFileError for a missing,
    truncated or corrupt file.
    """
    path = Path(path)
    read_adapter_config(path)  # the folder and its config: clear errors first
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for attempt in range(attempts):
        config = _parse_config(cfg_file.read_bytes(), cfg_file)
        if not _regular_file(weights_file, "adapter weights file"):
            raise AdapterFileError(f"adapter weights file {weights_file} is missing")
        data = weights_file.read_bytes()
        metadata = safetensors_metadata(data, weights_file)
        tie = metadata.get(TIE_KEY)
        if tie is None or tie == config_tie(config):
            break
        time.sleep(0.02 * (attempt + 1))
    else:
        raise AdapterFileError(
            f"{path}: {CONFIG_NAME} is not the config saved with {WEIGHTS_NAME} (the two files come from "
            "different saves: another process is writing this folder, or a save was interrupted between the "
            "two files; or the config was edited beyond the base model's location); wait for the writer and "
            "load again, or save the adapter again")
    return AdapterFiles(path, config, _tensors_from_bytes(data, weights_file), metadata)


def _parse_config(config_bytes: bytes, source: Path) -> Dict[str, Any]:
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{source} must hold a JSON object, got {type(config).__name__}")
    return config


def weights_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The metadata of an adapter folder's safetensors file ({} without one), header only."""
    file = Path(path) / WEIGHTS_NAME
    if not _regular_file(file, "adapter weights file"):
        return {}
    with open(file, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if size < 0 or size > 100 * 2**20:
            raise AdapterFileError(f"{file} is truncated or corrupt and cannot be read as safetensors (header length)")
        return safetensors_metadata(head + f.read(size), file)


def adapter_record(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """dorafit's record of an adapter folder in either layout ({} for PEFT's own files): the
    dorafit config itself, or the record a dorafit-written PEFT-layout file carries."""
    config = read_adapter_config(path)
    if config.get("format") == WRITER:
        return config
    return parse_record(weights_metadata(path), Path(path) / WEIGHTS_NAME)


# ------------------------------------------------------------------------------------------------
# Writing the pair
def check_adapter_target(folder: Union[str, os.PathLike]) -> Path:
    """Refuse a folder an adapter must not be written into; returns it as a Path.

    A model's own folder (config.json beside model weights) is refused: an adapter there makes
    transformers (with PEFT installed) load the model with the adapter applied, or fail. A
    target that is a link or not a folder, and adapter files there that are links or not regular
    files, are refused too (never written through or replaced).
    """
    folder = Path(folder)
    check_folder_target(folder)
    if folder.is_dir():
        weights = [n for n in MODEL_WEIGHT_FILES if (folder / n).exists()]
        if (folder / "config.json").is_file() and weights:
            raise AdapterFileError(
                f"{folder} holds a model (config.json and {weights[0]}): an adapter saved there changes how "
                "transformers and PEFT read the folder (from_pretrained would apply the adapter or fail). "
                f"Save the adapter to a folder of its own, e.g. {folder / 'adapter'}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            check_file_target(folder / name)
    return folder


def _write_bytes(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)


def _keep_previous(file: Path) -> Optional[Path]:
    """A hard link to ``file`` under a fresh name beside it (None when there is no file, or the
    filesystem has no hard links), so that the previous weights can be put back."""
    if not file.is_file():
        return None
    backup = file.parent / f".{file.name}.{os.getpid()}-{secrets.token_hex(6)}{OLD_SUFFIX}"
    try:
        os.link(file, backup, follow_symlinks=False)
    except OSError:
        return None
    return backup


def write_adapter_pair(folder: Union[str, os.PathLike], config: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                       metadata: Dict[str, str], sort_keys: bool = False) -> Path:
    """Write ``config`` (as adapter_config.json) and ``tensors`` (as adapter_model.safetensors with
    ``metadata`` plus the config's hash) into ``folder`` as one pair; returns the folder.
    ``sort_keys``: the config's keys in sorted order (as PEFT writes them).

    A new folder appears complete; in an existing one the weights are replaced first and the
    config last, each by its own atomic rename (``dorafit.files``), and other files stay. When
    the config cannot be renamed into place the previous weights are put back, so an error
    leaves the previous pair; a kill between the two renames leaves a mixed pair that readers
    refuse (the tie).
    """
    from safetensors.torch import save

    folder = check_adapter_target(folder)
    config_bytes = (json.dumps(config, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8")
    meta = dict(metadata)
    meta[TIE_KEY] = config_tie(json.loads(config_bytes))
    weights_bytes = save(tensors, metadata=meta)
    writers = {WEIGHTS_NAME: lambda f: _write_bytes(f, weights_bytes), CONFIG_NAME: lambda f: _write_bytes(f, config_bytes)}
    if not folder.exists():
        return write_into_directory(folder, writers)  # another writer making it meanwhile is handled there
    previous = _keep_previous(folder / WEIGHTS_NAME)
    try:
        write_file_atomic(folder / WEIGHTS_NAME, writers[WEIGHTS_NAME])
        try:
            write_file_atomic(folder / CONFIG_NAME, writers[CONFIG_NAME])
        except BaseException:
            if previous is not None:
                os.replace(previous, folder / WEIGHTS_NAME)
                previous = None
            raise
    finally:
        if previous is not None:
            with contextlib.suppress(OSError):
                previous.unlink()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        remove_leftovers(folder / name)
    return folder


def existing_writer(path: Union[str, os.PathLike]) -> Optional[str]:
    """"dorafit" when the folder's weights file was written by dorafit, "" when it exists and was
    not, None when there is none."""
    file = Path(path) / WEIGHTS_NAME
    if not file.exists():
        return None
    try:
        meta = weights_metadata(path)
    except (AdapterFileError, OSError):
        return ""
    return WRITER if meta.get(WRITER_KEY) == WRITER or meta.get("format") == WRITER else ""


def weights_sha256(named: Dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order: each name, dtype, shape and raw bytes (as stored)."""
    digest = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
