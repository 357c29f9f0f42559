"""Merging an adapted weight that is tied to another module (GPT-2's wte and lm_head)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import dorafit


def test_merge_unties_and_the_saved_checkpoint_reloads_the_adapted_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    dorafit.attach(model, dorafit.AdapterConfig(targets=["wte", "c_attn"], rank=4))
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.normal_(0, 0.1)
    ids = torch.randint(0, 100, (2, 7))
    adapted = model(ids).logits
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        dorafit.merge(model)
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_scaled_embedding_adapter_matches_its_merged_table():
    class ScaledEmbedding(torch.nn.Embedding):
        def __init__(self, *args, embed_scale=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("emb", ScaledEmbedding(30, 8, embed_scale=8.0**0.5))
    dorafit.attach(model, dorafit.AdapterConfig(targets=["emb"], rank=2))
    with torch.no_grad():
        model.emb.lora_b.normal_()
    ids = torch.randint(0, 30, (3, 5))
    adapted = model(ids)
    torch.testing.assert_close(model.emb.reference_forward(ids), adapted, rtol=1e-5, atol=1e-5)
    dorafit.merge(model)
    torch.testing.assert_close(model(ids), adapted, rtol=1e-5, atol=1e-5)
