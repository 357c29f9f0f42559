"""End to end through the command line on tiny models: train -> eval -> merge -> reload.

The merged checkpoint is loaded with plain transformers (no dorafit) and must compute what
the adapted model computes.
"""

from __future__ import annotations

import json

import pytest
import torch

import dorafit
from dorafit.cli import main
from dorafit.train.trainer import RESUME_MAY_CHANGE


def _train(model, files, out, *extra):
    argv = ["train", "--model", str(model), "--data-dir", str(files["dir"]), "--output", str(out),
            "--val-size", "16", "--batch-size", "8", "--epochs", "2", "--max-length", "160",
            "--save-steps", "5", "--no-progress", "--threads", "1", *extra]
    return main(argv)


def _adapted_and_merged_logits(model_cls, model, adapter, merged, inputs):
    base = model_cls.from_pretrained(model)
    dorafit.load_adapter(base, adapter)
    plain = model_cls.from_pretrained(merged)  # plain transformers: no dorafit module inside
    assert not any(type(m).__module__.startswith("dorafit") for m in plain.modules())
    base.eval(), plain.eval()
    with torch.no_grad():
        return base(**inputs).logits, plain(**inputs).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_causal_lm_train_eval_merge_reload(fixture, request, arc_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    assert _train(model, arc_files, out, "--lr", "1e-2", "--max-new-tokens", "8") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_kind"] == "causal-lm" and results["test_rows"] == 24
    assert 0.0 <= results["accuracy_after"] <= 1.0 and results["unparseable_after"] is not None
    for name in ("config.yaml", "log.jsonl", "adapter/adapter_config.json", "best/adapter_config.json"):
        assert (out / name).is_file(), name
    # The run learned something: the training loss fell.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert log[0]["step"] == 0 and log[-1]["val_loss"] < log[0]["val_loss"]
    assert losses[-1] < losses[0]

    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model), "--adapter", str(out / "adapter"), "--data-dir",
                 str(arc_files["dir"]), "--max-new-tokens", "8", "--no-progress", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "ARC-Easy" in table and "unparseable" in table
    evaluated = json.loads(report.read_text())[0]
    # The eval command reproduces the accuracy the training run reported after training.
    assert evaluated["accuracy"] == pytest.approx(results["accuracy_after"])
    assert evaluated["scoring"] == "generate" and len(evaluated["predictions"]) == 24
    # ... and its likelihood scoring, which the run measured before and after on the same rows.
    assert set(results["loglik_after"]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert results["loglik_before"]["rows"] == 24 and "paired" in results["change"]
    rows = json.loads((out / "predictions.json").read_text())
    assert sorted(rows) == ["generate_after", "generate_before", "loglik_after", "loglik_before"]
    assert len(rows["loglik_after"]) == 24 and {"response", "pred"} <= set(rows["generate_after"][0])
    assert main(["eval", "--model", str(model), "--adapter", str(out / "adapter"), "--data-dir",
                 str(arc_files["dir"]), "--scoring", "loglik", "--no-progress", "--json", str(report)]) == 0
    assert "acc_norm" in capsys.readouterr().out
    scored = json.loads(report.read_text())[0]
    assert scored["acc"] == pytest.approx(results["loglik_after"]["acc"])
    assert scored["acc_norm"] == pytest.approx(results["loglik_after"]["acc_norm"])
    assert [set(p) for p in scored["predictions"][:1]] == [{"row", "gold", "pred", "pred_norm", "loglik"}]

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model), "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(merged)
    inputs = tok(["the correct answer is answer2"], return_tensors="pt")
    inputs.pop("token_type_ids", None)
    adapted, plain = _adapted_and_merged_logits(AutoModelForCausalLM, model, out / "adapter", merged, dict(inputs))
    assert torch.allclose(adapted, plain, atol=1e-4), (adapted - plain).abs().max()
    # The adapter changed the model: the merged model differs from the base.
    base = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, plain, atol=1e-4)


