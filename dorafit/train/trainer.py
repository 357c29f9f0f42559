"""The training recipe: setup -> evaluate -> train -> save -> evaluate, as one readable script.

``train(cfg)`` runs a whole ``dorafit train`` in six phases, each a function below:

    1. prepare_run     processes, the run folder, the resolved config
    2. load_data       read and check every file, turn rows into examples (before the model loads)
    3. load_and_attach the model, its adapter (and 4-bit base for QDoRA)
    4. start           the optimizer and schedule; the state of a checkpoint, or step 0
    5. the loop        ``train_step`` per global batch, then validation and checkpoints
    6. finish          the final adapter, the test accuracy, results.json

What changes during the run lives in one ``RunState``; what is fixed after setup in one
``Run``. Everything that depends on the parallel mode (DDP or FSDP2) is asked of
``dorafit.train.distributed.Parallel``; the files of a checkpoint are ``dorafit.train.checkpoint``'s.

Exactness of --resume: an optimizer step ``s`` of epoch ``e`` always uses the rows
``perm_e[s*G:(s+1)*G]`` with ``perm_e = randperm(N, seed + e)`` and G the global batch, and
the summed loss of those rows is divided by their number of loss units (response tokens or
rows) counted over the whole step. The gradient is therefore the same however the step is
split into micro-batches and processes, and a checkpoint needs only the step counter, the
trainable weights, the optimizer state and the RNG states to continue bit for bit.
The last incomplete global batch of each epoch is dropped so every step has the same size on
any number of processes. A resumed run refuses options that would change its result (see
``RESUME_MAY_CHANGE``).

Numerical faults never reach a checkpoint: a non-finite loss, gradient norm or validation
loss stops the run before the update (or before anything is saved), naming the step and the
newest checkpoint that verifies finite. A base model whose weights hold NaN/inf is refused
before training; a trainable magnitude still bit-identical after the first steps is reported.
Ctrl-C and a full disk stop the run with one line naming the step and the checkpoint that
``--resume`` continues from. The run folder is locked while the run uses it, and ``--resume``
refuses a model or data that changed since the run started (``dorafit.train.fingerprint``).

Run folder (written by rank 0 only):
    config.yaml              the resolved TrainConfig
    checkpoints/step-N/      resumable checkpoints with an adapter/ folder (see dorafit.train.checkpoint)
    best/                    adapter with the lowest validation loss
    adapter/                 final adapter + task.json (PEFT's layout where PEFT holds the method)
    log.jsonl                step, loss, learning rate, validation loss
    predictions.json         every test row's prediction before and after, per scoring
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
from dorafit.eval import report as R
from dorafit.eval.evaluate import EvalResult
from dorafit.eval.examples import resolve_template
from dorafit.eval.tasks import Task, get_task
from dorafit.files import brief, is_disk_full, write_bytes_atomic, write_json_atomic
from dorafit.inject import check_finite_base
from dorafit.train import checkpoint as ckpt
from dorafit.train import data as D
from dorafit.train import distributed as dist_utils
from dorafit.train import fingerprint, full
from dorafit.train.health import MagnitudeWatch
from dorafit.train.config import TrainConfig, TrainConfigError, format_config, load_yaml_file
from dorafit.train.distributed import Parallel, gather_trainable, trainable_named
from dorafit.train.kinds import EvalSettings, ModelKind, get_kind
from dorafit.train.models import (
    default_targets,
    detect_kind,
    load_model,
    load_tokenizer,
    read_model_config,
    resolve_model_path,
)
from dorafit.train.rundir import RunStopped, abandon_new_run, prepare_output, release_run, stop_message

BUNDLED_DATA = D.BUNDLED_DATA
TASK_FILE = "task.json"
PREDICTIONS_FILE = "predictions.json"  # every test row's prediction before and after, per scoring

# Options a resumed run may give anew: they change how the run is watched, run or kept, not
# what it computes. Every other option must equal the run folder's config.yaml.
RESUME_MAY_CHANGE = frozenset({
    "output", "resume", "overwrite", "stop_after_steps",  # where and how far this invocation runs
    "progress", "threads", "keep_checkpoints",  # display, CPU threads, how many old checkpoints stay
    "eval_before",  # the "before" accuracy of a resumed run comes from its checkpoint
    "trust_remote_code",  # permission to run the model's code, which the first run already had
})


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
    predicted_before: dict | None = None  # causal LMs: how often each answer word was generated
    predicted_after: dict | None = None
    chance: float | None = None  # the expected accuracy of a uniform guess over each test row's choices
    # causal LMs: likelihood scoring of the same rows (acc, acc_norm, standard errors), and which moved
    loglik_before: dict | None = None
    loglik_after: dict | None = None
    change: str = ""
    method: str = ""


@dataclass
class RunData:
    """The examples of a run, read and checked before the model is loaded."""

    task: Task
    kind: ModelKind
    model_path: str
    tokenizer: object
    train_path: Path
    train: list
    val: list
    test_rows: list
    test: list
    labels: list | None
    prompt_template: str  # the resolved template ("auto" made "paper" or "chat")
    test_loglik: list = field(default_factory=list)  # causal LMs: the test rows as likelihood scoring reads them


@dataclass
class Run:
    """What the loop works with, fixed after setup."""

    cfg: TrainConfig
    parallel: Parallel
    out: Path
    data: RunData
    model: torch.nn.Module
    adapter_cfg: dorafit.AdapterConfig | None  # None for --method full
    report: dorafit.TrainableReport
    collate: object  # examples -> batch, for the model's kind
    steps_per_epoch: int
    total_steps: int
    names: list = field(default_factory=list)  # trainable parameter names, in the optimizer's order
    # Set by ``start``: the model as the loop calls it (DDP / FSDP2-wrapped with several
    # processes), AdamW over the trainable parameters, the fp16 loss scaler (or None).
    wrapped: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def info(self) -> dist_utils.DistInfo:
        return self.parallel.info

    @property
    def task_info(self) -> dict:
        """task.json: how ``dorafit eval`` scores the adapter."""
        return {"task": self.data.task.name, "model_kind": self.data.kind.name, "labels": self.data.labels,
                "max_length": self.cfg.max_length, "prompt_template": self.data.prompt_template,
                "response_format": self.cfg.response_format}


@dataclass
class RunState:
    """What changes during the run and what a checkpoint keeps of it."""

    step: int = 0
    best_val: float = math.inf
    before: EvalResult | None = None
    before_loglik: EvalResult | None = None
    history: list = field(default_factory=list)

    def counters(self) -> dict:
        """The JSON part of a checkpoint's state.json."""
        return {"step": self.step, "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
                "before": self.before.__dict__ if self.before else None,
                "before_loglik": self.before_loglik.__dict__ if self.before_loglik else None, "history": self.history}

    @classmethod
    def from_counters(cls, saved: dict) -> "RunState":
        best = saved["best_val_loss"]
        return cls(step=saved["step"], best_val=math.inf if best is None else best,
                   before=EvalResult(**saved["before"]) if saved.get("before") else None,
                   before_loglik=EvalResult(**saved["before_loglik"]) if saved.get("before_loglik") else None,
                   history=saved.get("history", []))


