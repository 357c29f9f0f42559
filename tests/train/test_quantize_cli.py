"""`dorafit train --quantize nf4` (QDoRA through the command line) on a tiny LLaMA."""

from __future__ import annotations

import json

import pytest
import torch

import dorafit
from dorafit.cli import main

pytest.importorskip("bitsandbytes")


def test_qdora_train_then_adapter_loads_on_the_full_precision_base(tiny_llama, arc_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_llama), "--data-dir", str(arc_files["dir"]), "--output", str(out),
            "--val-size", "16", "--batch-size", "8", "--epochs", "1", "--max-length", "160", "--lr", "1e-2",
            "--max-new-tokens", "4", "--no-eval-before", "--no-progress", "--threads", "1", "--quantize", "nf4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4-bit nf4" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(l == l for l in losses)  # finite training on the 4-bit base
    from dorafit.io import adapter_record, recorded_quantization

    cfg = adapter_record(out / "adapter")
    assert cfg["config"]["method"] == "dora"
    assert {r["quant_type"] for r in recorded_quantization(out / "adapter").values()} == {"nf4"}
    # The adapter trained on the 4-bit base loads onto the plain base (QLoRA-style serving).
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dorafit.load_adapter(base, out / "adapter")
    assert dorafit.adapter_modules(base)
    assert any(a.lora_b.abs().sum() > 0 for _, a in dorafit.adapter_modules(base))


def test_unknown_quantization_is_refused(tiny_llama, arc_files, tmp_path, capsys):
    argv = ["train", "--model", str(tiny_llama), "--data-dir", str(arc_files["dir"]),
            "--output", str(tmp_path / "run"), "--quantize", "int3", "--no-progress"]
    assert main(argv) == 2
    assert "quantize" in capsys.readouterr().err
