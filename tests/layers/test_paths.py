"""The path table of ``dorafit.layers.compose``: every row, built from its condition.

For each row of ``compose.PATHS`` the cases below build a layer and an input that meet the
row's condition, check that ``choose_path`` picks the row and that a forward runs it, and
compare the output and the gradients (input and adapter parameters) with
``AdapterLayer.reference_forward``, which builds W' of paper Eq. 5 outright. A row added to the
table without a case here fails ``test_every_path_has_a_case``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch
from torch import nn

import dorafit
from dorafit.layers import ConvAdapter, EmbeddingAdapter, LinearAdapter, compose
from transformers.pytorch_utils import Conv1D

from conftest import FixedMaskDropout, randomize_adapter


class Case(NamedTuple):
    layer: nn.Module
    x: torch.Tensor
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    grad: bool = True  # the call records autograd: compare gradients too
    tol: float = 1e-5


def _randomized(layer, **kw):
    if layer.method != "magnitude":
        return randomize_adapter(layer, **kw)
    with torch.no_grad():
        layer.magnitude.mul_(1 + 0.3 * torch.rand(layer.magnitude.shape, generator=torch.Generator().manual_seed(0)))
    return layer


def _linear(method="dora", bias=True, in_f=12, out_f=10, **kw):
    torch.manual_seed(0)
    return _randomized(LinearAdapter(nn.Linear(in_f, out_f, bias=bias), method=method, rank=4, alpha=8.0, **kw))


def _gpt2(method="dora"):
    torch.manual_seed(0)
    base = Conv1D(10, 12)
    with torch.no_grad():
        base.weight.normal_(0, 0.2)
        base.bias.normal_(0, 0.2)
    from dorafit.layers import Conv1DAdapter

    return randomize_adapter(Conv1DAdapter(base, method=method, rank=4, alpha=8.0))


def _dvora():
    torch.manual_seed(0)
    model = dorafit.attach(nn.Sequential(nn.Linear(12, 10)), dorafit.AdapterConfig(method="dvora", rank=4, targets=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.vera_d.normal_()
        layer.vera_b.normal_()
        layer.magnitude.mul_(1.2)
    return layer


def _conv(method="dora"):
    torch.manual_seed(0)
    return _randomized(ConvAdapter(nn.Conv2d(3, 5, 3, padding=1), method=method, rank=2, alpha=4.0), scale=0.3)


def _embedding(method="dora"):
    torch.manual_seed(0)
    return randomize_adapter(EmbeddingAdapter(nn.Embedding(11, 6), method=method, rank=3, alpha=6.0))


def _dropout(layer, mode):
    layer.dropout = FixedMaskDropout(0.3)
    layer.dropout_mode = mode
    return layer.train()


def _stale(layer):
    dorafit.invalidate_norm_caches(layer)
    return layer


def _fresh(layer, x):
    with torch.no_grad():
        layer(x)  # an eval-mode or no-grad call keeps no training norm: use a training call
    layer.train()
    layer(x).sum().backward()
    layer.zero_grad(set_to_none=True)
    return layer


def _tokens(n, f=12):
    return torch.randn(n, f, generator=torch.Generator().manual_seed(5))


def _ids():
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(4))


def _hooked(layer):
    layer.base.register_forward_hook(lambda module, args, out: None)  # a hook expects the call
    return layer


def _zero_row(layer):
    with torch.no_grad():
        layer.base.weight[3].zero_()  # a zero row of W0: m_3 = ‖W0_3‖ = 0
    return type(layer)(layer.base, rank=4, alpha=8.0)


NO_GRAD = torch.no_grad
CASES: Dict[str, List[Callable[[], Case]]] = {
    "base": [lambda: Case(_disabled(_linear()), _tokens(5))],
    "lora-addmm": [
        lambda: Case(_linear("lora"), _tokens(5)),
        lambda: Case(_dropout(_linear("lora"), "input"), _tokens(5)),
        lambda: Case(_gpt2("lora"), _tokens(5)),
    ],
    "lora": [
        lambda: Case(_conv("lora"), torch.randn(2, 3, 6, 6)),
        lambda: Case(_embedding("lora"), _ids()),
        lambda: Case(_hooked(_linear("lora")), _tokens(5)),
    ],
    "magnitude": [
        lambda: Case(_linear("magnitude"), _tokens(5)),
        lambda: Case(_conv("magnitude"), torch.randn(2, 3, 6, 6)),
    ],
    "dora-no-grad-rows": [
        lambda: Case(_linear().eval(), _tokens(40), NO_GRAD, grad=False),
        lambda: Case(_linear(adapter_dtype="base").to(torch.bfloat16).eval(), _tokens(40).to(torch.bfloat16), NO_GRAD,
                     grad=False, tol=3e-2),
    ],
    "dora-no-grad-addmm": [
        lambda: Case(_linear().eval(), _tokens(5), NO_GRAD, grad=False),
        lambda: Case(_gpt2().eval(), _tokens(5), NO_GRAD, grad=False),
        lambda: Case(_dvora().eval(), _tokens(5), NO_GRAD, grad=False),
    ],
    "dora-no-grad": [
        lambda: Case(_embedding().eval(), _ids(), NO_GRAD, grad=False),
        lambda: Case(_conv().eval(), torch.randn(2, 3, 6, 6), NO_GRAD, grad=False),
        lambda: Case(_hooked(_linear()).eval(), _tokens(40), NO_GRAD, grad=False),
    ],
    "dora-dropout": [
        lambda: Case(_dropout(_linear(), "input"), _tokens(5)),
        lambda: Case(_dropout(_conv(), "input"), torch.randn(2, 3, 6, 6)),
    ],
    "dora-keep-sum": [
        lambda: Case(_conv(), torch.randn(2, 3, 6, 6)),
        lambda: Case(randomize_adapter(_zero_row(_linear())), _tokens(5)),
    ],
    "dora-linear-rows": [  # more tokens (20) than input features (12)
        lambda: Case(_stale(_linear()), _tokens(20)),  # the norm due
        lambda: Case(_stale(_linear(bias=False)), _tokens(20)),
        lambda: Case(_fresh(_linear(), _tokens(20)), _tokens(20)),  # the norm kept
        lambda: Case(_dropout(_linear(), "lowrank"), _tokens(20)),
        lambda: Case(_gpt2(), _tokens(20)),
        lambda: Case(_dvora(), _tokens(20)),
        lambda: Case(_linear(adapter_dtype="base").to(torch.bfloat16), _tokens(20).to(torch.bfloat16), tol=3e-2),
    ],
    "dora-linear": [
        lambda: Case(_stale(_linear()), _tokens(2)),  # the norm due, few tokens (2 < 10 / 4): [x; A] stacked
        lambda: Case(_stale(_linear(bias=False)), _tokens(8)),  # the norm due, separate matmuls
        lambda: Case(_fresh(_linear(), _tokens(2)), _tokens(2)),  # the norm kept
        lambda: Case(_dropout(_linear(), "lowrank"), _tokens(5)),
        lambda: Case(_gpt2(), _tokens(4)),
        lambda: Case(_dvora(), _tokens(4)),
    ],
    "dora": [
        lambda: Case(_embedding(), _ids()),
        lambda: Case(_linear(detach_norm=False), _tokens(5)),
        lambda: Case(_hooked(_linear()), _tokens(5)),
        lambda: Case(_linear(), _tokens(5), lambda: torch.autocast("cpu", dtype=torch.bfloat16), tol=3e-2),
        lambda: Case(_dropout(_embedding(), "lowrank"), _ids()),
    ],
}


def _disabled(layer):
    layer.adapter_disabled = True
    return layer


def test_every_path_has_a_case():
    assert set(CASES) == set(compose.PATHS), "a path of compose.PATHS without a case here (or the reverse)"
    for name, path in compose.PATHS.items():
        doc = getattr(path.run, "func", path.run).__doc__  # a functools.partial's function
        assert path.name == name and path.when and doc and "=" in doc.split("\n")[0], name  # opens with its equation


def _cases():
    return [(name, i) for name, builders in CASES.items() for i in range(len(builders))]


@pytest.mark.parametrize("name,index", _cases(), ids=[f"{n}-{i}" for n, i in _cases()])
def test_path_runs_and_equals_the_reference(name, index, monkeypatch):
    case = CASES[name][index]()
    layer, x = case.layer, case.x
    ran = []
    real = compose.PATHS[name]
    monkeypatch.setitem(compose.PATHS, name, compose.Path(name, real.when, lambda *a: ran.append(name) or real.run(*a)))
    params = [p for p in layer.parameters() if p.requires_grad]
    xs = x.detach().clone().requires_grad_(case.grad) if x.is_floating_point() else x
    with case.context():
        assert compose.choose_path(layer, xs) == name
        y = layer(xs)
    assert ran == [name]
    with case.context():
        y_ref = layer.base(x) if name == "base" else layer.reference_forward(xs.detach().requires_grad_(case.grad) if x.is_floating_point() else x)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=case.tol, atol=case.tol)
    if not case.grad:
        return
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    inputs = params + ([xs] if xs.is_floating_point() else [])
    got = torch.autograd.grad((y.float() * grad_out).sum(), inputs, allow_unused=True)
    x_ref = xs.detach().clone().requires_grad_(True) if xs.is_floating_point() else xs
    with case.context():
        y_ref = layer.base(x_ref) if name == "base" else layer.reference_forward(x_ref)
    ref_inputs = params + ([x_ref] if x_ref.is_floating_point() else [])
    want = torch.autograd.grad((y_ref.float() * grad_out).sum(), ref_inputs, allow_unused=True)
    for g, w, p in zip(got, want, ref_inputs):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        torch.testing.assert_close(g.float(), w.float(), rtol=case.tol * 10, atol=case.tol * 10)