# ---------------------------------------------------------------------------- the recipe


def train(cfg: TrainConfig) -> TrainResult | None:
    """Run a whole fine-tuning job as ``cfg`` describes; returns the results (rank 0's view),
    or None when it stopped early on purpose (``stop_after_steps``)."""
    started = time.perf_counter()
    parallel, out = prepare_run(cfg)
    state = None
    try:
        data = load_data(cfg, parallel.info)
        check_inputs(cfg, out, data, parallel.info)
        run = load_and_attach(cfg, parallel, out, data)
        state = start(run)
        train_started = time.perf_counter()
        if not train_loop(run, state):
            dist_utils.teardown(run.info)
            return None
        return finish(run, state, time.perf_counter() - train_started, started)
    except BaseException as err:
        if state is None and not cfg.resume and parallel.info.is_main:
            abandon_new_run(out)  # refused or stopped before its first step: the new run leaves nothing behind
        if isinstance(err, KeyboardInterrupt):
            raise RunStopped(stop_message(out, "interrupted", state and state.step)) from err
        if isinstance(err, Exception) and is_disk_full(err):
            detail = " ".join(str(err).split())[:400]
            raise RunStopped(stop_message(out, f"the disk is full ({detail})", state and state.step)) from err
        raise
    finally:
        release_run(out)


