"""``dorafit analyze``: the paper's magnitude/direction analysis (Figure 2) for any fine-tune.

    dorafit analyze [--base BASE] TUNED [TUNED ...]
    dorafit analyze --base BASE --checkpoints RUN1/ckpt-1 RUN1/ckpt-2 ... --checkpoints RUN2/ckpt-1 ...

BASE is a Hugging Face model folder or hf://owner/name (default: the base the adapters record); each TUNED is a full fine-tune (model.safetensors),
a dorafit adapter or a PEFT adapter folder (merged in memory). Writes OUT/analysis.csv,
OUT/analysis.json (rows + per-panel Pearson r and slope) and the figure (OUT/figure2.png).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HELP = "magnitude/direction analysis of fine-tuned weights (paper Figure 2): table + plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tuned", nargs="*", metavar="TUNED",
                        help="fine-tuned checkpoints: model folder/.safetensors file, dorafit or PEFT adapter folder "
                             "(give them before any --checkpoints, which takes every path that follows it)")
    parser.add_argument("--base", default=None,
                        help="the pretrained model (Hugging Face folder or hf://owner/name); default: the base the first "
                             "adapter among the checkpoints records (the same for every adapter)")
    parser.add_argument("--checkpoints", nargs="+", action="append", default=[], metavar="CKPT",
                        help="one training run's intermediate checkpoints, in training order (repeat per run)")
    parser.add_argument("--modules", default=None,
                        help="regex matched (fullmatch) against module names; default: the adapted modules, "
                             "or for full fine-tunes alone the attention query projections")
    parser.add_argument("--axis", choices=["out", "in"], default="out",
                        help="'out': one norm per output feature (rows, DoRA's magnitude axis; default); 'in': per column")
    parser.add_argument("--method", action="append", default=[], metavar="PATH=NAME",
                        help="override the method (panel) of a checkpoint, e.g. --method runs/a/ckpt-1=DoRA-r4")
    parser.add_argument("--base-class", default=None,
                        help="transformers class to load BASE with (default: the config's architectures[0])")
    parser.add_argument("--out", default="dorafit-analysis", help="output folder for analysis.csv/json (and the plot)")
    parser.add_argument("--plot", default=None, help="PNG path of the figure (default OUT/figure2.png)")
    parser.add_argument("--no-plot", action="store_true", help="write the table only")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--reference", action="append", default=[], metavar="METHOD=R",
                        help="a correlation to print beside a panel's, e.g. the paper's: --reference FT=-0.62")


def _report(stats) -> str:
    lines = [f"{'method':<10} {'module':<46} {'points':>6} {'pearson r':>10} {'slope':>10} {'r within ckpt':>14}"]
    for s in stats:
        r = "nan" if math.isnan(s.pearson) else f"{s.pearson:+.3f}"
        w = "nan" if math.isnan(s.pearson_within) else f"{s.pearson_within:+.3f}"
        lines.append(f"{s.method:<10} {s.kind:<46} {s.points:>6} {r:>10} {s.slope:>10.3g} {w:>14}")
    return "\n".join(lines)


def _recorded_base(paths) -> str | None:
    """The base model the adapters among ``paths`` record; None if none records one. Adapters
    recording different bases are refused: one analysis compares everything with one base."""
    from dorafit.io import recorded_base_model

    bases = {p: b for p in paths if (b := recorded_base_model(p))}
    if len(set(bases.values())) > 1:
        found = ", ".join(f"{p} -> {b}" for p, b in bases.items())
        raise ValueError(f"the adapters record different base models ({found}); pass --base")
    return next(iter(bases.values()), None)


def check_outputs(args: argparse.Namespace, out: Path, base: str, specs) -> None:
    """--out (a folder) and --plot (a file) are no links, devices or inputs, nor inside one."""
    from dorafit.files import check_output_file, check_output_folder

    inputs = [("--base", base)] + [("checkpoint", s.path) for s in specs]
    check_output_folder(out, inputs, "--out")
    if not args.no_plot:
        check_output_file(Path(args.plot) if args.plot else out / "figure2.png", inputs, "--plot")
    for name in ("analysis.csv", "analysis.json"):
        check_output_file(out / name, inputs, "--out")


def run(args: argparse.Namespace) -> int:
    from dorafit.analysis import AnalysisError, Checkpoint, analyze, panel_stats, plot_figure2, write_table
    from dorafit.loading import load_base_for_adapter

    specs = []
    for k, path in enumerate(args.tuned):
        specs.append(Checkpoint(path, run=k, order=0))
    for g, group in enumerate(args.checkpoints):
        for k, path in enumerate(group):
            specs.append(Checkpoint(path, run=len(args.tuned) + g, order=k))
    if not specs:
        print("dorafit analyze: error: give at least one TUNED checkpoint or --checkpoints", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.method:
        path, sep, name = item.rpartition("=")
        if not sep or not path or not name:
            print(f"dorafit analyze: error: --method expects PATH=NAME, got {item!r}", file=sys.stderr)
            return 2
        overrides[str(Path(path))] = name
    for s in specs:
        s.method = overrides.get(str(Path(s.path)), s.method)
    reference = {}
    for item in args.reference:
        method, sep, value = item.partition("=")
        try:
            reference[method] = float(value)
        except ValueError:
            sep = ""
        if not sep or not method:
            print(f"dorafit analyze: error: --reference expects METHOD=NUMBER, got {item!r}", file=sys.stderr)
            return 2

    try:
        base = args.base or _recorded_base([s.path for s in specs])
    except ValueError as exc:
        print(f"dorafit analyze: error: {exc}", file=sys.stderr)
        return 2
    if base is None:
        print("dorafit analyze: error: --base is required: no adapter among the checkpoints records its base model",
              file=sys.stderr)
        return 2
    if not args.base:
        print(f"base model: {base} (recorded by the adapter)")
    try:
        out = Path(args.out)
        check_outputs(args, out, base, specs)
        model = load_base_for_adapter(model=base, default_model=None, by_class=True, model_class=args.base_class,
                                      attach=False, model_flag="--base").model
        rows = analyze(model, specs, modules=args.modules, axis=1 if args.axis == "out" else 0)
        write_table(rows, out / "analysis.csv", out / "analysis.json")
        stats = panel_stats(rows)
        print(_report(stats))
        print(f"table: {out / 'analysis.csv'}, {out / 'analysis.json'}")
        if not args.no_plot:
            png = plot_figure2(rows, args.plot or out / "figure2.png", title=args.title, reference=reference)
            print(f"figure: {png}")
    except (AnalysisError, OSError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"dorafit analyze: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
