"""Safe writes (dorafit.files): other files survive, temporaries are cleaned up, modes follow the umask."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dorafit import files


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


def test_leftovers_of_an_interrupted_write_go_with_the_next_write_and_only_they(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    mine = tmp_path / ".adapter.x1y2.dorafit-tmp"  # what a killed write leaves
    mine.mkdir()
    (mine / "half.safetensors").write_bytes(b"12")
    file_left = folder / ".a.json.k3.dorafit-tmp"
    file_left.write_text("half")
    theirs = tmp_path / ".adapter.backup"  # looks similar but is not dorafit's
    theirs.write_text("keep")

    def boom(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_into_directory(folder, {"a.json": boom})
    assert not any(p.name.startswith(".a.json.") and p != file_left for p in folder.iterdir())  # own tmp removed
    files.write_into_directory(folder, {"a.json": lambda f: f.write_text("ok")})
    assert not file_left.exists() and not mine.exists()
    assert theirs.read_text() == "keep" and (folder / "a.json").read_text() == "ok"


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
