"""The DoRA paper's experiments on SmolLM2-135M-Instruct, on one 2-core CPU in about 4 hours.

    PYTHONPATH=. python experiments/reproduce_smollm2.py STAGE [--dry-run] [--only NAME]

STAGE is pilot, sweep, vera, figure2, detach, report or all (every run in the plan's order:
the untrained model, the first seed of the rank sweep, Figure 2, the detach pair, VeRA/DVoRA,
the other seeds; then the analysis and the report). Each run trains on one fixed mix of the
four commonsense training sets (BoolQ, ARC-e, ARC-c, OBQA: the first TRAIN_PER_TASK rows of
each after a fixed shuffle, the same rows for every seed), then generates greedily on TEST_ROWS
rows of each of the seven test sets and scores the first answer word (dorafit's evaluator);
PIQA, SIQA and WinoGrande are zero-shot transfer. VeRA and DVoRA runs are also scored on a
validation split (the next VAL_PER_TASK rows of each shuffled training file, never trained on),
which alone chooses their lr.

Adapter runs go through ``dorafit.train.trainer.train`` (with ``save_steps`` and ``resume``);
the DoRA r 16 run of the first seed doubles as Figure 2's DoRA, the pilot and the detach pair's
"on" side (the trainer's default), ``detach-off`` is the same run with ``detach_norm=False``.
Full fine-tuning is not a ``dorafit train`` method, so it uses the short loop ``train_own``
below on the same examples, collate function, loss and lr schedule as the trainer. Every
finished run writes ``<results>/runs/<name>.json`` atomically and is skipped afterwards; an
interrupted run continues from its last checkpoint in ``<work>/<name>/``.

Overrides for tests and small trials (environment): REPRO_MODEL; REPRO_DATA (LLM-Adapters'
dataset/ folder; or LLM_ADAPTERS_DATA, as in experiments/pilot_smollm2.py); REPRO_WORK;
REPRO_RESULTS; REPRO_TRAIN_PER_TASK; REPRO_VAL_PER_TASK; REPRO_TEST_ROWS; REPRO_BATCH; REPRO_MAX_NEW_TOKENS;
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

# -- budget. Measured on this machine (experiments/results/pilot_mix256/): a DoRA step of 4 rows
# of the mix 4.0-4.3 s (LoRA 2.8: with dropout, DoRA computes a second base matmul); 50 generated
# test rows of each of 7 sets 1m53s; so a run of 120 rows per task (117 steps) with its evaluation
# takes 7.5-11 min. 1 untrained + 8 (rank sweep) x 2 seeds
# + 6 VeRA/DVoRA + FT + detach-off = 25 runs, about 4 h (`all --dry-run` adds it up).
MODEL = os.environ.get("REPRO_MODEL", "smollm2-135m-instruct")
# LLM-Adapters' dataset/ folder lies in ../shared beside the repository unless the environment says where.
DATA = Path(os.environ.get("REPRO_DATA") or os.environ.get("LLM_ADAPTERS_DATA")
            or ROOT.parent / "shared" / "data" / "LLM-Adapters" / "dataset")
WORK = Path(os.environ.get("REPRO_WORK", HERE / "runs" / "reproduction_smollm2"))
RESULTS = Path(os.environ.get("REPRO_RESULTS", HERE / "results" / "reproduction_smollm2"))
# 64 rows per task taught only the answer format, 150 taught BoolQ and SIQA (pilot_mix256); 120 is
# what the budget allows for 25 runs
TRAIN_PER_TASK = int(os.environ.get("REPRO_TRAIN_PER_TASK", 120))  # x 4 tasks = 480 rows (~470 fit 160 tokens)
VAL_PER_TASK = int(os.environ.get("REPRO_VAL_PER_TASK", 25))  # held out: VeRA/DVoRA's lr choice
BATCH = int(os.environ.get("REPRO_BATCH", 4))  # ~118 optimizer steps, one epoch
TEST_ROWS = int(os.environ.get("REPRO_TEST_ROWS", 50))  # per test set, the same for every run
MAX_NEW_TOKENS = int(os.environ.get("REPRO_MAX_NEW_TOKENS", 20))
SEEDS = tuple(int(s) for s in os.environ.get("REPRO_SEEDS", "0,1").split(","))
RANKS = (4, 8, 16, 32)
ONE_RANK = 16  # VeRA, DVoRA, Figure 2 and detach runs
LR = 1e-3  # LoRA/DoRA, from the pilot of the default run (experiments/pilot_smollm2.py, K)
FT_LR = 2e-5
VERA_LRS = (3e-3, 1e-2, 3e-2)  # VeRA trains only vectors and wants larger steps than LoRA
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
    """{run name: spec}, in the order they run: what the rest needs first (the untrained model, one
    seed of every rank), then Figure 2, the detach pair and VeRA/DVoRA, then the other seeds, so a
    budget that ends early still leaves every table a first column. A spec's stage selects it."""
    runs: dict[str, dict] = {}

    def add(name, stage, method, rank=ONE_RANK, lr=LR, seed=0, **extra):
        runs[name] = dict(stage=stage, method=method, rank=rank, alpha=2.0 * rank, lr=lr, seed=seed, **extra)

    def sweep(seed):
        for rank in (ONE_RANK,) + tuple(r for r in RANKS if r != ONE_RANK):
            for method in ("dora", "lora"):
                # the first seed's r 16 runs keep checkpoints over the whole run for Figure 2
                extra = {"checkpoints": FIGURE2_CHECKPOINTS} if (seed, rank) == (SEEDS[0], ONE_RANK) else {}
                add(f"{method}-r{rank}-s{seed}", "sweep", method, rank=rank, seed=seed, **extra)

    add("untrained", "pilot", "untrained")
    sweep(SEEDS[0])
    add("fig2-ft", "figure2", "ft", lr=FT_LR, checkpoints=FIGURE2_CHECKPOINTS)
    add("detach-memory", "detach", "memory")
    add("detach-off", "detach", "dora", seed=SEEDS[0], detach_norm=False)
    for method in ("vera", "dvora"):
        for lr in VERA_LRS:
            add(f"{method}-lr{lr:g}", "vera", method, lr=lr, validate=True)
    for seed in SEEDS[1:]:
        sweep(seed)
    return runs


