"""Greedy continuations from llama.cpp (llama-cpp-python), for benchmarks/serving_engines.py.

Runs in the llama-cpp-python virtual environment, not dorafit's: it imports nothing of dorafit
or torch. Reads one JSON job on stdin and writes one JSON result on stdout:

    job     {"model": GGUF file, "lora": GGUF LoRA adapter or null, "prompts": [[token id, ...], ...],
             "texts": [prompt text, ...] (optional), "max_new_tokens": n, "n_ctx": 512, "threads": 2}
    result  {"outputs": [[token id, ...], ...], "eog": [ids llama.cpp ends a generation at],
             "tokenized_like_ids": n (texts llama.cpp tokenizes to exactly the given ids), "seconds": s}

The prompts go in as token ids (what the transformers tokenizer made of them), so that the
comparison is of the engine's arithmetic, not of two tokenizers; ``tokenized_like_ids`` says
whether llama.cpp's own tokenizer would have made the same ids from the text. Decoding is
greedy (temperature 0, no repetition penalty) and stops at an end-of-generation token.

Weight repacking ("extra buffer types") is off: llama-cpp-python 0.3.36 built on this project's
machine (a CPU with AVX512 and AMX-INT8) crashes with a segmentation fault on any batch of more
than one token over Q4_1 / Q8_0 weights when it repacks them, the unmodified SmolLM2 file
included; without repacking the same quantized types run through ggml's plain CPU kernels.
"""

from __future__ import annotations

import json
import sys
import time


def _without_repacking(llama_cpp) -> None:
    """Model parameters with ``use_extra_bufts`` off for every model loaded from here on."""
    defaults = llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = params


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    _without_repacking(llama_cpp.llama_cpp)  # the module llama_cpp.Llama reads its defaults from
    job = json.load(sys.stdin)
    kwargs = {"lora_path": job["lora"]} if job.get("lora") else {}
    llm = Llama(model_path=job["model"], n_ctx=int(job.get("n_ctx", 512)), n_threads=int(job.get("threads", 2)),
                n_batch=512, verbose=False, seed=0, **kwargs)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    eog_set = set(eog)
    same_ids = 0
    for text, ids in zip(job.get("texts") or [], job["prompts"]):
        same_ids += llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
    start = time.perf_counter()
    outputs = []
    for ids in job["prompts"]:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if token in eog_set:
                break
            out.append(int(token))
            if len(out) >= int(job["max_new_tokens"]):
                break
        outputs.append(out)
    json.dump({"outputs": outputs, "eog": eog, "tokenized_like_ids": same_ids,
               "seconds": time.perf_counter() - start}, sys.stdout)


if __name__ == "__main__":
    main()