# ---------------------------------------------------------------------------- 1. the run folder


def prepare_run(cfg: TrainConfig) -> tuple[Parallel, Path]:
    """Join the processes, check and make the run folder (rank 0), print and save the config."""
    info = dist_utils.setup()
    try:
        parallel = Parallel(info, cfg.distributed, cfg.tp_size)
    except dist_utils.ParallelError as err:
        raise TrainConfigError(str(err)) from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _check_precision(cfg, info.device)
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    error = None
    if info.is_main:
        try:
            prepare_output(out, cfg)
            if cfg.resume:
                check_resume_options(out, cfg)
        except TrainConfigError as err:
            release_run(out)
            error = str(err)
    error = dist_utils.broadcast_object(error, info)
    if error:
        raise TrainConfigError(error)
    cfg_dict = {**cfg.to_dict(), "output": str(out)}
    _print(info, "dorafit train: resolved configuration\n" + format_config(TrainConfig(**cfg_dict)))
    if info.is_main and not cfg.resume:
        import yaml

        write_bytes_atomic(out / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False).encode())
    seed_everything(cfg.seed)
    return parallel, out


def check_resume_options(out: Path, cfg: TrainConfig) -> None:
    """Refuse a --resume whose options differ from the run's own where that changes the result."""
    path = out / "config.yaml"
    saved, _ = load_yaml_file(path, "--resume:")
    if not isinstance(saved, dict):
        raise TrainConfigError(f"--resume: {path} does not hold a run config")
    current = cfg.to_dict()
    changed = [f"{key} {brief(saved.get(key))} -> {brief(value)}" for key, value in current.items()
               if key not in RESUME_MAY_CHANGE and saved.get(key, value) != value]
    if changed:
        raise TrainConfigError(f"--resume: these options differ from the run in {out} and would change its "
                               f"result: {'; '.join(changed)}. Resume without them, or start a new run")


def check_inputs(cfg: TrainConfig, out: Path, data: "RunData", info: dist_utils.DistInfo) -> None:
    """Record the fingerprint of the run's model and data, or refuse a resume where they changed."""
    test = _data_path(cfg, "test", data.task.folder) if data.test_rows else ""
    fingerprint.record_or_check(out, cfg.resume, {"model": data.model_path, "training data": str(data.train_path),
                                                  "validation data": cfg.val_data, "test data": str(test)}, info)


def default_output(cfg: TrainConfig) -> Path:
    model = Path(cfg.model.rstrip("/")).name or "model"
    return Path("runs") / f"{model}-{cfg.task}-{datetime.now():%Y%m%d-%H%M%S}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_precision(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainConfigError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError("precision bf16 is not supported by this GPU; use fp16 or fp32")


# ---------------------------------------------------------------------------- 2. the data


