"""Checks on a training run that numbers alone would hide.

``MagnitudeWatch``: after the first ``CHECK_STEPS`` optimizer steps (or at the end of a shorter
run) every trainable magnitude vector must differ from its start in at least one bit. One that
does not is reported on stderr with its likely cause: stored in a low-precision dtype whose
resolution near its values is coarser than the updates (a bf16 master that never moves is the
DoRA failure users report most), no gradient reaching it, or a learning rate below float32's
resolution. Under FSDP2 each rank compares its own shard and the verdicts are summed.
"""

from __future__ import annotations

import sys

import torch

from dorafit.train import distributed as dist_utils
from dorafit.train.distributed import trainable_named

CHECK_STEPS = 3


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard


class MagnitudeWatch:
    """Copies of the trainable magnitudes at the start, compared once after ``CHECK_STEPS`` steps."""

    def __init__(self, model: torch.nn.Module, step: int, total_steps: int) -> None:
        self.model = model
        self.check_at = min(CHECK_STEPS, total_steps)
        self.before = {}
        if step < self.check_at:  # a run resumed past the check has been checked already
            self.before = {name: _local(p).detach().clone() for name, p in trainable_named(model)
                           if name.rsplit(".", 1)[-1] == "magnitude"}
        self.watched = len(self.before)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, lr: float, info) -> None:
        if step != self.check_at or not self.before:
            return
        params = dict(trainable_named(self.model))
        frozen = [name for name, old in self.before.items()
                  if dist_utils.all_reduce_sum(float(not torch.equal(_local(params[name]).detach(), old)), info) == 0]
        self.before = {}
        if frozen and info.is_main:
            print(f"warning: {self.message(frozen, params, optimizer, lr, step)}", file=sys.stderr, flush=True)

    def message(self, frozen: list, params: dict, optimizer, lr: float, step: int) -> str:
        first = params[frozen[0]]
        moment = optimizer.state.get(first, {}).get("exp_avg")
        if first.dtype != torch.float32:
            why = (f"it is stored in {str(first.dtype).replace('torch.', '')}, whose resolution near its values is coarser "
                   "than the updates: keep adapter parameters in float32 (AdapterConfig adapter_dtype=\"float32\", and "
                   "do not cast the adapted model to a lower precision)")
        elif moment is not None and not bool(_local(moment).any()):
            why = "it receives no gradient: check that the adapted modules take part in the loss"
        else:
            why = f"its updates are below float32's resolution at lr {lr:g}"
        return (f"after {step} optimizer steps the magnitude of {len(frozen)} of {self.watched} adapted modules has "
                f"not changed at all (e.g. {frozen[0].rsplit('.', 1)[0]}): {why}")
