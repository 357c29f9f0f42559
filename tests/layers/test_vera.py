"""VeRA and DVoRA: the shared seeded matrices, the formulas (outputs and gradients), merge, detach,
adapter files and the trainable-parameter count.

The reference is written from the papers: ΔW = Λ_b B Λ_d A with A = A_shared[:r, :in],
B = B_shared[:out, :r]; DVoRA: W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ per output feature.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import dorafit
from dorafit.layers import AdapterError, VeraLinearAdapter


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 16)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(16, 40, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def seeded_matrices(seed, rank, in_max, out_max):
    """The documented generation: one CPU generator, A (r, in_max) first, then B (out_max, r),
    each uniform in ±1/sqrt(fan_in) (Kaiming-uniform with a = sqrt(5))."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, in_max).uniform_(-1 / math.sqrt(in_max), 1 / math.sqrt(in_max), generator=gen)
    b = torch.empty(out_max, rank).uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=gen)
    return a, b


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in dorafit.adapter_modules(model):
            layer.vera_d.copy_(torch.randn(layer.vera_d.shape, generator=gen))
            layer.vera_b.copy_(torch.randn(layer.vera_b.shape, generator=gen))
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.3 * torch.rand(layer.magnitude.shape, generator=gen))


def reference_weight(layer, a_shared, b_shared, ref, detach_norm=True):
    """The adapted (out, in) weight from the formula, differentiable in d, b and m."""
    w0 = layer.base.weight.detach()
    out_f, in_f = w0.shape
    r = layer.vera_d.shape[0]
    a = a_shared[:r, :in_f]
    b = b_shared[:out_f, :r]
    delta = torch.diag(layer.vera_b) @ b @ torch.diag(layer.vera_d) @ a  # Λ_b B Λ_d A
    if layer.method == "vera":
        return w0 + delta
    return ref.eq5_weight(w0, layer.vera_d.unsqueeze(1) * a, layer.vera_b.unsqueeze(1) * b, 1.0, layer.magnitude, detach_norm)


def reference_model_forward(model, x, a_shared, b_shared, ref, detach_norm=True):
    h = torch.nn.functional.linear(x, reference_weight(model.fc1, a_shared, b_shared, ref, detach_norm), model.fc1.base.bias)
    return torch.nn.functional.linear(torch.tanh(h), reference_weight(model.fc2, a_shared, b_shared, ref, detach_norm))


def test_shared_matrices_come_from_the_seed_and_are_shared_by_reference():
    model = dorafit.attach(TwoLinear(), dorafit.AdapterConfig(method="vera", rank=4, targets=["fc1", "fc2"], vera_seed=7))
    a, b = seeded_matrices(7, 4, 24, 40)  # in_max = 24 (fc1), out_max = 40 (fc2)
    shared = model.fc1.vera_shared
    assert shared is model.fc2.vera_shared
    assert torch.equal(shared.a, a) and torch.equal(shared.b, b)
    a1, b1 = model.fc1.shared_slices()
    a2, b2 = model.fc2.shared_slices()
    assert a1.data_ptr() == a2.data_ptr() == shared.a.data_ptr()  # views, not copies
    assert tuple(a2.shape) == (4, 16) and tuple(b1.shape) == (16, 4)
    assert not any("vera_shared" in k for k in model.state_dict())  # regenerated, not saved
    model.double()
    assert model.fc1.vera_shared is model.fc2.vera_shared and model.fc1.vera_shared.a.dtype == torch.float64


def test_init_follows_the_vera_paper_and_leaves_the_model_unchanged():
    base = TwoLinear()
    x = torch.randn(5, 24)
    expected = base(x)
    for method in ("vera", "dvora"):
        model = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(method=method, rank=4, targets=["fc1", "fc2"]))
        assert torch.all(model.fc1.vera_d == 0.1) and torch.all(model.fc1.vera_b == 0)
        assert model.fc1.scaling == 1.0
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,detach_norm", [("vera", True), ("dvora", True), ("dvora", False)])
def test_outputs_and_gradients_match_the_formula(method, detach_norm, ref):
    cfg = dorafit.AdapterConfig(method=method, rank=6, targets=["fc1", "fc2"], detach_norm=detach_norm, vera_seed=3)
    model = dorafit.attach(TwoLinear(), cfg)
    randomize(model)
    a_shared, b_shared = seeded_matrices(3, 6, 24, 40)
    x = torch.randn(7, 24)
    params = [p for p in model.parameters() if p.requires_grad]

    y = model(x)
    y.pow(2).sum().backward()
    got = ref.grads_of(params)
    ref.zero_grads(params)
    y_ref = reference_model_forward(model, x, a_shared, b_shared, ref, detach_norm)
    y_ref.pow(2).sum().backward()
    want = ref.grads_of(params)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert len(params) == (4 if method == "vera" else 6)
    for g, w in zip(got, want):
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_dvora_norm_is_recomputed_after_an_optimizer_step(ref):
    model = dorafit.attach(TwoLinear(), dorafit.AdapterConfig(method="dvora", rank=4, targets=["fc1", "fc2"]))
    randomize(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(3, 24)
    a_shared, b_shared = model.fc1.vera_shared.a, model.fc1.vera_shared.b
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_model_forward(model, x, a_shared, b_shared, ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_merge_matches_unmerged_and_detach_restores(method):
    base = TwoLinear()
    x = torch.randn(4, 24)
    y_base = base(x)
    model = dorafit.attach(base, dorafit.AdapterConfig(method=method, rank=4, targets=["fc1", "fc2"]))
    randomize(model)
    with torch.no_grad():
        y = model(x)
        weights = dorafit.merged_weights(model)
        dorafit.merge(model)
        assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.fc2.weight, weights["fc2.weight"])
        dorafit.merge(model)  # idempotent
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)

    model = dorafit.attach(TwoLinear(), dorafit.AdapterConfig(method=method, rank=4, targets=["fc1", "fc2"]))
    original = model.fc1.base
    randomize(model)
    dorafit.detach(model)
    assert model.fc1 is original
    assert not any(isinstance(m, nn.Module) and type(m).__name__ == "VeraShared" for m in model.modules())


