"""``dorafit export ADAPTER --to lora``: end to end on a tiny LLaMA folder (dorafit.commands.export)."""

from __future__ import annotations

import json

import pytest
import torch

import dorafit
from dorafit.cli import main


@pytest.fixture
def tiny_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    model = dorafit.attach(AutoModelForCausalLM.from_pretrained(folder), dorafit.AdapterConfig(rank=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.normal_(0, 0.3)
    dorafit.save_adapter(model, tmp_path / "adapter")
    return tmp_path


def test_export_writes_a_peft_lora_and_reports(tiny_folder, capsys):
    # --model is not given: the base recorded in the adapter is used
    assert main(["export", str(tiny_folder / "adapter"), "--to", "lora", "--rank", "2", "--out", str(tiny_folder / "lora"),
                 "--prompt", "w1 w2 w3", "--prompt", "w7 w8"]) == 0
    out = capsys.readouterr().out
    assert "overall weight error" in out and "logits drift" in out and "model.layers.1.self_attn.v_proj" in out
    cfg = json.loads((tiny_folder / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is False and cfg["r"] == 2
    assert main(["export", str(tiny_folder / "adapter"), "--max-error", "0.5", "--out", str(tiny_folder / "lora"),
                 "--overwrite"]) == 0
    assert "at rank" in capsys.readouterr().out


def test_export_errors_are_one_line_and_exit_2(tiny_folder, capsys):
    assert main(["export", str(tiny_folder / "missing"), "--rank", "2", "--out", str(tiny_folder / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dorafit export: error:") and err.count("\n") == 1
    (tiny_folder / "full").mkdir()
    (tiny_folder / "full" / "keep.txt").write_text("x")
    assert main(["export", str(tiny_folder / "adapter"), "--rank", "2", "--out", str(tiny_folder / "full")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tiny_folder / "full" / "keep.txt").read_text() == "x"


def test_merge_defaults_to_the_base_the_adapter_records(tiny_folder, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["merge", "--adapter", str(tiny_folder / "adapter"), "--out", str(tiny_folder / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tiny_folder / "merged")
    assert merged.config.hidden_size == 32  # the tiny base, not the default all-MiniLM-L6-v2
    adapted = dorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_folder / "base"), tiny_folder / "adapter")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- --to gguf, --format gguf, --to dora-normalized


@pytest.fixture
def gguf_adapter(tmp_path, monkeypatch):
    """A DoRA adapter (trained-looking) on a tiny LLaMA loaded from a GGUF file; (source, adapter)."""
    pytest.importorskip("gguf")
    from gguf_cases import write_tiny_gguf

    from dorafit.train.models import load_model

    monkeypatch.setenv("DORAFIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "models" / "tiny.gguf"
    source.parent.mkdir()
    write_tiny_gguf(source)
    model, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    dorafit.attach(model, dorafit.AdapterConfig(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=gen) * 0.3)
            a.magnitude.mul_(1 + 0.2 * torch.randn(a.magnitude.shape, generator=gen))
    adapter = dorafit.save_adapter(model, tmp_path / "adapter", format="auto")
    (adapter / "task.json").write_text(json.dumps({"task": "ARC-Easy", "model_kind": "causal-lm", "labels": None}))
    return source, adapter


def test_export_to_gguf_replaces_the_adapted_tensors_of_the_source(gguf_adapter, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dorafit.train.models import load_model

    source, adapter = gguf_adapter
    out = tmp_path / "served" / "merged.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    printed = capsys.readouterr().out
    assert f"the tensors of {source} with the 10 adapted ones replaced" in printed and str(out) in printed
    model, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    dorafit.load_adapter(model, adapter)
    ids = torch.tensor([[3, 4, 5, 30, 31, 6]])
    back = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name)
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-6
    # an existing output needs --overwrite; the source file is never an output
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    before = source.read_bytes()
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(source), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dorafit export: error:") and "overlaps the base's GGUF file" in err and err.count("\n") == 1
    assert source.read_bytes() == before
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(tmp_path / "merged.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    # --overwrite replaces a GGUF file dorafit wrote, never one of the user's
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(out), "--quant", "q8_0", "--overwrite"]) == 0
    capsys.readouterr()
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(source.read_bytes())
    assert main(["export", str(adapter), "--to", "gguf", "--out", str(theirs), "--overwrite"]) == 2
    assert "not a GGUF file dorafit export wrote" in capsys.readouterr().err
    assert theirs.read_bytes() == source.read_bytes()


def test_export_lora_as_a_llama_cpp_file(gguf_adapter, tmp_path, capsys):
    import gguf

    _, adapter = gguf_adapter
    out = tmp_path / "lora.gguf"
    assert main(["export", str(adapter), "--to", "lora", "--rank", "8", "--format", "gguf", "--out", str(out)]) == 0
    assert "llama.cpp LoRA file" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["adapter.type"].contents() == "lora" and reader.fields["adapter.lora.alpha"].contents() == 8.0
    assert main(["export", str(adapter), "--to", "lora", "--out", str(tmp_path / "x")]) == 2
    assert "--to lora needs --rank R or --max-error E" in capsys.readouterr().err


def test_export_dora_normalized_and_check_another_base(gguf_adapter, tmp_path, capsys):
    from dorafit.train.models import load_model

    source, adapter = gguf_adapter
    other = tmp_path / "other"
    base, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(p.half().float())  # the base an fp16 engine serves
    base.save_pretrained(other)
    out = tmp_path / "normalized"
    assert main(["export", str(adapter), "--to", "dora-normalized", "--out", str(out), "--check", str(other)]) == 0
    printed = capsys.readouterr().out
    assert "pre-normalized DoRA" in printed and f"served on {other}" in printed
    drift = float(printed.split("‖L_tuned‖")[1].split("%")[0])
    assert 0 < drift < 1  # percent: fp16 rounding of the base moves the logits a little
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["dora_normalized"]["base_weights_dtype"] == "float32"
    model, _ = load_model(str(source), "causal-lm", trust_remote_code=False)
    tuned = dorafit.load_adapter(load_model(str(source), "causal-lm", trust_remote_code=False)[0], adapter)
    dorafit.load_adapter(model, out)
    ids = torch.tensor([[3, 4, 5, 30, 31, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tuned(ids).logits, rtol=1e-5, atol=1e-6)
