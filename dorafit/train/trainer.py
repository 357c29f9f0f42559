"""The training recipe: setup -> evaluate -> train -> save -> evaluate, as one readable script.

``train(cfg)`` runs a whole ``dorafit train``: it loads the model and the data, attaches the
adapter, measures test accuracy before training, trains with AdamW (linear warm-up, linear
decay), checkpoints, keeps the adapter with the best validation loss, saves the final adapter
and measures test accuracy again.

Exactness of --resume: an optimizer step ``s`` of epoch ``e`` always uses the rows
``perm_e[s*G:(s+1)*G]`` with ``perm_e = randperm(N, seed + e)`` and G the global batch, and
the summed loss of those rows is divided by their number of loss units (response tokens or
rows) counted over the whole step. The gradient is therefore the same however the step is
split into micro-batches and processes, and a checkpoint needs only the step counter, the
trainable weights, the optimizer state and the RNG states to continue bit for bit.
The last incomplete global batch of each epoch is dropped so every step has the same size on
any number of processes.

Run folder (written by rank 0 only):
    config.yaml              the resolved TrainConfig
    checkpoints/step-N/      resumable checkpoints with an adapter/ folder (see dorafit.train.checkpoint)
    best/                    adapter with the lowest validation loss
    adapter/                 final adapter (dorafit format) + task.json
    log.jsonl                step, loss, learning rate, validation loss
    results.json             accuracies, trainable share, times; marks the run as finished
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import dorafit
from dorafit.eval.evaluate import EvalResult, evaluate_choices, evaluate_generation
from dorafit.eval.scoring import count_units, loss_sum
from dorafit.eval.tasks import get_task
from dorafit.files import write_bytes_atomic, write_json_atomic
from dorafit.train import checkpoint as ckpt
from dorafit.train import data as D
from dorafit.train import distributed as dist_utils
from dorafit.train.config import TrainConfig, TrainConfigError, format_config
from dorafit.train.models import (
    default_targets,
    detect_kind,
    load_model,
    load_tokenizer,
    read_model_config,
    resolve_model_path,
    trained_heads,
)
from dorafit.train.rundir import prepare_output

BUNDLED_DATA = Path(__file__).resolve().parent.parent / "data"
TASK_FILE = "task.json"


class TrainingError(RuntimeError):
    """The run stopped: a non-finite loss, or a state it cannot continue from."""


@dataclass
class TrainResult:
    """What a run produced, as printed at the end and saved in results.json."""

    output: str
    task: str
    model_kind: str
    test_rows: int
    accuracy_before: float | None
    accuracy_after: float | None
    unparseable_before: float | None
    unparseable_after: float | None
    trainable: int
    total: int
    trainable_percent: float
    steps: int
    best_val_loss: float | None
    train_seconds: float
    total_seconds: float
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers


def _print(info, *args) -> None:
    if info.is_main:
        print(*args, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _data_path(cfg: TrainConfig, split: str, task_folder: str) -> Path:
    explicit = {"train": cfg.data, "test": cfg.test_data}[split]
    if explicit:
        return Path(explicit)
    base = Path(cfg.data_dir) if cfg.data_dir else BUNDLED_DATA
    path = base / task_folder / f"{split}.json"
    if not path.is_file():
        where = f"--data-dir {base}" if cfg.data_dir else "the data shipped with dorafit"
        flag = "--data" if split == "train" else "--test-data"
        raise D.DataError(f"{path}: no {split} file for task {task_folder} in {where}; pass {flag} FILE")
    return path


def default_output(cfg: TrainConfig) -> Path:
    model = Path(cfg.model.rstrip("/")).name or "model"
    return Path("runs") / f"{model}-{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}"


def _lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then linear decay towards 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(total_steps - cfg.warmup_steps, 1)
    return cfg.lr * max(total_steps - step, 0) / remaining


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_precision(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError("precision bf16 is not supported by this GPU; use fp16 or fp32")


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters; collective under FSDP."""
    return {n: dist_utils.full_tensor(p.detach()).cpu().clone() for n, p in trainable_named(model)}


