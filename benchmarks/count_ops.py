"""What one adapted layer launches, LoRA against DoRA: the costs a CPU hides and a GPU shows.

On a GPU every aten operator is at least one kernel launch (5–10 µs), every elementwise pass over
a (tokens, out) tensor is memory traffic, and every read of a value by Python stalls the stream.
This script counts them exactly (``dorafit.bench.count_ops``, a TorchDispatchMode) for one
adapted nn.Linear, r 16, per call:

    train         forward + backward right after an optimizer step (the norm is due)
    accumulation  forward + backward of a later micro-batch (the norm is kept)
    eval          a no-grad forward in eval mode (g is kept)
    decode        the same with one token

and prints aten operators (views excluded), bytes written by non-matmul operators whose output
has tokens × out or tokens × in elements (the elementwise passes over activations), those
written by the other non-matmul operators (e.g. g ⊙ W0 with more tokens than inputs), and host
syncs; then the host syncs of whole steps of a small LLaMA for every method, against the same
model without adapters. ``--compiled`` adds the kernels inductor generates for the layer under
torch.compile (forward and backward graphs, the norm due and kept, evaluation), beside the
extern (matmul) kernels it calls.

    python benchmarks/count_ops.py                        # eager counts (seconds)
    python benchmarks/count_ops.py --compiled             # + inductor kernels (minutes on a CPU)
    python benchmarks/count_ops.py --device cuda --compiled
    python benchmarks/count_ops.py --dorafit /path/to/other/checkout   # another version's layers
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from typing import Dict, List, Tuple

SHAPES: List[Tuple[str, int, int, int]] = [  # (name, tokens, in, out)
    ("1024² · 512 tokens", 512, 1024, 1024),
    ("4096² · 64 tokens", 64, 4096, 4096),
    ("SmolLM2 q 576→576 · 512", 512, 576, 576),
    ("SmolLM2 k, v 576→192 · 512", 512, 576, 192),
    ("SmolLM2 up 576→1536 · 512", 512, 576, 1536),
    ("SmolLM2 down 1536→576 · 512", 512, 1536, 576),
    # More tokens than inputs: g scales the rows of W0 and B (paths dora-linear-rows, dora-no-grad-rows).
    ("1024² · 4096 tokens", 4096, 1024, 1024),
    ("SmolLM2 q 576→576 · 2048", 2048, 576, 576),
]


def _other_mib(count) -> str:
    """Bytes of the other non-matmul outputs (weight-sized temporaries, vectors); an older
    checkout's counter (``--dorafit``) does not have them."""
    other = getattr(count, "other_bytes", None)
    return "—" if other is None else f"{other / 2**20:.2f}"


