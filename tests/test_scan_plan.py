"""Issue 12: the whole-model effect and the measured mixed-precision plan (`scan(plan=...)`,
`hwnoise scan --plan`), and the plan used as a weight format (Quantize(plan), weights:plan.json,
emulation.weight_format, AQN multipliers)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, bit_identical, independent_effect, snapshot, trained_tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.plans import WeightPlan  # noqa: E402
from hwnoise.scan import ScanReport  # noqa: E402
from hwnoise.scan.calibration import tokenize  # noqa: E402
from hwnoise.scan.texts import BUILTIN_TEXTS  # noqa: E402

TEXTS = list(BUILTIN_TEXTS[:8])
FRAGILE = "model.layers.1.mlp.down_proj"


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


@pytest.fixture(scope="module")
def fragile():
    """A trained tiny Llama in which one module, FRAGILE, is made fragile under MXFP4 by construction:
    up_proj's rows are scaled by d and down_proj's columns by 1/d, with d alternating 1 and 2^-8
    inside each 32-block. The clean model computes exactly the same function (powers of two), up_proj
    quantizes exactly as before (a power of two per row), but every 32-block of down_proj now holds
    values 2^8 apart: MXFP4's shared scale flushes half of them to zero."""
    tok = ByteTokenizer()
    model = trained_tiny_llama(tok, TEXTS, steps=60)
    mlp = model.model.layers[1].mlp
    n = mlp.up_proj.weight.shape[0]
    d = torch.where(torch.arange(n) % 2 == 0, torch.tensor(1.0), torch.tensor(2.0 ** -8))
    batch = tokenize(tok, TEXTS, 32)
    with torch.no_grad():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mlp.up_proj.weight.mul_(d[:, None])
        mlp.down_proj.weight.div_(d[None, :])
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)  # the same model, only more fragile
    return model, tok


@pytest.fixture(scope="module")
def planned(fragile):
    model, tok = fragile
    return hn.scan(model, tok, texts=TEXTS, format="mxfp4", plan=True, max_length=32, held_out=list(BUILTIN_TEXTS[8:16]))


def test_the_plan_buys_back_the_fragile_module_first(planned):
    plan = planned.plan
    assert plan.changes[0]["module"] == FRAGILE and plan.changes[0]["to"] == "bf16"
    p0, p1 = plan.points[0], plan.points[1]
    assert p0["changes"] == 0 and p1["changes"] == 1
    assert p1["kl"] < 0.5 * p0["kl"]  # measured: that one module carries most of the damage
    assert plan.formats[FRAGILE] == "bf16"
    assert planned.recommendation().action == "mixed_precision_plan"
    assert FRAGILE in planned.recommendation().keep_high_precision


