"""Training with the Hugging Face ``Trainer``: save adapters, not whole models, at each save.

A model with dorafit adapters trains in ``transformers.Trainer`` as it is (only the adapter
parameters require gradients). The Trainer's own checkpoints hold the full model; add
``AdapterCheckpointCallback`` to also get a small adapter folder per save
(``<output_dir>/checkpoint-<step>/adapter``) and the final one at the end of training.
``Trainer(..., save_strategy="no")`` then keeps only the adapters.
"""

from __future__ import annotations

from pathlib import Path

try:
    from transformers import TrainerCallback
except ImportError:  # transformers is optional for the library
    TrainerCallback = object


class AdapterCheckpointCallback(TrainerCallback):
    """Write ``dorafit.save_adapter`` folders on every Trainer save and at the end of training."""

    def __init__(self, subfolder: str = "adapter") -> None:
        self.subfolder = subfolder

    def _save(self, args, state, model, folder: Path) -> None:
        import dorafit

        if state.is_world_process_zero and model is not None:
            dorafit.save_adapter(_unwrap(model), folder / self.subfolder)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model, Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, state, model, Path(args.output_dir))
        return control


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
