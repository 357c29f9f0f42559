"""Several named adapters on one model, and disable_adapter (dorafit.adapters)."""

from __future__ import annotations

import pytest
import torch

import dorafit
from dorafit import AdapterConfig, AdapterError

from conftest import TinyMLP, randomize_adapter


def _ids():
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))


def _randomized(model, seed):
    for i, (_, a) in enumerate(dorafit.adapter_modules(model)):
        randomize_adapter(a, seed=seed + i)
    return model


def _single(config, seed):
    """The reference: a fresh model with one adapter whose weights are drawn like the named one's."""
    torch.manual_seed(0)
    return _randomized(dorafit.attach(TinyMLP(), config), seed)


MATH = AdapterConfig(rank=4, targets=["fc1", "fc2"])
CODE = AdapterConfig(rank=2, method="lora", targets=["fc1", "conv", "embed"], modules_to_save=["head"])


@pytest.fixture
def two():
    torch.manual_seed(0)
    model = _randomized(dorafit.attach(TinyMLP(), MATH, name="math"), 10)
    dorafit.attach(model, CODE, name="code")
    dorafit.set_adapter(model, "code")
    _randomized(model, 20)
    with torch.no_grad():
        model.head.trainable.weight.add_(0.3)
    dorafit.set_adapter(model, "math")
    return model


def test_second_attach_is_inactive_and_switching_gives_each_adapters_outputs(two):
    x = _ids()
    math_ref, code_ref = _single(MATH, 10), _single(CODE, 20)
    with torch.no_grad():
        code_ref.head.trainable.weight.add_(0.3)
    assert dorafit.list_adapters(two) == ["math", "code"]
    assert dorafit.active_adapter(two) == "math"
    assert torch.equal(two(x), math_ref(x))
    dorafit.set_adapter(two, "code")
    assert torch.equal(two(x), code_ref(x))
    dorafit.set_adapter(two, "math")
    assert torch.equal(two(x), math_ref(x))


def test_only_the_active_adapter_is_in_the_module_tree(two):
    names = {n for n, p in two.named_parameters() if p.requires_grad}
    assert names == {f"{m}.{p}" for m in ("fc1", "fc2") for p in ("lora_a", "lora_b", "magnitude")}
    dorafit.set_adapter(two, "code")
    names = {n for n, p in two.named_parameters() if p.requires_grad}
    assert "fc2.lora_a" not in names and "conv.lora_a" in names and "head.trainable.weight" in names
    assert set(dorafit.adapter_state_dict(two)) == set(dorafit.adapter_state_dict(_single(CODE, 20)))


def test_same_name_twice_raises_and_unknown_names_are_named(two):
    with pytest.raises(AdapterError, match="already has dorafit adapters named 'math'"):
        dorafit.attach(two, MATH, name="math")
    with pytest.raises(AdapterError, match=r"no adapter named 'nope' \(it has: \['math', 'code'\]\)"):
        dorafit.set_adapter(two, "nope")


def test_failed_second_attach_leaves_the_model_as_it_was(two):
    x = _ids()
    before = two(x)
    with pytest.raises(dorafit.ConfigError):
        dorafit.attach(two, AdapterConfig(targets=["no_such_layer"]), name="bad")
    assert dorafit.list_adapters(two) == ["math", "code"] and dorafit.active_adapter(two) == "math"
    assert torch.equal(two(x), before)


def test_delete_adapter(two):
    x = _ids()
    dorafit.set_adapter(two, "code")
    dorafit.delete_adapter(two, "code")  # the active one: the first remaining takes over
    assert dorafit.list_adapters(two) == ["math"] and dorafit.active_adapter(two) == "math"
    assert torch.equal(two(x), _single(MATH, 10)(x))
    dorafit.delete_adapter(two, "math")  # the last one: the plain base model is back
    torch.manual_seed(0)
    assert torch.equal(two(x), TinyMLP()(x))
    assert not dorafit.adapter_modules(two) and dorafit.list_adapters(two) == []
    assert all(p.requires_grad for p in two.parameters())  # as before the first attach


