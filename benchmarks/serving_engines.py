"""Serving a DoRA adapter with the engines themselves: llama.cpp (llama-cpp-python) on dorafit's
GGUF exports, against dorafit's own evaluation of the adapter.

    python benchmarks/serving_engines.py --adapter runs/default/adapter --work runs/engines \\
        [--llama-venv /path/to/venv] [--rows 200] [--threads 2]

Steps; every result is kept in --work and reused by a rerun, so a long run can be resumed:

1. llama-cpp-python: the virtual environment --llama-venv (default <work>/llama-venv) is created
   with ``python -m venv`` and ``pip install llama-cpp-python==0.3.36`` when it has none (pip
   builds llama.cpp from source: about 30 minutes on a 2-core machine). llama.cpp's own
   converters come from the same release's source archive (``pip download --no-binary``); they
   run with dorafit's environment plus sentencepiece (``pip install --target <work>/converter-deps``).
2. Exports, with the library calls ``dorafit export`` makes: the merged model as GGUF (f16,
   q8_0, and ``source``: the adapted tensors re-quantized like the source file, Q4_1 for the
   default model); LoRA exports (rank 64, and the smallest rank with overall weight error
   <= 0.05) as PEFT folders and as llama.cpp LoRA GGUF files; the pre-normalized DoRA folder;
   the merged transformers folder (``dorafit merge``).
3. llama.cpp's own converters on dorafit's outputs, as cross-checks: convert_hf_to_gguf.py on
   the base folder (an f16 base for the LoRA files) and on the merged folder (f16),
   convert_lora_to_gguf.py on the PEFT LoRA exports.
4. References with transformers: ``dorafit eval``'s accuracy of the adapter (unmerged, on the
   base it was trained on) on the test rows, and the merged model's greedy 32-token
   continuations of the first 10 prompts.
5. llama.cpp: every GGUF (with its LoRA file where there is one) continues the same prompt ids
   greedily: 32 tokens on the 10 prompts (identical continuations counted, up to the first
   end-of-generation token) and the evaluation's tokens on all rows, decoded and scored by
   dorafit's own answer extraction.
6. The table: benchmarks/results/serving_engines.md (and .json next to it), with the command
   and the load average before and after.

The pre-normalized folder is checked with dorafit's loader, which computes what TensorRT-LLM's
DoRA plugin computes (g ⊙ (W0 x + s B A x) + b); TensorRT-LLM itself needs an NVIDIA GPU and
its own packages and is not run here.
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

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
WORKER = Path(__file__).resolve().parent / "llama_cpp_worker.py"
RESULTS = ROOT / "benchmarks" / "results" / "serving_engines"
GREEDY_PROMPTS, GREEDY_TOKENS = 10, 32


def log(*args) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def load_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def save_json(path: Path, obj) -> None:
    from dorafit.files import write_json_atomic

    write_json_atomic(path, obj)


# ---------------------------------------------------------------------------- 1. the engine's venv


def llama_venv(venv: Path) -> Path:
    """The python of a venv with llama-cpp-python, created when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"creating {venv} with {LLAMA_CPP_PYTHON} (builds llama.cpp from source: about 30 minutes on 2 cores)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", LLAMA_CPP_PYTHON], check=True)
    return python


