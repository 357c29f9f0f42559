"""The whole path on the real model, from the adapter of the default run (`dorafit train`).

    dorafit train --output runs/default                      # the default run: SmolLM2, DoRA, ARC-Easy
    PYTHONPATH=. python experiments/smollm2_path.py runs/default/adapter

Runs, and records in ``experiments/results/smollm2_path.json`` (printing each figure):
1. ``dorafit eval`` on the seven test sets shipped in dorafit/data (``--max-rows``, default 100);
2. ``dorafit merge`` into a folder, loaded by plain transformers: greedy ``generate`` on test
   prompts compared token for token with the attached, unmerged model;
3. the adapter saved in PEFT's format and loaded by ``PeftModel``: relative logits difference,
   and ``merge_and_unload``'s weights against dorafit's merged folder;
4. ``dorafit analyze`` on the adapter (magnitude/direction table of the query projections);
5. QDoRA: a few training steps of the same recipe on an NF4 base (``--quantize nf4``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "smollm2_path.json"
MODEL = "smollm2-135m-instruct"


def cli(*args: str) -> float:
    """Run one dorafit command in this process; its wall-clock seconds."""
    from dorafit.cli import main

    start = time.perf_counter()
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"dorafit {' '.join(args)} exited with {code}")
    return time.perf_counter() - start


def evaluate_all(adapter: Path, rows: int, work: Path) -> dict:
    report = work / "eval.json"
    seconds = cli("eval", "--adapter", str(adapter), "--task", "all", "--max-rows", str(rows),
                  "--max-new-tokens", "32", "--no-progress", "--json", str(report))
    return {"rows_per_task": rows, "seconds": seconds, "tasks": json.loads(report.read_text())}


def test_prompts(n: int) -> list[str]:
    from dorafit.eval.examples import build_prompt
    from dorafit.train.data import BUNDLED_DATA
    from dorafit.train.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(MODEL), trust_remote_code=False)
    rows = json.loads((BUNDLED_DATA / "ARC-Easy" / "test.json").read_text())[:n]
    return [build_prompt("chat", r["instruction"], r["input"], tokenizer) for r in rows]


def merge_and_generate(adapter: Path, work: Path, prompts: list[str]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import dorafit
    from dorafit.train.models import load_model, load_tokenizer, resolve_model_path

    merged = work / "merged"
    seconds = cli("merge", "--adapter", str(adapter), "--out", str(merged))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    adapted, _ = load_model(MODEL, "causal-lm", trust_remote_code=False)
    dorafit.load_adapter(adapted, adapter)
    adapted.eval()
    tokenizer = load_tokenizer(resolve_model_path(MODEL), trust_remote_code=False, padding_side="left")
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = adapted.generate(**batch, max_new_tokens=24, do_sample=False)
        got = plain.generate(**batch, max_new_tokens=24, do_sample=False)
    new = want[:, batch["input_ids"].shape[1]:]
    return {"merge_seconds": seconds, "prompts": len(prompts), "new_tokens": 24,
            "identical_rows": int((want == got).all(dim=1).sum()),
            "dorafit_modules_in_merged": sum(type(m).__module__.startswith("dorafit") for m in plain.modules()),
            "example": tokenizer.decode(new[0], skip_special_tokens=True)}, adapted, batch, merged


def peft_parity(adapted, batch, merged: Path, work: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import dorafit
    from dorafit.train.models import resolve_model_path

    peft_dir = work / "peft"
    dorafit.save_adapter(adapted, peft_dir, format="peft")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL))
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    with torch.no_grad():
        ours, theirs = adapted(**batch).logits, peft_model(**batch).logits
    unloaded = peft_model.merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    worst = max(((unloaded[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for k, v in plain.items())
    return {"relative_logits_difference": ((ours - theirs).norm() / theirs.norm()).item(),
            "largest_relative_weight_difference_after_merge_and_unload": worst}


def analyze(adapter: Path, work: Path) -> dict:
    out = work / "analysis"
    seconds = cli("analyze", str(adapter), "--out", str(out), "--no-plot")
    return {"seconds": seconds, "files": sorted(p.name for p in out.iterdir()),
            "analysis": json.loads((out / "analysis.json").read_text())}


def qdora(work: Path, steps: int) -> dict:
    out = work / "qdora"
    seconds = cli("train", "--quantize", "nf4", "--max-train-rows", str(4 * steps), "--max-test-rows", "40",
                  "--output", str(out), "--no-progress")
    return {"seconds": seconds, **json.loads((out / "results.json").read_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--rows", type=int, default=100, help="test rows per task for dorafit eval")
    parser.add_argument("--qdora-steps", type=int, default=8)
    args = parser.parse_args(argv)
    record = {"adapter": str(args.adapter), "load_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="smollm2-path-") as tmp:
        work = Path(tmp)
        record["eval"] = evaluate_all(args.adapter, args.rows, work)
        print(json.dumps(record["eval"]), flush=True)
        record["merge"], adapted, batch, merged = merge_and_generate(args.adapter, work, test_prompts(8))
        print(json.dumps(record["merge"]), flush=True)
        record["peft"] = peft_parity(adapted, batch, merged, work)
        print(json.dumps(record["peft"]), flush=True)
        del adapted
        record["analyze"] = analyze(args.adapter, work)
        print(json.dumps(record["analyze"])[:2000], flush=True)
        record["qdora"] = qdora(work, args.qdora_steps)
        print(json.dumps(record["qdora"]), flush=True)
    record["load_1min_after"] = os.getloadavg()[0]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
