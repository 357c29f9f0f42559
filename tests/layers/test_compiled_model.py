"""torch.compile of a whole adapted model: ``fullgraph=True`` compiles a training step of a small
LLaMA (no graph break anywhere in the adapters), and once the graph variants exist (the norm due
or kept, with or without autograd) ten more steps that mix gradient accumulation, optimizer
steps and evaluation compile nothing new, and compute what the eager model computes.
"""

from __future__ import annotations

import pytest
import torch

import dorafit

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["dora"])
def test_fullgraph_training_steps_without_recompilation(method):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    model = dorafit.attach(LlamaForCausalLM(cfg), dorafit.AdapterConfig(method=method, rank=4, targets=TARGETS))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(micro_batches=2):
        model.train()
        for _ in range(micro_batches):
            compiled(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            return compiled(input_ids=IDS, use_cache=False).logits

    for _ in range(2):
        step()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    config = torch._dynamo.config
    old = config.error_on_recompile
    config.error_on_recompile = True
    try:
        for n in range(10):
            logits = step(micro_batches=1 + n % 3)
    finally:
        config.error_on_recompile = old
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=IDS, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
