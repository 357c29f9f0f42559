"""Deferred initialisation: attach on a base on ``meta``, then ``dorafit.materialize`` once the
base is loaded, gives the adapter an ordinary attach gives under the same seed, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dorafit
from dorafit import sharding


def _models():
    """name -> (a builder of the model, targets, input)."""
    return {
        "linear": (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6, bias=False)), ["0", "2"],
                   torch.randn(5, 12)),
        "conv": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), ["0", "2"],
                 torch.randn(2, 3, 7, 7)),
        "embedding": (lambda: nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8)), ["0", "1"],
                      torch.randint(0, 20, (3, 5))),
    }


def _on_meta(build):
    with torch.device("meta"):
        return build()


def _load(model, values: nn.Module) -> None:
    """``to_empty`` and the base's values by the keys of the plain model."""
    model.to_empty(device="cpu")
    own = model.state_dict()
    renamed = {}
    for key, value in values.state_dict().items():
        module, _, leaf = key.rpartition(".")
        renamed[f"{module}.base.{leaf}" if f"{module}.base.{leaf}" in own else key] = value
    missing = model.load_state_dict(renamed, strict=False).missing_keys
    assert all(k.rsplit(".", 1)[1] in ("lora_a", "lora_b", "magnitude", "vera_d", "vera_b") for k in missing), missing


@pytest.mark.parametrize("method", ["dora", "lora", "magnitude", "dvora", "vera"])
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_materialize_equals_an_eager_attach_bit_for_bit(kind, method):
    build, targets, x = _models()[kind]
    if method in ("vera", "dvora") and kind != "linear":
        pytest.skip("VeRA adapts linear layers only")
    config = dorafit.AdapterConfig(method=method, rank=3, alpha=6, targets=targets)
    torch.manual_seed(0)
    values = build()
    eager = build()
    eager.load_state_dict(values.state_dict())
    torch.manual_seed(7)
    dorafit.attach(eager, config)

    lazy = _on_meta(build)
    torch.manual_seed(7)
    dorafit.attach(lazy, config)
    assert all(t.is_meta for n, t in lazy.named_parameters())  # nothing real before the load
    state = torch.get_rng_state()
    _load(lazy, values)
    assert dorafit.materialize(lazy) is lazy
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    ours, theirs = lazy.state_dict(), eager.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    for layer in (m for m in lazy.modules() if isinstance(m, dorafit.AdapterLayer)):
        if hasattr(layer, "vera_shared"):
            assert torch.equal(layer.vera_shared.a, eager.get_submodule("0").vera_shared.a)
    with torch.no_grad():
        assert torch.equal(lazy(x), eager(x))
        torch.testing.assert_close(lazy(x), values(x), rtol=1e-5, atol=1e-6)  # B = 0: the base at step 0


def test_a_llama_built_on_meta_and_loaded_from_its_files(tmp_path):
    """from_config on meta, attach, to_empty, dorafit.sharding.load_base, materialize: every
    adapter tensor and the logits equal from_pretrained plus attach under the same seed."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    config = dorafit.AdapterConfig(method="dora", rank=4, alpha=8, targets="all-linear")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.manual_seed(3)
    dorafit.attach(eager, config)
    with init_empty_weights(include_buffers=False):
        lazy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    torch.manual_seed(3)
    dorafit.attach(lazy, config)
    sharding.allocate(lazy, "cpu")
    sharding.load_base(lazy, tmp_path)
    dorafit.materialize(lazy)
    theirs = dorafit.adapter_state_dict(eager)
    ours = dorafit.adapter_state_dict(lazy)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 3
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(lazy(input_ids=ids).logits, eager(input_ids=ids).logits)


def test_a_forward_before_materialize_names_it():
    model = _on_meta(lambda: nn.Sequential(nn.Linear(4, 4)))
    dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["0"]))
    model.to_empty(device="cpu")
    with pytest.raises(dorafit.AdapterError, match=r"dorafit\.materialize\(model\)"):
        model(torch.randn(1, 4))


def test_materialize_names_the_module_whose_base_is_still_on_meta():
    model = _on_meta(lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["0", "1"]))
    model[0].base.to_empty(device="cpu")  # only the first base is loaded
    with pytest.raises(dorafit.AdapterError, match=r"module '1': its base weight is still on the meta device"):
        dorafit.materialize(model)


def test_materialize_allocates_adapter_tensors_left_on_meta_and_checks_the_base():
    """Only the base given real values (load_state_dict(assign=True)): the adapter's own tensors
    are made on the base's device. A base holding NaN is named, as attach names it."""
    plain = nn.Sequential(nn.Linear(4, 5))
    model = _on_meta(lambda: nn.Sequential(nn.Linear(4, 5)))
    dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["0"]))
    model[0].base.load_state_dict(plain[0].state_dict(), assign=True)
    dorafit.materialize(model)
    assert model[0].lora_a.device.type == "cpu" and model[0].lora_a.requires_grad
    torch.testing.assert_close(model[0].magnitude, plain[0].weight.norm(dim=1))
    dorafit.materialize(model)  # nothing pending: nothing changes

    bad = _on_meta(lambda: nn.Sequential(nn.Linear(4, 5)))
    dorafit.attach(bad, dorafit.AdapterConfig(rank=2, targets=["0"]))
    weights = plain[0].state_dict()
    weights["weight"] = weights["weight"].clone().fill_(float("nan"))
    bad[0].base.load_state_dict(weights, assign=True)
    with pytest.raises(dorafit.AdapterError, match="NaN or inf values in 0"):
        dorafit.materialize(bad)
