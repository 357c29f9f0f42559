"""Several processes: process-group setup, DDP / FSDP2 / tensor-parallel wrapping, checkpoints.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK), the recipe joins a process
group (NCCL on GPUs, gloo on CPUs) and spreads the adapted model over the processes:

- ``ddp``: ``DistributedDataParallel``; every process holds the whole model, gradients of the
  trainable (adapter) parameters are averaged after backward.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer block and then
  on the root; parameters become DTensors sharded over the processes and are gathered per
  block in forward and backward.
- ``tp``: tensor parallel. The model's own plan (transformers' ``base_model_tp_plan``: colwise
  q, k, v, gate, up; rowwise o, down for LLaMA) is applied with torch's ``parallelize_module``
  before the adapters are attached; the adapters follow their base layer's sharding (see
  ``dorafit.sharding``).

With ``--tp-size N`` below the number of processes P, the processes form a 2-D mesh
(P/N data-parallel replicas x N tensor-parallel ranks, the tensor-parallel ranks adjacent) and
FSDP2 shards over the data-parallel dimension. A row of the global batch belongs to one replica;
the N ranks of a replica see the same rows.

Only rank 0 writes files and shows progress. ``Parallel`` holds every decision that depends on
the mode, so the recipe asks it instead of testing the mode itself: which rows of a batch are
this process's, when gradients are synchronised, how a checkpoint is written and read back
(whole tensors on rank 0 for DDP; with sharded parameters every process writes its own shards
through torch.distributed.checkpoint), and who saves the adapter (rank 0 alone, or every rank
when it is sharded: dorafit's writers gather it and rank 0 writes one process's files).
"""

from __future__ import annotations

import contextlib
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dorafit.files import atomic_directory
from dorafit.train import checkpoint as ckpt
from dorafit.train.checkpoint import CheckpointError, optimizer_from_flat, optimizer_to_flat

MODES = ("ddp", "fsdp", "tp")


class ParallelError(ValueError):
    """A parallel layout that cannot be built from these processes or this model."""


@dataclass
class DistInfo:
    """Where this process stands: rank, number of processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """Rank 0 of the process group, or a process that runs alone."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def setup() -> DistInfo:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown(info: DistInfo) -> None:
    """Leave the process group together: the barrier first waits until every process is done with
    its collectives (gloo's barrier also waits for this process's outstanding asynchronous work),
    so no process tears its connections down while another still talks to it (rank 0 writes the
    results after the last collective; rank 1 would otherwise destroy the group meanwhile)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(value: float, info: DistInfo) -> float:
    """Sum a Python number over all processes."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (e.g. an error found while checking files)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the children of every nn.ModuleList."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks.extend(module)
    return blocks


def shard_fully(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (over ``mesh``, default all)."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it)."""
    if hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every trainable parameter, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters; collective under FSDP."""
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in trainable_named(model)}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Copy saved trainable parameters into the model (each rank copies its own shard)."""
    params = dict(trainable_named(model))
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise CheckpointError(f"{source}: trainable parameters differ (missing {missing[:5]}, extra {extra[:5]})")
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if hasattr(p, "device_mesh"):  # a DTensor: keep this rank's shard only
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)


