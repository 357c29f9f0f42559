"""Adapters on the Hugging Face hub: a repository id in, a local folder out, and back.

``resolve_adapter_path`` turns a repository id ("owner/name") into a local snapshot with
``huggingface_hub.snapshot_download``, which serves the local cache when ``HF_HUB_OFFLINE=1``;
an existing path is used as it is. ``upload_adapter_folder`` uploads the adapter files of a
saved folder with ``HfApi``. Nothing here knows the file formats: this module sits below
``dorafit.io``, which resolves hub ids through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from .adapter_files import AdapterFileError

# Files a hub adapter repository may hold that dorafit reads.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "task.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_adapter_path(path_or_id: Union[str, os.PathLike], revision: Optional[str] = None,
                         cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """A local adapter folder for a folder path or a hub repository id ("owner/name").

    An existing path is returned as it is. A repository id is fetched with
    ``huggingface_hub.snapshot_download`` (only the adapter files); with ``HF_HUB_OFFLINE=1`` that
    reads the local cache. Anything else is reported as a missing folder.
    """
    path = Path(path_or_id)
    text = str(path_or_id)
    if path.exists() or not _REPO_ID.fullmatch(text) or text.startswith("."):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AdapterFileError(f"adapter path {text} does not exist (and huggingface_hub is not installed to fetch it)") from None
    try:
        local = snapshot_download(repo_id=text, revision=revision, cache_dir=cache_dir, allow_patterns=ADAPTER_FILES)
    except Exception as exc:  # offline without a cached copy, unknown repository, no network
        raise AdapterFileError(
            f"adapter {text!r} is not a local folder and could not be fetched from the hub: {type(exc).__name__}: {exc}"
        ) from None
    return Path(local)


def upload_adapter_folder(folder: Union[str, os.PathLike], repo_id: str, *, api=None, token=None,
                          private: Optional[bool] = None, commit_message: Optional[str] = None,
                          revision: Optional[str] = None) -> Any:
    """Create ``repo_id`` if needed and upload the adapter files of ``folder``; returns the commit info."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        allow_patterns=ADAPTER_FILES,
        commit_message=commit_message or "Upload dorafit adapter",
        revision=revision,
    )
