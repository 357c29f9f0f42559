"""LoRA vs DoRA on SmolLM2-135M-Instruct, each at its own learning rate, scored by likelihood.

One comparison sized to decide something on this 2-core machine (about 3 hours), resumable:

    PYTHONPATH=. python experiments/compare_smollm2.py run          # everything not done yet, then the report
    PYTHONPATH=. python experiments/compare_smollm2.py plan         # the stages, what is done, the time left
    PYTHONPATH=. python experiments/compare_smollm2.py report       # the tables again, from the records
    PYTHONPATH=. python experiments/compare_smollm2.py smoke        # a tiny version of every stage, timed

Design (``Setup``):

- **Training rows** in the format they are scored in. The four tasks with training files
  (ARC-Easy, ARC-Challenge, OpenBookQA, BoolQ; LLM-Adapters' full ``train.json``, each shuffled
  with a fixed seed) give ``train_per_task`` rows each, mixed; each row is lm-evaluation-harness's
  context for the task and the right choice's continuation (``dorafit.eval.loglik``), trained
  with ``dorafit train --prompt-template plain --response-format paper``: the loss is the
  likelihood the test then reads. The next ``heldout_per_task`` rows of each file are held out.
- **Methods**: LoRA and DoRA at r 8 and 16 (alpha = 2r, the paper's q, k, v, up, down, no
  dropout), and full fine-tuning (``dorafit train --method full``), all through the one recipe
  (AdamW, linear warm-up and decay, batch 8, one epoch).
- **Learning rate**: each method its own, the one of three with the lowest final loss on the
  held-out rows, seed 0, searched at the largest rank and used at every rank
  (``Setup.lr_per_rank`` searches per rank); where the lowest is at an end of the grid, one more
  grid step past that end is searched first (``search_lrs``); seed 1 then runs at the chosen lr.
- **Order**: the untrained base; LoRA and DoRA at r 16 (lr searches, then seed by seed, both
  methods scored per seed); r 8; full fine-tuning last, so that an interrupted plan has settled the
  most decisive part first and holds pairs.
- **Test**: likelihood scoring (acc and acc_norm, zero-shot) on ``test_rows`` rows of each
  full test file (a fixed shuffle; OpenBookQA's test file has 500): ARC-Easy, ARC-Challenge,
  OpenBookQA, BoolQ (trained tasks) and SIQA, PIQA, WinoGrande (transfer: never trained on).
- **Comparison**: per row, paired. DoRA − LoRA at the same rank: the per-row outcome averaged
  over the seeds, then the mean difference over the rows and its standard error: the rows'
  (sample sd / sqrt(rows)) and, in quadrature, the training runs' (each method's variance of its
  seeds' accuracies / seeds); the same for each method against the untrained base. A difference
  is decided when it exceeds two standard errors. The seeds' own paired differences are shown.

Every finished stage is a record in experiments/results/compare_smollm2/records.json (per-row
outcomes as strings of 0/1), written atomically after each stage; training runs keep
checkpoints under experiments/runs/compare_smollm2/ and an interrupted one continues from its
last (``dorafit train --resume``); an interrupted evaluation is redone. ``report`` writes
experiments/results/compare_smollm2/report.md and the marked section of docs/reproduction.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLM_ADAPTERS_DATA", ROOT.parent / "shared" / "data" / "LLM-Adapters" / "dataset"))
RESULTS = ROOT / "experiments" / "results" / "compare_smollm2"
WORK = ROOT / "experiments" / "runs" / "compare_smollm2"
DOC = ROOT / "docs" / "reproduction.md"
DOC_BEGIN, DOC_END = "<!-- compare_smollm2 report: begin -->", "<!-- compare_smollm2 report: end -->"
MODEL = "smollm2-135m-instruct"
TRAIN_TASKS = ("ARC-Easy", "ARC-Challenge", "openbookqa", "boolq")
TRANSFER_TASKS = ("social_i_qa", "piqa", "winogrande")
SHORT = {"ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA", "boolq": "BoolQ",
         "social_i_qa": "SIQA", "piqa": "PIQA", "winogrande": "WinoG"}


@dataclass(frozen=True)
class Setup:
    """The sizes of the comparison (``smoke`` shrinks them to time every stage in minutes)."""

    train_per_task: int = 300
    heldout_per_task: int = 50
    test_rows: int = 1000
    batch_size: int = 8
    warmup_steps: int = 10
    ranks: tuple = (8, 16)
    seeds: tuple = (0, 1)
    lrs: dict = field(default_factory=lambda: {"lora": (1e-4, 3e-4, 1e-3), "dora": (1e-4, 3e-4, 1e-3),
                                               "full": (1e-5, 3e-5, 1e-4)})
    eval_batch_size: int = 32
    save_steps: int = 40
    lr_per_rank: bool = False  # False: each method's lr is chosen at its largest rank and used at every rank
    edge_steps: int = 1  # lrs added past the grid's end, one at a time, while the best is the last searched

    @property
    def steps(self) -> int:
        return len(TRAIN_TASKS) * self.train_per_task // self.batch_size


SMOKE = Setup(train_per_task=8, heldout_per_task=4, test_rows=12, batch_size=8, warmup_steps=1, ranks=(8,),
              seeds=(0, 1), lrs={"lora": (1e-3,), "dora": (1e-3,), "full": (3e-5,)}, save_steps=2)


# ---------------------------------------------------------------------------- rows


def shuffled(path: Path) -> list[dict]:
    from dorafit.train import data as D

    rows = D.read_rows(path)
    random.Random(0).shuffle(rows)
    return rows


def plain_rows(rows: list[dict], task: str, path) -> list[dict]:
    """Rows as lm-eval's context and the right choice's continuation (dorafit train --prompt-template plain)."""
    from dorafit.eval.loglik import choice_rows
    from dorafit.eval.tasks import get_task

    return [{"instruction": r.contexts[r.gold], "input": "", "output": r.continuations[r.gold]}
            for r in choice_rows(rows, path, get_task(task))]


def write_training_files(setup: Setup, folder: Path) -> tuple[Path, Path]:
    """(the training mix, the held-out rows) as JSONL files, the same for every run."""
    from dorafit.files import write_bytes_atomic

    train, heldout = [], []
    for task in TRAIN_TASKS:
        path = DATA / task / "train.json"
        rows = shuffled(path)
        heldout += plain_rows(rows[: setup.heldout_per_task], task, path)
        train += plain_rows(rows[setup.heldout_per_task: setup.heldout_per_task + setup.train_per_task], task, path)
    random.Random(1).shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    files = (folder / f"train-{setup.train_per_task}.jsonl", folder / f"heldout-{setup.heldout_per_task}.jsonl")
    for file, rows in zip(files, (train, heldout)):
        write_bytes_atomic(file, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return files


def test_tables(setup: Setup) -> dict:
    """{task: ChoiceRow list} of the test rows every model is scored on."""
    from dorafit.eval.loglik import choice_rows
    from dorafit.eval.tasks import get_task

    tables = {}
    for task in TRAIN_TASKS + TRANSFER_TASKS:
        path = DATA / task / "test.json"
        tables[task] = choice_rows(shuffled(path)[: setup.test_rows], path, get_task(task))
    return tables


# ---------------------------------------------------------------------------- records


def load_records(folder: Path) -> dict:
    path = folder / "records.json"
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}}


def save_records(folder: Path, records: dict) -> None:
    from dorafit.files import write_json_atomic

    write_json_atomic(folder / "records.json", records)


def run_name(method: str, rank: int | None, lr: float, seed: int) -> str:
    return f"{method}{'' if rank is None else f'-r{rank}'}-lr{lr:g}-s{seed}"


# ---------------------------------------------------------------------------- stages


def score(model, tokenizer, tables: dict, setup: Setup) -> dict:
    """{task: acc, acc_norm, rows, per-row outcomes, seconds} of likelihood scoring."""
    from dorafit.eval.loglik import evaluate_loglik
    from dorafit.eval.report import row_outcomes
    from dorafit.eval.tasks import get_task

    out = {}
    for task, rows in tables.items():
        started = time.perf_counter()
        result = evaluate_loglik(model, tokenizer, get_task(task), rows, setup.eval_batch_size)
        out[task] = {"acc": result.accuracy, "acc_norm": result.accuracy_norm, "rows": result.rows,
                     "outcomes": "".join(map(str, row_outcomes(result))),
                     "outcomes_norm": "".join(map(str, row_outcomes(result, norm=True))),
                     "seconds": time.perf_counter() - started}
    return out


def train_run(name: str, method: str, rank: int | None, lr: float, seed: int, setup: Setup, files, work: Path) -> dict:
    """One ``dorafit train`` (continued from its last checkpoint when one exists)."""
    from dorafit.train.config import TrainConfig
    from dorafit.train.trainer import train

    out = work / name
    finished = out / "results.json"
    if not finished.is_file():
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
        options = dict(model=MODEL, data=str(files[0]), val_data=str(files[1]), prompt_template="plain",
                       response_format="paper", test=False, eval_before=False, method=method, lr=lr, seed=seed,
                       batch_size=setup.batch_size, epochs=1, warmup_steps=setup.warmup_steps, max_length=256,
                       eval_batch_size=setup.eval_batch_size, progress=False, output=str(out),
                       save_steps=0 if method == "full" else setup.save_steps, keep_checkpoints=2)
        if rank is not None:
            options.update(rank=rank, alpha=2.0 * rank, dropout=0.0)
        started = time.perf_counter()
        if resume:
            print(f"{name}: resuming from {out / 'checkpoints'}", flush=True)
        train(TrainConfig(resume=resume, overwrite=not resume and out.exists(), **options))
        print(f"{name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # resumable no more: it is done
    result = json.loads(finished.read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    return {"method": method, "rank": rank, "lr": lr, "seed": seed, "steps": result["steps"],
            "train_seconds": result["train_seconds"], "val_loss_first": val[0], "val_loss": val[-1],
            "trainable": result["trainable"]}


def evaluate_run(name: str, record: dict, tables: dict, setup: Setup, work: Path, base) -> dict:
    """Likelihood scores of a trained run: the base with its adapter, or the full model."""
    import dorafit
    from dorafit.train.models import load_model

    model, tokenizer = base
    if record["method"] == "full":
        tuned = load_model(str(work / name / "model"), "causal-lm", False)[0].eval()
        scores = score(tuned, tokenizer, tables, setup)
        del tuned
        return scores
    dorafit.load_adapter(model, work / name / "adapter", trainable=False)
    try:
        return score(model, tokenizer, tables, setup)
    finally:
        dorafit.detach(model)


def groups_of(setup: Setup) -> list[tuple[str, int | None]]:
    return [("dora", r) for r in setup.ranks] + [("lora", r) for r in setup.ranks] + [("full", None)]


def search_rank(setup: Setup, rank: int | None) -> int | None:
    """The rank whose runs choose the lr for ``rank``: itself, or the largest one."""
    return rank if rank is None or setup.lr_per_rank else max(setup.ranks)


def stages(setup: Setup, records: dict) -> list[tuple[str, str, dict]]:
    """The plan in order: (key, what, spec); lr choices depend on records, so later stages appear
    once their lr search is done. The most decisive comparison first: LoRA and DoRA at the
    largest rank (their lr searches, then seed by seed), then the smaller ranks, full fine-tuning last."""
    plan = [("base", "score the untrained model", {})]
    adapters = [(method, rank) for rank in sorted(setup.ranks, reverse=True) for method in ("dora", "lora")]
    for groups in (adapters, [("full", None)]):
        searched = []
        for method, rank in groups:
            if (method, search_rank(setup, rank)) in searched:
                continue
            searched.append((method, search_rank(setup, rank)))
            for lr in search_lrs(setup, records, method, rank):
                name = run_name(method, search_rank(setup, rank), lr, 0)
                plan.append((name, f"train {method} r{search_rank(setup, rank)} lr {lr:g} seed 0 (lr search)",
                             dict(method=method, rank=search_rank(setup, rank), lr=lr, seed=0)))
        for method, rank in groups:
            if chosen_lr(records, setup, method, rank) is None:
                plan.append((f"{method}{'' if rank is None else f'-r{rank}'}-choice", "choose the lr, score its run", {}))
        # Seed by seed across the methods of a rank, so that a stopped plan holds paired runs.
        for seed, (method, rank) in [(seed, group) for rank in sorted({r for _, r in groups}, key=lambda r: -(r or 0))
                                     for seed in setup.seeds for group in groups if group[1] == rank]:
            chosen = chosen_lr(records, setup, method, rank)
            if chosen is not None:
                name = run_name(method, rank, chosen, seed)
                if not (seed == setup.seeds[0] and rank == search_rank(setup, rank)):  # else the search ran it
                    plan.append((name, f"train {method} r{rank} lr {chosen:g} seed {seed}",
                                 dict(method=method, rank=rank, lr=chosen, seed=seed)))
                plan.append((f"eval:{name}", f"score {method} r{rank} seed {seed}", {}))
    return plan


def search_lrs(setup: Setup, records: dict, method: str, rank: int | None) -> list[float]:
    """The lrs searched for the method: its grid and, while the lowest held-out loss is at an
    end of what was searched, one more grid step past that end (rounded to one digit: 1e-3 →
    3e-3; at most ``edge_steps``), so that a chosen lr is a minimum between two searched values
    rather than the edge of a guess."""
    lrs = list(setup.lrs[method])
    for _ in range(setup.edge_steps if len(lrs) > 1 else 0):
        runs = [records["runs"].get(run_name(method, search_rank(setup, rank), lr, 0)) for lr in lrs]
        if any(r is None for r in runs):
            break
        best = min(range(len(lrs)), key=lambda i: runs[i]["val_loss"])
        if best == len(lrs) - 1:
            lrs.append(float(f"{lrs[-1] * lrs[-1] / lrs[-2]:.1g}"))
        elif best == 0:
            lrs.insert(0, float(f"{lrs[0] * lrs[0] / lrs[1]:.1g}"))
        else:
            break
    return lrs


def chosen_lr(records: dict, setup: Setup, method: str, rank: int | None) -> float | None:
    """The lr of the lowest final held-out loss among the method's seed-0 lr-search runs (None
    until all of ``search_lrs`` ran)."""
    runs = [records["runs"].get(run_name(method, search_rank(setup, rank), lr, 0))
            for lr in search_lrs(setup, records, method, rank)]
    if any(r is None for r in runs):
        return None
    return min(runs, key=lambda r: r["val_loss"])["lr"]


def done(key: str, records: dict) -> bool:
    if key == "base":
        return "base" in records
    if key.startswith("eval:"):
        return "scores" in records["runs"].get(key[5:], {})
    return key in records["runs"]


def run_all(setup: Setup, results: Path, work: Path, report: bool = True) -> dict:
    """Every stage not done yet, in order; the records are saved after each."""
    from dorafit.train.models import load_model, load_tokenizer, resolve_model_path

    records = load_records(results)
    records["setup"] = {**asdict(setup), "steps": setup.steps}
    files = write_training_files(setup, work / "data")
    tables = test_tables(setup)
    path = resolve_model_path(MODEL)
    base = (load_model(path, "causal-lm", False)[0].eval(), load_tokenizer(path, False))
    while True:
        todo = [s for s in stages(setup, records) if not done(s[0], records) and not s[0].endswith("-choice")]
        if not todo:
            break
        key, what, spec = todo[0]
        print(f"== {key}: {what}", flush=True)
        started = time.perf_counter()
        if key == "base":
            records["base"] = {"scores": score(*base, tables, setup)}
        elif key.startswith("eval:"):
            name = key[5:]
            records["runs"][name]["scores"] = evaluate_run(name, records["runs"][name], tables, setup, work, base)
            records["runs"][name]["eval_seconds"] = time.perf_counter() - started
            _drop_unchosen(records, setup, work)
        else:
            records["runs"][key] = train_run(key, spec["method"], spec["rank"], spec["lr"], spec["seed"], setup,
                                             files, work)
        records.setdefault("stage_seconds", {})[key] = time.perf_counter() - started
        save_records(results, records)
    if report:
        write_report(records, setup, results)
    return records


def _drop_unchosen(records: dict, setup: Setup, work: Path) -> None:
    """Full fine-tunes at the lrs not chosen keep nothing worth 540 MB each."""
    chosen = chosen_lr(records, setup, "full", None)
    for lr in search_lrs(setup, records, "full", None):
        if chosen is not None and lr != chosen:
            shutil.rmtree(work / run_name("full", None, lr, 0) / "model", ignore_errors=True)


# ---------------------------------------------------------------------------- comparison and report


def outcomes(scores: dict, task: str, norm: bool = False) -> list[int]:
    return [int(c) for c in scores[task]["outcomes_norm" if norm else "outcomes"]]


def seed_scores(records: dict, method: str, rank: int | None, setup: Setup) -> list[dict | None]:
    """Per seed, the scores of the method's run at its chosen lr (None where not scored yet); no
    entries while its lr search is not finished."""
    lr = chosen_lr(records, setup, method, rank)
    if lr is None:
        return []
    return [records["runs"].get(run_name(method, rank, lr, s), {}).get("scores") for s in setup.seeds]


def seed_mean(records: dict, method: str, rank: int | None, setup: Setup, task: str, norm: bool = False) -> list[float]:
    """Per row, the outcome averaged over the seeds (at the method's chosen lr)."""
    runs = [r for r in seed_scores(records, method, rank, setup) if r]
    if not runs:
        return []
    per_seed = [outcomes(r, task, norm) for r in runs]
    return [sum(col) / len(col) for col in zip(*per_seed)]


def seeds_scored(records: dict, method: str, rank: int | None, setup: Setup) -> int:
    """How many of the seeds have been scored at the method's chosen lr."""
    return sum(1 for r in seed_scores(records, method, rank, setup) if r)


def seed_variance(records: dict, method: str, rank: int | None, setup: Setup, tasks, norm: bool = False) -> float:
    """The variance that training noise gives the seed mean's accuracy on ``tasks`` (pooled
    rows): the sample variance of the seeds' accuracies divided by their number; 0 with fewer
    than two seeds scored."""
    accuracies = [statistics.fmean(sum((outcomes(r, t, norm) for t in tasks), []))
                  for r in seed_scores(records, method, rank, setup) if r]
    return statistics.variance(accuracies) / len(accuracies) if len(accuracies) > 1 else 0.0


def with_seeds(difference: tuple[float, float], variances: list[float]) -> tuple[float, float]:
    """(mean, se) with the seed means' training-noise variances added to the rows' se."""
    mean, se = difference
    return mean, math.sqrt(se * se + sum(variances))


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """mean(a − b) over rows and its standard error (sample sd / sqrt(n))."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else 0.0
    return mean, sd / math.sqrt(len(d))


def verdict(mean: float, se: float) -> str:
    if se == 0 or abs(mean) <= 2 * se:
        return "not decided" if abs(mean) <= 2 * se else "decided"
    return f"decided ({abs(mean) / se:.1f} se)"


def write_report(records: dict, setup: Setup, results: Path) -> str:
    """report.md, and the same tables in docs/reproduction.md between the markers."""
    from dorafit.files import write_bytes_atomic

    tasks = TRAIN_TASKS + TRANSFER_TASKS
    lines = ["# LoRA vs DoRA on SmolLM2-135M-Instruct, scored by likelihood", "",
             "Generated by `experiments/compare_smollm2.py report` from records.json. SmolLM2-135M-Instruct is the "
             "Q4_1 GGUF release dequantized to float32. Setup: " + ", ".join(
                 f"{k} {v}" for k, v in records.get("setup", {}).items() if k != "lrs") + ".", ""]
    # 1. learning rates
    across = "" if setup.lr_per_rank else f"; the lr chosen at r {max(setup.ranks)} is used at every rank"
    lines += [f"## Learning rate per method (final loss on the held-out training rows, seed 0{across})", "",
              "An lr chosen at an end of the grid adds one more grid step past that end "
              f"(`Setup.edge_steps` = {setup.edge_steps}).", "",
              "| method | lr searched: held-out loss | chosen |", "|---|---|---|"]
    groups = groups_of(setup)
    searched = []
    for method, rank in groups:
        rank = search_rank(setup, rank)
        if (method, rank) in searched:
            continue
        searched.append((method, rank))
        lrs = search_lrs(setup, records, method, rank)
        cells = []
        for lr in lrs:
            rec = records["runs"].get(run_name(method, rank, lr, 0))
            cells.append(f"{lr:g}: {rec['val_loss']:.4f}" if rec else f"{lr:g}: –")
        chosen = chosen_lr(records, setup, method, rank)
        edge = " (an end of the searched grid)" if chosen is not None and chosen in (lrs[0], lrs[-1]) else ""
        lines.append(f"| {label(method, rank)} | " + ", ".join(cells) +
                     f" | {'–' if chosen is None else f'{chosen:g}'}{edge} |")
    # 2. accuracies
    for norm in (False, True):
        metric = "acc_norm" if norm else "acc"
        lines += ["", f"## {metric} (%) per task, mean over seeds at the chosen lr", "",
                  "| model | " + " | ".join(SHORT[t] for t in tasks) + " | trained 4 | transfer 3 | all |",
                  "|---|" + "---|" * (len(tasks) + 3)]
        rows = [("untrained", {t: outcomes(records["base"]["scores"], t, norm) for t in tasks} if "base" in records else {})]
        rows += [(label(m, r) + ("" if seeds_scored(records, m, r, setup) in (0, len(setup.seeds)) else
                                 f" ({seeds_scored(records, m, r, setup)} of {len(setup.seeds)} seeds)"),
                  {t: seed_mean(records, m, r, setup, t, norm) for t in tasks}) for m, r in groups]
        for name, per_task in rows:
            if not per_task or not all(per_task.values()):
                lines.append(f"| {name} | " + " | ".join("–" for _ in tasks) + " | – | – | – |")
                continue
            cell = [f"{100 * sum(per_task[t]) / len(per_task[t]):.1f}" for t in tasks]
            pooled = [sum(sum(per_task[t]) for t in group) / sum(len(per_task[t]) for t in group)
                      for group in (TRAIN_TASKS, TRANSFER_TASKS, tasks)]
            lines.append(f"| {name} | " + " | ".join(cell) + " | " + " | ".join(f"{100 * p:.1f}" for p in pooled) + " |")
    # 3. paired differences
    lines += ["", "## Paired per-row differences (points, ± one standard error; seeds averaged per row)", "",
              "The standard error counts both sources of chance: the test rows (the paired per-row differences' "
              "sd / √rows) and the training runs (for a method with two or more seeds scored, the variance of its "
              "seeds' accuracies / seeds, added in quadrature). The verdict column gives the rows' share alone "
              "beside it.", "",
              "| comparison | metric | " + " | ".join(SHORT[t] for t in tasks) + " | all rows | verdict (all rows) |",
              "|---|---|" + "---|" * (len(tasks) + 2)]
    pairs = [(f"DoRA − LoRA, r {r}", ("dora", r), ("lora", r)) for r in setup.ranks]
    pairs += [(f"{label(m, r)} − untrained", (m, r), None) for m, r in groups]
    for title, first, second in pairs:
        for norm in (False, True):
            a = {t: seed_mean(records, *first, setup, t, norm) for t in tasks}
            b = ({t: outcomes(records["base"]["scores"], t, norm) for t in tasks} if second is None and "base" in records
                 else {t: seed_mean(records, *second, setup, t, norm) for t in tasks} if second else {})
            if not all(a.values()) or not b or not all(b.values()):
                continue
            sides = [side for side in (first, second) if side]
            spread = lambda group: [seed_variance(records, *side, setup, group, norm) for side in sides]  # noqa: E731
            cells = [with_seeds(paired(a[t], b[t]), spread((t,))) for t in tasks]
            rows_only = paired(sum((a[t] for t in tasks), []), sum((b[t] for t in tasks), []))
            everything = with_seeds(rows_only, spread(tasks))
            # A verdict only once every seed of both sides is scored: a partial plan decides nothing.
            scored = [seeds_scored(records, *side, setup) for side in sides]
            judged = f"{verdict(*everything)}; rows alone ± {100 * rows_only[1]:.2f}" \
                if min(scored) == len(setup.seeds) else f"no verdict yet ({min(scored)} of {len(setup.seeds)} seeds scored)"
            lines.append(f"| {title} | {'acc_norm' if norm else 'acc'} | " + " | ".join(
                f"{100 * m:+.1f} ± {100 * s:.1f}" for m, s in cells) + f" | {100 * everything[0]:+.2f} ± "
                f"{100 * everything[1]:.2f} | {judged} |")
    # 4. training noise: the same method and lr, one seed against the other
    noise = []
    for method, rank in groups:
        runs = seed_scores(records, method, rank, setup)[:2]
        if len(runs) < 2 or not all(runs):
            continue
        for norm in (False, True):
            a, b = ({t: outcomes(r, t, norm) for t in tasks} for r in runs)
            everything = paired(sum(a.values(), []), sum(b.values(), []))
            noise.append(f"| {label(method, rank)}, seed {setup.seeds[0]} − seed {setup.seeds[1]} | "
                         f"{'acc_norm' if norm else 'acc'} | " + " | ".join(
                             "{:+.1f} ± {:.1f}".format(*(100 * v for v in paired(a[t], b[t]))) for t in tasks)
                         + f" | {100 * everything[0]:+.2f} ± {100 * everything[1]:.2f} |")
    if noise:
        lines += ["", "## Seed to seed: what training noise alone moves (points, paired per row)", "",
                  "Two seeds of one method at one lr differ by this much (± the test rows' standard error); "
                  "this spread is the training-noise part of the standard errors above.", "",
                  "| runs | metric | " + " | ".join(SHORT[t] for t in tasks) + " | all rows |",
                  "|---|---|" + "---|" * (len(tasks) + 1)] + noise
    # 5. progress and time
    plan = [key for key, _, _ in stages(setup, records)]
    finished = sum(1 for key in plan if done(key, records))
    if finished < len(plan):
        lines += ["", f"**The plan is not finished**: {finished} of the {len(plan)} stages known so far are done "
                  f"(more appear as lr choices are made); `plan` lists what is left. Rows marked – and "
                  "comparisons without a verdict are not results yet."]
    seconds = records.get("stage_seconds", {})
    lines += ["", f"Stage times: {len(seconds)} stages, {sum(seconds.values()) / 3600:.2f} h in all; training runs "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items() if not k.startswith(("eval:", "base")))
              + "; scoring " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()
                                         if k.startswith(("eval:", "base"))) + ".", ""]
    text = "\n".join(lines)
    write_bytes_atomic(results / "report.md", text.encode())
    if results == RESULTS and DOC.is_file():
        doc = DOC.read_text()
        if DOC_BEGIN in doc and DOC_END in doc:
            head, rest = doc.split(DOC_BEGIN, 1)
            tail = rest.split(DOC_END, 1)[1]
            body = "\n".join(lines[3:])  # without the title and the provenance line
            write_bytes_atomic(DOC, f"{head}{DOC_BEGIN}\n{body}\n{DOC_END}{tail}".encode())
    return text


def label(method: str, rank: int | None) -> str:
    return {"lora": "LoRA", "dora": "DoRA", "full": "full FT"}[method] + ("" if rank is None else f" r {rank}")


# ---------------------------------------------------------------------------- estimates


def plan_text(setup: Setup, records: dict, rates: dict | None = None) -> str:
    """The stages with done / to do and, from measured rates, the time left."""
    lines, left = [], 0.0
    for key, what, spec in stages(setup, records):
        state = "done" if done(key, records) else "to do"
        estimate = ""
        if rates and state == "to do":
            seconds = rates.get("eval" if key.startswith(("eval:", "base")) or key.endswith("-choice") else
                                ("train_full" if spec.get("method") == "full" else "train"), 0.0)
            left += seconds
            estimate = f" (~{seconds / 60:.0f} min)"
        lines.append(f"  {state:6} {key}: {what}{estimate}")
    # Stages that appear only once an lr is chosen: a seed-1 run and two scorings per method.
    open_groups = [(m, r) for m, r in groups_of(setup) if chosen_lr(records, setup, m, r) is None]
    if rates and open_groups:
        more = 0.0
        for method, rank in open_groups:
            runs = len(setup.seeds) - (1 if rank == search_rank(setup, rank) else 0)
            more += rates["eval"] * len(setup.seeds) + rates["train_full" if method == "full" else "train"] * runs
        left += more
        lines.append(f"  + {len(open_groups)} lr choices still open: ~{more / 60:.0f} min more for their seeds and scoring")
    if rates:
        lines.append(f"estimated time left: {left / 3600:.1f} h")
    return "\n".join(lines)


def rates_from(records: dict, smoke: dict | None, setup: Setup) -> dict | None:
    """Seconds per stage: the median of the stages of each kind the records hold (adapter runs,
    full fine-tunes, scorings of a trained run), else a smoke run's rates scaled to the setup."""
    runs, seconds = records.get("runs", {}), records.get("stage_seconds", {})
    kinds = {"eval": [v for k, v in seconds.items() if k.startswith("eval:")],
             "train": [v for k, v in seconds.items() if runs.get(k, {}).get("method") in ("lora", "dora")],
             "train_full": [v for k, v in seconds.items() if runs.get(k, {}).get("method") == "full"]}
    rates = {}
    if smoke:
        s = smoke["per_unit"]
        rows = sum(min(setup.test_rows, 500 if t == "openbookqa" else 10**9) for t in TRAIN_TASKS + TRANSFER_TASKS)
        rates = {"eval": s["eval_per_row"] * rows, "train": s["train_per_step"] * setup.steps + s["run_overhead"],
                 "train_full": s["train_full_per_step"] * setup.steps + s["run_overhead_full"]}
    rates.update({kind: statistics.median(values) for kind, values in kinds.items() if values})
    return rates if len(rates) == 3 else None


def smoke(results: Path, work: Path) -> dict:
    """Every stage on a tiny version (in a separate folder), timed; the rates per step and per
    scored row it gives estimate the full comparison."""
    shutil.rmtree(work / "smoke", ignore_errors=True)
    shutil.rmtree(results / "smoke", ignore_errors=True)
    (results / "smoke").mkdir(parents=True)
    started = time.perf_counter()
    records = run_all(SMOKE, results / "smoke", work / "smoke", report=True)
    total = time.perf_counter() - started
    runs = records["runs"]
    adapters = [r for r in runs.values() if r["method"] != "full"]
    fulls = [r for r in runs.values() if r["method"] == "full"]
    scored_rows = sum(v["rows"] for v in records["base"]["scores"].values())
    evals = [r["eval_seconds"] for r in runs.values() if "eval_seconds" in r]
    stage = records["stage_seconds"]
    per_unit = {
        "train_per_step": sum(r["train_seconds"] for r in adapters) / sum(r["steps"] for r in adapters),
        "train_full_per_step": sum(r["train_seconds"] for r in fulls) / sum(r["steps"] for r in fulls),
        "run_overhead": sum(stage[k] - runs[k]["train_seconds"] for k in runs if runs[k]["method"] != "full"
                            and k in stage) / len(adapters),
        "run_overhead_full": sum(stage[k] - runs[k]["train_seconds"] for k in runs if runs[k]["method"] == "full"
                                 and k in stage) / len(fulls),
        "eval_per_row": (sum(evals) / len(evals)) / scored_rows,
    }
    out = {"seconds": total, "per_unit": per_unit, "load_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
           "scored_rows": scored_rows}
    from dorafit.files import write_json_atomic

    write_json_atomic(results / "smoke.json", out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "plan", "report", "smoke"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    setup = Setup()
    args.results.mkdir(parents=True, exist_ok=True)
    if args.command == "smoke":
        measured = smoke(args.results, args.work)
        print(json.dumps(measured, indent=1))
        print(plan_text(setup, load_records(args.results), rates_from({}, measured, setup)))
        return 0
    records = load_records(args.results)
    if args.command == "plan":
        measured = json.loads((args.results / "smoke.json").read_text()) if (args.results / "smoke.json").is_file() else None
        print(plan_text(setup, records, rates_from(records, measured, setup)))
        return 0
    if args.command == "report":
        print(write_report(records, setup, args.results))
        return 0
    run_all(setup, args.results, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
