"""The names table (README, "Names"): one test per row. The new name works, the old one still
works, gives the same result, and warns with HwnoiseDeprecationWarning (until 0.3)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

import hwnoise as hn
from hwnoise.compat import HwnoiseDeprecationWarning

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _scan_models import ByteTokenizer, tiny_llama  # noqa: E402


def _module(name):
    return importlib.import_module(name)  # hwnoise.scan / hwnoise.inject are functions on hwnoise


def _no_warning(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", HwnoiseDeprecationWarning)
        return call()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


# -- a number format: `format` ---------------------------------------------------------------

def test_row_format_argument():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    new = _no_warning(lambda: hn.formats.quantize(x, format="mxfp4"))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"fmt=.*format="):
        old = hn.formats.quantize(x, fmt="mxfp4")
    assert torch.equal(new, old)
    with pytest.warns(HwnoiseDeprecationWarning, match=r"fmt="):
        old_enc = hn.formats.encode(x, fmt="nvfp4")
    assert torch.equal(hn.formats.decode(old_enc), hn.formats.decode(_no_warning(lambda: hn.formats.encode(x, format="nvfp4"))))
    new_sat = _no_warning(lambda: hn.metrics.saturation_ratio(10 * x, new, format="mxfp4"))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"fmt="):
        assert hn.metrics.saturation_ratio(10 * x, new, fmt="mxfp4") == new_sat
    with pytest.raises(TypeError, match="got both 'fmt'"):
        hn.formats.quantize(x, fmt="mxfp4", format="mxfp4")


def test_row_format_a_format_b_of_scan_faults(tok):
    net = tiny_llama(layers=1)
    new = _no_warning(lambda: hn.scan_faults(net, tok, None, format_a="bf16", format_b="mxfp4", repeats=1, samples=2))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"config_a=.*format_a="):
        old = hn.scan_faults(net, tok, None, config_a="bf16", config_b="mxfp4", repeats=1, samples=2)
    assert old.to_dict() == new.to_dict() if hasattr(new, "to_dict") else old == new


# -- which modules: `targets` ------------------------------------------------------------------

def test_row_targets_of_aqn():
    from hwnoise.aqn import AQN, Constant

    new = _no_warning(lambda: AQN(Constant(0.01), targets=("rmsnorm",)))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"layer_types"):
        old = AQN(Constant(0.01), layer_types=("rmsnorm",))
    assert tuple(old.targets) == tuple(new.targets) == ("rmsnorm",)
    net = tiny_llama(layers=1)
    assert old.select(net).keys() == new.select(net).keys() if hasattr(new, "select") else True


def test_row_targets_of_train_config():
    from hwnoise.rl.config import TrainConfig

    new = _no_warning(lambda: TrainConfig.from_dict({"aqn": {"enabled": True, "targets": ["rmsnorm"]}}))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"aqn\.layer_types"):
        old = TrainConfig.from_dict({"aqn": {"enabled": True, "layer_types": ["rmsnorm"]}})
    assert old.aqn == new.aqn and tuple(old.aqn.targets) == ("rmsnorm",)


# -- where on a module: `where` ----------------------------------------------------------------

def test_row_where_of_scan(tok):
    net = tiny_llama(layers=1)
    new = _no_warning(lambda: hn.scan(net, tok, format="mxfp4", where="input", samples=2, end_to_end=False))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"mode=.*where="):
        old = hn.scan(net, tok, format="mxfp4", mode="input", samples=2, end_to_end=False)
    assert [(r.name, r.sqnr_db) for r in old.rows] == [(r.name, r.sqnr_db) for r in new.rows]


def test_row_where_of_scan_cli_option():
    import typer.main

    from hwnoise.cli import app

    command = typer.main.get_command(app).commands["scan"]
    options = {opt for p in command.params for opt in p.opts}
    assert "--where" in options and "--mode" in options  # the old option is kept (hidden)


# -- phases ------------------------------------------------------------------------------------

def test_row_phases():
    inject = _module("hwnoise.inject")
    assert inject.PHASES == ("rollout", "training") and inject.INJECTION_PHASES == ("rollout", "training", "both")
    with pytest.warns(HwnoiseDeprecationWarning, match=r"rl\.config\.PHASES"):
        old = _module("hwnoise.rl.config").PHASES
    assert old == inject.INJECTION_PHASES


# -- element rounding ---------------------------------------------------------------------------

def test_row_rounding_modes():
    assert "rne" in hn.formats.ROUNDING_MODES and "stochastic" in hn.formats.ROUNDING_MODES
    aqn = _module("hwnoise.aqn")
    with pytest.warns(HwnoiseDeprecationWarning, match=r"ROUNDING_MODES.*NOISE_ROUNDING"):
        assert aqn.ROUNDING_MODES == aqn.NOISE_ROUNDING
    hif4 = _module("hwnoise.formats.hif4")
    with pytest.warns(HwnoiseDeprecationWarning, match=r"ROUNDING_MODES.*HIF4_ROUNDING_MODES"):
        assert hif4.ROUNDING_MODES == hif4.HIF4_ROUNDING_MODES


# -- metrics ------------------------------------------------------------------------------------

def test_row_answer_metrics():
    ev = _module("hwnoise.eval")
    assert ev.ANSWER_METRICS == ("strict", "flexible")
    for module in ("hwnoise.eval", "hwnoise.eval.report"):
        with pytest.warns(HwnoiseDeprecationWarning, match=r"METRICS.*ANSWER_METRICS"):
            assert _module(module).METRICS == ev.ANSWER_METRICS


def test_row_layer_metrics():
    scan = _module("hwnoise.scan")
    assert "sqnr_db" in scan.LAYER_METRICS
    with pytest.warns(HwnoiseDeprecationWarning, match=r"METRICS.*LAYER_METRICS"):
        assert _module("hwnoise.scan.report").METRICS == scan.LAYER_METRICS


# -- run state file -----------------------------------------------------------------------------

def test_row_run_state_files():
    for module, new in (("hwnoise.eval.core", "EVAL_RUN_FILE"), ("hwnoise.rl.run", "TRAIN_RUN_FILE")):
        mod = _module(module)
        assert getattr(mod, new) == "run.json"
        with pytest.warns(HwnoiseDeprecationWarning, match=rf"RUN_FILE.*{new}"):
            assert mod.RUN_FILE == getattr(mod, new)


# -- progress callback --------------------------------------------------------------------------

def test_row_on_progress_of_survey():
    from hwnoise.formats.survey import survey_formats

    weights = {"a": torch.randn(8, 32, generator=torch.Generator().manual_seed(1)), "b": torch.randn(8, 32)}
    calls, steps = [], []
    new = _no_warning(lambda: survey_formats(weights, ["mxfp4"], on_progress=lambda *a: calls.append(a)))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"on_step.*on_progress"):
        old = survey_formats(weights, ["mxfp4"], on_step=lambda *a: steps.append(a))
    assert old == new
    assert [c[1:] for c in calls] == [(1, 2), (2, 2)] and all(isinstance(c[0], str) for c in calls)
    assert len(steps) == 2 and all(len(s) == 2 for s in steps)


def test_row_on_progress_of_scan(tok):
    net = tiny_llama(layers=1)
    calls, steps = [], []
    new = _no_warning(lambda: hn.scan(net, tok, format="mxfp4", samples=2, end_to_end=False,
                                      on_progress=lambda *a: calls.append(a)))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"on_step"):
        old = hn.scan(net, tok, format="mxfp4", samples=2, end_to_end=False, on_step=lambda *a: steps.append(a))
    assert [(r.name, r.sqnr_db) for r in old.rows] == [(r.name, r.sqnr_db) for r in new.rows]
    assert calls and steps and all(len(c) == 3 and c[1] <= c[2] for c in calls)


# -- a hardware condition: an emulation spec ----------------------------------------------------

def test_row_emulation_moved_to_hwnoise_emulation():
    from hwnoise.emulation import Emulation

    inject = _module("hwnoise.inject")
    with pytest.warns(HwnoiseDeprecationWarning, match=r"hwnoise\.inject\.Emulation.*hwnoise\.emulation\.Emulation"):
        old = inject.Emulation
    assert old is Emulation and old.parse("weights:mxfp4") == Emulation.parse("weights:mxfp4")


def test_row_train_config_emulation_per_phase_specs():
    from hwnoise.rl.config import TrainConfig

    new = _no_warning(lambda: TrainConfig.from_dict({"emulation": {"rollout": "weights:mxfp4+relative:0.05@ops"}}))
    with pytest.warns(HwnoiseDeprecationWarning, match=r"emulation\.weight_format"):
        old = TrainConfig.from_dict({"emulation": {"weight_format": "mxfp4", "weight_phase": "rollout",
                                                   "noise": "relative", "noise_scale": 0.05, "noise_phase": "rollout"}})
    assert old.emulation_for("rollout") == new.emulation_for("rollout")
    assert str(new.emulation_for("rollout")) == "weights:mxfp4+relative:0.05@ops"
    assert old.emulation_for("training") == new.emulation_for("training")