def _sharded_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of the trainable parameters as this process holds them
    (DTensor shards; the tensors are the parameters and AdamW's state themselves)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    model_state = get_model_state_dict(model, options=options)
    # Creates AdamW's state where no step has run yet, so that a load has tensors to fill.
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    return model_state, optim_state


def _flat(model_state: dict, optim_state: dict) -> dict:
    """The {key: tensor} that torch.distributed.checkpoint writes and reads: "model.<param>",
    "optim.<param>.<field>"."""
    flat = {f"model.{name}": t for name, t in model_state.items()}
    for name, per_param in optim_state["state"].items():
        for key, value in per_param.items():
            flat[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


@dataclass
class Parallel:
    """How this run spreads over processes: the mode, the tensor-parallel degree and the mesh."""

    info: DistInfo
    mode: str = "ddp"
    tp_size: int = 0  # as configured: 0 = every process with mode "tp", none otherwise
    mesh: object = field(default=None, repr=False)  # DeviceMesh ("dp", "tp"), built on first use

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParallelError(f"unknown distributed mode {self.mode!r}; use one of {MODES}")
        world = self.info.world_size
        self.tp = self.tp_size or (world if self.mode == "tp" else 1)
        if world % self.tp:
            raise ParallelError(f"--tp-size {self.tp} does not divide the {world} processes "
                                f"(launch a multiple of {self.tp} with torchrun --nproc_per_node)")
        self.dp = world // self.tp

    @property
    def sharded(self) -> bool:
        """Parameters and optimizer state are split over the processes (FSDP2 or tensor parallel)."""
        return self.mode in ("fsdp", "tp") and self.info.enabled

    @property
    def replicas(self) -> int:
        """Data-parallel replicas: processes that see different rows of each batch."""
        return self.dp

    @property
    def replica(self) -> int:
        """This process's replica (tensor-parallel ranks are adjacent: rank = replica * tp + tp_rank)."""
        return self.info.rank // self.tp

    def device_mesh(self):
        """The ("dp", "tp") mesh of the processes (built once; a collective the first time)."""
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.info.device.type, (self.dp, self.tp), mesh_dim_names=("dp", "tp"))
        return self.mesh

    def prepare_base(self, model: nn.Module) -> nn.Module:
        """Before the adapters are attached: split the base layers over the tensor-parallel ranks."""
        if self.tp > 1:
            from dorafit.sharding import parallelize_base

            parallelize_base(model, self.device_mesh()["tp"])
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to call in training: DDP- or FSDP2-wrapped with several processes, else itself."""
        if not self.info.enabled:
            return model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.info.local_rank] if self.info.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp" or self.dp > 1:
            return shard_fully(model, self.device_mesh()["dp"])
        return model  # tensor parallel alone: the layers are split already

    def local_rows(self, batch: dict, rows: int) -> dict:
        """This replica's ``rows`` rows of a batch that holds every replica's rows in order."""
        lo, hi = self.replica * rows, (self.replica + 1) * rows
        mine = {k: v[lo:hi] for k, v in batch.items()}
        if "choice_mask" in batch and any(k.startswith("choice_") and k != "choice_mask" for k in batch):
            # Similarity batches store choices flat, (B*C, T): C entries per row.
            n_choices = batch["choice_mask"].shape[1]
            mine.update({k: v[lo * n_choices:hi * n_choices] for k, v in batch.items()
                         if k.startswith("choice_") and k != "choice_mask"})
        return mine

    def sum_over_replicas(self, value: float) -> float:
        """Sum a number that each replica computed (its tensor-parallel ranks hold the same value)."""
        return all_reduce_sum(value, self.info) / self.tp

    def accumulating(self, wrapped: nn.Module, last: bool):
        """The context of one micro-batch's backward: gradients are synchronised on the last only."""
        if last or not hasattr(wrapped, "no_sync"):
            return nullcontext()
        return wrapped.no_sync()

    # ------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: Path, model: nn.Module, optimizer, names: list[str], counters: dict,
                        write_extra=None) -> None:
        """Write checkpoint ``folder`` (every rank calls it): whole tensors by rank 0, or with
        sharded parameters each rank's shards into one temporary folder that rank 0 renames.
        ``write_extra(tmp)`` adds the adapter folder (on rank 0, or every rank when sharded)."""
        if not self.sharded:
            optim_tensors, optim_groups = optimizer_to_flat(optimizer, names)
            trainable = gather_trainable(model)
            if self.info.is_main:
                ckpt.save_checkpoint(folder, trainable, optim_tensors, optim_groups, counters, write_extra=write_extra)
            return
        model_state, optim_state = _sharded_state(model, optimizer)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optim_state["param_groups"]]
        with contextlib.ExitStack() as stack:
            tmp = None
            if self.info.is_main:
                tmp = str(stack.enter_context(atomic_directory(folder)))
            tmp = Path(broadcast_object(tmp, self.info))
            ckpt.write_shards(tmp, _flat(model_state, optim_state))
            barrier(self.info)  # every shard is on disk before rank 0 hashes and renames
            if self.info.is_main:
                ckpt.write_state(tmp, {}, groups, counters)
            if write_extra is not None:
                write_extra(tmp)  # a collective: the adapter is gathered, rank 0 writes it
        barrier(self.info)

    def latest_checkpoint(self, root: Path) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies, as rank 0 found it (every rank loads the same)."""
        found = ckpt.load_latest(root) if self.info.is_main else None
        folder = broadcast_object(str(found[0]) if found else None, self.info)
        if folder is None:
            return None
        if self.info.is_main:
            return found
        return Path(folder), ckpt.load_checkpoint(Path(folder))

    def load_checkpoint(self, model: nn.Module, optimizer, names: list[str], folder: Path, loaded: dict) -> None:
        """Put a checkpoint's trainable parameters and optimizer state into the model and optimizer."""
        groups = loaded["state"]["optimizer_param_groups"]
        if "shards" not in loaded:
            if self.sharded:
                raise CheckpointError(f"{folder}: a checkpoint of whole tensors; this run shards its parameters "
                                      f"(--distributed {self.mode})")
            load_trainable(model, loaded["trainable"], folder)
            optimizer_from_flat(optimizer, names, loaded["optimizer"], groups)
            return
        if not self.sharded:
            raise CheckpointError(f"{folder}: a sharded checkpoint; resume it with the --distributed mode it was "
                                  "written with")
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_state, optim_state = _sharded_state(model, optimizer)
        flat = _flat(model_state, optim_state)
        ckpt.read_shards(folder, flat)
        for name, per_param in optim_state["state"].items():
            for key in per_param:
                per_param[key] = flat[f"optim.{name}.{key}"]
        if len(groups) != len(optim_state["param_groups"]):
            raise CheckpointError(f"{folder}: the checkpoint's optimizer has another number of parameter groups")
        optim_state["param_groups"] = [{**g, "params": c["params"]} for g, c in zip(groups, optim_state["param_groups"])]
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)

    # ------------------------------------------------------------------------------- adapters

    def save_adapter(self, write) -> None:
        """``write()`` saves the adapter from the model in memory: rank 0 alone where it holds whole
        parameters; with sharded ones every rank (the writers gather the whole adapter, rank 0 writes)."""
        if self.sharded or self.info.is_main:
            write()
        barrier(self.info)
