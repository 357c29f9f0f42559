"""One rank of the multi-process checks of tests/test_sharding.py (run by torchrun, gloo, CPU).

    torchrun --standalone --nproc_per_node 2 tests/sharding_worker.py OUT MODEL CASE [CASE ...]

Every case builds its model from the tiny LLaMA folder MODEL the way a user of that flow would,
trains or evaluates it on the batch ``batch()`` (the same rows a one-process reference in the test
uses), and returns what the test compares: losses (every rank), and files that dorafit's writers
put under OUT (called on every rank, written by rank 0). Each rank writes OUT/<case>-rank<r>.json.
A case that raises writes its error instead, so that the test shows it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dorafit  # noqa: E402
from dorafit import sharding  # noqa: E402
from dorafit.train.distributed import full_tensor, shard_fully  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 3


def batch() -> torch.Tensor:
    """(4, 12) token ids; rows 2r, 2r+1 are rank r's under data parallelism."""
    return torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))


def adapter_config(method: str = "dora") -> dorafit.AdapterConfig:
    return dorafit.AdapterConfig(method=method, rank=4, alpha=8, targets=TARGETS)


def train(model, ids: torch.Tensor, steps: int = STEPS) -> list[float]:
    """``steps`` AdamW steps on ``ids``; the loss of each step (mean over the processes' rows)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return [float(_mean_over_ranks(t)) for t in losses]


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Whole adapter tensors by name (a collective for sharded ones)."""
    return {k: full_tensor(v).detach().cpu().clone() for k, v in dorafit.adapter_state_dict(model).items()}


def my_rows(ids: torch.Tensor) -> torch.Tensor:
    r = dist.get_rank()
    return ids[2 * r:2 * r + 2]


# ------------------------------------------------------------------------------------------------
# Cases


def case_load_base_fsdp(model_dir: Path, out: Path) -> dict:
    """Build on meta, fully_shard, allocate, load the base shard by shard: every rank holds half
    of each sharded weight, and the gathered weights and the loss equal the files' model."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    shard_fully(model)
    sharding.allocate(model, "cpu")
    sharding.load_base(model, model_dir)
    files = load_file(str(model_dir / "model.safetensors"))
    local = sum(p.to_local().numel() for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())
    worst = max(float((full_tensor(p.detach()) - files[n]).abs().max()) for n, p in model.named_parameters())
    with torch.no_grad():
        loss = model(input_ids=my_rows(batch()), labels=my_rows(batch())).loss
    return {"local_share": local / whole, "max_diff": worst, "loss": float(_mean_over_ranks(loss))}


def case_qdora_fsdp(model_dir: Path, out: Path) -> dict:
    """QDoRA: NF4 base (bf16 quant storage), DoRA adapters, FSDP2, 3 AdamW steps."""
    from transformers import AutoModelForCausalLM

    from dorafit import quant

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    quant.quantize_model(model, TARGETS, "nf4", compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    shard_fully(model)
    weight = model.model.layers[0].self_attn.q_proj.base.weight
    local_share = weight.to_local().numel() / weight.numel()
    losses = train(model, my_rows(batch()))
    # Every rank calls the writers; rank 0 writes whole tensors.
    dorafit.save_adapter(model, out / "qdora_fsdp-dorafit")
    model.save_pretrained(out / "qdora_fsdp-pretrained")
    refusals = {}
    for keep in (False, True):
        try:
            dorafit.merge(model, keep_adapter=keep)
        except dorafit.AdapterError as err:
            refusals[str(keep)] = str(err)
    return {"losses": losses, "local_share": local_share, "merge_refused": refusals,
            "files": sorted(p.name for p in (out / "qdora_fsdp-dorafit").iterdir())}


def _on_meta(model_dir: Path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # buffers (the rotary table) are computed for real
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


def _tp_run(model, out: Path, case: str) -> dict:
    """Every rank sees the whole batch: the first step's gradients, 3 AdamW steps, then the
    adapter files (save_adapter, save_pretrained) and the merged weights, whole, from rank 0."""
    from safetensors.torch import save_file

    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], {}
    for step in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    dorafit.save_adapter(model, out / f"{case}-dorafit")
    model.save_pretrained(out / f"{case}-pretrained")
    dorafit.merge(model)
    model.save_pretrained(out / f"{case}-merged")
    merged = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    if dist.get_rank() == 0:
        save_file(grads, str(out / f"{case}-grads.safetensors"))
        save_file(merged, str(out / f"{case}-merged.safetensors"))
    weight = model.model.layers[0].self_attn.q_proj.weight
    return {"losses": losses, "local_share": weight.to_local().numel() / weight.numel()}


def case_tp(model_dir: Path, out: Path) -> dict:
    """Tensor parallel with the model's plan (colwise q, k, v, gate, up; rowwise o, down), then
    attach: gradients, 3 steps, files and merge against one process."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sharding.parallelize_base(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    return _tp_run(model, out, "tp")


