"""dorafit.bench (the measuring helpers of benchmarks/ and ``dorafit bench``) and the command."""

from __future__ import annotations

import copy
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dorafit
from dorafit import bench
from dorafit.cli import main as cli_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_probe_stand_ins_fit_what_they_replace(monkeypatch):
    """benchmarks/probe_dora_extra.py times DoRA against copies whose norm and backward pass are
    stand-ins with the signatures of what they replace: both parts run through on a tiny layer,
    so a changed signature fails here rather than in a measurement."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    probe = importlib.import_module("probe_dora_extra")
    lines = probe.part1("layer8x32", 1) + probe.part2("layer8x32", 1, torch.device("cpu"))
    for variant in ("DoRA, norm stored", "DoRA, no backward pass", "DoRA, neither"):
        assert sum(line.startswith(f"  {variant} ") for line in lines) == 1, lines


def test_time_alternating_interleaves_rounds():
    calls = []
    out = bench.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert len(out["a"].samples) == len(out["b"].samples) == 3
    assert out["a"].low <= out["a"].median <= out["a"].high


def test_cpu_model_is_the_kernels_model_name(monkeypatch, tmp_path):
    """The name printed beside timings: /proc/cpuinfo's "model name" where there is one, else
    platform's answer (never an empty string)."""
    import builtins
    import platform

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.00GHz\n")
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert bench.cpu_model() == "Example CPU @ 2.00GHz"
    cpuinfo.unlink()  # no such file: platform's name
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert bench.cpu_model() == platform.machine() != ""


def test_saved_for_backward_counts_each_storage_once_and_skips_parameters():
    x = torch.randn(100, requires_grad=True)
    p = nn.Parameter(torch.randn(100))

    def forward():
        y = x.exp()  # saves its result y
        s = y.sin()  # saves y again: the same storage
        return (s * p).sum()  # saves s (new) and p (a parameter)

    assert bench.saved_for_backward_bytes(forward, [p]) == 2 * 100 * 4
    assert bench.saved_for_backward_bytes(forward) == 3 * 100 * 4  # p counted when not excluded


def test_step_peak_sees_a_temporary():
    n = 1 << 20

    def step():
        t = torch.ones(n)  # 4 MiB, freed before the next one
        del t
        u = torch.zeros(n // 2)
        del u

    peak = bench.step_peak_bytes(step)
    assert 4 * n <= peak < 4 * n + 4 * (n // 2)


def test_measure_variants_lora_against_dora():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
    for q in base.parameters():
        q.requires_grad_(False)
    x = torch.randn(64, 32, requires_grad=True)
    variants = []
    for method in ("lora", "dora"):
        model = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(method=method, rank=4, targets=["0", "2"]))
        variants.append(bench.make_variant(method, model, lambda m: m(x).pow(2).mean()))
    results = bench.measure_variants(variants, repeats=2, warmup=1)
    lora, dora = results["lora"], results["dora"]
    assert set(lora) == {"step", "eval", "saved", "peak"}
    assert len(dora["step"].samples) == 2
    # DoRA saves each layer's output y. The loss's pow keeps the last one anyway; tanh keeps its
    # own output, not its input, so the first layer's 64×48 floats are extra, plus g and the
    # zero vector of batch norm's statistics (kept by the layer across steps), (out,) each per
    # layer. With more tokens than inputs (64 > 32, 48) g scales B's rows, and the node keeps
    # g ⊙ B (out, r) in place of B, while LoRA's node keeps B itself, a parameter (s rides in its
    # addmm), so nothing of its own.
    extra = dora["saved"] - lora["saved"]
    assert extra == 64 * 48 * 4 + 2 * 4 * (48 + 16) + 4 * 4 * (48 + 16)
    assert dora["peak"] > 0 and lora["peak"] > 0


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_a_loaded_copy_runs_its_own_layers(tmp_path, monkeypatch):
    """``load_dorafit_copy`` gives another checkout's library, not this one under another name:
    the copy's layers come from the copy's files (the baseline of the benchmarks)."""
    import shutil
    import sys

    source = os.path.dirname(dorafit.__file__)
    shutil.copytree(source, tmp_path / "dorafit", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.delitem(sys.modules, "dorafit_copy_under_test", raising=False)
    copied = bench.load_dorafit_copy(str(tmp_path), name="dorafit_copy_under_test")
    try:
        model = copied.attach(nn.Sequential(nn.Linear(8, 8)), copied.AdapterConfig(method="dora", rank=2, targets=["0"]))
        module = sys.modules[type(model[0]).__module__]
        assert type(model[0]).__module__.startswith("dorafit_copy_under_test.")
        assert os.path.realpath(module.__file__).startswith(os.path.realpath(str(tmp_path)))
        assert not isinstance(model[0], dorafit.AdapterLayer)
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "dorafit_copy_under_test"]:
            del sys.modules[key]


def test_bench_command_prints_the_overhead(tiny_encoder, capsys):
    code = cli_main(["bench", "--model", str(tiny_encoder), "--batch", "2", "--tokens", "16", "--repeats", "2",
                     "--targets", "query", "value"])
    assert code == 0
    out = capsys.readouterr().out
    assert "4 adapted modules" in out  # query and value of two layers
    for row in ("train step", "eval forward", "saved for backward", "step peak", "DoRA overhead on this model",
                "DoRA ÷ LoRA train step, median of per-round ratios", "DoRA ÷ LoRA eval forward, median of per-round ratios"):
        assert row in out


def test_bench_command_names_a_missing_model(tmp_path, capsys):
    assert cli_main(["bench", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: no such model folder" in err and "Traceback" not in err
