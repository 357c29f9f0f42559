"""The DoRA paper's experiments on SmolLM2-135M-Instruct, on one 2-core CPU in about 4 hours.

    PYTHONPATH=. python experiments/reproduce_smollm2.py STAGE [--dry-run] [--only NAME]

STAGE is pilot, sweep, vera, figure2, detach, report or all (every stage in order). Each run
trains on one fixed mix of the four commonsense training sets (BoolQ, ARC-e, ARC-c, OBQA: the
first TRAIN_PER_TASK rows of each after a fixed shuffle, the same rows for every seed), then
generates greedily on TEST_ROWS rows of each of the seven test sets and scores the first answer
word (dorafit's evaluator); PIQA, SIQA and WinoGrande are zero-shot transfer.

Adapter runs go through ``dorafit.train.trainer.train`` (with ``save_steps`` and ``resume``).
Full fine-tuning is not a ``dorafit train`` method, and TrainConfig has no option for
AdapterConfig.detach_norm, so those runs use the short loop ``train_own`` below on the same
examples, collate function and loss as the trainer. Every finished run writes
``<results>/runs/<name>.json`` atomically and is skipped afterwards; an interrupted run
continues from its last checkpoint in ``<work>/<name>/``.

Overrides for tests and small trials (environment): REPRO_MODEL; REPRO_DATA (LLM-Adapters'
dataset/ folder; or LLM_ADAPTERS_DATA, as in experiments/pilot_smollm2.py); REPRO_WORK;
REPRO_RESULTS; REPRO_TRAIN_PER_TASK; REPRO_TEST_ROWS; REPRO_BATCH; REPRO_MAX_NEW_TOKENS;
REPRO_PROMPT_TEMPLATE; REPRO_SEEDS (e.g. "0"); REPRO_FIGURE2_CHECKPOINTS; REPRO_SAVE_STEPS;
REPRO_STOP_AFTER_STEPS (stops adapter runs early, as if killed, to test resuming).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# -- budget. Measured on this machine: a step of 4 rows x ~120 tokens 2.3-2.7 s; 50 generated
# test rows ~20 s per task (7 tasks ~2.5 min); so a 60-step run with its evaluation takes
# ~5 min. 8 (rank sweep) x 3 seeds + 2 pilot + 8 lr-sweep + 2 VeRA/DVoRA + 3 Figure-2
# + 2 detach = 41 runs; FT steps cost ~2x a DoRA step: about 3.5-4 h in all.
MODEL = os.environ.get("REPRO_MODEL", "smollm2-135m-instruct")
# LLM-Adapters' dataset/ folder lies in ../shared beside the repository unless the environment says where.
DATA = Path(os.environ.get("REPRO_DATA") or os.environ.get("LLM_ADAPTERS_DATA")
            or ROOT.parent / "shared" / "data" / "LLM-Adapters" / "dataset")
WORK = Path(os.environ.get("REPRO_WORK", HERE / "runs" / "reproduction_smollm2"))
RESULTS = Path(os.environ.get("REPRO_RESULTS", HERE / "results" / "reproduction_smollm2"))
TRAIN_PER_TASK = int(os.environ.get("REPRO_TRAIN_PER_TASK", 60))  # x 4 tasks = 240 rows
BATCH = int(os.environ.get("REPRO_BATCH", 4))  # 240 / 4 = 60 optimizer steps, one epoch
TEST_ROWS = int(os.environ.get("REPRO_TEST_ROWS", 50))  # per test set, the same for every run
MAX_NEW_TOKENS = int(os.environ.get("REPRO_MAX_NEW_TOKENS", 20))
SEEDS = tuple(int(s) for s in os.environ.get("REPRO_SEEDS", "0,1,2").split(","))
RANKS = (4, 8, 16, 32)
ONE_RANK = 16  # VeRA, DVoRA, Figure 2 and detach runs
LR = 1e-3  # LoRA/DoRA, from the pilot of the default run (experiments/pilot_smollm2.py, K)
FT_LR = 2e-5
VERA_LRS = (3e-3, 1e-2, 3e-2, 1e-1)  # VeRA trains only vectors and wants larger steps
FIGURE2_CHECKPOINTS = int(os.environ.get("REPRO_FIGURE2_CHECKPOINTS", 5))
SAVE_STEPS = int(os.environ.get("REPRO_SAVE_STEPS", 20))  # resumable checkpoints of ordinary runs
STOP_AFTER_STEPS = int(os.environ.get("REPRO_STOP_AFTER_STEPS", 0))  # tests: stop adapter runs as if killed
PAPER_R = {"FT": -0.62, "LoRA": 0.83, "DoRA": -0.31}
SIX_LAYERS = (0, 6, 12, 18, 24, 29)  # rule: evenly spaced over the 30 layers, first and last included
TRAIN_TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
TEST_TASKS = TRAIN_TASKS + ("piqa", "social_i_qa", "winogrande")
COMMON = dict(targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], dropout=0.05,
              prompt_template=os.environ.get("REPRO_PROMPT_TEMPLATE", "chat"), response_format="choice",
              max_length=160)


# ---------------------------------------------------------------------------- the runs


def plan() -> dict[str, dict]:
    """{run name: spec}, in the order the stages run. A spec's stage selects it."""
    runs: dict[str, dict] = {}

    def add(name, stage, method, rank=ONE_RANK, lr=LR, seed=0, **extra):
        runs[name] = dict(stage=stage, method=method, rank=rank, alpha=2.0 * rank, lr=lr, seed=seed, **extra)

    add("untrained", "pilot", "untrained")
    add("pilot-dora", "pilot", "dora")
    for method in ("lora", "dora"):
        for rank in RANKS:
            for seed in SEEDS:
                add(f"{method}-r{rank}-s{seed}", "sweep", method, rank=rank, seed=seed)
    for method in ("vera", "dvora"):  # lr chosen by mean test accuracy on the four trained tasks
        for lr in VERA_LRS:
            add(f"{method}-lr{lr:g}", "vera", method, lr=lr)
    for method in ("ft", "lora", "dora"):
        add(f"fig2-{method}", "figure2", method, lr=FT_LR if method == "ft" else LR,
            checkpoints=FIGURE2_CHECKPOINTS)
    for detach in (True, False):
        add(f"detach-{'on' if detach else 'off'}", "detach", "dora", detach_norm=detach)
    return runs


