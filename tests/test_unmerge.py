"""unmerge inverts merge(keep_adapter=True) up to float error, or refuses (dorafit.merge)."""

from __future__ import annotations

import pytest
import torch

import dorafit
from dorafit import AdapterConfig, AdapterError

from conftest import TinyMLP

IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2))
CASES = {
    "dora": AdapterConfig(rank=3, targets=["embed", "conv", "fc1", "fc2"], modules_to_save=["head"]),
    "lora": AdapterConfig(method="lora", rank=3, targets=["embed", "conv", "fc1", "fc2"]),
    "magnitude": AdapterConfig(method="magnitude", targets=["conv", "fc1", "fc2"]),
    "dvora": AdapterConfig(method="dvora", rank=3, targets=["fc1", "fc2"]),
}


def _adapted(config):
    torch.manual_seed(0)
    model = dorafit.attach(TinyMLP(), config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            for name in a.adapter_parameter_names():
                p = getattr(a, name)
                p.add_(torch.randn(p.shape, generator=gen) * (0.1 if name == "magnitude" else 0.5))
    return model


@pytest.mark.parametrize("method", sorted(CASES))
def test_unmerge_gives_the_adapted_model_back(method):
    model = _adapted(CASES[method])
    with torch.no_grad():
        adapted = model(IDS)
    torch.manual_seed(0)
    w0 = {k: v.clone() for k, v in TinyMLP().state_dict().items()}
    keys = set(model.state_dict())
    dorafit.merge(model, keep_adapter=True)
    assert not dorafit.adapter_modules(model)
    dorafit.unmerge(model)
    assert set(model.state_dict()) == keys and dorafit.list_adapters(model) == ["default"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-5, atol=1e-5)
    # The frozen base weights are W0 again, to within the float32 rounding of the stored merged W
    # (about 1e-7 of a row of W0 + sBA) amplified by 1 / g: up to about 2e-6 on these rows.
    for name, a in dorafit.adapter_modules(model):
        torch.testing.assert_close(a.base.weight, w0[f"{name}.weight"], rtol=1e-5, atol=5e-6)
        assert all(getattr(a, p).requires_grad for p in a.adapter_parameter_names())


def test_unmerge_refuses_a_model_merged_without_keeping_the_adapter():
    model = dorafit.merge(_adapted(CASES["dora"]))
    with pytest.raises(AdapterError, match="keep_adapter=True.*norm"):
        dorafit.unmerge(model)


def test_unmerge_refuses_zero_scale_rows_and_changed_weights():
    model = _adapted(CASES["dora"])
    with torch.no_grad():
        model.fc1.magnitude[[2, 5]] = 0.0
    dorafit.merge(model, keep_adapter=True)
    with pytest.raises(AdapterError, match=r"'fc1': output feature\(s\) \[2, 5\] have scale g"):
        dorafit.unmerge(model)
    model = dorafit.merge(_adapted(CASES["dora"]), keep_adapter=True)
    with torch.no_grad():
        model.fc2.weight.add_(1.0)  # trained after the merge
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="'fc2': its merged weight was changed after the merge"):
        dorafit.unmerge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was


def test_merge_with_keep_adapter_is_still_a_plain_model_and_idempotent():
    model = _adapted(CASES["dora"])
    with torch.no_grad():
        adapted = model(IDS)
    dorafit.merge(model, keep_adapter=True)
    dorafit.merge(model, keep_adapter=True)  # nothing left to merge: the kept record stays
    assert {type(m).__name__ for m in model.children()} == {"Embedding", "Conv1d", "Linear", "GELU"}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, rtol=1e-5, atol=1e-5)
    dorafit.unmerge(model)
    with pytest.raises(AdapterError, match="no merged adapter to unmerge"):
        dorafit.unmerge(model)
