"""Every tensor dorafit makes takes its device and dtype from its inputs.

Training and evaluation steps of every method, dropout on (both dropout modes), run with the
default device set to ``meta`` while the model lives on the CPU: a tensor created without an
explicit device would land on ``meta`` and the step would fail. torch's default-device mode does
not reach backward functions, so the mirror image runs too: the model on ``meta``, the default
device the CPU. The same steps run with bf16 and fp16 bases under float32 adapters.
"""

from __future__ import annotations

import pytest
import torch

import dorafit

METHODS = ["lora", "dora", "magnitude", "vera", "dvora"]
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
# 80 tokens, more than any adapted layer's inputs (32, 64): g on the rows of W0 in "lowrank" mode.
LONG_IDS = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))


def _model(method, dtype=torch.float32, dropout_mode="input"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    config = dorafit.AdapterConfig(method=method, rank=4, targets=["q_proj", "v_proj", "down_proj"], dropout=0.1,
                                   dropout_mode=dropout_mode, adapter_dtype="float32")
    return dorafit.attach(model, config)


def _steps(model, default_device=None, ids=IDS):
    """Two training steps (optimizer outside: torch's AdamW makes its own state tensors) and an
    evaluation forward, with ``default_device`` as torch's default device around dorafit's work."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scope = torch.device(default_device) if default_device else torch.device("cpu")
    losses = []
    for _ in range(2):
        with scope:
            model.train()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with scope, torch.no_grad():
        model.eval()
        logits = model(input_ids=ids, use_cache=False).logits
    return losses, logits


@pytest.mark.parametrize("ids", [IDS, LONG_IDS], ids=["12-tokens", "80-tokens"])
@pytest.mark.parametrize("dropout_mode", ["input", "lowrank"])
@pytest.mark.parametrize("method", METHODS)
def test_steps_with_meta_as_default_device(method, dropout_mode, ids):
    torch.manual_seed(1)
    want_losses, want_logits = _steps(_model(method, dropout_mode=dropout_mode), ids=ids)
    torch.manual_seed(1)
    losses, logits = _steps(_model(method, dropout_mode=dropout_mode), default_device="meta", ids=ids)
    assert logits.device.type == "cpu"
    torch.testing.assert_close(torch.stack(losses), torch.stack(want_losses))
    torch.testing.assert_close(logits, want_logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_steps_with_half_precision_bases_and_float32_adapters(method, dtype):
    model = _model(method, dtype)
    layer = dorafit.adapter_modules(model)[0][1]
    before = {n: getattr(layer, n).detach().clone() for n in layer.adapter_parameter_names()}
    losses, logits = _steps(model)
    assert logits.dtype == dtype and torch.isfinite(logits).all() and all(torch.isfinite(l) for l in losses)
    for name, value in before.items():
        p = getattr(layer, name)
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), value), name  # trained, in float32
    with torch.no_grad():
        x = torch.randn(3, 32).to(dtype)
        torch.testing.assert_close(layer(x).float(), layer.reference_forward(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dropout_mode", ["input", "lowrank"])
@pytest.mark.parametrize("method", METHODS)
def test_steps_of_a_model_on_meta_with_the_cpu_as_default_device(tiny_mlp, method, dropout_mode):
    """Forward and backward of a model moved to ``meta`` after attach: a CPU tensor made without
    a device (in backward too) would meet meta tensors and fail."""
    targets = ["fc1", "fc2"] if method in ("vera", "dvora") else ["embed", "conv", "fc1", "fc2"]
    model = dorafit.attach(tiny_mlp, dorafit.AdapterConfig(method=method, rank=2, targets=targets, dropout=0.1,
                                                           dropout_mode=dropout_mode)).to("meta")
    ids = torch.randint(0, 20, (2, 5)).to("meta")
    for _ in range(2):
        model.train()
        model(ids).sum().backward()
    with torch.no_grad():
        out = model.eval()(ids)
    assert out.device.type == "meta"
    layer = dorafit.adapter_modules(model)[-1][1]
    assert all(getattr(layer, n).grad.device.type == "meta" for n in layer.adapter_parameter_names())
