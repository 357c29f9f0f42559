"""``dorafit merge``: fold an adapter into its base model and save a plain transformers checkpoint.

The result is written with ``save_pretrained`` (safetensors) together with the tokenizer, to a
temporary folder renamed into place; ``AutoModel...from_pretrained(DIR)`` loads it without
dorafit and computes what the adapted model computes. An adapter trained on a 4-bit base is
merged into the base quantized the same way (then dequantized), so the merged model is the
trained one. ``--out`` may not be or overlap ``--adapter`` or ``--model``, and ``--overwrite``
replaces only a folder an earlier ``dorafit merge`` wrote (it carries dorafit's marker file).
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "merge an adapter into its base model and save a plain transformers checkpoint"


def add_arguments(parser) -> None:
    from dorafit.train.config import DEFAULT_MODEL, MODEL_KINDS

    parser.add_argument("--model", default=None,
                        help=f"base model folder or hf://owner/name (default: the base the adapter records, else {DEFAULT_MODEL})")
    parser.add_argument("--adapter", required=True, help="adapter folder (dorafit or PEFT format)")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--model-kind", default="auto", choices=MODEL_KINDS,
                        help="model class to load (default: the adapter's task.json, else detected)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")


MERGED_KIND = "merged"


def check_output(out: Path, adapter: Path, model: str, overwrite: bool) -> None:
    """Refuse an --out that is an input (or overlaps one), a link, or a folder dorafit did not make."""
    from dorafit.files import MARKER_NAME, check_output_folder, read_marker

    if out.exists() and not out.is_dir() and not out.is_symlink():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    check_output_folder(out, [("--adapter", adapter), ("--model", model)], "--out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if read_marker(out) != MERGED_KIND:
            raise FileExistsError(f"--overwrite: {out} is not a merged model written by dorafit merge (no {MARKER_NAME} "
                                  "marker); not replacing it")


def merge_to_folder(args) -> Path:
    import dorafit
    from dorafit.files import atomic_directory, write_marker
    from dorafit.loading import base_model_name, load_base_for_adapter
    from dorafit.remote import resolve_adapter_path
    from dorafit.train.models import load_tokenizer

    out, adapter = Path(args.out), resolve_adapter_path(args.adapter)  # hf://owner/name, or a local folder
    if not adapter.is_dir():
        raise dorafit.AdapterFileError(f"adapter folder {args.adapter} does not exist")
    model_name = base_model_name(adapter, args.model)
    check_output(out, adapter, model_name, args.overwrite)
    loaded = load_base_for_adapter(adapter, model=model_name, kind=args.model_kind,
                                   trust_remote_code=args.trust_remote_code, command="merge")
    model, config = loaded.model, loaded.config
    dorafit.merge(model)
    if hasattr(config, "use_cache"):  # load_model turns it off for training; the folder keeps the original's
        model.config.use_cache = config.use_cache
    tokenizer = load_tokenizer(loaded.path, args.trust_remote_code)
    replaced = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, MERGED_KIND)
    if replaced:
        print(f"--overwrite: replaced the previous merged model in {out} ({', '.join(replaced)})", file=sys.stderr)
    return out


def run(args) -> int:
    import dorafit
    from dorafit.train.models import ModelError

    try:
        out = merge_to_folder(args)
    except (ModelError, dorafit.AdapterFileError, dorafit.ConfigError, FileExistsError, ValueError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dorafit merge: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0
