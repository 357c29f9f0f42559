"""An adapter folder always holds one adapter (dorafit.adapter_files): tied files, concurrent
writers and readers, interrupted writers, temporaries, and folders an adapter must not go into."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dorafit
from dorafit import AdapterConfig, AdapterFileError
from dorafit.adapter_files import CONFIG_NAME, TIE_KEY, WEIGHTS_NAME, read_adapter_files, weights_metadata


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


def adapter(rank: int, value: float, fmt: str = "dorafit"):
    """A model whose adapter is recognisable: rank ``rank``, every B entry ``value``."""
    model = dorafit.attach(Net(), AdapterConfig(rank=rank, alpha=2 * rank, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.lora_b.fill_(value)
    return model


def identity(path) -> tuple:
    """(rank, B value) of the adapter in ``path``, loaded the way users load it."""
    model = dorafit.load_adapter(Net(), path)
    b = model.q_proj.lora_b.detach()
    values = {float(b.min()), float(b.max()), float(model.v_proj.lora_b.detach().min())}
    assert len(values) == 1, f"one adapter's B beside another's: {values}"
    return model.q_proj.rank, values.pop()


@pytest.mark.parametrize("fmt", ["dorafit", "peft"])
def test_weights_record_their_config_and_a_mixed_pair_is_refused(tmp_path, fmt):
    first = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "first", format=fmt)
    second = dorafit.save_adapter(adapter(4, 2.0), tmp_path / "second", format=fmt)
    assert TIE_KEY in weights_metadata(first)
    # A writer killed between its two renames: the new weights beside the old config.
    shutil.copy(second / WEIGHTS_NAME, first / WEIGHTS_NAME)
    base = Net()
    with pytest.raises(AdapterFileError, match="is not the config saved with adapter_model.safetensors .*different saves"):
        dorafit.load_adapter(base, first)
    assert not dorafit.adapter_modules(base)  # left as it was


def test_the_base_location_may_be_edited_by_hand_but_nothing_else(tmp_path):
    path = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a", format="peft")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["base_model_name_or_path"] = "/models/elsewhere"
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    assert identity(path) == (2, 1.0)
    cfg["lora_alpha"] = 64  # a hand-made change of what the adapter computes
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="is not the config saved with"):
        dorafit.load_adapter(Net(), path)
    mine = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "b")
    meta = json.loads((mine / CONFIG_NAME).read_text())
    meta["base_model"]["name_or_path"] = "/models/elsewhere"
    (mine / CONFIG_NAME).write_text(json.dumps(meta))
    assert identity(mine) == (2, 1.0)


def test_a_reader_waits_out_a_writer_between_its_renames(tmp_path, monkeypatch):
    """The reader finds the mixed pair, reads again, and gets the new adapter once the config lands."""
    import dorafit.adapter_files as files

    path = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a")
    newer = dorafit.save_adapter(adapter(4, 2.0), tmp_path / "b")
    shutil.copy(newer / WEIGHTS_NAME, path / WEIGHTS_NAME)
    real_sleep, calls = time.sleep, []

    def config_lands(seconds):
        calls.append(seconds)
        shutil.copy(newer / CONFIG_NAME, path / CONFIG_NAME)
        real_sleep(0)

    monkeypatch.setattr(files.time, "sleep", config_lands)
    assert identity(path) == (4, 2.0) and len(calls) == 1


def _writer(folder, rank, value, rounds, errors):
    try:
        model = adapter(rank, value)
        for i in range(rounds):
            dorafit.save_adapter(model, folder, format="peft" if i % 2 else "dorafit")
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"writer {value}: {type(exc).__name__}: {exc}")


def _reader(folder, stop, seen, errors):
    counts = {"a": 0, "b": 0, "refused": 0}
    try:
        while not stop.is_set():
            try:
                rank, value = identity(folder)
            except AdapterFileError as exc:
                if "is not the config saved with" not in str(exc):
                    raise
                counts["refused"] += 1
                continue
            if (rank, value) == (2, 1.0):
                counts["a"] += 1
            elif (rank, value) == (4, 2.0):
                counts["b"] += 1
            else:
                raise AssertionError(f"read an adapter no writer wrote: rank {rank}, B {value}")
    except BaseException as exc:
        errors.put(f"reader: {type(exc).__name__}: {exc}")
    seen.put(counts)


def test_concurrent_writers_and_readers_never_mix_two_adapters(tmp_path):
    """Two processes save different adapters (rank 2 / B = 1 and rank 4 / B = 2, in both layouts)
    into one folder 150 times each while two others load it: every load is one of the two
    adapters or the clear refusal, no writer fails (no one deletes another's temporaries), and no
    temporary is left."""
    ctx = multiprocessing.get_context("fork")
    folder = tmp_path / "adapter"
    dorafit.save_adapter(adapter(2, 1.0), folder)
    errors, seen, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(folder, r, v, 150, errors)) for r, v in ((2, 1.0), (4, 2.0))]
    readers = [ctx.Process(target=_reader, args=(folder, stop, seen, errors)) for _ in range(2)]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(timeout=300)
    stop.set()
    for p in readers:
        p.join(timeout=60)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, problems
    counts = [seen.get(timeout=5) for _ in readers]
    assert sum(c["a"] + c["b"] for c in counts) > 10, counts  # the readers did read during the writes
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, WEIGHTS_NAME]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_leftovers_of_dead_writers_go_and_a_running_writers_stay(tmp_path):
    """Temporaries are named after their process (dorafit.files): a save removes those of ended
    processes and keeps a running writer's."""
    from dorafit import files

    folder = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a")
    proc = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()  # a process id that no longer runs
    dead = folder / f".{WEIGHTS_NAME}.{files._HOST}-{proc.pid}-abc123.dorafit-tmp"
    alive = folder / f".{WEIGHTS_NAME}.{files._HOST}-{os.getppid()}-def456.dorafit-tmp"  # our parent still runs
    for f in (dead, alive):
        f.write_bytes(b"partial")
    dorafit.save_adapter(adapter(2, 1.0), folder)
    assert not dead.exists() and alive.exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [CONFIG_NAME, WEIGHTS_NAME]


# ---------------------------------------------------------------------------- where an adapter must not go


def _hashes(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", ["dorafit", "peft", "auto"])
def test_a_model_folder_is_refused_as_adapter_target(tmp_path, fmt):
    """An adapter inside the base model's own folder would change what from_pretrained loads there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "base"
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    before = _hashes(folder)
    model = dorafit.attach(LlamaForCausalLM.from_pretrained(folder), AdapterConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(AdapterFileError, match=rf"{folder} holds a model \(config.json and model.safetensors\).*"
                                               rf"e.g. {folder}/adapter"):
        dorafit.save_adapter(model, folder, format=fmt)
    with pytest.raises(AdapterFileError, match="holds a model"):
        model.save_pretrained(folder)  # the Hugging Face path too
    assert _hashes(folder) == before and not [p for p in folder.iterdir() if p.name.startswith(".")]
    dorafit.save_adapter(model, folder / "adapter", format=fmt)  # where the message says
    assert type(LlamaForCausalLM.from_pretrained(folder)).__name__ == "LlamaForCausalLM"


def test_links_and_non_regular_files_are_never_written_through(tmp_path):
    folder = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a")
    outside = tmp_path / "outside.json"
    outside.write_text("mine")
    (folder / CONFIG_NAME).unlink()
    (folder / CONFIG_NAME).symlink_to(outside)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        dorafit.save_adapter(adapter(2, 1.0), folder)
    assert outside.read_text() == "mine" and (folder / CONFIG_NAME).is_symlink()
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        dorafit.save_adapter(adapter(2, 1.0), link)
    assert not (tmp_path / "nowhere").exists()


def test_untied_files_from_other_writers_still_load(tmp_path):
    """PEFT's own save_pretrained writes no tie: such folders load as they are."""
    path = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a", format="peft")
    save_file(load_file(str(path / WEIGHTS_NAME)), str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    assert TIE_KEY not in weights_metadata(path)
    files = read_adapter_files(path)
    assert files.record() == {} and identity(path) == (2, 1.0)


def _in_time(seconds: int):
    """A context that fails the test instead of hanging when a read blocks (on a FIFO)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard():
        def fail(*_):
            raise AssertionError(f"blocked for {seconds} s")

        previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return guard()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("fmt", ["dorafit", "peft"])
@pytest.mark.parametrize("which", [WEIGHTS_NAME, CONFIG_NAME])
def test_a_fifo_in_place_of_an_adapter_file_is_named_not_called_missing(tmp_path, fmt, which):
    folder = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a", format=fmt)
    (folder / which).unlink()
    os.mkfifo(folder / which)
    with _in_time(20), pytest.raises(AdapterFileError) as err:
        dorafit.load_adapter(Net(), folder)
    message = str(err.value)
    assert "FIFO (named pipe), not a regular file" in message and which in message and "missing" not in message
    assert "\n" not in message
    if which == WEIGHTS_NAME:
        with _in_time(20), pytest.raises(AdapterFileError, match="FIFO"):
            weights_metadata(folder)


def test_a_bad_adapter_name_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    folder = dorafit.save_adapter(adapter(2, 1.0), tmp_path / "a")
    import dorafit.remote as remote

    def no_reading(*args, **kwargs):
        raise AssertionError("the adapter path was resolved before the name was checked")

    monkeypatch.setattr(remote, "resolve_adapter_path", no_reading)
    base = Net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for bad in ("", "1st", "a b", "x" * 65, None):
        with pytest.raises(dorafit.AdapterError, match="adapter name .* is not valid") as err:
            dorafit.load_adapter(base, folder, name=bad)
        assert "\n" not in str(err.value)
    assert not dorafit.adapter_modules(base) and all(torch.equal(before[k], v) for k, v in base.state_dict().items())
