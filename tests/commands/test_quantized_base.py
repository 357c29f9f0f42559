"""A QDoRA adapter (trained on a 4-bit base) meets the base quantized the same way, as the adapter
records, in every command that loads its base (eval, merge, export, convert: ``dorafit.loading``);
without bitsandbytes they refuse with a message saying how."""

from __future__ import annotations

import json
import warnings

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


def _qdora_update(tiny_model, qdora, quantized=True):
    """{module: W' − W0} of the adapter on the 4-bit base it was trained on (W0 dequantized), or
    with ``quantized=False`` on the full-precision base."""
    import torch
    from transformers import LlamaForCausalLM

    import dorafit
    from dorafit import quant

    trained = LlamaForCausalLM.from_pretrained(tiny_model)
    if quantized:
        quant.quantize_model(trained, ["q_proj", "v_proj"], "nf4", compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the full-precision base is the mistake shown here on purpose
        dorafit.load_adapter(trained, qdora)
    with torch.no_grad():
        return {name: (a.merged_weight_2d() - a.base_weight_2d().float()).double()
                for name, a in dorafit.adapter_modules(trained)}


def test_export_of_a_qdora_adapter_is_taken_against_the_4bit_base(tiny_model, tmp_path, capsys):
    """The exported LoRA is W' − W0 of the trained model: W0 the dequantized 4-bit weight, not the
    full-precision one (which differs by the quantization error in every row)."""
    pytest.importorskip("bitsandbytes")
    import torch
    from safetensors.torch import load_file

    qdora = make_adapter(tiny_model, tmp_path / "qdora", quantize=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["export", str(qdora), "--model", str(tiny_model), "--rank", "64", "--out", str(tmp_path / "lora"),
                     "--prompt", "which gas do plants take in"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "quantized 4 base layers to 4-bit nf4 as the adapter was trained" in err
    assert not [w for w in caught if "full precision" in str(w.message)]
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    want, full = _qdora_update(tiny_model, qdora), _qdora_update(tiny_model, qdora, quantized=False)
    assert len(want) == 4
    for name, delta in want.items():
        key = f"base_model.model.{name}"
        got = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()  # scaling 1
        assert torch.allclose(got, delta, atol=1e-5), name
        # Against the full-precision base the update differs by far more than that tolerance.
        assert (got - full[name]).abs().max() > 1e-3, name


def test_convert_of_a_qdora_adapter_loads_it_on_the_4bit_base(tiny_model, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    qdora = make_adapter(tiny_model, tmp_path / "qdora", quantize=True)
    code = main(["convert", str(qdora), str(tmp_path / "peft"), "--to", "peft", "--model", str(tiny_model)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "quantized 4 base layers to 4-bit nf4 as the adapter was trained" in err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
