"""Data sources that are not a single file: ``datasets.save_to_disk`` folders, folders of data
files, and hub datasets (``hf://owner/name``).

A source may end in ``:SPLIT`` (``my_dataset_dict:test``) to pick a split; a ``split`` argument
(``dorafit eval --data-split``) does the same. Without one, a source with a single split uses it
and says so on stderr; a source with several refuses and lists them, because guessing "train"
for a test file (or "test" for a training file) would silently score the wrong rows.

- a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``dataset_info.json``) or
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``) is read with ``datasets.load_from_disk``:
  Arrow files and JSON metadata, nothing is unpickled;
- a folder holding data files (JSON / JSONL / CSV / parquet) is read with
  ``datasets.load_dataset(folder)``, which names its splits from the file names;
- ``hf://owner/name`` is a hub dataset, read with ``datasets.load_dataset("owner/name")``; with
  ``HF_HUB_OFFLINE=1`` this reads the local cache. Only the ``hf://`` prefix reaches the hub: a path
  that does not exist is an error, never a lookup of whoever owns that name there.

The rows come back as plain dicts and go through the same checks as rows of a JSON file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Suffixes read as one file by dorafit.train.data; a folder holding one of them is a data folder.
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".pq")

_SPLIT = re.compile(r"^[\w.-]+$")


class SourceError(ValueError):
    """A data source that cannot be read; the message is one line naming the source."""


def split_source(source: str) -> tuple[str, str]:
    """("folder or id", "split") from "folder or id[:split]"; an existing path is never cut."""
    if Path(source).exists() or ":" not in source:
        return source, ""
    head, _, split = source.rpartition(":")
    if not head or not _SPLIT.match(split):
        return source, ""
    return head, split


def saved_dataset_kind(folder: Path) -> str | None:
    """'dataset' or 'dataset_dict' for a ``save_to_disk`` folder, else None."""
    if (folder / "dataset_dict.json").is_file():
        return "dataset_dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def looks_like_hub_id(source: str) -> bool:
    """An explicit hub dataset: ``hf://name`` or ``hf://owner/name``."""
    from dorafit.remote import HUB_PREFIX

    return source.startswith(HUB_PREFIX)


def read_source_rows(source: str, split: str = "") -> list[dict]:
    """Every row of the chosen split of a save_to_disk folder, data folder or hub dataset, as dicts."""
    import datasets

    datasets.disable_progress_bars()
    name, named_split = split_source(source)
    if split and named_split and split != named_split:
        raise SourceError(f"{source}: names split {named_split!r} but the split option says {split!r}")
    split = split or named_split
    path = Path(name)
    if path.is_dir():
        kind = saved_dataset_kind(path)
        if kind == "dataset":
            if split:
                raise SourceError(f"{name}: is a single saved Dataset (no splits); drop the split {split!r}")
            return _to_rows(_load(lambda: datasets.load_from_disk(str(path)), name), name)
        if kind == "dataset_dict":
            table = _load(lambda: datasets.load_from_disk(str(path)), name)
        elif any(p.suffix.lower() in DATA_SUFFIXES for p in path.rglob("*") if p.is_file()):
            table = _load(lambda: datasets.load_dataset(str(path)), name)
        else:
            raise SourceError(
                f"{name}: a folder that is neither a datasets.save_to_disk folder nor holds a "
                f"data file ({', '.join(DATA_SUFFIXES)})")
    elif path.is_file():
        raise SourceError(f"{name}: a data file has no splits; drop the split {split!r}")
    elif path.exists():
        raise SourceError(f"{name}: not a readable file or folder")
    elif looks_like_hub_id(name):
        from dorafit.remote import MissingSourceError, hub_repo_id

        try:
            repo = hub_repo_id(name)
        except MissingSourceError as err:
            raise SourceError(str(err)) from None
        table = _load(lambda: datasets.load_dataset(repo), name, hub=True)
    else:
        from dorafit.remote import HUB_PREFIX, looks_like_repo_id

        hint = f" (a dataset on the Hugging Face hub is written {HUB_PREFIX}{name})" if looks_like_repo_id(name) else ""
        raise SourceError(f"{name}: no such file or folder{hint}")
    return _to_rows(_pick_split(table, name, split), f"{name}:{split}" if split else name)


def _load(open_dataset, name: str, hub: bool = False):
    """Run a datasets loader; its many exception types become one line naming the source."""
    try:
        return open_dataset()
    except Exception as err:  # datasets raises FileNotFoundError, DatasetNotFoundError, ValueError, ...
        detail = " ".join(str(err).split()) or type(err).__name__
        if hub:
            raise SourceError(f"{name}: not a dataset on the hub or in its local cache ({detail[:300]})") from None
        raise SourceError(f"{name}: could not be read as a dataset ({detail[:300]})") from None


def _pick_split(table, name: str, split: str):
    """The chosen split of a DatasetDict; the only split when none is named (said on stderr)."""
    splits = sorted(table)
    if split:
        if split not in table:
            raise SourceError(f"{name}: has no split {split!r}; its splits are {', '.join(splits)}")
        return table[split]
    if len(splits) != 1:
        raise SourceError(
            f"{name}: holds the splits {', '.join(splits)}; choose one as {name}:SPLIT "
            "(or with --data-split for dorafit eval)")
    print(f"{name}: using its only split {splits[0]!r}", file=sys.stderr)
    return table[splits[0]]


def _to_rows(table, name: str) -> list[dict]:
    if len(table) == 0:
        raise SourceError(f"{name}: the data set is empty")
    return table.to_list()
