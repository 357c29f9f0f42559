"""Safe file and folder writes: a crash never leaves a half-written file under its name, nothing
dorafit did not write is ever removed, and no output reaches what dorafit does not own.

- A file is written to a temporary name beside the target, flushed to disk, then renamed over
  the target (``os.replace`` is atomic on one filesystem). The temporary is created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a fresh random name in the target's own folder, so it
  can never be an existing file, a link planted in advance or a name another writer uses.
- A target that is a symbolic link, a device, a FIFO, a socket or anything but a regular file
  (a folder for the folder writers) is refused before anything is created: dorafit never writes
  through a link nor replaces ``/dev/null`` with a file.
- ``write_into_directory`` adds or replaces only the named files of a folder, one atomic
  rename each; every other file in the folder stays as it was.
- ``atomic_directory`` replaces a whole folder that dorafit owns (a checkpoint, a merged
  model) by an atomic exchange of the old and new folders where the OS offers one (Linux
  ``renameat2``), so at every moment the path holds the complete old or the complete new folder.
- Temporary names say who made them (``.<name>.<host>-<pid>-<random>.dorafit-tmp`` /
  ``.dorafit-old``). The leftovers of an interrupted write are removed by the next successful
  write of the same target, and only those whose process is gone: two writers never delete each
  other's temporaries.
- A full disk is reported as ``DiskFullError`` naming the target and saying that what was
  there before is intact (the temporary is removed).
- Files and folders get the permissions of an ordinary ``open``/``mkdir`` under the user's
  umask (``mkstemp``/``mkdtemp`` alone would make them private to the owner).
- A folder dorafit made as a whole (a run folder, a merged model) holds a marker file,
  ``MARKER_NAME``, so that ``--overwrite`` and ``--resume`` can tell it from a folder of the user's.
- ``check_output_apart`` refuses an output that is, contains or lies inside one of a command's
  inputs (links, ``..`` and hard links resolved).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, os.PathLike]

TMP_SUFFIX = ".dorafit-tmp"
OLD_SUFFIX = ".dorafit-old"
MARKER_NAME = ".dorafit-folder.json"
# A temporary whose name carries no process id (written by an older dorafit) counts as left
# over once it is this old.
_ANONYMOUS_LEFTOVER_AGE = 3600.0
# Deepest JSON nesting dorafit reads (real configs and data rows nest a few levels), and the
# largest JSON config (an adapter_config.json for a 70B model is well under a megabyte).
MAX_JSON_DEPTH = 100
MAX_JSON_CONFIG_BYTES = 64 << 20


class OutputPathError(FileExistsError):
    """An output path dorafit refuses to write: a link, a device or other non-regular file, or
    an input of the same command."""


class DiskFullError(OSError):
    """The disk (or quota) filled up during a write; what the target held before is intact."""


# ---------------------------------------------------------------------------- small helpers


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters: messages never print unbounded input."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    short.maxlevel = 3
    text = short.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "...'"


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (with "..." where it was cut)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


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


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


def _lstat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def check_file_target(path: PathLike) -> None:
    """Refuse a file output ``path`` that is a link or exists as anything but a regular file."""
    path = Path(path)
    st = _lstat(path)
    if st is None or stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputPathError(f"{path} is a symbolic link (to {os.readlink(path)}); dorafit never writes through or "
                              "over a link: give the real path or a new file name")
    raise OutputPathError(f"{path} is a {_kind_of(st.st_mode)}, not a regular file; refusing to write over it: "
                          "give a new file name")


def check_folder_target(path: PathLike) -> None:
    """Refuse a folder output ``path`` that is a link or exists as anything but a folder."""
    path = Path(path)
    st = _lstat(path)
    if st is None or stat.S_ISDIR(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputPathError(f"{path} is a symbolic link (to {os.readlink(path)}); dorafit never writes through or "
                              "over a link: give the real folder")
    raise FileExistsError(f"{path} exists and is not a directory (it is a {_kind_of(st.st_mode)})")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps: safetensors and transformers wrap OS errors) says
    the disk or the quota is full."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, DiskFullError) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        text = str(err)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        if err.__cause__ is not None:
            err = err.__cause__
        else:
            err = None if err.__suppress_context__ else err.__context__
        seen += 1
    return False


def disk_full_error(path: PathLike, what: str = "nothing was replaced") -> DiskFullError:
    err = DiskFullError(f"no space left on the device while writing {path}: {what} (what was there before is "
                        "intact); free some space and run again")
    err.errno = errno.ENOSPC
    return err


# ---------------------------------------------------------------------------- temporaries

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _temp_name(target: Path, suffix: str) -> str:
    return f".{target.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"


def _owner_is_gone(name: str, target_name: str, suffix: str, mtime: float) -> bool:
    """Whether the process that made temporary ``name`` for ``target_name`` has ended."""
    middle = name[len(target_name) + 2: -len(suffix)]  # "<host>-<pid>-<random>" or an older "<random>"
    parts = middle.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return time.time() - mtime > _ANONYMOUS_LEFTOVER_AGE
    host, pid = parts[0], int(parts[1])
    if host != _HOST:  # another machine on a shared filesystem: only very old ones are surely left over
        return time.time() - mtime > 24 * _ANONYMOUS_LEFTOVER_AGE
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_leftovers(path: PathLike) -> List[Path]:
    """Remove temporaries that an interrupted dorafit write of ``path`` left beside it.

    Only names this module makes for ``path`` (``.<name>.*.dorafit-tmp`` / ``.dorafit-old``) whose
    process has ended are touched; a write in progress keeps its temporary. Returns what was removed.
    """
    path = Path(path)
    removed: List[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    prefix = f".{path.name}."
    for entry in entries:
        suffix = next((s for s in (TMP_SUFFIX, OLD_SUFFIX) if entry.name.endswith(s)), None)
        if suffix is None or not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not _owner_is_gone(entry.name, path.name, suffix, st.st_mtime):
            continue
        leftover = Path(entry.path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()
        removed.append(leftover)
    return removed



def _create_temp_file(target: Path) -> Tuple[Path, os.stat_result]:
    """A new empty file beside ``target``, made with O_EXCL | O_NOFOLLOW (never an existing entry)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.parent / _temp_name(target, TMP_SUFFIX)
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        try:
            return tmp, os.fstat(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- single files


def write_file_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """Let ``write(tmp_path)`` fill a temporary file beside ``path``, then rename it over ``path``.

    ``path`` must be absent or a regular file (a link, device or FIFO there is refused before
    anything is created). A full disk raises ``DiskFullError`` with ``path`` as it was.
    """
    path = Path(path)
    check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st = _lstat(path)
    # Keep the mode of the file being replaced, else what open() would give under the umask.
    mode = st.st_mode & 0o777 if st is not None else 0o666 & ~_umask()
    try:
        tmp, _ = _create_temp_file(path)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path) from None
        raise
    try:
        write(tmp)
        written = os.lstat(tmp)
        if not stat.S_ISREG(written.st_mode):  # a writer that followed or made a link: never rename that
            raise OutputPathError(f"{tmp} stopped being a regular file while it was written; not renaming it over {path}")
        os.chmod(tmp, mode)  # after writing: a writer may have recreated the file (ours is made 0600)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        check_file_target(path)  # again, right before the rename
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path) from None
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