def llama_cpp_source(work: Path) -> Path:
    """llama.cpp's source tree (its converters) from the llama-cpp-python release archive."""
    tree = work / "llama-cpp-source"
    converters = list(tree.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if converters:
        return converters[0].parent
    tree.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON,
                    "-d", str(tree)], check=True)
    archive = next(tree.glob("llama_cpp_python-*.tar.gz"))
    subprocess.run(["tar", "xzf", str(archive), "-C", str(tree)], check=True)
    return next(tree.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py")).parent


# ---------------------------------------------------------------------------- the adapted model


class Setup:
    """The adapter, its base and the evaluation rows, loaded once."""

    def __init__(self, adapter: Path, rows: int):
        from dorafit.io import recorded_base_model
        from dorafit.eval.examples import build_prompt
        from dorafit.eval.tasks import get_task
        from dorafit.train.models import load_tokenizer, resolve_model_path

        self.adapter = adapter
        self.info = load_json(adapter / "task.json") or {}
        self.base_name = recorded_base_model(adapter)
        self.base_path = resolve_model_path(self.base_name)
        self.tokenizer = load_tokenizer(self.base_path, False)
        self.task = get_task(self.info.get("task", "ARC-Easy"))
        data = ROOT / "dorafit" / "data" / self.task.folder / "test.json"
        self.rows = json.loads(data.read_text())[:rows]
        template = self.info.get("prompt_template", "chat")
        self.prompts = [build_prompt(template, r["instruction"], r.get("input") or "", self.tokenizer) for r in self.rows]
        self.ids = [self.tokenizer(p)["input_ids"] for p in self.prompts]
        self.answers = [str(r.get("answer") or "").strip() for r in self.rows]

    def model(self, adapter: bool = True):
        import dorafit
        from dorafit.train.models import load_model

        model, _ = load_model(self.base_path, "causal-lm", False)
        model.eval()
        if adapter:
            dorafit.load_adapter(model, self.adapter, trainable=False)
        return model

    def score(self, outputs):
        """EvalResult of token-id continuations, decoded and read by dorafit's extraction."""
        from dorafit.eval.evaluate import score_responses

        texts = self.tokenizer.batch_decode(outputs, skip_special_tokens=True)
        return score_responses(self.task, texts, self.answers)


# ---------------------------------------------------------------------------- 2. exports


def exports(setup: Setup, work: Path) -> dict:
    """dorafit's exports of the adapter; {name: path}. Existing files are kept."""
    import torch

    import dorafit
    from dorafit.export import export_dora_normalized, export_lora
    from dorafit.gguf_export import export_gguf, gguf_source

    out = work / "exports"
    out.mkdir(parents=True, exist_ok=True)
    source = gguf_source(setup.base_name)
    paths = {f"merged-{q}": out / f"merged-{q}.gguf" for q in ("f16", "q8_0", "source")}
    paths.update({"lora-r64": out / "lora-r64", "lora-e05": out / "lora-e05", "lora-r64.gguf": out / "lora-r64.gguf",
                  "lora-e05.gguf": out / "lora-e05.gguf", "normalized": out / "dora-normalized",
                  "merged-folder": out / "merged-folder"})
    model = None
    for q in ("f16", "q8_0", "source"):
        if not paths[f"merged-{q}"].is_file():
            model = model or setup.model()
            log(f"export --to gguf --quant {q}")
            export_gguf(model, paths[f"merged-{q}"], quant=q, source=source, progress=False)
    prompts = [{"input_ids": torch.tensor([ids])} for ids in setup.ids[:8]]
    reports = load_json(out / "lora-reports.json") or {}
    for name, kwargs in (("lora-r64", {"rank": 64}), ("lora-e05", {"max_error": 0.05})):
        if not (paths[name] / "adapter_config.json").is_file() or not paths[name + ".gguf"].is_file():
            model = model or setup.model()
            log(f"export --to lora {kwargs}")
            report = export_lora(model, paths[name], inputs=prompts, **kwargs)
            export_lora(model, paths[name + ".gguf"], format="gguf", **kwargs)
            reports[name] = {"rank": report.rank, "weight_error": report.weight_error, "logits_drift": report.logits_drift,
                             "drift_of_change": report.drift_of_change, "layer_ranks": sorted(set(report.layer_ranks.values()))}
            save_json(out / "lora-reports.json", reports)
    if not (paths["normalized"] / "adapter_config.json").is_file():
        model = model or setup.model()
        log("export --to dora-normalized")
        export_dora_normalized(model, paths["normalized"])
    if not (paths["merged-folder"] / "config.json").is_file():
        import copy

        from dorafit.files import atomic_directory

        model = model or setup.model()
        log("merge -> transformers folder")
        merged = dorafit.merge(copy.deepcopy(model))
        with atomic_directory(paths["merged-folder"]) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            setup.tokenizer.save_pretrained(tmp)
    paths["source"] = source
    paths["adapter"] = setup.adapter.resolve()
    paths["lora-reports"] = reports
    return paths


def normalized_checks(setup: Setup, paths: dict, work: Path) -> dict:
    """Reload of the pre-normalized folder on its base, and its drift on bases an engine may serve
    (rounded to f16 and bf16), on the first 8 prompts."""
    import copy

    import torch

    import dorafit
    from dorafit.export import check_dora_normalized

    cached = load_json(work / "normalized-checks.json")
    if cached:
        return cached
    tuned = setup.model()
    inputs = [{"input_ids": torch.tensor([ids])} for ids in setup.ids[:8]]
    ordinary = work / "exports" / "peft-layout"
    if not (ordinary / "adapter_config.json").is_file():
        dorafit.save_adapter(tuned, ordinary, format="peft")
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        base = setup.model(adapter=False)
        with torch.no_grad():
            for p in base.parameters():
                p.copy_(p.to(getattr(torch, dtype)).float())
        served = dorafit.load_adapter(copy.deepcopy(base), paths["normalized"], trainable=False,
                                      allow_base_mismatch=dtype != "float32")
        recomputed = dorafit.load_adapter(base, ordinary, trainable=False)
        check = check_dora_normalized(tuned, served, recomputed, inputs)
        results[dtype] = {"drift": check.drift, "drift_of_change": check.drift_of_change,
                          "drift_recomputed": check.drift_recomputed}
        log(f"dora-normalized on a {dtype} base: {results[dtype]}")
    save_json(work / "normalized-checks.json", results)
    return results


# ---------------------------------------------------------------------------- 3. llama.cpp's converters


def converters(setup: Setup, paths: dict, work: Path) -> dict:
    """llama.cpp's own conversions of the base folder, the merged folder and the PEFT LoRA exports."""
    src = llama_cpp_source(work)
    out = work / "llama-cpp-converted"
    out.mkdir(parents=True, exist_ok=True)
    made = {"base-f16": out / "base-f16.gguf", "merged-f16": out / "merged-f16.gguf",
            "lora-r64": out / "lora-r64.gguf", "lora-e05": out / "lora-e05.gguf"}
    deps = work / "converter-deps"  # what the converters import beyond dorafit's environment
    if not (deps / "sentencepiece").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps), "sentencepiece"], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(deps)]))
    jobs = [("base-f16", [str(src / "convert_hf_to_gguf.py"), setup.base_path, "--outtype", "f16"]),
            ("merged-f16", [str(src / "convert_hf_to_gguf.py"), str(paths["merged-folder"]), "--outtype", "f16"])]
    for name in ("lora-r64", "lora-e05"):
        jobs.append((name, [str(src / "convert_lora_to_gguf.py"), str(paths[name]), "--base", setup.base_path,
                            "--outtype", "f32"]))
    for name, cmd in jobs:
        if not made[name].is_file():
            log(f"llama.cpp converter: {name}")
            subprocess.run([sys.executable, *cmd, "--outfile", str(made[name])], check=True, env=env,
                           stdout=subprocess.DEVNULL)
    return made