VARIANTS = {"lora": dict(method="lora"), "magnitude": dict(method="magnitude"),
            "dora-full-norm-gradient": dict(method="dora", detach_norm=False)}


def variant_config(name: str) -> dorafit.AdapterConfig:
    return dorafit.AdapterConfig(rank=4, alpha=8, targets=TARGETS, **VARIANTS[name])


def case_tp_variants(model_dir: Path, out: Path) -> dict:
    """LoRA, magnitude-only and DoRA with the norm's gradient kept (detach_norm=False) on the
    tensor-parallel base: the first step's gradients (whole) and 3 steps' losses."""
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    found = {}
    for name in VARIANTS:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        sharding.parallelize_base(model, mesh)
        torch.manual_seed(1)
        dorafit.attach(model, variant_config(name))
        ids, losses = batch(), []
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if step == 0:
                grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
                if dist.get_rank() == 0:
                    save_file(grads, str(out / f"tp_variants-{name}-grads.safetensors"))
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        found[name] = losses
    return found


def case_tp_transformers(model_dir: Path, out: Path) -> dict:
    """transformers' own tensor parallel (``from_pretrained(tp_plan="auto")``), then attach."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto")
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    return _tp_run(model, out, "tp_transformers")


def case_tp_meta(model_dir: Path, out: Path) -> dict:
    """Tensor parallel from meta: split, attach, allocate, load each rank's slices, materialize."""
    from torch.distributed.device_mesh import init_device_mesh

    model = _on_meta(model_dir)
    sharding.parallelize_base(model, init_device_mesh("cpu", (dist.get_world_size(),)))
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    sharding.allocate(model, "cpu")
    sharding.load_base(model, model_dir)
    dorafit.materialize(model)
    return _tp_run(model, out, "tp_meta")


def _fsdp_run(model, out: Path, case: str, rows: torch.Tensor | None = None) -> dict:
    """3 AdamW steps on ``rows`` (default this rank's), the adapter saved; then merged in place:
    the loss on the same rows before and after the merge, and the merged model saved."""
    rows = my_rows(batch()) if rows is None else rows
    weight = model.model.layers[0].self_attn.q_proj.base.weight
    local_share = weight.to_local().numel() / weight.numel()
    losses = train(model, rows)
    dorafit.save_adapter(model, out / f"{case}-dorafit")
    with torch.no_grad():
        adapted = model(input_ids=rows, labels=rows).loss
        dorafit.merge(model)
        merged = model(input_ids=rows, labels=rows).loss
    model.save_pretrained(out / f"{case}-merged")
    return {"losses": losses, "local_share": local_share, "loss_adapted": float(adapted), "loss_merged": float(merged),
            "plain": type(model.model.layers[0].self_attn.q_proj).__name__}


