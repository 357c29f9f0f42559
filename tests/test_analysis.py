"""Tests of dorafit.analysis and `dorafit analyze`: ΔM/ΔD on weights built with known answers
(pure rescaling: ΔD = 0; pure rotation: ΔM = 0), through full checkpoints, dorafit adapters
and PEFT adapters, and the table/figure outputs."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import dorafit
from dorafit.analysis import (
    AnalysisError,
    Checkpoint,
    DeltaRow,
    analyze,
    checkpoint_marker_labels,
    checkpoint_method,
    fit_line,
    layer_index,
    module_kind,
    panel_stats,
    pearson,
    plain_weight_2d,
    plot_figure2,
    short_kind_names,
    write_table,
)
from dorafit.functional import magnitude_direction_delta
from dorafit.io import recorded_base_model

OUT, IN = 6, 16


def _known_pair(seed: int, scale: torch.Tensor, angle: torch.Tensor):
    """W0 (OUT, IN) and W with row i rescaled by scale[i] and turned by angle[i] (radians) in a
    plane of its own, so ΔM = mean |scale-1|·‖W0_i‖ and ΔD = mean (1 - cos angle) exactly.
    A random orthogonal Q applied to both hides the construction (it keeps all norms and cosines)."""
    g = torch.Generator().manual_seed(seed)
    norms = torch.rand(OUT, generator=g, dtype=torch.float64) + 0.5
    eye = torch.eye(IN, dtype=torch.float64)
    w0 = norms[:, None] * eye[:OUT]                                                     # row i = n_i e_i
    turned = torch.cos(angle)[:, None] * eye[:OUT] + torch.sin(angle)[:, None] * eye[OUT : 2 * OUT]
    w = (scale * norms)[:, None] * turned
    q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))
    expected_m = float(((scale - 1).abs() * norms).mean())
    expected_d = float((1 - torch.cos(angle)).mean())
    return w0 @ q, w @ q, expected_m, expected_d


# ---------------------------------------------------------------------------------------------
# The statistics on constructed weights
# ---------------------------------------------------------------------------------------------

def test_pure_rescaling_changes_magnitude_only():
    scale = torch.linspace(0.5, 2.0, OUT, dtype=torch.float64)
    w0, w, expected_m, _ = _known_pair(0, scale, torch.zeros(OUT, dtype=torch.float64))
    delta_m, delta_d = magnitude_direction_delta(w0, w)
    assert delta_d == pytest.approx(0.0, abs=1e-12)
    assert delta_m == pytest.approx(expected_m, rel=1e-10)
    assert expected_m > 0.1


def test_pure_rotation_changes_direction_only():
    angle = torch.linspace(0.1, 1.2, OUT, dtype=torch.float64)
    w0, w, _, expected_d = _known_pair(1, torch.ones(OUT, dtype=torch.float64), angle)
    delta_m, delta_d = magnitude_direction_delta(w0, w)
    assert delta_m == pytest.approx(0.0, abs=1e-12)
    assert delta_d == pytest.approx(expected_d, rel=1e-10)


def test_rescaling_and_rotation_together_and_other_axis():
    scale = torch.linspace(0.8, 1.3, OUT, dtype=torch.float64)
    angle = torch.linspace(0.0, 0.9, OUT, dtype=torch.float64)
    w0, w, expected_m, expected_d = _known_pair(2, scale, angle)
    assert magnitude_direction_delta(w0, w) == pytest.approx((expected_m, expected_d), rel=1e-10)
    # axis=0 measures columns: the transposed weights give the same numbers
    assert magnitude_direction_delta(w0.t(), w.t(), axis=0) == pytest.approx((expected_m, expected_d), rel=1e-10)
    # float32 inputs are accepted and close
    got = magnitude_direction_delta(w0.float(), w.float())
    assert got == pytest.approx((expected_m, expected_d), rel=1e-4)


def test_pearson_and_slope_on_known_lines():
    x = [0.1, 0.2, 0.3, 0.4]
    assert pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [-3 * v for v in x]) == pytest.approx(-1.0)
    assert fit_line(x, [-3 * v + 0.5 for v in x]) == pytest.approx((-3.0, 0.5))
    assert math.isnan(pearson([1.0, 2.0], [3.0, 4.0]))        # too few points
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # constant x


def test_within_checkpoint_correlation_removes_the_common_growth():
    from dorafit.analysis import DeltaRow

    rows = []
    for step in range(4):            # every checkpoint moves all layers up and right ...
        for layer in range(3):       # ... while across layers ΔM falls as ΔD rises
            rows.append(DeltaRow("c%d" % step, "c%d" % step, "FT", 0, step, f"l.{layer}.q", "l.*.q", layer,
                                 delta_m=10.0 * step - layer, delta_d=10.0 * step + layer, axis=1, features=4))
    (stats,) = panel_stats(rows)
    assert stats.pearson > 0.9
    assert stats.pearson_within == pytest.approx(-1.0)
    (single,) = panel_stats(rows[:3])
    assert math.isnan(single.pearson_within)


def test_names_and_layouts():
    assert layer_index("model.layers.11.self_attn.q_proj") == 11
    assert layer_index("head") is None
    assert module_kind("encoder.layer.3.attention.self.query") == "encoder.layer.*.attention.self.query"
    from transformers.pytorch_utils import Conv1D

    conv1d = Conv1D(nf=5, nx=3)  # weight stored (in, out) = (3, 5)
    assert plain_weight_2d(conv1d, conv1d.weight).shape == (5, 3)
    emb = nn.Embedding(10, 4)
    assert plain_weight_2d(emb, emb.weight).shape == (4, 10)  # one feature per embedding dimension
    conv = nn.Conv2d(3, 7, 3)
    assert plain_weight_2d(conv, conv.weight).shape == (7, 27)


# ---------------------------------------------------------------------------------------------
# Checkpoints: full weights, dorafit adapters, PEFT adapters
# ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT)
        self.v_proj = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


class Tiny(nn.Module):
    def __init__(self, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x):
        return sum(block(x) for block in self.layers)


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def test_full_checkpoint_known_values_and_prefix(tmp_path):
    base = _tiny()
    tuned = copy.deepcopy(base)
    expected = {}
    for k, block in enumerate(tuned.layers):
        with torch.no_grad():
            w0 = block.q_proj.weight.double().clone()
            scale = torch.linspace(1.0, 1.0 + 0.2 * (k + 1), OUT, dtype=torch.float64)
            block.q_proj.weight.copy_((scale[:, None] * w0).float())   # pure rescaling of layer k
        expected[k] = float(((scale - 1).abs() * w0.norm(dim=1)).mean())
    # a causal-LM style prefix on the checkpoint's keys must not matter
    state = {f"model.{k}": v.contiguous() for k, v in tuned.state_dict().items()}
    (tmp_path / "ft").mkdir()
    save_file(state, str(tmp_path / "ft" / "model.safetensors"))

    rows = analyze(base, [tmp_path / "ft"])
    assert [r.module for r in rows] == [f"layers.{k}.q_proj" for k in range(3)]  # default: query projections
    for r in rows:
        assert r.method == "FT" and r.kind == "layers.*.q_proj" and r.features == OUT
        assert r.delta_m == pytest.approx(expected[r.layer], rel=1e-5)
        assert r.delta_d == pytest.approx(0.0, abs=1e-6)
    # an explicit pattern picks the value matrices instead (unchanged: both deltas zero)
    rows_v = analyze(base, [tmp_path / "ft"], modules=r"layers\.\d+\.v_proj")
    assert [r.module for r in rows_v] == [f"layers.{k}.v_proj" for k in range(3)]
    assert all(r.delta_m == 0 and r.delta_d == pytest.approx(0.0, abs=1e-7) for r in rows_v)


def test_full_checkpoint_errors_name_the_problem(tmp_path):
    base = _tiny()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(AnalysisError, match="safetensors"):
        analyze(base, [tmp_path / "pickled"])
    (tmp_path / "partial").mkdir()
    save_file({"layers.0.q_proj.weight": torch.zeros(OUT, IN)}, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(AnalysisError, match=r"layers\.1\.q_proj\.weight"):
        analyze(base, [tmp_path / "partial"])
    (tmp_path / "shape").mkdir()
    save_file({f"layers.{k}.q_proj.weight": torch.zeros(OUT, IN + 1) for k in range(3)},
              str(tmp_path / "shape" / "model.safetensors"))
    with pytest.raises(AnalysisError, match=r"layers\.0\.q_proj has shape \(6, 17\)"):
        analyze(base, [tmp_path / "shape"])
    with pytest.raises(AnalysisError, match="does not exist"):
        analyze(base, [tmp_path / "nowhere"])
    with pytest.raises(AnalysisError, match="matches"):
        analyze(base, [tmp_path / "partial"], modules="nothing_like_this")


def test_dorafit_adapters_known_values(tmp_path):
    base = _tiny()
    w0 = {k: b.q_proj.weight.detach().double().clone() for k, b in enumerate(base.layers)}

    # DoRA with B = 0 and the magnitude scaled by 1.5: a pure rescaling, ΔM = 0.5 mean ‖W0_i‖
    model = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(method="dora", rank=2, alpha=4, targets=["q_proj"]))
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(model):
            a.magnitude.mul_(1.5)
    dorafit.save_adapter(model, tmp_path / "dora")

    # LoRA with B, A set: W = W0 + (alpha / rank) B A, computed here by hand
    model = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(method="lora", rank=2, alpha=4, targets=["q_proj"]))
    g = torch.Generator().manual_seed(3)
    expected_lora = {}
    with torch.no_grad():
        for name, a in dorafit.adapter_modules(model):
            a.lora_b.copy_(torch.randn(a.lora_b.shape, generator=g) * 0.3)
            w = w0[layer_index(name)] + 2.0 * a.lora_b.double() @ a.lora_a.double()
            expected_lora[name] = magnitude_direction_delta(w0[layer_index(name)], w)
    dorafit.save_adapter(model, tmp_path / "lora")

    assert checkpoint_method(tmp_path / "dora") == "DoRA" and checkpoint_method(tmp_path / "lora") == "LoRA"
    before = {k: v.clone() for k, v in base.state_dict().items()}
    rows = analyze(base, [tmp_path / "dora", tmp_path / "lora"])
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base left as it was
    assert not dorafit.adapter_modules(base)
    dora = [r for r in rows if r.method == "DoRA"]
    lora = [r for r in rows if r.method == "LoRA"]
    assert len(dora) == len(lora) == 3
    for r in dora:
        assert r.delta_m == pytest.approx(0.5 * float(w0[r.layer].norm(dim=1).mean()), rel=1e-5)
        assert r.delta_d == pytest.approx(0.0, abs=1e-6)
    for r in lora:
        assert (r.delta_m, r.delta_d) == pytest.approx(expected_lora[r.module], rel=1e-4)
        assert r.delta_d > 1e-3


def test_peft_dora_adapter_matches_peft_merge(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "peft"))
    merged = model.merge_and_unload()  # PEFT's own merge gives the expected weights
    expected = {f"layers.{k}.q_proj": magnitude_direction_delta(base.layers[k].q_proj.weight.double(),
                                                                merged.layers[k].q_proj.weight.double())
                for k in range(3)}

    assert checkpoint_method(tmp_path / "peft") == "DoRA"
    rows = analyze(base, [tmp_path / "peft"])
    assert sorted(r.module for r in rows) == sorted(expected)
    for r in rows:
        assert (r.delta_m, r.delta_d) == pytest.approx(expected[r.module], rel=1e-4)
        assert r.delta_m > 1e-3 and r.delta_d > 1e-4


# ---------------------------------------------------------------------------------------------
# Outputs and the command line
# ---------------------------------------------------------------------------------------------

def _rows_for_plot(tmp_path):
    base = _tiny()
    specs = []
    for step in range(3):
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for k, block in enumerate(tuned.layers):
                block.q_proj.weight.mul_(1.0 + 0.1 * (step + 1) * (k + 1))
                block.q_proj.weight.add_(0.05 * (step + 1) * torch.ones(OUT, IN))
        path = tmp_path / f"ckpt-{step + 1}"
        path.mkdir()
        save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path / "model.safetensors"))
        specs.append(Checkpoint(str(path), run=0, order=step))
    return analyze(base, specs)


def test_table_stats_and_figure(tmp_path):
    rows = _rows_for_plot(tmp_path)
    assert len(rows) == 9 and [r.order for r in rows] == [0] * 3 + [1] * 3 + [2] * 3
    write_table(rows, tmp_path / "t.csv", tmp_path / "t.json")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("checkpoint,label,method,run,order,module,kind,layer,delta_m,delta_d")
    assert len(lines) == 10
    data = json.loads((tmp_path / "t.json").read_text())
    (panel,) = data["panels"]
    x = [r.delta_d for r in rows]
    y = [r.delta_m for r in rows]
    assert panel["points"] == 9 and panel["pearson"] == pytest.approx(pearson(x, y))
    assert panel_stats(rows)[0].slope == pytest.approx(fit_line(x, y)[0])
    png = plot_figure2(rows, tmp_path / "fig.png", title="t", reference={"FT": -0.62})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_command_line_on_tiny_bert(tmp_path, capsys):
    from transformers import BertConfig, BertModel
    from dorafit.cli import main

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=32, architectures=["BertModel"])
    base = BertModel(cfg)
    base.save_pretrained(str(tmp_path / "base"))
    ckpts = []
    for step in range(2):  # a full fine-tune's two checkpoints
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            for layer in tuned.encoder.layer:
                layer.attention.self.query.weight.mul_(1.0 + 0.1 * (step + 1))
        tuned.save_pretrained(str(tmp_path / f"ft-{step}"))
        ckpts.append(str(tmp_path / f"ft-{step}"))
    adapted = dorafit.attach(copy.deepcopy(base), dorafit.AdapterConfig(method="dora", rank=2, alpha=4, targets=["query", "value"]))
    with torch.no_grad():
        for _, a in dorafit.adapter_modules(adapted):
            a.lora_b.normal_(std=0.1)
    dorafit.save_adapter(adapted, tmp_path / "dora")

    out = tmp_path / "out"
    code = main(["analyze", "--base", str(tmp_path / "base"), str(tmp_path / "dora"), "--checkpoints", *ckpts,
                 "--out", str(out), "--reference", "FT=-0.62"])
    assert code == 0
    table = json.loads((out / "analysis.json").read_text())
    methods = [(r["method"], r["module"]) for r in table["rows"]]
    # the adapter's 4 modules; the full fine-tune is read on the same modules, 2 checkpoints each
    assert len(methods) == 4 + 2 * 4
    assert {m for m, _ in methods} == {"DoRA", "FT"}
    ft_query = [r for r in table["rows"] if r["method"] == "FT" and r["module"].endswith("query")]
    assert all(r["delta_d"] == pytest.approx(0.0, abs=1e-6) and r["delta_m"] > 0 for r in ft_query)
    assert (out / "figure2.png").stat().st_size > 10_000
    assert "pearson" in capsys.readouterr().out
    # a bad --method value is refused with a message
    assert main(["analyze", "--base", str(tmp_path / "base"), ckpts[0], "--method", "nonsense", "--no-plot"]) == 2


def test_panel_names_and_marker_labels():
    kinds = ["bert.encoder.layer.*.attention.self.query", "bert.encoder.layer.*.attention.self.value",
             "bert.encoder.layer.*.crossattention.self.query"]
    assert short_kind_names(kinds) == {kinds[0]: "attention.self.query", kinds[1]: "value",
                                       kinds[2]: "crossattention.self.query"}
    # the runs agree on the checkpoint names -> those; only the run folders differ -> folder names
    assert checkpoint_marker_labels({0: ["ft/ckpt-1", "ft/ckpt-1"], 1: ["a/ckpt-2", "b/ckpt-2"]}) == \
        {0: "ft/ckpt-1", 1: "ckpt-2"}
    # any disagreement -> positions for every marker, never one run's folder for all runs
    assert checkpoint_marker_labels({0: ["lora", "ft/checkpoint-100"], 1: ["ft/checkpoint-200"]}) == \
        {0: "checkpoint 1 of each run", 1: "checkpoint 2 of each run"}


def test_figure_text_is_distinct_and_clear_of_the_points(tmp_path, monkeypatch):
    """Every panel has its own title, the statistics sit above the axes (no legend box inside a
    panel to hide points), no two texts overlap, and every layer has its own colour."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k))[1])
    rows = []
    for m, method in enumerate(("FT", "LoRA", "DoRA")):
        for order in range(3):
            for kind in ("enc.layer.*.attn.query", "enc.layer.*.attn.value"):
                for layer in range(4):
                    d = 1e-3 * (order + 1) * (1 + 0.2 * layer)
                    rows.append(DeltaRow(f"{method}/ckpt-{order}", f"{method}/ckpt-{order}", method, m, order,
                                         kind.replace("*", str(layer)), kind, layer, 2e-3 * (order + 1) + 0.1 * d * (m - 1),
                                         d, 1, 8))
    plot_figure2(rows, tmp_path / "fig.png", title="a long title over the whole figure", reference={"FT": -0.62})
    (fig,) = saved
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the closed figure lost its own canvas
    axes = fig.get_axes()
    names = [ax.get_title(loc="left") for ax in axes]
    assert names == [f"{m} · {k}" for k in ("query", "value") for m in ("FT", "LoRA", "DoRA")]
    assert all(ax.get_legend() is None for ax in axes)
    assert axes[0].get_title(loc="right").startswith("r = ") and "(paper -0.62)" in axes[0].get_title(loc="right")
    boxes = [fig._suptitle.get_window_extent(renderer)]
    for ax in axes:
        boxes += [ax._left_title.get_window_extent(renderer), ax.title.get_window_extent(renderer),
                  ax._right_title.get_window_extent(renderer)]
        boxes = [b for b in boxes if b.width > 0]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    for ax in axes:  # the titles sit above the panel, not over its points
        assert ax._right_title.get_window_extent(renderer).y0 >= ax.get_window_extent(renderer).y1
    layer_colours = [h.get_color() for legend in fig.legends for h in legend.legend_handles
                     if h.get_label().startswith("layer")]
    assert len(layer_colours) == 4 and len({tuple(matplotlib.colors.to_rgba(c)) for c in layer_colours}) == 4
    marker_labels = [h.get_label() for legend in fig.legends for h in legend.legend_handles
                     if not h.get_label().startswith("layer")]
    assert marker_labels == ["ckpt-0", "ckpt-1", "ckpt-2"]  # the name the runs share


