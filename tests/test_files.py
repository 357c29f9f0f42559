"""Safe writes (dorafit.files): other files survive, temporaries are cleaned up, modes follow the umask."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from dorafit import files
from tmpfs import small_tmpfs


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_into_directory_replaces_only_the_named_files(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (folder / "a.json").write_text("old")
    before = snapshot(folder)
    files.write_into_directory(folder, {"a.json": lambda f: f.write_text("new"), "b.json": lambda f: f.write_text("b")})
    after = snapshot(folder)
    assert (folder / "a.json").read_text() == "new" and (folder / "b.json").read_text() == "b"
    for name in ("notes.txt", "sub/data.bin"):
        assert after[name] == before[name]
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.json", "notes.txt", "sub"]


def _ended_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_an_interrupted_write_go_with_the_next_write_and_only_they(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    dead = _ended_pid()
    mine = tmp_path / f".adapter.{files._HOST}-{dead}-x1y2{files.TMP_SUFFIX}"  # what a killed write leaves
    mine.mkdir()
    (mine / "half.safetensors").write_bytes(b"12")
    file_left = folder / f".a.json.{files._HOST}-{dead}-k3{files.TMP_SUFFIX}"
    file_left.write_text("half")
    old_anonymous = folder / f".a.json.k4{files.TMP_SUFFIX}"  # an older dorafit's name, hours old
    old_anonymous.write_text("half")
    os.utime(old_anonymous, (time.time() - 7200, time.time() - 7200))
    theirs = tmp_path / ".adapter.backup"  # looks similar but is not dorafit's
    theirs.write_text("keep")

    def boom(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_into_directory(folder, {"a.json": boom})
    own = [p for p in folder.iterdir() if p.name.startswith(".a.json.") and p not in (file_left, old_anonymous)]
    assert own == []  # its own temporary removed
    files.write_into_directory(folder, {"a.json": lambda f: f.write_text("ok")})
    assert not file_left.exists() and not mine.exists() and not old_anonymous.exists()
    assert theirs.read_text() == "keep" and (folder / "a.json").read_text() == "ok"


def test_a_running_writer_keeps_its_temporaries(tmp_path):
    """Another process's temporary is never removed while that process runs (two writers of one
    target never delete each other's temporaries)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".a.json.{files._HOST}-{sleeper.pid}-zz{files.TMP_SUFFIX}"
        live.write_text("being written")
        fresh_anonymous = tmp_path / f".a.json.q9{files.TMP_SUFFIX}"  # no pid, just made: could be live
        fresh_anonymous.write_text("being written")
        files.write_bytes_atomic(tmp_path / "a.json", b"{}")
        files.remove_leftovers(tmp_path / "a.json")
        assert live.read_text() == "being written" and fresh_anonymous.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    files.remove_leftovers(tmp_path / "a.json")
    assert not live.exists()


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_into_directory(tmp_path / "new", {"w.bin": lambda f: f.write_bytes(b"1")})
        with files.atomic_directory(tmp_path / "whole") as tmp:
            (tmp / "inner").mkdir()
            (tmp / "inner" / "f").write_text("x")
        files.write_bytes_atomic(tmp_path / "plain.txt", b"x")
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", tmp_path / "whole", tmp_path / "whole" / "inner"):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    for f in (tmp_path / "new" / "w.bin", tmp_path / "whole" / "inner" / "f", tmp_path / "plain.txt"):
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_replacing_a_file_keeps_its_mode(tmp_path):
    target = tmp_path / "shared.json"
    target.write_text("{}")
    os.chmod(target, 0o664)
    files.write_json_atomic(target, {"a": 1})
    assert target.stat().st_mode & 0o777 == 0o664 and target.read_text().startswith("{")


