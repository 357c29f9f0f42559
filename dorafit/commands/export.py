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

    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder (dorafit or PEFT format) or hub id")
    parser.add_argument("--to", default="lora", choices=["lora"], help="target format (default: lora)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of the exported LoRA")
    size.add_argument("--max-error", type=float,
                      help="choose the smallest rank whose overall relative weight error ‖ΔW − BA‖/‖ΔW‖ is at most this (e.g. 0.05)")
    parser.add_argument("--out", required=True, help="folder for the LoRA adapter")
    parser.add_argument("--model", default=None, help="base model folder or hub id (default: the base the adapter records)")
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


def export(args):
    from dorafit.export import export_lora

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    model, inputs = load_for_export(args)
    return export_lora(model, out, rank=args.rank, max_error=args.max_error, inputs=inputs)


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
