"""Writing GGUF files (llama.cpp, Ollama, LM Studio): a merged model, or a LoRA adapter.

**Merged model.** Every adapted layer's weight becomes W' = g ⊙ (W0 + s B A) (DoRA; W0 + s B A
for LoRA; dorafit.merge's formula, float32), modules_to_save copies their trained values:

- *GGUF-sourced base* (the default model, any ``.gguf`` ``--model``): the source file is copied
  key by key and tensor by tensor, and only the tensors of adapted modules are replaced. Each of
  those is first matched against the source: the base weight W0 the model holds must equal the
  source tensor dequantized, as it is or in llama.cpp's rotary row order (below). That checks the
  file is the adapter's base and finds how the tensor is laid out, for any architecture the
  ``gguf`` package names.
- *transformers folder of the llama family* (``model_type`` llama or mistral): the whole file is
  built from the ``gguf`` package's tables: tensor names (``TensorNameMap``), metadata keys
  (``gguf.Keys``), the tokenizer (``gguf.vocab``: byte-level BPE, or Llama's byte-fallback
  tokenizer.json; special tokens, merges, chat template). The pre-tokenizer name llama.cpp
  keys on is not in those tables: such files say "default" (a warning names it). Other
  architectures are refused: merge the adapter and convert the folder with llama.cpp's own
  converter.

Rotary row order: transformers' LLaMA rotates the two halves of each head, llama.cpp pairs of
neighbouring rows; llama.cpp's converter reorders the rows of q and k per head,
row (h, half, i) -> (h, i, half), with the head counts of q (n_head) and k (n_head_kv).

Quantization (``quant``): "f32", "f16", "bf16", "q8_0" (the replaced tensors, or for a folder
every tensor but the 1-D norms, which stay float32), or "source": each replaced tensor in the
type the source file has for it (Q4_1 for the default model; the gguf package quantizes the
legacy block types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the float types; a K-quant source tensor is
refused with the types to pick instead). A tensor whose rows do not split into the type's
blocks is written as f16 (llama.cpp's converter does the same).

**LoRA adapter** (llama.cpp's format, read with ``--lora`` beside the base GGUF): general.type
"adapter", adapter.type "lora", adapter.lora.alpha; per layer "<base tensor>.lora_a" (r, in) and
"<base tensor>.lora_b" (out, r), B's rows in the base tensor's order. llama.cpp scales a layer
by alpha / r with r from the layer's own tensors; the files ``dorafit.export`` hands over have
one rank and alpha = r, so that is 1 for every layer.

Files are written to a temporary name beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .files import is_same_or_inside, write_file_atomic
from .inject import ModulesToSave, adapter_modules
from .layers import AdapterError, LinearAdapter

QUANTS = ("f32", "f16", "bf16", "q8_0", "source")
KEPT_WARNING = 0.5  # warn when a block quantization keeps less of the fine-tune's change than this
VERSION_KEY = "dorafit.version"  # in every file dorafit writes: --overwrite replaces only those
LLAMA_FAMILY = ("llama", "mistral")


class GGUFExportError(ValueError):
    """A model, adapter or option that cannot be written as GGUF; the message says why."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("writing GGUF needs the gguf package: pip install gguf") from None
    return gguf


# ------------------------------------------------------------------------------------------------
# Tensor encoding
def rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q / k: per head, row (half, i) -> (i, half)."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GGUFExportError(f"a tensor of {rows} rows cannot be split into {n_head} rotary heads")
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _qtype(name: str):
    gguf = _gguf()
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def encode(array: np.ndarray, qtype) -> Tuple[np.ndarray, object]:
    """(data, raw type) of a float32 array in GGML type ``qtype``; rows that do not split into the
    type's blocks fall back to f16. Raises GGUFExportError for a type the gguf package cannot write."""
    gguf = _gguf()
    array = np.ascontiguousarray(array, dtype=np.float32)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16
    try:
        data = gguf.quants.quantize(array, qtype)
    except NotImplementedError:
        raise GGUFExportError(f"the gguf package cannot write {qtype.name} tensors; choose --quant q8_0, f16, bf16 or f32") from None
    return data, qtype


def dequantized(tensor) -> np.ndarray:
    """A GGUF reader tensor as float32 in numpy order (rows first)."""
    gguf = _gguf()
    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise GGUFExportError(f"tensor {tensor.name}: the gguf package cannot read {tensor.tensor_type.name}") from None


