"""Tiny LLaMA checkpoints for the GGUF tests: a GGUF file written the way llama.cpp lays a LLaMA
out (its tensor names, q/k rows permuted per head for its rotary layout, a byte-level BPE
vocabulary), and a transformers folder with a matching tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import gguf

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=64, tie_word_embeddings=False)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' row order back from llama.cpp's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_tokens() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of TINY['vocab_size'] tokens and its merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ"]
    merges = ["a b", "Ġ a", "c d", "Ġ ab"]
    tokens = specials + letters + [m.replace(" ", "") for m in merges]
    tokens += [f"<extra_{i}>" for i in range(TINY["vocab_size"] - len(tokens))]
    return tokens, merges


def write_tiny_gguf(path: Path, qtype=None):
    """A random tiny LLaMA as a GGUF file, float32 or with its 2-D weights in GGML type ``qtype``
    where their rows split into its blocks (the rest float32); returns the transformers model
    the file encodes (a quantized file's model holds the dequantized weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1 so a dropped norm shows
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(TINY["hidden_size"])
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(TINY["num_attention_heads"])
    writer.add_head_count_kv(TINY["num_key_value_heads"])
    writer.add_rope_freq_base(TINY["rope_theta"])
    writer.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    writer.add_vocab_size(TINY["vocab_size"])
    writer.add_rope_dimension_count(TINY["hidden_size"] // TINY["num_attention_heads"])
    tokens, merges = tiny_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    def add(name, w, hf_name):
        w = np.ascontiguousarray(w)
        if qtype is None or w.ndim == 1 or w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            writer.add_tensor(name, w)
            return
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(data, qtype)  # the model the file encodes
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = TINY["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            back = llama_cpp_unpermute(back, heads)
        with torch.no_grad():
            model.get_parameter(hf_name).copy_(torch.from_numpy(np.ascontiguousarray(back)))

    add("token_embd.weight", sd["model.embed_tokens.weight"], "model.embed_tokens.weight")
    for i in range(TINY["num_hidden_layers"]):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, TINY["num_attention_heads"])
            elif gg == "attn_k":
                w = llama_cpp_permute(w, TINY["num_key_value_heads"])
            add(f"blk.{i}.{gg}.weight", w, f"model.layers.{i}.{hf}.weight")
    add("output_norm.weight", sd["model.norm.weight"], "model.norm.weight")
    add("output.weight", sd["lm_head.weight"], "lm_head.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def write_tiny_folder(folder: Path, tie_word_embeddings: bool = False):
    """A random tiny LLaMA saved as a transformers folder with a byte-level BPE tokenizer.json
    (the same vocabulary as the GGUF file's); returns the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokens, merges = tiny_tokens()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": tie_word_embeddings})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return model
