"""An adapted model trains inside the Hugging Face Trainer; the callback saves adapters."""

from __future__ import annotations

import torch

import dorafit
from dorafit.train import AdapterCheckpointCallback


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, rows):
        from dorafit.train.data import collate_causal, to_instruction_pairs, tokenize_instruction_pairs

        pairs = to_instruction_pairs(rows, "commonsense", "rows")
        self.items = tokenize_instruction_pairs(pairs, tokenizer, 160, "rows")
        self.pad = tokenizer.pad_token_id
        self.collate = lambda batch: collate_causal(batch, self.pad)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_with_adapter_callback(tiny_llama, tmp_path):
    from conftest import arc_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dorafit.attach(model, dorafit.AdapterConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in dorafit.adapter_state_dict(model).items()}
    data = _Rows(tokenizer, arc_rows("train", 32))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, save_only_model=True,
                             report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=data.collate,
                      callbacks=[AdapterCheckpointCallback()])
    trainer.train()
    after = dorafit.adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the adapter trained
    for folder in ("checkpoint-2/adapter", "checkpoint-4/adapter", "adapter"):
        assert (tmp_path / "out" / folder / "adapter_model.safetensors").is_file(), folder
    # The final adapter reloads onto a fresh base and reproduces the trained model.
    fresh = dorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "out" / "adapter")
    ids = torch.tensor([data[0]["input_ids"]])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-5)
