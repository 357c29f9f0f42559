"""Trainer checkpoints hold the adapter and optimizer state only, and resume exactly."""

from __future__ import annotations

import torch

import dorafit
from dorafit.train.hf import AdapterTrainer

from test_hf_trainer import _Rows


def _run(tiny_llama, out, stop_at=None, resume=None):
    """Six steps of one schedule; ``stop_at``: interrupt after that step's checkpoint."""
    from conftest import arc_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True
            return control

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dorafit.attach(model, dorafit.AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    data = _Rows(tokenizer, arc_rows("train", 48))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=6,
                             learning_rate=1e-2, save_strategy="steps", save_steps=3, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, lr_scheduler_type="linear",
                             warmup_steps=2)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, data_collator=data.collate,
                             callbacks=[Interrupt()])
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_checkpoints_hold_the_adapter_and_resume_exactly(tiny_llama, tmp_path):
    straight = _run(tiny_llama, tmp_path / "straight")
    first = _run(tiny_llama, tmp_path / "split", stop_at=3)
    checkpoint = tmp_path / "split" / "checkpoint-3"
    files = sorted(p.name for p in checkpoint.iterdir())
    assert "adapter_model.safetensors" in files and "optimizer.pt" in files
    assert not any(f.startswith("model") or f == "config.json" for f in files), files
    adapter_bytes = (checkpoint / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(p.numel() * p.element_size() for p in first.parameters())
    assert adapter_bytes < model_bytes / 10
    resumed = _run(tiny_llama, tmp_path / "split", resume=str(checkpoint))
    want, got = dorafit.adapter_state_dict(straight), dorafit.adapter_state_dict(resumed)
    assert set(want) == set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # the final adapter differs from the checkpoint's: the resumed run did train
    assert not torch.equal(dorafit.adapter_state_dict(first)[key], got[key])
