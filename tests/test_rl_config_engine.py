"""One config engine: `hwnoise train` and the verl keys share the schema and the checks of what they
share (the AQN section, emulation specs, one ConfigError, unknown-key messages). The verl side is
driven through ``rollout_settings`` (plain dicts: no verl, Ray or Hydra needed)."""

from __future__ import annotations

import pytest

from hwnoise.integrations.verl import config as verl
from hwnoise.rl import config as train
from hwnoise.rl.config import AQNConfig, ConfigError, TrainConfig

R = verl.ROLLOUT_PREFIX


def _train_error(aqn: dict) -> str:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"steps": 6, "aqn": {"enabled": True, **aqn}}).validate()
    return str(err.value)


def _verl_error(custom: dict) -> str:
    with pytest.raises(ConfigError) as err:
        verl.rollout_settings({"hwnoise": custom})
    return str(err.value)


def test_one_config_error_class_and_one_aqn_section():
    assert verl.ConfigError is train.ConfigError
    # the verl AQN keys are the training config's aqn section, help text included
    assert {k.rsplit(".", 1)[-1] for k in verl.KEYS if k.startswith(f"{R}.aqn.")} == {
        k.split(".", 1)[1] for k in TrainConfig.fields_help() if k.startswith("aqn.")}
    s = verl.rollout_settings({"hwnoise": {"aqn": {"enabled": True, "schedule": "constant", "sigma_start": 0.02}}})
    assert s.aqn == AQNConfig(enabled=True, schedule="constant", sigma_start=0.02)
    assert s.schedule == train.aqn_schedule(s.aqn) and s.schedule.sigma_at(3, 10, None) == 0.02


@pytest.mark.parametrize("aqn, message", [
    ({"sigma_start": 0.001, "sigma_end": 0.01}, "sigma_start (0.001) is below sigma_end (0.01)"),
    ({"sigma_end": 0.0}, "sigma_end must be > 0"),
    ({"stages": 1}, "stages must be an integer >= 2"),
    ({"schedule": "cosine"}, "schedule: unknown value 'cosine'; known: staged, epoch_aware, constant"),
    ({"multipliers": "/nonexistent/m.json"}, "multipliers: cannot read AQN multipliers file '/nonexistent/m.json'"),
    ({"stages": "one"}, "aqn.stages must be an integer; got 'one'"),
])
def test_the_same_aqn_problem_reads_the_same_in_train_and_verl(aqn, message):
    """One validation: the same bad AQN value gives the same finding, under each surface's key."""
    t, v = _train_error(aqn), _verl_error({"aqn": {"enabled": True, **aqn}})
    assert message in t and message in v, (t, v)
    assert f"{R}.aqn" in v and (f"{R}.aqn" not in t)


def test_the_same_emulation_spec_error_in_train_and_verl():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"steps": 6, "emulation": {"rollout": "weights:mxfp5"}}).validate()
    t = str(err.value)
    v = _verl_error({"emulation": "weights:mxfp5"})
    problem = t.split("emulation.rollout: ", 1)[1].splitlines()[0]
    assert "unknown format 'mxfp5'" in problem and problem in v and f"{R}.emulation='weights:mxfp5'" in v


def test_every_unknown_key_is_named_in_verl_too():
    text = _verl_error({"aqn": {"sigma_strat": 0.1, "layer_types": ["rmsnorm"]}, "emulaton": "weights:mxfp4"})
    assert text.startswith("3 unknown hwnoise keys:"), text
    for key in ("aqn.sigma_strat", "aqn.layer_types", "hwnoise.emulaton"):
        assert f"unknown hwnoise key '{R.rsplit('.hwnoise', 1)[0]}" in text and key in text, (key, text)
    assert f"+{R}.aqn.sigma_start" in text and f"+{R}.aqn.targets" in text and f"+{R}.emulation" in text


def test_parse_emulation_and_coerce_section_refuse_by_key():
    assert train.parse_emulation(None, "k").is_clean
    assert train.parse_emulation("weights:mxfp4", "k").weight_format == "mxfp4"
    with pytest.raises(ConfigError, match=r"^emulation.training: .*unknown format 'mxfp5'"):
        train.parse_emulation("weights:mxfp5", "emulation.training")
    assert train.coerce_section(AQNConfig, {"enabled": True, "stages": 5.0}, "aqn") == AQNConfig(enabled=True, stages=5)
    with pytest.raises(ConfigError, match=r"2 unknown keys:\n  config: unknown key 'aqn.x'.*\n  config: unknown key 'aqn.y'"):
        train.coerce_section(AQNConfig, {"x": 1, "y": 2}, "aqn")
