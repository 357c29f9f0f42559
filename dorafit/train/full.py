"""Full fine-tuning as a method of the one recipe: ``dorafit train --method full``.

Every parameter of the model trains, through the same loop, optimizer, schedule, checkpoints
and evaluation as the adapters; nothing is attached. What a run keeps is a whole model folder
instead of an adapter: ``save_pretrained`` (safetensors) with the tokenizer and task.json,
under RUN/model (and RUN/best with a validation split), which ``dorafit eval --model RUN/model``
and any transformers code load as a plain checkpoint. A checkpoint holds every parameter and
its AdamW moments (three times the model's size): keep ``--save-steps`` sparse.
"""

from __future__ import annotations

from pathlib import Path

import torch

FULL = "full"
# The folder of a run that holds what it trained: an adapter, or with --method full the model.
OUTPUT_NAMES = {"adapter": "model"}


def output_name(method: str, name: str) -> str:
    """The run folder name for ``name`` ("adapter" becomes "model" for a full fine-tune)."""
    return OUTPUT_NAMES.get(name, name) if method == FULL else name


def prepare(model: torch.nn.Module) -> None:
    """Make every parameter trainable (a checkpoint may come with some frozen)."""
    for p in model.parameters():
        p.requires_grad_(True)


def save_model(model: torch.nn.Module, tokenizer, path: Path, task_info: dict) -> None:
    """The whole model as a plain checkpoint folder, written under a temporary name and renamed."""
    from dorafit.files import atomic_directory, write_json_atomic

    was_cache = getattr(model.config, "use_cache", None)
    if was_cache is not None:  # training turns the cache off; a saved model generates as the original did
        model.config.use_cache = True
    try:
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "task.json", {**task_info, "method": FULL})
    finally:
        if was_cache is not None:
            model.config.use_cache = was_cache


def save_from_state(fresh: torch.nn.Module, state: dict, tokenizer, path: Path, task_info: dict) -> None:
    """Save gathered parameters (FSDP) through an unsharded copy of the model: ``fresh``."""
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = {name for name, p in fresh.named_parameters(remove_duplicate=False)} - set(dict(fresh.named_parameters()))
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: the gathered parameters do not fit the model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    save_model(fresh, tokenizer, path, task_info)
