"""Training with the Hugging Face ``Trainer`` (and trainers built on it, such as TRL's).

A model with dorafit adapters trains in ``transformers.Trainer`` as it is (only the adapter
parameters require gradients), and its ``save_pretrained`` writes the adapter alone (see
``dorafit.hub``): ``Trainer.save_model`` and every checkpoint hold adapter_config.json +
adapter_model.safetensors (PEFT's layout) beside the optimizer, scheduler and RNG state.

Resuming needs one thing the Trainer cannot know: that a folder holding only an adapter is a
model checkpoint of a model that is not a PEFT model. ``AdapterTrainerMixin`` teaches it —
``_load_from_checkpoint`` and ``_load_best_model`` copy the saved adapter into the model's
attached adapter in place — and ``AdapterTrainer`` is ``Trainer`` with it. For another trainer
class: ``class MyDPO(AdapterTrainerMixin, DPOTrainer): pass``.

``AdapterCheckpointCallback`` additionally writes dorafit-format adapter folders
(``<output_dir>/checkpoint-<step>/adapter`` and ``<output_dir>/adapter`` at the end).
"""

from __future__ import annotations

from pathlib import Path

try:
    from transformers import Trainer, TrainerCallback
except ImportError:  # transformers is optional for the library
    Trainer = TrainerCallback = object


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _holds_adapter(folder) -> bool:
    return folder is not None and (Path(folder) / "adapter_config.json").is_file()


class AdapterTrainerMixin:
    """Resume and best-model loading from adapter-only checkpoints (mix in before the Trainer)."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from dorafit.hub import load_adapter_weights
        from dorafit.inject import adapter_modules

        target = _unwrap(model if model is not None else self.model)
        if adapter_modules(target) and _holds_adapter(resume_from_checkpoint):
            load_adapter_weights(target, resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        from dorafit.hub import load_adapter_weights
        from dorafit.inject import adapter_modules

        target = _unwrap(self.model)
        best = self.state.best_model_checkpoint
        if adapter_modules(target) and _holds_adapter(best):
            load_adapter_weights(target, best)
            return None
        return super()._load_best_model()


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` that resumes from adapter-only checkpoints."""


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
