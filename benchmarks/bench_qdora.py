"""Peak memory of a QDoRA training step against DoRA on a bf16 and an fp32 base.

One LLaMA-shaped causal LM (transformers' LlamaForCausalLM, random weights; default 4 layers,
hidden 256, intermediate 688, vocab 2048), DoRA r 8 on q,k,v,o,gate,up,down, and three bases
built from the same weights (defaults sized for a shared two-core CPU):

  fp32        the base in float32
  bf16        the base in bfloat16 (adapters float32)
  nf4         every adapted linear layer in 4-bit NF4 (bitsandbytes Linear4bit, double quant,
              bf16 compute), embeddings / norms / head in bf16: what transformers'
              BitsAndBytesConfig(load_in_4bit=True) gives

Memory (CPU): the model's resident bytes (parameters, buffers and the 4-bit quantization
statistics, counted per storage) + AdamW state, plus the peak of a training step (forward,
loss, backward, optimizer step) above the level before it, from the CPU allocator events that
``torch.profiler`` records with ``profile_memory=True`` (``dorafit.bench.step_peak_bytes``; on
CUDA ``torch.cuda.max_memory_allocated``). tracemalloc is no use here: it sees only Python's own
allocator, not the tensors'. A warm-up step runs first so that AdamW's state exists; medians
over ``--repeats`` measured steps.

    python benchmarks/bench_qdora.py                 # a few minutes on a busy two-core CPU
    python benchmarks/bench_qdora.py --hidden 1024 --intermediate 2816 --vocab 32000 --seq 256 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List

import torch
from torch import nn

import dorafit
from dorafit import quant
from dorafit.bench import format_table, mib, step_peak_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(256, args.seq), tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def resident_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages the model and the optimizer hold between steps."""
    tensors: List[torch.Tensor] = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        while state is not None:  # absmax / code of the 4-bit blocks, and of double quantization
            tensors += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None)) if t is not None]
            state = getattr(state, "state2", None)
    for st in optimizer.state.values():
        tensors += [t for t in st.values() if torch.is_tensor(t)]
    seen: Dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def make_variant(base: nn.Module, kind: str, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    if kind == "fp32":
        model = model.float()
    else:
        model = model.to(torch.bfloat16)
    if kind == "nf4":
        quant.quantize_model(model, TARGETS, "nf4", compute_dtype=torch.bfloat16)
    dorafit.attach(model, dorafit.AdapterConfig(method="dora", rank=rank, alpha=2 * rank, targets=TARGETS))
    return model.train()


def measure(model: nn.Module, ids: torch.Tensor, repeats: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()

    step()  # warm-up: AdamW state
    opt.zero_grad(set_to_none=True)
    peaks, times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        peaks.append(step_peak_bytes(step))
        times.append(time.perf_counter() - t0)
        opt.zero_grad(set_to_none=True)
    resident = resident_bytes(model, opt)
    return resident, statistics.median(peaks), statistics.median(times), sum(p.numel() for p in params)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base = build_base(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    results = {}
    for kind in ("fp32", "bf16", "nf4"):
        model = make_variant(base, kind, args.rank)
        results[kind] = measure(model, ids, args.repeats)
        del model

    rows = []
    fp32_total = results["fp32"][0] + results["fp32"][1]
    bf16_total = results["bf16"][0] + results["bf16"][1]
    for kind, (resident, peak, seconds, trainable) in results.items():
        total = resident + peak
        rows.append([
            kind, f"{trainable:,}", mib(resident), mib(peak), mib(total),
            f"{total / fp32_total:.2f}", f"{total / bf16_total:.2f}", f"{seconds:.2f}",
        ])
    print(
        f"LLaMA-shaped: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}; "
        f"DoRA r {args.rank} on {','.join(t.split('_')[0] for t in TARGETS)}; batch {args.batch} x {args.seq} tokens; "
        f"CPU, torch {torch.__version__}; median of {args.repeats} steps"
    )
    print(format_table(
        ["base", "trainable", "resident (model+AdamW)", "step peak above resident", "total peak",
         "vs fp32", "vs bf16", "step s"],
        rows,
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
