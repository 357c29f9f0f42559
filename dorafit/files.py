"""Safe file and folder writes: a crash never leaves a half-written file under its name, and
nothing dorafit did not write is ever removed.

- A file is written to a temporary name beside the target, flushed to disk, then renamed over
  the target (``os.replace`` is atomic on one filesystem).
- ``write_into_directory`` adds or replaces only the named files of a folder, one atomic
  rename each; every other file in the folder stays as it was.
- ``atomic_directory`` replaces a whole folder that dorafit owns (a checkpoint, a merged
  model) by an atomic exchange of the old and new folders where the OS offers one (Linux
  ``renameat2``), so at every moment the path holds the complete old or the complete new folder.
- Temporary names are recognisable (``.<name>.<random>.dorafit-tmp`` / ``.dorafit-old``);
  leftovers of an interrupted write are removed by the next successful write of the same
  target, and only those.
- Files and folders get the permissions of an ordinary ``open``/``mkdir`` under the user's
  umask (``mkstemp``/``mkdtemp`` alone would make them private to the owner).
- A folder dorafit made as a whole (a run folder, a merged model) holds a marker file,
  ``MARKER_NAME``, so that ``--overwrite`` can tell it from a folder of the user's.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

PathLike = Union[str, os.PathLike]

TMP_SUFFIX = ".dorafit-tmp"
OLD_SUFFIX = ".dorafit-old"
MARKER_NAME = ".dorafit-folder.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(path: PathLike) -> List[Path]:
    """Remove temporaries that an interrupted dorafit write of ``path`` left beside it.

    Only names this module makes for ``path`` (``.<name>.*.dorafit-tmp`` / ``.dorafit-old``)
    are touched; returns what was removed.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for suffix in (TMP_SUFFIX, OLD_SUFFIX):
        for leftover in path.parent.glob(f".{escape_glob(path.name)}.*{suffix}"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()
            removed.append(leftover)
    return removed


def escape_glob(name: str) -> str:
    """``name`` with glob wildcards escaped, so a folder called ``a[1]`` matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def write_file_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp_path)`` fill a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; refusing to replace it with a file")
    # Keep the mode of the file being replaced, else what open() would give under the umask.
    mode = path.stat().st_mode & 0o777 if path.is_file() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)  # after writing: a writer may have recreated the file (mkstemp makes 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: PathLike, error: type = ValueError) -> Dict[str, Any]:
    """The JSON object in file ``path``; ``error`` (naming the file) for bad UTF-8, bad JSON or a
    value that is not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def _apply_umask(folder: Path) -> None:
    """Give what writers (ours, safetensors', transformers') put in ``folder`` the umask's modes."""
    mask = _umask()
    for entry in folder.rglob("*"):
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)


def _make_temp_dir(path: Path, suffix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a mkdir'ed folder would not be
    return tmp


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    Only for folders that dorafit owns as a whole (callers check that first). An existing
    ``path`` is exchanged with the new folder in one step where the OS can (no moment without
    a folder at ``path``), else moved aside first and put back if the final rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    tmp = _make_temp_dir(path, TMP_SUFFIX)
    old = None
    try:
        yield tmp
        _apply_umask(tmp)
        fsync_tree(tmp)
        if path.is_dir() and _exchange(tmp, path):
            old, tmp = tmp, None  # tmp now holds the previous folder
        else:
            if path.exists():
                old = _make_temp_dir(path, OLD_SUFFIX)
                os.rmdir(old)
                os.replace(path, old)
            os.replace(tmp, path)
            tmp = None
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # the final rename failed: put the previous directory back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_leftovers(path)


def write_into_directory(path: PathLike, writers: Dict[str, Callable[[Path], None]]) -> Path:
    """Write the files ``writers`` names into folder ``path``; nothing else there is touched.

    ``writers`` maps a file name to ``write(tmp_path)``. A new folder appears complete (written
    under a temporary name and renamed into place); in an existing folder each file is replaced
    by its own atomic rename, in the order given, so every file is whole at every moment and
    files of other programs stay as they are.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not path.exists():
        with atomic_directory(path) as tmp:
            for name, write in writers.items():
                write(tmp / name)
        return path
    for name, write in writers.items():
        write_file_atomic(path / name, write)
        remove_leftovers(path / name)
    remove_leftovers(path)
    return path


def write_marker(folder: PathLike, kind: str) -> None:
    """Mark ``folder`` as made by dorafit as a whole (``kind``: "run", "merged")."""
    from . import __version__

    write_json_atomic(Path(folder) / MARKER_NAME, {"made_by": "dorafit", "kind": kind, "dorafit_version": __version__})


def read_marker(folder: PathLike) -> Optional[str]:
    """The kind recorded by ``write_marker`` in ``folder``, or None for a folder dorafit did not make."""
    marker = Path(folder) / MARKER_NAME
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and data.get("made_by") == "dorafit" and isinstance(data.get("kind"), str):
        return data["kind"]
    return None


def is_same_or_inside(path: PathLike, other: PathLike) -> bool:
    """True when ``path`` is ``other`` or lies inside it (after resolving links and ``..``)."""
    a, b = Path(path).resolve(), Path(other).resolve()
    return a == b or b in a.parents