def load_trainable(model, state: dict[str, torch.Tensor], source) -> None:
    """Copy saved trainable parameters into the model (each rank copies its own shard)."""
    params = dict(trainable_named(model))
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ckpt.CheckpointError(f"{source}: trainable parameters differ (missing {missing[:5]}, extra {extra[:5]})")
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if hasattr(p, "device_mesh"):  # an FSDP2 DTensor: keep this rank's shard only
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
            p.copy_(value)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (written by the run after its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())


def load_fsdp_optimizer(model, optimizer, names: list[str], loaded: dict) -> None:
    """Give every rank its shard of a full (name-keyed) optimizer state read from a checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state: dict = {}
    for key, value in loaded["optimizer"].items():
        name, _, field_name = key.rpartition("::")
        state.setdefault(name, {})[field_name] = value
    groups = [{**g, "params": list(names)} for g in loaded["state"]["optimizer_param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


def save_adapter_dir(model, path: Path, task_info: dict) -> None:
    """The adapter in dorafit's format plus task.json (how to score it)."""
    dorafit.save_adapter(model, path)
    write_json_atomic(path / TASK_FILE, task_info)


def _batches(kind, tokenizer, cfg, pad_id):
    """A collate function for the data kind."""
    if kind == "causal-lm":
        return lambda chunk: D.collate_causal(chunk, pad_id)
    if kind == "sequence-classification":
        return lambda chunk: D.collate_texts(chunk, tokenizer, cfg.max_length)
    scoring = "similarity" if kind == "similarity" else "pair"
    return lambda chunk: D.collate_choices(chunk, tokenizer, cfg.max_length, scoring)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model, examples, collate, kind, cfg, device) -> float:
    """Mean loss per unit over the validation rows (all ranks compute the same value)."""
    was_training = model.training
    model.eval()
    total, units = 0.0, 0
    for start in range(0, len(examples), cfg.eval_batch_size):
        batch = _to(collate(examples[start:start + cfg.eval_batch_size]), device)
        with _autocast(cfg, device):
            total += float(loss_sum(model, batch, kind))
        units += count_units(batch, kind)
    model.train(was_training)
    return total / max(units, 1)


# ---------------------------------------------------------------------------- recipe


