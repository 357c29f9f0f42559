"""``dorafit eval``: accuracy of a model, with or without an adapter, on commonsense tasks.

Causal LMs: the paper's protocol (prompt, greedy generation, first regex match of the task's
answer words), reporting accuracy and the share of unparseable outputs. Encoders: multiple-
choice accuracy, scored the way the adapter was trained (its task.json), or as --model-kind
says. An adapter trained on a 4-bit base (QDoRA) is evaluated on the base quantized the same
way, never silently on the full-precision one.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "evaluate a model (and adapter) on commonsense tasks"


def add_arguments(parser) -> None:
    from dorafit.train.config import DEFAULT_MODEL, MODEL_KINDS

    parser.add_argument("--model", default=None,
                        help=f"base model folder or hub id (default: the base the adapter records, else {DEFAULT_MODEL})")
    parser.add_argument("--adapter", default="", help="adapter folder (dorafit or PEFT format); none: the base model alone")
    parser.add_argument("--task", default="", help="task name(s), comma-separated, or 'all'; default: the adapter's task")
    parser.add_argument("--data", default="", help="test data for a single task: a JSON/JSONL/CSV/parquet file, a "
                        "datasets.save_to_disk folder, a folder of data files or a hub dataset id (SOURCE:SPLIT picks a "
                        "split); default: <data-dir>/<task>/test.json")
    parser.add_argument("--data-split", default="", help="split of --data when it holds several (default: its only split)")
    parser.add_argument("--data-dir", default="", help="folder laid out as <task>/test.json (default: the data shipped with dorafit)")
    parser.add_argument("--max-rows", type=int, default=0, help="evaluate only the first N rows of each task (0: all)")
    parser.add_argument("--model-kind", default="auto", choices=MODEL_KINDS, help="how to score (default: the adapter's, else detected)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    parser.add_argument("--max-length", type=int, default=0, help="encoder token limit (default: the adapter's, else 128)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="causal LMs: generated tokens per row (default: 32)")
    parser.add_argument("--prompt-template", default="", choices=("", "auto", "paper", "chat"),
                        help="causal LMs: paper, chat, or auto (chat where the tokenizer has a chat template, else "
                             "paper; as dorafit train) (default: the adapter's task.json, else auto)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _load_task_info(adapter: str) -> dict:
    path = Path(adapter) / "task.json" if adapter else None
    if path and path.is_file():
        from dorafit.files import read_json_object

        return read_json_object(path)
    return {}


def check_local_model(name: str, flag: str = "--model") -> None:
    """A model given as a path (absolute, ./, ../ or ~) must exist: otherwise transformers takes
    it for a hub id and answers with a message about repository names."""
    import os

    if (os.path.isabs(name) or name.startswith((".", "~"))) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{flag} {name}: no such model folder")


def quantize_like_adapter(model, adapter: str, command: str) -> list:
    """Quantize the base layers the adapter was trained on in 4-bit exactly as in training
    (same quant type, block size, double quantization, compute dtype), so that the adapter meets
    the base it was trained with; returns the quantized module names. Refuses with a message
    saying how when bitsandbytes is missing."""
    import torch

    from dorafit.inject import _set_submodule
    from dorafit.io import read_adapter_config, recorded_quantization

    recorded = recorded_quantization(read_adapter_config(adapter))
    if not recorded:
        return []
    from dorafit import quant

    kinds = sorted({r.get("quant_type", "nf4") for r in recorded.values()})
    try:
        quant._bitsandbytes()
    except quant.QuantizationError as err:
        raise quant.QuantizationError(
            f"{adapter} was trained on a 4-bit {'/'.join(kinds)} base ({len(recorded)} layers); dorafit {command} "
            f"quantizes the base the same way and needs bitsandbytes for it: pip install bitsandbytes ({err})") from None
    for name, record in recorded.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise quant.QuantizationError(f"{adapter}: module {name!r} of the adapter does not exist in this base model") from None
        if quant.is_quantized_4bit(module):
            continue
        compute = record.get("compute_dtype")
        _set_submodule(model, name, quant.quantize_linear(
            module, record.get("quant_type", "nf4"),
            compute_dtype=getattr(torch, compute) if isinstance(compute, str) and hasattr(torch, compute) else None,
            double_quant=bool(record.get("double_quant", True)), blocksize=int(record.get("blocksize", 64))))
    print(f"quantized {len(recorded)} base layers to 4-bit {'/'.join(kinds)} as the adapter was trained",
          file=sys.stderr)
    return sorted(recorded)


def evaluate(args) -> list:
    """Evaluate every requested task; returns a list of EvalResult."""
    import torch

    import dorafit
    from dorafit.eval.evaluate import evaluate_choices, evaluate_generation
    from dorafit.eval.examples import resolve_template
    from dorafit.eval.tasks import TASKS, get_task
    from dorafit.train import data as D
    from dorafit.train.models import detect_kind, load_model, load_tokenizer, read_model_config, resolve_model_path
    from dorafit.io import recorded_base_model
    from dorafit.train.config import DEFAULT_MODEL

    info = _load_task_info(args.adapter)
    if args.adapter and not Path(args.adapter).exists():
        raise D.DataError(f"adapter folder {args.adapter} does not exist")
    names = args.task or info.get("task") or ""
    if not names:
        raise ValueError("--task is required (the adapter has no task.json naming its task)")
    tasks = list(TASKS.values()) if names == "all" else [get_task(n) for n in names.split(",") if n.strip()]
    if args.data and len(tasks) != 1:
        raise ValueError("--data names one test file: give exactly one --task with it")
    # Read every test file first, so a bad file fails before the model loads.
    data_dir = Path(args.data_dir) if args.data_dir else D.BUNDLED_DATA
    tables = []
    if args.data_split and not args.data:
        raise ValueError("--data-split picks a split of --data: give --data with it")
    for task in tasks:
        path = args.data or data_dir / task.folder / "test.json"
        if not args.data and not path.is_file() and names == "all":
            print(f"skipping {task.name}: no {path}", file=sys.stderr)
            continue
        if not args.data and not path.is_file():
            raise D.DataError(f"{path}: no test file for task {task.name}; pass --data FILE or --data-dir DIR")
        rows = D.read_rows(path, args.data_split)
        if args.max_rows:
            rows = rows[: args.max_rows]
        tables.append((task, path, rows))
    if not tables:
        raise D.DataError(f"no test file for any task under {data_dir}")

    model_name = args.model or (args.adapter and recorded_base_model(args.adapter)) or DEFAULT_MODEL
    check_local_model(model_name)
    model_path = resolve_model_path(model_name)
    config = read_model_config(model_path, args.trust_remote_code)
    fmt = D.detect_format(tables[0][2], tables[0][1])
    kind = args.model_kind if args.model_kind != "auto" else info.get("model_kind") or detect_kind(model_path, config, fmt)
    labels = info.get("labels")
    max_length = args.max_length or info.get("max_length") or 128
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    model, _ = load_model(model_path, kind, args.trust_remote_code, num_labels=len(labels) if labels else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.adapter:
        model.to(device)  # a 4-bit base is quantized on the device it runs on, as in training
        quantize_like_adapter(model, args.adapter, "eval")
        dorafit.load_adapter(model, args.adapter)
    model.to(device).eval()
    # An adapter is scored with the template it was trained with (task.json; one written before
    # task.json recorded it was trained with "paper"); a bare model as `dorafit train` prompts it.
    template = args.prompt_template or info.get("prompt_template") or ("paper" if info else "auto")
    template = resolve_template(template, tokenizer)
    results = []
    for task, path, rows in tables:
        examples = D.accuracy_examples(rows, kind, path, task, labels)
        if kind == "causal-lm":
            result = evaluate_generation(model, tokenizer, task, examples, args.max_new_tokens, args.batch_size,
                                         device, progress=args.progress, prompt_template=template)
        else:
            result = evaluate_choices(model, examples, tokenizer, kind, task.name, max_length, args.batch_size,
                                      device, progress=args.progress)
        results.append(result)
    return results


def format_table(results, causal: bool) -> str:
    head = f"{'task':<16}{'rows':>7}{'accuracy':>11}" + (f"{'unparseable':>14}" if causal else "")
    lines = [head, "-" * len(head)]
    for r in results:
        line = f"{r.task:<16}{r.rows:>7}{100 * r.accuracy:>10.1f}%"
        if causal:
            line += f"{100 * r.unparseable_share:>13.1f}%"
        lines.append(line)
    if len(results) > 1:
        mean = sum(r.accuracy for r in results) / len(results)
        lines.append(f"{'average':<16}{sum(r.rows for r in results):>7}{100 * mean:>10.1f}%")
    return "\n".join(lines)


def run(args) -> int:
    import dorafit
    from dorafit.files import write_json_atomic
    from dorafit.train.data import DataError
    from dorafit.train.models import ModelError

    if args.json and (Path(args.json).is_dir() or any(
            p and Path(p).exists() and Path(p).resolve() == Path(args.json).resolve() for p in (args.data, args.adapter, args.model))):
        print(f"dorafit eval: error: --json {args.json} is a folder or one of the inputs; give a new file name",
              file=sys.stderr)
        return 2
    for option in ("batch_size", "max_rows", "max_length", "max_new_tokens"):
        value, least = getattr(args, option), 1 if option in ("batch_size", "max_new_tokens") else 0
        if value < least:
            print(f"dorafit eval: error: --{option.replace('_', '-')} must be >= {least}, got {value}", file=sys.stderr)
            return 2
    try:
        results = evaluate(args)
    except (DataError, ModelError, dorafit.AdapterFileError, dorafit.ConfigError, ValueError, FileNotFoundError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dorafit eval: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    causal = any(r.unparseable for r in results) or _is_causal(args)
    print(format_table(results, causal))
    if args.json:
        write_json_atomic(args.json, [r.to_dict() for r in results])
    return 0


def _is_causal(args) -> bool:
    info = _load_task_info(args.adapter)
    return info.get("model_kind") == "causal-lm" or args.model_kind == "causal-lm"