def load_data(cfg: TrainConfig, info: dist_utils.DistInfo) -> RunData:
    """Every file read and checked, the rows turned into examples for the model's kind."""
    task = get_task(cfg.task)
    model_path = resolve_model_path(cfg.model)
    model_config = read_model_config(model_path, cfg.trust_remote_code)
    train_path = _data_path(cfg, "train", task.folder)
    train_rows = D.read_rows(train_path)[: cfg.max_train_rows or None]
    data_format = D.detect_format(train_rows, train_path)
    kind = get_kind(detect_kind(model_path, model_config, data_format) if cfg.model_kind == "auto" else cfg.model_kind)
    test_path = _data_path(cfg, "test", task.folder) if cfg.test and (cfg.test_data or data_format == "commonsense") \
        else None
    test_rows = D.read_rows(test_path)[: cfg.max_test_rows or None] if test_path else []
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    template = resolve_template(cfg.prompt_template, tokenizer)
    D.check_tokenizer(tokenizer, template if kind.generates else "", cfg.model)
    D.check_context(cfg.max_length, model_config, cfg.model)
    lengths: list = []  # examples cut or dropped by --max-length, reported below
    train, labels = kind.loss_examples(train_rows, train_path, tokenizer, cfg.max_length, task=task,
                                       prompt_template=template, response_format=cfg.response_format,
                                       report=lengths)
    val = None
    if cfg.val_data:
        val = kind.loss_examples(D.read_rows(cfg.val_data), cfg.val_data, tokenizer, cfg.max_length,
                                 task=task, labels=labels, prompt_template=template,
                                 response_format=cfg.response_format, report=lengths)[0]
    test = kind.accuracy_examples(test_rows, test_path, task, labels) if test_rows else []
    test_loglik, why_not = kind.likelihood_rows(test_rows, test_path, task) if test_rows else ([], None)
    if why_not:
        _print(info, f"likelihood scoring left out: {why_not}")
    if kind.generates and test_rows:
        D.check_prompt_lengths(test_rows, tokenizer, template, cfg.max_new_tokens, model_config, test_path, cfg.model)
    for report in lengths:
        _print(info, f"data: {report}")
    if val is None:
        train, val = D.split_validation(train, cfg.val_size, cfg.seed)
    _print(info, f"data: {len(train)} train, {len(val)} validation, {len(test_rows)} test rows; kind {kind.name}")
    return RunData(task, kind, model_path, tokenizer, train_path, train, val, test_rows, test, labels, template,
                   test_loglik)


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


# ---------------------------------------------------------------------------- 3. model and adapter


