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
- **Private temporaries.** Each file is written to a temporary created exclusively
  (``.<name>.<pid>.<random>.dorafit-tmp``) in the target folder, flushed, then renamed over the
  target: the weights first, the config last. A writer removes only its own temporaries, and
  the leftovers of writers whose process is gone; a running writer's are never touched.
- **A new folder appears complete**: both files are written in a private temporary folder that
  is renamed into place; if another writer created the folder meanwhile, the pair is renamed in
  beside it as above.
- **Never where it changes how other tools read a folder.** A folder holding a model (its
  config.json and weights) is refused as a target: ``from_pretrained`` on it would then load the
  model with the adapter applied, or fail. Targets that are links, devices or other non-regular
  files are refused, never written through or over.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .files import read_json_object

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
TMP_SUFFIX = ".dorafit-tmp"

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
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} is not an adapter directory: {CONFIG_NAME} is missing")
    return read_json_object(cfg_file, AdapterFileError)


def read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or an AdapterFileError naming the file."""
    if not file.is_file():
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
        if not weights_file.is_file():
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
    if not file.is_file():
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
    target that is not a folder, or adapter files there that are links or not regular files,
    are refused too (never written through or replaced).
    """
    folder = Path(folder)
    if folder.is_symlink() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a link to nothing; refusing to write an adapter through it")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a directory")
    if folder.is_dir():
        weights = [n for n in MODEL_WEIGHT_FILES if (folder / n).exists()]
        if (folder / "config.json").is_file() and weights:
            raise AdapterFileError(
                f"{folder} holds a model (config.json and {weights[0]}): an adapter saved there changes how "
                "transformers and PEFT read the folder (from_pretrained would apply the adapter or fail). "
                f"Save the adapter to a folder of its own, e.g. {folder / 'adapter'}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            target = folder / name
            if target.is_symlink() or (target.exists() and not target.is_file()):
                raise FileExistsError(f"{target} is a link or not a regular file; refusing to replace it")
    return folder


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _private_temp(folder: Path, name: str) -> Path:
    """A new empty file beside ``folder/name``, created exclusively (never an existing file or
    link), with the permissions an ordinary ``open`` gets under the umask."""
    while True:
        tmp = folder / f"{_temp_prefix(name)}{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def _write_synced(file: Path, data: bytes) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _process_gone(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def remove_dead_temporaries(folder: Path, name: str) -> None:
    """Remove the temporaries for ``folder/name`` left by writers whose process is gone; those
    of running writers (this one's included) stay."""
    if not folder.is_dir():
        return
    for leftover in folder.glob(f".{glob_escape(name)}.*{TMP_SUFFIX}"):
        pid = leftover.name[len(name) + 2:].split(".", 1)[0]
        if pid != str(os.getpid()) and _process_gone(pid) and not leftover.is_symlink():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()


def glob_escape(name: str) -> str:
    """``name`` with glob wildcards escaped."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def write_adapter_pair(folder: Union[str, os.PathLike], config: Dict[str, Any], tensors: Dict[str, torch.Tensor],
                       metadata: Dict[str, str], sort_keys: bool = False) -> Path:
    """Write ``config`` (as adapter_config.json) and ``tensors`` (as adapter_model.safetensors with
    ``metadata`` plus the config's hash) into ``folder`` as one pair; returns the folder.
    ``sort_keys``: the config's keys in sorted order (as PEFT writes them).

    Other files in an existing folder stay as they are. See the module docstring for what a
    concurrent reader or writer sees.
    """
    from safetensors.torch import save

    folder = check_adapter_target(folder)
    config_bytes = (json.dumps(config, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8")
    meta = dict(metadata)
    meta[TIE_KEY] = config_tie(json.loads(config_bytes))
    weights_bytes = save(tensors, metadata=meta)
    if not folder.exists():
        landed = _write_new_folder(folder, weights_bytes, config_bytes)
        if landed:
            return folder
    _write_into_folder(folder, weights_bytes, config_bytes)
    return folder


def _write_into_folder(folder: Path, weights_bytes: bytes, config_bytes: bytes) -> None:
    """Both files by their own temporaries and renames: the weights first, the config last. When
    the config's rename fails, the previous weights (kept by a hard link) are put back, so an
    error leaves the previous pair; only a kill between the two renames leaves a mixed pair,
    which readers refuse (the tie)."""
    temps = []
    try:
        for name, data in ((WEIGHTS_NAME, weights_bytes), (CONFIG_NAME, config_bytes)):
            tmp = _private_temp(folder, name)
            temps.append(tmp)
            _write_synced(tmp, data)
        check_adapter_target(folder)  # a link put there while we wrote is still refused
        weights_tmp, config_tmp = temps
        previous = _keep_previous(folder / WEIGHTS_NAME)
        if previous is not None:
            temps.append(previous)
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        try:
            os.replace(config_tmp, folder / CONFIG_NAME)
        except BaseException:
            if previous is not None:
                os.replace(previous, folder / WEIGHTS_NAME)
            raise
        _fsync_dir(folder)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        remove_dead_temporaries(folder, name)


def _keep_previous(file: Path) -> Optional[Path]:
    """A hard link to ``file`` under a private temporary name (None when there is no file, or
    the filesystem has no hard links)."""
    if not file.is_file():
        return None
    tmp = _private_temp(file.parent, file.name)
    try:
        os.unlink(tmp)
        os.link(file, tmp, follow_symlinks=False)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    return tmp


def _write_new_folder(folder: Path, weights_bytes: bytes, config_bytes: bytes) -> bool:
    """Write a folder that does not exist yet in a private temporary folder and rename it into
    place; False (nothing left behind) when another writer created ``folder`` first."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = folder.parent / f"{_temp_prefix(folder.name)}{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            tmp.mkdir(mode=0o777)
            break
        except FileExistsError:
            continue
    try:
        _write_synced_new(tmp / WEIGHTS_NAME, weights_bytes)
        _write_synced_new(tmp / CONFIG_NAME, config_bytes)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, folder)  # fails when folder exists and is not empty
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            if folder.exists() and not folder.is_dir():
                raise FileExistsError(f"{folder} exists and is not a directory") from None
            return False
        tmp = None
        _fsync_dir(folder.parent)
        remove_dead_temporaries(folder.parent, folder.name)
        return True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_synced_new(file: Path, data: bytes) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    os.close(fd)
    _write_synced(file, data)


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
