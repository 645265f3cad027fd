"""Must-show 3: a verl config composed from verl's own YAML with hwnoise keys validates; a
misspelled key or an impossible combination stops before any worker starts, naming the key."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from hwnoise.integrations.verl.config import (
    PLUGIN_MODULE, TRAINER_MODE, WORKER_EXTENSION, ConfigError, prepare, validate,
)

R = "+actor_rollout_ref.rollout.custom.hwnoise"
GRID = [f"{R}.emulation=weights:nvfp4", f"{R}.aqn.enabled=true", f"{R}.aqn.schedule=epoch_aware",
        f"{R}.aqn.sigma_start=0.01", f"{R}.aqn.sigma_end=0.0005", f"{R}.aqn.stages=5",
        "+trainer.hwnoise.emulation=relative:0.05@ops", "+trainer.hwnoise.seed=7",
        "actor_rollout_ref.rollout.enforce_eager=True", "actor_rollout_ref.rollout.name=vllm"]


def with_override(override):
    """GRID with ``override`` in place of the grid's own value for that key (or added)."""
    key = override.split("=", 1)[0].lstrip("+")
    return [o for o in GRID if o.split("=", 1)[0].lstrip("+") != key] + [override]


def verl_config(overrides):
    """verl's own ppo_trainer config (its packaged YAML), composed by Hydra with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_grid_config_from_verl_yaml_validates():
    config = verl_config(GRID)
    s = validate(config)
    assert s.weight_format == "nvfp4" and s.aqn.schedule == "epoch_aware" and s.aqn.stages == 5
    assert s.operator_noise.error == "relative:0.05" and s.seed == 7 and s.aqn_seed == 7
    assert s.env_vars() == {"HWNOISE_ERROR": "relative:0.05", "HWNOISE_OPS": "linear,matmul,bmm", "HWNOISE_SEED": "7"}
    # the rollout keys also convert into verl's RolloutConfig (the dataclass its workers receive)
    from verl.utils.config import omega_conf_to_dataclass

    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    assert rollout.custom["hwnoise"]["emulation"] == "weights:nvfp4"


def test_prepare_fills_the_extension_points():
    config = verl_config(GRID)
    prepare(config)
    assert config.trainer.v1.trainer_mode == TRAINER_MODE
    assert config.actor_rollout_ref.rollout.engine_kwargs.vllm.worker_extension_cls == WORKER_EXTENSION
    env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_USE_EXTERNAL_MODULES == PLUGIN_MODULE and env.HWNOISE_ERROR == "relative:0.05"


def test_emulation_specs_carry_ops_and_excludes():
    """What the per-field keys say, the spec strings say too (one language); both at once is refused."""
    s = validate(verl_config(with_override("+trainer.hwnoise.emulation='relative:0.05@ops[linear,matmul]'")))
    assert s.operator_noise.ops == ("linear", "matmul") and s.env_vars()["HWNOISE_OPS"] == "linear,matmul"
    keyed = validate(verl_config(with_override("+trainer.hwnoise.ops=[linear,matmul]")))
    assert keyed.operator_noise == s.operator_noise
    with pytest.raises(ConfigError, match="give the ops once"):
        validate(verl_config(with_override("+trainer.hwnoise.emulation='relative:0.05@ops[linear]'")
                             + ["+trainer.hwnoise.ops=[matmul]"]))
    s = validate(verl_config(with_override(f"{R}.emulation='weights:nvfp4+exclude:*.down_proj'")))
    assert s.weight_format == "nvfp4" and s.weight_exclude == ("lm_head", "embed_tokens", "*.down_proj")
    assert validate(verl_config(GRID)).weight_exclude == ("lm_head", "embed_tokens")
    with pytest.raises(ConfigError, match="give the excludes once"):
        validate(verl_config(with_override(f"{R}.emulation='weights:nvfp4+exclude:*.down_proj'")
                             + [f"{R}.exclude=[lm_head]"]))


def test_no_hwnoise_keys_change_nothing():
    config = verl_config([])
    assert not validate(config).active
    prepare(config)
    assert config.trainer.v1.trainer_mode == "sync"


@pytest.mark.parametrize("override, names", [
    (f"{R}.aqn.sigma_strat=0.01", ["aqn.sigma_strat", "aqn.sigma_start"]),
    (f"{R}.emulaton=weights:mxfp4", ["hwnoise.emulaton", "hwnoise.emulation"]),
    ("+trainer.hwnoise.aqn.sigma_start=0.01", ["trainer.hwnoise.aqn.sigma_start",
                                               "actor_rollout_ref.rollout.custom.hwnoise.aqn.sigma_start"]),
    ("+trainer.hwnoise.seeed=1", ["trainer.hwnoise.seeed", "trainer.hwnoise.seed"]),
])
def test_misspelled_key_is_named_with_a_suggestion(override, names):
    with pytest.raises(ConfigError) as err:
        validate(verl_config(with_override(override)))
    first = str(err.value).splitlines()[0]
    assert "unknown hwnoise key" in first and all(n in first for n in names), first


@pytest.mark.parametrize("override, key", [
    ("actor_rollout_ref.actor.strategy=megatron", "actor_rollout_ref.actor.strategy=megatron"),
    ("actor_rollout_ref.rollout.data_parallel_size=2", "actor_rollout_ref.rollout.data_parallel_size=2"),
    (f"{R}.emulation=weights:/nonexistent/plan.json", "hwnoise.emulation='weights:/nonexistent/plan.json'"),
    ("trainer.v1.trainer_mode=colocate_async", "trainer.v1.trainer_mode=colocate_async"),
    ("trainer.v1.trainer_mode=separate_async", "trainer.v1.trainer_mode=separate_async"),
    ("actor_rollout_ref.rollout.enforce_eager=False", "actor_rollout_ref.rollout.enforce_eager=False"),
    ("actor_rollout_ref.rollout.name=sglang", "actor_rollout_ref.rollout.name=sglang"),
    ("trainer.use_v1=False", "trainer.use_v1=False"),
    (f"{R}.aqn.targets=[rmsnorm,linear]", "aqn.targets"),
    (f"{R}.aqn.layer_types=[rmsnorm,linear]", "aqn.layer_types"),
    (f"{R}.emulation='weights:nvfp4+targets:*.q_proj'", "exclude:G1,G2"),
    (f"{R}.aqn.sigma_end=0.0", "aqn"),
    (f"{R}.aqn.stages=one", "aqn.stages"),
    (f"{R}.emulation=weights:mxfp5", "hwnoise.emulation='weights:mxfp5'"),
    (f"{R}.emulation=relative:0.05@ops", "trainer.hwnoise.emulation"),
    ("+trainer.hwnoise.emulation=weights:mxfp4", "trainer.hwnoise.emulation='weights:mxfp4'"),
    ("+trainer.hwnoise.ops=[linear,conv]", "trainer.hwnoise.ops"),
    ("+trainer.hwnoise.emulation='relative:0.05@ops[conv]'", "trainer.hwnoise.emulation='relative:0.05@ops[conv]'"),
    (f"{R}.aqn.multipliers=/nonexistent/sigma_multipliers.json", "aqn.multipliers"),
    ("+actor_rollout_ref.rollout.engine_kwargs.vllm.worker_extension_cls=my.Ext", "worker_extension_cls=my.Ext"),
])
def test_impossible_combination_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(verl_config(with_override(override)))
    assert key in str(err.value), str(err.value)


def _main_ppo(*overrides, env=None, cwd=None):
    # Hydra writes outputs/<date>/ into the working directory: keep it out of the checkout.
    return subprocess.run([sys.executable, "-m", "hwnoise.integrations.verl.main_ppo", *overrides],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
                          cwd=cwd)


def test_main_ppo_stops_before_any_worker_on_a_misspelled_key(tmp_path):
    run = _main_ppo(*GRID, f"{R}.aqn.sigma_strat=0.01", "trainer.device=cpu", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "aqn.sigma_strat" in run.stderr and "sigma_start" in run.stderr
    assert "ray init kwargs" not in run.stdout  # verl's run_ppo prints this before ray.init


GRID_RUNS = [f"{v}{lora}" for v in ("clean", "noise5", "noise5-aqn", "mxfp4", "mxfp4-aqn", "nvfp4", "nvfp4-aqn")
             for lora in ("", "-lora")]


@pytest.mark.parametrize("run", GRID_RUNS)
def test_examples_grid_command_lines_compose_and_validate(run):
    """The exact command lines of examples/verl/grid.sh compose with verl's YAML and pass hwnoise's checks."""
    import shlex
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "verl" / "grid.sh"
    out = subprocess.run(["bash", str(script), run], capture_output=True, text=True, check=True,
                         env={**os.environ, "PRINT": "1"}).stdout
    argv = shlex.split(out)
    assert argv[:3] == ["python", "-m", "hwnoise.integrations.verl.main_ppo"]
    config = verl_config(argv[3:])
    settings = prepare(config)
    variant = run.removesuffix("-lora")
    assert (settings.aqn is not None) == variant.endswith("-aqn")
    assert settings.weight_format == {"mxfp4": "mxfp4", "nvfp4": "nvfp4"}.get(variant.split("-")[0])
    assert (settings.operator_noise is not None) == variant.startswith("noise5")
    assert (config.actor_rollout_ref.model.lora_rank > 0) == run.endswith("-lora")
    if run.endswith("-lora") and settings.weight_format:  # the base passes the stream once
        assert config.actor_rollout_ref.rollout.load_format == "dummy"


LORA = ["actor_rollout_ref.model.lora_rank=32", "actor_rollout_ref.model.lora_alpha=64",
        "actor_rollout_ref.model.target_modules=all-linear"]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_lora_adapter_syncs_with_a_weight_format_are_refused_naming_the_keys(fmt):
    """With load_format=safetensors verl syncs only adapters (engine_workers.py:673 base_sync_done):
    the base weights vLLM loaded itself would never be quantized (issue 23, 2)."""
    overrides = with_override(f"{R}.emulation=weights:{fmt}") + LORA
    with pytest.raises(ConfigError) as err:
        validate(verl_config(overrides + ["actor_rollout_ref.rollout.load_format=safetensors"]))
    message = str(err.value)
    assert all(k in message for k in ("actor_rollout_ref.rollout.load_format=safetensors",
                                      "actor_rollout_ref.model.lora_rank=32", f"weights:{fmt}", "load_format=dummy"))
    # the too-far checks: what does reach the stream is accepted
    assert validate(verl_config(overrides + ["actor_rollout_ref.rollout.load_format=dummy"])).weight_format == fmt
    assert validate(verl_config(overrides + ["actor_rollout_ref.rollout.load_format=safetensors",
                                             "actor_rollout_ref.model.lora.merge=True"])).weight_format == fmt
    no_format = [o for o in GRID if ".emulation=weights" not in o] + LORA
    assert validate(verl_config(no_format + ["actor_rollout_ref.rollout.load_format=safetensors"])).aqn is not None


def test_the_sync_trainer_forces_the_naive_checkpoint_backend():
    """Why there is no delta_sharded refusal (issue 23, 6): the sync trainer, the only one hwnoise
    accepts, overwrites the backend with "naive", so whole weights always reach the stream."""
    import inspect

    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    assert 'checkpoint_engine_config.backend = "naive"' in inspect.getsource(PPOTrainer)
    config = verl_config(with_override("actor_rollout_ref.rollout.checkpoint_engine.backend=delta_sharded"))
    assert validate(config).aqn is not None


def test_megatron_is_refused_only_with_operator_noise():
    rollout_only = [o for o in GRID if "trainer.hwnoise.emulation" not in o]
    config = verl_config(rollout_only + ["actor_rollout_ref.actor.strategy=megatron"])
    assert validate(config).operator_noise is None  # the rollout side does not depend on the actor
    assert validate(verl_config(with_override("actor_rollout_ref.actor.strategy=fsdp2"))).operator_noise


def test_a_weight_plan_is_checked_by_the_stream_itself(tmp_path):
    """validate() asks the stream (an empty one) whether it can apply the weights part, so the two
    agree: what validate accepts, the stream applies at the first sync (issue 23, 6)."""
    import json

    from hwnoise.integrations.verl.rollout import fake_quantize_stream

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.layers.0.mlp.down_proj": "mxfp4"}))
    spec = f"weights:{plan}"
    try:
        list(fake_quantize_stream(iter(()), str(plan)))
        stream_takes_plans = True
    except ValueError:
        stream_takes_plans = False
    if stream_takes_plans:
        assert validate(verl_config(with_override(f"{R}.emulation={spec}"))).weight_format
    else:
        with pytest.raises(ConfigError, match="rollout weight stream cannot apply"):
            validate(verl_config(with_override(f"{R}.emulation={spec}")))


def test_the_op_list_form_that_hydra_parses():
    """The README form: inner quotes around a spec with brackets (Hydra reads [..] as a list)."""
    from hydra.errors import HydraException

    quoted = validate(verl_config(with_override('+trainer.hwnoise.emulation="relative:0.05@ops[linear,matmul]"')))
    assert quoted.operator_noise.ops == ("linear", "matmul")
    with pytest.raises((HydraException, ConfigError, ValueError)):
        validate(verl_config(with_override("+trainer.hwnoise.emulation=relative:0.05@ops[linear,matmul]")))