def test_whole_model_effect_is_every_module_quantized_at_once(fragile, planned):
    model, tok = fragile
    batch = tokenize(tok, TEXTS, 32)
    plan = {r.name: "mxfp4" for r in planned.rows}  # the scan's modules, lm_head included
    loss, kl = independent_effect(model, batch, lambda: hn.inject(model, hn.errors.Quantize(plan), where="weight"))
    assert planned.whole_model["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert planned.whole_model["loss_increase"] == pytest.approx(loss, rel=1e-3, abs=1e-5)
    # The sum of solo effects is not the whole-model effect (errors interact).
    assert sum(r.kl for r in planned.rows) != pytest.approx(kl, rel=0.05)


def test_every_pareto_point_is_a_measurement_of_that_whole_plan(fragile, planned):
    model, tok = fragile
    batch = tokenize(tok, TEXTS, 32)
    plan = planned.plan
    before = snapshot(model)
    for point in (plan.points[1], plan.points[len(plan.points) // 2], plan.chosen_point):
        formats = plan.formats_at(point["changes"])
        loss, kl = independent_effect(model, batch,
                                      lambda: hn.inject(model, hn.errors.Quantize(formats), where="weight"))
        assert point["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert point["loss_increase"] == pytest.approx(loss, rel=1e-3, abs=1e-5)
    assert bit_identical(model, before)


def test_pareto_table_spans_all_base_to_all_bf16_with_effective_bits(planned):
    plan = planned.plan
    bits = [p["effective_bits"] for p in plan.points]
    assert bits[0] == pytest.approx(hn.formats.get("mxfp4").bits_per_value)  # 4.25: scale overhead included
    assert bits[-1] == pytest.approx(16.0)
    assert plan.points[-1]["changes"] == len(planned.rows)
    assert len(plan.points) >= 8 and bits == sorted(bits)
    assert any(p["pareto"] for p in plan.points)
    # Effective bits from the weight counts: one bf16 module among mxfp4 ones.
    n = plan.numel
    expected = (sum(n.values()) * 4.25 + n[FRAGILE] * (16 - 4.25)) / sum(n.values())
    assert plan.points[1]["effective_bits"] == pytest.approx(expected)


def test_default_target_is_a_third_of_the_whole_model_kl_and_held_out_is_measured(planned):
    plan = planned.plan
    assert plan.target == {"kind": "kl", "value": pytest.approx(plan.points[0]["kl"] / 3), "default": True}
    assert plan.met and plan.chosen_point["kl"] <= plan.target["value"]
    cheaper = [p for p in plan.points if p["effective_bits"] < plan.chosen_point["effective_bits"]]
    assert all(p["kl"] > plan.target["value"] for p in cheaper)  # the cheapest measured plan that meets it
    held = plan.held_out
    assert held["texts"] == 8 and held["plan"]["kl"] < held["base"]["kl"]
    assert "held-out" in planned.recommendation().text


def test_budget_bits_target_stays_within_budget(fragile):
    model, tok = fragile
    report = hn.scan(model, tok, texts=TEXTS, format="mxfp4", plan="bf16", budget_bits=6.0, max_length=32, held_out=False)
    plan = report.plan
    assert plan.target["kind"] == "bits" and plan.chosen_point["effective_bits"] <= 6.0
    assert WeightPlan.coerce(plan.formats).effective_bits(model) == pytest.approx(plan.chosen_point["effective_bits"])
    assert plan.held_out is None


def test_several_candidate_formats_and_solo_passes_are_counted(fragile):
    model, tok = fragile
    report = hn.scan(model, tok, texts=TEXTS, format="mxfp4", plan="mxfp8_e4m3,bf16", target_kl=0.0, max_length=32,
                     held_out=False)
    plan = report.plan
    assert plan.candidates == ["mxfp4", "mxfp8_e4m3", "bf16"]
    assert plan.cost["forward_passes"]["solo"] == len(report.rows)  # mxfp8 measured alone; bf16 is not
    assert {c["to"] for c in plan.changes} == {"mxfp8_e4m3", "bf16"}
    assert plan.points[-1]["effective_bits"] == pytest.approx(16.0)
    for c in plan.changes:  # a module's upgrades come in order of bits
        assert hn.formats.get(c["to"]).bits_per_value > hn.formats.get(c["from"]).bits_per_value


def test_scale_mode_check_is_measured_with_rceil(planned):
    check = planned.plan.scale_mode
    assert check["variant"] == "mxfp4:rceil"
    assert check["whole_model"]["rceil"]["kl"] > 0 and check["whole_model"]["rceil"]["kl"] != check["whole_model"]["floor"]["kl"]
    assert "rceil" in check["verdict"]
    for c in check["checked"]:
        assert c["clip_error_share"] > 0.5


def test_save_writes_plan_json_and_reads_back(fragile, planned, tmp_path):
    model, tok = fragile
    out = planned.save(tmp_path / "scan")
    plan_file = out / "plan.json"
    formats = json.loads(plan_file.read_text())
    assert formats == planned.plan.formats and set(formats) == {r.name for r in planned.rows}
    data = json.loads((out / "scan.json").read_text())
    assert data["whole_model"]["kl"] == pytest.approx(planned.whole_model["kl"])
    assert data["summary"]["whole_model_kl"] == pytest.approx(planned.whole_model["kl"])
    assert len(data["plan"]["pareto"]) >= 1 and data["plan"]["cost"]["forward_passes"]["total"] > 0
    assert "scan_plan.png" in (out / "scan.html").read_text()
    again = ScanReport.load(out)
    assert again.plan_formats() == planned.plan.formats
    assert again.recommendation().text == planned.recommendation().text
    # AQN multipliers derived from the plan load into the AQN's own reader.
    from hwnoise.aqn import LayerMultipliers

    mult = LayerMultipliers.from_json(out / "plan_sigma_multipliers.json")
    assert mult.layer_multipliers[1] < 1.0  # layer 1 holds the fragile module, bought back to bf16


def test_plan_as_a_weight_format_everywhere(fragile, planned, tmp_path):
    model, tok = fragile
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(planned.plan.formats))
    before = snapshot(model)
    batch = tokenize(tok, TEXTS, 32)
    formats = planned.plan.formats
    # weights:plan.json in an Emulation (eval), both paths (swap, and straight-through hooks for training).
    emulation = hn.Emulation.parse(f"weights:{path}")
    seen = {}
    fragile_module = dict(model.named_modules())[FRAGILE]
    other = dict(model.named_modules())["model.layers.0.mlp.up_proj"]

    def record(name):
        def hook(module, args):
            seen[name] = module.weight.detach().clone()
        return hook

    for grad in (False, True):
        with emulation.applied(model, grad=grad):
            # Registered after the emulation's own pre-hooks (grad=True): they see what forward sees.
            handles = [fragile_module.register_forward_pre_hook(record("fragile")),
                       other.register_forward_pre_hook(record("other"))]
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            finally:
                for h in handles:
                    h.remove()
        assert torch.equal(seen["fragile"], hn.quantize(fragile_module.weight.detach(), formats[FRAGILE]))
        assert torch.equal(seen["other"], hn.quantize(other.weight.detach(), formats["model.layers.0.mlp.up_proj"]))
    assert bit_identical(model, before)
    # The joint effect through the Emulation equals the plan's measured point.
    loss, kl = independent_effect(model, batch, lambda: emulation.applied(model))
    assert kl == pytest.approx(planned.plan.chosen_point["kl"], rel=1e-3, abs=1e-6)
    # emulation.rollout in the training config accepts the plan file, and refuses a bad one.
    from hwnoise.rl.config import ConfigError, TrainConfig

    cfg = TrainConfig.from_dict({"emulation": {"rollout": f"weights:{path}"}})
    try:
        cfg.validate()
    except ConfigError as err:
        assert "emulation.rollout" not in str(err), err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lm_head": "mxfp5"}))
    with pytest.raises(ConfigError, match="emulation.rollout.*mxfp5"):
        TrainConfig.from_dict({"emulation": {"rollout": f"weights:{bad}"}}).validate()


def test_bad_plan_inputs_are_clear_errors(fragile, tmp_path):
    model, tok = fragile
    with pytest.raises(ValueError, match="one plan target"):
        hn.scan(model, tok, texts=TEXTS, plan=True, target_kl=0.1, budget_bits=5)
    with pytest.raises(ValueError, match="not more than the scan's format"):
        hn.scan(model, tok, texts=TEXTS, format="mxfp8_e4m3", plan="mxfp4")
    with pytest.raises(ValueError, match="where='weight'"):
        hn.scan(model, tok, texts=TEXTS, where="input", plan=True)
    with pytest.raises(ValueError, match="unknown format 'mxfp5'"):
        hn.scan(model, tok, texts=TEXTS, plan="mxfp5")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"model.layers.9.mlp.down_proj": "mxfp4"}))
    with pytest.raises(ValueError, match="model.layers.9.mlp.down_proj"):
        hn.inject(model, hn.errors.Quantize(str(path)), where="weight")
    path.write_text(json.dumps({"lm_head": "mxfp5"}))
    with pytest.raises(ValueError, match="lm_head.*mxfp5"):
        hn.Emulation.parse(f"weights:{path}")
    with pytest.raises(ValueError, match="not found"):
        hn.Emulation.parse(f"weights:{tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="through hwnoise.inject"):
        hn.errors.Quantize({"lm_head": "mxfp4"}).apply(torch.ones(4))


def test_cli_scan_plan_writes_plan_json_and_prints_the_pareto_table(fragile, tmp_path, monkeypatch):
    import hwnoise.models
    from typer.testing import CliRunner

    from hwnoise.cli import app

    model, tok = fragile
    monkeypatch.setattr(hwnoise.models, "load", lambda spec, **kw: (model, tok))
    out = tmp_path / "scan"
    result = CliRunner().invoke(app, ["scan", "tiny", "--plan", "bf16", "--target-kl", "0.01", "--max-length", "32",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Whole model" in result.output and "Mixed-precision plan" in result.output
    assert "forward passes" in result.output
    formats = json.loads((out / "plan.json").read_text())
    assert formats[FRAGILE] == "bf16"
    data = json.loads((out / "scan.json").read_text())
    assert data["plan"]["target"] == {"kind": "kl", "value": 0.01, "default": False}
    assert data["plan"]["held_out"]["texts"] == 8  # the built-in texts after the 8 calibration ones


@pytest.mark.parametrize("args, words", [
    (["--target-kl", "0.1"], "give --plan too"),
    (["--plan", "bf16", "--target-kl", "0.1", "--budget-bits", "5"], "one plan target"),
    (["--plan", "mxfp5"], "unknown format 'mxfp5'"),
    (["--plan", "bf16", "--where", "input"], "--where weight"),
])
def test_cli_bad_plan_options_exit_2_before_any_work(args, words, tmp_path, monkeypatch):
    import hwnoise.models
    from typer.testing import CliRunner

    from hwnoise.cli import app

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(hwnoise.models, "load", no_load)
    result = CliRunner().invoke(app, ["scan", "tiny", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
