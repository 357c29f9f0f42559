"""Resumable checkpoints: trainable weights, optimizer state, RNG states and counters.

A checkpoint is a folder ``checkpoints/step-000040/`` written under a temporary name and
renamed into place, so a kill at any moment leaves either the complete folder or none:

    trainable.safetensors   every trainable parameter by name (adapters, trained heads)
    optimizer.safetensors   AdamW state by parameter name: "<name>::exp_avg", "::exp_avg_sq", "::step"
    rng.safetensors         torch CPU (and CUDA) generator states, as uint8 tensors
    adapter/                the adapter in dorafit's format (one process or DDP), for dorafit eval
    state.json              step, epoch, best validation loss, Python / NumPy RNG states,
                            the optimizer's hyper-parameters and the sha256 of each file above

Nothing is pickled. Loading checks every file against its recorded sha256, so a checkpoint
damaged after it was written (truncated, bit flips) is detected, and checks that every weight
and optimizer tensor is finite (a NaN state must never be resumed from); ``load_latest`` then
warns and falls back to the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from dorafit.files import atomic_directory, sha256_file

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, damaged or does not fit the run."""


def capture_rng() -> tuple[dict, dict]:
    """(tensors, JSON) of the torch, CUDA, Python and NumPy random states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng(tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_to_flat(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, list]:
    """AdamW state keyed by parameter name, plus the param groups' hyper-parameters.

    ``names`` lists the optimizer's parameters in the order they were given to it.
    """
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{names[index]}::{key}"] = value.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    return tensors, groups


def optimizer_from_flat(optimizer: torch.optim.Optimizer, names: list[str], tensors: dict, groups: list) -> None:
    """Load a state written by ``optimizer_to_flat`` into ``optimizer``."""
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]):
        raise CheckpointError("the checkpoint's optimizer has another number of parameter groups")
    index = {name: i for i, name in enumerate(names)}
    state: dict = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index:
            raise CheckpointError(f"optimizer state for unknown parameter {name!r}")
        state.setdefault(index[name], {})[field] = value
    param_groups = [{**g, "params": c["params"]} for g, c in zip(groups, current["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(folder: Path, trainable: dict, optim_tensors: dict, optim_groups: list, counters: dict,
                    write_extra=None) -> Path:
    """Write one checkpoint folder atomically (rank 0 only).

    ``write_extra(tmp_folder)``, if given, adds files before the rename (e.g. the adapter in
    dorafit's format, so that a checkpoint can be evaluated as it is).
    """
    from safetensors.torch import save_file

    rng_tensors, rng_plain = capture_rng()
    with atomic_directory(folder) as tmp:
        files = {
            "trainable.safetensors": {k: v.detach().cpu().contiguous() for k, v in trainable.items()},
            "optimizer.safetensors": optim_tensors,
            "rng.safetensors": rng_tensors,
        }
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
        state = {
            **counters,
            "rng": rng_plain,
            "optimizer_param_groups": optim_groups,
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        if write_extra is not None:
            write_extra(tmp)
    return folder


def load_checkpoint(folder: Path) -> dict:
    """Read and verify one checkpoint: {'trainable', 'optimizer', 'rng', 'state'}."""
    from safetensors.torch import load_file

    state_file = folder / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    loaded = {"state": state}
    for name, digest in state.get("sha256", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: content does not match its recorded sha256 (damaged file)")
        try:
            loaded[name.split(".")[0]] = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not readable as safetensors ({err})") from None
    for key in ("trainable", "optimizer", "rng"):
        if key not in loaded:
            raise CheckpointError(f"{folder}: incomplete checkpoint (no {key}.safetensors)")
    for key in ("trainable", "optimizer"):
        bad = [name for name, t in loaded[key].items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise CheckpointError(f"{folder / (key + '.safetensors')}: non-finite values in {bad[:3]}")
    return loaded


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and verifies; damaged newer ones are skipped with a warning."""
    for folder in list_checkpoints(root):
        try:
            return folder, load_checkpoint(folder)
        except CheckpointError as err:
            warnings.warn(f"skipping damaged checkpoint {folder}: {err}; falling back to the previous one",
                          stacklevel=2)
    return None


def last_good(root: Path) -> Path | None:
    """The newest checkpoint that verifies and holds only finite values, or None."""
    for folder in list_checkpoints(root):
        try:
            load_checkpoint(folder)
        except CheckpointError:
            continue
        return folder
    return None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest checkpoints (renamed away first, then deleted).

    ``.deleting`` folders left by a prune that was interrupted are removed first; a folder that
    cannot be moved or removed is left for the next prune, never an error.
    """
    for stale in root.glob(".step-*.deleting"):
        shutil.rmtree(stale, ignore_errors=True)
    for folder in list_checkpoints(root)[keep:]:
        doomed = folder.with_name(f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.deleting")
        try:
            os.replace(folder, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
