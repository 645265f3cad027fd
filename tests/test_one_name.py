"""One name per concept and no deprecation layer before a first release (issue 21): the helpers and
the old names are gone from the package, and using an old name is an error, not a silent alias."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import hwnoise as hn

SRC = Path(__file__).resolve().parents[1] / "src" / "hwnoise"

# The deprecation helpers and the old names of the former names table (config keys, keyword
# arguments, module attributes). Output JSON keys that kept their names ("mode", faults.json's
# config_a/config_b) are data, not API names, and are not listed.
GONE = [r"\brenamed_kwargs\b", r"\bmodule_aliases\b", r"\bwarn_renamed\b", r"HwnoiseDeprecationWarning",
        r"\bREMOVED_IN\b", r"\blayer_types\b", r"\bRENAMED_KEYS\b", r"_LEGACY", r"\bweight_phase\b",
        r"\binput_phase\b", r"\bnoise_scale\b", r"\bnoise_ops\b", r"\bon_step\b", r"hwnoise\.compat",
        r"report\.(scan_views|eval_views|files|runs)\b", r"\bfrom \.\.report import", r"hwnoise\.report import", r"\bfmt=\"?(mx|nv|bf|hif)"]


def test_no_deprecation_helper_or_old_name_in_the_package():
    assert not (SRC / "compat.py").exists() and not (SRC / "report").exists()
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in GONE:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(SRC)}:{line}: {m.group(0)}")
    assert not found, "\n".join(found)


def test_the_checker_finds_an_old_name(tmp_path):
    """The patterns are not vacuous: each old form written out is caught."""
    samples = ["from ..compat import renamed_kwargs", "from ..report import atomic_write_json", "AQN(s, layer_types=x)", "emulation.noise_scale",
               "on_step(phase, name)", "import hwnoise.report.scan_views", 'quantize(x, fmt="mxfp4")']
    for sample in samples:
        assert any(re.search(p, sample) for p in GONE), sample


def test_old_keyword_arguments_are_type_errors():
    x = torch.randn(2, 32)
    with pytest.raises(TypeError, match="fmt"):
        hn.formats.quantize(x, fmt="mxfp4")
    with pytest.raises(TypeError, match="fmt"):
        hn.formats.encode(x, "nvfp4", fmt="nvfp4")
    with pytest.raises(TypeError, match="fmt"):
        hn.metrics.saturation_ratio(x, x, fmt="mxfp4")
    from hwnoise.formats.survey import survey_formats

    with pytest.raises(TypeError, match="on_step"):
        survey_formats({"w": x}, ["mxfp4"], on_step=print)
    assert torch.equal(hn.formats.quantize(x, format="mxfp4"), hn.formats.quantize(x, "mxfp4"))


@pytest.mark.parametrize("module, old", [
    ("hwnoise.aqn", "ROUNDING_MODES"), ("hwnoise.aqn.noise", "ROUNDING_MODES"),
    ("hwnoise.formats.hif4", "ROUNDING_MODES"), ("hwnoise.eval", "METRICS"), ("hwnoise.eval", "RUN_FILE"),
    ("hwnoise.eval.core", "RUN_FILE"), ("hwnoise.eval.report", "METRICS"), ("hwnoise.rl.run", "RUN_FILE"),
    ("hwnoise.rl.config", "PHASES"), ("hwnoise.scan", "MODES"), ("hwnoise.scan.report", "METRICS"),
    ("hwnoise.inject", "Emulation"),
])
def test_old_module_attributes_are_gone(module, old):
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), old)


def test_old_modules_and_methods_are_gone():
    for name in ("hwnoise.compat", "hwnoise.report", "hwnoise.inject.emulation"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
    spec = hn.formats.get("mxfp4")
    assert not any(hasattr(spec, m) for m in ("quantize", "encode", "decode"))
