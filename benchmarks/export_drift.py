"""Which LoRA rank reproduces a DoRA adapter: weight error and logits drift per rank.

Loads the base model and the adapter as ``dorafit export`` does, then runs ``export_lora`` (no
file written) at each rank on prompts built from ARC-Easy test questions (question + first
choice, as the default recipe sees them), and prints the overall relative weight error
‖ΔW − BA‖/‖ΔW‖ and the logits drift ‖L_lora − L_dora‖/‖L_dora‖ (the last hidden state for an
encoder), and that difference relative to the fine-tune's change ‖L_dora − L_base‖.

    python benchmarks/export_drift.py runs/minilm/adapter --ranks 1,2,4,8,16,32,64 --prompts 32
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

DATA = Path(__file__).resolve().parents[1] / "dorafit" / "data" / "ARC-Easy" / "test.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--model", default=None)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()

    from dorafit.commands.export import load_for_export
    from dorafit.export import export_lora

    rows = json.loads(DATA.read_text())[: args.prompts]
    prompts = [r["instruction"] for r in rows]
    ns = SimpleNamespace(adapter=args.adapter, model=args.model, model_kind="auto", prompt=prompts,
                         trust_remote_code=False)
    model, inputs = load_for_export(ns)
    print(f"{len(inputs)} prompts, load {os.getloadavg()[0]:.2f}")
    print(f"{'rank':>5} {'weight error':>13} {'logits drift':>13} {'of the change':>14}")
    for rank in [int(r) for r in args.ranks.split(",")]:
        rep = export_lora(model, None, rank=rank, inputs=inputs)
        print(f"{rank:>5} {100 * rep.weight_error:>12.3f}% {100 * rep.logits_drift:>12.4f}% {100 * rep.drift_of_change:>13.3f}%")


if __name__ == "__main__":
    with torch.no_grad():
        main()