_JSON_TOKENS = None


def json_depth_problem(text: str, limit: int = MAX_JSON_DEPTH) -> Optional[str]:
    """'nests deeper than N levels' when brackets outside strings nest deeper than ``limit``.
    Strings are skipped whole by one regular expression, so a large file of flat rows is scanned
    at the speed of its brackets."""
    import re

    global _JSON_TOKENS
    if _JSON_TOKENS is None:
        _JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return f"nests deeper than {limit} levels"
        elif token in "]}":
            depth -= 1
    return None


def loads_json(text: str, source: PathLike, error: type = ValueError) -> Any:
    """``json.loads`` with the errors a hostile file can cause named: bad JSON, nesting too deep."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{source}: JSON nests too deeply to be read (more than {MAX_JSON_DEPTH} levels "
                    "would be needed); not a file dorafit wrote") from None


def read_json_object(path: PathLike, error: type = ValueError) -> Dict[str, Any]:
    """The JSON object in file ``path``; ``error`` (naming the file) for a file over
    ``MAX_JSON_CONFIG_BYTES``, bad UTF-8, bad JSON, nesting deeper than ``MAX_JSON_DEPTH`` or a
    value that is not an object."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_CONFIG_BYTES:
        raise error(f"{path}: {size:,} bytes is too large for a JSON config (at most {MAX_JSON_CONFIG_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    problem = json_depth_problem(text)
    if problem:
        raise error(f"{path}: JSON {problem}; refusing to read it (no config of dorafit, PEFT or transformers nests so)")
    data = loads_json(text, path, error)
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(path: PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------- whole folders


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file() and not f.is_symlink():
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
    while True:
        tmp = path.parent / _temp_name(path, suffix)
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:
            continue
        os.chmod(tmp, 0o777 & ~_umask())  # made private first; a mkdir'ed folder would not be
        return tmp


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    Only for folders that dorafit owns as a whole (callers check that first). An existing
    ``path`` is exchanged with the new folder in one step where the OS can (no moment without
    a folder at ``path``), else moved aside first and put back if the final rename fails. A link
    at ``path`` is refused; a full disk raises ``DiskFullError`` with ``path`` as it was.
    """
    path = Path(path)
    check_folder_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp: Optional[Path] = _make_temp_dir(path, TMP_SUFFIX)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, "the folder was not replaced") from None
        raise
    old = None
    try:
        yield tmp
        _apply_umask(tmp)
        fsync_tree(tmp)
        check_folder_target(path)
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
    except BaseException as err:
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # the final rename failed: put the previous directory back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path, "the folder was not replaced") from None
        raise
    remove_leftovers(path)


def write_into_directory(path: PathLike, writers: Dict[str, Callable[[Path], None]]) -> Path:
    """Write the files ``writers`` names into folder ``path``; nothing else there is touched.

    ``writers`` maps a file name to ``write(tmp_path)``. A new folder appears complete (written
    under a temporary name and renamed into place); in an existing folder each file is replaced
    by its own atomic rename, in the order given, so every file is whole at every moment and
    files of other programs stay as they are. A link at ``path`` or at one of the names is refused.
    Several writers may race: a folder that another writer created in the meantime is never
    replaced (that would pull it from under a writer inside it); the files move into it one by one.
    """
    path = Path(path)
    check_folder_target(path)
    for name in writers:
        check_file_target(path / name)
    if not path.exists():
        _write_new_directory(path, writers)
        return path
    for name, write in writers.items():
        write_file_atomic(path / name, write)
        remove_leftovers(path / name)
    remove_leftovers(path)
    return path


def _write_new_directory(path: Path, writers: Dict[str, Callable[[Path], None]]) -> None:
    """The files of ``writers`` in a new folder renamed into place, or, when another writer made
    ``path`` first, renamed into that folder one by one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _make_temp_dir(path, TMP_SUFFIX)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path, "the folder was not made") from None
        raise
    try:
        for name, write in writers.items():
            write(tmp / name)
        _apply_umask(tmp)
        fsync_tree(tmp)
        try:
            os.rename(tmp, path)  # unlike an exchange, this never replaces a folder holding files
            made = True
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            made = False
        if not made:
            check_folder_target(path)
            for name in writers:
                check_file_target(path / name)
                os.replace(tmp / name, path / name)
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(path.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise disk_full_error(path, "the folder was not made") from None
        raise
    remove_leftovers(path)


# ---------------------------------------------------------------------------- markers, overlaps


def write_marker(folder: PathLike, kind: str, **extra: Any) -> None:
    """Mark ``folder`` as made by dorafit as a whole (``kind``: "run", "merged"); ``extra`` adds
    JSON fields (a run records the process that uses the folder)."""
    from . import __version__

    write_json_atomic(Path(folder) / MARKER_NAME,
                      {"made_by": "dorafit", "kind": kind, "dorafit_version": __version__, **extra})


def read_marker_data(folder: PathLike) -> Dict[str, Any]:
    """The whole JSON of ``folder``'s marker ({} when there is no valid one)."""
    marker = Path(folder) / MARKER_NAME
    st = _lstat(marker)
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
        return {}
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) and data.get("made_by") == "dorafit" else {}


def read_marker(folder: PathLike) -> Optional[str]:
    """The kind recorded by ``write_marker`` in ``folder``, or None for a folder dorafit did not make
    (a marker that is a link or not a small regular file does not count)."""
    kind = read_marker_data(folder).get("kind")
    return kind if isinstance(kind, str) else None


def is_same_or_inside(path: PathLike, other: PathLike) -> bool:
    """True when ``path`` is ``other`` or lies inside it (after resolving links and ``..``; a link
    loop resolves as far as it goes, never raising)."""
    a, b = Path(os.path.realpath(path)), Path(os.path.realpath(other))
    return a == b or b in a.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_apart(output: PathLike, inputs: Iterable[Tuple[str, Optional[PathLike]]], flag: str,
                       folder: bool = True) -> None:
    """Refuse an ``output`` (given with option ``flag``) that is one of ``inputs``, lies inside one
    (a file in the model's or the adapter's folder included) or, for a folder output, holds one.

    ``inputs``: (option, path) pairs; paths that do not exist (hub ids) and empty ones are
    skipped. Links, ``..`` and hard links are resolved, so no spelling of a path gets through.
    """
    output = Path(output)
    for option, given in inputs:
        if not given or not Path(given).exists():
            continue
        path = Path(given)
        overlaps = (is_same_or_inside(output, path) or (folder and is_same_or_inside(path, output))
                    or (output.exists() and _same_file(output, path)))
        if overlaps:
            raise OutputPathError(f"{flag} {output} overlaps {option} {path}: an output must not be an input, "
                                  f"{'lie inside one or hold one' if folder else 'or lie inside one'}; choose another {flag}")


def check_output_file(output: PathLike, inputs: Iterable[Tuple[str, Optional[PathLike]]], flag: str) -> None:
    """A file output of a command: not a link, device, FIFO or folder, and apart from its inputs."""
    check_file_target(output)
    if Path(output).is_dir():
        raise OutputPathError(f"{flag} {output} is a folder; give a file name")
    check_output_apart(output, inputs, flag, folder=False)


def check_output_folder(output: PathLike, inputs: Iterable[Tuple[str, Optional[PathLike]]], flag: str) -> None:
    """A folder output of a command: not a link, not a file, and apart from its inputs."""
    check_folder_target(output)
    check_output_apart(output, inputs, flag, folder=True)
