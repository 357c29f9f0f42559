"""Pilot sweep for the default run: DoRA on SmolLM2-135M-Instruct, a commonsense task, generation eval.

Each configuration below is one ``dorafit train`` run through the trainer's API with explicit
options (a prompt template, "paper" or the model's "chat" template; loss on the response only;
greedy generation and the paper's first-match answer extraction before and after training). Results are appended to
``experiments/results/pilot_smollm2.json`` after every run, keyed by the configuration's name,
so the script resumes where it stopped and skips what is done:

    PYTHONPATH=. python experiments/pilot_smollm2.py            # all configurations
    PYTHONPATH=. python experiments/pilot_smollm2.py --only A    # one of them

Every record keeps the wall-clock times (training only, and the whole run with both
evaluations), seconds per optimizer step, the 1-minute load average before and after (so
times measured on a shared machine can be scaled to an idle one honestly), and how often each
answer word was predicted before and after (a run that answers one word always shows there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "pilot_smollm2.json"
# LLM-Adapters' dataset/ folder (full train and test files), for tasks dorafit does not ship.
BUNDLED = Path(__file__).resolve().parents[1] / "dorafit" / "data"
# The commonsense files lie in ../shared beside the repository unless LLM_ADAPTERS_DATA says where.
LLM_ADAPTERS = Path(os.environ.get("LLM_ADAPTERS_DATA",
                                   Path(__file__).resolve().parents[2] / "shared" / "data" / "LLM-Adapters" / "dataset"))

COMMON = dict(model="smollm2-135m-instruct", task="ARC-Easy", method="dora", rank=16, alpha=32.0,
              batch_size=8, max_length=160, val_size=0, save_steps=0, eval_batch_size=25,
              max_new_tokens=10, warmup_steps=2, progress=False, max_test_rows=100)
CONFIGS = {
    # name: overrides of COMMON; only the first evaluates the untrained model (same rows for all).
    "A": dict(max_train_rows=128, lr=1e-3, eval_before=True),
    "B": dict(max_train_rows=256, lr=1e-3, eval_before=False),
    "C": dict(max_train_rows=128, lr=3e-3, eval_before=False),
    # The model's own chat template, more steps, 200 test rows (about +-3 points at 25-40 %).
    "D": dict(prompt_template="chat", max_train_rows=256, lr=2e-3, max_test_rows=200, max_new_tokens=8,
              eval_before=True),
    # D answered "answer2" for 196 of 200 rows: a lower lr with twice the updates (batch 4).
    "E": dict(prompt_template="chat", max_train_rows=256, lr=5e-4, batch_size=4, max_test_rows=200,
              max_new_tokens=8, eval_before=False),
    # E still chose answer2 for 145 of 200 rows. BoolQ answers with a word of meaning (true /
    # false) rather than a label to map a choice to; the first rows of LLM-Adapters' own files.
    "F": dict(prompt_template="chat", task="boolq", data_dir=str(LLM_ADAPTERS), max_train_rows=256, lr=5e-4,
              batch_size=4, max_test_rows=200, max_new_tokens=8, eval_before=True),
    # F answered "true" for all 200 rows (the majority class). The lr of E divided by 5: does a
    # smaller step keep the model's own preferences while it learns the format?
    "G": dict(prompt_template="chat", max_train_rows=256, lr=1e-4, batch_size=4, max_test_rows=200,
              max_new_tokens=8, eval_before=False),
    # G (28 %, three labels in use) against E (24 %, mostly one): the lr between them.
    "H": dict(prompt_template="chat", max_train_rows=256, lr=2e-4, batch_size=4, max_test_rows=200,
              max_new_tokens=8, eval_before=False),
    # No lr maps the model's knowledge to a bare label (small models bind choices to symbols
    # poorly). The response names the chosen text first and then its label, so the label is a
    # lookup of text the model has just written: "the correct answer is casting (answer1)".
    "I": dict(prompt_template="chat", max_train_rows=256, lr=5e-4, batch_size=4, max_test_rows=200,
              max_new_tokens=24, eval_before=False, response_format="choice"),
    "J": dict(prompt_template="chat", max_train_rows=256, lr=2e-4, batch_size=4, max_test_rows=200,
              max_new_tokens=24, eval_before=False, response_format="choice"),
    # I (5e-4) 33 %, J (2e-4) 28.5 %: with the choice text to lean on, larger steps help. Twice
    # and four times I's lr; K also measures the untrained model at 20 new tokens.
    "K": dict(prompt_template="chat", max_train_rows=256, lr=1e-3, batch_size=4, max_test_rows=200,
              max_new_tokens=20, eval_before=True, response_format="choice", threads=1),
    "L": dict(prompt_template="chat", max_train_rows=256, lr=2e-3, batch_size=4, max_test_rows=200,
              max_new_tokens=20, eval_before=False, response_format="choice", threads=1),
    # K as the default run took 6m20s with both evaluations on the otherwise idle machine: 40
    # steps instead of 62 for the 5-minute budget, at K's and L's lr.
    "M": dict(prompt_template="chat", max_train_rows=160, lr=1e-3, batch_size=4, max_test_rows=200,
              max_new_tokens=20, eval_before=False, response_format="choice", threads=1),
    "N": dict(prompt_template="chat", max_train_rows=160, lr=2e-3, batch_size=4, max_test_rows=200,
              max_new_tokens=20, eval_before=False, response_format="choice", threads=1),
}


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(RESULTS)


def sampling_error(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n rows (binomial)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def gold_counts(options: dict) -> dict:
    """How often each answer word is the right one among the evaluated test rows."""
    from collections import Counter

    from dorafit.eval.tasks import get_task

    folder = Path(options.get("data_dir") or BUNDLED) / get_task(options["task"]).folder
    rows = json.loads((folder / "test.json").read_text())
    return dict(sorted(Counter(r["answer"] for r in rows[: options["max_test_rows"] or None]).items()))


def chance(options: dict) -> float:
    """The bar a model without knowledge reaches: BoolQ's majority answer share, else the mean of
    1 / number of choices over the evaluated test rows."""
    from dorafit.eval.tasks import get_task, parse_instruction

    gold = gold_counts(options)
    if options["task"] == "boolq":
        return max(gold.values()) / sum(gold.values())
    folder = Path(options.get("data_dir") or BUNDLED) / get_task(options["task"]).folder
    rows = json.loads((folder / "test.json").read_text())[: options["max_test_rows"] or None]
    return sum(1 / len(parse_instruction(r["instruction"])[1]) for r in rows) / len(rows)


def run_one(name: str, overrides: dict) -> dict:
    from dorafit.train.config import TrainConfig
    from dorafit.train.trainer import train

    options = {**COMMON, **overrides}
    with tempfile.TemporaryDirectory(prefix=f"pilot-{name}-") as out:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        result = train(TrainConfig(output=str(Path(out) / "run"), **options))
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    n = result.test_rows
    record = {
        "options": options,
        "test_rows": n,
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "unparseable_before": result.unparseable_before,
        "unparseable_after": result.unparseable_after,
        "predicted_before": result.predicted_before,
        "predicted_after": result.predicted_after,
        "gold": gold_counts(options),
        "chance": chance(options),
        "sampling_error_chance": sampling_error(chance(options), n),
        "sampling_error_after": sampling_error(result.accuracy_after, n),
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "seconds_per_step": result.train_seconds / max(result.steps, 1),
        "total_seconds": result.total_seconds,
        "wall_seconds": wall,
        "load_1min_before": load_before,
        "load_1min_after": load_after,
        "cpus": os.cpu_count(),
    }
    return record


def add_derived(results: dict) -> None:
    """Fill in the chance level of records written before it was recorded (from the test rows)."""
    for record in results.values():
        if "gold" in record:
            record["chance"] = chance(record["options"])
            record["sampling_error_chance"] = sampling_error(record["chance"], record["test_rows"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="run only these configurations")
    args = parser.parse_args(argv)
    results = load_results()
    add_derived(results)
    save_results(results)
    for name in args.only or list(CONFIGS):
        if name in results:
            print(f"{name}: done already, skipped", flush=True)
            continue
        record = run_one(name, CONFIGS[name])
        results = load_results()  # another process may have added a record meanwhile
        results[name] = record
        save_results(results)
        print(f"{name}: {json.dumps(record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
