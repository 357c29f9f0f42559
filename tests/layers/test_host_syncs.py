"""No adapted layer reads a tensor's value on the host in a training, evaluation or generation
step: each such read (``.item()``, ``bool(t)``, ``if t.any():``) stalls a GPU's stream.

Counted exactly with a TorchDispatchMode (``dorafit.bench.count_step_syncs``: the operators
``aten._local_scalar_dense`` and ``aten.is_nonzero``) in steady-state steps of a small LLaMA,
for every method, with and without dropout, against the same steps of the model without
adapters (transformers itself reads a value or two: those are not dorafit's).
"""

from __future__ import annotations

import copy

import pytest
import torch

import dorafit
from dorafit.bench import count_ops, count_step_syncs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("method", ["lora", "dora", "magnitude", "vera", "dvora"])
def test_no_host_syncs_in_steps(llama, method, dropout):
    base = count_step_syncs(copy.deepcopy(llama), IDS)
    model = dorafit.attach(copy.deepcopy(llama), dorafit.AdapterConfig(method=method, rank=4, targets=TARGETS, dropout=dropout))
    assert count_step_syncs(model, IDS) == base


def test_the_counter_sees_a_host_read():
    """The count can fail: a value read by Python is one."""
    t = torch.ones(3)
    assert count_ops(lambda: bool(t.all())).syncs == 1 and count_ops(lambda: t.sum().item()).syncs == 1
