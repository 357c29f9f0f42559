"""merge / merged_weights: parity with the unmerged model, idempotence, plain module classes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorafit
from dorafit import AdapterConfig

ALL = ["embed", "conv", "fc1", "fc2", "head"]


def randomize_all(model, ref):
    for i, (_, a) in enumerate(dorafit.adapter_modules(model)):
        ref.randomize_adapter(a, scale=0.3, seed=i)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method", ["lora", "dora", "magnitude"])
def test_merge_parity_and_plain_classes(tiny_mlp, ref, method):
    classes = {n: type(m) for n, m in tiny_mlp.named_modules()}
    targets = ALL if method != "magnitude" else ["fc1", "conv", "head"]
    dorafit.attach(tiny_mlp, AdapterConfig(method=method, rank=2, targets=targets))
    if method != "magnitude":
        randomize_all(tiny_mlp, ref)
    else:
        for _, a in dorafit.adapter_modules(tiny_mlp):
            with torch.no_grad():
                a.magnitude.mul_(torch.linspace(0.5, 1.5, a.magnitude.numel()))
    ids = torch.randint(0, 20, (3, 6))
    with torch.no_grad():
        y = tiny_mlp(ids)
        weights = dorafit.merged_weights(tiny_mlp)
        assert dorafit.adapter_modules(tiny_mlp)  # merged_weights leaves the model as is
        dorafit.merge(tiny_mlp)
        y_merged = tiny_mlp(ids)
    assert rel_err(y_merged, y) <= 1e-5
    assert {n: type(m) for n, m in tiny_mlp.named_modules()} == classes
    for key, w in weights.items():
        assert torch.equal(tiny_mlp.get_submodule(key.rsplit(".", 1)[0]).weight, w), key
    assert not any(p.requires_grad for p in tiny_mlp.parameters())
    assert not hasattr(tiny_mlp, "dorafit_config")


def test_merge_is_idempotent(tiny_mlp, ref):
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=ALL))
    randomize_all(tiny_mlp, ref)
    ids = torch.randint(0, 20, (3, 6))
    dorafit.merge(tiny_mlp)
    state = copy.deepcopy(tiny_mlp.state_dict())
    out = dorafit.merge(tiny_mlp)
    assert out is tiny_mlp
    after = tiny_mlp.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(tiny_mlp(ids), tiny_mlp(ids))


def test_merged_rows_have_magnitude_norm(ref):
    model = nn.Sequential(nn.Linear(10, 7))
    dorafit.attach(model, AdapterConfig(rank=3, targets=["0"]))
    layer = ref.randomize_adapter(model[0])
    m = layer.magnitude.detach().clone()
    dorafit.merge(model)
    torch.testing.assert_close(torch.linalg.vector_norm(model[0].weight, dim=1), m, rtol=1e-5, atol=1e-6)


def test_merge_keeps_bias_and_is_not_tied_to_adapter(ref):
    model = nn.Sequential(nn.Linear(10, 7))
    bias = model[0].bias.detach().clone()
    dorafit.attach(model, AdapterConfig(rank=3, targets=["0"]))
    ref.randomize_adapter(model[0])
    dorafit.merge(model)
    assert torch.equal(model[0].bias, bias)
    assert type(model[0]) is nn.Linear


def test_merge_modules_to_save(tiny_mlp):
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1"], modules_to_save=["head"]))
    with torch.no_grad():
        tiny_mlp.head.trainable.bias.add_(3.0)
    ids = torch.randint(0, 20, (2, 4))
    with torch.no_grad():
        y = tiny_mlp(ids)
    dorafit.merge(tiny_mlp)
    assert type(tiny_mlp.head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(tiny_mlp(ids), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_half_precision_base(ref, dtype):
    model = nn.Sequential(nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8)).to(dtype)
    dorafit.attach(model, AdapterConfig(rank=4, targets=["0", "2"]))
    randomize_all(model, ref)
    x = torch.randn(5, 32).to(dtype)
    with torch.no_grad():
        y = model(x)
        dorafit.merge(model)
        y_merged = model(x)
    assert model[0].weight.dtype == dtype
    assert rel_err(y_merged, y) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
