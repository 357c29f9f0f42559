"""Adapted models as Python objects: casts keep float32 masters, and pickling, ``torch.save`` of
the whole model and ``copy.deepcopy`` give a model that computes the same outputs, with caches
of its own.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import dorafit
from dorafit.layers.cache import OPTIMIZER_STEPS

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _adapted(method="dora", **kw):
    model = dorafit.attach(tiny_llama(), dorafit.AdapterConfig(method=method, rank=4, targets=TARGETS, **kw))
    with torch.no_grad():
        for _, layer in dorafit.adapter_modules(model):
            for name in layer.adapter_parameter_names():
                getattr(layer, name).add_(0.02 * torch.randn(getattr(layer, name).shape))
    return model


def _train(model, steps, lr=1e-4):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model.train()
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------
# Casts after attach


@pytest.mark.parametrize("cast", ["to-bf16", "half"])
def test_casting_the_model_keeps_float32_adapter_masters_that_train(cast):
    """``model.to(torch.bfloat16)`` after attach casts the base only: a bf16 magnitude moved by
    AdamW at lr 1e-4 would round back to itself every step (TRL#7268)."""
    model = _adapted()
    model = model.to(torch.bfloat16) if cast == "to-bf16" else model.half()
    low = torch.bfloat16 if cast == "to-bf16" else torch.float16
    layers = [layer for _, layer in dorafit.adapter_modules(model)]
    assert all(layer.base.weight.dtype == low for layer in layers)
    assert all(getattr(layer, n).dtype == torch.float32 for layer in layers for n in layer.adapter_parameter_names())
    before = [layer.magnitude.detach().clone() for layer in layers]
    _train(model, 5)
    moved = [not torch.equal(b, layer.magnitude.detach()) for b, layer in zip(before, layers)]
    assert all(moved), moved
    assert all(layer.magnitude.dtype == torch.float32 for layer in layers)
    with torch.no_grad():
        layer = layers[0]
        x = torch.randn(3, 32).to(low)
        torch.testing.assert_close(layer(x).float(), layer.reference_forward(x).float(), rtol=2e-2, atol=2e-2)


def test_adapters_made_in_the_base_dtype_follow_casts_and_float64_casts_apply():
    model = _adapted(adapter_dtype="base").to(torch.bfloat16)
    layer = dorafit.adapter_modules(model)[0][1]
    assert layer.magnitude.dtype == layer.lora_a.dtype == torch.bfloat16
    model = _adapted().double()
    layer = dorafit.adapter_modules(model)[0][1]
    assert layer.magnitude.dtype == layer.base.weight.dtype == torch.float64


def test_a_cast_keeps_gradients_float32_too():
    model = _adapted()
    model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
    model.to(torch.bfloat16)
    layer = dorafit.adapter_modules(model)[0][1]
    assert layer.magnitude.grad.dtype == torch.float32 and layer.lora_b.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# pickle, torch.save(model), copy.deepcopy


def _round_trips():
    def saved(model):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    return {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": saved, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", list(_round_trips()))
@pytest.mark.parametrize("method", ["dora", "dvora", "magnitude"])
def test_copies_compute_the_same_outputs_with_caches_of_their_own(how, method):
    model = _adapted(method)
    _train(model, 2)  # caches filled, optimizer steps counted
    with torch.no_grad():
        want = model.eval()(input_ids=IDS).logits
    twin = _round_trips()[how](model)
    pairs = list(zip(dorafit.adapter_modules(model), dorafit.adapter_modules(twin)))
    for (_, layer), (_, copy_layer) in pairs:
        cache = copy_layer.norm_cache
        assert cache is not layer.norm_cache and cache.norm_entry is None and cache.w0 is None and not cache.compiled_fresh
        assert cache in OPTIMIZER_STEPS._caches  # watched: optimizer steps reach the copy's cache
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(input_ids=IDS).logits, want)
    _train(twin, 2)  # the copy trains on its own; the original is unchanged
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=IDS).logits, want)
        for _, copy_layer in dorafit.adapter_modules(twin):
            x = torch.randn(3, copy_layer.base.in_features)
            torch.testing.assert_close(copy_layer(x), copy_layer.reference_forward(x), rtol=1e-5, atol=1e-5)


def test_save_pretrained_of_an_unpickled_model_writes_the_adapter(tmp_path):
    twin = pickle.loads(pickle.dumps(_adapted()))
    twin.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
