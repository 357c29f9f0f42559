"""Several processes: process-group setup, DDP / FSDP2 wrapping and full-tensor gathering.

Launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK), the recipe joins a process
group (NCCL on GPUs, gloo on CPUs) and wraps the adapted model:

- ``ddp``: ``DistributedDataParallel``; every process holds the whole model, gradients of the
  trainable (adapter) parameters are averaged after backward.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer block and then
  on the root; parameters become DTensors sharded over the processes and are gathered per
  block in forward and backward. DoRA's norm runs inside the block's forward, on the
  gathered base weight.

Only rank 0 writes files and shows progress; ``full_state`` gathers sharded tensors so that
what rank 0 writes is the whole adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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
    if info.enabled and dist.is_initialized():
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