STAGES = ("pilot", "sweep", "vera", "figure2", "detach")


def steps_per_run() -> int:
    return len(TRAIN_TASKS) * TRAIN_PER_TASK // BATCH


def estimate_seconds(spec: dict) -> float:
    """From the timings measured on this machine (module docstring)."""
    evaluation = len(TEST_TASKS) * TEST_ROWS * 0.4
    step = {"untrained": 0.0, "ft": 5.0}.get(spec["method"], 2.5)
    return 30 + evaluation + step * steps_per_run()


# ---------------------------------------------------------------------------- data


def train_file() -> Path:
    """One JSON file of the training mix (seed-independent), written once."""
    path = WORK / "train_mix.json"
    if path.is_file():
        return path
    rows = []
    for task in TRAIN_TASKS:
        task_rows = json.loads((DATA / task / "train.json").read_text())
        random.Random(f"mix-{task}").shuffle(task_rows)
        rows += task_rows[:TRAIN_PER_TASK]
    random.Random("mix").shuffle(rows)
    write_json(path, rows)
    return path


def test_rows(task: str) -> list[dict]:
    return json.loads((DATA / task / "test.json").read_text())[:TEST_ROWS]


def chance(task: str) -> float:
    """A uniform guess over each row's choices; BoolQ's majority share."""
    from dorafit.eval.tasks import parse_instruction

    rows = test_rows(task)
    if task == "boolq":
        trues = sum(r["answer"].strip() == "true" for r in rows)
        return max(trues, len(rows) - trues) / len(rows)
    return sum(1 / len(parse_instruction(r["instruction"])[1]) for r in rows) / len(rows)


# ---------------------------------------------------------------------------- files


def write_json(path: Path, value) -> None:
    from dorafit.files import write_json_atomic

    write_json_atomic(path, value)  # makes the folder, writes a temporary file, renames it


def result_path(name: str) -> Path:
    return RESULTS / "runs" / f"{name}.json"


# ---------------------------------------------------------------------------- evaluation


