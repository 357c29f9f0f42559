"""experiments/compare_smollm2.py: its rows, lr choice, paired comparison and report, on
synthetic records (the runs themselves are the experiment's, not the suite's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_smollm2", ROOT / "experiments" / "compare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_smollm2"] = module
    spec.loader.exec_module(module)
    return module


def test_training_rows_are_the_scored_context_and_right_continuation(compare):
    rows = json.loads((ROOT / "dorafit" / "data" / "ARC-Easy" / "test.json").read_text())[:2]
    plain = compare.plain_rows(rows, "ARC-Easy", "t.json")
    assert plain[0]["instruction"].startswith("Question: ") and plain[0]["instruction"].endswith("\nAnswer:")
    assert plain[0]["output"] == " casting" and plain[0]["input"] == ""  # row 1's answer is answer1
    boolq = [{"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                             "Answer format: true/false", "answer": "false"}]
    assert compare.plain_rows(boolq, "boolq", "b.json")[0]["output"] == " no"


def _records(compare, setup, val_losses: dict, outcome: dict) -> dict:
    """Records with every run done: val losses per (method, rank, lr) and per-row outcomes."""
    tasks = compare.TRAIN_TASKS + compare.TRANSFER_TASKS
    runs = {}
    for (method, rank, lr), loss in val_losses.items():
        for seed in setup.seeds:
            bits = outcome[(method, rank)](seed)
            runs[compare.run_name(method, rank, lr, seed)] = {
                "method": method, "rank": rank, "lr": lr, "seed": seed, "steps": 10, "train_seconds": 60.0,
                "val_loss": loss, "val_loss_first": 2.0, "trainable": 1,
                "scores": {t: {"acc": bits.count("1") / len(bits), "acc_norm": 0.5, "rows": len(bits), "outcomes": bits,
                               "outcomes_norm": bits, "seconds": 1.0} for t in tasks}}
    base = {t: {"acc": 0.5, "acc_norm": 0.5, "rows": 20, "outcomes": "01" * 10, "outcomes_norm": "01" * 10,
                "seconds": 1.0} for t in tasks}
    return {"runs": runs, "base": {"scores": base}, "stage_seconds": {"base": 10.0}}


def test_lr_choice_paired_differences_and_report(compare, tmp_path):
    setup = compare.Setup(ranks=(8,), seeds=(0, 1), lrs={"lora": (1e-4, 1e-3), "dora": (1e-4, 1e-3), "full": (1e-5,)})
    losses = {("lora", 8, 1e-4): 0.9, ("lora", 8, 1e-3): 0.8, ("lora", 8, 1e-2): 0.85, ("dora", 8, 1e-5): 0.72,
              ("dora", 8, 1e-4): 0.7, ("dora", 8, 1e-3): 0.75, ("full", None, 1e-5): 0.6}
    outcome = {("lora", 8): lambda s: "01" * 10, ("dora", 8): lambda s: "11" * 10, ("full", None): lambda s: "10" * 10}
    records = _records(compare, setup, losses, outcome)
    assert compare.chosen_lr(records, setup, "lora", 8) == 1e-3 and compare.chosen_lr(records, setup, "dora", 8) == 1e-4
    assert compare.chosen_lr({"runs": {}}, setup, "dora", 8) is None
    mean, se = compare.paired([1, 1, 1, 1], [0, 1, 0, 1])
    assert mean == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)
    text = compare.write_report(records, setup, tmp_path)
    assert (tmp_path / "report.md").read_text() == text
    # DoRA gets every row LoRA misses: +50 points on every task, far beyond two standard errors.
    line = next(l for l in text.splitlines() if l.startswith("| DoRA − LoRA, r 8 | acc |"))
    assert "+50.0 ± 11.5" in line and "decided" in line and "not decided" not in line
    # LoRA's best is the grid's top: one more step (1e-2) is searched before its lr is chosen.
    assert "| LoRA r 8 | 0.0001: 0.9000, 0.001: 0.8000, 0.01: 0.8500 | 0.001 |" in text
    assert "| DoRA r 8 | 1e-05: 0.7200, 0.0001: 0.7000, 0.001: 0.7500 | 0.0001 |" in text


def test_the_plan_orders_lr_search_before_the_chosen_seeds(compare):
    setup = compare.Setup(ranks=(16,), seeds=(0, 1), lrs={"lora": (1e-3,), "dora": (1e-3,), "full": (1e-5,)})
    keys = [k for k, _, _ in compare.stages(setup, {"runs": {}})]
    # The adapters' searches and seeds first, full fine-tuning after them; choices open until the searches ran.
    assert keys == ["base", "dora-r16-lr0.001-s0", "lora-r16-lr0.001-s0", "dora-r16-choice", "lora-r16-choice",
                    "full-lr1e-05-s0", "full-choice"]
    done = {"runs": {k: {"val_loss": 1.0, "lr": 1e-3 if "full" not in k else 1e-5} for k in keys if "-s0" in k}}
    later = [k for k, _, _ in compare.stages(setup, done)]
    # Seed by seed: both methods' seed 0 scored before either trains seed 1, so a stopped plan holds pairs.
    assert later[3:9] == ["eval:dora-r16-lr0.001-s0", "eval:lora-r16-lr0.001-s0", "dora-r16-lr0.001-s1",
                          "eval:dora-r16-lr0.001-s1", "lora-r16-lr0.001-s1", "eval:lora-r16-lr0.001-s1"]
    assert later[9:] == ["full-lr1e-05-s0", "eval:full-lr1e-05-s0", "full-lr1e-05-s1", "eval:full-lr1e-05-s1"]


def test_an_lr_at_the_end_of_the_grid_searches_one_step_past_it(compare):
    setup = compare.Setup(ranks=(16,), seeds=(0,), lrs={"lora": (1e-4, 3e-4, 1e-3), "dora": (1e-4, 3e-4, 1e-3),
                                                       "full": (1e-5,)})
    run = lambda lr, loss: {"val_loss": loss, "lr": lr}  # noqa: E731
    records = {"runs": {"dora-r16-lr0.0001-s0": run(1e-4, 3.0), "dora-r16-lr0.0003-s0": run(3e-4, 2.7),
                        "dora-r16-lr0.001-s0": run(1e-3, 2.5)}}
    assert compare.search_lrs(setup, records, "dora", 16) == [1e-4, 3e-4, 1e-3, 3e-3]
    assert compare.chosen_lr(records, setup, "dora", 16) is None  # not before 3e-3 ran
    keys = [k for k, _, _ in compare.stages(setup, records)]
    assert "dora-r16-lr0.003-s0" in keys and "eval:dora-r16-lr0.001-s0" not in keys
    records["runs"]["dora-r16-lr0.003-s0"] = run(3e-3, 2.6)  # worse: 1e-3 is a minimum between two searched
    assert compare.chosen_lr(records, setup, "dora", 16) == 1e-3
    records["runs"]["dora-r16-lr0.003-s0"] = run(3e-3, 2.4)  # better again: one step only (edge_steps 1)
    assert compare.search_lrs(setup, records, "dora", 16)[-1] == 3e-3
    assert compare.chosen_lr(records, setup, "dora", 16) == 3e-3
    records["runs"]["dora-r16-lr0.0001-s0"] = run(1e-4, 2.0)  # the bottom end extends downwards
    assert compare.search_lrs(setup, records, "dora", 16)[0] == 3e-5
    assert compare.search_lrs(compare.Setup(edge_steps=0), records, "dora", 16) == [1e-4, 3e-4, 1e-3]


def test_the_largest_rank_is_compared_before_the_smaller(compare):
    setup = compare.Setup(ranks=(8, 16), seeds=(0,), lrs={"lora": (1e-3,), "dora": (1e-3,), "full": (1e-5,)})
    runs = {k: {"val_loss": 1.0, "lr": 1e-3 if "full" not in k else 1e-5}
            for k in ("dora-r16-lr0.001-s0", "lora-r16-lr0.001-s0", "full-lr1e-05-s0")}
    evals = [k for k, _, _ in compare.stages(setup, {"runs": runs}) if k.startswith("eval:")]
    assert evals == ["eval:dora-r16-lr0.001-s0", "eval:lora-r16-lr0.001-s0", "eval:dora-r8-lr0.001-s0",
                     "eval:lora-r8-lr0.001-s0", "eval:full-lr1e-05-s0"]


def test_a_smaller_rank_runs_at_the_lr_its_method_chose_at_the_largest(compare):
    setup = compare.Setup(ranks=(8, 16), seeds=(0, 1), lrs={"lora": (1e-3,), "dora": (1e-4, 1e-3), "full": (1e-5,)},
                          edge_steps=0)
    keys = [k for k, _, _ in compare.stages(setup, {"runs": {}})]
    assert [k for k in keys if "-s0" in k] == ["dora-r16-lr0.0001-s0", "dora-r16-lr0.001-s0", "lora-r16-lr0.001-s0",
                                              "full-lr1e-05-s0"]  # no lr search at r 8
    runs = {k: {"val_loss": 0.5 if "0.0001" in k else 1.0, "lr": float(k.split("-lr")[1].rsplit("-s", 1)[0])}
            for k in keys if "-s0" in k}
    later = [k for k, _, _ in compare.stages(setup, {"runs": runs})]
    assert "dora-r8-lr0.0001-s0" in later and "eval:dora-r8-lr0.0001-s0" in later  # r 8 trains its seed 0 too
    assert "dora-r16-lr0.0001-s0" in later and "eval:dora-r16-lr0.0001-s0" in later
    assert later.count("dora-r16-lr0.0001-s0") == 1  # the search run is not trained twice


def test_a_partial_plan_gives_no_verdict(compare, tmp_path):
    setup = compare.Setup(ranks=(8,), seeds=(0, 1), lrs={"lora": (1e-3,), "dora": (1e-3,), "full": (1e-5,)})
    losses = {("lora", 8, 1e-3): 0.8, ("dora", 8, 1e-3): 0.8, ("full", None, 1e-5): 0.6}
    outcome = {("lora", 8): lambda s: "01" * 10, ("dora", 8): lambda s: "11" * 10, ("full", None): lambda s: "10" * 10}
    records = _records(compare, setup, losses, outcome)
    del records["runs"]["dora-r8-lr0.001-s1"]  # DoRA's second seed not run yet
    text = compare.write_report(records, setup, tmp_path)
    line = next(l for l in text.splitlines() if l.startswith("| DoRA − LoRA, r 8 | acc |"))
    assert "+50.0" in line and "no verdict yet (1 of 2 seeds scored)" in line and "decided" not in line
    assert "| DoRA r 8 (1 of 2 seeds) |" in text and "**The plan is not finished**" in text


def test_a_report_with_only_the_base_scored(compare, tmp_path):
    """Right after the first stage (no lr search finished): the base's row, the methods as not run."""
    setup = compare.Setup(ranks=(8,), seeds=(0, 1), lrs={"lora": (1e-4, 1e-3), "dora": (1e-4, 1e-3), "full": (1e-5,)})
    records = _records(compare, setup, {}, {})
    text = compare.write_report(records, setup, tmp_path)
    assert "| untrained |" in text and "**The plan is not finished**" in text
    assert "| LoRA r 8 | 0.0001: –, 0.001: – | – |" in text


