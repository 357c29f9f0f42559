"""The Hugging Face stack saves adapters: ``save_pretrained``, Trainer checkpoints, the hub.

``attach`` gives a transformers model (a ``PreTrainedModel``) an instance attribute
``save_pretrained`` that shadows the class method; ``detach`` and ``merge`` delete it again, so a
merged model saves its full checkpoint as before. No model class is subclassed or patched:
other instances of the class are untouched, and ``type(model).save_pretrained(model, d)``
still reaches the original. What every caller of ``model.save_pretrained(d)`` then gets — the
user, ``Trainer.save_model``, Trainer checkpoints, ``push_to_hub`` — is the adapter only:

    d/adapter_config.json  d/adapter_model.safetensors

in PEFT's layout (LoRA / DoRA adapters, so ``PeftModel.from_pretrained`` and transformers'
``model.load_adapter`` read them) or, for methods PEFT cannot hold (VeRA, magnitude-only),
dorafit's own. The two files are written one at a time through a temporary name; any other
file in ``d`` is left alone, and an adapter file that dorafit did not write is never replaced.

Loading from the hub: ``resolve_adapter_path`` turns a repository id into a local snapshot
with ``huggingface_hub.snapshot_download`` (which serves the local cache when
``HF_HUB_OFFLINE=1``). ``push_adapter_to_hub`` uploads a saved adapter folder with ``HfApi``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, existing_writer
from .adapters import set_save_pretrained_writer
from .remote import ADAPTER_FILES, resolve_adapter_path, upload_adapter_folder  # noqa: F401  (re-exported)
from .sharding import written_by_one_rank



def write_adapter_files(model: nn.Module, folder: Union[str, os.PathLike]) -> Path:
    """Write the active adapter's two files into ``folder`` (created if needed), leaving every
    other file there alone. PEFT's layout where it can hold the adapter, dorafit's otherwise
    (``save_adapter(..., format="auto")``). Unlike ``save_adapter``, an adapter file there that
    dorafit did not write is refused: ``save_pretrained`` is called on whatever folder a Trainer
    or a user hands it."""
    from .io import save_adapter

    folder = Path(folder)
    if existing_writer(folder) == "":
        raise FileExistsError(f"{folder / WEIGHTS_NAME} exists and was not written by dorafit; save the adapter to another folder")
    if (folder / CONFIG_NAME).exists() and existing_writer(folder) is None:
        raise FileExistsError(f"{folder / CONFIG_NAME} exists and was not written by dorafit; save the adapter to another folder")
    return save_adapter(model, folder, format="auto")


@written_by_one_rank
def save_pretrained_adapter(model: nn.Module, save_directory, is_main_process: bool = True, state_dict=None,
                            push_to_hub: bool = False, **kwargs: Any) -> Path:
    """``model.save_pretrained`` of a model with dorafit adapters: the adapter only.

    ``state_dict`` (the Trainer passes the full model's) is ignored: the adapter is read from the
    adapter layers. ``push_to_hub=True`` uploads the folder to ``repo_id`` (default: the folder's
    name) as transformers does.
    """
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a directory")
    if is_main_process:
        write_adapter_files(model, folder)
        if push_to_hub:
            repo_id = kwargs.get("repo_id") or folder.name
            upload_adapter_folder(folder, repo_id, token=kwargs.get("token"), private=kwargs.get("private"),
                                  commit_message=kwargs.get("commit_message"))
    return folder


def push_adapter_to_hub(model: nn.Module, repo_id: str, *, api=None, token=None, private: Optional[bool] = None,
                        commit_message: Optional[str] = None, format: str = "peft") -> Any:
    """Save the model's active adapter (PEFT layout by default) and upload it to ``repo_id``.

    ``api``: an ``huggingface_hub.HfApi`` (or an object with its ``create_repo`` and
    ``upload_folder``); default one built with ``token``.
    """
    from .io import save_adapter

    with tempfile.TemporaryDirectory(prefix="dorafit-push-") as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter", format=format)
        return upload_adapter_folder(folder, repo_id, api=api, token=token, private=private, commit_message=commit_message)


def load_adapter_weights(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Copy the weights of an adapter folder (PEFT or dorafit layout) into the model's active
    adapter in place: how a Trainer resumes from an adapter-only checkpoint. Every key and shape
    is checked before the first copy."""
    from .inject import adapter_state_dict
    from .interop import read_peft_files, split_peft_state
    from .io import AdapterFileError

    from .normalized import NORMALIZED_KEY

    path = Path(path)
    files = read_peft_files(path)
    if NORMALIZED_KEY in files.config:
        raise AdapterFileError(f"{path} is pre-normalized DoRA (its magnitudes hold g = m / ||W0 + s B A||): load it with "
                               "dorafit.load_adapter, which rebuilds m, not as training weights")
    expected = adapter_state_dict(model)  # {"<module>.<param>": live tensor}
    if "peft_type" in files.config:
        factors, _, other = split_peft_state(files.tensors, path)
        stored: Dict[str, torch.Tensor] = {f"{m}.{k}": t for m, fs in factors.items() for k, t in fs.items()}
        saves = {k.split(".trainable.")[0] for k in expected if ".trainable." in k}
        for key, t in other.items():  # modules_to_save copies: "<module>.<key>" of the copy's state
            owner = next((s for s in saves if key.startswith(s + ".")), None)
            if owner is not None:
                stored[f"{owner}.trainable.{key[len(owner) + 1:]}"] = t
    else:
        stored = files.tensors
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise AdapterFileError(f"{path}: the adapter lacks {len(missing)} tensor(s) this model's adapter holds, e.g. {missing[:5]}")
    for key, want in expected.items():
        if stored[key].numel() != want.numel():
            raise AdapterFileError(f"{path}: key {key!r} has shape {tuple(stored[key].shape)}, the model's is {tuple(want.shape)}")
    with torch.no_grad():
        for key, want in expected.items():
            want.copy_(stored[key].reshape(want.shape).to(device=want.device, dtype=want.dtype))
    return model


set_save_pretrained_writer(save_pretrained_adapter)