def evaluate_all(model, tokenizer) -> dict:
    """Accuracy, unparseable share and rows of every test set."""
    from dorafit.eval.evaluate import evaluate_generation
    from dorafit.eval.tasks import get_task

    model.eval()
    out = {}
    for task in TEST_TASKS:
        started = time.perf_counter()
        result = evaluate_generation(model, tokenizer, get_task(task), test_rows(task), MAX_NEW_TOKENS,
                                     batch_size=25, prompt_template=COMMON["prompt_template"])
        out[task] = {"accuracy": result.accuracy, "unparseable": result.unparseable_share,
                     "rows": len(test_rows(task)), "seconds": time.perf_counter() - started}
    return out


def load_base():
    from dorafit.train.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(MODEL)
    model, _ = load_model(path, "causal-lm", trust_remote_code=False)
    return model, load_tokenizer(path, trust_remote_code=False, padding_side="left"), path


# ---------------------------------------------------------------------------- adapter runs (dorafit train)


def train_config(name: str, spec: dict):
    from dorafit.train.config import TrainConfig

    out = WORK / name
    every = steps_per_run() // spec["checkpoints"] if spec.get("checkpoints") else SAVE_STEPS
    return TrainConfig(model=MODEL, task="ARC-Easy", data=str(train_file()), method=spec["method"], rank=spec["rank"],
                       alpha=spec["alpha"], lr=spec["lr"], seed=spec["seed"], batch_size=BATCH, val_size=0,
                       max_test_rows=1, eval_before=False, progress=False, output=str(out),
                       resume=(out / "config.yaml").is_file(), save_steps=max(every, 1),
                       keep_checkpoints=max(2, spec.get("checkpoints", 2) + 1), stop_after_steps=STOP_AFTER_STEPS,
                       **COMMON)


def run_adapter(name: str, spec: dict) -> dict:
    import dorafit
    from dorafit.train.trainer import train

    cfg = train_config(name, spec)
    finished = Path(cfg.output) / "results.json"
    if not finished.is_file() and train(cfg) is None:  # (else trained earlier: evaluate only)
        raise SystemExit(f"{name}: stopped after {STOP_AFTER_STEPS} steps; run again to continue")
    trained = json.loads(finished.read_text())
    model, tokenizer, _ = load_base()
    dorafit.load_adapter(model, Path(cfg.output) / "adapter")
    return {"steps": trained["steps"], "train_seconds": trained["train_seconds"], "trainable": trained["trainable"],
            "tasks": evaluate_all(model, tokenizer)}


# ---------------------------------------------------------------------------- FT and detach runs (own loop)


