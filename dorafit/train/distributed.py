"""Several processes: process-group setup, DDP / FSDP2 wrapping and full-tensor gathering.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK), the recipe joins a process
group (NCCL on GPUs, gloo on CPUs) and wraps the adapted model:

- ``ddp``: ``DistributedDataParallel``; every process holds the whole model, gradients of the
  trainable (adapter) parameters are averaged after backward.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer block and then
  on the root; parameters become DTensors sharded over the processes and are gathered per
  block in forward and backward. DoRA's norm runs inside the block's forward, on the
  gathered base weight.

Only rank 0 writes files and shows progress. ``Parallel`` holds every decision that depends on
the mode, so the recipe asks it instead of testing the mode itself: which rows of a batch are
this process's, when gradients are synchronised, how the trainable tensors and the optimizer
state are gathered for a checkpoint (whole tensors on rank 0, collectives under FSDP2) and
loaded back (each rank keeps its shard), and whether the adapter can be saved from the model in
memory (one process, DDP) or only from gathered tensors (FSDP2).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dorafit.train.checkpoint import CheckpointError, optimizer_from_flat, optimizer_to_flat


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


def wrap(model: nn.Module, mode: str, info: DistInfo) -> nn.Module:
    """The model to call in training: DDP- or FSDP2-wrapped with several processes, else itself."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed mode {mode!r}; use 'ddp' or 'fsdp'")


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
            if hasattr(p, "device_mesh"):  # an FSDP2 DTensor: keep this rank's shard only
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)


@dataclass
class Parallel:
    """How this run spreads over processes: the mode (ddp / fsdp) and where this process stands."""

    info: DistInfo
    mode: str = "ddp"

    @property
    def sharded(self) -> bool:
        """Parameters and optimizer state are split over the processes (FSDP2)."""
        return self.mode == "fsdp" and self.info.enabled

    def wrap(self, model: nn.Module) -> nn.Module:
        return wrap(model, self.mode, self.info)

    def local_rows(self, batch: dict, rows: int) -> dict:
        """This process's ``rows`` rows of a batch that holds every process's rows in rank order."""
        lo, hi = self.info.rank * rows, (self.info.rank + 1) * rows
        mine = {k: v[lo:hi] for k, v in batch.items()}
        if "choice_mask" in batch and any(k.startswith("choice_") and k != "choice_mask" for k in batch):
            # Similarity batches store choices flat, (B*C, T): C entries per row.
            n_choices = batch["choice_mask"].shape[1]
            mine.update({k: v[lo * n_choices:hi * n_choices] for k, v in batch.items()
                         if k.startswith("choice_") and k != "choice_mask"})
        return mine

    def accumulating(self, wrapped: nn.Module, last: bool):
        """The context of one micro-batch's backward: gradients are synchronised on the last only."""
        if last or not hasattr(wrapped, "no_sync"):
            return nullcontext()
        return wrapped.no_sync()

    def optimizer_state(self, model: nn.Module, optimizer, names: list[str]) -> tuple[dict, list]:
        """The optimizer state keyed by parameter name, whole on rank 0 (collective under FSDP)."""
        if not self.sharded:
            return optimizer_to_flat(optimizer, names)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Only rank 0 receives the gathered state (cpu_offload); the others get {}.
        tensors = {f"{n}::{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
                   for n, per in full.get("state", {}).items() for k, v in per.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in full.get("param_groups", [])]
        return tensors, groups

    def load_optimizer_state(self, model: nn.Module, optimizer, names: list[str], tensors: dict, groups: list) -> None:
        """Load a state written by ``optimizer_state``; under FSDP each rank keeps its shard."""
        if not self.sharded:
            optimizer_from_flat(optimizer, names, tensors, groups)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state: dict = {}
        for key, value in tensors.items():
            name, _, field_name = key.rpartition("::")
            state.setdefault(name, {})[field_name] = value
        param_groups = [{**g, "params": list(names)} for g in groups]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": param_groups},
                                 options=StateDictOptions(full_state_dict=True))

    def from_model(self, write):
        """``write`` where rank 0's model holds whole parameters (it can save itself), else None."""
        return None if self.sharded else write

    def save_adapter(self, model: nn.Module, write_from_model, write_from_state) -> None:
        """Rank 0 writes the adapter: from the model, or under FSDP from the gathered tensors."""
        if self.sharded:
            state = gather_trainable(model)
            if self.info.is_main:
                write_from_state(state)
        elif self.info.is_main:
            write_from_model()
        barrier(self.info)
