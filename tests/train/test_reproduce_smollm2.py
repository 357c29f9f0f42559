"""experiments/reproduce_smollm2.py end to end on a tiny random LLaMA: an adapter run stopped and
resumed, the skip of a finished run, the Figure-2 stage (FT with its own loop, the sweep's LoRA and
DoRA r 16 runs, 2 checkpoints each, dorafit analyze), the detach pair (memory of both settings, the
run without), sweep/VeRA/untrained records and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "dorafit" / "data"
TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa", "piqa", "social_i_qa", "winogrande")


def _data_dir(tmp_path: Path) -> Path:
    """The bundled test rows as <task>/{train,test}.json (only ARC-Easy ships a train file)."""
    root = tmp_path / "data"
    for task in TASKS:
        (root / task).mkdir(parents=True)
        test = (BUNDLED / task / "test.json").read_text()
        train = BUNDLED / task / "train.json"
        (root / task / "test.json").write_text(test)
        (root / task / "train.json").write_text(train.read_text() if train.is_file() else test)
    return root


def _driver(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "reproduce_smollm2.py"), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_driver_end_to_end(tmp_path, tiny_llama):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "REPRO_MODEL": str(tiny_llama),
           "REPRO_DATA": str(_data_dir(tmp_path)), "REPRO_WORK": str(tmp_path / "work"),
           "REPRO_RESULTS": str(results), "REPRO_TRAIN_PER_TASK": "4", "REPRO_VAL_PER_TASK": "2", "REPRO_TEST_ROWS": "2",
           "REPRO_MAX_NEW_TOKENS": "4", "REPRO_PROMPT_TEMPLATE": "paper", "REPRO_FIGURE2_CHECKPOINTS": "2"}

    listing = _driver(env, "all", "--dry-run")
    assert "lora-r32-s1" in listing and "fig2-ft" in listing and "detach-off" in listing and " h left" in listing
    assert listing.index("dora-r16-s0") < listing.index("fig2-ft") < listing.index("vera-lr") < listing.index("-s1 ")

    # 1. an adapter run stopped after 2 of its 4 steps continues from its checkpoint; it writes its
    # result when done, and a second invocation skips it
    stopped = subprocess.run([sys.executable, str(ROOT / "experiments" / "reproduce_smollm2.py"), "sweep",
                              "--only", "dora-r16-s0"], env={**env, "REPRO_STOP_AFTER_STEPS": "2"},
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert stopped.returncode != 0 and "stopped after 2 steps" in stopped.stderr
    assert not (results / "runs" / "dora-r16-s0.json").exists()
    assert "resumed from" in _driver(env, "sweep", "--only", "dora-r16-s0")
    record = json.loads((results / "runs" / "dora-r16-s0.json").read_text())
    assert record["steps"] == 4 and set(record["tasks"]) == set(TASKS)
    assert all(0 <= t["accuracy"] <= 1 and t["rows"] == 2 for t in record["tasks"].values())
    assert "done already, skipped" in _driver(env, "sweep", "--only", "dora-r16-s0")

    # 2. Figure 2: FT (own loop) and the first seed's LoRA/DoRA r 16 runs, 2 checkpoints each, then analyze
    _driver(env, "figure2")
    work = tmp_path / "work"
    assert len(list((work / "fig2-ft" / "checkpoints").glob("step-*/model.safetensors"))) == 2
    assert not (work / "fig2-ft" / "resume.pt").exists()  # removed once the result is written
    assert len(list((work / "dora-r16-s0" / "checkpoints").glob("step-*/adapter"))) == 2
    assert len(list((work / "lora-r16-s0" / "checkpoints").glob("step-*/adapter"))) == 2
    ft = json.loads((results / "runs" / "fig2-ft.json").read_text())
    assert ft["steps"] == 4 and len(ft["loss"]) == 4
    panels = json.loads((results / "figure2" / "q_proj-all-layers" / "analysis.json").read_text())["panels"]
    assert {p["method"] for p in panels} == {"FT", "LoRA", "DoRA"}
    assert all(p["points"] == 2 * 2 for p in panels)  # 2 layers x 2 checkpoints
    assert (results / "figure2" / "q_proj-six-layers" / "figure2.png").stat().st_size > 0

    # 3. the detach pair: memory of both settings on the same batches, and the run without the detach
    _driver(env, "detach")
    memory = json.loads((results / "runs" / "detach-memory.json").read_text())["memory"]
    assert 0 < memory["on"]["saved_for_backward"] < memory["off"]["saved_for_backward"]
    assert memory["on"]["step_peak"] > 0 and memory["off"]["step_peak"] > 0
    from dorafit.io import adapter_record

    off = adapter_record(work / "detach-off" / "adapter")
    assert off["config"]["detach_norm"] is False

    # 4. one seed of the rank sweep at r = 4 and one VeRA lr (scored on validation rows too), for the report
    _driver(env, "sweep", "--only", "lora-r4-s0", "--only", "dora-r4-s0")
    _driver(env, "vera", "--only", "vera-lr0.01")
    vera = json.loads((results / "runs" / "vera-lr0.01.json").read_text())
    assert set(vera["validation"]) == {"boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"}
    assert 0 <= vera["average_validation"] <= 1
    _driver(env, "pilot", "--only", "untrained")
    untrained = json.loads((results / "runs" / "untrained.json").read_text())
    assert untrained["steps"] == 0 and 0 < untrained["chance"]["ARC-Easy"] < 1

    # 5. validation losses of every run with final weights (not FT: it keeps q/v checkpoints only), once
    _driver(env, "losses")
    scored = {p.stem for p in (results / "losses").glob("*.json")}
    assert scored == {"dora-r16-s0", "lora-r16-s0", "detach-off", "lora-r4-s0", "dora-r4-s0", "vera-lr0.01", "untrained"}
    losses = json.loads((results / "losses" / "dora-r4-s0.json").read_text())["losses"]
    assert {len(v) for v in losses.values()} == {2} and all(x > 0 for v in losses.values() for x in v)
    assert "validation loss" not in _driver(env, "losses")  # nothing scored twice

    # 6. the report lists every finished run and the Figure-2 panels
    _driver(env, "report")
    text = (results / "report.md").read_text()
    for name in ("dora-r16-s0", "lora-r16-s0", "fig2-ft", "detach-off"):
        assert f"| {name} |" in text
    assert "Figure 2" in text and "| FT |" in text and "| chance (a uniform guess" in text
    summary = json.loads((results / "report.json").read_text())
    assert set(summary["runs"]) == {"dora-r16-s0", "lora-r16-s0", "fig2-ft", "detach-off", "lora-r4-s0",
                                    "dora-r4-s0", "vera-lr0.01", "untrained"}
    assert "lift" in summary["pilot"] and "Pilot: untrained" in text
    assert summary["sweep"]["dora-r4"]["n"] == 1 and summary["vera"]["vera"]["lr"] == 0.01
    assert "| 4 | " in text and "| vera | 0.01 |" in text
    assert "Norm detach" in text and summary["detach"]["accuracy"] in ("no difference", "higher", "lower")
    assert 0 < summary["detach"]["saved_less"] < 1
    assert "Validation loss" in text and "| r 4: DoRA vs LoRA |" in text
    assert summary["validation_loss"]["r 4: DoRA vs LoRA"]["runs"] == [["dora-r4-s0", "lora-r4-s0"]]


def test_results_are_not_git_ignored():
    """The records under experiments/results/ are what the report is rebuilt from: an ignore rule
    must reach only the work folders (adapters, checkpoints), never them."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["experiments/results/reproduction_smollm2/runs/a.json", "experiments/runs/a/adapter", "runs/a/adapter"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == paths[1:]


def test_best_lr_ties_go_to_the_lower_validation_loss():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from reproduce_smollm2 import best_lr
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    # the float means of four shares differ by rounding only: a tie, settled by the loss
    assert best_lr({0.01: 0.30000000000000004, 0.03: 0.3}, {0.01: 0.2309, 0.03: 0.1992}) == 0.03
    # accuracy comes first; a run without scored losses loses only ties
    assert best_lr({0.01: 0.3, 0.03: 0.2}, {0.01: 0.5, 0.03: 0.1}) == 0.01
    assert best_lr({0.01: 0.3, 0.03: 0.3}, {0.01: float("inf"), 0.03: 0.4}) == 0.03