def test_atomic_directory_swaps_in_the_new_folder_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "ckpt"
    with files.atomic_directory(target) as tmp:
        (tmp / "v").write_text("1")
    inode_seen = []
    with files.atomic_directory(target) as tmp:
        (tmp / "v").write_text("2")
        inode_seen.append(target.is_dir())  # the old folder is in place while the new one is written
    assert inode_seen == [True]
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_file_where_a_folder_is_expected_is_refused_and_kept(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("a file of the user's")
    with pytest.raises(FileExistsError, match="adapter exists and is not a directory"):
        files.write_into_directory(target, {"x": lambda f: f.write_text("x")})
    with pytest.raises(FileExistsError, match="not a directory"):
        with files.atomic_directory(target):
            pass
    assert target.read_text() == "a file of the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_marker_and_overlap_helpers(tmp_path):
    assert files.read_marker(tmp_path) is None
    (tmp_path / files.MARKER_NAME).write_text('{"made_by": "someone else", "kind": "run"}')
    assert files.read_marker(tmp_path) is None
    files.write_marker(tmp_path, "run")
    assert files.read_marker(tmp_path) == "run"
    assert files.is_same_or_inside(tmp_path / "a" / ".." / "a", tmp_path / "a")
    assert files.is_same_or_inside(tmp_path / "a" / "b", tmp_path / "a")
    assert not files.is_same_or_inside(tmp_path / "ab", tmp_path / "a")


# ---------------------------------------------------------------------------- hostile targets


def _special_files(tmp_path: Path) -> dict:
    """{kind: path} of non-regular files made inside tmp_path: a FIFO, a character device node (the
    null device's numbers, where the system allows creating one), a link to a file, a dangling link."""
    found = {}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    found["FIFO (named pipe)"] = fifo
    node = tmp_path / "null-node"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        found["character device"] = node
    except (PermissionError, OSError):
        pass
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    link = tmp_path / "link-to-victim"
    link.symlink_to(victim)
    found["symbolic link"] = link
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    found["dangling link"] = dangling
    return found


def _kind(path: Path):
    return stat.S_IFMT(os.lstat(path).st_mode)


@pytest.mark.parametrize("writer", ["bytes", "json", "file"])
def test_file_writers_refuse_links_devices_and_fifos(tmp_path, writer):
    targets = _special_files(tmp_path)
    before = {p: _kind(p) for p in targets.values()}
    write = {"bytes": lambda p: files.write_bytes_atomic(p, b"results"),
             "json": lambda p: files.write_json_atomic(p, {"accuracy": 1.0}),
             "file": lambda p: files.write_file_atomic(p, lambda tmp: tmp.write_text("results"))}[writer]
    for kind, path in targets.items():
        with pytest.raises(files.OutputPathError) as err:
            write(path)
        assert str(path) in str(err.value) and ("link" in kind) == ("symbolic link" in str(err.value))
        assert "\n" not in str(err.value)
    assert {p: _kind(p) for p in targets.values()} == before  # every entry is still what it was
    assert (tmp_path / "victim.txt").read_text() == "the user's file"
    assert not (tmp_path / "would-be-created").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(files.TMP_SUFFIX)]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # the real one was never a target


