"""``dorafit eval``: accuracy of a model, with or without an adapter, on commonsense tasks.

Causal LMs, two scorings (``--scoring``):

- ``generate`` (the default): the DoRA paper's protocol (prompt, greedy generation, first regex
  match of the task's answer words), reporting accuracy and the share of unparseable outputs:
  it measures the answer format as much as the answer;
- ``loglik``: lm-evaluation-harness's zero-shot multiple choice (``dorafit.eval.loglik``): the
  choice whose text is the likeliest continuation, as ``acc`` and length-normalised
  ``acc_norm``, each with its standard error: what the field's numbers (lm-eval, lighteval,
  model cards) measure.

Encoders: multiple-
choice accuracy, scored the way the adapter was trained (its task.json), or as --model-kind
says. The base comes from ``dorafit.loading.load_base_for_adapter``: an adapter trained on a
4-bit base (QDoRA) is evaluated on the base quantized the same way, never silently on the
full-precision one.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "evaluate a model (and adapter) on commonsense tasks"


def add_arguments(parser) -> None:
    from dorafit.train.config import DEFAULT_MODEL, MODEL_KINDS

    parser.add_argument("--model", default=None,
                        help=f"base model folder or hf://owner/name (default: the base the adapter records, else {DEFAULT_MODEL})")
    parser.add_argument("--adapter", default="", help="adapter folder (dorafit or PEFT format); none: the base model alone")
    parser.add_argument("--task", default="", help="task name(s), comma-separated, or 'all'; default: the adapter's task")
    parser.add_argument("--data", default="", help="test data for a single task: a JSON/JSONL/CSV/parquet file, a "
                        "datasets.save_to_disk folder, a folder of data files or a hub dataset hf://owner/name (SOURCE:SPLIT picks a "
                        "split); default: <data-dir>/<task>/test.json")
    parser.add_argument("--data-split", default="", help="split of --data when it holds several (default: its only split)")
    parser.add_argument("--data-dir", default="", help="folder laid out as <task>/test.json (default: the data shipped with dorafit)")
    parser.add_argument("--max-rows", type=int, default=0, help="evaluate only the first N rows of each task (0: all)")
    parser.add_argument("--model-kind", default="auto", choices=MODEL_KINDS, help="how to score (default: the adapter's, else detected)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    parser.add_argument("--max-length", type=int, default=0, help="encoder token limit (default: the adapter's, else 128)")
    parser.add_argument("--scoring", default="", choices=("", "generate", "loglik"),
                        help="causal LMs: generate (greedy generation, first answer word: the paper's protocol) or "
                             "loglik (likelihood of each choice's text, acc and acc_norm: lm-evaluation-harness's) "
                             "(default: generate)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="causal LMs: generated tokens per row (default: 32)")
    parser.add_argument("--prompt-template", default="", choices=("", "auto", "paper", "chat", "plain"),
                        help="causal LMs, generation: paper, chat, plain (the instruction as it is), or auto (chat "
                             "where the tokenizer has a chat template, else paper; as dorafit train) (default: the "
                             "adapter's task.json, else auto)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")
    parser.add_argument("--json", default="", help="also write the results to this JSON file (acc, acc_norm with "
                        "loglik, standard errors, rows, and every row's prediction)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def evaluate(args) -> tuple:
    """Evaluate every requested task; returns a list of EvalResult."""
    import torch

    from dorafit.eval.examples import resolve_template
    from dorafit.eval.tasks import TASKS, get_task
    from dorafit.files import check_output_file
    from dorafit.loading import load_base_for_adapter, read_task_info
    from dorafit.remote import resolve_adapter_path
    from dorafit.train import data as D
    from dorafit.train.kinds import EvalSettings
    from dorafit.train.models import load_tokenizer

    if args.adapter:  # a local folder, or hf://owner/name fetched; a missing path is never a hub id
        args.adapter = str(resolve_adapter_path(args.adapter))
    info = read_task_info(args.adapter)
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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_base_for_adapter(args.adapter or None, model=args.model, kind=args.model_kind,
                                   data_format=D.detect_format(tables[0][2], tables[0][1]),
                                   trust_remote_code=args.trust_remote_code, device=device, command="eval")
    model, kind = loaded.model.to(device).eval(), loaded.kind
    scoring = args.scoring or None
    kind.check_scoring(scoring)
    if args.json:  # the base the adapter records is an input too: no result file inside it
        check_output_file(args.json, [("--model", loaded.path)], "--json")
    tokenizer = load_tokenizer(loaded.path, args.trust_remote_code)
    # An adapter is scored with the template it was trained with (task.json; one written before
    # task.json recorded it was trained with "paper"); a bare model as `dorafit train` prompts it.
    template = args.prompt_template or info.get("prompt_template") or ("paper" if info else "auto")
    settings = EvalSettings(batch_size=args.batch_size, device=device, progress=args.progress,
                            max_length=args.max_length or info.get("max_length") or 128,
                            max_new_tokens=args.max_new_tokens, prompt_template=resolve_template(template, tokenizer),
                            scoring=scoring)
    labels = info.get("labels")
    generates = kind.generates and scoring != "loglik"
    D.check_tokenizer(tokenizer, settings.prompt_template if generates else "", loaded.name)
    results = []
    for task, path, rows in tables:
        examples = kind.accuracy_examples(rows, path, task, labels, scoring)
        if generates:
            D.check_prompt_lengths(rows, tokenizer, settings.prompt_template, args.max_new_tokens, loaded.config,
                                   path, loaded.name)
        results.append(kind.accuracy(model, tokenizer, task, examples, settings))
    return results


def format_table(results) -> str:
    """One line per task (and their average): accuracy, with the unparseable share for
    generation, and acc ± standard error with acc_norm ± standard error for likelihood."""
    from dorafit.eval.evaluate import standard_error

    loglik = any(r.scoring == "loglik" for r in results)
    generate = any(r.scoring == "generate" for r in results)
    head = f"{'task':<16}{'rows':>7}" + (f"{'acc':>16}{'acc_norm':>16}" if loglik else f"{'accuracy':>11}")
    head += f"{'unparseable':>14}" if generate else ""
    lines = [head, "-" * len(head)]

    def pct(share, rows):
        return f"{100 * share:.1f} ± {100 * standard_error(share, rows):.1f}"

    for r in results:
        line = f"{r.task:<16}{r.rows:>7}"
        line += f"{pct(r.accuracy, r.rows):>16}{pct(r.accuracy_norm, r.rows):>16}" if loglik else \
            f"{100 * r.accuracy:>10.1f}%"
        if generate:
            line += f"{100 * r.unparseable_share:>13.1f}%"
        lines.append(line)
    if len(results) > 1:
        rows = sum(r.rows for r in results)
        line = f"{'average':<16}{rows:>7}"
        mean = sum(r.accuracy for r in results) / len(results)
        if loglik:
            norm = sum(r.accuracy_norm for r in results) / len(results)
            line += f"{100 * mean:>15.1f} {100 * norm:>15.1f} "
        else:
            line += f"{100 * mean:>10.1f}%"
        lines.append(line)
    if loglik:
        lines.append("acc: the likeliest choice; acc_norm: likelihood per character of the choice (lm-eval's); "
                     "± one standard error")
    return "\n".join(lines)


def run(args) -> int:
    import dorafit
    from dorafit.files import write_json_atomic
    from dorafit.train.data import DataError
    from dorafit.train.models import ModelError

    from dorafit.files import OutputPathError, check_output_file

    if args.json:  # refused before anything is evaluated: a link, a device, a FIFO, a folder, an input
        try:
            check_output_file(args.json, [("--data", args.data), ("--data-dir", args.data_dir),
                                          ("--adapter", args.adapter), ("--model", args.model)], "--json")
        except OutputPathError as err:
            print(f"dorafit eval: error: {err}", file=sys.stderr)
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
    print(format_table(results))
    if args.json:
        write_json_atomic(args.json, [r.to_dict() for r in results])
    return 0

