"""Tiny model and adapter folders for the command-line tests (built here, no hub)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import dorafit

ARC = Path(__file__).resolve().parents[2] / "dorafit" / "data" / "ARC-Easy"


def word_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def hashes(*paths) -> dict:
    """{path: sha256} of every file under the given folders and files."""
    out = {}
    for root in map(Path, paths):
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 64) with a word-level tokenizer over the ARC-Easy rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model")
    rows = json.loads((ARC / "train.json").read_text())[:60] + json.loads((ARC / "test.json").read_text())[:20]
    tokenizer = word_tokenizer([r["instruction"] + " " + r["output"] for r in rows])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(model_folder: Path, out: Path, quantize: bool = False) -> Path:
    """A dorafit DoRA adapter on q_proj/v_proj with non-zero B (optionally on a 4-bit NF4 base)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_folder)
    if quantize:
        from dorafit import quant

        quant.quantize_model(model, ["q_proj", "v_proj"], "nf4", compute_dtype=torch.float32)
    dorafit.attach(model, dorafit.AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.normal_(0, 0.2)
    dorafit.save_adapter(model, out)
    (out / "task.json").write_text(json.dumps({"task": "ARC-Easy", "model_kind": "causal-lm", "labels": None,
                                               "max_length": 64}))
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "adapter")