def test_detach_removes_every_named_adapter(two):
    dorafit.detach(two)
    torch.manual_seed(0)
    plain = TinyMLP()
    assert dorafit.list_adapters(two) == [] and not dorafit.adapter_modules(two)
    assert all(torch.equal(a, b) for a, b in zip(two.state_dict().values(), plain.state_dict().values()))


def test_load_adapter_by_name_and_for_inference(two, tmp_path):
    x = _ids()
    dorafit.set_adapter(two, "code")
    dorafit.save_adapter(two, tmp_path / "code")
    code_out = two(x)
    torch.manual_seed(0)
    model = dorafit.attach(TinyMLP(), MATH, name="math")
    dorafit.load_adapter(model, tmp_path / "code", name="code2", trainable=False)
    assert dorafit.list_adapters(model) == ["math", "code2"] and dorafit.active_adapter(model) == "math"
    dorafit.set_adapter(model, "code2")
    # (frozen parameters take the no-autograd path: equal up to float rounding)
    torch.testing.assert_close(model(x), code_out, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # inference only
    dorafit.set_adapter(model, "math")
    assert any(p.requires_grad for p in model.parameters())
    with pytest.raises(AdapterError, match="named 'code2' already"):
        dorafit.load_adapter(model, tmp_path / "code", name="code2")
    fresh = dorafit.load_adapter(TinyMLP(), tmp_path / "code", name="only", trainable=False)
    assert dorafit.list_adapters(fresh) == ["only"] and not any(p.requires_grad for p in fresh.parameters())


def test_disable_adapter_gives_the_base_outputs_exactly_and_copies_nothing(two):
    x = _ids()
    torch.manual_seed(0)
    base_out = TinyMLP()(x)
    for name in ("math", "code"):
        dorafit.set_adapter(two, name)
        adapted = two(x)
        pointers = {k: v.data_ptr() for k, v in two.state_dict().items()}
        with dorafit.disable_adapter(two):
            assert torch.equal(two(x), base_out)
            assert {k: v.data_ptr() for k, v in two.state_dict().items()} == pointers
        assert torch.equal(two(x), adapted)


def test_disable_adapter_is_undone_on_error(two):
    x = _ids()
    adapted = two(x)
    with pytest.raises(RuntimeError):
        with dorafit.disable_adapter(two):
            raise RuntimeError("inside")
    assert torch.equal(two(x), adapted)


def test_dpo_reference_log_probs_from_disable_adapter():
    """DPO's loss with the reference log-probabilities taken from the same model with its adapter
    disabled equals the loss with a separate frozen copy of the base, and trains only the adapter."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    reference = TinyMLP()
    torch.manual_seed(0)
    policy = _randomized(dorafit.attach(TinyMLP(), MATH), 3)
    chosen, rejected = _ids(), _ids().flip(0)
    label_c, label_r = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])

    def logp(model, ids, labels):
        return torch.log_softmax(model(ids), dim=-1).gather(1, labels[:, None]).squeeze(1)

    def dpo_loss(ref_c, ref_r, beta=0.1):
        margin = (logp(policy, chosen, label_c) - ref_c) - (logp(policy, rejected, label_r) - ref_r)
        return -F.logsigmoid(beta * margin).mean()

    with torch.no_grad(), dorafit.disable_adapter(policy):
        ref_c, ref_r = logp(policy, chosen, label_c), logp(policy, rejected, label_r)
    with torch.no_grad():
        want_c, want_r = logp(reference, chosen, label_c), logp(reference, rejected, label_r)
    assert torch.equal(ref_c, want_c) and torch.equal(ref_r, want_r)
    loss = dpo_loss(ref_c, ref_r)
    assert torch.equal(loss, dpo_loss(want_c, want_r))
    loss.backward()
    grads = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert grads == {f"{m}.{p}" for m in ("fc1", "fc2") for p in ("lora_a", "lora_b", "magnitude")}
