"""The Hugging Face hub, only where the user names it: ``hf://owner/name`` in, a local folder out.

A name is read from the hub only when the user says so: ``hf://owner/name`` (or
``from_hub=True`` in Python). Anything else is a local path, and a path that does not exist is an
error that says how to ask for the hub — never a silent lookup of whoever owns that name there
(``runs/best`` typed in the wrong folder must not load someone's repository ``runs/best``).

``resolve_adapter_path`` turns ``hf://owner/name`` into a local snapshot of the adapter files
with ``huggingface_hub.snapshot_download``, which serves the local cache when
``HF_HUB_OFFLINE=1``. ``resolve_model_source`` does the same for base models, handing the id
to transformers. ``upload_adapter_folder`` uploads the adapter files of a saved folder with
``HfApi``. Nothing here knows the file formats: this module sits below ``dorafit.io``, which
resolves adapters through it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from .adapter_files import AdapterFileError
from .files import brief

HUB_PREFIX = "hf://"
# Files a hub adapter repository may hold that dorafit reads.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "task.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?")


class MissingSourceError(FileNotFoundError):
    """A local path that does not exist (and was not marked as a hub name)."""


def hub_repo_id(text: Union[str, os.PathLike], from_hub: bool = False) -> Optional[str]:
    """The repository id of ``hf://owner/name`` (or of ``owner/name`` when ``from_hub``), else None.
    A malformed id after ``hf://`` is an error."""
    text = os.fspath(text)
    if not (text.startswith(HUB_PREFIX) or from_hub):
        return None
    repo = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise MissingSourceError(f"{brief(text)} is not a hub repository id (expected hf://owner/name)")
    return repo


def looks_like_repo_id(text: str) -> bool:
    """``name`` or ``owner/name``: a path that, had it been meant for the hub, wants ``hf://``."""
    return bool(_REPO_ID.fullmatch(text)) and not text.startswith(".")


def _hub_hint(text: str) -> str:
    return f" (to read it from the Hugging Face hub, write {HUB_PREFIX}{text})" if looks_like_repo_id(text) else ""


def resolve_model_source(name: Union[str, os.PathLike], what: str = "model") -> str:
    """A base model as transformers should get it: an existing local path as it is, the repository
    id of ``hf://owner/name``; any other name is a MissingSourceError saying how to name the hub."""
    text = os.fspath(name)
    repo = hub_repo_id(text)
    if repo is not None:
        return repo
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser()) if text.startswith("~") else text
    raise MissingSourceError(f"{what} folder {text} does not exist{_hub_hint(text)}")


def resolve_adapter_path(path_or_id: Union[str, os.PathLike], revision: Optional[str] = None,
                         cache_dir: Optional[Union[str, os.PathLike]] = None, from_hub: bool = False) -> Path:
    """A local adapter folder for a folder path or a hub repository ``hf://owner/name``.

    An existing path is returned as it is. ``hf://owner/name`` (or any name with ``from_hub=True``)
    is fetched with ``huggingface_hub.snapshot_download`` (only the adapter files); with
    ``HF_HUB_OFFLINE=1`` that reads the local cache. A path that does not exist is an
    AdapterFileError; it is never looked up on the hub.
    """
    text = os.fspath(path_or_id)
    try:
        repo = hub_repo_id(text, from_hub)
    except MissingSourceError as exc:
        raise AdapterFileError(str(exc)) from None
    if repo is None:
        path = Path(text)
        if not path.exists():
            raise AdapterFileError(f"adapter path {text} does not exist{_hub_hint(text)}")
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AdapterFileError(f"adapter {text} is on the hub, and huggingface_hub is not installed to fetch it") from None
    try:
        local = snapshot_download(repo_id=repo, revision=revision, cache_dir=cache_dir, allow_patterns=ADAPTER_FILES)
    except Exception as exc:  # offline without a cached copy, unknown repository, no network
        detail = " ".join(str(exc).split())[:300]
        raise AdapterFileError(f"adapter {HUB_PREFIX}{repo} could not be fetched from the hub: {type(exc).__name__}: "
                               f"{detail}") from None
    return Path(local)


def upload_adapter_folder(folder: Union[str, os.PathLike], repo_id: str, *, api=None, token=None,
                          private: Optional[bool] = None, commit_message: Optional[str] = None,
                          revision: Optional[str] = None) -> Any:
    """Create ``repo_id`` if needed and upload the adapter files of ``folder``; returns the commit info."""
    if repo_id.startswith(HUB_PREFIX):
        repo_id = repo_id[len(HUB_PREFIX):]
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
