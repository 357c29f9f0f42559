"""A short DoRA training run on a tiny task: the loss falls, and after merging each merged row's
norm equals its magnitude entry (W_merged = m ⊙ V / ‖V‖, so ‖W_merged_i‖ = |m_i|: Eq. 5 does
not constrain the sign of m, and a magnitude entry that crosses zero flips its row).
"""

from __future__ import annotations

import torch
from torch import nn

import dorafit
from dorafit import AdapterConfig


def make_task(n=256, d=16, classes=4, seed=0):
    """A fixed random 2-layer teacher labels Gaussian inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    teacher = torch.randn(d, 32, generator=gen), torch.randn(32, classes, generator=gen)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(dim=1)
    return x, y


def test_dora_training_decreases_loss_and_merged_norms_match_magnitude():
    torch.manual_seed(0)
    x, y = make_task()
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    dorafit.attach(model, AdapterConfig(rank=4, alpha=8, targets=["0", "2", "4"], dropout=0.05))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    model.eval()
    with torch.no_grad():
        loss0 = loss_fn(model(x), y).item()
    magnitude0 = model[0].magnitude.detach().clone()

    model.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(200):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        for micro in idx.chunk(2):  # two gradient-accumulation micro-batches per step
            (loss_fn(model(x[micro]), y[micro]) / 2).backward()
        opt.step()
        opt.zero_grad()

    model.eval()
    with torch.no_grad():
        loss1 = loss_fn(model(x), y).item()
        y_unmerged = model(x)
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    assert (model[0].magnitude.detach() - magnitude0).abs().max() > 1e-3  # the magnitude trained
    magnitudes = {i: model[i].magnitude.detach().clone() for i in (0, 2, 4)}
    assert all(torch.isfinite(m).all() for m in magnitudes.values())

    dorafit.merge(model)
    for i, m in magnitudes.items():
        assert type(model[i]) is nn.Linear
        assert (m > 0).float().mean() > 0.9  # nearly all entries keep their sign
        torch.testing.assert_close(torch.linalg.vector_norm(model[i].weight, dim=1), m.abs(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_unmerged, rtol=1e-5, atol=1e-5)