# ------------------------------------------------------------------------------------------------
# The merged tensors of an adapted model, in transformers' names and layout
def replaced_tensors(model: nn.Module) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """{"<module>.<param>": (merged value float32, base value W0 or None)} for every adapted
    layer's weight and every modules_to_save copy's parameters, layout of the base module."""
    out: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    with torch.no_grad():
        for name, adapter in adapter_modules(model):
            merged = adapter.merged_weight_2d().float()
            if not isinstance(adapter, LinearAdapter):
                merged = adapter.weight_from_2d(merged).float()
            base = adapter.base.weight
            w0 = base.detach().float() if base.dtype.is_floating_point else None  # a 4-bit weight is packed
            out[f"{name}.weight"] = (merged, w0)
        for name, module in model.named_modules():
            if isinstance(module, ModulesToSave):
                original = dict(module.original.named_parameters())
                for key, value in module.trainable.named_parameters():
                    out[f"{name}.{key}"] = (value.detach().float(), original[key].detach().float())
    return out


# ------------------------------------------------------------------------------------------------
# Source-file route
@dataclass
class _Match:
    gguf_name: str
    rotary_heads: Optional[int]  # None: the source keeps transformers' row order


def _source_heads(reader) -> Tuple[Optional[int], Optional[int]]:
    arch = _field(reader, "general.architecture")
    return _field(reader, f"{arch}.attention.head_count"), _field(reader, f"{arch}.attention.head_count_kv")


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value


def _match_source(name: str, w0: Optional[torch.Tensor], tensor, heads: Tuple[Optional[int], Optional[int]],
                  source: Path) -> _Match:
    """How the source stores this parameter: as it is, or in rotary row order; checked against the
    base weight the model holds (the adapter's base must be this file)."""
    if w0 is None:
        raise GGUFExportError(f"{name}: the base weight is packed (4-bit), so it cannot be checked against {source.name}; "
                              "export from a model whose base is the GGUF file's weights")
    want = w0.numpy()
    got = dequantized(tensor)
    if got.shape != want.shape:
        raise GGUFExportError(f"{name}: shape {tuple(want.shape)} in the model but {tuple(got.shape)} for tensor "
                              f"{tensor.name} in {source}: the file is not the adapter's base")
    if np.array_equal(got, want):
        return _Match(tensor.name, None)
    for n_head in dict.fromkeys(h for h in heads if h):
        if want.shape[0] % (2 * n_head) == 0 and np.array_equal(got, rotary_rows(want, n_head)):
            return _Match(tensor.name, n_head)
    err = float(np.abs(got - want).max())
    raise GGUFExportError(f"{name}: the model's base weight differs from tensor {tensor.name} of {source} (max "
                          f"difference {err:.3g}): the adapter was not loaded onto this file's weights")


def _name_map(arch: str, blocks: int):
    gguf = _gguf()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise GGUFExportError(f"architecture {arch!r} is not known to the gguf package")
    return gguf.get_tensor_name_map(by_name[arch], blocks)


def _gguf_name(tmap, hf_name: str) -> Optional[str]:
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _copy_fields(reader, writer, skip=()) -> None:
    """Every key of the source file but the reader's own (GGUF.*) and general.architecture."""
    gguf = _gguf()
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE or key in skip:
            continue
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.ARRAY:
            raise GGUFExportError(f"key {key}: nested arrays are not copied")
        writer.add_key_value(key, field.contents(), main, sub_type=sub)


def _file_type_of(sizes: Dict[object, int]):
    """general.file_type for the tensor type that holds most of the 2-D weights."""
    gguf = _gguf()
    major = max(sizes, key=sizes.get)
    names = {gguf.GGMLQuantizationType.F32: "ALL_F32", gguf.GGMLQuantizationType.F16: "MOSTLY_F16",
             gguf.GGMLQuantizationType.BF16: "MOSTLY_BF16"}
    return getattr(gguf.LlamaFileType, names.get(major, f"MOSTLY_{major.name}"), None)


