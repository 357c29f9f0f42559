"""Named adapters behave: ``disable_adapter`` holds for its whole block, and adapter names are
checked the same way by every API that takes one."""

from __future__ import annotations

import pytest
import torch

import dorafit
from dorafit import AdapterConfig, AdapterError
from dorafit.adapters import rename_adapter, set_trainable

from conftest import TinyMLP
from test_adapters import MATH, _randomized, two  # noqa: F401 (the fixture of two named adapters)

X = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))


def _base_out():
    torch.manual_seed(0)
    return TinyMLP()(X)


def test_disable_adapter_holds_through_set_adapter_attach_and_load(two, tmp_path):
    base = _base_out()
    math = two(X)
    dorafit.set_adapter(two, "code")
    code = two(X)
    dorafit.set_adapter(two, "math")
    dorafit.save_adapter(two, tmp_path / "saved")  # math's files, loaded again below under another name
    with dorafit.disable_adapter(two):
        assert torch.equal(two(X), base)
        dorafit.set_adapter(two, "code")
        assert torch.equal(two(X), base)  # the newly active adapter is off too
        third = AdapterConfig(rank=2, targets=["fc2"])
        dorafit.attach(two, third, name="third")
        dorafit.set_adapter(two, "third")
        _randomized(two, 30)
        assert torch.equal(two(X), base)
        dorafit.load_adapter(two, tmp_path / "saved", name="again")
        dorafit.set_adapter(two, "again")
        assert torch.equal(two(X), base)
        with dorafit.disable_adapter(two):  # nested blocks
            dorafit.set_adapter(two, "math")
        assert torch.equal(two(X), base)  # still inside the outer block
    assert torch.equal(two(X), math)  # "math" is active after the block, and on again
    dorafit.set_adapter(two, "code")
    assert torch.equal(two(X), code)
    dorafit.set_adapter(two, "again")
    assert torch.equal(two(X), math)


def test_disable_adapter_on_a_bare_model_covers_an_adapter_attached_inside():
    torch.manual_seed(0)
    model = TinyMLP()
    base = model(X)
    with dorafit.disable_adapter(model):
        _randomized(dorafit.attach(model, MATH), 5)
        assert torch.equal(model(X), base)
    assert not torch.equal(model(X), base)


BAD_NAMES = ["", " ", "my adapter", "a.b", "1st", "-x", "x" * 65, None, 3, "ä"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_are_checked_alike_everywhere(two, name, tmp_path):
    """Every API that takes an adapter name refuses the same bad names with the same message."""
    calls = {
        "attach": lambda: dorafit.attach(two, MATH, name=name),
        "set_adapter": lambda: dorafit.set_adapter(two, name),
        "delete_adapter": lambda: dorafit.delete_adapter(two, name),
        "rename_adapter": lambda: rename_adapter(two, "code", name),
        "set_trainable": lambda: set_trainable(two, name, False),
    }
    for api, call in calls.items():
        with pytest.raises(AdapterError, match=r"^adapter name .* is not valid: use a non-empty identifier"):
            call()
    assert dorafit.list_adapters(two) == ["math", "code"] and dorafit.active_adapter(two) == "math"


def test_good_names_pass(two):
    for name in ("a", "_x", "task-2", "Math_v2", "x" * 64):
        dorafit.attach(two, AdapterConfig(rank=2, targets=["fc2"]), name=name)
    rename_adapter(two, "task-2", "task_3")
    assert "task_3" in dorafit.list_adapters(two)
