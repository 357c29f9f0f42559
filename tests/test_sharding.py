"""Sharded models: tensor-parallel plans, shard-by-shard base loading, and the multi-process flows.

The multi-process checks run once per session in two CPU processes (torchrun, gloo; see
tests/sharding_worker.py for what each rank does) and are compared here with one process
running the same model on the same rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dorafit
from dorafit import sharding

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sharding_worker as worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ["load_base_fsdp", "qdora_fsdp", "tp", "tp_meta", "fsdp_meta", "fsdp_accelerate", "refusals", "tp_variants", "tp_transformers"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LLaMA (hidden 32, 4 heads, 2 key/value heads) saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------
# One process


def test_model_tp_plan_is_the_llama_plan(llama_dir):
    plan = sharding.model_tp_plan(load(llama_dir))
    assert plan["model.layers.1.self_attn.q_proj"] == "colwise"
    assert plan["model.layers.0.mlp.down_proj"] == "rowwise"
    styles = {name.rsplit(".", 1)[1]: style for name, style in plan.items()}
    assert styles == {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "gate_proj": "colwise",
                      "up_proj": "colwise", "o_proj": "rowwise", "down_proj": "rowwise"}
    assert len(plan) == 14  # 7 per layer; the embedding and the head stay whole


def test_model_without_a_plan_is_refused():
    with pytest.raises(sharding.ShardingError, match="no tensor-parallel plan"):
        sharding.model_tp_plan(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_load_base_fills_an_adapted_model_from_the_files(llama_dir):
    model = load(llama_dir)
    dorafit.attach(model, worker.adapter_config())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    loaded = sharding.load_base(model, llama_dir)
    assert "model.layers.0.self_attn.q_proj.weight" in loaded  # the base checkpoint's key
    state = model.state_dict()
    for key, value in reference.items():
        if key.endswith(("lora_a", "lora_b", "magnitude")):
            assert not state[key].any(), key  # adapter tensors are not in a base checkpoint
        else:
            assert torch.equal(state[key], value), key


def test_load_base_names_the_tensor_whose_shape_differs(llama_dir, tmp_path):
    files = load_file(str(llama_dir / "model.safetensors"))
    files["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    save_file(files, str(tmp_path / "model.safetensors"))
    with pytest.raises(sharding.ShardingError, match=r"model.layers.1.mlp.up_proj.weight has shape \(3, 3\), the model's is \(64, 32\)"):
        sharding.load_base(load(llama_dir), tmp_path)


def test_load_base_refuses_tensors_left_on_meta(llama_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama_dir))
    with pytest.raises(sharding.ShardingError, match="still on the meta device.*to_empty"):
        sharding.load_base(model, llama_dir)
    sharding.allocate(model, "cpu")  # the rotary table computed at construction survives
    sharding.load_base(model, llama_dir)
    ids = worker.batch()
    assert torch.equal(model(input_ids=ids).logits, load(llama_dir)(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------------
# Two processes


def run_workers(llama_dir: Path, out: Path, processes: int, cases: list[str]) -> Path:
    """Run ``cases`` of the worker once in ``processes`` processes; the folder of their results."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(processes),
                           str(ROOT / "tests" / "sharding_worker.py"), str(out), str(llama_dir), *cases],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def two_processes(llama_dir, tmp_path_factory) -> Path:
    return run_workers(llama_dir, tmp_path_factory.mktemp("ranks"), 2, CASES)


@pytest.fixture(scope="module")
def four_processes(llama_dir, tmp_path_factory) -> Path:
    return run_workers(llama_dir, tmp_path_factory.mktemp("ranks4"), 4, ["fsdp_tp"])


def results(out: Path, case: str, processes: int = 2) -> list[dict]:
    ranks = [json.loads((out / f"{case}-rank{r}.json").read_text()) for r in range(processes)]
    for r in ranks:
        assert "error" not in r, r["error"]
    return ranks