def test_folder_writers_refuse_links(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "weights.bin").write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(files.OutputPathError, match="is a symbolic link"):
        files.write_into_directory(link, {"adapter_config.json": lambda f: f.write_text("{}")})
    with pytest.raises(files.OutputPathError, match="is a symbolic link"):
        with files.atomic_directory(link) as tmp:
            (tmp / "x").write_text("x")
    # a link planted at one of the names written inside a real folder
    (real / "adapter_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(files.OutputPathError, match="adapter_config.json is a symbolic link"):
        files.write_into_directory(real, {"adapter_model.safetensors": lambda f: f.write_bytes(b"w"),
                                          "adapter_config.json": lambda f: f.write_text("{}")})
    assert link.is_symlink() and (real / "weights.bin").read_bytes() == b"precious"
    assert not (tmp_path / "elsewhere.json").exists() and not (real / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_temporaries_have_fresh_names_and_never_follow_a_planted_link(tmp_path, monkeypatch):
    """A link planted at the temporary's name is never written through: the next name is taken."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    tokens = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(tokens))
    planted = tmp_path / f".out.json.{files._HOST}-{os.getpid()}-aaaa{files.TMP_SUFFIX}"
    planted.symlink_to(victim)
    files.write_bytes_atomic(tmp_path / "out.json", b"new")
    assert victim.read_text() == "keep" and planted.is_symlink()
    assert (tmp_path / "out.json").read_bytes() == b"new" and not (tmp_path / "out.json").is_symlink()


def _writer(args):
    target, worker, rounds = args
    for i in range(rounds):
        payload = (f"{worker}:{i}:" + "x" * 4000).encode()
        files.write_bytes_atomic(target, payload)
        # Every round a new folder that all writers race to create, then write into.
        files.write_into_directory(Path(target).parent / f"folder{i}", {
            "a.bin": lambda f, p=payload: f.write_bytes(p), "b.bin": lambda f, p=payload: f.write_bytes(p)})
    return worker


def test_concurrent_writers_of_one_target_never_break_each_other(tmp_path):
    """Four processes rewrite one file 40 times at once, and race 40 times to create a folder and
    write into it: no writer fails (none removes or swaps away another's temporary), every read
    sees one whole payload, every folder holds both files whole, nothing is left over."""
    target = tmp_path / "out.bin"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        result = pool.map_async(_writer, [(str(target), w, 40) for w in range(4)])
        while not result.ready():
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                continue
            assert data.endswith(b"x" * 4000) and data.count(b":") == 2, data[:40]
        assert sorted(result.get(timeout=120)) == [0, 1, 2, 3]
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((files.TMP_SUFFIX, files.OLD_SUFFIX))]
    assert leftovers == []
    for i in range(40):
        folder = tmp_path / f"folder{i}"
        assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "b.bin"]
        assert all((folder / n).read_bytes().endswith(b"x" * 4000) for n in ("a.bin", "b.bin"))


# ---------------------------------------------------------------------------- a full disk


@pytest.fixture()
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "small", "256k") as mount:
        yield mount


def test_a_full_disk_is_one_error_and_the_old_file_stays(small_disk):
    target = small_disk / "results.json"
    files.write_json_atomic(target, {"old": True})
    with pytest.raises(files.DiskFullError) as err:
        files.write_bytes_atomic(target, b"x" * (1 << 20))
    assert err.value.errno == errno.ENOSPC
    assert f"no space left on the device while writing {target}" in str(err.value) and "intact" in str(err.value)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in small_disk.iterdir()) == ["results.json"]
    with files.atomic_directory(small_disk / "ckpt") as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(files.DiskFullError, match="the folder was not replaced"):
        with files.atomic_directory(small_disk / "ckpt") as tmp:
            (tmp / "big").write_bytes(b"x" * (1 << 20))
    assert (small_disk / "ckpt" / "v").read_text() == "1"
    assert sorted(p.name for p in small_disk.iterdir()) == ["ckpt", "results.json"]


# ---------------------------------------------------------------------------- inputs and outputs apart


def test_an_output_is_never_an_input_however_spelled(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.json"
    data.write_text("[]")
    hard = tmp_path / "hard-link.json"
    os.link(data, hard)
    soft = tmp_path / "soft"
    soft.symlink_to(model)
    inputs = [("--model", model), ("--data", data), ("--adapter", None), ("--base", "hf://owner/name")]
    for out, folder in ((model, True), (model / "results.json", False), (soft / "x" / "y", True),
                        (tmp_path / "." / "train.json", False), (hard, False), (tmp_path, True)):
        with pytest.raises(files.OutputPathError, match="overlaps"):
            files.check_output_apart(out, inputs, "--out", folder=folder)
    files.check_output_apart(tmp_path / "elsewhere", inputs, "--out")
    files.check_output_apart(tmp_path / "model-2" / "x.json", inputs, "--json", folder=False)


def test_deep_json_and_long_values_are_bounded(tmp_path):
    deep = tmp_path / "adapter_config.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nests deeper than 100 levels"):
        files.read_json_object(deep)
    assert len(files.brief("x" * 10_000_000)) < 100
    assert len(files.brief([["a" * 1000] * 1000] * 1000)) < 200