def _write_merged_from_source(model: nn.Module, source: Path, tmp: Path, quant: str, progress: bool) -> Dict[str, str]:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    arch = _field(reader, "general.architecture")
    blocks = _field(reader, f"{arch}.block_count") or 0
    tmap = _name_map(arch, int(blocks))
    tensors = {t.name: t for t in reader.tensors}
    heads = _source_heads(reader)
    replaced = replaced_tensors(model)
    plan: Dict[str, Tuple[str, torch.Tensor, torch.Tensor, _Match]] = {}
    for name, (merged, w0) in replaced.items():
        gname = _gguf_name(tmap, name)
        if gname is None or gname not in tensors:
            raise GGUFExportError(f"{name}: no tensor {gname or '(unnamed)'} in {source} for it (an adapted tied "
                                  "embedding or output head, or a module the file does not have)")
        plan[gname] = (name, merged, w0, _match_source(name, w0, tensors[gname], heads, source))
    writer = gguf.GGUFWriter(str(tmp), arch)
    _copy_fields(reader, writer, skip=(gguf.Keys.General.FILE_TYPE, VERSION_KEY))
    _add_version(writer)
    sizes: Dict[object, int] = {}
    types: Dict[str, str] = {}
    kept = _KeptChange()
    bar = _progress(len(reader.tensors), "GGUF tensors", progress)
    for tensor in reader.tensors:
        if tensor.name in plan:
            name, merged, w0, match = plan[tensor.name]
            array, base = merged.numpy(), w0.numpy()
            if match.rotary_heads:
                array, base = rotary_rows(array, match.rotary_heads), rotary_rows(base, match.rotary_heads)
            if quant == "source":
                qtype = tensor.tensor_type
                if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and \
                        qtype not in _writable_types():
                    raise GGUFExportError(f"{tensor.name} is {qtype.name} in {source}, which the gguf package cannot "
                                          "quantize: choose --quant q8_0, f16, bf16 or f32")
            else:
                qtype = _qtype(quant)
            data, qtype = encode(array, qtype)
            writer.add_tensor(tensor.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
            types[tensor.name] = qtype.name
            if qtype in _block_types():
                kept.add(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32), array, base, qtype.name)
        else:
            qtype = tensor.tensor_type
            writer.add_tensor(tensor.name, tensor.data, raw_shape=None, raw_dtype=qtype)
        if len(tensor.shape) > 1:
            sizes[qtype] = sizes.get(qtype, 0) + int(tensor.n_elements)
        bar.update(1)
    bar.close()
    file_type = _file_type_of(sizes)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    _finish(writer, progress)
    kept.warn()
    return types


def _block_types():
    q = _gguf().GGMLQuantizationType
    return (q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.Q8_0)


class _KeptChange:
    """How much of the fine-tune's change W' - W0 a block quantization keeps, over all replaced
    tensors: the projection <Q(W') - W0, W' - W0> / ||W' - W0||^2 (1: all of it; 0: the file
    holds the base). A 4-bit grid's step is often wider than a fine-tune's change, which then
    rounds back to the base; that is worth one line rather than a silently lost fine-tune."""

    def __init__(self):
        self.dot, self.norm, self.types = 0.0, 0.0, set()

    def add(self, written: np.ndarray, merged: np.ndarray, base: np.ndarray, qtype: str) -> None:
        change = merged.astype(np.float64) - base
        self.dot += float(((written - base) * change).sum())
        self.norm += float((change * change).sum())
        self.types.add(qtype)

    @property
    def share(self) -> Optional[float]:
        return self.dot / self.norm if self.norm > 0 else None

    def warn(self) -> None:
        if self.share is not None and self.share < KEPT_WARNING:
            warnings.warn(
                f"re-quantized as {', '.join(sorted(self.types))}, the adapted tensors keep {int(round(100 * self.share))}% of the "
                "fine-tune's change (most of it is smaller than the type's step and rounds back to the base): serve "
                "the original file with the LoRA export beside it (--to lora --format gguf), or use --quant q8_0",
                stacklevel=6)  # the caller of export_gguf


def _writable_types():
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    return (q.F32, q.F16, q.BF16, q.Q4_0, q.Q4_1, q.Q5_0, q.Q5_1, q.Q8_0)


def _add_version(writer) -> None:
    from . import __version__

    writer.add_string(VERSION_KEY, __version__)


def written_by_dorafit(path: Union[str, os.PathLike]) -> bool:
    """Whether the GGUF file ``path`` was written by dorafit (it carries ``VERSION_KEY``)."""
    gguf = _gguf()
    try:
        return VERSION_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file at all
        return False