FIGURE2_RUNS = {"ft": "fig2-ft", "lora": f"lora-r{ONE_RANK}-s{SEEDS[0]}", "dora": f"dora-r{ONE_RANK}-s{SEEDS[0]}"}
DETACH_ON = FIGURE2_RUNS["dora"]  # the trainer's default is detach_norm=True


STAGES = ("pilot", "sweep", "vera", "figure2", "detach")


def steps_per_run() -> int:
    return len(TRAIN_TASKS) * TRAIN_PER_TASK // BATCH


def estimate_seconds(spec: dict) -> float:
    """From the timings measured on this machine (the budget above)."""
    if spec["method"] == "memory":
        return 60.0
    evaluation = (len(TEST_TASKS) * TEST_ROWS + (len(TRAIN_TASKS) * VAL_PER_TASK if spec.get("validate") else 0)) * 0.32
    # DoRA's dropout needs a second base matmul (docs/performance.md), hence its longer step
    step = {"untrained": 0.0, "ft": 8.0, "lora": 2.9, "vera": 2.9}.get(spec["method"], 4.3)
    return 30 + evaluation + step * steps_per_run()


# ---------------------------------------------------------------------------- data


def train_file() -> Path:
    """One JSON file of the training mix (seed-independent), written once."""
    path = WORK / f"train_mix-{TRAIN_PER_TASK}.json"  # a changed size never reuses another size's mix
    if path.is_file():
        return path
    rows = [row for task in TRAIN_TASKS for row in shuffled_train_rows(task)[:TRAIN_PER_TASK]]
    random.Random("mix").shuffle(rows)
    write_json(path, rows)
    return path


def shuffled_train_rows(task: str) -> list[dict]:
    rows = json.loads((DATA / task / "train.json").read_text())
    random.Random(f"mix-{task}").shuffle(rows)
    return rows


