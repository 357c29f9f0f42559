"""merge refuses a result it cannot store: non-finite merged weights, or values beyond the range of
the weight's dtype (float16), naming the module and leaving the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dorafit
from dorafit import AdapterConfig, AdapterError


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _adapted(dtype=torch.float32):
    torch.manual_seed(0)
    model = Two().to(dtype)
    dorafit.attach(model, AdapterConfig(rank=2, targets=["fc1", "fc2"], adapter_dtype="float32"))
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merge_of_values_float16_cannot_hold_is_refused_and_changes_nothing():
    model = _adapted(torch.float16)
    with torch.no_grad():
        dorafit.adapter_modules(model)[1][1].magnitude.fill_(1e6)  # rows of length 1e6: > 65504
    before = _state(model)
    with pytest.raises(AdapterError, match=r"cannot merge: module 'fc2': \d+ merged values exceed what float16 can "
                                           r"hold \(largest \d\.\d+e\+05, limit 6\.55e\+04\)"):
        dorafit.merge(model)
    assert [n for n, _ in dorafit.adapter_modules(model)] == ["fc1", "fc2"]  # fc1 was not merged either
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(AdapterError, match="exceed what float16 can hold"):
        dorafit.merged_weights(model)


def test_merge_of_a_non_finite_result_is_refused():
    model = _adapted()
    with torch.no_grad():
        dorafit.adapter_modules(model)[0][1].lora_b.fill_(float("inf"))
    with pytest.raises(AdapterError, match=r"cannot merge: module 'fc1': the merged weight holds 64 NaN/inf values"):
        dorafit.merge(model)
    assert len(dorafit.adapter_modules(model)) == 2


def test_a_representable_merge_still_merges():
    model = _adapted(torch.float16)
    x = torch.randn(3, 8).half()
    want = model(x)
    dorafit.merge(model)
    assert not dorafit.adapter_modules(model) and model.fc1.weight.dtype == torch.float16
    torch.testing.assert_close(model(x), want, rtol=2e-3, atol=2e-3)
