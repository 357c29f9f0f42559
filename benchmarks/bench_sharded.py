"""Peak resident memory per process and step time of DoRA training spread over processes (CPU, gloo).

One LLaMA-shaped causal LM saved to a folder (``--make-model``: transformers' LlamaForCausalLM,
random weights), DoRA r 16 on q,k,v,o,gate,up,down, AdamW, the same global batch in every
layout, loaded and spread over the processes the way each flow does it:

  one           1 process: from_pretrained, attach
  fsdp-whole    every process loads the whole model, attaches, fully_shard (each then frees
                all but its shard: the peak holds the whole base)
  fsdp-meta     build on meta, attach (deferred), fully_shard, allocate, load_base (each process
                reads only its rows of the safetensors), materialize
  accelerate    accelerate's FSDP2 with cpu_ram_efficient_loading: rank 0 loads, the others
                build on meta and receive rank 0's values shard by shard
  tp            build on meta, split with the model's tensor-parallel plan, attach, allocate,
                load_base, materialize
  fsdp-tp       the same on a 2-D mesh: FSDP2 over the data dimension, TP inside

Per process: VmHWM (peak resident set, /proc/self/status) after loading and at the end, the
bytes of model tensors it holds (its shards, adapters included), and the median step time over
``--steps`` steps after one warm-up step; the table shows the largest over the processes.
Memory and time are measured in the processes themselves; run the whole script with the machine
otherwise idle, since the processes share its cores (on a 2-core machine 4 processes run at
half speed each: step-time ratios there measure the CPU, not the layout).

    python benchmarks/bench_sharded.py --make-model /tmp/llama-bench
    python benchmarks/bench_sharded.py --model /tmp/llama-bench --out benchmarks/results/sharded.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (flow, processes): the rows of the table, in order.
LAYOUTS = [("one", 1), ("fsdp-whole", 2), ("fsdp-meta", 2), ("accelerate", 2), ("tp", 2),
           ("fsdp-meta", 4), ("fsdp-tp", 4)]


def make_model(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    count = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    print(f"{folder}: {count / 1e6:.1f} M parameters")


# ------------------------------------------------------------------------------------------------
# One process of a layout


def peak_resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def held_mib(model) -> float:
    """MiB of the model's tensors this process holds (local shards of DTensors)."""
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        local = t.to_local() if hasattr(t, "device_mesh") else t
        if local.device.type == "meta" or local.data_ptr() in seen:  # tied tensors once
            continue
        seen.add(local.data_ptr())
        total += local.numel() * local.element_size()
    return total / 2**20


def build(flow: str, folder: Path, world: int):
    """The adapted model of ``flow`` and this process's data-parallel replica (index, count)."""
    import dorafit
    from dorafit import sharding
    from dorafit.train.distributed import shard_fully

    config = dorafit.AdapterConfig(method="dora", rank=16, alpha=32, targets=TARGETS)
    if flow == "one":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        dorafit.attach(model, config)
        return model, 0, 1
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    if flow == "fsdp-whole":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        dorafit.attach(model, config)
        return shard_fully(model), rank, world
    if flow == "accelerate":
        return _accelerate(folder, config), rank, world
    tp = {"fsdp-meta": 1, "tp": world, "fsdp-tp": 2}[flow]
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    model = _on_meta(folder)
    if tp > 1:
        sharding.parallelize_base(model, mesh["tp"])
    dorafit.attach(model, config)
    if world // tp > 1:
        shard_fully(model, mesh["dp"])
    sharding.allocate(model, "cpu")
    sharding.load_base(model, folder)
    dorafit.materialize(model)
    return model, mesh["dp"].get_local_rank(), world // tp


def _on_meta(folder: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) computed for real
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def _accelerate(folder: Path, config):
    """accelerate's FSDP2 with cpu_ram_efficient_loading, on the CPU (the Accelerator of the
    tests' worker: accelerate refuses FSDP on a CPU-only launch, so its state is told after)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import dorafit

    sys.path.insert(0, str(ROOT / "tests"))
    from sharding_worker import cpu_fsdp2_accelerator

    accelerator = cpu_fsdp2_accelerator()
    model = AutoModelForCausalLM.from_pretrained(folder) if dist.get_rank() == 0 else _on_meta(folder)
    torch.manual_seed(0)
    dorafit.attach(model, config)
    model = accelerator.prepare(model)
    dorafit.materialize(model)
    return model


def worker(flow: str, folder: Path, out: Path, steps: int, batch: int, seq: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    model, replica, replicas = build(flow, folder, world)
    loaded_mib, loaded_peak = held_mib(model), peak_resident_mib()
    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
    mine = ids[replica * batch // replicas:(replica + 1) * batch // replicas]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=mine, labels=mine).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    result = {"rank": int(os.environ.get("RANK", "0")), "held_mib": loaded_mib, "peak_after_load_mib": loaded_peak,
              "peak_mib": peak_resident_mib(), "step_s": statistics.median(times)}
    out.joinpath(f"rank{result['rank']}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The driver


def run_layout(flow: str, processes: int, folder: Path, args) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{flow}-"))
    cmd = [sys.executable, __file__, "--worker", flow, "--model", str(folder), "--result", str(out),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    if processes > 1:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(processes), *cmd[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, 2 // processes))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        causes = [line.strip() for line in done.stderr.splitlines() if "what():" in line or "Error: " in line]
        raise RuntimeError(f"{flow} x{processes} failed: {causes[0] if causes else done.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    shutil.rmtree(out, ignore_errors=True)
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--make-model", type=Path, help="write the benchmark model to this folder and stop")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="rows of the global batch")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_model:
        make_model(args.make_model, args.hidden, args.intermediate, args.layers, args.vocab)
        return
    if args.worker:
        worker(args.worker, args.model, args.result, args.steps, args.batch, args.seq)
        return
    rows, one_step = [], None
    size = sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 2**20
    for flow, processes in LAYOUTS:
        try:
            ranks = run_layout(flow, processes, args.model, args)
        except RuntimeError as err:  # a failing layout is a row of the table, with its first error line
            rows.append(f"| {flow} | {processes} | {str(err)[:400]} | | | | |")
            print(rows[-1], file=sys.stderr, flush=True)
            continue
        step = max(r["step_s"] for r in ranks)
        one_step = one_step or step
        rows.append(f"| {flow} | {processes} | {max(r['held_mib'] for r in ranks):.0f} | "
                    f"{max(r['peak_after_load_mib'] for r in ranks):.0f} | {max(r['peak_mib'] for r in ranks):.0f} | "
                    f"{step:.2f} | {step / one_step:.2f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"model: {args.model.name}, {size:.0f} MiB of float32 safetensors; global batch {args.batch} x {args.seq} tokens; "
        f"DoRA r 16 on q,k,v,o,gate,up,down; torch {torch.__version__}, gloo on the CPU",
        "",
        "| flow | processes | model tensors held per process (MiB) | peak resident after loading (MiB) | "
        "peak resident (MiB) | step (s) | step ÷ one process |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