def eager_table(calls, bias: bool, device: str) -> str:
    from dorafit.bench import count_layer_ops

    lines = [f"### aten operators per call, bias={bias}, r 16, float32, device {device}", "",
             "| layer | call | LoRA ops | DoRA ops | DoRA − LoRA | LoRA elementwise MiB | DoRA elementwise MiB | DoRA ÷ LoRA bytes | other MiB, LoRA / DoRA | host syncs (LoRA / DoRA) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    extra: Dict[str, str] = {}
    for name, tokens, in_f, out_f in SHAPES:
        for call in calls:
            lora = count_layer_ops("lora", tokens, in_f, out_f, call, bias=bias, device=device)
            dora = count_layer_ops("dora", tokens, in_f, out_f, call, bias=bias, device=device)
            ratio = f"{dora.elementwise_bytes / lora.elementwise_bytes:.2f}" if lora.elementwise_bytes else "—"
            lines.append(f"| {name} | {call} | {len(lora)} | {len(dora)} | {len(dora) - len(lora):+d} | "
                         f"{lora.elementwise_bytes / 2**20:.2f} | {dora.elementwise_bytes / 2**20:.2f} | {ratio} | "
                         f"{_other_mib(lora)} / {_other_mib(dora)} | {lora.syncs} / {dora.syncs} |")
            if name == SHAPES[0][0]:
                more = collections.Counter(dora.ops)
                more.subtract(collections.Counter(lora.ops))
                extra[call] = ", ".join(f"{op} {n:+d}" for op, n in sorted(more.items()) if n)
    lines += ["", f"Operators DoRA adds or saves on {SHAPES[0][0]}:"]
    lines += [f"- {call}: {ops}" for call, ops in extra.items()]
    return "\n".join(lines) + "\n"


_KERNEL = re.compile(r"^\s+(?:(cpp_fused_\w+|triton_\w+)(?:\.run)?\(|(extern_kernels\.\w+)\()", re.M)


def _launches(code: str) -> Tuple[int, int]:
    """(generated kernels, extern kernels) called by the ``call`` function of one output module."""
    body = code[code.index("def call("):] if "def call(" in code else code
    found = _KERNEL.findall(body)
    return sum(1 for g, _ in found if g), sum(1 for _, e in found if e)


def compiled_counts(method: str, tokens: int, in_f: int, out_f: int, device: str) -> Dict[str, Tuple[int, int]]:
    """Inductor's kernels for one adapted layer: {graph: (generated, extern)}."""
    import torch
    from torch._inductor.utils import run_and_get_code

    import dorafit

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to(device)
    dorafit.attach(model, dorafit.AdapterConfig(method=method, rank=16, alpha=32, targets=["0"]))
    with torch.no_grad():
        model[0].lora_b.normal_(0, 0.02)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(tokens, in_f, device=device, requires_grad=True)
    out: Dict[str, Tuple[int, int]] = {}

    def record(label, fn):
        _, codes = run_and_get_code(fn)
        for n, code in enumerate(codes):
            out[f"{label} {'forward' if n == 0 else 'backward'}"] = _launches(code)

    for label in ("norm due", "norm kept"):
        record(label, lambda: compiled(x).pow(2).mean().backward())
    optimizer.step()
    model.eval()
    with torch.no_grad():
        compiled(x)  # evaluation right after a step: the norm due
        record("eval, norm kept", lambda: compiled(x))
    return out


def compiled_table(shape, device: str) -> str:
    name, tokens, in_f, out_f = shape
    counts = {m: compiled_counts(m, tokens, in_f, out_f, device) for m in ("lora", "dora")}
    lines = [f"### torch.compile (inductor), {name}, device {device}: kernels per graph, generated + extern (matmuls)", "",
             "| graph | LoRA | DoRA | DoRA − LoRA generated |", "|---|---|---|---|"]
    for graph in counts["dora"]:
        lora = counts["lora"].get(graph)  # LoRA's graph does not depend on the norm: one variant
        if lora is None:
            lora = counts["lora"].get(graph.replace("norm kept", "norm due"), (0, 0))
        dora = counts["dora"][graph]
        lines.append(f"| {graph} | {lora[0]} + {lora[1]} | {dora[0]} + {dora[1]} | {dora[0] - lora[0]:+d} |")
    return "\n".join(lines) + "\n"


def model_syncs(device: str) -> str:
    """Host syncs of a training step, an evaluation forward and a 3-token greedy generation of a
    2-layer LLaMA (every projection adapted), per method, beside the model without adapters."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import dorafit
    from dorafit.bench import count_step_syncs

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg).to(device)
    ids = torch.randint(0, 128, (2, 16), device=device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def syncs(model):
        return list(count_step_syncs(model, ids).values())

    lines = [f"### host syncs per step, 2-layer LLaMA, 14 adapted projections, device {device}", "",
             "| model | training step (fwd + bwd) | evaluation forward | generate 3 tokens |", "|---|---|---|---|"]
    lines.append("| no adapters | " + " | ".join(map(str, syncs(copy.deepcopy(base)))) + " |")
    for method in ("lora", "dora", "magnitude", "vera", "dvora"):
        for dropout in (0.0, 0.05):
            model = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(method=method, rank=8, targets=targets, dropout=dropout))
            lines.append(f"| {method}, dropout {dropout} | " + " | ".join(map(str, syncs(model))) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--call", action="append", choices=["train", "accumulation", "eval", "decode"])
    parser.add_argument("--compiled", action="store_true", help="also inductor's kernels (compiles each graph)")
    parser.add_argument("--compiled-shape", type=int, default=0, help="index into SHAPES for --compiled")
    parser.add_argument("--dorafit", help="import dorafit from this checkout instead (a baseline)")
    args = parser.parse_args(argv)
    if args.dorafit:
        sys.path.insert(0, args.dorafit)
    import torch

    import dorafit

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, dorafit from {dorafit.__file__}\n")
    calls = args.call or ["train", "accumulation", "eval", "decode"]
    for bias in (False, True):
        print(eager_table(calls, bias, args.device), flush=True)
    print(model_syncs(args.device), flush=True)
    if args.compiled:
        print(compiled_table(SHAPES[args.compiled_shape], args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