# ---------------------------------------------------------------------------- 4. transformers references


def references(setup: Setup, work: Path, max_new_tokens: int) -> dict:
    cached = load_json(work / "references.json")
    if cached and cached.get("rows") == len(setup.rows):
        return cached
    import torch

    import dorafit
    from dorafit.eval.evaluate import evaluate_generation

    model = setup.model()
    log(f"dorafit eval on {len(setup.rows)} rows")
    result = evaluate_generation(model, setup.tokenizer, setup.task, setup.rows, max_new_tokens,
                                 batch_size=25, prompt_template=setup.info.get("prompt_template", "chat"))
    merged = dorafit.merge(model)
    continuations = []
    with torch.no_grad():
        for ids in setup.ids[:GREEDY_PROMPTS]:
            out = merged.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False, num_beams=1,
                                  pad_token_id=setup.tokenizer.pad_token_id)
            continuations.append(out[0, len(ids):].tolist())
    refs = {"rows": len(setup.rows), "accuracy": result.accuracy, "correct": result.correct,
            "unparseable": result.unparseable, "continuations": continuations}
    save_json(work / "references.json", refs)
    return refs


def transformers_on_gguf(setup: Setup, file: Path, work: Path, max_new_tokens: int, pieces: "Pieces"):
    """transformers' GGUF loader on a dorafit GGUF file, scored like dorafit eval: separates what
    the file holds from what llama.cpp computes."""
    cache = work / f"transformers-{file.stem}.json"
    cached = load_json(cache)
    if cached and cached.get("rows") == len(setup.rows):
        return cached
    if not pieces.spend(f"transformers' GGUF loader on {file.name}"):
        return None
    from transformers import AutoModelForCausalLM

    from dorafit.eval.evaluate import evaluate_generation

    log(f"transformers on {file.name}")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name).eval()
    result = evaluate_generation(model, setup.tokenizer, setup.task, setup.rows, max_new_tokens, batch_size=25,
                                 prompt_template=setup.info.get("prompt_template", "chat"))
    row = {"rows": len(setup.rows), "engine": "transformers (its GGUF loader, dequantized to float32)",
           "config": f"dorafit GGUF, {file.stem.split('-', 1)[1]}", "route": "merged GGUF", "accuracy": result.accuracy,
           "unparseable": result.unparseable, "seconds": time.perf_counter() - start,
           "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    save_json(cache, row)
    return row


# ---------------------------------------------------------------------------- 5. llama.cpp


class Pieces:
    """How many long steps (engine configurations) this process may run: None for all; a number
    stops the run with Budget after that many (a rerun resumes); ``table_only`` runs none and
    lists the uncached ones as not run."""

    def __init__(self, limit, table_only: bool = False):
        self.limit, self.table_only, self.not_run = limit, table_only, []

    def spend(self, label: str) -> bool:
        if self.table_only:
            self.not_run.append(label)
            return False
        if self.limit is not None:
            if self.limit <= 0:
                raise Budget
            self.limit -= 1
        return True


def run_llama(python: Path, setup: Setup, model: Path, lora, max_new_tokens: int, threads: int, count: int, texts: bool) -> dict:
    job = {"model": str(model), "lora": str(lora) if lora else None, "prompts": setup.ids[:count],
           "texts": setup.prompts[:count] if texts else [], "max_new_tokens": max_new_tokens, "threads": threads,
           "n_ctx": 512}
    done = subprocess.run([str(python), str(WORKER)], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama.cpp on {model.name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def first_eog(tokens, eog) -> list:
    for i, t in enumerate(tokens):
        if t in eog:
            return tokens[:i]
    return tokens


class Budget(Exception):
    """Raised when a run has used its --pieces: the next run resumes from the cached results."""


def engine_rows(python: Path, setup: Setup, paths: dict, made: dict, refs: dict, work: Path,
                max_new_tokens: int, threads: int, pieces: Pieces) -> list:
    configs = [
        ("dorafit GGUF, f16", "merged GGUF", paths["merged-f16"], None),
        ("dorafit GGUF, q8_0", "merged GGUF", paths["merged-q8_0"], None),
        ("dorafit GGUF, source (Q4_1)", "merged GGUF", paths["merged-source"], None),
        ("llama.cpp convert_hf_to_gguf, f16 (cross-check)", "merged folder", made["merged-f16"], None),
        ("dorafit LoRA GGUF r64 + original Q4_1 file", "LoRA export", paths["source"], paths["lora-r64.gguf"]),
        ("dorafit LoRA GGUF r64 + f16 base", "LoRA export", made["base-f16"], paths["lora-r64.gguf"]),
        ("dorafit LoRA GGUF max-error 0.05 + original Q4_1 file", "LoRA export", paths["source"], paths["lora-e05.gguf"]),
        ("convert_lora_to_gguf of the max-error 0.05 export + Q4_1 (cross-check)", "LoRA export", paths["source"], made["lora-e05"]),
        ("convert_lora_to_gguf of the r64 export + Q4_1 (cross-check)", "LoRA export", paths["source"], made["lora-r64"]),
    ]
    out_dir = work / "llama-cpp-runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, route, model, lora) in enumerate(configs):
        cache = out_dir / f"{i:02d}.json"
        result = load_json(cache)
        if result is None or result.get("rows") != len(setup.rows):
            if not pieces.spend(label):
                continue
            log(f"llama.cpp: {label}")
            load_before = os.getloadavg()[0]
            greedy = run_llama(python, setup, model, lora, GREEDY_TOKENS, threads, GREEDY_PROMPTS, texts=True)
            scored = run_llama(python, setup, model, lora, max_new_tokens, threads, len(setup.rows), texts=False)
            result = {"rows": len(setup.rows), "greedy": greedy["outputs"], "eog": greedy["eog"],
                      "tokenized_like_ids": greedy["tokenized_like_ids"], "outputs": scored["outputs"],
                      "seconds": scored["seconds"], "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            save_json(cache, result)
        eog = set(result["eog"])
        same = sum(first_eog(a, eog) == first_eog(b, eog) for a, b in zip(result["greedy"], refs["continuations"]))
        scored = setup.score(result["outputs"])
        rows.append({"engine": "llama.cpp (llama-cpp-python 0.3.36)", "config": label, "route": route,
                     "identical": same, "compared": len(result["greedy"]), "accuracy": scored.accuracy, "unparseable": scored.unparseable,
                     "tokenized_like_ids": result["tokenized_like_ids"], "seconds": result["seconds"],
                     "load": result.get("load")})
        log(f"  {label}: {same}/{len(result['greedy'])} identical, accuracy {100 * scored.accuracy:.1f}%")
    return rows


def kept_share(paths: dict, work: Path) -> dict:
    """Share of the fine-tune's change W' - W0 that the ``source``-quantized merged file keeps: the
    projection <Q(W') - W0, W' - W0> / ||W' - W0||^2 over the replaced tensors, W0 from the source
    file, W' from the f16 export (all three in the files' own row order)."""
    cached = load_json(work / "kept-share.json")
    if cached:
        return cached
    import gguf
    import numpy as np

    from dorafit.gguf_export import dequantized

    def tensors(file):
        return {t.name: t for t in gguf.GGUFReader(str(file)).tensors}

    base, exact, quantized = tensors(paths["source"]), tensors(paths["merged-f16"]), tensors(paths["merged-source"])
    dot = norm = 0.0
    per_type: dict = {}
    for name, t in exact.items():
        if t.tensor_type == base[name].tensor_type:
            continue  # not replaced (the f16 export writes only the replaced tensors as f16)
        w0 = dequantized(base[name]).astype(np.float64)
        change = dequantized(t).astype(np.float64) - w0
        got = dequantized(quantized[name]).astype(np.float64) - w0
        kind = name.split(".")[-2]
        d, n = float((got * change).sum()), float((change * change).sum())
        dot, norm = dot + d, norm + n
        per_type[kind] = [per_type.get(kind, [0.0, 0.0])[0] + d, per_type.get(kind, [0.0, 0.0])[1] + n]
    result = {"adapter": str(paths["adapter"]), "overall": dot / norm, "by_tensor": {k: v[0] / v[1] for k, v in sorted(per_type.items())}}
    save_json(work / "kept-share.json", result)
    return result


# ---------------------------------------------------------------------------- 6. the table


def write_table(rows: list, refs: dict, paths: dict, normalized: dict, kept: dict, command: str, loads: tuple,
                not_run: list) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    ref = 100 * refs["accuracy"]
    lines = [
        "# Serving the default run's adapter with llama.cpp",
        "",
        f"Produced by `{command}` (load average {loads[0]} before, {loads[1]} after).",
        "",
        f"Reference: `dorafit eval` of the adapter (transformers, unmerged, float32) on the {refs['rows']} test rows: "
        f"**{ref:.1f} %** ({refs['correct']} right, {refs['unparseable']} unparseable). Greedy continuations: 32 tokens "
        "of the first 10 prompts by transformers' merged model (float32), compared up to the first end-of-generation token.",
        "",
        "| engine | route | configuration | identical continuations | accuracy | Δ vs dorafit eval | s for the rows | load avg before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = 100 * r["accuracy"]
        identical = f"{r['identical']}/{r['compared']}" if r.get("compared") else "-"
        load = f"{r['load'][0]} → {r['load'][1]}" if r.get("load") else "not recorded"
        lines.append(f"| {r['engine']} | {r['route']} | {r['config']} | {identical} | {acc:.1f} % | "
                     f"{acc - ref:+.1f} | {r['seconds']:.0f} | {load} |")
    if not_run:
        lines += ["", "Not run (the table was written from the configurations finished so far): "
                  + "; ".join(not_run) + "."]
    run = load_json(Path(kept["adapter"]).parent / "results.json") or {}
    before = f" (the base's own accuracy: {100 * run['accuracy_before']:.1f} %, the run's results.json)" \
        if "accuracy_before" in run else ""
    by_tensor = ", ".join(f"{k} {100 * v:.0f} %" for k, v in kept["by_tensor"].items())
    lines += ["", f"The `source` (Q4_1) file keeps {100 * kept['overall']:.0f} % of the fine-tune's change W' - W0 "
                  f"(projection of Q(W') - W0 on W' - W0 over the replaced tensors, W' from the f16 export; {by_tensor})"
                  + (": " if kept["overall"] < 0.5 else ". ")
                  + (f"most of the change is smaller than Q4_1's step and rounds back to the base{before}. "
                     "The LoRA GGUF beside the original Q4_1 file keeps it." if kept["overall"] < 0.5 else "")]
    lora = paths["lora-reports"]
    lines += ["", "LoRA exports (weight error = share of ‖ΔW‖ lost; logits drift on 8 prompts):", ""]
    for name, rep in lora.items():
        lines.append(f"- {name}: rank {rep['rank']} (layer ranks {rep['layer_ranks']}), weight error "
                     f"{100 * rep['weight_error']:.2f} %, logits drift {100 * rep['logits_drift']:.3f} % "
                     f"({100 * rep['drift_of_change']:.1f} % of the fine-tune's change)")
    lines += ["", "Pre-normalized DoRA (dorafit's loader computing TensorRT-LLM's g ⊙ (W0 x + s B A x) + b; "
                  "logits drift from the adapted model on 8 prompts):", ""]
    for dtype, rec in normalized.items():
        lines.append(f"- base weights {dtype}: g as exported {100 * rec['drift']:.2e} %, g recomputed on that base "
                     f"{100 * rec['drift_recomputed']:.2e} %")
    lines.append("")
    RESULTS.with_suffix(".md").write_text("\n".join(lines))
    save_json(RESULTS.with_suffix(".json"), {"reference": refs | {"continuations": None}, "rows": rows, "lora": lora,
                                             "normalized": normalized, "source_quant_kept_share": kept,
                                             "not_run": not_run})
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="the adapter folder (e.g. the default run's adapter/)")
    parser.add_argument("--work", required=True, help="folder for the exports and intermediate results")
    parser.add_argument("--llama-venv", default=None, help="venv with llama-cpp-python (made when missing)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=20, help="the evaluation's (the default run's: 20)")
    parser.add_argument("--pieces", type=int, default=None,
                        help="run at most this many uncached engine configurations, then stop (a rerun resumes); "
                             "keeps each process short on a shared machine")
    parser.add_argument("--table-only", action="store_true",
                        help="run no engine configuration: write the table from the finished ones, listing the rest")
    args = parser.parse_args()
    loads = (f"{os.getloadavg()[0]:.2f}",)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    python = llama_venv(Path(args.llama_venv) if args.llama_venv else work / "llama-venv")
    setup = Setup(Path(args.adapter), args.rows)
    paths = exports(setup, work)
    normalized = normalized_checks(setup, paths, work)
    made = converters(setup, paths, work)
    refs = references(setup, work, args.max_new_tokens)
    pieces = Pieces(args.pieces, args.table_only)
    try:
        rows = engine_rows(python, setup, paths, made, refs, work, args.max_new_tokens, args.threads, pieces)
        rows += [r for r in [transformers_on_gguf(setup, paths["merged-source"], work, args.max_new_tokens, pieces)] if r]
    except Budget:
        log(f"stopped after --pieces {args.pieces}; rerun the same command to continue")
        return
    command = "python benchmarks/serving_engines.py " + " ".join(sys.argv[1:])
    write_table(rows, refs, paths, normalized, kept_share(paths, work), command, loads + (f"{os.getloadavg()[0]:.2f}",),
                pieces.not_run)


if __name__ == "__main__":
    main()
