"""attach / detach / trainable_report on plain nn.Module trees; item-7 errors before any change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dorafit
from dorafit import AdapterConfig, AdapterError, ConfigError
from dorafit.layers import ConvAdapter, EmbeddingAdapter, LinearAdapter


def snapshot(model):
    """Everything attach may change: module classes, parameter values and requires_grad."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_untouched(model, snap):
    mods, params = snapshot(model)
    assert mods == snap[0]
    assert params.keys() == snap[1].keys()
    for n, (v, rg) in params.items():
        assert torch.equal(v, snap[1][n][0]), n
        assert rg == snap[1][n][1], f"{n}.requires_grad changed by a failed attach"


ALL = ["embed", "conv", "fc1", "fc2", "head"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_attach_all_layer_types_step0_and_gradients(tiny_mlp, method):
    ids = torch.randint(0, 20, (2, 5))
    before = tiny_mlp(ids).detach()
    dorafit.attach(tiny_mlp, AdapterConfig(method=method, rank=2, targets=ALL))
    assert isinstance(tiny_mlp.embed, EmbeddingAdapter)
    assert isinstance(tiny_mlp.conv, ConvAdapter)
    assert isinstance(tiny_mlp.fc1, LinearAdapter) and isinstance(tiny_mlp.head, LinearAdapter)
    torch.testing.assert_close(tiny_mlp(ids), before, rtol=1e-6, atol=1e-6)  # step-0 identity
    # only adapter parameters are trainable, and all of them get gradients (B = 0 at step 0:
    # A's gradient is zero, but it exists)
    trainable = {n for n, p in tiny_mlp.named_parameters() if p.requires_grad}
    wanted = {f"{m}.{p}" for m in ALL for p in (["lora_a", "lora_b"] + (["magnitude"] if method == "dora" else []))}
    assert trainable == wanted
    tiny_mlp(ids).pow(2).sum().backward()
    for n, p in tiny_mlp.named_parameters():
        if n in wanted:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in tiny_mlp.named_parameters() if n.endswith("lora_b"))


def test_trainable_report(tiny_mlp):
    total = sum(p.numel() for p in tiny_mlp.parameters())
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1", "fc2"]))
    rep = dorafit.trainable_report(tiny_mlp)
    assert rep.modules == ["fc1", "fc2"]
    want = (2 * 12 + 16 * 2 + 16) + (2 * 16 + 12 * 2 + 12)
    assert rep.trainable == want
    assert rep.total == total + want
    assert rep.percent == pytest.approx(100 * want / (total + want))
    assert "trainable params" in str(rep) and f"{want:,}" in str(rep)
    names = [n for n, _ in dorafit.adapter_modules(tiny_mlp)]
    assert names == ["fc1", "fc2"]
    sd = dorafit.adapter_state_dict(tiny_mlp)
    assert sorted(sd) == sorted(f"{m}.{p}" for m in names for p in ("lora_a", "lora_b", "magnitude"))



def test_trainable_report_counts_4bit_weights_unpacked():
    """A Linear4bit weight holds two 4-bit codes per uint8 element: count (out, in), not numel()."""
    pytest.importorskip("bitsandbytes")
    from dorafit import quant

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64, bias=False))
    plain_total = sum(p.numel() for p in model.parameters())  # 64*96 + 96 + 96*64
    assert quant.quantize_model(model, ["0", "2"], "nf4") == ["0", "2"]
    packed = model[0].weight
    assert packed.numel() == 64 * 96 // 2  # the packing the count must undo
    dorafit.attach(model, AdapterConfig(rank=4, targets=["0", "2"]))
    rep = dorafit.trainable_report(model)
    want = (4 * 64 + 96 * 4 + 96) + (4 * 96 + 64 * 4 + 64)
    assert rep.trainable == want
    assert rep.total == plain_total + want

def test_targets_regex_suffix_and_exclude(tiny_mlp):
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=[r"fc\d"], exclude=["fc2"]))
    assert [n for n, _ in dorafit.adapter_modules(tiny_mlp)] == ["fc1"]


