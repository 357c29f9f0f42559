"""Damaged GGUF input and a damaged conversion cache: one clear line, or a verified rebuild.

A GGUF file cut short (a partial download) or claiming more than it holds is named before any
reader touches it; a converted folder whose files were cut or changed is re-verified and
converted again; a disk that fills up during the conversion leaves no half folder behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from test_gguf import write_tiny_gguf  # noqa: E402
from tmpfs import small_tmpfs  # noqa: E402

from dorafit import gguf as dgguf  # noqa: E402
from dorafit.cli import main  # noqa: E402
from dorafit.train.models import ModelError, resolve_model_path  # noqa: E402


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "models" / "tiny.F32.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path)
    return path


def _one_line(capsys, command="train"):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"dorafit {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("cut, needle", [
    (-100, "truncated GGUF file: tensor 'output.weight' ends at byte"),
    (3000, "truncated GGUF file: tensor 'token_embd.weight' ends at byte"),
    (2, "truncated or damaged GGUF file: the magic number needs 4 bytes"),
])
def test_a_cut_gguf_file_is_one_line_and_converts_nothing(tiny, tmp_path, capsys, cut, needle):
    size = tiny.stat().st_size
    os.truncate(tiny, size + cut if cut < 0 else cut)
    before = tiny.read_bytes()
    assert main(["train", "--model", str(tiny), "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    line = _one_line(capsys)
    assert needle in line and str(tiny) in line
    assert tiny.read_bytes() == before
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_header_claiming_more_than_the_file_holds_is_named(tiny):
    other = tiny.with_name("other.gguf")
    other.write_bytes(b"PK\x03\x04" + tiny.read_bytes()[4:])
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model_path(str(other))
    data = bytearray(tiny.read_bytes())
    data[8:16] = (10**15).to_bytes(8, "little")  # the tensor count
    tiny.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"claims 1,000,000,000,000,000 tensors .* more than its [\d,]+ bytes can hold"):
        resolve_model_path(str(tiny))


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_conversion_is_verified_and_rebuilt(tiny, capsys, damage):
    folder = Path(resolve_model_path(str(tiny)))
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    if damage == "truncate":
        os.truncate(weights, len(good) // 2)
    elif damage == "flip":
        weights.write_bytes(good[:-8] + bytes(b ^ 0xFF for b in good[-8:]))
    else:
        weights.unlink()
    capsys.readouterr()
    assert resolve_model_path(str(tiny)) == str(folder)
    err = capsys.readouterr().err
    assert f"the converted copy of tiny.F32.gguf in {folder} is damaged (model.safetensors" in err
    assert "converting it again" in err
    assert weights.read_bytes() == good
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporaries left
    capsys.readouterr()
    resolve_model_path(str(tiny))
    assert capsys.readouterr().err == ""  # verified now: used as it is


def test_a_conversion_from_before_files_were_recorded_gets_them_recorded(tiny):
    folder = Path(resolve_model_path(str(tiny)))
    marker = folder / "dorafit-gguf.json"
    record = json.loads(marker.read_text())
    del record["files"]
    marker.write_text(json.dumps(record))
    dgguf._verified.clear()
    assert resolve_model_path(str(tiny)) == str(folder)
    assert set(json.loads(marker.read_text())["files"]) >= {"config.json", "model.safetensors"}


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    with small_tmpfs(tmp_path / "small", "64k") as small:
        monkeypatch.setenv("DORAFIT_CACHE", str(small))
        assert main(["train", "--model", str(tiny), "--output", str(tmp_path / "run"), "--no-progress"]) == 2
        line = _one_line(capsys)
        assert "the disk is full (no space left on the device while writing" in line and "free some space" in line
        assert "converting tiny.F32.gguf to float32 needs about" in line
        assert [p for p in small.rglob("*") if p.is_file()] == []
