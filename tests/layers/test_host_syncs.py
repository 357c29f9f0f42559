"""No adapted layer reads a tensor's value on the host in a training, evaluation or generation
step: each such read (``.item()``, ``bool(t)``, ``if t.any():``) stalls a GPU's stream.

Counted exactly with a TorchDispatchMode (``dorafit.bench.count_ops``: the operators
``aten._local_scalar_dense`` and ``aten.is_nonzero``) in steady-state steps of a small LLaMA,
for every method, with and without dropout, against the same steps of the model without
adapters (transformers itself reads a value or two: those are not dorafit's).
"""

from __future__ import annotations

import copy

import pytest
import torch

import dorafit
from dorafit.bench import count_ops

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _syncs(model):
    """Host reads of a training step (forward + backward after two optimizer steps), an
    evaluation forward and a greedy generation of 3 tokens with the key/value cache."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None

    def train():
        model.train()
        model(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()

    for _ in range(2):
        train()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    counts = {"train": count_ops(train).syncs}
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
        counts["eval"] = count_ops(lambda: model(input_ids=IDS, use_cache=False)).syncs
        generate = lambda: model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3,  # noqa: E731
                                          min_new_tokens=3, do_sample=False, pad_token_id=0)
        generate()
        counts["generate"] = count_ops(generate).syncs
    return counts


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("method", ["lora", "dora", "magnitude", "vera", "dvora"])
def test_no_host_syncs_in_steps(llama, method, dropout):
    base = _syncs(copy.deepcopy(llama))
    model = dorafit.attach(copy.deepcopy(llama), dorafit.AdapterConfig(method=method, rank=4, targets=TARGETS, dropout=dropout))
    assert _syncs(model) == base


def test_the_counter_sees_a_host_read():
    """The count can fail: a value read by Python is one."""
    t = torch.ones(3)
    assert count_ops(lambda: bool(t.all())).syncs == 1 and count_ops(lambda: t.sum().item()).syncs == 1