def test_command_line_defaults_base_to_the_adapters_record(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from dorafit.cli import main

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=32, architectures=["BertModel"])
    adapters = []
    for name in ("base", "other"):
        BertModel(cfg).save_pretrained(str(tmp_path / name))
        adapted = dorafit.attach(BertModel.from_pretrained(str(tmp_path / name)),
                                 dorafit.AdapterConfig(rank=2, alpha=4, targets=["query"]))
        with torch.no_grad():
            for _, a in dorafit.adapter_modules(adapted):
                a.lora_b.normal_(std=0.1)
        dorafit.save_adapter(adapted, tmp_path / f"dora-{name}")
        adapters.append(tmp_path / f"dora-{name}")
    assert recorded_base_model(adapters[0]) == str(tmp_path / "base")
    assert main(["analyze", str(adapters[0]), "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert f"base model: {tmp_path / 'base'} (recorded by the adapter)" in captured.out
    rows = json.loads((tmp_path / "out" / "analysis.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["delta_d"] > 0 for r in rows)
    # two adapters on different bases, or no adapter at all: --base is needed, said in one line
    assert main(["analyze", *map(str, adapters), "--no-plot"]) == 2
    assert "record different base models" in capsys.readouterr().err
    full = tmp_path / "full"
    BertModel(cfg).save_pretrained(str(full))
    assert main(["analyze", str(full), "--no-plot"]) == 2
    assert "--base is required" in capsys.readouterr().err
