"""Magnitude-only DoRA (W' = m ⊙ W0 / ‖W0‖, m trains alone) and per-module methods
(``method_pattern``), as the official recipe that adapts q, k, v with DoRA and the MLP with
magnitudes only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dorafit


def magnitude_weight(w0_2d, magnitude):
    """m ⊙ W0 / ‖W0‖ per output feature (row)."""
    return magnitude.unsqueeze(1) * w0_2d / w0_2d.pow(2).sum(dim=1, keepdim=True).sqrt()


def test_linear_output_and_gradient_match_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    base = copy.deepcopy(model)
    dorafit.attach(model, dorafit.AdapterConfig(method="magnitude", targets=["0", "2"]))
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), base(x))  # m = ‖W0‖ at init
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.magnitude", "2.magnitude"]
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.magnitude.mul_(1 + 0.5 * torch.rand(layer.magnitude.shape))
    m0 = model[0].magnitude.detach().clone().requires_grad_(True)
    m2 = model[2].magnitude.detach().clone().requires_grad_(True)

    y = model(x)
    y.pow(2).sum().backward()
    h = torch.tanh(F.linear(x, magnitude_weight(base[0].weight, m0), base[0].bias))
    y_ref = F.linear(h, magnitude_weight(base[2].weight, m2), base[2].bias)
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].magnitude.grad, m0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[2].magnitude.grad, m2.grad, rtol=1e-5, atol=1e-6)


def test_norm_is_constant_and_cached_across_steps():
    torch.manual_seed(0)
    model = dorafit.attach(nn.Sequential(nn.Linear(8, 8)), dorafit.AdapterConfig(method="magnitude", targets=["0"]))
    layer = model[0]
    expected = layer.base.weight.detach().pow(2).sum(dim=1).sqrt()
    opt = torch.optim.SGD([layer.magnitude], lr=0.5)
    norms = []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        norms.append(layer.weight_norm())
    assert norms[0] is norms[1] is norms[2]  # one cached tensor: m changing does not invalidate it
    torch.testing.assert_close(norms[0], expected)


@pytest.mark.parametrize("kind", ["conv2d", "embedding"])
def test_conv_and_embedding_merge_parity(kind):
    torch.manual_seed(0)
    if kind == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
        x = torch.randn(2, 3, 6, 6)
    else:
        model = nn.Sequential(nn.Embedding(30, 7))
        x = torch.randint(0, 30, (2, 5))
    base = copy.deepcopy(model)
    dorafit.attach(model, dorafit.AdapterConfig(method="magnitude", targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
        layer.magnitude.mul_(1 + torch.rand(layer.magnitude.shape))
        y = model(x)
        # Same per-output-feature rule as DoRA: conv per output channel, embedding per embedding dimension.
        w0 = base[0].weight
        if kind == "conv2d":
            ratio = layer.magnitude / w0.flatten(1).norm(dim=1)
            y_ref = F.conv2d(x, w0 * ratio.view(-1, 1, 1, 1), base[0].bias, padding=1)
        else:
            ratio = layer.magnitude / w0.norm(dim=0)
            y_ref = F.embedding(x, w0 * ratio)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        dorafit.merge(model)
        assert type(model[0]) is type(base[0])
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_method_pattern_dora_attention_magnitude_mlp(tmp_path):
    """The official recipe: DoRA on q, k, v and magnitude-only on the MLP."""
    model = tiny_llama()
    base_state = copy.deepcopy(model.state_dict())
    cfg = dorafit.AdapterConfig(
        method="dora", rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        method_pattern={r".*mlp\..*": "magnitude"},
    )
    dorafit.attach(model, cfg)
    methods = {name: a.method for name, a in dorafit.adapter_modules(model)}
    assert methods["model.layers.0.self_attn.q_proj"] == "dora"
    assert methods["model.layers.1.mlp.down_proj"] == "magnitude"
    report = dorafit.trainable_report(model)
    assert report.methods == {"dora": 6, "magnitude": 6}
    # q: (32, 32), k, v: (16, 32) with 2 kv heads; gate, up: (64, 32); down: (32, 64).
    dora = sum(4 * (i + o) + o for o, i in [(32, 32), (16, 32), (16, 32)])
    magnitude = 64 + 64 + 32
    assert report.trainable == 2 * (dora + magnitude)

    ids = torch.randint(0, 64, (2, 6))
    for _, a in dorafit.adapter_modules(model):  # non-trivial values in every trainable tensor
        with torch.no_grad():
            for name in a.adapter_parameter_names():
                p = getattr(a, name)
                if name == "magnitude":
                    p.mul_(1.1)
                else:
                    p.add_(0.05 * torch.randn(p.shape))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    dorafit.save_adapter(model, tmp_path / "adapter")

    fresh = tiny_llama()
    fresh.load_state_dict(base_state)
    dorafit.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        dorafit.merge(fresh)
        assert not dorafit.adapter_modules(fresh)
        torch.testing.assert_close(fresh(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_method_pattern_rejects_unknown_methods():
    with pytest.raises(dorafit.ConfigError, match="method_pattern"):
        dorafit.AdapterConfig(method_pattern={"mlp": "ia3"})