def test_the_time_left_comes_from_the_stages_already_run(compare):
    setup = compare.Setup()
    runs = {"dora-r16-lr0.001-s0": {"method": "dora"}, "lora-r16-lr0.001-s0": {"method": "lora"},
            "lora-r16-lr0.003-s0": {"method": "lora"}, "full-lr1e-05-s0": {"method": "full"}}
    records = {"runs": runs, "stage_seconds": {"base": 2600.0, "dora-r16-lr0.001-s0": 300.0, "lora-r16-lr0.001-s0": 280.0,
                                               "lora-r16-lr0.003-s0": 400.0, "full-lr1e-05-s0": 700.0,
                                               "eval:dora-r16-lr0.001-s0": 480.0}}
    # the base's scoring (the untrained model, run beside other work) is not a trained run's scoring
    assert compare.rates_from(records, None, setup) == {"eval": 480.0, "train": 300.0, "train_full": 700.0}
    del records["stage_seconds"]["full-lr1e-05-s0"]
    assert compare.rates_from(records, None, setup) is None  # a kind never run and no smoke rates: no estimate
    smoke = {"per_unit": {"eval_per_row": 0.1, "train_per_step": 2.0, "run_overhead": 10.0,
                          "train_full_per_step": 4.0, "run_overhead_full": 20.0}}
    assert compare.rates_from(records, smoke, setup)["train_full"] == 4.0 * setup.steps + 20.0