def val_rows(task: str) -> list[dict]:
    """The VAL_PER_TASK training rows after the ones trained on: the lr choice never sees a test row."""
    return shuffled_train_rows(task)[TRAIN_PER_TASK:TRAIN_PER_TASK + VAL_PER_TASK]


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


def evaluate_all(model, tokenizer, tasks=TEST_TASKS, rows_of=None) -> dict:
    """Accuracy, unparseable share and rows of every test set (or of ``rows_of(task)``)."""
    from dorafit.eval.evaluate import evaluate_generation
    from dorafit.eval.tasks import get_task

    model.eval()
    out = {}
    for task in tasks:
        started = time.perf_counter()
        rows = (rows_of or test_rows)(task)
        result = evaluate_generation(model, tokenizer, get_task(task), rows, MAX_NEW_TOKENS,
                                     batch_size=25, prompt_template=COMMON["prompt_template"])
        out[task] = {"accuracy": result.accuracy, "unparseable": result.unparseable_share,
                     "rows": len(rows), "seconds": time.perf_counter() - started}
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
                       detach_norm=spec.get("detach_norm", True), **COMMON)


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
    record = {"steps": trained["steps"], "train_seconds": trained["train_seconds"], "trainable": trained["trainable"]}
    if spec.get("validate"):
        record["validation"] = evaluate_all(model, tokenizer, TRAIN_TASKS, val_rows)
        record["average_validation"] = statistics.mean(t["accuracy"] for t in record["validation"].values())
    return record | {"tasks": evaluate_all(model, tokenizer)}


# ---------------------------------------------------------------------------- full fine-tuning (own loop)


def own_examples():
    """The trainer's training examples of the mix (its prompt, response, 160-token cut) and the tokenizer."""
    from dorafit.train import data as D
    from dorafit.train.kinds import CAUSAL_LM
    from dorafit.train.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(MODEL), trust_remote_code=False)
    examples, _ = CAUSAL_LM.loss_examples(D.read_rows(train_file()), train_file(), tokenizer,
                                          COMMON["max_length"], prompt_template=COMMON["prompt_template"],
                                          response_format=COMMON["response_format"])
    return examples, tokenizer


