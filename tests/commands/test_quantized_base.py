"""`dorafit eval` of an adapter trained on a 4-bit base (QDoRA) runs on the base quantized the
same way, as the adapter records; without bitsandbytes it refuses with a message saying how."""

from __future__ import annotations

import json

import pytest
from cli_models import ARC, make_adapter, tiny_model  # noqa: F401 (fixture)

from dorafit.cli import main


def _test_file(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps(json.loads((ARC / "test.json").read_text())[:2]))
    return path


def test_eval_quantizes_the_base_like_the_adapter(tiny_model, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    qdora = make_adapter(tiny_model, tmp_path / "qdora", quantize=True)
    code = main(["eval", "--model", str(tiny_model), "--adapter", str(qdora), "--data", str(_test_file(tmp_path)),
                 "--max-new-tokens", "2", "--no-progress", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "quantized 4 base layers to 4-bit nf4 as the adapter was trained" in captured.err
    assert "full precision" not in captured.err  # no mismatch warning: the base really is 4-bit


def test_eval_without_bitsandbytes_refuses_and_says_how(tiny_model, tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from dorafit import quant

    qdora = make_adapter(tiny_model, tmp_path / "qdora", quantize=True)

    def missing():
        raise quant.QuantizationError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quant, "_bitsandbytes", missing)
    for command in (["eval", "--data", str(_test_file(tmp_path)), "--no-progress"],
                    ["merge", "--out", str(tmp_path / "merged")]):
        code = main([*command, "--model", str(tiny_model), "--adapter", str(qdora)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        assert "was trained on a 4-bit nf4 base (4 layers)" in err and "pip install bitsandbytes" in err
    assert not (tmp_path / "merged").exists()
