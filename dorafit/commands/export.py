"""``dorafit export``: an adapter in the form a serving engine reads.

    dorafit export ADAPTER --to lora --rank R --out DIR            a plain LoRA (PEFT folder)
    dorafit export ADAPTER --to lora --max-error 0.05 --out DIR
    dorafit export ADAPTER --to lora --rank R --format gguf --out FILE.gguf   llama.cpp's LoRA file
    dorafit export ADAPTER --to dora-normalized --out DIR [--check BASE]      TensorRT-LLM's DoRA
    dorafit export ADAPTER --to gguf --out FILE.gguf [--quant f16|bf16|q8_0|f32|source]

Loads the base model (by default the one the adapter records; for an adapter trained on a
4-bit base, quantized the same way: ``dorafit.loading``) and attaches the adapter; then:

- ``lora``: the rank-R truncated-SVD LoRA of every layer's W' − W0 with one rank and one scale
  for every reader (``dorafit.export``); prints the weight error per layer and overall and the
  logits drift on a few prompts (the last hidden state for a model without an output head).
- ``dora-normalized``: PEFT's layout with g = m / ‖W0 + s B A‖ in the magnitude's place, computed
  against the base in the dtype the adapter records; ``--check BASE`` loads the base an engine
  will serve (re-quantized, another dtype) and prints how far serving g on it drifts.
- ``gguf``: the merged model as one GGUF file (``dorafit.gguf_export``): a GGUF-sourced base
  keeps every key and tensor of its file but the adapted ones; a llama-family folder is
  written from the gguf package's tables; other architectures are refused.

``dorafit merge`` stays the exact path to a transformers folder. An output never replaces or
lies inside an input (the adapter, the base's folder, its GGUF file).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

HELP = "write an adapter for serving engines: plain LoRA, pre-normalized DoRA, or a merged GGUF file"

DEFAULT_PROMPTS = [
    "Question: Which gas do plants take in from the air to make food? Answer:",
    "The boiling point of water at sea level is",
    "Write one sentence about the moon.",
    "Which tool measures temperature: a thermometer or a ruler?",
]
TARGETS = ("lora", "dora-normalized", "gguf")


def add_arguments(parser) -> None:
    from dorafit.gguf_export import QUANTS
    from dorafit.train.config import MODEL_KINDS

    parser.add_argument("adapter", metavar="ADAPTER", help="adapter folder (dorafit or PEFT format) or hf://owner/name")
    parser.add_argument("--to", default="lora", choices=TARGETS,
                        help="lora: plain LoRA (truncated SVD); dora-normalized: TensorRT-LLM's pre-normalized DoRA; "
                             "gguf: the merged model as one GGUF file (default: lora)")
    parser.add_argument("--out", required=True, help="the output folder (lora, dora-normalized) or .gguf file")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="--to lora: rank of the exported LoRA")
    size.add_argument("--max-error", type=float,
                      help="--to lora: the smallest rank whose overall relative weight error ‖ΔW − BA‖/‖ΔW‖ is at most "
                           "this (e.g. 0.05)")
    parser.add_argument("--format", default="peft", choices=("peft", "gguf"),
                        help="--to lora: a PEFT folder, or a llama.cpp LoRA file (.gguf, llama-family base) (default: peft)")
    parser.add_argument("--quant", default="f16", choices=QUANTS,
                        help="--to gguf: type of the merged tensors; source: like the source GGUF file's (default: f16)")
    parser.add_argument("--check", metavar="BASE", default=None,
                        help="--to dora-normalized: a serving base (folder, .gguf, name) to report the drift on")
    parser.add_argument("--model", default=None, help="base model folder, .gguf file or hf://owner/name (default: the "
                                                      "base the adapter records)")
    parser.add_argument("--model-kind", default="auto", choices=MODEL_KINDS,
                        help="model class to load (default: the adapter's task.json, else detected)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt for the drift checks (repeatable; default: four built-in prompts)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out that an earlier dorafit export wrote")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")


def load_for_export(args, dtype=None):
    """(the loaded base with the adapter attached, frozen, in eval mode; the tokenized prompts).
    An adapter trained on a 4-bit base meets the base quantized the same way."""
    import dorafit
    from dorafit.loading import load_base_for_adapter
    from dorafit.remote import resolve_adapter_path
    from dorafit.train.models import load_tokenizer

    adapter = resolve_adapter_path(args.adapter)
    if not adapter.is_dir():
        raise dorafit.AdapterFileError(f"adapter folder {args.adapter} does not exist")
    loaded = load_base_for_adapter(adapter, model=args.model, kind=args.model_kind, dtype=dtype,
                                   trust_remote_code=args.trust_remote_code, trainable=False, command="export")
    tokenizer = load_tokenizer(loaded.path, args.trust_remote_code)
    inputs = [loaded.kind.prompt_inputs(tokenizer, prompt) for prompt in args.prompt or DEFAULT_PROMPTS]
    return loaded, inputs


EXPORT_KIND = "export"


def check_output(out: Path, inputs, overwrite: bool, file: bool = False) -> None:
    """Refuse an --out that is a link, an input (the adapter, the base's folder, its GGUF file) or
    inside one, or that exists already: with --overwrite, only a folder or GGUF file an earlier
    ``dorafit export`` wrote (its marker file; the GGUF file's ``dorafit.version`` key)."""
    from dorafit.files import MARKER_NAME, check_output_file, check_output_folder, read_marker
    from dorafit.gguf_export import written_by_dorafit

    if file:
        check_output_file(out, inputs, "--out")
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
            if not written_by_dorafit(out):
                raise FileExistsError(f"--overwrite: {out} is not a GGUF file dorafit export wrote (no dorafit.version "
                                      "key); not replacing it")
        return
    if out.exists() and not out.is_dir() and not out.is_symlink():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    check_output_folder(out, inputs, "--out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if read_marker(out) != EXPORT_KIND:
            raise FileExistsError(f"--overwrite: {out} is not a folder dorafit export wrote (no {MARKER_NAME} marker); "
                                  "not writing into it")


def _inputs(args) -> list:
    """(option, path) of what an export reads: the adapter, the base's folder and its GGUF file."""
    from dorafit.gguf_export import gguf_source
    from dorafit.loading import base_model_name
    from dorafit.remote import resolve_adapter_path
    from dorafit.train.models import resolve_model_path

    adapter = resolve_adapter_path(args.adapter)
    name = base_model_name(adapter, args.model)
    source = gguf_source(name)
    folder = resolve_model_path(name) if source is None else None  # (a GGUF base: its converted cache folder)
    return [("ADAPTER", str(adapter)), ("--model", name), ("the base's folder", folder),
            ("the base's GGUF file", str(source) if source else None)]


def _mark(out: Path) -> None:
    from dorafit.files import write_marker

    write_marker(out, EXPORT_KIND)  # --overwrite may replace this folder later, and no other


def export_lora(args) -> str:
    from dorafit.export import export_lora as run_export

    if args.rank is None and args.max_error is None:
        raise ValueError("--to lora needs --rank R or --max-error E")
    out = Path(args.out)
    if args.format == "gguf" and out.suffix.lower() != ".gguf":
        raise ValueError(f"--format gguf writes one file: --out must end in .gguf, got {out}")
    check_output(out, _inputs(args), args.overwrite, file=args.format == "gguf")
    loaded, inputs = load_for_export(args)
    report = run_export(loaded.model, out, rank=args.rank, max_error=args.max_error, inputs=inputs, format=args.format)
    if args.format != "gguf":
        _mark(out)
    kind = "llama.cpp LoRA file" if args.format == "gguf" else "PEFT format"
    return f"{report}\nLoRA adapter (rank {report.rank}, one scale for every layer, {kind}) written to {report.path}"


def _recorded_dtype(adapter):
    """The dtype the adapter records for its base's weights (one for all modules), or None."""
    import torch

    from dorafit.io import adapter_record
    from dorafit.remote import resolve_adapter_path

    modules = adapter_record(resolve_adapter_path(adapter)).get("modules") or {}
    dtypes = {rec.get("base_dtype") for rec in modules.values() if isinstance(rec, dict)} - {None}
    if len(dtypes) == 1:
        dtype = getattr(torch, dtypes.pop(), None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    return None


def export_normalized(args) -> str:
    import copy

    import dorafit
    from dorafit.export import check_dora_normalized, export_dora_normalized

    out = Path(args.out)
    check_output(out, _inputs(args), args.overwrite)
    loaded, inputs = load_for_export(args, dtype=_recorded_dtype(args.adapter))
    path = export_dora_normalized(loaded.model, out)
    _mark(out)
    lines = [f"pre-normalized DoRA (g = m / ‖W0 + s B A‖, float32, against the base {loaded.name}) written to {path}"]
    if args.check:
        from dorafit.loading import load_base_for_adapter

        serving = load_base_for_adapter(None, model=args.check, kind=loaded.kind.name, trust_remote_code=args.trust_remote_code,
                                        command="export").model
        with warnings.catch_warnings():  # the mismatch is what is measured here
            warnings.simplefilter("ignore", UserWarning)
            served = dorafit.load_adapter(copy.deepcopy(serving), path, trainable=False, allow_base_mismatch=True)
        recomputed = dorafit.load_adapter(serving, args.adapter, trainable=False)
        report = check_dora_normalized(loaded.model, served, recomputed, inputs)
        lines += [f"served on {args.check} (g as exported, what the engine computes there):",
                  f"  logits drift ‖L_served − L_tuned‖ / ‖L_tuned‖        {100 * report.drift:.4f}%",
                  f"  relative to the fine-tune's change                  {100 * report.drift_of_change:.3f}%",
                  f"  with g recomputed on that base (merging there)       {100 * report.drift_recomputed:.4f}%"]
    return "\n".join(lines)


def export_gguf(args) -> str:
    from dorafit.gguf_export import export_gguf as run_export
    from dorafit.gguf_export import gguf_source

    out = Path(args.out)
    if out.suffix.lower() != ".gguf":
        raise ValueError(f"--to gguf writes one file: --out must end in .gguf, got {out}")
    check_output(out, _inputs(args), args.overwrite, file=True)
    loaded, _ = load_for_export(args)
    source = gguf_source(loaded.name)
    written = run_export(loaded.model, out, quant=args.quant, source=source,
                         folder=None if source else loaded.path, progress=True)
    kinds = sorted(set(written.values()))
    origin = f"the tensors of {source} with the {len(written)} adapted ones replaced" if source else \
        f"{len(written)} tensors built from {loaded.path}"
    return f"merged GGUF ({origin}; written as {', '.join(kinds)}) written to {out} ({out.stat().st_size / 2**20:.1f} MiB)"


def run(args) -> int:
    import dorafit
    from dorafit.gguf_export import GGUFExportError
    from dorafit.train.models import ModelError

    action = {"lora": export_lora, "dora-normalized": export_normalized, "gguf": export_gguf}[args.to]
    try:
        message = action(args)
    except (ModelError, dorafit.AdapterFileError, dorafit.AdapterError, dorafit.ConfigError, GGUFExportError,
            FileExistsError, ValueError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"dorafit export: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(message)
    return 0