def train_own(name: str, spec: dict) -> dict:
    """Full fine-tuning, or DoRA with a chosen detach_norm, on the trainer's examples and loss;
    checkpoints (model + AdamW state) let an interrupted run continue."""
    import torch
    from safetensors.torch import save_file

    import dorafit
    from dorafit import bench
    from dorafit.eval.examples import collate_causal
    from dorafit.eval.scoring import count_units, loss_sum
    from dorafit.files import write_file_atomic
    from dorafit.train import data as D
    from dorafit.train.config import TrainConfig
    from dorafit.train.trainer import lr_at

    out = WORK / name
    schedule = TrainConfig(lr=spec["lr"])  # the warm-up the adapter runs get from dorafit train
    # 1. model, examples (the trainer's own prompt and response) and trainable parameters
    torch.manual_seed(spec["seed"])
    model, _, _ = load_base()
    from dorafit.train.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(MODEL), trust_remote_code=False)
    examples, _ = D.loss_examples(D.read_rows(train_file()), "causal-lm", train_file(), tokenizer,
                                  COMMON["max_length"], prompt_template=COMMON["prompt_template"],
                                  response_format=COMMON["response_format"])
    if spec["method"] == "ft":
        params = [p for p in model.parameters()]
    else:
        cfg = dorafit.AdapterConfig(method=spec["method"], rank=spec["rank"], alpha=spec["alpha"],
                                    dropout=COMMON["dropout"], targets=COMMON["targets"],
                                    detach_norm=spec["detach_norm"])
        dorafit.attach(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = len(examples) // BATCH
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    every = max(total // spec["checkpoints"], 1) if spec.get("checkpoints") else SAVE_STEPS
    # 2. continue from the resume state, if any
    state_file, step, log = out / "resume.pt", 0, []
    if state_file.is_file():
        saved = torch.load(state_file, weights_only=True)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        step, log = int(saved["step"]), json.loads(saved["log"])

    def batch_at(s):
        return collate_causal([examples[i] for i in order[s * BATCH:(s + 1) * BATCH]], pad)

    def loss_of(batch):
        return loss_sum(model, batch, "causal-lm") / max(count_units(batch, "causal-lm"), 1)

    # 3. the loop: the trainer's schedule (linear warm-up, linear decay); the detach runs measure memory on
    # their first step (autograd's saved tensors; the step's peak above the level before it)
    memory = {} if "detach_norm" in spec else None
    model.train()
    started = time.perf_counter()
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule, total)
        batch = batch_at(step)
        if memory == {}:
            memory["saved_for_backward"] = bench.saved_for_backward_bytes(lambda: loss_of(batch), params)

            def one_step():
                loss_of(batch).backward()
                optimizer.zero_grad(set_to_none=True)

            memory["step_peak"] = bench.step_peak_bytes(one_step)
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.append({"step": step, "loss": loss.item()})
        if step % every == 0 or step == total:
            if spec["method"] == "ft" and spec.get("checkpoints"):
                # analyze reads full fine-tunes as <folder>/model.safetensors; q/v weights are enough
                weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
                           if n.endswith(("q_proj.weight", "v_proj.weight"))}
                folder = out / "checkpoints" / f"step-{step:06d}"
                folder.mkdir(parents=True, exist_ok=True)
                save_file(weights, str(folder / "model.safetensors"))
            sd = model.state_dict() if spec["method"] == "ft" else \
                {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            state = {"model": sd, "optimizer": optimizer.state_dict(), "step": step, "log": json.dumps(log)}
            write_file_atomic(state_file, lambda tmp: torch.save(state, tmp))
    seconds = time.perf_counter() - started
    tokenizer.padding_side = "left"
    return {"steps": step, "train_seconds": seconds, "memory": memory, "loss": log,
            "tasks": evaluate_all(model, tokenizer)}


def run_untrained(name: str, spec: dict) -> dict:
    model, tokenizer, _ = load_base()
    return {"steps": 0, "tasks": evaluate_all(model, tokenizer),
            "chance": {task: chance(task) for task in TEST_TASKS}}


def run_one(name: str, spec: dict) -> None:
    if result_path(name).is_file():
        print(f"{name}: done already, skipped", flush=True)
        return
    print(f"{name}: {json.dumps(spec)}", flush=True)
    started = time.perf_counter()
    if spec["method"] == "untrained":
        record = run_untrained(name, spec)
    elif spec["method"] == "ft" or "detach_norm" in spec:
        record = train_own(name, spec)
    else:
        record = run_adapter(name, spec)
    record.update(spec=spec, name=name, seconds=time.perf_counter() - started, model=MODEL,
                  test_rows=TEST_ROWS, train_rows=len(TRAIN_TASKS) * TRAIN_PER_TASK, cpus=os.cpu_count())
    record["average"] = statistics.mean(t["accuracy"] for t in record["tasks"].values())
    record["average_trained"] = statistics.mean(record["tasks"][t]["accuracy"] for t in TRAIN_TASKS)
    write_json(result_path(name), record)
    (WORK / name / "resume.pt").unlink(missing_ok=True)  # 1.6 GB for FT; the result is kept instead
    print(f"{name}: average {100 * record['average']:.1f} % in {record['seconds']:.0f} s", flush=True)


# ---------------------------------------------------------------------------- Figure 2


def checkpoint_folders(name: str, method: str) -> list[Path]:
    root = WORK / name / "checkpoints"
    folders = sorted(p for p in root.glob("step-*") if p.is_dir())
    return folders if method == "ft" else [p / "adapter" for p in folders]


def run_analyze(modules: str, label: str) -> None:
    """dorafit analyze over the three Figure-2 runs' checkpoints, one module regex."""
    from dorafit.cli import main as dorafit_main

    out = RESULTS / "figure2" / label
    if (out / "analysis.json").is_file():
        print(f"analyze {label}: done already, skipped", flush=True)
        return
    args = ["analyze", "--base", MODEL, "--modules", modules, "--out", str(out), "--no-plot"]
    for method in ("ft", "lora", "dora"):
        folders = checkpoint_folders(f"fig2-{method}", method)
        args += ["--checkpoints", *map(str, folders)]
        label = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}[method]
        args += [f"--method={folder}={label}" for folder in folders]
    for method, r in PAPER_R.items():
        args += ["--reference", f"{method}={r}"]
    code = dorafit_main(args)
    if code != 0:
        raise SystemExit(f"dorafit analyze exited with {code}")


