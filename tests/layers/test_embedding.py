"""EmbeddingAdapter against paper Eq. 5 in PEFT's layout.

The embedding is the linear map one-hot(token) -> row of W (vocab, dim), i.e. the (dim, vocab)
weight Wᵀ; A (r, vocab), B (dim, r), m (dim,), norm per embedding dimension over the vocabulary.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import dorafit
from dorafit.layers import EmbeddingAdapter


def make_embedding(vocab=11, dim=6, **kw):
    kw.setdefault("rank", 3)
    kw.setdefault("alpha", 6.0)
    return EmbeddingAdapter(nn.Embedding(vocab, dim), **kw)


def ids(vocab=11):
    return torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(4))


def test_layout_and_init():
    layer = make_embedding()
    assert layer.lora_a.shape == (3, 11)
    assert layer.lora_b.shape == (6, 3)
    assert layer.magnitude.shape == (6,)
    # per embedding dimension: a column norm of the stored (vocab, dim) table
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.vector_norm(layer.base.weight.detach(), dim=0))
    x = ids()
    torch.testing.assert_close(layer(x), layer.base(x))


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("detach_norm", [True, False])
def test_matches_eq5(ref, method, detach_norm):
    layer = ref.randomize_adapter(make_embedding(method=method, detach_norm=detach_norm))
    x = ids()
    ref.check_against_eq5(layer, x, detach_norm=detach_norm)
    ref.check_reference_forward(layer, x)


def test_dropout_config_is_accepted_and_ignored(ref):
    """Dropout on token ids has no meaning: the adapter applies none."""
    layer = ref.randomize_adapter(make_embedding(dropout=0.5))
    layer.train()
    x = ids()
    torch.testing.assert_close(layer(x), layer(x))
    ref.check_against_eq5(layer, x)


def test_merge_parity_and_row_norms(ref):
    layer = ref.randomize_adapter(make_embedding())
    x = ids()
    with torch.no_grad():
        y = layer(x)
        plain = layer.write_merged(layer.merged_weight_2d())
    assert type(plain) is nn.Embedding
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.linalg.vector_norm(plain.weight, dim=0), layer.magnitude.detach(), rtol=1e-5, atol=1e-6)


def test_attach_on_embedding_and_tied_head_keeps_value(ref):
    """Merging an adapted embedding whose weight is tied to an output head: the head keeps its weight."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(self.embed(x))

    model = Tied()
    dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["embed"]))
    ref.randomize_adapter(model.embed)
    x = ids()
    with torch.no_grad():
        y = model(x)
        with pytest.warns(UserWarning, match="tied"):
            dorafit.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    assert model.head.weight is not model.embed.weight


@settings(max_examples=8, deadline=None)
@given(
    vocab=st.integers(2, 30),
    dim=st.integers(1, 12),
    rank_frac=st.floats(0.1, 1.0),
    method=st.sampled_from(["lora", "dora"]),
    detach=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(ref, vocab, dim, rank_frac, method, detach, seed):
    torch.manual_seed(seed)
    rank = max(1, int(rank_frac * min(vocab, dim)))
    layer = ref.randomize_adapter(make_embedding(vocab, dim, rank=rank, method=method, detach_norm=detach), scale=0.3, seed=seed)
    x = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed))
    ref.check_against_eq5(layer, x, detach_norm=detach, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_no_dim_by_vocab_temporary(ref, detach_norm):
    """The (dim, vocab) = (64, 1000) matrix W0ᵀ + s B A is never allocated."""
    layer = EmbeddingAdapter(nn.Embedding(1000, 64), rank=4, detach_norm=detach_norm)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randint(0, 1000, (2, 4))
    ref.check_no_weight_sized_temporary(layer, x, 64 * 1000)


def test_compile_no_graph_breaks(ref):
    layer = ref.randomize_adapter(make_embedding())
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(layer)(ids())
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