def test_all_linear_on_plain_module(tiny_mlp):
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["all-linear"]))
    # "head" is not an output embedding head here (no get_output_embeddings), so it is adapted
    assert [n for n, _ in dorafit.adapter_modules(tiny_mlp)] == ["fc1", "fc2", "head"]


def test_rank_and_alpha_patterns(tiny_mlp):
    cfg = AdapterConfig(rank=4, alpha=8, targets=["fc1", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 1.0})
    dorafit.attach(tiny_mlp, cfg)
    assert tiny_mlp.fc1.rank == 4 and tiny_mlp.fc1.scaling == pytest.approx(2.0)
    assert tiny_mlp.fc2.rank == 2 and tiny_mlp.fc2.scaling == pytest.approx(0.5)
    assert tiny_mlp.fc2.lora_a.shape == (2, 16)


def test_method_pattern_magnitude_only(tiny_mlp):
    cfg = AdapterConfig(rank=2, targets=["fc1", "fc2"], method_pattern={"fc2": "magnitude"})
    dorafit.attach(tiny_mlp, cfg)
    assert tiny_mlp.fc2.method == "magnitude" and tiny_mlp.fc2.lora_a is None
    assert tiny_mlp.fc2.adapter_parameter_names() == ["magnitude"]
    x = torch.randn(3, 16)
    with torch.no_grad():
        tiny_mlp.fc2.magnitude.mul_(1.5)
    torch.testing.assert_close(tiny_mlp.fc2(x), 1.5 * (x @ tiny_mlp.fc2.base.weight.t()), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Item 7: errors before any module is touched


def test_targets_matching_nothing_lists_modules(tiny_mlp):
    snap = snapshot(tiny_mlp)
    with pytest.raises(ConfigError, match=r"match no module.*embed.*conv.*fc1.*fc2.*head"):
        dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["q_proj"]))
    assert_untouched(tiny_mlp, snap)


def test_unsupported_target_type_is_named(tiny_mlp):
    snap = snapshot(tiny_mlp)
    with pytest.raises(AdapterError, match=r"'act' is a GELU, which dorafit cannot adapt \(supported: .*Linear"):
        dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["act"]))
    assert_untouched(tiny_mlp, snap)


def test_rank_too_large_names_module_and_shape():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))
    with pytest.raises(AdapterError, match=r"module '1': rank 4 is larger than the layer allows: weight \(out, in\) = \(3, 16\)"):
        dorafit.attach(model, AdapterConfig(rank=4, targets=["0", "1"]))
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


@pytest.mark.parametrize(
    "cfg",
    [
        AdapterConfig(rank=4, targets=["fc1", "head"]),  # head (3, 12): rank 4 too large
        AdapterConfig(rank=2, targets=["fc1", "act"]),  # GELU after a valid target
        AdapterConfig(rank=2, targets=["fc1"], modules_to_save=["nothing_like_this"]),
    ],
    ids=["rank", "unsupported-type", "modules_to_save"],
)
def test_failed_attach_leaves_model_untouched(tiny_mlp, cfg):
    snap = snapshot(tiny_mlp)
    with pytest.raises((AdapterError, ConfigError)):
        dorafit.attach(tiny_mlp, cfg)
    assert_untouched(tiny_mlp, snap)


def test_attach_twice_raises(tiny_mlp):
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1"]))
    snap = snapshot(tiny_mlp)
    with pytest.raises(AdapterError, match=r"already has dorafit adapters.*fc1"):
        dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc2"]))
    assert_untouched(tiny_mlp, snap)


def test_attach_rejects_non_config(tiny_mlp):
    with pytest.raises(TypeError, match="AdapterConfig"):
        dorafit.attach(tiny_mlp, {"rank": 2})


def test_meta_device_base_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(AdapterError, match=r"module '0'.*meta device"):
        dorafit.attach(model, AdapterConfig(rank=2, targets=["0"]))


# ------------------------------------------------------------------------------------------
# detach and modules_to_save