def test_chat_template_and_response_format_are_trained_recorded_and_evaluated_with(tiny_llama, arc_files, tmp_path, capsys,
                                                                                 monkeypatch):
    from transformers import AutoTokenizer

    from conftest import copy_folder

    model = copy_folder(tiny_llama, tmp_path / "chat-llama")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    tok.save_pretrained(model)
    out = tmp_path / "run"
    assert _train(model, arc_files, out, "--prompt-template", "chat", "--response-format", "choice",
                  "--lr", "1e-2", "--max-new-tokens", "8") == 0
    results = json.loads((out / "results.json").read_text())
    task_info = json.loads((out / "adapter" / "task.json").read_text())
    assert task_info["prompt_template"] == "chat" and task_info["response_format"] == "choice"
    # A changed template or response changes the result, so a resumed run may not change them.
    assert "prompt_template" not in RESUME_MAY_CHANGE and "response_format" not in RESUME_MAY_CHANGE
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model), "--adapter", str(out / "adapter"), "--data-dir",
                 str(arc_files["dir"]), "--max-new-tokens", "8", "--no-progress", "--json", str(report)]) == 0
    # eval takes the template from task.json: the accuracy after training is reproduced.
    assert json.loads(report.read_text())[0]["accuracy"] == pytest.approx(results["accuracy_after"])
    # Without an adapter, eval prompts as train's default does ("auto": chat for this tokenizer).
    import dorafit.train.kinds as E

    templates = []
    real = E.evaluate_generation

    def recorded(*args, prompt_template, **kwargs):
        templates.append(prompt_template)
        return real(*args, prompt_template=prompt_template, **kwargs)

    monkeypatch.setattr(E, "evaluate_generation", recorded)
    for extra in ([], ["--adapter", str(out / "adapter")], ["--prompt-template", "paper"]):
        assert main(["eval", "--model", str(model), "--data-dir", str(arc_files["dir"]), "--task", "ARC-Easy",
                     "--max-rows", "2", "--max-new-tokens", "2", "--no-progress", *extra]) == 0
    assert templates == ["chat", "chat", "paper"]
    assert sum(results["predicted_after"].values()) + round(results["unparseable_after"] * 24) == 24


def test_encoder_multiple_choice_train_eval_merge_reload(tiny_bert, arc_files, tmp_path, capsys):
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    out = tmp_path / "run"
    assert _train(tiny_bert, arc_files, out, "--lr", "5e-3") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model_kind"] == "multiple-choice"
    task_info = json.loads((out / "adapter" / "task.json").read_text())
    assert task_info["model_kind"] == "multiple-choice"
    # The new classification head trains in full and is saved with the adapter.
    from dorafit.io import adapter_record

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True  # PEFT's layout: PEFT can hold DoRA
    assert config["modules_to_save"] == ["classifier"]
    assert adapter_record(out / "adapter")["config"]["modules_to_save"] == ["classifier"]

    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_bert), "--adapter", str(out / "adapter"), "--data-dir",
                 str(arc_files["dir"]), "--no-progress", "--json", str(report)]) == 0
    assert json.loads(report.read_text())[0]["accuracy"] == pytest.approx(results["accuracy_after"])
    # Likelihood scoring is for causal LMs: one line naming the scoring and the kind.
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_bert), "--adapter", str(out / "adapter"), "--data-dir",
                 str(arc_files["dir"]), "--no-progress", "--scoring", "loglik"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scoring 'loglik' is for causal LMs; a multiple-choice model" in err

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_bert), "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    tok = AutoTokenizer.from_pretrained(merged)
    enc = tok(["Which is a gas?"] * 2, ["oxygen", "iron"], return_tensors="pt", padding=True)
    inputs = {k: v.unsqueeze(0) for k, v in enc.items()}  # (1, C=2, T)
    adapted, plain = _adapted_and_merged_logits(AutoModelForMultipleChoice, tiny_bert, out / "adapter", merged, inputs)
    assert torch.allclose(adapted, plain, atol=1e-4), (adapted - plain).abs().max()


def test_yaml_config_and_flags(tiny_llama, arc_files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rank: 4\nalpha: 8\nepochs: 1\nlr: 0.005\ntargets: [q_proj, v_proj]\n")
    out = tmp_path / "run"
    assert _train(tiny_llama, arc_files, out, "--config", str(config), "--rank", "2", "--no-eval-before",
                  "--no-detach-norm") == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rank"] == 2 and saved["alpha"] == 8 and saved["targets"] == ["q_proj", "v_proj"]
    from dorafit.io import adapter_record

    adapter = adapter_record(out / "adapter")  # dorafit's record of the PEFT-layout folder
    assert adapter["config"]["rank"] == 2 and adapter["config"]["detach_norm"] is False
    assert saved["detach_norm"] is False
    assert all(m["rank"] == 2 for m in adapter["modules"].values())
    assert {name.rsplit(".", 1)[-1] for name in adapter["modules"]} == {"q_proj", "v_proj"}