def test_conv1d_gpt2_layout(ref):
    from transformers.pytorch_utils import Conv1D

    class GPTBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(36, 12)  # weight (in=12, out=36)
            self.c_proj = nn.Linear(36, 12)

        def forward(self, x):
            return self.c_proj(self.c_attn(x))

    model = dorafit.attach(GPTBlock(), dorafit.AdapterConfig(method="dvora", rank=4, targets=["c_attn", "c_proj"]))
    randomize(model)
    x = torch.randn(2, 3, 12)
    layer = model.c_attn
    a, b = layer.shared_slices()
    assert tuple(a.shape) == (4, 12) and tuple(b.shape) == (36, 4)
    w = ref.eq5_weight(layer.base.weight.t(), layer.vera_d.unsqueeze(1) * a, layer.vera_b.unsqueeze(1) * b, 1.0, layer.magnitude)
    torch.testing.assert_close(layer(x), x @ w.t() + layer.base.bias, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = model(x)
        dorafit.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_trainable_report_counts_d_b_and_magnitude():
    for method, per_layer in (("vera", lambda r, out: r + out), ("dvora", lambda r, out: r + 2 * out)):
        model = dorafit.attach(TwoLinear(), dorafit.AdapterConfig(method=method, rank=4, targets=["fc1", "fc2"]))
        report = dorafit.trainable_report(model)
        assert report.trainable == per_layer(4, 16) + per_layer(4, 40)
        assert report.methods == {method: 2}


@pytest.mark.parametrize("store", [False, True])
def test_save_and_load_regenerate_or_read_the_matrices(tmp_path, store):
    from safetensors.torch import load_file

    cfg = dorafit.AdapterConfig(method="dvora", rank=4, targets=["fc1", "fc2"], vera_seed=11, save_vera_matrices=store)
    torch.manual_seed(5)
    model = dorafit.attach(TwoLinear(), cfg)
    base_state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".base." in k}
    randomize(model)
    if store:  # matrices that the seed cannot give back: loading must read them from the file
        with torch.no_grad():
            model.fc1.vera_shared.a.mul_(2.0)
    x = torch.randn(3, 24)
    with torch.no_grad():
        y = model(x)
    dorafit.save_adapter(model, tmp_path / "adapter")
    keys = set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert ("vera_shared.a" in keys) == store
    assert {"fc1.vera_d", "fc1.vera_b", "fc1.magnitude", "fc2.vera_d", "fc2.vera_b", "fc2.magnitude"} <= keys

    fresh = TwoLinear()
    fresh.load_state_dict(base_state)
    dorafit.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=1e-6, atol=1e-6)


def test_vera_and_dvora_in_one_model_share_one_matrix_pair():
    cfg = dorafit.AdapterConfig(method="vera", rank=4, targets=["fc1", "fc2"], method_pattern={"fc2": "dvora"})
    model = dorafit.attach(TwoLinear(), cfg)
    assert model.fc1.method == "vera" and model.fc2.method == "dvora"
    assert model.fc1.vera_shared is model.fc2.vera_shared


def test_bad_vera_input_is_reported():
    with pytest.raises(dorafit.ConfigError, match="vera_d_init"):
        dorafit.AdapterConfig(method="vera", vera_d_init=0.0)
    with pytest.raises(dorafit.ConfigError, match="save_vera_matrices"):
        dorafit.AdapterConfig(method="vera", save_vera_matrices="yes")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(AdapterError, match="'0'.*linear layers only"):
        dorafit.attach(model, dorafit.AdapterConfig(method="vera", targets=["0"]))
    assert type(model[0]) is nn.Conv2d  # untouched
    assert issubclass(VeraLinearAdapter, dorafit.AdapterLayer)
