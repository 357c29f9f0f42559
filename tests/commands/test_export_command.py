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
