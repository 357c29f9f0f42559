"""Pilot for the default run, judged by both scorings: can generation after training reach the
untrained model's likelihood accuracy within 5 minutes?

`dorafit train` with no options fine-tunes SmolLM2-135M-Instruct with DoRA on the shipped
ARC-Easy subset and reports, before and after, generation accuracy (the paper's protocol) and
likelihood acc / acc_norm (lm-evaluation-harness's). The untrained model already gets 54 % of
the 200 test rows by likelihood and 1.5 % by generation; the earlier default (pilot K of
experiments/pilot_smollm2.py) ends at 38 % by generation. Each configuration here is one run
through the trainer's API (options over ``COMMON``, which is that default); its record keeps
both scorings before and after, the times (training, whole run), the load average, and a
diagnosis of the generated answers (``diagnose``): how often the response names one of the
choices exactly, how often the label it writes is the one of the choice it named, and how
often the named choice is the right one or the one likelihood prefers. Records go to
experiments/results/pilot_default.json after every run; a rerun skips finished ones; ``table``
prints the records as the table of docs/causal_lm.md:

    PYTHONPATH=. python experiments/pilot_default.py [--only NAME ...]
    PYTHONPATH=. python experiments/pilot_default.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "pilot_default.json"
LLM_ADAPTERS = Path(os.environ.get("LLM_ADAPTERS_DATA", ROOT.parent / "shared" / "data" / "LLM-Adapters" / "dataset"))

# The earlier default (pilot K): DoRA r 16 on q,k,v,up,down, chat template, choice responses,
# lr 1e-3, batch 4, 62 steps over the 248 kept rows of the shipped 256, 200 test rows.
COMMON = dict(progress=False, eval_before=False)
CONFIGS = {
    "K": dict(eval_before=True),  # the earlier default, now with both scorings (and "before" for all)
    # More optimizer steps: twice the rows (the first 512 of LLM-Adapters' full ARC-Easy train
    # file, which the shipped subset is drawn from) or two epochs of the shipped rows.
    "K-512rows": dict(data=str(LLM_ADAPTERS / "ARC-Easy" / "train.json"), max_train_rows=512),
    "K-2epochs": dict(epochs=2),
    # The same rows and updates as K-2epochs in half the steps: batch 8 at twice the lr.
    "K-batch8": dict(epochs=2, batch_size=8, lr=2e-3),
}


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(results: dict) -> None:
    from dorafit.files import write_json_atomic

    write_json_atomic(RESULTS, results)


def named_choices(rows: list[dict], generated: list[dict]) -> list[int | None]:
    """Per row, the choice a response "the correct answer is <text> (answerN)" names by its exact
    text (case aside), or None."""
    from dorafit.eval.tasks import parse_instruction

    named = []
    for row, g in zip(rows, generated):
        _, choices, _ = parse_instruction(row["instruction"])
        match = re.search(r"the correct answer is (.*?) \((answer\d)", g["response"] or "")
        text = match.group(1).strip().lower() if match else None
        named.append(next((k for k, c in enumerate(choices) if c.strip().lower() == text), None))
    return named


def diagnose(rows: list[dict], named: list, labels: list, loglik_choice: list | None) -> dict:
    """Counts over the test rows: responses naming a choice, labels matching the named choice,
    named choices that are right or that likelihood (untrained) prefers."""
    from dorafit.eval.tasks import parse_instruction

    counts = dict.fromkeys(("rows", "named_a_choice", "label_is_named_choice", "named_is_right",
                            "named_is_loglik_choice"), 0)
    for i, (row, k) in enumerate(zip(rows, named)):
        words = parse_instruction(row["instruction"])[2]
        counts["rows"] += 1
        if k is None:
            continue
        counts["named_a_choice"] += 1
        counts["label_is_named_choice"] += labels[i] == words[k]
        counts["named_is_right"] += words[k] == row["answer"]
        counts["named_is_loglik_choice"] += bool(loglik_choice) and k == loglik_choice[i]
    return counts


def run(name: str, overrides: dict) -> dict:
    from dorafit.train import data as D
    from dorafit.train.config import TrainConfig
    from dorafit.train.trainer import train

    options = {**COMMON, **overrides}
    with tempfile.TemporaryDirectory(prefix=f"pilot-{name}-") as tmp:
        out = Path(tmp) / "run"
        load_before, started = os.getloadavg()[0], time.perf_counter()
        result = train(TrainConfig(output=str(out), **options))
        wall, load_after = time.perf_counter() - started, os.getloadavg()[0]
        predictions = json.loads((out / "predictions.json").read_text())
    rows = D.read_rows(D.BUNDLED_DATA / "ARC-Easy" / "test.json")[: result.test_rows]
    return {"loglik_choice": [p["pred"] for p in predictions.get("loglik_before", [])] or None,
            "named_choice": named_choices(rows, predictions["generate_after"]),
            "label": [p["pred"] for p in predictions["generate_after"]], "options": options, "test_rows": result.test_rows, "steps": result.steps,
            "generate_before": result.accuracy_before, "unparseable_before": result.unparseable_before,
            "generate_after": result.accuracy_after, "unparseable_after": result.unparseable_after,
            "loglik_before": result.loglik_before, "loglik_after": result.loglik_after, "change": result.change,
            "train_seconds": result.train_seconds, "total_seconds": result.total_seconds, "wall_seconds": wall,
            "load_1min_before": load_before, "load_1min_after": load_after}


def table(results: dict) -> str:
    """The records as a markdown table (the untrained likelihood choice from the record that has it)."""
    from dorafit.eval.report import with_error
    from dorafit.train import data as D

    untrained = next((r["loglik_choice"] for r in results.values() if r.get("loglik_choice")), None)
    before = next((r for r in results.values() if r.get("loglik_before")), None)
    lines = ["| run | steps | generation after (unparseable) | likelihood acc after | acc_norm after | "
             "names a choice | label = named | named = right | named = untrained likelihood's | training / total "
             "(1-min load) |", "|---|---|---|---|---|---|---|---|---|---|"]
    if before:
        n = before["test_rows"]
        lines.append(f"| untrained | 0 | {with_error(before['generate_before'], n)} ({100 * before['unparseable_before']:.1f}%) "
                     f"| {with_error(before['loglik_before']['acc'], n)} | {with_error(before['loglik_before']['acc_norm'], n)} "
                     "| | | | | |")
    for name, r in results.items():
        n = r["test_rows"]
        rows = D.read_rows(D.BUNDLED_DATA / "ARC-Easy" / "test.json")[:n]
        d = diagnose(rows, r["named_choice"], r["label"], untrained)
        lines.append(f"| {name} | {r['steps']} | {with_error(r['generate_after'], n)} ({100 * r['unparseable_after']:.1f}%) "
                     f"| {with_error(r['loglik_after']['acc'], n)} | {with_error(r['loglik_after']['acc_norm'], n)} "
                     f"| {d['named_a_choice']} | {d['label_is_named_choice']} | {d['named_is_right']} | "
                     f"{d['named_is_loglik_choice'] if untrained else '–'} | {r['train_seconds']:.0f} s / "
                     f"{r['total_seconds']:.0f} s ({r['load_1min_before']:.1f} → {r['load_1min_after']:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS))
    parser.add_argument("--table", action="store_true", help="print the records as a table")
    args = parser.parse_args(argv)
    if args.table:
        print(table(load()))
        return 0
    for name in args.only or list(CONFIGS):
        if name in load():
            print(f"{name}: done already", flush=True)
            continue
        record = run(name, CONFIGS[name])
        results = load()
        results[name] = record
        save(results)
        print(f"{name}: {json.dumps(record)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