def load_and_attach(cfg: TrainConfig, parallel: Parallel, out: Path, data: RunData) -> Run:
    """The model with its adapter on the device, wrapped for the processes, and its optimizer.

    Attaching leaves the outputs unchanged (B = 0, m = ||W0||), so an evaluation before the
    first step is the base model's.
    """
    info = parallel.info
    global_batch = cfg.batch_size * cfg.grad_accum * parallel.replicas
    steps_per_epoch = len(data.train) // global_batch
    if steps_per_epoch == 0:
        raise D.DataError(f"{data.train_path}: {len(data.train)} training rows are fewer than one global batch "
                          f"({global_batch} = batch size x grad accum x data-parallel processes)")
    _print(info, f"{steps_per_epoch * cfg.epochs} steps of {global_batch} rows")
    model, fresh_modules = load_model(data.model_path, data.kind, cfg.trust_remote_code,
                                      num_labels=len(data.labels) if data.labels else None)
    check_finite_base(model)  # NaN/inf in the base is named here, not blamed on the lr at step 1
    targets = cfg.targets or default_targets(model)
    adapter_cfg = None if cfg.method == full.FULL else dorafit.AdapterConfig(
        method=cfg.method, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=targets,
        detach_norm=cfg.detach_norm, modules_to_save=data.kind.trained_heads(model, fresh_modules))
    if cfg.quantize:
        _quantize_base(model, targets, cfg.quantize, parallel)
    parallel.prepare_base(model)  # tensor parallel: the base layers are split before attaching
    torch.manual_seed(cfg.seed)  # the adapter's initialisation depends on the seed alone
    if adapter_cfg is None:
        full.prepare(model)  # --method full: every parameter trains, nothing is attached
    else:
        dorafit.attach(model, adapter_cfg)
    model.to(info.device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    report = dorafit.trainable_report(model)
    _print(info, str(report))
    pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
    return Run(cfg=cfg, parallel=parallel, out=out, data=data, model=model, adapter_cfg=adapter_cfg, report=report,
               collate=data.kind.collate(data.tokenizer, cfg.max_length, pad_id),
               steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * cfg.epochs,
               names=[n for n, _ in trainable_named(model)])


def _quantize_base(model, targets: list[str], quant_type: str, parallel: Parallel) -> None:
    """QDoRA: exactly the adapted linear layers become 4-bit (bitsandbytes), on the device
    they train on; the norm then runs through the 4-bit layers (dorafit.quant). Sharded over
    processes, the 4-bit codes are stored as bfloat16 (see ``quant.quantize_linear``)."""
    from dorafit import quant

    info = parallel.info
    model.to(info.device)
    compute = torch.bfloat16 if info.device.type == "cuda" else torch.float32
    storage = torch.bfloat16 if parallel.sharded else torch.uint8
    names = quant.quantize_model(model, targets, quant_type, compute_dtype=compute, quant_storage=storage)
    _print(info, f"quantized {len(names)} linear layers to 4-bit {quant_type} (compute dtype {compute})")


# ---------------------------------------------------------------------------- 4. optimizer, schedule, state


def start(run: Run) -> RunState:
    """Wrap the model, build AdamW, and return the state to continue from: a checkpoint's with
    --resume, else step 0 (after the evaluation of the untrained model)."""
    cfg, info = run.cfg, run.info
    resumed = run.parallel.latest_checkpoint(run.out / "checkpoints") if cfg.resume else None
    if cfg.resume and resumed is None:
        warnings.warn(f"--resume: no usable checkpoint in {run.out / 'checkpoints'}; starting from step 0",
                      stacklevel=2)
    state = RunState()
    if resumed is None and cfg.eval_before:
        evaluate_untrained(run, state)
    run.wrapped = run.parallel.wrap(run.model)
    run.optimizer = torch.optim.AdamW([p for _, p in trainable_named(run.model)], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
    run.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
    if resumed is None:
        return state
    folder, loaded = resumed
    run.parallel.load_checkpoint(run.model, run.optimizer, run.names, folder, loaded)
    ckpt.restore_rng(loaded["rng"], loaded["state"]["rng"])
    state = RunState.from_counters(loaded["state"])
    if info.is_main:
        _truncate_log(run.out / "log.jsonl", state.step)
    _print(info, f"resumed from {folder} at step {state.step}")
    return state


def evaluate_untrained(run: Run, state: RunState) -> None:
    """The 'before' accuracy, and the untrained validation loss as step 0 of the log: the bar to beat."""
    state.before, state.before_loglik = measure_accuracy(run), measure_accuracy(run, "loglik")
    if state.before is not None:
        _print(run.info, f"accuracy before training: {state.before.accuracy:.4f} on {state.before.rows} "
                         f"{run.data.task.name} rows")
    if run.data.val:
        record = {"step": 0, "val_loss": validation_loss(run, run.model)}
        state.history.append(record)
        _append_log(run, record)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then linear decay towards 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    remaining = max(total_steps - cfg.warmup_steps, 1)
    return cfg.lr * max(total_steps - step, 0) / remaining


# ---------------------------------------------------------------------------- 5. the loop


def train_loop(run: Run, state: RunState) -> bool:
    """Optimizer steps until the end (True) or until --stop-after-steps (False)."""
    cfg = run.cfg
    bar = _progress_bar(run, state.step)
    run.wrapped.train()
    magnitudes = MagnitudeWatch(run.model, state.step, run.total_steps)
    try:
        while state.step < run.total_steps:
            loss, lr = train_step(run, state.step)
            state.step += 1
            magnitudes.after_step(state.step, run.optimizer, cfg.lr, run.info)
            record = {"step": state.step, "epoch": (state.step - 1) // run.steps_per_epoch, "loss": loss, "lr": lr}
            at_save = (cfg.save_steps and state.step % cfg.save_steps == 0) or state.step == run.total_steps
            if run.data.val and _at_eval(run, state.step, at_save):
                record["val_loss"] = validate(run, state)
            state.history.append(record)
            _append_log(run, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "val_loss") if k in record})
            if at_save:
                save_checkpoint(run, state)
            if cfg.stop_after_steps and cfg.stop_after_steps <= state.step < run.total_steps:
                _print(run.info, f"stopped after step {state.step} as asked (--stop-after-steps); "
                                 "continue with --resume")
                return False
        return True
    finally:
        if bar is not None:
            bar.close()


def train_step(run: Run, step: int) -> tuple[float, float]:
    """One optimizer step over global batch ``step``; returns (loss per unit, learning rate)."""
    cfg, info = run.cfg, run.info
    micro_batches = step_batches(run, step)
    units = sum(run.data.kind.count_units(b) for b in micro_batches)  # the whole step, all processes
    lr = lr_at(step, cfg, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = 0.0
    for j, micro in enumerate(micro_batches):
        mine = _to(run.parallel.local_rows(micro, cfg.batch_size), info.device)
        with run.parallel.accumulating(run.wrapped, last=j == len(micro_batches) - 1), _autocast(cfg, info.device):
            # DDP and FSDP average gradients over the data-parallel replicas; scale by their
            # number so the result is the sum over the step divided by its units.
            loss = run.data.kind.loss_sum(run.wrapped, mine) * (run.parallel.replicas / units)
        step_loss += float(loss.detach()) / run.parallel.replicas
        (run.scaler.scale(loss) if run.scaler else loss).backward()
    step_loss = run.parallel.sum_over_replicas(step_loss)
    _refuse_non_finite(run, "loss", step_loss, step + 1)
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = _clip_gradients(run)
    if run.scaler:  # an inf/NaN gradient is how fp16 loss scaling backs off: the scaler skips that step
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        _refuse_non_finite(run, "gradient norm", grad_norm, step + 1)
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, lr


def step_batches(run: Run, step: int) -> list[dict]:
    """The micro-batches of global batch ``step``: rows perm_e[s*G:(s+1)*G] (see the module docstring)."""
    cfg, world = run.cfg, run.parallel.replicas
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    order = torch.randperm(len(run.data.train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    rows = order[in_epoch * global_batch:(in_epoch + 1) * global_batch].tolist()
    micro = cfg.batch_size * world
    return [run.collate([run.data.train[i] for i in rows[j:j + micro]]) for j in range(0, global_batch, micro)]


def _clip_gradients(run: Run) -> float:
    """Clip to --max-grad-norm (if set) and return the total gradient norm before clipping."""
    params = [p for _, p in trainable_named(run.model)]
    # An infinite max norm clips nothing (every gradient is multiplied by exactly 1).
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm or math.inf)
    return float(dist_utils.full_tensor(norm))


def _refuse_non_finite(run: Run, what: str, value: float, step: int) -> None:
    """Stop before a non-finite value can reach the weights or a checkpoint."""
    if not math.isfinite(value):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"{what} is {value} at step {step}; stopping without updating the weights "
                            f"({_last_good_note(run)}). Lower --lr or use --precision fp32.")


def _last_good_note(run: Run) -> str:
    last = ckpt.last_good(run.out / "checkpoints")  # verified: checksums and finite values
    return f"the last good checkpoint is {last}" if last else "no good checkpoint was written yet"


def _at_eval(run: Run, step: int, at_save: bool) -> bool:
    cfg = run.cfg
    if cfg.eval_steps:
        return step % cfg.eval_steps == 0
    return bool(at_save) or step % run.steps_per_epoch == 0


def validate(run: Run, state: RunState) -> float:
    """The validation loss after this step; a new best is saved to best/."""
    val = validation_loss(run, run.wrapped)
    if not math.isfinite(val):
        raise TrainingError(f"validation loss is {val} after step {state.step}; stopping before anything "
                            f"of this step is saved ({_last_good_note(run)}). Lower --lr or use --precision fp32.")
    if val < state.best_val:
        state.best_val = val
        save_adapter_as(run, "best")
    return val


@torch.no_grad()
def validation_loss(run: Run, model) -> float:
    """Mean loss per unit over the validation rows (all ranks compute the same value)."""
    cfg, device, examples = run.cfg, run.info.device, run.data.val
    was_training = model.training
    model.eval()
    total, units = 0.0, 0
    for start in range(0, len(examples), cfg.eval_batch_size):
        batch = _to(run.collate(examples[start:start + cfg.eval_batch_size]), device)
        with _autocast(cfg, device):
            total += float(run.data.kind.loss_sum(model, batch))
        units += run.data.kind.count_units(batch)
    model.train(was_training)
    return total / max(units, 1)


def save_checkpoint(run: Run, state: RunState) -> None:
    """A resumable checkpoint of this step (whole tensors from rank 0, or every rank's shards),
    then the oldest ones pruned."""
    root = run.out / "checkpoints"
    run.parallel.save_checkpoint(root / f"step-{state.step:06d}", run.model, run.optimizer, run.names,
                                 state.counters(),
                                 write_extra=None if run.adapter_cfg is None else
                                 lambda tmp: save_adapter_dir(run.model, tmp / "adapter", run.task_info))
    if run.info.is_main:
        ckpt.prune_checkpoints(root, run.cfg.keep_checkpoints)
    dist_utils.barrier(run.info)


def save_adapter_as(run: Run, name: str) -> None:
    """Write the current adapter to out/<name> (gathered to full tensors under FSDP2); a full
    fine-tune writes the whole model (``dorafit.train.full``)."""
    path = run.out / full.output_name(run.cfg.method, name)
    if run.adapter_cfg is not None:
        run.parallel.save_adapter(lambda: save_adapter_dir(run.model, path, run.task_info))
    elif run.parallel.sharded:  # every rank gathers the whole model, rank 0 saves it through a fresh copy
        state = gather_trainable(run.model)
        if run.info.is_main:
            full.save_from_state(_fresh_model(run), state, run.data.tokenizer, path, run.task_info)
        dist_utils.barrier(run.info)
    else:
        run.parallel.save_adapter(lambda: full.save_model(run.model, run.data.tokenizer, path, run.task_info))


# ---------------------------------------------------------------------------- 6. final adapter, test


def finish(run: Run, state: RunState, train_seconds: float, started: float) -> TrainResult:
    """Save the final adapter, measure the test accuracy after training, write results.json."""
    save_adapter_as(run, "adapter")
    after, after_loglik = measure_accuracy(run), measure_accuracy(run, "loglik")
    before, causal, report = state.before, run.data.kind.generates, run.report
    result = TrainResult(
        output=str(run.out), task=run.data.task.name, model_kind=run.data.kind.name, test_rows=len(run.data.test_rows),
        accuracy_before=before.accuracy if before else None, accuracy_after=after.accuracy if after else None,
        unparseable_before=before.unparseable_share if before and causal else None,
        unparseable_after=after.unparseable_share if after and causal else None,
        trainable=report.trainable, total=report.total, trainable_percent=report.percent, steps=state.step,
        best_val_loss=None if math.isinf(state.best_val) else state.best_val, train_seconds=train_seconds,
        total_seconds=time.perf_counter() - started, history=state.history,
        predicted_before=before.predicted if before and causal else None,
        predicted_after=after.predicted if after and causal else None,
        chance=run.data.kind.chance(run.data.test, run.data.labels), method=run.cfg.method,
        loglik_before=R.summary(state.before_loglik), loglik_after=R.summary(after_loglik),
        change=R.change_sentence((before, after) if before and causal else None,
                                 (state.before_loglik, after_loglik) if state.before_loglik else None),
    )
    if run.info.is_main:
        write_json_atomic(run.out / "results.json", {k: v for k, v in result.__dict__.items() if k != "history"})
        write_json_atomic(run.out / PREDICTIONS_FILE, R.predictions_record(
            generate=(before, after), loglik=(state.before_loglik, after_loglik)))
        print(format_results(result), flush=True)
    dist_utils.teardown(run.info)
    return result


def measure_accuracy(run: Run, scoring: str | None = None) -> EvalResult | None:
    """Accuracy on the test rows (None without any) as the model's kind scores it, or (causal
    LMs, ``scoring="loglik"``) by likelihood."""
    data, cfg, info = run.data, run.cfg, run.info
    test = data.test_loglik if scoring == "loglik" else data.test
    if not data.test_rows or not test:
        return None
    settings = EvalSettings(batch_size=cfg.eval_batch_size, device=info.device, progress=cfg.progress and info.is_main,
                            max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens,
                            prompt_template=data.prompt_template, scoring=scoring)
    return data.kind.accuracy(run.model, data.tokenizer, data.task, test, settings)


def save_adapter_dir(model, path: Path, task_info: dict) -> None:
    """The adapter plus task.json (how to score it): in PEFT's layout where PEFT can hold the
    method (LoRA, DoRA), so that PEFT, transformers and lm-evaluation-harness read it; dorafit's
    own layout for the rest (VeRA, DVoRA, magnitude-only). A model sharded over processes is
    saved by all of them together, its files written by rank 0 alone."""
    dorafit.save_adapter(model, path, format="auto")
    if dist_utils.is_main_process():
        write_json_atomic(path / TASK_FILE, task_info)


def _fresh_model(run: Run):
    labels = run.data.labels
    return load_model(run.data.model_path, run.data.kind, run.cfg.trust_remote_code,
                      num_labels=len(labels) if labels else None)[0]


# ---------------------------------------------------------------------------- small helpers


def _print(info, *args) -> None:
    if info.is_main:
        print(*args, flush=True)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress_bar(run: Run, initial: int):
    if not (run.cfg.progress and run.info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=initial, desc="train", dynamic_ncols=True)


def _append_log(run: Run, record: dict) -> None:
    if run.info.is_main:
        with open(run.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


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


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def format_results(r: TrainResult) -> str:
    """The short table printed at the end of a run (± one standard error), and for a causal LM
    the sentence on which accuracy moved."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def scored(x, unparseable=None):
        text = R.with_error(x, r.test_rows)
        return text if unparseable is None else f"{text} (unparseable {pct(unparseable)})"

    generated = r.unparseable_after is not None
    rows = [
        ("task", f"{r.task} ({r.test_rows} test rows, {r.model_kind})"),
        ("accuracy before", scored(r.accuracy_before, r.unparseable_before) if generated else pct(r.accuracy_before)),
        ("accuracy after", scored(r.accuracy_after, r.unparseable_after) if generated else pct(r.accuracy_after)),
    ]
    if generated:
        rows = rows[:1] + [("", "generation: greedy answer, first answer word (the paper's protocol)")] + rows[1:]
    for name, key in (("acc", "acc"), ("acc_norm", "acc_norm")):
        if r.loglik_after:
            before = (r.loglik_before or {}).get(key)
            rows.append((f"likelihood {name}", f"{R.with_error(before, r.test_rows)} -> "
                                               f"{R.with_error(r.loglik_after[key], r.test_rows)}"))
    if r.chance is not None and r.test_rows:
        # One standard error of an accuracy p measured on n rows: sqrt(p (1 - p) / n).
        error = 100 * math.sqrt(r.chance * (1 - r.chance) / r.test_rows)
        rows.append(("chance", f"{pct(r.chance)} (one standard error at chance on {r.test_rows} rows: "
                               f"{error:.1f} points)"))
    if generated and not r.loglik_after:
        rows.append(("unparseable", f"{pct(r.unparseable_before)} -> {pct(r.unparseable_after)}"))
    rows += [
        ("trainable", f"{r.trainable:,} of {r.total:,} parameters ({r.trainable_percent:.2f}%)"),
        ("steps", f"{r.steps} (best validation loss {r.best_val_loss:.4f})" if r.best_val_loss is not None else str(r.steps)),
        ("time", f"training {_minutes(r.train_seconds)}, total {_minutes(r.total_seconds)}"),
        (full.output_name(r.method, "adapter"), str(Path(r.output) / full.output_name(r.method, "adapter"))),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    text = [line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line]
    if r.change:
        import textwrap

        text += textwrap.wrap(r.change, len(line))
    return "\n".join(text)
