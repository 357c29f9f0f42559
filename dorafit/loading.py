"""The base model an adapter belongs to, loaded the one way every command loads it.

``load_base_for_adapter`` answers, for ``dorafit eval``, ``merge``, ``export``, ``convert`` and
``analyze`` alike:

1. which base: ``model`` if given, else the base the adapter records (dorafit's
   ``base_model.name_or_path``, PEFT's ``base_model_name_or_path``), else ``default_model``; a
   path that does not exist is an error (transformers would take it for a hub id);
2. built as what: the transformers class named by ``model_class`` if given, else the class of
   the model kind (``dorafit.train.kinds``): the one asked for, else the adapter's task.json,
   else the kind detected from the checkpoint's config (``detect_kind``);
3. its weights checked finite (a NaN or inf in the base is named, not met later as NaN outputs);
   the 4-bit step: the layers the adapter was trained on in 4-bit (QDoRA) are quantized exactly
   as in training (same quant type, block size, double quantization, compute dtype,
   ``quantize_like_adapter``), so the adapter meets the base it was trained with and never a
   full-precision one;
4. the adapter attached (``attach_adapter``; ``attach=False`` leaves the base bare, for ``analyze``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dorafit.train.config import DEFAULT_MODEL
from dorafit.train.models import ModelError, detect_kind, read_model_config, resolve_model_path

TASK_FILE = "task.json"


@dataclass
class LoadedBase:
    """A loaded base model and what was decided on the way."""

    model: object
    name: str  # the base as given or recorded (a folder, hf:// hub id or bundled name)
    path: str  # the local folder it was read from
    config: object  # its transformers config
    kind: object | None  # the ModelKind it was built for (None when built by class name)
    task_info: dict = field(default_factory=dict)  # the adapter's task.json ({} without one)
    quantized: list = field(default_factory=list)  # the base layers made 4-bit for the adapter


def read_task_info(adapter) -> dict:
    """The adapter folder's task.json (how ``dorafit train`` says to score it), or {} without one."""
    path = Path(adapter) / TASK_FILE if adapter else None
    if path and path.is_file():
        from dorafit.files import read_json_object

        return read_json_object(path)
    return {}


def check_local_model(name: str, flag: str = "--model") -> None:
    """A model given as a path (absolute, ./, ../ or ~) must exist: otherwise transformers takes
    it for a hub id and answers with a message about repository names."""
    if (os.path.isabs(name) or name.startswith((".", "~"))) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{flag} {name}: no such model folder")


def quantize_like_adapter(model, adapter, command: str) -> list:
    """Quantize the base layers the adapter was trained on in 4-bit exactly as in training
    (same quant type, block size, double quantization, compute dtype); returns the quantized
    module names. Refuses with a message saying how when bitsandbytes is missing."""
    import torch

    from dorafit import quant
    from dorafit.inject import _set_submodule
    from dorafit.io import read_adapter_config, recorded_quantization

    recorded = recorded_quantization(read_adapter_config(adapter))
    if not recorded:
        return []
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


def base_model_name(adapter=None, model: str | None = None, default_model: str | None = DEFAULT_MODEL,
                    model_flag: str = "--model") -> str:
    """The base to load: ``model``, else the one ``adapter`` records, else ``default_model``; a
    path among them must exist."""
    from dorafit.io import recorded_base_model

    name = model or (adapter and recorded_base_model(adapter)) or default_model
    if not name:
        raise ModelError(f"{adapter} does not record its base model: pass {model_flag} FOLDER_OR_HUB_ID")
    check_local_model(name, model_flag)
    return name


# PEFT's task_type -> the transformers auto class PEFT itself pairs with it.
_PEFT_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def recorded_model_class(adapter) -> str | None:
    """The transformers class an adapter records for its base: PEFT's ``auto_mapping`` /
    ``task_type``, dorafit's ``base_model.class``; None when it records none."""
    from dorafit.io import AdapterFileError, read_adapter_config

    try:
        cfg = read_adapter_config(adapter)
    except AdapterFileError:
        return None
    if "peft_type" in cfg:
        mapping = cfg.get("auto_mapping") or {}
        return mapping.get("base_model_class") or _PEFT_TASK_CLASSES.get(cfg.get("task_type"))
    return (cfg.get("base_model") or {}).get("class") or None


def _build_by_class(path: str, class_name: str | None, config, **kwargs):
    """``transformers.<class_name>.from_pretrained``; without a name, the checkpoint's own
    ``architectures`` entry, else ``AutoModel``."""
    import transformers

    if class_name:
        cls = getattr(transformers, class_name, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"{class_name!r} is not a transformers model class")
        return cls.from_pretrained(path, **kwargs)
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls.from_pretrained(path, **kwargs)
    return transformers.AutoModel.from_pretrained(path, **kwargs)


def load_base_for_adapter(adapter=None, *, model: str | None = None, default_model: str | None = DEFAULT_MODEL,
                          kind: str = "auto", by_class: bool = False, model_class: str | None = None,
                          data_format: str = "commonsense", dtype=None, trust_remote_code: bool = False,
                          device=None, attach: bool = True, trainable: bool = True, command: str = "eval",
                          model_flag: str = "--model") -> LoadedBase:
    """The base model of ``adapter`` (a local adapter folder, or None), built, quantized like the
    adapter and (``attach``) with the adapter attached (frozen with ``trainable=False``).

    Built as a model kind (``kind``: "auto" or a kind's name; ``data_format``: of the rows it
    will score, for detection), or with ``by_class`` as a plain transformers class:
    ``model_class``, else the one the adapter records, else the checkpoint's own. ``device`` is
    where the base is quantized and run (a 4-bit layer is quantized on the device it runs on,
    as in training); ``command`` and ``model_flag`` name the command and its base-model flag in
    error messages.
    """
    from dorafit.train.kinds import get_kind
    from dorafit.train.models import load_model

    info = read_task_info(adapter)
    name = base_model_name(adapter, model, default_model, model_flag)
    path = resolve_model_path(name)
    config = read_model_config(path, trust_remote_code)
    labels = info.get("labels")
    num_labels = {"num_labels": len(labels)} if labels else {}
    chosen = None
    if by_class or model_class:
        class_name = model_class or (adapter and recorded_model_class(adapter)) or None
        kwargs = {"dtype": dtype} if dtype is not None else {}
        base = _build_by_class(path, class_name, config, trust_remote_code=trust_remote_code, **num_labels, **kwargs)
    else:
        chosen = get_kind(kind if kind != "auto" else info.get("model_kind") or detect_kind(path, config, data_format))
        base, _ = load_model(path, chosen, trust_remote_code, dtype=dtype, **num_labels)
    base.eval()
    from dorafit.inject import check_finite_base

    check_finite_base(base)  # a NaN/inf in the base is named here, not met as NaN outputs
    loaded = LoadedBase(base, name, path, config, chosen, info)
    if device is not None:
        base.to(device)
    if adapter and attach:
        loaded.quantized = attach_adapter(base, adapter, command, trainable)
    return loaded


def attach_adapter(model, adapter, command: str = "eval", trainable: bool = True) -> list:
    """Load ``adapter`` onto its base ``model``, the layers it was trained on in 4-bit quantized
    first (``quantize_like_adapter``); returns the names of those layers."""
    import dorafit

    quantized = quantize_like_adapter(model, adapter, command)
    dorafit.load_adapter(model, adapter, trainable=trainable)
    return quantized
