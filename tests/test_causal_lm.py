"""A real causal LM (SmolLM2-135M-Instruct from its GGUF file): generation and training mode.

- ``model.generate`` on the attached, unmerged DoRA model, with its key/value cache, gives the
  merged model's greedy tokens (and the uncached ones), and DoRA's norm is computed once per
  adapter for the whole generation, not once per generated token;
- ``load_model`` turns HF's ``use_cache`` off, so a training forward builds no cache.
"""

from __future__ import annotations

import json

import pytest
import torch

import dorafit
import dorafit.functional as DF
from dorafit.train.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's


@pytest.fixture()
def adapted_smollm2(smollm2_folder):
    """SmolLM2 with DoRA r 16 on the paper's targets, moved away from its initialisation."""
    torch.manual_seed(0)
    model, _ = load_model(smollm2_folder, "causal-lm", trust_remote_code=False)
    dorafit.attach(model, dorafit.AdapterConfig(method="dora", rank=16, alpha=32, targets=TARGETS))
    with torch.no_grad():
        for _, adapter in dorafit.adapter_modules(model):
            adapter.lora_b.normal_(0, 0.02)
            adapter.magnitude.mul_(1 + 0.05 * torch.randn_like(adapter.magnitude))
    tokenizer = load_tokenizer(smollm2_folder, trust_remote_code=False, padding_side="left")
    return model.eval(), tokenizer


def test_unmerged_generation_with_kv_cache_equals_merged_and_norm_is_computed_once(adapted_smollm2, monkeypatch):
    model, tokenizer = adapted_smollm2
    batch = tokenizer(["Question: is the sky blue? Answer:", "The capital of France is"],
                      return_tensors="pt", padding=True)
    calls = []
    real_norm = DF.factored_norm_sq

    def counted_norm(*args, **kwargs):
        calls.append(1)
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(DF, "factored_norm_sq", counted_norm)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert cached.past_key_values is not None  # the KV cache was used
    assert len(calls) == len(dorafit.adapter_modules(model)) == 150  # once per adapter, not per token
    with torch.no_grad():
        uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
    assert len(calls) == 150  # still cached: A, B and W0 did not change
    monkeypatch.undo()
    dorafit.merge(model)
    with torch.no_grad():
        merged = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(cached.sequences, merged) and torch.equal(uncached, merged)


def test_training_forward_builds_no_kv_cache(adapted_smollm2):
    model, tokenizer = adapted_smollm2
    assert model.config.use_cache is False and model.generation_config.use_cache is True
    model.train()
    ids = tokenizer(["a short training row"], return_tensors="pt")
    out = model(**ids, labels=ids["input_ids"])
    assert out.past_key_values is None


def test_train_eval_merge_generate_and_peft_export_on_the_real_model(smollm2_folder, tmp_path, capsys):
    """train -> eval -> merge -> generate through the CLI, kept short (2 steps of 4 rows, 4 test rows)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dorafit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "smollm2-135m-instruct", "--task", "ARC-Easy", "--output", str(out),
                 "--rank", "16", "--lr", "1e-3", "--warmup-steps", "0", "--batch-size", "4",
                 "--max-train-rows", "8", "--max-length", "256", "--max-test-rows", "4", "--val-size", "0", "--save-steps", "0",
                 "--max-new-tokens", "8", "--no-eval-before", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_kind"] == "causal-lm" and results["steps"] == 2 and results["test_rows"] == 4

    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", "smollm2-135m-instruct", "--adapter", str(out / "adapter"), "--max-rows", "4",
                 "--max-new-tokens", "8", "--no-progress", "--json", str(report)]) == 0
    assert json.loads(report.read_text())[0]["accuracy"] == pytest.approx(results["accuracy_after"])

    merged = tmp_path / "merged"
    assert main(["merge", "--model", "smollm2-135m-instruct", "--adapter", str(out / "adapter"),
                 "--out", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no dorafit inside
    assert not any(type(m).__module__.startswith("dorafit") for m in plain.modules())
    assert plain.config.use_cache is True  # the original's setting, not the training one
    adapted, _ = load_model(smollm2_folder, "causal-lm", trust_remote_code=False)
    dorafit.load_adapter(adapted, out / "adapter")
    adapted.eval()
    tokenizer = load_tokenizer(smollm2_folder, trust_remote_code=False, padding_side="left")
    batch = tokenizer(["Please choose the correct answer to the question: Which is a gas? Answer1: ice "
                       "Answer2: steam\n\nAnswer format: answer1/answer2"], return_tensors="pt")
    with torch.no_grad():
        want = adapted.generate(**batch, max_new_tokens=10, do_sample=False)
        assert torch.equal(plain.generate(**batch, max_new_tokens=10, do_sample=False), want)
        base = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
        assert not torch.allclose(base(**batch).logits, plain(**batch).logits, atol=1e-4)  # it trained

    # The run's adapter is in PEFT's layout: PeftModel reads it as written, to the same logits;
    # merge_and_unload gives dorafit's merged weights.
    peft_dir = out / "adapter"
    assert json.loads((peft_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_folder), peft_dir).eval()
    with torch.no_grad():
        ours, theirs = adapted(**batch).logits, peft_model(**batch).logits
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
    unloaded = peft_model.merge_and_unload().state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(unloaded[key], value, rtol=1e-5, atol=1e-6, msg=key)
