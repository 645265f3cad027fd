"""The scan on the bundled SmolLM2-135M (issue 5, "It must show" 1, 3, 5): every linear and every
decoder layer with all metrics, formats ordered by SQNR, an end-to-end ranking that holds when
re-measured without the scan's machinery, and parameters bit-identical afterwards."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import InPlace, bit_identical, independent_effect, snapshot  # noqa: E402

import hwnoise as hn  # noqa: E402

pytestmark = pytest.mark.slow

# From a full MXFP4 weight scan of this model (8 built-in texts x 32 tokens): layer 2's down_proj has
# the largest end-to-end effect of the decoder linears, layer 0's q_proj one of the smallest.
LARGE, SMALL = "model.layers.2.mlp.down_proj", "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def bundled():
    from hwnoise.models import load

    return load("default")


def test_every_linear_and_layer_with_all_metrics_params_untouched(bundled):
    model, tok = bundled
    before = snapshot(model)
    report = hn.scan(model, tok, format="mxfp4", end_to_end=False)
    assert bit_identical(model, before)
    assert len(report.rows) == 211 and len(report.layers) == 30
    assert [l.layer for l in report.layers] == list(range(30))
    assert report.rows[-1].name == "lm_head"
    for row in report.rows:
        for key in ("sqnr_db", "deadzone_ratio", "saturation_ratio", "relative_error"):
            assert math.isfinite(getattr(row, key)), (row.name, key)
    lo, hi = min(r.sqnr_db for r in report.rows), max(r.sqnr_db for r in report.rows)
    print(f"MXFP4 weight SQNR over the 211 linears: {lo:.2f} .. {hi:.2f} dB (mean {report.mean():.2f})")
    assert 10 < lo < hi < 30


def test_mean_sqnr_ordered_mxfp8_nvfp4_mxfp4(bundled):
    model, tok = bundled
    means = {fmt: hn.scan(model, tok, format=fmt, end_to_end=False).mean("sqnr_db")
             for fmt in ("mxfp8", "nvfp4", "mxfp4")}
    print("mean weight SQNR (dB):", {k: round(v, 2) for k, v in means.items()})
    assert means["mxfp8"] > means["nvfp4"] > means["mxfp4"]


def test_end_to_end_ranking_holds_when_re_measured(bundled):
    model, tok = bundled
    before = snapshot(model)
    report = hn.scan(model, tok, format="mxfp4", targets=[LARGE, SMALL, "lm_head"])
    assert bit_identical(model, before)
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {LARGE, SMALL, "lm_head"}
    assert all(r.kl is not None and r.kl >= 0 for r in rows.values())

    # Independent: quantize the weight in place, two plain full forwards, cross-entropy by hand.
    from hwnoise.scan.calibration import DEFAULT_MAX_LENGTH, tokenize
    from hwnoise.scan.texts import calibration_texts

    batch = tokenize(tok, calibration_texts(None), DEFAULT_MAX_LENGTH)
    measured, kl = {}, {}
    modules = dict(model.named_modules())
    for name in (LARGE, SMALL):
        measured[name], kl[name] = independent_effect(model, batch, lambda name=name: InPlace(modules[name], "mxfp4"))
    assert bit_identical(model, before)
    print(f"{LARGE}: scan +{rows[LARGE].loss_increase:.4f} (KL {rows[LARGE].kl:.4f}), "
          f"re-measured +{measured[LARGE]:.4f}; {SMALL}: scan {rows[SMALL].loss_increase:+.5f} "
          f"(KL {rows[SMALL].kl:.2e}), re-measured {measured[SMALL]:+.5f} (KL {kl[SMALL]:.2e}); lm_head: +{rows['lm_head'].loss_increase:.4f}")
    for name in (LARGE, SMALL):
        assert rows[name].loss_increase == pytest.approx(measured[name], abs=2e-4)
        assert rows[name].kl == pytest.approx(kl[name], rel=0.02, abs=2e-6)
    assert rows[LARGE].kl > 100 * rows[SMALL].kl
    assert measured[LARGE] > measured[SMALL] + 0.05
