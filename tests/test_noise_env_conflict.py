"""HWNOISE_ERROR with its own parameters and HWNOISE_SCALE together are refused (issue 13)."""

from __future__ import annotations

import pytest

from hwnoise.errors import RelativeGaussian, Truncation
from hwnoise.inject.env import HwnoiseEnvError, config_from_env


@pytest.mark.parametrize("spec", ["relative:0.05", "absolute:1e-3", "truncation:mbits=7", "quantize:mxfp4"])
def test_env_error_spec_with_its_own_scale_and_hwnoise_scale_conflict(spec):
    # Before: HWNOISE_SCALE=0.1 was silently ignored and the spec's value used.
    with pytest.raises(HwnoiseEnvError, match=rf"HWNOISE_ERROR='{spec}' already gives its parameters and "
                                              r"HWNOISE_SCALE='0.1' is set too; give the scale once"):
        config_from_env({"HWNOISE_ERROR": spec, "HWNOISE_SCALE": "0.1"})


def test_env_scale_given_once_is_accepted():
    assert config_from_env({"HWNOISE_ERROR": "relative", "HWNOISE_SCALE": "0.1"})["error"] == RelativeGaussian(0.1)
    assert config_from_env({"HWNOISE_ERROR": "relative:0.05"})["error"] == RelativeGaussian(0.05)
    assert config_from_env({"HWNOISE_ERROR": "relative:", "HWNOISE_SCALE": "0.1"})["error"] == RelativeGaussian(0.1)
    assert config_from_env({"HWNOISE_ERROR": "truncation", "HWNOISE_SCALE": "7"})["error"] == Truncation(mbits=7)