def pad_id(tokenizer) -> int:
    """What collate_causal pads with: the tokenizer's pad token, else 0 (as the trainer does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def batch_loss(model, batch):
    from dorafit.train.kinds import CAUSAL_LM

    return CAUSAL_LM.loss_sum(model, batch) / max(CAUSAL_LM.count_units(batch), 1)


def train_own(name: str, spec: dict) -> dict:
    """Full fine-tuning on the trainer's examples, loss and lr schedule; checkpoints (model + AdamW
    state) let an interrupted run continue."""
    import torch
    from safetensors.torch import save_file

    from dorafit.eval.examples import collate_causal
    from dorafit.files import write_file_atomic
    from dorafit.train.config import TrainConfig
    from dorafit.train.trainer import lr_at

    out = WORK / name
    schedule = TrainConfig(lr=spec["lr"])  # the warm-up the adapter runs get from dorafit train
    torch.manual_seed(spec["seed"])
    model, _, _ = load_base()
    examples, tokenizer = own_examples()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    pad = pad_id(tokenizer)
    total = len(examples) // BATCH
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(spec["seed"])).tolist()
    every = max(total // spec["checkpoints"], 1) if spec.get("checkpoints") else SAVE_STEPS
    # continue from the resume state, if any
    state_file, step, log = out / "resume.pt", 0, []
    if state_file.is_file():
        saved = torch.load(state_file, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, log = int(saved["step"]), json.loads(saved["log"])
        print(f"{name}: resumed from step {step}", flush=True)
    model.train()
    started = time.perf_counter()
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule, total)
        batch = collate_causal([examples[i] for i in order[step * BATCH:(step + 1) * BATCH]], pad)
        loss = batch_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        log.append({"step": step, "loss": loss.item()})
        if step % every == 0 or step == total:
            if spec.get("checkpoints"):
                # analyze reads full fine-tunes as <folder>/model.safetensors; q/v weights are enough
                weights = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()
                           if n.endswith(("q_proj.weight", "v_proj.weight"))}
                folder = out / "checkpoints" / f"step-{step:06d}"
                write_file_atomic(folder / "model.safetensors", lambda tmp: save_file(weights, str(tmp)))
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "log": json.dumps(log)}
            write_file_atomic(state_file, lambda tmp: torch.save(state, tmp))
    seconds = time.perf_counter() - started
    tokenizer.padding_side = "left"
    return {"steps": step, "train_seconds": seconds, "loss": log, "tasks": evaluate_all(model, tokenizer)}


# ---------------------------------------------------------------------------- detach: memory


def measure_detach_memory(name: str, spec: dict) -> dict:
    """DoRA r 16 with and without the norm detach on the run's first batches (the same model, data and
    seed): bytes autograd saves for backward, and a whole step's peak above the level before it.
    Three batches each, the median kept; the accuracy of each side comes from its own run."""
    import torch

    import dorafit
    from dorafit import bench
    from dorafit.eval.examples import collate_causal

    examples, tokenizer = own_examples()
    pad = pad_id(tokenizer)
    batches = [collate_causal(examples[i * BATCH:(i + 1) * BATCH], pad) for i in range(3)]
    memory = {}
    for label, detach in (("on", True), ("off", False)):
        torch.manual_seed(spec["seed"])
        model, _, _ = load_base()
        dorafit.attach(model, dorafit.AdapterConfig(method="dora", rank=ONE_RANK, alpha=2.0 * ONE_RANK,
                                                    dropout=COMMON["dropout"], targets=COMMON["targets"],
                                                    detach_norm=detach))
        model.train()
        saved, peak = [], []
        for batch in batches:
            # every parameter, frozen ones too, is excluded: autograd keeps the base weights anyway
            saved.append(bench.saved_for_backward_bytes(lambda: batch_loss(model, batch), list(model.parameters())))

            def one_step():
                batch_loss(model, batch).backward()
                model.zero_grad(set_to_none=True)

            peak.append(bench.step_peak_bytes(one_step))
        memory[label] = {"saved_for_backward": statistics.median(saved), "step_peak": statistics.median(peak),
                         "tokens": [int(b["input_ids"].numel()) for b in batches]}
    return {"steps": 0, "memory": memory}


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
    if spec["method"] == "memory":
        write_json(result_path(name), measure_detach_memory(name, spec) | {"spec": spec, "name": name})
        return
    if spec["method"] == "untrained":
        record = run_untrained(name, spec)
    elif spec["method"] == "ft":
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


# ---------------------------------------------------------------------------- validation loss


def validation_losses(model) -> dict[str, list[float]]:
    """Per row, the mean cross-entropy of the response tokens on the held-out validation rows
    (VAL_PER_TASK of each trained task; no length cut). Accuracy on 50 rows per set has a sampling
    error of 6-7 points; a loss on the same rows for every run allows paired comparisons."""
    import torch

    from dorafit.eval.examples import collate_causal
    from dorafit.train.kinds import CAUSAL_LM
    from dorafit.train.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(MODEL), trust_remote_code=False)
    pad = pad_id(tokenizer)
    model.eval()
    out = {}
    for task in TRAIN_TASKS:
        rows = val_rows(task)
        examples, _ = CAUSAL_LM.loss_examples(rows, f"{task} validation rows", tokenizer, 4096,
                                              prompt_template=COMMON["prompt_template"],
                                              response_format=COMMON["response_format"])
        with torch.no_grad():
            out[task] = [float(batch_loss(model, collate_causal([e], pad))) for e in examples]
    return out


def loss_path(name: str) -> Path:
    return RESULTS / "losses" / f"{name}.json"


def score_losses() -> None:
    """The validation losses of every finished run whose final weights are on disk (adapter runs
    and the untrained model; full fine-tuning keeps only its q/v checkpoints), once each."""
    import dorafit

    for name, spec in plan().items():
        adapter = WORK / name / "adapter"
        if loss_path(name).is_file() or not result_path(name).is_file():
            continue
        if spec["method"] != "untrained" and not adapter.is_dir():
            continue
        model, _, _ = load_base()
        if spec["method"] != "untrained":
            dorafit.load_adapter(model, adapter)
        started = time.perf_counter()
        losses = validation_losses(model)
        write_json(loss_path(name), {"name": name, "losses": losses, "seconds": time.perf_counter() - started})
        print(f"{name}: validation loss {statistics.mean(sum(losses.values(), [])):.4f}", flush=True)


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
    args = ["analyze", "--base", MODEL, "--modules", modules, "--out", str(out),  # plot: <out>/figure2.png
            "--title", f"SmolLM2-135M-Instruct, {label.replace('-', ' ')}"]
    for method in ("ft", "lora", "dora"):
        folders = checkpoint_folders(FIGURE2_RUNS[method], method)
        args += ["--checkpoints", *map(str, folders)]
        panel = {"ft": "FT", "lora": "LoRA", "dora": "DoRA"}[method]
        args += [f"--method={folder}={panel}" for folder in folders]
    for method, r in PAPER_R.items():
        args += ["--reference", f"{method}={r}"]
    code = dorafit_main(args)
    if code != 0:
        raise SystemExit(f"dorafit analyze exited with {code}")


def analyze_figure2() -> None:
    from transformers import AutoConfig

    from dorafit.train.models import resolve_model_path

    specs = plan()
    for name in FIGURE2_RUNS.values():  # (done already unless only the figure2 stage ran)
        run_one(name, specs[name])

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


def best_lr(accuracy: dict[float, float], loss: dict[float, float]) -> float:
    """The lr with the best validation accuracy (rounded: a mean of four shares is not exact), at
    equal accuracy the one with the lower validation loss (inf where none was scored)."""
    return max(accuracy, key=lambda lr: (round(accuracy[lr], 9), -loss[lr]))


def compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'a > b', 'a < b', or 'no difference' when |a - b| < 2 standard errors of the difference."""
    diff, error = a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)
    if not math.isfinite(error) or abs(diff) < 2 * error:
        return "no difference"
    return "higher" if diff > 0 else "lower"


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def report() -> dict:
    everything = {p.stem: json.loads(p.read_text()) for p in sorted((RESULTS / "runs").glob("*.json"))}
    records = {name: r for name, r in everything.items() if "tasks" in r}  # (detach-memory has no accuracy)
    lines = ["# Reproduction on SmolLM2-135M-Instruct", "",
             f"Training: {len(TRAIN_TASKS) * TRAIN_PER_TASK} rows (BoolQ, ARC-e, ARC-c, OBQA), batch {BATCH}, "
             f"{'/'.join(map(str, sorted({r['steps'] for r in records.values() if r['steps']})))} steps "
             f"(one epoch; rows longer than {COMMON['max_length']} tokens are "
             f"left out); test: {TEST_ROWS} rows per set, greedy, first answer word. "
             "Weights: the 4-bit GGUF dequantized, not the original checkpoint. A difference under two "
             "standard errors is reported as no difference.", ""]
    # runs, one line each
    lines += ["## Every run (accuracy %)", "",
              "| run | " + " | ".join(TEST_TASKS) + " | avg | avg trained | unparseable | seconds |",
              "|" + "---|" * (len(TEST_TASKS) + 5)]
    if "chance" in records.get("untrained", {}):
        odds = records["untrained"]["chance"]
        lines.append("| chance (a uniform guess; BoolQ: its majority answer) | "
                     + " | ".join(pct(odds[t]) for t in TEST_TASKS)
                     + f" | {pct(statistics.mean(odds.values()))} | {pct(statistics.mean(odds[t] for t in TRAIN_TASKS))}"
                     + " | | |")
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
        if DETACH_ON in records:
            lift = records[DETACH_ON]["average"] - base["average"]
            summary["pilot"].update(lift=lift, lifted_10_points=lift >= 0.10)
            lines += ["", f"Pilot: untrained {pct(base['average'])} %, {DETACH_ON} {pct(records[DETACH_ON]['average'])} % "
                      f"(lift {100 * lift:+.1f} points; target >= +10)."]
    # rank sweep
    sweep = {}
    for method in ("lora", "dora"):
        for rank in RANKS:
            names = [f"{method}-r{rank}-s{s}" for s in SEEDS]
            values = [records[n]["average"] for n in names if n in records]
            if values:
                mean, std, stderr = mean_std(values)
                # two seeds estimate the spread poorly: never claim less than the test rows' sampling error
                floor = sampling_error(mean, TEST_ROWS * len(TEST_TASKS) * len(values))
                sweep[f"{method}-r{rank}"] = dict(mean=mean, std=std, stderr=max(stderr, floor)
                                                  if math.isfinite(stderr) else floor, n=len(values))
    if sweep:
        lines += ["", "## Rank sweep (average accuracy over 7 sets, %, mean ± std over seeds; se: the larger of "
                  "the seeds' standard error and the test rows' sampling error)", "",
                  "| rank | LoRA | DoRA | DoRA vs LoRA |", "|---|---|---|---|"]
        for rank in RANKS:
            lo, do = sweep.get(f"lora-r{rank}"), sweep.get(f"dora-r{rank}")

            def cell(s):
                return f"{pct(s['mean'])} ± {pct(s['std'])} (se {pct(s['stderr'])}, n={s['n']})" if s else "-"

            verdict = compare((do["mean"], do["stderr"]), (lo["mean"], lo["stderr"])) if lo and do else "-"
            lines.append(f"| {rank} | {cell(lo)} | {cell(do)} | {verdict} |")
    summary["sweep"] = sweep
    # per run, the response losses of the validation rows (the four trained tasks' in turn)
    losses = {p.stem: sum((json.loads(p.read_text())["losses"][t] for t in TRAIN_TASKS), [])
              for p in sorted((RESULTS / "losses").glob("*.json"))}
    # VeRA / DVoRA: the lr chosen on the validation rows, never the test rows
    vera = {}
    for method in ("vera", "dvora"):
        tried = {lr: records[f"{method}-lr{lr:g}"] for lr in VERA_LRS if f"{method}-lr{lr:g}" in records}
        if tried:
            accuracy = {lr: tried[lr]["average_validation"] for lr in tried}
            loss = {lr: statistics.mean(losses.get(f"{method}-lr{lr:g}", [math.inf])) for lr in tried}
            best = best_lr(accuracy, loss)
            vera[method] = {"lr": best, "average": tried[best]["average"],
                            "average_trained": tried[best]["average_trained"],
                            "tried": {f"{lr:g}": accuracy[lr] for lr in tried},
                            "tried_loss": {f"{lr:g}": loss[lr] for lr in tried}}
    if vera:
        lines += ["", f"## VeRA and DVoRA (r {ONE_RANK}; lr chosen on {VAL_PER_TASK} held-out training rows per "
                  "trained task; one seed)", "",
                  "| method | lr | average % | lrs tried: validation avg % (validation loss) |", "|---|---|---|---|"]
        for method, v in vera.items():
            tried = ", ".join(f"{lr}: {pct(a)}" + (f" ({v['tried_loss'][lr]:.4f})" if math.isfinite(v["tried_loss"][lr])
                                                   else "") for lr, a in v["tried"].items())
            lines.append(f"| {method} | {v['lr']:g} | {pct(v['average'])} | {tried} |")
    summary["vera"] = vera
    # validation loss: paired row by row, so differences far below the accuracies' sampling error show
    # {label: (first runs, second runs)}, run i of each side paired (the same seed)
    pairs = {f"r {rank}: DoRA vs LoRA": ([f"dora-r{rank}-s{s}" for s in SEEDS], [f"lora-r{rank}-s{s}" for s in SEEDS])
             for rank in RANKS}
    if "vera" in vera and "dvora" in vera:
        pairs[f"r {ONE_RANK}: DVoRA vs VeRA (their chosen lr)"] = ([f"dvora-lr{vera['dvora']['lr']:g}"],
                                                                   [f"vera-lr{vera['vera']['lr']:g}"])
    pairs[f"r {ONE_RANK}: DoRA detach off vs on"] = (["detach-off"], [DETACH_ON])
    loss_rows = {}
    for label, (left, right) in pairs.items():
        both = [(a, b) for a, b in zip(left, right) if a in losses and b in losses]
        if not both:
            continue
        per_row = [statistics.mean(losses[a][i] - losses[b][i] for a, b in both) for i in range(len(losses[both[0][0]]))]
        diff, _, error = mean_std(per_row)
        loss_rows[label] = {"runs": both, "left": statistics.mean(statistics.mean(losses[a]) for a, _ in both),
                            "right": statistics.mean(statistics.mean(losses[b]) for _, b in both),
                            "difference": diff, "stderr": error,
                            "verdict": compare((diff, error), (0.0, 0.0))}
    if loss_rows:
        n_rows = len(next(iter(losses.values())))
        lines += ["", f"## Validation loss ({n_rows} held-out training rows of the four trained tasks; mean per-token "
                  "response loss; the difference is paired row by row, its se from the rows, averaged over the "
                  "seeds both sides have)", ""]
        if "untrained" in losses:
            lines.append(f"Untrained model: {statistics.mean(losses['untrained']):.4f}.\n")
        lines += ["| comparison | first | second | first − second | se | verdict | seeds |", "|---|---|---|---|---|---|---|"]
        for label, row in loss_rows.items():
            lines.append(f"| {label} | {row['left']:.4f} | {row['right']:.4f} | "
                         f"{row['difference']:+.4f} | {row['stderr']:.4f} | {row['verdict']} | {len(row['runs'])} |")
    summary["validation_loss"] = loss_rows
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
    # detach: memory from detach-memory, accuracy from the two runs
    if DETACH_ON in records and "detach-off" in records and "detach-memory" in everything:
        on, off, memory = records[DETACH_ON], records["detach-off"], everything["detach-memory"]["memory"]
        n = TEST_ROWS * len(TEST_TASKS)
        verdict = compare((on["average"], sampling_error(on["average"], n)),
                          (off["average"], sampling_error(off["average"], n)))
        lines += ["", "## Norm detach (paper §4.3)", "",
                  "| detach | run | saved for backward MiB | step peak MiB | average % |", "|---|---|---|---|---|"]
        for label, name, r in (("on", DETACH_ON, on), ("off", "detach-off", off)):
            m = memory[label]
            lines.append(f"| {label} | {name} | {m['saved_for_backward'] / 2**20:.1f} | {m['step_peak'] / 2**20:.1f} | "
                         f"{pct(r['average'])} |")
        saving = 1 - memory["on"]["saved_for_backward"] / memory["off"]["saved_for_backward"]
        lines.append(f"\nSaved for backward {100 * saving:.1f} % less with the detach (paper: 24 % less training "
                     f"memory). Accuracy with detach vs without: {verdict} (binomial standard errors).")
        summary["detach"] = {"on": memory["on"], "off": memory["off"], "saved_less": saving, "accuracy": verdict}
    from dorafit.files import write_bytes_atomic

    write_bytes_atomic(RESULTS / "report.md", ("\n".join(lines) + "\n").encode())
    write_json(RESULTS / "report.json", {k: v for k, v in summary.items() if k != "runs"}
               | {"runs": {k: {"average": v["average"], "tasks": v["tasks"]} for k, v in records.items()}})
    print(f"report: {RESULTS / 'report.md'}", flush=True)
    return summary


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES + ("all", "losses", "report"))
    parser.add_argument("--dry-run", action="store_true", help="list the runs and an estimated time, run nothing")
    parser.add_argument("--only", action="append", help="run only this run (repeatable)")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else () if args.stage in ("losses", "report") else (args.stage,)
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
    if args.stage in ("all", "losses"):
        score_losses()
    if args.stage in ("all", "report"):
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
