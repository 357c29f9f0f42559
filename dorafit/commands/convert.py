"""``dorafit convert SRC DST --to peft|dorafit --model BASE``: convert an adapter directory
between dorafit's format and Hugging Face PEFT's.

The conversion goes through the base model: the adapter is loaded onto it (which checks every
module, key, shape and option against the real model) and saved in the other format. Going
through the model is what tells a GPT-2 ``Conv1D`` from a ``Linear``, resolves PEFT's target
and pattern rules, and turns an adapter for another base into an error instead of a file.
The base weights themselves are not written anywhere.

Which transformers class to build: ``--model-class`` if given, else the class recorded in the
adapter (PEFT's ``auto_mapping`` / ``task_type``, dorafit's ``base_model.class``), else the
checkpoint's own ``architectures`` entry, else ``AutoModel``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Optional

HELP = "convert an adapter between the dorafit and PEFT formats (loads the base model to check it)"

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="adapter directory to read (dorafit or PEFT format)")
    parser.add_argument("dst", metavar="DST", help="adapter directory to write")
    parser.add_argument("--to", required=True, choices=("peft", "dorafit"), help="format to write")
    parser.add_argument(
        "--model",
        default=None,
        help="base model folder or hf://owner/name the adapter belongs to (default: the base recorded in SRC)",
    )
    parser.add_argument(
        "--model-class",
        default=None,
        help="transformers class to build the base with, e.g. AutoModelForCausalLM (default: from SRC or the checkpoint)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=_DTYPES,
        help="dtype to load the base weights in (adapter tensors keep their own dtype; default: the checkpoint's)",
    )
    parser.add_argument("--force", action="store_true",
                        help="write into a DST folder that holds files (only the adapter's two files are replaced)")


def _fail(message: str) -> int:
    print(f"dorafit convert: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _source_format(cfg: Dict[str, Any]) -> Optional[str]:
    if "peft_type" in cfg:
        return "peft"
    if cfg.get("format") == "dorafit":
        return "dorafit"
    return None


def run(args: argparse.Namespace) -> int:
    import dorafit
    from dorafit.io import AdapterFileError, read_adapter_config

    from dorafit.remote import resolve_adapter_path

    try:
        src, dst = resolve_adapter_path(args.src), Path(args.dst)  # hf://owner/name, or a local folder
        cfg = read_adapter_config(src)
    except AdapterFileError as exc:
        if getattr(args, "debug", False):
            raise
        return _fail(str(exc))
    fmt = _source_format(cfg)
    if fmt is None:
        return _fail(f"{src / 'adapter_config.json'} is neither a dorafit nor a PEFT adapter config")
    if fmt == args.to:
        return _fail(f"{src} is already in the {fmt} format")
    from dorafit.files import OutputPathError, check_output_folder

    if dst.exists() and not dst.is_dir() and not dst.is_symlink():
        return _fail(f"DST {dst} is a file, not a folder")
    try:
        check_output_folder(dst, [("SRC", src)], "DST")
    except (OutputPathError, FileExistsError) as exc:
        return _fail(str(exc))
    if dst.exists() and not args.force and any(dst.iterdir()):
        return _fail(f"{dst} exists; pass --force to write the adapter files into it")
    import torch

    from dorafit.loading import attach_adapter, base_model_name, load_base_for_adapter, recorded_model_class

    try:
        model = base_model_name(src, args.model, default_model=None)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    try:
        check_output_folder(dst, [("the base model folder", model)], "DST")
    except OutputPathError as exc:
        return _fail(str(exc))

    class_name = args.model_class or recorded_model_class(src) or "the checkpoint's class"
    print(f"loading base model {model} as {class_name} (dtype {args.dtype})", file=sys.stderr)
    try:
        base = load_base_for_adapter(src, model=model, by_class=True, model_class=args.model_class,
                                     dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
                                     attach=False).model
    except (OSError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        return _fail(f"cannot load base model {model!r}: {exc}")

    try:
        attach_adapter(base, src, "convert")
        dorafit.save_adapter(base, dst, format=args.to)
    except (ValueError, OSError) as exc:  # AdapterFileError, PeftFormatError, ConfigError, AdapterError
        if getattr(args, "debug", False):
            raise
        return _fail(str(exc))
    adapters = dorafit.adapter_modules(base)
    methods = sorted({a.method for _, a in adapters})
    print(f"wrote {dst} ({args.to} format): {len(adapters)} adapted modules, method {', '.join(methods)}")
    return 0
