"""Trainable parameters per method on a LLaMA-shaped model, from ``dorafit.trainable_report``.

LlamaForCausalLM with random weights (default: 4 layers, hidden 1024, intermediate 2816,
16 heads, vocab 32000), every method at rank 8 on q,k,v,o,gate,up,down, plus the official
recipe's mix (DoRA on q,k,v, magnitude-only on the MLP). Prints a Markdown table.

Per adapted (out, in) layer at rank r:
    LoRA r (in + out)     DoRA r (in + out) + out     VeRA r + out     DVoRA r + 2 out
    magnitude-only out

    python benchmarks/count_trainable.py
"""

from __future__ import annotations

import argparse

import torch

import dorafit
from dorafit.bench import format_table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    cases = [(m, dorafit.AdapterConfig(method=m, rank=args.rank, alpha=2 * args.rank, targets=TARGETS))
             for m in ("lora", "dora", "vera", "dvora", "magnitude")]
    cases.append(("dora on q,k,v + magnitude on o,gate,up,down", dorafit.AdapterConfig(
        method="dora", rank=args.rank, alpha=2 * args.rank, targets=TARGETS,
        method_pattern={r".*self_attn\.o_proj": "magnitude", r".*mlp\..*": "magnitude"},
    )))
    rows, lora = [], None
    for label, config in cases:
        dorafit.attach(base, config)
        report = dorafit.trainable_report(base)
        dorafit.detach(base)
        lora = lora or report.trainable
        rows.append([label, f"{report.trainable:,}", f"{report.percent:.3f}", f"{lora / report.trainable:.1f}"])
    print(
        f"LLaMA-shaped: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
        f"{sum(p.numel() for p in base.parameters()):,} parameters; rank {args.rank} on {','.join(TARGETS)}"
    )
    print(format_table(["method", "trainable", "% of all", "LoRA / method"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
