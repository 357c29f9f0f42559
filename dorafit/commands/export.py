"""``dorafit export``: an adapter as a plain LoRA adapter (PEFT format) for serving engines.

    dorafit export ADAPTER --to lora --rank R --out DIR
    dorafit export ADAPTER --to lora --max-error 0.05 --out DIR

Loads the base model (by default the one the adapter records; for an adapter trained on a
4-bit base, quantized the same way: ``dorafit.loading``), attaches the adapter, writes
the rank-R truncated-SVD LoRA of every layer's W' − W0 (``dorafit.export``) and prints the
relative weight error per layer and overall and the logits drift on a few prompts (the last
hidden state for a model without an output head). ``dorafit merge`` stays the exact path.
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "write an adapter as a plain LoRA adapter (no magnitude) for LoRA-only serving engines"

DEFAULT_PROMPTS = [
    "Question: Which gas do plants take in from the air to make food? Answer:",
    "The boiling point of water at sea level is",
    "Write one sentence about the moon.",
    "Which tool measures temperature: a thermometer or a ruler?",
]


def add_arguments(parser) -> None:
    from dorafit.train.config import MODEL_KINDS

    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder (dorafit or PEFT format) or hf://owner/name")
    parser.add_argument("--to", default="lora", choices=["lora"], help="target format (default: lora)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of the exported LoRA")
    size.add_argument("--max-error", type=float,
                      help="choose the smallest rank whose overall relative weight error ‖ΔW − BA‖/‖ΔW‖ is at most this (e.g. 0.05)")
    parser.add_argument("--out", required=True, help="folder for the LoRA adapter")
    parser.add_argument("--model", default=None, help="base model folder or hf://owner/name (default: the base the adapter records)")
    parser.add_argument("--model-kind", default="auto", choices=MODEL_KINDS,
                        help="model class to load (default: the adapter's task.json, else detected)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt for the logits-drift check (repeatable; default: four built-in prompts)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")


def load_for_export(args):
    """(the base model with the adapter attached, frozen, in eval mode; the tokenized prompts).
    An adapter trained on a 4-bit base meets the base quantized the same way."""
    import dorafit
    from dorafit.loading import load_base_for_adapter
    from dorafit.remote import resolve_adapter_path
    from dorafit.train.models import load_tokenizer

    adapter = resolve_adapter_path(args.adapter)
    if not adapter.is_dir():
        raise dorafit.AdapterFileError(f"adapter folder {args.adapter} does not exist")
    loaded = load_base_for_adapter(adapter, model=args.model, kind=args.model_kind,
                                   trust_remote_code=args.trust_remote_code, trainable=False, command="export")
    tokenizer = load_tokenizer(loaded.path, args.trust_remote_code)
    inputs = [loaded.kind.prompt_inputs(tokenizer, prompt) for prompt in args.prompt or DEFAULT_PROMPTS]
    return loaded.model, inputs


EXPORT_KIND = "export"


def check_output(out: Path, adapter: str, model: str | None, overwrite: bool) -> None:
    """Refuse an --out that is a link, an input or inside one, or that holds files: with --overwrite,
    only a folder an earlier ``dorafit export`` wrote (it carries dorafit's marker file)."""
    from dorafit.files import MARKER_NAME, check_output_folder, read_marker

    if out.exists() and not out.is_dir() and not out.is_symlink():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    check_output_folder(out, [("ADAPTER", adapter), ("--model", model)], "--out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if read_marker(out) != EXPORT_KIND:
            raise FileExistsError(f"--overwrite: {out} is not a folder dorafit export wrote (no {MARKER_NAME} marker); "
                                  "not writing into it")


def export(args):
    from dorafit.export import export_lora
    from dorafit.files import write_marker
    from dorafit.loading import base_model_name
    from dorafit.remote import resolve_adapter_path

    out = Path(args.out)
    adapter = resolve_adapter_path(args.adapter)
    check_output(out, str(adapter), base_model_name(adapter, args.model), args.overwrite)
    model, inputs = load_for_export(args)
    report = export_lora(model, out, rank=args.rank, max_error=args.max_error, inputs=inputs)
    write_marker(out, EXPORT_KIND)  # --overwrite may replace this folder later, and no other
    return report


def run(args) -> int:
    import dorafit
    from dorafit.train.models import ModelError

    try:
        report = export(args)
    except (ModelError, dorafit.AdapterFileError, dorafit.AdapterError, dorafit.ConfigError, FileExistsError, ValueError) as err:
        print(f"dorafit export: error: {err}", file=sys.stderr)
        return 2
    print(report)
    print(f"LoRA adapter (rank {report.rank}, PEFT format) written to {report.path}")
    return 0
