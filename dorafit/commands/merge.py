"""``dorafit merge``: fold an adapter into its base model and save a plain transformers checkpoint.

The result is written with ``save_pretrained`` (safetensors) together with the tokenizer, to a
temporary folder renamed into place; ``AutoModel...from_pretrained(DIR)`` loads it without
dorafit and computes what the adapted model computes.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "merge an adapter into its base model and save a plain transformers checkpoint"


def add_arguments(parser) -> None:
    from dorafit.train.config import DEFAULT_MODEL, MODEL_KINDS

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"base model folder or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--adapter", required=True, help="adapter folder (dorafit or PEFT format)")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--model-kind", default="auto", choices=MODEL_KINDS,
                        help="model class to load (default: the adapter's task.json, else detected)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")


def merge_to_folder(args) -> Path:
    import dorafit
    from dorafit.commands.eval import _load_task_info
    from dorafit.files import atomic_directory
    from dorafit.train.models import detect_kind, load_model, load_tokenizer, read_model_config, resolve_model_path

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if not Path(args.adapter).is_dir():
        raise dorafit.AdapterFileError(f"adapter folder {args.adapter} does not exist")
    info = _load_task_info(args.adapter)
    model_path = resolve_model_path(args.model)
    config = read_model_config(model_path, args.trust_remote_code)
    kind = args.model_kind if args.model_kind != "auto" else info.get("model_kind") or detect_kind(model_path, config, "commonsense")
    labels = info.get("labels")
    model, _ = load_model(model_path, kind, args.trust_remote_code, num_labels=len(labels) if labels else None)
    dorafit.load_adapter(model, args.adapter)
    dorafit.merge(model)
    if hasattr(config, "use_cache"):  # load_model turns it off for training; the folder keeps the original's
        model.config.use_cache = config.use_cache
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def run(args) -> int:
    import dorafit
    from dorafit.train.models import ModelError

    try:
        out = merge_to_folder(args)
    except (ModelError, dorafit.AdapterFileError, dorafit.ConfigError, FileExistsError) as err:
        print(f"dorafit merge: error: {err}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0