def test_the_report_shows_what_a_second_seed_alone_moves(compare, tmp_path):
    setup = compare.Setup(ranks=(8,), seeds=(0, 1), lrs={"lora": (1e-3,), "dora": (1e-3,), "full": (1e-5,)})
    losses = {("lora", 8, 1e-3): 0.8, ("dora", 8, 1e-3): 0.8, ("full", None, 1e-5): 0.6}
    outcome = {("lora", 8): lambda s: "11" * 10 if s == 0 else "01" * 10, ("dora", 8): lambda s: "01" * 10,
               ("full", None): lambda s: "10" * 10}
    text = compare.write_report(_records(compare, setup, losses, outcome), setup, tmp_path)
    lora = next(l for l in text.splitlines() if l.startswith("| LoRA r 8, seed 0 − seed 1 | acc |"))
    assert lora.count("+50.0 ± 11.5") == 7 and lora.endswith("| +50.00 ± 4.24 |")  # 140 rows, half differ: sd 0.502 / √140
    dora = next(l for l in text.splitlines() if l.startswith("| DoRA r 8, seed 0 − seed 1 | acc |"))
    assert dora.count("+0.0 ± 0.0") == 7
    # LoRA's seeds score 100 % and 50 %: their spread (variance 0.125 / 2 seeds) joins the rows' se.
    versus = next(l for l in text.splitlines() if l.startswith("| DoRA − LoRA, r 8 | acc |"))
    assert versus.endswith("| -25.00 ± 25.09 | not decided; rows alone ± 2.12 |")
    del_one = _records(compare, setup, losses, outcome)
    del del_one["runs"]["lora-r8-lr0.001-s1"]
    assert "| LoRA r 8, seed 0 − seed 1 |" not in compare.write_report(del_one, setup, tmp_path)