def analyze_figure2() -> None:
    from transformers import AutoConfig

    from dorafit.train.models import resolve_model_path

    layers = AutoConfig.from_pretrained(resolve_model_path(MODEL)).num_hidden_layers
    # the stated rule for 30 layers; a smaller (test) model gets up to 6 evenly spaced layers
    six = SIX_LAYERS if layers == 30 else sorted({round(i * (layers - 1) / 5) for i in range(6)})
    picked = "|".join(map(str, six))
    for proj in ("q_proj", "v_proj"):
        run_analyze(rf".*layers\.({picked})\.self_attn\.{proj}", f"{proj}-six-layers")
        run_analyze(rf".*layers\.\d+\.self_attn\.{proj}", f"{proj}-all-layers")


# ---------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard deviation and standard error (n - 1 in the std)."""
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return mean, std, std / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def sampling_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'a > b', 'a < b', or 'no difference' when |a - b| < 2 standard errors of the difference."""
    diff, error = a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)
    if not math.isfinite(error) or abs(diff) < 2 * error:
        return "no difference"
    return "higher" if diff > 0 else "lower"


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def report() -> dict:
    records = {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / "runs").glob("*.json"))}
    lines = ["# Reproduction on SmolLM2-135M-Instruct", "",
             f"Training: {len(TRAIN_TASKS) * TRAIN_PER_TASK} rows (BoolQ, ARC-e, ARC-c, OBQA), batch {BATCH}, "
             f"{steps_per_run()} steps; test: {TEST_ROWS} rows per set, greedy, first answer word. "
             "Weights: the 4-bit GGUF dequantized, not the original checkpoint. A difference under two "
             "standard errors is reported as no difference.", ""]
    # runs, one line each
    lines += ["## Every run (accuracy %)", "",
              "| run | " + " | ".join(TEST_TASKS) + " | avg | avg trained | unparseable | seconds |",
              "|" + "---|" * (len(TEST_TASKS) + 5)]
    for name, r in records.items():
        unparseable = statistics.mean(t["unparseable"] for t in r["tasks"].values())
        lines.append(f"| {name} | " + " | ".join(pct(r["tasks"][t]["accuracy"]) for t in TEST_TASKS)
                     + f" | {pct(r['average'])} | {pct(r['average_trained'])} | {pct(unparseable)}"
                     + f" | {r['seconds']:.0f} |")
    summary: dict = {"runs": records}
    # pilot
    if "untrained" in records:
        base = records["untrained"]
        n = TEST_ROWS * len(TEST_TASKS)
        summary["pilot"] = {"untrained_average": base["average"], "chance": base.get("chance"),
                            "untrained_error": sampling_error(base["average"], n)}
        if "pilot-dora" in records:
            lift = records["pilot-dora"]["average"] - base["average"]
            summary["pilot"].update(lift=lift, lifted_10_points=lift >= 0.10)
            lines += ["", f"Pilot: untrained {pct(base['average'])} %, DoRA {pct(records['pilot-dora']['average'])} % "
                      f"(lift {100 * lift:+.1f} points; target >= +10)."]
    # rank sweep
    sweep = {}
    for method in ("lora", "dora"):
        for rank in RANKS:
            names = [f"{method}-r{rank}-s{s}" for s in SEEDS]
            values = [records[n]["average"] for n in names if n in records]
            if values:
                sweep[f"{method}-r{rank}"] = dict(zip(("mean", "std", "stderr"), mean_std(values)), n=len(values))
    if sweep:
        lines += ["", "## Rank sweep (average accuracy over 7 sets, %, mean ± std over seeds)", "",
                  "| rank | LoRA | DoRA | DoRA vs LoRA |", "|---|---|---|---|"]
        for rank in RANKS:
            lo, do = sweep.get(f"lora-r{rank}"), sweep.get(f"dora-r{rank}")

            def cell(s):
                return f"{pct(s['mean'])} ± {pct(s['std'])} (se {pct(s['stderr'])}, n={s['n']})" if s else "-"

            verdict = compare((do["mean"], do["stderr"]), (lo["mean"], lo["stderr"])) if lo and do else "-"
            lines.append(f"| {rank} | {cell(lo)} | {cell(do)} | {verdict} |")
    summary["sweep"] = sweep
    # VeRA / DVoRA: the lr with the best mean accuracy on the trained tasks
    vera = {}
    for method in ("vera", "dvora"):
        tried = {lr: records[f"{method}-lr{lr:g}"] for lr in VERA_LRS if f"{method}-lr{lr:g}" in records}
        if tried:
            best = max(tried, key=lambda lr: tried[lr]["average_trained"])
            vera[method] = {"lr": best, "average": tried[best]["average"],
                            "tried": {f"{lr:g}": tried[lr]["average_trained"] for lr in tried}}
    if vera:
        lines += ["", "## VeRA and DVoRA (lr chosen by the trained-task average; one seed)", "",
                  "| method | lr | average % | lrs tried (trained-task avg %) |", "|---|---|---|---|"]
        for method, v in vera.items():
            tried = ", ".join(f"{lr}: {pct(a)}" for lr, a in v["tried"].items())
            lines.append(f"| {method} | {v['lr']:g} | {pct(v['average'])} | {tried} |")
    summary["vera"] = vera
    # Figure 2
    figure = {}
    for folder in sorted((RESULTS / "figure2").glob("*/analysis.json")):
        panels = json.loads(folder.read_text())["panels"]
        figure[folder.parent.name] = panels
    if figure:
        lines += ["", "## Figure 2: correlation of ΔD and ΔM", "",
                  "| modules | method | points | pooled r | within-checkpoint r | paper |", "|---|---|---|---|---|---|"]
        for label, panels in figure.items():
            for p in panels:
                r, w = p.get("pearson"), p.get("pearson_within")
                fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:+.2f}"  # noqa: E731
                paper = PAPER_R.get(p["method"], "") if label.startswith("q_proj") else "-"  # the paper: queries
                lines.append(f"| {label} | {p['method']} | {p['points']} | {fmt(r)} | {fmt(w)} | {paper} |")
    summary["figure2"] = figure
    # detach
    if "detach-on" in records and "detach-off" in records:
        on, off = records["detach-on"], records["detach-off"]
        n = TEST_ROWS * len(TEST_TASKS)
        verdict = compare((on["average"], sampling_error(on["average"], n)),
                          (off["average"], sampling_error(off["average"], n)))
        lines += ["", "## Norm detach (paper §4.3)", "",
                  "| detach | saved for backward MiB | step peak MiB | average % |", "|---|---|---|---|"]
        for label, r in (("on", on), ("off", off)):
            m = r["memory"]
            lines.append(f"| {label} | {m['saved_for_backward'] / 2**20:.1f} | {m['step_peak'] / 2**20:.1f} | "
                         f"{pct(r['average'])} |")
        lines.append(f"\nAccuracy with detach vs without: {verdict} (binomial standard errors).")
        summary["detach"] = {"on": on["memory"], "off": off["memory"], "accuracy": verdict}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text("\n".join(lines) + "\n")
    write_json(RESULTS / "report.json", {k: v for k, v in summary.items() if k != "runs"}
               | {"runs": {k: {"average": v["average"], "tasks": v["tasks"]} for k, v in records.items()}})
    print(f"report: {RESULTS / 'report.md'}", flush=True)
    return summary


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES + ("all", "report"))
    parser.add_argument("--dry-run", action="store_true", help="list the runs and an estimated time, run nothing")
    parser.add_argument("--only", action="append", help="run only this run (repeatable)")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else () if args.stage == "report" else (args.stage,)
    runs = {n: s for n, s in plan().items() if s["stage"] in stages and (not args.only or n in args.only)}
    if args.dry_run:
        total = 0.0
        for name, spec in runs.items():
            done = result_path(name).is_file()
            seconds = 0.0 if done else estimate_seconds(spec)
            total += seconds
            print(f"{name:<18} {'done' if done else f'~{seconds / 60:.1f} min':>10}  {json.dumps(spec)}")
        print(f"{len(runs)} runs, ~{total / 3600:.2f} h left")
        return 0
    for name, spec in runs.items():
        run_one(name, spec)
    if "figure2" in stages and not args.only:
        analyze_figure2()
    if args.stage in ("all", "report"):
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
