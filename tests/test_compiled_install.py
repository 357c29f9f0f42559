"""dorafit runs from compiled files alone (``compileall -b``, every .py removed), as some
installers and frozen deployments ship it: no module may need its own source at run time."""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dorafit

PACKAGE = Path(dorafit.__file__).resolve().parent

SCRIPT = r'''
import contextlib, io, json, sys
from pathlib import Path
import torch
from torch import nn
import dorafit
from dorafit.cli import COMMANDS, main
from dorafit.train.data import BUNDLED_DATA, read_rows

assert dorafit.__file__.endswith("__init__.pyc"), dorafit.__file__
for command in [None, *COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["--help"] if command is None else [command, "--help"])
        except SystemExit as stop:
            assert stop.code == 0, (command, stop.code)
    assert "usage:" in out.getvalue(), command
assert len(read_rows(BUNDLED_DATA / "ARC-Easy" / "test.json")) > 0  # the bundled data came along

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
base.load_state_dict(model.state_dict())
x = torch.randn(3, 8)
dorafit.attach(model, dorafit.AdapterConfig(rank=2, targets=["0", "2"]))
with torch.no_grad():
    for _, layer in dorafit.adapter_modules(model):
        layer.lora_b.normal_(0, 0.3)
adapted = model(x)
assert not torch.allclose(adapted, base(x), atol=1e-3)
dorafit.save_adapter(model, Path(sys.argv[1]) / "adapter")
dorafit.load_adapter(base, Path(sys.argv[1]) / "adapter")
assert torch.allclose(base(x), adapted, atol=1e-6)
merged = dorafit.merge(base)
assert not dorafit.adapter_modules(merged) and torch.allclose(merged(x), adapted, atol=1e-5)
print("compiled install ok")
'''


def test_runs_from_compiled_files_only(tmp_path):
    root = tmp_path / "site"
    shutil.copytree(PACKAGE, root / "dorafit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert compileall.compile_dir(root / "dorafit", legacy=True, quiet=1)  # foo.pyc beside foo.py
    sources = list((root / "dorafit").rglob("*.py"))
    for path in sources:
        path.unlink()
    assert sources and not list(root.rglob("*.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(root),
                                                                         "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled install ok" in done.stdout
    # the attribute docstrings of TrainConfig are gone with the source: the flags still work
    help_text = subprocess.run([sys.executable, "-m", "dorafit", "train", "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "--rank RANK" in help_text.stdout, help_text.stderr[-3000:]