def test_detach_restores_exact_original(tiny_mlp):
    originals = {n: m for n, m in tiny_mlp.named_modules()}
    weights = {n: p.detach().clone() for n, p in tiny_mlp.named_parameters()}
    ids = torch.randint(0, 20, (2, 5))
    before = tiny_mlp(ids).detach()
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=ALL, modules_to_save=[]))
    for _, a in dorafit.adapter_modules(tiny_mlp):
        with torch.no_grad():
            a.lora_b.normal_()
    opt = torch.optim.SGD([p for p in tiny_mlp.parameters() if p.requires_grad], lr=0.1)
    tiny_mlp(ids).pow(2).sum().backward()
    opt.step()
    dorafit.detach(tiny_mlp)
    assert not dorafit.adapter_modules(tiny_mlp)
    for n, m in tiny_mlp.named_modules():
        assert m is originals[n], n  # the very same module objects
    for n, p in tiny_mlp.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert torch.equal(tiny_mlp(ids), before)
    assert not hasattr(tiny_mlp, "dorafit_config")


def test_modules_to_save(tiny_mlp):
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1"], modules_to_save=["head"]))
    trainable = {n for n, p in tiny_mlp.named_parameters() if p.requires_grad}
    assert {"head.trainable.weight", "head.trainable.bias"} <= trainable
    assert "head.original.weight" not in trainable
    with torch.no_grad():
        tiny_mlp.head.trainable.weight.add_(1.0)
    sd = dorafit.adapter_state_dict(tiny_mlp)
    assert "head.trainable.weight" in sd
    original_head = tiny_mlp.head.original
    dorafit.detach(tiny_mlp)
    assert tiny_mlp.head is original_head


def test_attach_model_deepcopy_independent(tiny_mlp):
    """attach works in place and returns the model; a deep copy made before stays plain."""
    plain = copy.deepcopy(tiny_mlp)
    out = dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1"]))
    assert out is tiny_mlp
    assert not dorafit.adapter_modules(plain)


def test_attach_again_after_merge_and_after_detach(tiny_mlp, ref):
    ids = torch.randint(0, 20, (2, 5))
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1"]))
    ref.randomize_adapter(tiny_mlp.fc1)
    dorafit.merge(tiny_mlp)
    with torch.no_grad():
        merged_out = tiny_mlp(ids)
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1", "fc2"]))  # a second round on the merged model
    with torch.no_grad():
        torch.testing.assert_close(tiny_mlp(ids), merged_out, rtol=1e-6, atol=1e-6)
    dorafit.detach(tiny_mlp)
    dorafit.attach(tiny_mlp, AdapterConfig(method="lora", rank=2, targets=["fc2"]))
    assert [n for n, _ in dorafit.adapter_modules(tiny_mlp)] == ["fc2"]


# ---------------------------------------------------------------------------- sizes and values checked first


def test_vera_rank_is_bounded_before_its_shared_matrices_are_allocated(tiny_mlp):
    """A VeRA rank of 10**9 from a config would allocate A (10**9, in) before any layer check."""
    snap = snapshot(tiny_mlp)
    for kwargs, module in ((dict(method="vera", rank=10**9, targets=["fc1"]), "fc1"),
                           (dict(method="dvora", rank=8, targets=["fc1", "fc2"], rank_pattern={"fc2": 10**12}), "fc2")):
        with pytest.raises(AdapterError, match=rf"module '{module}': (rank|rank_pattern) \d+ is larger than the layer "
                                               r"allows: weight \(out, in\) = \(\d+, \d+\), rank must be ≤ 12"):
            dorafit.attach(tiny_mlp, AdapterConfig(**kwargs))
        assert_untouched(tiny_mlp, snap)


def test_non_finite_base_weights_are_named_at_attach(tiny_mlp):
    with torch.no_grad():
        tiny_mlp.fc1.weight[3, 2] = float("nan")
        tiny_mlp.fc2.weight[0, 0] = float("inf")
    snap_modules = [(n, type(m)) for n, m in tiny_mlp.named_modules()]
    with pytest.raises(AdapterError, match=r"weights hold NaN or inf values in fc1 \(1\), fc2 \(1\): the base itself "
                                           "is damaged"):
        dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["fc1", "fc2", "head"]))
    assert [(n, type(m)) for n, m in tiny_mlp.named_modules()] == snap_modules
    dorafit.attach(tiny_mlp, AdapterConfig(rank=2, targets=["head"]))  # the damaged layers are not adapted: fine