def train(cfg: TrainConfig) -> TrainResult | None:
    """Run a whole fine-tuning job as ``cfg`` describes; returns the results (rank 0's view),
    or None when it stopped early on purpose (``stop_after_steps``)."""
    started = time.perf_counter()
    # 1. Processes, threads, output folder, resolved config.
    info = dist_utils.setup()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_precision(cfg, info.device)
    task = get_task(cfg.task)
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    if info.is_main:
        error = None
        try:
            prepare_output(out, cfg)
        except TrainConfigError as err:
            error = str(err)
    else:
        error = None
    error = dist_utils.broadcast_object(error, info)
    if error:
        raise TrainConfigError(error)
    cfg_dict = {**cfg.to_dict(), "output": str(out)}
    _print(info, "dorafit train: resolved configuration\n" + format_config(TrainConfig(**cfg_dict)))
    if info.is_main and not cfg.resume:
        import yaml

        write_bytes_atomic(out / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False).encode())
    seed_everything(cfg.seed)

    # 2. Data: read and check every file before the model is loaded.
    model_path = resolve_model_path(cfg.model)
    model_config = read_model_config(model_path, cfg.trust_remote_code)
    train_path = _data_path(cfg, "train", task.folder)
    train_rows = D.read_rows(train_path)
    if cfg.max_train_rows:
        train_rows = train_rows[: cfg.max_train_rows]
    data_format = D.detect_format(train_rows, train_path)
    kind = detect_kind(model_path, model_config, data_format) if cfg.model_kind == "auto" else cfg.model_kind
    test_path = _data_path(cfg, "test", task.folder) if (cfg.test_data or data_format == "commonsense") else None
    test_rows = D.read_rows(test_path) if test_path else []
    if cfg.max_test_rows:
        test_rows = test_rows[: cfg.max_test_rows]
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    labels = None
    if kind == "causal-lm":
        train_items = D.to_instruction_pairs(train_rows, data_format, train_path)
        make = lambda pairs, path: D.tokenize_instruction_pairs(pairs, tokenizer, cfg.max_length, path)  # noqa: E731
        train_examples = make(train_items, train_path)
        val_examples = make(D.to_instruction_pairs(D.read_rows(cfg.val_data), data_format, cfg.val_data),
                            cfg.val_data) if cfg.val_data else None
        for r_number, row in enumerate(test_rows, start=1):
            D._text(row, "instruction", test_path, r_number)
            D._text(row, "answer", test_path, r_number)
    elif kind == "sequence-classification":
        train_examples, labels = D.to_text_examples(train_rows, train_path)
        val_examples = D.to_text_examples(D.read_rows(cfg.val_data), cfg.val_data, labels)[0] if cfg.val_data else None
        test_examples = D.to_text_examples(test_rows, test_path, labels)[0] if test_rows else []
    else:
        train_examples = D.to_choice_examples(train_rows, data_format, train_path, task if data_format == "commonsense" else None)
        val_examples = D.to_choice_examples(D.read_rows(cfg.val_data), data_format, cfg.val_data) if cfg.val_data else None
        test_examples = D.to_choice_examples(test_rows, "commonsense" if test_rows and "instruction" in test_rows[0] else "multiple_choice",
                                             test_path, task) if test_rows else []
    if kind != "causal-lm":
        D.check_encoder_lengths(train_examples, tokenizer, cfg.max_length, train_path)
    if val_examples is None:
        train_examples, val_examples = D.split_validation(train_examples, cfg.val_size, cfg.seed)
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    steps_per_epoch = len(train_examples) // global_batch
    if steps_per_epoch == 0:
        raise D.DataError(f"{train_path}: {len(train_examples)} training rows are fewer than one global batch "
                          f"({global_batch} = batch size x grad accum x processes)")
    total_steps = steps_per_epoch * cfg.epochs
    _print(info, f"data: {len(train_examples)} train, {len(val_examples)} validation, {len(test_rows)} test rows; "
                 f"kind {kind}; {total_steps} steps of {global_batch} rows")

    # 3. Model and adapter. Attaching leaves the outputs unchanged (B = 0, m = ||W0||), so the
    #    "before" evaluation below is the base model's.
    model, fresh_modules = load_model(model_path, kind, cfg.trust_remote_code,
                                      num_labels=len(labels) if labels else None)
    targets = cfg.targets or default_targets(model)
    adapter_cfg = dorafit.AdapterConfig(method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                                        targets=targets,
                                        modules_to_save=trained_heads(model, kind, fresh_modules))
    if cfg.quantize:
        # QDoRA: exactly the adapted linear layers become 4-bit NF4 (bitsandbytes), on the
        # device they train on; the norm then runs through the 4-bit layers (dorafit.quant).
        from dorafit import quant

        model.to(info.device)
        compute = torch.bfloat16 if info.device.type == "cuda" else torch.float32
        names = quant.quantize_model(model, targets, cfg.quantize, compute_dtype=compute)
        _print(info, f"quantized {len(names)} linear layers to 4-bit {cfg.quantize} (compute dtype {compute})")
    torch.manual_seed(cfg.seed)  # the adapter's initialisation depends on the seed alone
    dorafit.attach(model, adapter_cfg)
    model.to(info.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    report = dorafit.trainable_report(model)
    _print(info, str(report))
    task_info = {"task": task.name, "model_kind": kind, "labels": labels, "max_length": cfg.max_length}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collate = _batches(kind, tokenizer, cfg, pad_id)

    def run_test(desc: str) -> EvalResult | None:
        if not test_rows:
            return None
        if kind == "causal-lm":
            return evaluate_generation(model, tokenizer, task, test_rows, cfg.max_new_tokens,
                                       cfg.eval_batch_size, info.device, progress=cfg.progress and info.is_main)
        return evaluate_choices(model, test_examples, tokenizer, kind, task.name, cfg.max_length,
                                cfg.eval_batch_size, info.device, progress=cfg.progress and info.is_main)

    # 4. Resume state, or a fresh start.
    ckpt_root = out / "checkpoints"
    optimizer_names = [n for n, _ in trainable_named(model)]
    step, best_val, history, before = 0, math.inf, [], None
    resumed = ckpt.load_latest(ckpt_root) if cfg.resume else None
    if cfg.resume and resumed is None:
        warnings.warn(f"--resume: no usable checkpoint in {ckpt_root}; starting from step 0", stacklevel=2)
    if resumed is None and cfg.eval_before:
        before = run_test("before")
        if before is not None:
            _print(info, f"accuracy before training: {before.accuracy:.4f} on {before.rows} {task.name} rows")
        if val_examples:
            # The untrained model's validation loss: step 0 of the log, the bar to beat.
            record = {"step": 0, "val_loss": validation_loss(model, val_examples, collate, kind, cfg, info.device)}
            history.append(record)
            if info.is_main:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")

    wrapped = dist_utils.wrap(model, cfg.distributed, info)
    params = [p for _, p in trainable_named(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    if resumed is not None:
        folder, loaded = resumed
        load_trainable(model, loaded["trainable"], folder)
        if cfg.distributed == "fsdp" and info.enabled:
            load_fsdp_optimizer(wrapped, optimizer, optimizer_names, loaded)
        else:
            ckpt.optimizer_from_flat(optimizer, optimizer_names, loaded["optimizer"],
                                     loaded["state"]["optimizer_param_groups"])
        ckpt.restore_rng(loaded["rng"], loaded["state"]["rng"])
        step = loaded["state"]["step"]
        best_val = loaded["state"]["best_val_loss"]
        best_val = math.inf if best_val is None else best_val
        before = EvalResult(**loaded["state"]["before"]) if loaded["state"].get("before") else None
        history = loaded["state"].get("history", [])
        if info.is_main:
            _truncate_log(out / "log.jsonl", step)
        _print(info, f"resumed from {folder} at step {step}")

    def save_checkpoint() -> None:
        if cfg.distributed == "fsdp" and info.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = get_optimizer_state_dict(wrapped, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            optim_tensors = {f"{n}::{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
                             for n, per in full.get("state", {}).items() for k, v in per.items()}
            # Only rank 0 receives the gathered state (cpu_offload); the others get {}.
            optim_groups = [{k: v for k, v in g.items() if k != "params"} for g in full.get("param_groups", [])]
        else:
            optim_tensors, optim_groups = ckpt.optimizer_to_flat(optimizer, optimizer_names)
        trainable = gather_trainable(model)
        if info.is_main:
            counters = {"step": step, "best_val_loss": None if math.isinf(best_val) else best_val,
                        "before": before.__dict__ if before else None, "history": history}
            sharded = cfg.distributed == "fsdp" and info.enabled
            extra = None if sharded else (lambda tmp: save_adapter_dir(model, tmp / "adapter", task_info))
            ckpt.save_checkpoint(ckpt_root / f"step-{step:06d}", trainable, optim_tensors, optim_groups, counters,
                                 write_extra=extra)
            ckpt.prune_checkpoints(ckpt_root, cfg.keep_checkpoints)
        dist_utils.barrier(info)

    def save_adapter_as(name: str) -> None:
        """Write the current adapter to out/<name> (gathered to full tensors under FSDP2)."""
        if cfg.distributed == "fsdp" and info.enabled:
            state = gather_trainable(model)
            if info.is_main:
                export_adapter(state, model_path, kind, labels, adapter_cfg, cfg, out / name, task_info)
        elif info.is_main:
            save_adapter_dir(model, out / name, task_info)
        dist_utils.barrier(info)

    # 5. The loop. One iteration = one optimizer step over one global batch.
    train_started = time.perf_counter()
    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    wrapped.train()
    log_path = out / "log.jsonl"
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        step_rows = order[in_epoch * global_batch:(in_epoch + 1) * global_batch].tolist()
        micro_size = cfg.batch_size * info.world_size
        micro_batches = [collate([train_examples[i] for i in step_rows[j:j + micro_size]])
                         for j in range(0, global_batch, micro_size)]
        units = sum(count_units(b, kind) for b in micro_batches)  # the whole step, all processes
        lr = _lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for j, micro in enumerate(micro_batches):
            mine = {k: v[info.rank * cfg.batch_size:(info.rank + 1) * cfg.batch_size] for k, v in micro.items()}
            if kind == "similarity":  # choices are stored flat (B*C, T): slice them by row
                n_choices = micro["choice_mask"].shape[1]
                lo, hi = info.rank * cfg.batch_size * n_choices, (info.rank + 1) * cfg.batch_size * n_choices
                mine.update({k: v[lo:hi] for k, v in micro.items() if k.startswith("choice_") and k != "choice_mask"})
            mine = _to(mine, info.device)
            sync = j == len(micro_batches) - 1 or not hasattr(wrapped, "no_sync")
            with (nullcontext() if sync else wrapped.no_sync()), _autocast(cfg, info.device):
                # DDP and FSDP average gradients over processes; scale by world size so the
                # result is the sum over the step divided by its units.
                loss = loss_sum(wrapped, mine, kind) * (info.world_size / units)
            step_loss += float(loss.detach()) / info.world_size
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss = dist_utils.all_reduce_sum(step_loss, info)
        if not math.isfinite(step_loss):
            last = ckpt.list_checkpoints(ckpt_root)
            where = f"the last good checkpoint is {last[0]}" if last else "no checkpoint was written yet"
            raise TrainingError(f"loss is {step_loss} at step {step + 1}; stopping without updating the "
                                f"weights ({where}). Lower --lr or use --precision fp32.")
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "epoch": epoch, "loss": step_loss, "lr": lr}

        # 6. Validation, best adapter, checkpoint.
        at_epoch_end = step % steps_per_epoch == 0
        at_save = (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps
        at_eval = (cfg.eval_steps and step % cfg.eval_steps == 0) or (not cfg.eval_steps and (at_save or at_epoch_end))
        if val_examples and at_eval:
            val = validation_loss(wrapped, val_examples, collate, kind, cfg, info.device)
            record["val_loss"] = val
            if val < best_val:
                best_val = val
                save_adapter_as("best")
        history.append(record)
        if info.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", **({"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}))
        if at_save:
            save_checkpoint()
        if cfg.stop_after_steps and step >= cfg.stop_after_steps and step < total_steps:
            if bar is not None:
                bar.close()
            _print(info, f"stopped after step {step} as asked (--stop-after-steps); continue with --resume")
            dist_utils.teardown(info)
            return None
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - train_started

    # 7. Final adapter and the test accuracy after training.
    save_adapter_as("adapter")
    after = run_test("after")
    result = TrainResult(
        output=str(out), task=task.name, model_kind=kind, test_rows=len(test_rows),
        accuracy_before=before.accuracy if before else None, accuracy_after=after.accuracy if after else None,
        unparseable_before=before.unparseable_share if before and kind == "causal-lm" else None,
        unparseable_after=after.unparseable_share if after and kind == "causal-lm" else None,
        trainable=report.trainable, total=report.total, trainable_percent=report.percent, steps=step,
        best_val_loss=None if math.isinf(best_val) else best_val, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started, history=history,
    )
    if info.is_main:
        write_json_atomic(out / "results.json", {k: v for k, v in result.__dict__.items() if k != "history"})
        print(format_results(result), flush=True)
    dist_utils.teardown(info)
    return result


def export_adapter(state, model_path, kind, labels, adapter_cfg, cfg, path: Path, task_info: dict) -> None:
    """Write an adapter folder from gathered trainable tensors, through an unsharded model copy."""
    model, _ = load_model(model_path, kind, cfg.trust_remote_code, num_labels=len(labels) if labels else None)
    dorafit.attach(model, adapter_cfg)
    load_trainable(model, state, path)
    save_adapter_dir(model, path, task_info)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def format_results(r: TrainResult) -> str:
    """The short table printed at the end of a run."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = [
        ("task", f"{r.task} ({r.test_rows} test rows, {r.model_kind})"),
        ("accuracy before", pct(r.accuracy_before)),
        ("accuracy after", pct(r.accuracy_after)),
    ]
    if r.unparseable_after is not None:
        rows.append(("unparseable", f"{pct(r.unparseable_before)} -> {pct(r.unparseable_after)}"))
    rows += [
        ("trainable", f"{r.trainable:,} of {r.total:,} parameters ({r.trainable_percent:.2f}%)"),
        ("steps", f"{r.steps} (best validation loss {r.best_val_loss:.4f})" if r.best_val_loss is not None else str(r.steps)),
        ("time", f"training {_minutes(r.train_seconds)}, total {_minutes(r.total_seconds)}"),
        ("adapter", str(Path(r.output) / "adapter")),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
