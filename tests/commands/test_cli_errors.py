"""Bad input to every subcommand: one clear line on stderr, exit code 2, no traceback, and every
file that existed before is byte for byte the same after. ``--debug`` shows the traceback; a
bug (not an input error) keeps its traceback."""

from __future__ import annotations

import json

import pytest
from cli_models import adapter, hashes, make_adapter, tiny_model  # noqa: F401 (fixtures)

from dorafit.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def one_line_error(code, err, command, *needles) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"dorafit {command}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- train


def _finished_run(folder):
    """A run folder as dorafit train leaves it (marker, config, results, adapter)."""
    from dorafit.files import write_marker

    folder.mkdir()
    write_marker(folder, "run")
    (folder / "config.yaml").write_text("rank: 8\n")
    (folder / "results.json").write_text('{"accuracy_after": 0.5}')
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_train_yaml_string_false_is_an_error_and_the_finished_run_stays(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
    before = hashes(run)
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(f"output: {run}\nrank: 4\noverwrite: \"false\"\n")
    code, err = run_cli(capsys, "train", "--config", yaml_file)
    one_line_error(code, err, "train", "cfg.yaml, line 3: overwrite must be true or false, got 'false'")
    assert hashes(run) == before


@pytest.mark.parametrize("yaml_text, needle", [
    ("rank: 0\n", "line 1: rank must be > 0, got 0"),
    ("rank: '8'\n", "line 1: rank must be an integer, got '8'"),
    ("dropout: 1.5\n", "line 1: dropout must be in [0, 1), got 1.5"),
    ("lr: .nan\n", "line 1: lr must be a finite number, got nan"),
    ("epochs: 1\nmethod: qdora\n", "line 2: method must be one of"),
    ("learning_rate: 0.1\n", "unknown option(s) ['learning_rate']"),
    ("bach_size: 4\n", "(did you mean 'batch_size'?)"),
    ("targets: [q_proj, 'v_proj(']\n", "pattern 'v_proj(' is not a valid regex"),
    ("- rank\n- 4\n", "expected a mapping of option -> value, got list"),
    ("rank: [unclosed\n", "not valid YAML"),
])
def test_train_bad_yaml_values_name_the_key(tmp_path, capsys, yaml_text, needle):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(yaml_text)
    code, err = run_cli(capsys, "train", "--config", yaml_file, "--output", tmp_path / "run")
    one_line_error(code, err, "train", needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--rank", "-1"], "rank must be > 0, got -1"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--dropout", "nan"], "dropout must be a finite number, got nan"),
    (["--method", "Dora"], "did you mean 'dora'?"),
    (["--config", "missing.yaml"], "--config missing.yaml: no such file"),
])
def test_train_bad_flags(tmp_path, capsys, flags, needle):
    code, err = run_cli(capsys, "train", "--output", tmp_path / "run", *flags)
    one_line_error(code, err, "train", needle)


def test_train_output_equal_to_an_input_is_refused(tiny_model, tmp_path, capsys):
    data = tmp_path / "train.json"
    data.write_text("[]")
    before = hashes(tiny_model, data)
    for output, needle in ((tiny_model, "overlaps --model"), (data, "overlaps --data"),
                           (tiny_model / "runs", "overlaps --model")):
        code, err = run_cli(capsys, "train", "--model", tiny_model, "--data", data, "--output", output,
                            "--overwrite")
        one_line_error(code, err, "train", needle)
    assert hashes(tiny_model, data) == before
    assert not (tiny_model / "runs").exists()