def case_fsdp_meta(model_dir: Path, out: Path) -> dict:
    """Plain FSDP2 from meta: build on meta, attach, fully_shard, allocate, load each rank's rows
    of the safetensors, materialize; 3 AdamW steps on this rank's rows."""
    model = _on_meta(model_dir)
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    shard_fully(model)
    sharding.allocate(model, "cpu")
    sharding.load_base(model, model_dir)
    dorafit.materialize(model)
    return _fsdp_run(model, out, "fsdp_meta")


def case_fsdp_accelerate(model_dir: Path, out: Path) -> dict:
    """accelerate's FSDP2 with cpu_ram_efficient_loading: rank 0 loads the model and attaches,
    the others build on meta and attach; ``prepare`` shards and broadcasts rank 0's values;
    materialize; 3 AdamW steps on this rank's rows."""
    from transformers import AutoModelForCausalLM

    accelerator = cpu_fsdp2_accelerator()
    model = AutoModelForCausalLM.from_pretrained(model_dir) if dist.get_rank() == 0 else _on_meta(model_dir)
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    model = accelerator.prepare(model)
    dorafit.materialize(model)
    return _fsdp_run(model, out, "fsdp_accelerate")


def case_fsdp_tp(model_dir: Path, out: Path) -> dict:
    """4 processes on a 2-D mesh, 2 data-parallel replicas x 2 tensor-parallel ranks, from meta:
    split with the LLaMA plan over "tp", attach, fully_shard over "dp", allocate, load each
    process's slices, materialize; 3 AdamW steps, replica r on rows 2r, 2r+1."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _on_meta(model_dir)
    sharding.parallelize_base(model, mesh["tp"])
    torch.manual_seed(1)
    dorafit.attach(model, adapter_config())
    shard_fully(model, mesh["dp"])
    sharding.allocate(model, "cpu")
    sharding.load_base(model, model_dir)
    dorafit.materialize(model)
    weight = model.model.layers[0].self_attn.q_proj.base.weight
    local_share = weight.to_local().numel() / weight.numel()
    replica = mesh["dp"].get_local_rank()
    return _fsdp_run(model, out, "fsdp_tp", batch()[2 * replica:2 * replica + 2])


def case_refusals(model_dir: Path, out: Path) -> dict:
    """The one-line messages: attach after fully_shard; a target split in a way dorafit cannot
    follow (a rowwise embedding: Shard(0) of an nn.Embedding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    messages = {}
    model = shard_fully(AutoModelForCausalLM.from_pretrained(model_dir))
    try:
        dorafit.attach(model, adapter_config())
    except ValueError as err:
        messages["fully_sharded"] = str(err)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sharding.parallelize_base(model, init_device_mesh("cpu", (dist.get_world_size(),)), {"model.embed_tokens": "rowwise"})
    try:
        dorafit.attach(model, dorafit.AdapterConfig(rank=4, targets=["embed_tokens"]))
    except ValueError as err:
        messages["embedding"] = str(err)
    # A whole (unsplit) model merged by rank 0 alone, as a data-parallel script does before it
    # saves: no collective, so the other rank's barrier below is the only one it meets.
    if dist.get_rank() == 0:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        dorafit.attach(model, adapter_config())
        messages["merged_by_rank_0"] = type(dorafit.merge(model).model.layers[0].self_attn.q_proj).__name__
    dist.barrier()
    return messages


def cpu_fsdp2_accelerator():
    """accelerate's Accelerator with its FSDP2 plugin and cpu_ram_efficient_loading, on the CPU:
    accelerate launches FSDP on GPUs only, so the state is told FSDP after it is made (all that
    ``prepare`` reads)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


# ------------------------------------------------------------------------------------------------


def main() -> None:
    out, model_dir, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    for case in cases:
        try:
            result = globals()[f"case_{case}"](model_dir, out)
        except Exception:  # reported to the test, which fails showing it
            result = {"error": traceback.format_exc()}
        (out / f"{case}-rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