def reference_losses(model, steps: int = worker.STEPS) -> list[float]:
    """One process, the two processes' rows together (both halves of the batch)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = worker.batch(), []
    for _ in range(steps):
        # The mean of the two halves' losses: what data parallelism averages.
        loss = (model(input_ids=ids[:2], labels=ids[:2]).loss + model(input_ids=ids[2:], labels=ids[2:]).loss) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.distributed
def test_fsdp_from_meta_each_rank_loads_its_half_of_the_base(two_processes, llama_dir):
    ranks = results(two_processes, "load_base_fsdp")
    ids = worker.batch()
    with torch.no_grad():
        model = load(llama_dir)
        expected = (model(input_ids=ids[:2], labels=ids[:2]).loss + model(input_ids=ids[2:], labels=ids[2:]).loss) / 2
    for r in ranks:
        assert r["local_share"] == pytest.approx(0.5)
        assert r["max_diff"] == 0.0
        assert abs(r["loss"] - float(expected)) <= 1e-6


@pytest.mark.distributed
def test_qdora_under_fsdp2_trains_like_one_process_and_saves_its_files(two_processes, llama_dir, tmp_path):
    from dorafit import quant

    pytest.importorskip("bitsandbytes")
    ranks = results(two_processes, "qdora_fsdp")
    model = load(llama_dir)
    quant.quantize_model(model, worker.TARGETS, "nf4", compute_dtype=torch.float32, quant_storage=torch.bfloat16)
    torch.manual_seed(1)
    dorafit.attach(model, worker.adapter_config())
    expected = reference_losses(model)
    for r in ranks:
        assert r["local_share"] == pytest.approx(0.5)  # each rank holds half of the packed 4-bit codes
        assert max(abs(a - b) for a, b in zip(r["losses"], expected)) <= 1e-5
    # save_adapter and save_pretrained called on both ranks give one process's files.
    dorafit.save_adapter(model, tmp_path / "dorafit")
    model.save_pretrained(tmp_path / "pretrained")
    for name in ("dorafit", "pretrained"):
        same_files(tmp_path / name, two_processes / f"qdora_fsdp-{name}")
    # A merge would replace the 4-bit layers FSDP2 holds: refused on every rank, in one line that
    # says where to merge instead; keep_adapter (unmerge's record) is one-process only.
    for r in ranks:
        assert "'model.layers.0.self_attn.q_proj': its base is quantized and sharded by FSDP2" in r["merge_refused"]["False"]
        assert "merge it on one process (dorafit merge); nothing was merged" in r["merge_refused"]["False"]
        assert "split over processes" in r["merge_refused"]["True"]


def one_process(llama_dir):
    """The tiny LLaMA with DoRA attached as one process does it (the workers' seed)."""
    model = load(llama_dir)
    torch.manual_seed(1)
    dorafit.attach(model, worker.adapter_config())
    return model


def whole_batch_steps(model) -> tuple[list[float], dict]:
    """One process, every row (as each tensor-parallel rank sees them): the losses of the AdamW
    steps and the first step's gradients."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = worker.batch(), []
    for step in range(worker.STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, grads


def same_files(ours: Path, theirs: Path) -> None:
    """Two adapter folders hold the same files, config and tensors (within 1e-5)."""
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert json.loads((ours / "adapter_config.json").read_text()) == json.loads((theirs / "adapter_config.json").read_text())
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(theirs / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["tp", "tp_meta", "tp_transformers"])
def test_tensor_parallel_trains_merges_and_saves_like_one_process(two_processes, llama_dir, tmp_path, case):
    """The LLaMA plan over 2 processes (colwise q, k, v, gate, up; rowwise o, down) applied by
    torch's styles (on the loaded base, or on meta then materialized) or by transformers'
    ``tp_plan="auto"``, then attach: first-step gradients, 3 AdamW steps, the adapter files and
    the merged weights equal one process's."""
    ranks = results(two_processes, case)
    model = one_process(llama_dir)
    losses, grads = whole_batch_steps(model)
    for r in ranks:
        assert r["local_share"] == pytest.approx(0.5)
        assert max(abs(a - b) for a, b in zip(r["losses"], losses)) <= 1e-5
    theirs = load_file(str(two_processes / f"{case}-grads.safetensors"))
    assert theirs.keys() == grads.keys()
    assert max(float((theirs[k] - grads[k]).abs().max()) for k in grads) <= 1e-5
    assert max(float(grads[k].abs().max()) for k in grads if k.endswith("lora_b")) > 0  # B moves at step 1
    dorafit.save_adapter(model, tmp_path / "dorafit")
    model.save_pretrained(tmp_path / "pretrained")
    for name in ("dorafit", "pretrained"):
        same_files(tmp_path / name, two_processes / f"{case}-{name}")
    same_merged_model(model, tmp_path / "merged", two_processes / f"{case}-merged")
    merged = load_file(str(two_processes / f"{case}-merged.safetensors"))
    ours = {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    assert merged.keys() == ours.keys() and len(ours) == 14
    assert max(float((merged[k] - ours[k]).abs().max()) for k in ours) <= 1e-5


def same_merged_model(model, ours: Path, theirs: Path) -> None:
    """``model`` merged and saved to ``ours`` gives the folder ``theirs`` the ranks wrote: the same
    files and config, every tensor whole and within 1e-5."""
    dorafit.merge(model)
    model.save_pretrained(ours)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def trains_like_one_process(ranks: list, share: float, llama_dir, tmp_path, saved) -> None:
    """Each rank held ``share`` of each split weight, its losses equal one process's within 1e-5,
    and the adapter files the ranks saved (``saved``, <case>-dorafit) equal one process's; merged
    in place, each rank's model gives the adapted model's loss, and the merged model the ranks
    saved (<case>-merged) is one process's."""
    model = one_process(llama_dir)
    expected = reference_losses(model)
    for r in ranks:
        assert r["local_share"] == pytest.approx(share)
        assert max(abs(a - b) for a, b in zip(r["losses"], expected)) <= 1e-5
        assert r["plain"] == "Linear" and abs(r["loss_merged"] - r["loss_adapted"]) <= 1e-5
    dorafit.save_adapter(model, tmp_path / "dorafit")
    same_files(tmp_path / "dorafit", saved)
    same_merged_model(model, tmp_path / "merged", saved.with_name(saved.name.replace("-dorafit", "-merged")))


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["fsdp_meta", "fsdp_accelerate"])
def test_fsdp2_from_meta_trains_like_one_process(two_processes, llama_dir, tmp_path, case):
    """FSDP2 with the base on meta: (fsdp_meta) every rank builds on meta, attaches, shards, loads
    its rows of the files and materializes; (fsdp_accelerate) accelerate's
    cpu_ram_efficient_loading, rank 0 loading and broadcasting. Losses, adapter and the model
    merged in place (and saved from every rank) equal one process on the same rows within 1e-5."""
    trains_like_one_process(results(two_processes, case), 0.5, llama_dir, tmp_path, two_processes / f"{case}-dorafit")


@pytest.mark.distributed
def test_fsdp_by_tensor_parallel_on_a_2d_mesh_of_4_processes(four_processes, llama_dir, tmp_path):
    """2 data-parallel replicas x 2 tensor-parallel ranks, from meta: each process holds a quarter
    of each split weight; losses and adapter equal one process on the replicas' rows."""
    trains_like_one_process(results(four_processes, "fsdp_tp", 4), 0.25, llama_dir, tmp_path,
                            four_processes / "fsdp_tp-dorafit")


@pytest.mark.distributed
def test_layouts_dorafit_cannot_follow_get_one_line(two_processes):
    ranks = results(two_processes, "refusals")
    for r in ranks:
        assert "attach the adapters before fully_shard" in r["fully_sharded"]
        assert r["embedding"].startswith("module 'model.embed_tokens': a tensor-parallel Embedding (S(0)) cannot be adapted")
    # A whole model merged on rank 0 alone while a process group exists: merge asks no other rank.
    assert ranks[0]["merged_by_rank_0"] == "Linear" and "merged_by_rank_0" not in ranks[1]


@pytest.mark.distributed
@pytest.mark.parametrize("variant", list(worker.VARIANTS))
def test_tensor_parallel_lora_magnitude_and_the_norm_gradient(two_processes, llama_dir, variant):
    """The other methods on the split base, and DoRA whose norm keeps its gradient (the partial
    squares' gradient summed over the ranks): first-step gradients and 3 steps as one process."""
    ranks = results(two_processes, "tp_variants")
    model = load(llama_dir)
    torch.manual_seed(1)
    dorafit.attach(model, worker.variant_config(variant))
    losses, grads = whole_batch_steps(model)
    for r in ranks:
        assert max(abs(a - b) for a, b in zip(r[variant], losses)) <= 1e-5
    theirs = load_file(str(two_processes / f"tp_variants-{variant}-grads.safetensors"))
    assert theirs.keys() == grads.keys()
    assert max(float((theirs[k] - grads[k]).abs().max()) for k in grads) <= 1e-5


def test_a_tensor_parallel_layer_keeps_its_norms_across_storage_moves():
    """Under FSDP2 x TP a layer's parameters are gathered into new storage for each forward, at
    addresses that differ between ranks; a recomputed norm of a rowwise layer is a collective, so
    the kept values must not depend on addresses (else one rank all-reduces while its peer does
    not, and gloo fails on mismatched sizes). Such a layer keys its cache by parameter object and
    version: a move keeps ‖W0‖², an in-place write (a new version) drops it."""
    from torch import nn

    from dorafit.layers.cache import NormCache
    from dorafit.layers.parallel import TensorParallelLinearAdapter

    assert TensorParallelLinearAdapter.keys_by_identity

    class Layer(nn.Module):
        keys_by_identity = True

        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 3)
            self.computed = 0

        def initial_weight_norm_sq(self):
            self.computed += 1
            return self.base.weight.detach().pow(2).sum(1)

    layer, cache = Layer(), NormCache()
    cache.w0_norm_sq(layer)
    layer.base.weight.data = layer.base.weight.data.clone()  # new storage, same values and object
    cache.w0_norm_sq(layer)
    assert layer.computed == 1
    with torch.no_grad():
        layer.base.weight.mul_(2)  # a write: the version moves
    assert torch.allclose(cache.w0_norm_sq(layer), layer.base.weight.detach().pow(2).sum(1))
    assert layer.computed == 2
    Layer.keys_by_identity = False  # the storage rule, for contrast: the move alone recomputes
    layer.base.weight.data = layer.base.weight.data.clone()
    cache.w0_norm_sq(layer)
    assert layer.computed == 3