def test_train_overwrite_of_a_folder_without_the_marker_deletes_nothing(tiny_model, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("not dorafit's")  # looks like a run, but has no marker
    (folder / "results.json").write_text("{}")
    before = hashes(folder)
    code, err = run_cli(capsys, "train", "--model", tiny_model, "--output", folder, "--overwrite")
    one_line_error(code, err, "train", "is not a dorafit run folder", "not deleting anything")
    assert hashes(folder) == before


# ---------------------------------------------------------------------------- merge


def test_merge_out_equal_to_its_adapter_is_refused_and_the_adapter_kept(tiny_model, adapter, tmp_path, capsys):
    before = hashes(adapter, tiny_model)
    for out, needle in ((adapter, "overlaps --adapter"), (adapter / "merged", "overlaps --adapter"),
                        (adapter.parent, "overlaps --adapter"), (tiny_model, "overlaps --model")):
        code, err = run_cli(capsys, "merge", "--model", tiny_model, "--adapter", adapter, "--out", out,
                            "--overwrite")
        one_line_error(code, err, "merge", needle)
    assert hashes(adapter, tiny_model) == before
    assert not (adapter / "merged").exists()


def test_merge_overwrite_replaces_only_a_merged_model_dorafit_wrote(tiny_model, adapter, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_bytes(b"precious")
    before = hashes(mine)
    code, err = run_cli(capsys, "merge", "--model", tiny_model, "--adapter", adapter, "--out", mine, "--overwrite")
    one_line_error(code, err, "merge", "is not a merged model written by dorafit merge", "not replacing it")
    assert hashes(mine) == before
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--model", tiny_model, "--adapter", adapter, "--out", out)[0] == 0
    code, err = run_cli(capsys, "merge", "--model", tiny_model, "--adapter", adapter, "--out", out)
    one_line_error(code, err, "merge", "exists and is not empty; pass --overwrite")
    code, err = run_cli(capsys, "merge", "--model", tiny_model, "--adapter", adapter, "--out", out, "--overwrite")
    assert code == 0 and "--overwrite: replaced the previous merged model" in err and "model.safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]  # no temporaries left


def test_merge_bad_adapters(tiny_model, adapter, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    missing = tmp_path / "nope"
    one_line_error(*run_cli(capsys, "merge", "--model", tiny_model, "--adapter", missing, "--out", tmp_path / "o"),
                   "merge", "nope does not exist")
    nan = tmp_path / "nan"
    nan.mkdir()
    for name in ("adapter_config.json", "task.json"):
        (nan / name).write_bytes((adapter / name).read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    one_line_error(*run_cli(capsys, "merge", "--model", tiny_model, "--adapter", nan, "--out", tmp_path / "o"),
                   "merge", "adapter_model.safetensors: key", key, "non-finite")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (truncated / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:100])
    one_line_error(*run_cli(capsys, "merge", "--model", tiny_model, "--adapter", truncated, "--out", tmp_path / "o"),
                   "merge", "truncated or corrupt")
    wrong_types = tmp_path / "types"
    wrong_types.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["config"]["detach_norm"] = "false"
    (wrong_types / "adapter_config.json").write_text(json.dumps(cfg))
    (wrong_types / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    one_line_error(*run_cli(capsys, "merge", "--model", tiny_model, "--adapter", wrong_types, "--out", tmp_path / "o"),
                   "merge", "detach_norm must be true or false, got 'false'")
    assert not (tmp_path / "o").exists()


def test_merge_of_a_qdora_adapter_quantizes_the_base_as_in_training(tiny_model, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import LlamaForCausalLM

    import dorafit
    from dorafit import quant

    qdora = make_adapter(tiny_model, tmp_path / "qdora", quantize=True)
    trained = LlamaForCausalLM.from_pretrained(tiny_model)
    quant.quantize_model(trained, ["q_proj", "v_proj"], "nf4", compute_dtype=torch.float32)
    dorafit.load_adapter(trained, qdora)
    ids = torch.randint(4, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    with pytest.warns(UserWarning, match="dorafit.merge: 4 layers in 4-bit"):
        code, err = run_cli(capsys, "merge", "--model", tiny_model, "--adapter", qdora, "--out", tmp_path / "m")
    assert code == 0 and "quantized 4 base layers to 4-bit nf4 as the adapter was trained" in err
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    full = dorafit.load_adapter(LlamaForCausalLM.from_pretrained(tiny_model), qdora)  # what merge did before
    with torch.no_grad():
        assert (full(input_ids=ids).logits - want).abs().max() > 1e-3


# ---------------------------------------------------------------------------- eval


def test_eval_errors(tiny_model, adapter, tmp_path, capsys):
    data = tmp_path / "test.json"
    data.write_text("[]")
    base = ["eval", "--model", tiny_model, "--no-progress", "--task", "ARC-Easy"]
    one_line_error(*run_cli(capsys, *base, "--adapter", tmp_path / "nope"), "eval", "nope does not exist")
    one_line_error(*run_cli(capsys, *base, "--adapter", adapter, "--batch-size", "0"), "eval", "--batch-size must be >= 1")
    one_line_error(*run_cli(capsys, *base, "--data", data), "eval", "test.json: the data set is empty")
    before = hashes(data)
    one_line_error(*run_cli(capsys, *base, "--data", data, "--json", data), "eval", "overlaps --data")
    assert hashes(data) == before
    one_line_error(*run_cli(capsys, *base, "--task", "mmlu"), "eval", "mmlu")


# ---------------------------------------------------------------------------- convert


def test_convert_onto_its_own_source_is_refused(tiny_model, adapter, tmp_path, capsys):
    before = hashes(adapter)
    for dst in (adapter, adapter / "peft", adapter.parent):
        code, err = run_cli(capsys, "convert", adapter, dst, "--to", "peft", "--model", tiny_model, "--force")
        one_line_error(code, err, "convert", "overlaps SRC")
    code, err = run_cli(capsys, "convert", adapter, tiny_model, "--to", "peft", "--model", tiny_model, "--force")
    one_line_error(code, err, "convert", "overlaps the base model folder")
    assert hashes(adapter) == before
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.md").write_text("keep")
    one_line_error(*run_cli(capsys, "convert", adapter, folder, "--to", "peft", "--model", tiny_model),
                   "convert", "pass --force")
    code, err = run_cli(capsys, "convert", adapter, folder, "--to", "peft", "--model", tiny_model, "--force")
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.md"]
    assert (folder / "notes.md").read_text() == "keep"


# ---------------------------------------------------------------------------- analyze, bench


def test_analyze_and_bench_errors(tiny_model, tmp_path, capsys):
    one_line_error(*run_cli(capsys, "analyze", "--base", tmp_path / "nope", tmp_path / "tuned", "--no-plot"),
                   "analyze", "nope")
    one_line_error(*run_cli(capsys, "analyze", "--base", tiny_model, tmp_path / "tuned", "--no-plot",
                            "--out", tmp_path / "a"), "analyze", "tuned")
    one_line_error(*run_cli(capsys, "bench", "--rank", "0"), "bench", "--rank must be >= 1, got 0")
    one_line_error(*run_cli(capsys, "bench", "--batch", "-3"), "bench", "--batch must be >= 1, got -3")
    one_line_error(*run_cli(capsys, "bench", "--model", tmp_path / "nope"), "bench", "nope: no such model folder")


# ---------------------------------------------------------------------------- --debug, and bugs keep tracebacks


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tiny_model, tmp_path, capsys, monkeypatch):
    from dorafit.config import ConfigError
    from dorafit.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="rank must be > 0"):
        main(["--debug", "train", "--rank", "0", "--output", str(tmp_path / "r")])
    with pytest.raises(Exception, match="does not exist"):
        main(["merge", "--debug", "--model", str(tiny_model), "--adapter", str(tmp_path / "nope"),
              "--out", str(tmp_path / "o")])
    import dorafit.commands.bench as bench

    def buggy(args):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(bench, "run", buggy)
    with pytest.raises(KeyError):
        main(["bench"])

    def bad_input(args):
        raise ConfigError("targets entry 'x' matches no module")

    monkeypatch.setattr(bench, "run", bad_input)
    code, err = run_cli(capsys, "bench")
    one_line_error(code, err, "bench", "targets entry 'x' matches no module")
