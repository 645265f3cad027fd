"""The layer-sensitivity scan on a tiny Llama built in the test (issue 5, "It must show" 2, 3, 5, 6).

Every per-row number is checked against an independent computation: hand-made tensors with known
answers, direct formulas in float64, and end-to-end effects re-measured by quantizing the weight
in place and running the whole model without any of the scan's caching.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import (  # noqa: E402
    ByteTokenizer, InPlace, bit_identical, independent_effect, snapshot, tiny_llama, trained_tiny_llama,
)

import hwnoise as hn  # noqa: E402
from hwnoise import metrics  # noqa: E402
from hwnoise.aqn import AQN, Constant, LayerMultipliers  # noqa: E402
from hwnoise.scan import BUILTIN_TEXTS, ModuleRow, ScanReport, Thresholds, calibration_texts, read_texts  # noqa: E402
from hwnoise.scan.calibration import DEFAULT_MAX_LENGTH, tokenize  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")  # tiny tensors: eager is as fast and compiles nothing


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def report(model, tok):
    return hn.scan(model, tok, format="mxfp4")


# --- 2. metrics against independent computations --------------------------------------------------


# One 32-element MX block (scale 2^0: amax 7.5 has exponent 2 = emax of E2M1): 8 zeros, 6 values
# 0.1 that round to 0 (the deadzone: a quarter of the 24 nonzero values), 16 values 1.5 that are
# exact, 6.0 exact, and 7.5 beyond the block maximum 6 (saturated: 1 of 32 entries).
_BLOCK = [0.0] * 8 + [0.1] * 6 + [1.5] * 16 + [6.0, 7.5]


def test_hand_made_weight_quarter_deadzone(tok):
    net = tiny_llama()
    q = net.model.layers[0].self_attn.q_proj
    block = torch.tensor(_BLOCK)
    with torch.no_grad():
        q.weight.copy_(block[torch.stack([torch.randperm(32) for _ in range(2 * 64)])].reshape(64, 64))
    row = next(r for r in hn.scan(net, tok, format="mxfp4", end_to_end=False).rows
               if r.name == "model.layers.0.self_attn.q_proj")
    assert row.deadzone_ratio == 0.25  # exactly 6 of 24 nonzero per block
    assert row.saturation_ratio == 1 / 32  # 7.5 clipped to 6
    signal = 6 * 0.1 ** 2 + 16 * 1.5 ** 2 + 6.0 ** 2 + 7.5 ** 2
    noise = 6 * 0.1 ** 2 + 1.5 ** 2
    assert row.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert row.relative_error == pytest.approx((6 * 1.0 + 1.5 / 7.5) / 24, rel=1e-6)
    assert set(row.problems) == {"sqnr_db", "deadzone_ratio", "saturation_ratio", "relative_error"}


def _direct(x: torch.Tensor, y: torch.Tensor, fmt: str) -> dict:
    """Float64 formulas written out here, independent of hwnoise.metrics and the scan."""
    x64, y64 = x.double(), y.double()
    nz = x64 != 0
    return {
        "sqnr_db": 10 * math.log10(float((x64 ** 2).sum()) / float(((x64 - y64) ** 2).sum())),
        "deadzone_ratio": float((nz & (y64 == 0)).sum()) / float(nz.sum()),
        "relative_error": float(((x64 - y64).abs()[nz] / x64.abs()[nz]).mean()),
        "saturation_ratio": metrics.saturation_ratio(x, y, fmt),
    }


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8"])
def test_weight_rows_match_direct_computation(model, tok, fmt):
    report = hn.scan(model, tok, format=fmt, end_to_end=False)
    modules = dict(model.named_modules())
    assert [r.name for r in report.rows] == [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    for row in report.rows:
        w = modules[row.name].weight.detach()
        want = _direct(w, hn.quantize(w, fmt), fmt)
        for key, value in want.items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-6, abs=1e-12), (row.name, key)
        assert row.numel == w.numel() and row.kl is None and row.loss_increase is None


def test_input_rows_match_direct_computation(model, tok):
    report = hn.scan(model, tok, format="mxfp4", where="input", end_to_end=False)
    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    captured, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: captured.setdefault(name, args[0].detach())))
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    real = batch.attention_mask.bool()
    for row in report.rows:
        x = captured[row.name]
        want = _direct(x[real], hn.quantize(x, "mxfp4")[real], "mxfp4")
        for key in ("sqnr_db", "deadzone_ratio", "relative_error"):
            assert getattr(row, key) == pytest.approx(want[key], rel=1e-6, abs=1e-12), (row.name, key)
        assert row.numel == x[real].numel()


def test_layer_aggregates_pool_their_modules(report):
    for layer in report.layers:
        members = [r for r in report.rows if r.layer == layer.layer]
        signal = sum(r.stats["signal"] for r in members)
        noise = sum(r.stats["noise"] for r in members)
        assert layer.modules == len(members) == 7
        assert layer.sqnr_db == pytest.approx(10 * math.log10(signal / noise))
        assert min(r.sqnr_db for r in members) <= layer.sqnr_db <= max(r.sqnr_db for r in members)
        assert layer.deadzone_ratio == pytest.approx(
            sum(r.deadzone_ratio * r.stats["nonzero"] for r in members) / sum(r.stats["nonzero"] for r in members))
        assert layer.kl_sum == pytest.approx(sum(r.kl for r in members))
        assert layer.problematic_modules == sum(r.problematic for r in members)


# --- 3. end-to-end effects: re-measured independently, and the ranking means something ---------------


def test_end_to_end_effects_equal_independent_measurement(report, model, tok):
    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    modules = dict(model.named_modules())
    ranked = report.worst(None)
    top, bottom = ranked[0], ranked[-1]
    for row in (top, ranked[len(ranked) // 2], bottom):
        if row.name == "lm_head":  # tied to the embedding: in-place would change both; the scan changes only lm_head
            continue
        loss, kl = independent_effect(model, batch, lambda row=row: InPlace(modules[row.name], "mxfp4"))
        assert row.loss_increase == pytest.approx(loss, abs=1e-5), row.name
        assert row.kl == pytest.approx(kl, rel=1e-3, abs=1e-7), row.name


def test_ranking_top_module_raises_loss_more_than_bottom(tok):
    # A model fitted to the texts (so that noise hurts it), scanned under MXFP4 end to end.
    net = trained_tiny_llama(tok, calibration_texts(None))
    report = hn.scan(net, tok, format="mxfp4")
    top, bottom = report.worst(None)[0], report.worst(None)[-1]
    if top.name == "lm_head":
        top = report.worst(None)[1]
    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    modules = dict(net.named_modules())
    loss_top, _ = independent_effect(net, batch, lambda: InPlace(modules[top.name], "mxfp4"))
    loss_bottom, _ = independent_effect(net, batch, lambda: InPlace(modules[bottom.name], "mxfp4"))
    print(f"top {top.name}: loss +{loss_top:.5f}, KL {top.kl:.5f}; bottom {bottom.name}: loss "
          f"{loss_bottom:+.5f}, KL {bottom.kl:.6f}")
    assert top.loss_increase == pytest.approx(loss_top, abs=1e-5)
    assert bottom.loss_increase == pytest.approx(loss_bottom, abs=1e-5)
    assert loss_top > 0 and loss_top > loss_bottom + 10 * abs(loss_bottom) and top.kl > 10 * bottom.kl


def test_input_mode_end_to_end_equals_a_plain_hook(model, tok):
    report = hn.scan(model, tok, format="nvfp4", where="input", targets="*.mlp.down_proj")
    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    modules = dict(model.named_modules())
    from contextlib import contextmanager

    for row in report.rows:
        @contextmanager
        def hooked(module=modules[row.name]):
            h = module.register_forward_pre_hook(lambda m, args: (hn.quantize(args[0], "nvfp4"),))
            try:
                yield
            finally:
                h.remove()

        loss, kl = independent_effect(model, batch, hooked)
        assert row.loss_increase == pytest.approx(loss, abs=1e-5)
        assert row.kl == pytest.approx(kl, rel=1e-3, abs=1e-7)


def test_lm_head_scanned_alone_keeps_the_tied_embedding_clean(model, tok):
    report = hn.scan(model, tok, format="mxfp4", targets="lm_head")
    (row,) = report.rows
    assert row.name == "lm_head" and row.layer is None
    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    w = model.lm_head.weight.detach()
    valid = batch.attention_mask[:, 1:].bool()
    with torch.no_grad():
        h = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        clean = torch.log_softmax((h @ w.T)[:, :-1][valid].double(), -1)
        quant = torch.log_softmax((h @ hn.quantize(w, "mxfp4").T)[:, :-1][valid].double(), -1)
    kl = (clean.exp() * (clean - quant)).sum(-1).mean().item()
    assert row.kl == pytest.approx(kl, rel=1e-3)


# --- 5. the model is untouched ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight", "input"])
def test_parameters_bit_identical_and_no_hooks_left(tok, mode):
    net = tiny_llama()
    before = snapshot(net)
    hn.scan(net, tok, format="mxfp4", where=mode)
    hn.scan_faults(net, tok, None, "bf16", "mxfp4", repeats=2)
    assert bit_identical(net, before)
    for m in net.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks and "forward" not in m.__dict__
    assert net.lm_head.weight is net.model.embed_tokens.weight  # still tied


def test_parameters_restored_when_a_pass_raises(tok, monkeypatch):
    from hwnoise.scan import calibration

    net = tiny_llama()
    before = snapshot(net)
    calls = []
    real = calibration.CleanPass._forward

    def flaky(self):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return real(self)

    monkeypatch.setattr(calibration.CleanPass, "_forward", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        hn.scan(net, tok, format="mxfp4")
    assert bit_identical(net, before)
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in net.parameters())


# --- 6. bad input: clear errors -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"format": "mxfp5"}, ["mxfp5", "mxfp4"]),
    ({"where": "output"}, ["output", "weight", "input"]),
    ({"texts": []}, ["no calibration texts"]),
    ({"texts": ["   ", ""]}, ["no calibration texts"]),
    ({"thresholds": {"sqnr_db": -5}}, ["sqnr_db", "-5", "[0, 200]"]),
    ({"thresholds": {"deadzone_ratio": 5}}, ["deadzone_ratio", "[0, 1]", "0.05"]),
    ({"thresholds": {"saturation_ratio": float("nan")}}, ["saturation_ratio", "finite"]),
    ({"thresholds": {"sqnr": 20}}, ["sqnr", "known", "sqnr_db"]),
    ({"samples": 0}, ["samples", "positive"]),
    ({"max_length": 1}, ["max_length", ">= 2"]),
    ({"rounding": "up"}, ["rounding", "up"]),
    ({"colour": "red"}, ["colour", "scale_mode"]),
    ({"targets": "*.no_such_proj"}, ["matched no module"]),
])
def test_bad_input_is_a_clear_error(model, tok, kwargs, words):
    with pytest.raises(ValueError) as err:
        hn.scan(model, tok, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_thresholds_change_the_flags(model, tok):
    lenient = hn.scan(model, tok, format="mxfp4", end_to_end=False,
                      thresholds={"sqnr_db": 10, "deadzone_ratio": 0.5, "saturation_ratio": 0.5,
                                  "relative_error": 1.0})
    assert lenient.problematic_share == 0 and lenient.recommendation().action == "none"
    strict = hn.scan(model, tok, format="mxfp8", end_to_end=False, thresholds=Thresholds(sqnr_db=40))
    assert all(r.problems == ["sqnr_db"] or "sqnr_db" in r.problems for r in strict.rows)


# --- report: recommendation, multipliers, JSON, compare, files ---------------------------------------


def _synthetic(bad: int, total: int = 40, layers: int = 10) -> ScanReport:
    rows = []
    for i in range(total):
        sqnr = 15.0 if i < bad else 30.0
        rows.append(ModuleRow(name=f"model.layers.{i % layers}.m{i}", layer=i % layers, kind="linear", numel=100,
                              sqnr_db=sqnr, deadzone_ratio=0.0, saturation_ratio=0.0, relative_error=0.01,
                              loss_increase=0.1 * (i < bad) + 1e-4 * i, kl=0.05 * (i < bad) + 1e-5 * i,
                              problems=["sqnr_db"] if i < bad else [],
                              stats={"signal": 10 ** (sqnr / 10), "noise": 1.0, "relative_error_sum": 1.0,
                                     "nonzero": 100, "deadzone": 0, "saturated": 0, "numel": 100}))
    from hwnoise.scan import aggregate_layers

    th = Thresholds()
    return ScanReport(model="synthetic", format="mxfp4", mode="weight", targets="linear", thresholds=th, texts=8,
                      tokens=256, max_length=32, clean_loss=2.0, end_to_end=True, rows=rows,
                      layers=aggregate_layers(rows, th))


@pytest.mark.parametrize("bad, action", [(0, "none"), (3, "keep_high_precision"), (4, "mixed_precision_and_aqn"),
                                         (12, "mixed_precision_and_aqn"), (13, "wider_format_or_global_aqn")])
def test_recommendation_follows_the_design_rule(bad, action):
    rec = _synthetic(bad).recommendation()
    assert rec.action == action and rec.problematic == bad and rec.total == 40
    text = rec.text
    assert f"{bad} of 40 modules" in text
    if action == "keep_high_precision":
        assert len(rec.keep_high_precision) == 3 and "keep these in high precision" in text
    if action == "mixed_precision_and_aqn":
        assert "mixed precision" in text and "AQN" in text and rec.aqn_layers
    if action == "wider_format_or_global_aqn":
        assert rec.wider_format == "mxfp6_e2m3" and "wider format" in text and "global AQN" in text


def test_sigma_multipliers_tiers_and_aqn_loads_them(report, model, tmp_path):
    data = _synthetic(13).sigma_multipliers()
    # 10 layers; rows i < 13 are bad (layer i % 10), so layers 0, 1, 2 hold two bad modules each and
    # layer 2 the largest summed KL: worst 10 % (1 layer) x2.0, up to 30 % (2 more) x1.5, rest default.
    assert data == {"layer_multipliers": {"0": 1.5, "1": 1.5, "2": 2.0}, "default_multiplier": 1.0, "targeted": None}
    custom = _synthetic(3).sigma_multipliers(tiers=[(0.5, 3.0)], default=0.5, targeted="problematic")
    assert list(custom["layer_multipliers"].values()) == [3.0] * 5 and custom["default_multiplier"] == 0.5
    assert custom["targeted"] == [0, 1, 2]
    for bad in ([(0.5, 1.0), (0.3, 2.0)], [(1.5, 2.0)], [(0.1, -1.0)], ["x"]):
        with pytest.raises(ValueError, match="tier"):
            _synthetic(13).sigma_multipliers(tiers=bad)

    # The export of a real scan loads as AQN multipliers and steers the noise.
    path = report.save(tmp_path / "out") / "sigma_multipliers.json"
    loaded = LayerMultipliers.from_json(path)
    worst = report.worst_layers(1)[0].layer
    assert loaded.multiplier(worst) == 2.0
    aqn = AQN(Constant(1e-3), multipliers=path)
    per_param = aqn.parameter_multipliers(model)
    assert per_param[f"model.layers.{worst}.input_layernorm.weight"] == 2.0
    assert {v for k, v in per_param.items() if f"layers.{worst}." not in k} == {1.0}


def test_json_round_trip_and_summary(report):
    data = report.to_json()
    text = json.dumps(data)  # plain JSON
    back = ScanReport.from_json(json.loads(text))
    assert back.to_json() == data
    s = data["summary"]
    assert s["modules"] == 22 and s["decoder_layers"] == 3
    assert s["sqnr_db_min"] <= s["sqnr_db_mean"] <= s["sqnr_db_max"]
    for row in data["modules"]:
        for key in ("sqnr_db", "deadzone_ratio", "saturation_ratio", "relative_error", "loss_increase", "kl"):
            assert isinstance(row[key], float)
    assert data["recommendation"]["action"] == report.recommendation().action


def test_compare_two_formats(model, tok, report):
    wide = hn.scan(model, tok, format="mxfp8", end_to_end=True)
    diff = report.compare(wide)
    assert diff["a"]["format"] == "mxfp4" and diff["b"]["format"] == "mxfp8"
    assert diff["modules_in_both"] == 22 and diff["sqnr_db_mean_delta"] > 10
    assert all(r["sqnr_db_delta"] > 0 for r in diff["rows"])
    assert diff["b"]["kl_mean"] < diff["a"]["kl_mean"]
    assert len(diff["layers"]) == 3


def test_save_writes_every_file_and_a_self_contained_page(report, tmp_path):
    out = report.save(tmp_path / "scan")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["scan.html", "scan.json", "scan_deadzone.png", "scan_end_to_end.png", "scan_saturation.png",
                     "scan_sqnr.png", "sigma_multipliers.json"]
    page = (out / "scan.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page.replace("http-equiv", "")
    assert "Recommendation" in page and "model.layers." in page
    assert ScanReport.load(out).to_json() == json.loads((out / "scan.json").read_text())
    assert (out / "scan_sqnr.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_save_leaves_no_half_written_directory(report, tmp_path, monkeypatch):
    from hwnoise.scan import views

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(views, "render_plots", boom)
    with pytest.raises(KeyboardInterrupt):
        report.save(tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one
    monkeypatch.undo()
    previous = report.save(tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(views, "render_plots", boom)
    with pytest.raises(KeyboardInterrupt):
        _synthetic(3).save(tmp_path / "kept")
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before  # the old scan, whole
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]


def test_table_views(report):
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report.to_table(5))
    console.print(report.to_table(5, by="module"))
    text = console.export_text()
    assert "Worst decoder layers" in text and "Worst modules" in text and "lm_head" in text
    with pytest.raises(ValueError, match="by must be"):
        report.to_table(by="row")


# --- calibration texts ---------------------------------------------------------------------------------


def test_builtin_texts_are_varied_and_enough():
    assert len(BUILTIN_TEXTS) >= 16 and len(set(BUILTIN_TEXTS)) == len(BUILTIN_TEXTS)
    first8 = calibration_texts(None)
    assert len(first8) == 8
    assert any("def " in t for t in first8) and any("=" in t and any(c.isdigit() for c in t) for t in first8)
    assert len(calibration_texts(None, None)) == len(BUILTIN_TEXTS)


def test_texts_from_files(tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\nsecond text\n")
    assert calibration_texts(lines) == ["first text", "second text"]
    assert calibration_texts(str(lines), samples=1) == ["first text"]
    jsonl = tmp_path / "qs.jsonl"
    jsonl.write_text('{"question": "What is 2+2?", "answer": "#### 4"}\n{"question": "And 3+3?", "answer": "6"}\n')
    assert read_texts(jsonl) == ["What is 2+2?", "And 3+3?"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no text"):
        calibration_texts(empty)
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="question"):
        read_texts(bad)


@pytest.mark.skipif(not GSM8K.is_file(), reason="GSM8K test split not present beside the checkout")
def test_gsm8k_questions_as_calibration(model, tok):
    texts = calibration_texts(GSM8K, samples=4)
    first = json.loads(GSM8K.read_text().splitlines()[0])["question"]
    assert texts[0] == first and len(texts) == 4
    report = hn.scan(model, tok, texts=GSM8K, samples=4, format="mxfp4", targets="*.down_proj")
    assert report.texts == 4 and len(report.rows) == 3


# --- fault scan -----------------------------------------------------------------------------------------


def test_fault_scan_measures_and_flags(model, tok):
    faults = hn.scan_faults(model, tok, None, "bf16", "mxfp4", repeats=3)
    assert [l.layer for l in faults.layers] == [0, 1, 2]
    for l in faults.layers:
        assert l.gain_a > 0 and l.gain_b > 0 and l.gain_ratio == pytest.approx(l.gain_b / l.gain_a)
        assert l.kurtosis_ratio == pytest.approx(l.kurtosis_b / l.kurtosis_a)
        assert l.instability_b > l.instability_a > 0  # 4-bit stochastic rounding spreads more than bf16's
        assert l.flags == [n for n, r in (("gain", l.gain_ratio), ("kurtosis", l.kurtosis_ratio)) if r < 0.9]
    strict = hn.scan_faults(model, tok, None, "bf16", "mxfp4", repeats=1, ratio_threshold=5.0)
    assert strict.flagged == [0, 1, 2]
    same = hn.scan_faults(model, tok, None, "none", "none", repeats=2)
    assert all(l.gain_ratio == 1.0 and l.kurtosis_ratio == 1.0 and not l.flags and l.instability_a == 0
               for l in same.layers)
    data = faults.to_json()
    assert data["config_a"] == "bf16" and len(data["layers"]) == 3 and json.dumps(data)


def test_fault_scan_kurtosis_and_gain_against_direct_computation(model, tok):
    from scipy.stats import kurtosis

    faults = hn.scan_faults(model, tok, None, "none", "mxfp4", repeats=1, epsilon=1e-3)
    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outputs.setdefault(i, o if torch.is_tensor(o) else o[0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in hooks:
        h.remove()
    real = batch.attention_mask.bool()
    for l in faults.layers:
        assert l.kurtosis_a == pytest.approx(kurtosis(outputs[l.layer][real].double().flatten().numpy()), rel=1e-6)
        assert 0.2 < l.gain_a < 20


def test_fault_scan_bad_config_is_a_clear_error(model, tok):
    with pytest.raises(ValueError, match="mxfp5"):
        hn.scan_faults(model, tok, None, "bf16", "mxfp5")
    with pytest.raises(ValueError, match="no calibration texts"):
        hn.scan_faults(model, tok, [], "bf16", "mxfp4")