def _finish(writer, progress: bool) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# transformers-folder route (llama family)
def _plain_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's parameters as the merged checkpoint holds them (float32), transformers' names."""
    from .interop import _base_names

    replaced = replaced_tensors(model)
    state: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, module in _base_names(model):
        for key, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied weight (the output head): written once, under its first name
                continue
            seen.add(id(param))
            full = f"{name}.{key}"
            state[full] = replaced[full][0] if full in replaced else param.detach().float()
    return state


def _llama_metadata(writer, config, file_type) -> None:
    gguf = _gguf()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in (None, "default"):
        if kind != "linear":
            raise GGUFExportError(f"rope_scaling {kind!r} is not written by dorafit; merge the adapter (dorafit merge) and "
                                  "convert the folder with llama.cpp's convert_hf_to_gguf.py")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer_metadata(writer, folder: Path, vocab_size: int) -> None:
    """Tokens, types, merges and special tokens from the folder's tokenizer files (gguf.vocab)."""
    gguf = _gguf()
    vocab = None
    for cls in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = cls(folder)
            break
        except (FileNotFoundError, TypeError, OSError):
            continue
    if vocab is None:
        raise GGUFExportError(f"{folder}: no tokenizer the gguf package reads (a byte-level BPE or a Llama "
                              "byte-fallback tokenizer.json); a SentencePiece-only tokenizer.model needs llama.cpp's converter")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(int(kind))
    special = _special_tokens(folder)
    for i, text in enumerate(tokens):
        if text in special:
            types[i] = int(gguf.TokenType.CONTROL if special[text] else gguf.TokenType.USER_DEFINED)
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"{folder}: the tokenizer has {len(tokens)} tokens, the model's vocabulary {vocab_size}")
    for i in range(len(tokens), vocab_size):  # rows of the embedding no token uses
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
        warnings.warn("the GGUF file names llama.cpp's 'default' pre-tokenizer (the gguf package has no table of "
                      "pre-tokenizers); if llama.cpp tokenizes differently from transformers, convert the merged "
                      "folder with llama.cpp's convert_hf_to_gguf.py, which knows them", UserWarning, stacklevel=4)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _special_tokens(folder: Path) -> Dict[str, bool]:
    """{added token text: special?} from tokenizer.json."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {t["content"]: bool(t.get("special")) for t in data.get("added_tokens") or [] if isinstance(t, dict) and "content" in t}


def _write_merged_from_folder(model: nn.Module, folder: Path, tmp: Path, quant: str, progress: bool) -> Dict[str, str]:
    gguf = _gguf()
    config = model.config
    if getattr(config, "model_type", None) not in LLAMA_FAMILY:
        raise GGUFExportError(f"GGUF export from a transformers folder covers the llama family ({', '.join(LLAMA_FAMILY)}); "
                              f"this model is {getattr(config, 'model_type', type(model).__name__)!r}: merge the adapter "
                              "(dorafit merge) and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    if quant == "source":
        dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32").replace("torch.", "")
        quant = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(dtype, "f32")
    qtype = _qtype(quant)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(folder.name)
    _add_version(writer)
    _llama_metadata(writer, config, file_type)
    _tokenizer_metadata(writer, folder, config.vocab_size)
    tmap = _name_map("llama", config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    state = _plain_state(model)
    types: Dict[str, str] = {}
    bar = _progress(len(state), "GGUF tensors", progress)
    for name, value in state.items():
        gname = _gguf_name(tmap, name)
        if gname is None:
            raise GGUFExportError(f"{name}: the gguf package has no llama tensor name for it")
        array = value.numpy()
        if gname.endswith("attn_q.weight") or gname.endswith("attn_q.bias"):
            array = rotary_rows(array, heads)
        elif gname.endswith("attn_k.weight") or gname.endswith("attn_k.bias"):
            array = rotary_rows(array, kv_heads)
        data, used = encode(array, qtype if array.ndim > 1 else gguf.GGMLQuantizationType.F32)
        writer.add_tensor(gname, data, raw_dtype=used if data.dtype == np.uint8 else None)
        types[gname] = used.name
        bar.update(1)
    bar.close()
    _finish(writer, progress)
    return types


# ------------------------------------------------------------------------------------------------
# Entry points
def gguf_source(name_or_path: Optional[str]) -> Optional[Path]:
    """The GGUF file a base model comes from: a ``.gguf`` path, the bundled name, or a folder
    dorafit converted from one; None for an ordinary folder or hub id."""
    from . import gguf as dgguf

    if not name_or_path:
        return None
    if name_or_path.lower() in dgguf.BUNDLED_GGUF:
        return dgguf.find_bundled_gguf(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        return dgguf.recorded_source(path)
    return None


def export_gguf(model: nn.Module, path: Union[str, os.PathLike], quant: str = "f16",
                source: Optional[Union[str, os.PathLike]] = None, folder: Optional[Union[str, os.PathLike]] = None,
                progress: bool = True) -> Dict[str, str]:
    """Write the model with its active adapter merged as one GGUF file ``path``.

    ``source``: the GGUF file the base was loaded from (then only the adapted tensors are
    replaced); else ``folder``, the transformers folder of a llama-family base (tokenizer files
    included). ``quant``: see the module docstring. The model is left as it was. Returns
    {GGUF tensor name: type written} for the tensors written anew.
    """
    if quant not in QUANTS:
        raise GGUFExportError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if not adapter_modules(model):
        raise AdapterError("the model has no active dorafit adapter to merge into a GGUF file")
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise GGUFExportError(f"{path}: the output must be a .gguf file")
    for given in (source, folder):
        if given is not None and is_same_or_inside(path, given):
            raise GGUFExportError(f"{path} would replace or lie inside the input {given}; choose another output")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise GGUFExportError(f"{path} is a link or not a regular file; refusing to replace it")
    if source is None and folder is None:
        raise GGUFExportError("give the base's GGUF file (source) or its transformers folder (folder)")
    if source is not None:
        source = Path(source)
        if not source.is_file():
            raise GGUFExportError(f"{source}: no such GGUF file")
    written: Dict[str, str] = {}

    def write(tmp: Path) -> None:
        if source is not None:
            written.update(_write_merged_from_source(model, source, tmp, quant, progress))
        else:
            written.update(_write_merged_from_folder(model, Path(folder), tmp, quant, progress))

    write_file_atomic(path, write)
    return written


def write_lora_gguf(model: nn.Module, cfg: Dict, state: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                    quant: str = "f32") -> Path:
    """Write a PEFT LoRA adapter (``cfg``, ``state`` with one rank and one alpha, as
    ``dorafit.export.uniform_rank_lora`` makes) in llama.cpp's LoRA format for ``model``'s base
    (llama family). Returns the path."""
    from .interop import PREFIX

    gguf = _gguf()
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LLAMA_FAMILY:
        raise GGUFExportError(f"a llama.cpp LoRA adapter is written for the llama family ({', '.join(LLAMA_FAMILY)}); this "
                              f"base is {getattr(config, 'model_type', type(model).__name__)!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        raise GGUFExportError("llama.cpp reads one lora_alpha and no rank or alpha patterns: write the adapter with "
                              "one rank (dorafit.export.uniform_rank_lora)")
    if cfg.get("modules_to_save"):
        raise GGUFExportError("llama.cpp LoRA adapters hold A and B only; modules_to_save copies cannot be written "
                              "(export the merged model with --to gguf)")
    if quant not in ("f32", "f16", "bf16", "q8_0"):
        raise GGUFExportError(f"a LoRA adapter is written as f32, f16, bf16 or q8_0, not {quant!r}")
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise GGUFExportError(f"{path}: the output must be a .gguf file")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise GGUFExportError(f"{path} is a link or not a regular file; refusing to replace it")
    tmap = _name_map("llama", config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    factors: Dict[str, Dict[str, np.ndarray]] = {}
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if name.endswith(suffix):
                factors.setdefault(name[: -len(suffix)], {})[part] = value.detach().float().numpy()
                break
        else:
            raise GGUFExportError(f"{key}: llama.cpp LoRA adapters hold lora_A and lora_B of linear layers only")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
        _add_version(writer)
        for module in sorted(factors):
            gname = _gguf_name(tmap, f"{module}.weight")
            if gname is None:
                raise GGUFExportError(f"{module}: the gguf package has no llama tensor name for it")
            a, b = factors[module]["a"], factors[module]["b"]  # (r, in), (out, r)
            if gname.endswith("attn_q.weight"):
                b = rotary_rows(b, heads)
            elif gname.endswith("attn_k.weight"):
                b = rotary_rows(b, kv_heads)
            for suffix, array in ((".lora_a", a), (".lora_b", b)):
                data, used = encode(array, _qtype(quant))
                writer.add_tensor(gname + suffix, data, raw_dtype=used if data.dtype == np.uint8 else None)
        _finish(writer, False)

    write_file_atomic(path, write)
    return path
