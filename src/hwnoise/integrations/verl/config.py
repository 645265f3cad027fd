"""The hwnoise keys of a verl run: names, validation (before any worker starts) and defaults.

verl accepts new keys only under ``trainer.*`` and ``actor_rollout_ref.rollout.custom`` (a free
dict that reaches the rollout workers' ``RolloutConfig``), each given with Hydra's ``+``:

    +actor_rollout_ref.rollout.custom.hwnoise.emulation=weights:mxfp4     W4A16 of the weight stream
    +actor_rollout_ref.rollout.custom.hwnoise.emulation=weights:mxfp4+exclude:*.down_proj  (adds to the
                                                                           default lm_head, embed_tokens)
    +actor_rollout_ref.rollout.custom.hwnoise.exclude=[lm_head,embed_tokens]   (replaces that default)
    +actor_rollout_ref.rollout.custom.hwnoise.aqn.enabled=true            AQN on the engine's norms
    +actor_rollout_ref.rollout.custom.hwnoise.aqn.schedule=epoch_aware    (and every other key of
    +actor_rollout_ref.rollout.custom.hwnoise.aqn.sigma_start=0.01         ``hwnoise train``'s aqn
    ...                                                                    section: same names)
    +trainer.hwnoise.emulation=relative:0.05@ops       operator noise in every worker process
    +trainer.hwnoise.emulation=relative:0.05@ops[linear,matmul]   (the ops in the spec, or:)
    +trainer.hwnoise.ops=[linear,matmul,bmm]
    +trainer.hwnoise.seed=0

Values speak the project's language: emulation specs are ``hwnoise.emulation.Emulation.parse``
strings (the op list and the excludes may ride in the spec), formats ``hwnoise.formats`` names,
schedules ``hwnoise.aqn.schedules``, module selection ``aqn.targets``. The schema and checks
shared with ``hwnoise train`` are ``hwnoise.rl.config``'s (one ``ConfigError``, the ``AQNConfig``
section, its coercion and checks, emulation spec parsing, unknown-key messages). ``validate(config)``
returns ``VerlSettings`` or raises ``ConfigError`` naming the key (with close matches for a
misspelling, every unknown key at once) and what is accepted; ``prepare(config)`` also fills in the extension points
(trainer mode, vLLM worker extension, plugin and HWNOISE_* variables in Ray's runtime_env).
This module needs neither verl nor Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ...aqn import LayerMultipliers, Schedule
from ...emulation import Emulation
from ...inject.env import ENV_VARS
from ...inject.ops import DEFAULT_OPS, resolve_ops
from ...rl.config import (
    AQNConfig, ConfigError, aqn_problems, aqn_schedule, coerce_section, coerce_value, parse_emulation,
    unknown_keys_error,
)

__all__ = [
    "ACTOR_STRATEGIES", "ASYNC_TRAINER_MODES", "ConfigError", "KEYS", "PLUGIN_MODULE", "ROLLOUT_PREFIX",
    "TRAINER_MODE", "TRAINER_PREFIX", "VerlSettings", "WORKER_EXTENSION", "prepare", "rollout_settings", "validate",
]

ROLLOUT_PREFIX = "actor_rollout_ref.rollout.custom.hwnoise"
TRAINER_PREFIX = "trainer.hwnoise"
TRAINER_MODE = "hwnoise_sync"  # the registered HwnoiseTrainer
PLUGIN_MODULE = "hwnoise.integrations.verl.plugin"
WORKER_EXTENSION = "hwnoise.integrations.verl.vllm_ext.HwnoiseWorkerExtension"
ASYNC_TRAINER_MODES = ("colocate_async", "separate_async")
# Actor strategies whose GEMMs go through torch's F.linear / matmul, where operator noise reaches them
# (Megatron and TransformerEngine call their own fused kernels).
ACTOR_STRATEGIES = ("fsdp", "fsdp2")
DEFAULT_STREAM_EXCLUDE = ("lm_head", "embed_tokens")

_ENV_PATH = "ray_kwargs.ray_init.runtime_env.env_vars"
_EXT_PATH = "actor_rollout_ref.rollout.engine_kwargs.vllm.worker_extension_cls"

_AQN_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(AQNConfig)}
KEYS: dict[str, str] = {
    f"{ROLLOUT_PREFIX}.emulation": "Rollout emulation spec (hwnoise.emulation.Emulation): 'clean' or 'weights:FMT' "
                                  "(W4A16: every linear weight the rollout engine receives is quantized to FMT), "
                                  "optionally '+exclude:G1,G2' (weight names left alone, besides lm_head and embed_tokens).",
    f"{ROLLOUT_PREFIX}.exclude": "Weight names (substrings or globs) the weight-stream format leaves alone "
                                "(replaces the default [lm_head,embed_tokens]).",
    **{f"{ROLLOUT_PREFIX}.aqn.{name}": text for name, text in _AQN_HELP.items()},
    f"{TRAINER_PREFIX}.emulation": "Operator noise in every verl process (actor forward and backward, log-probs, "
                                   "vLLM workers with enforce_eager): an error spec such as 'relative:0.05@ops'.",
    f"{TRAINER_PREFIX}.ops": "Operators the noise reaches (hwnoise.noisy_ops names, or 'all'); or in the spec: "
                             "'relative:0.05@ops[linear,matmul]'.",
    f"{TRAINER_PREFIX}.seed": "Seed of the operator noise and (unless aqn.seed) of the AQN draws.",
}


# -- reading a verl config (OmegaConf DictConfig or plain dicts) ------------------------------------


def _select(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:  # an OmegaConf interpolation that does not resolve here
            return default
    return default if node is None else node


def _plain(value):
    if hasattr(value, "_content"):  # OmegaConf containers, without importing omegaconf
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _leaves(data, prefix: str):
    """``(full dotted key, value)`` for every leaf of a nested mapping; sections are the AQN one only."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a mapping of hwnoise keys; got {data!r} (set e.g. +{prefix}.seed=0)")
    for key, value in data.items():
        full = f"{prefix}.{key}"
        if isinstance(value, Mapping) and (full.endswith(".aqn") or full not in KEYS):
            yield from _leaves(value, full)
        else:
            yield full, value


def _check_known(values: dict) -> None:
    unknown = [key for key in values if key not in KEYS]
    if unknown:  # every unknown key at once, as hwnoise train names them
        raise unknown_keys_error({"verl config": unknown}, KEYS, what="hwnoise key", mark="+")


# -- the settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerlSettings:
    """What the hwnoise keys of one verl run ask for (validated)."""

    weight_format: str | None = None
    weight_exclude: tuple[str, ...] = DEFAULT_STREAM_EXCLUDE
    aqn: AQNConfig | None = None
    schedule: Schedule | None = None
    multipliers: LayerMultipliers | None = None
    seed: int = 0
    operator_noise: Emulation | None = None

    @property
    def active(self) -> bool:
        return bool(self.weight_format or self.aqn or self.operator_noise)

    @property
    def aqn_seed(self) -> int:
        return self.aqn.seed if self.aqn is not None and self.aqn.seed is not None else self.seed

    def env_vars(self) -> dict[str, str]:
        """The HWNOISE_* variables that switch the operator noise on in every worker (``hwnoise.inject.env``)."""
        if self.operator_noise is None:
            return {}
        return {"HWNOISE_ERROR": self.operator_noise.error, "HWNOISE_OPS": ",".join(self.operator_noise.ops),
                "HWNOISE_SEED": str(self.seed)}

    def sigma_at(self, global_steps: int, total_steps: int, steps_per_epoch: int | None) -> float:
        """AQN sigma for the rollout of verl's step ``global_steps`` (1-based; 0: before training)."""
        if self.schedule is None:
            return 0.0
        return self.schedule.sigma_at(max(global_steps - 1, 0), total_steps, steps_per_epoch)

    def state(self, global_steps: int, total_steps: int, steps_per_epoch: int | None, active: bool) -> dict:
        """The payload the trainer broadcasts to the rollout engine's workers (plain data)."""
        spe = max(int(steps_per_epoch or 0), 1)
        return {
            "step": int(global_steps),
            "epoch": max(global_steps - 1, 0) // spe,
            "sigma": float(self.sigma_at(global_steps, total_steps, steps_per_epoch)),
            "seed": int(self.aqn_seed),
            "active": bool(active),
            "targets": list(self.aqn.targets) if self.aqn else ["rmsnorm"],
            "multipliers": _multipliers_json(self.multipliers),
        }


def _multipliers_json(m: LayerMultipliers | None):
    if m is None:
        return None
    return {"layer_multipliers": {str(k): v for k, v in m.layer_multipliers.items()},
            "default_multiplier": m.default_multiplier,
            "targeted": sorted(m.targeted) if m.targeted is not None else None}


def _rollout_part(values: dict) -> dict:
    """Rollout-side keys -> VerlSettings fields."""
    out: dict = {}
    key = f"{ROLLOUT_PREFIX}.emulation"
    if key in values:
        spec = values[key]
        emulation = parse_emulation(spec, f"{key}={spec!r}")
        if emulation.error is not None:
            raise ConfigError(f"{key}={spec!r}: operator noise reaches every verl process through HWNOISE_* "
                              f"variables, not the rollout alone; set +{TRAINER_PREFIX}.emulation={emulation.error}"
                              f"@{emulation.where} instead (and {key}=weights:FMT for the weight format)")
        if emulation.input_format is not None:
            raise ConfigError(f"{key}={spec!r}: input formats (inputs:FMT) cannot reach vLLM's kernels; accepted "
                              "here: 'clean' or 'weights:FMT'")
        if emulation.aqn_sigma:
            raise ConfigError(f"{key}={spec!r}: AQN on the rollout engine is set by {ROLLOUT_PREFIX}.aqn.* "
                              f"(enabled, schedule=constant, sigma_start={emulation.aqn_sigma:g}, ...)")
        if emulation.weight_format is not None and emulation.targets != "linear":
            raise ConfigError(f"{key}={spec!r}: the weight stream quantizes every linear weight (targets:linear); "
                              "leave weights out with '+exclude:G1,G2' instead of targets:...")
        out["weight_format"] = emulation.weight_format
        if emulation.weight_format is not None:
            _check_stream_accepts(key, spec, emulation.weight_format)
        if emulation.exclude:
            if f"{ROLLOUT_PREFIX}.exclude" in values:
                raise ConfigError(f"{key}={spec!r} has exclude:... and {ROLLOUT_PREFIX}.exclude is set too; "
                                  "give the excludes once")
            out["weight_exclude"] = tuple(dict.fromkeys(DEFAULT_STREAM_EXCLUDE + emulation.exclude))
    key = f"{ROLLOUT_PREFIX}.exclude"
    if key in values:
        exclude = values[key]
        exclude = [exclude] if isinstance(exclude, str) else exclude
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(e, str) and e for e in exclude):
            raise ConfigError(f"{key}={values[key]!r}: expected a list of weight-name patterns, e.g. [lm_head,embed_tokens]")
        out["weight_exclude"] = tuple(exclude)
    aqn_keys = {k.rsplit(".", 1)[-1]: v for k, v in values.items() if k.startswith(f"{ROLLOUT_PREFIX}.aqn.")}
    if aqn_keys:
        q = coerce_section(AQNConfig, aqn_keys, f"{ROLLOUT_PREFIX}.aqn")  # hwnoise train's aqn section
        if not q.enabled:
            return out
        problems = aqn_problems(q, f"{ROLLOUT_PREFIX}.aqn")  # the checks hwnoise train runs
        if problems:
            raise ConfigError("; ".join(problems))
        if tuple(q.targets) != ("rmsnorm",):
            raise ConfigError(f"{ROLLOUT_PREFIX}.aqn.targets={list(q.targets)}: only [rmsnorm] on the vLLM "
                              "engine (vLLM fuses and shards linear weights, e.g. qkv_proj, so per-weight noise "
                              "of the trained model does not map onto them)")
        out["aqn"] = q
        out["schedule"] = aqn_schedule(q)
        if q.multipliers is not None:
            out["multipliers"] = LayerMultipliers.from_json(q.multipliers)
    return out


def _check_stream_accepts(key: str, spec, weights) -> None:
    """Refuse here what the weight stream would refuse at the first sync: ask the stream itself
    (an empty stream runs its own format/plan checks), so validate() and the stream always agree."""
    from .rollout import fake_quantize_stream  # imports this module: a late import

    try:
        list(fake_quantize_stream(iter(()), weights))
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"{key}={spec!r}: the rollout weight stream cannot apply {weights!r}: {err}") from None


def _trainer_part(values: dict) -> dict:
    out: dict = {}
    key = f"{TRAINER_PREFIX}.seed"
    if key in values:
        out["seed"] = coerce_value(values[key], int, key)
    key = f"{TRAINER_PREFIX}.emulation"
    ops_key = f"{TRAINER_PREFIX}.ops"
    if key in values:
        spec = values[key]
        emulation = parse_emulation(spec, f"{key}={spec!r}")
        if emulation.weight_format or emulation.input_format or emulation.aqn_sigma:
            raise ConfigError(f"{key}={spec!r}: only operator noise ('relative:0.05@ops') goes here; the rollout "
                              f"weight format is {ROLLOUT_PREFIX}.emulation=weights:FMT, AQN {ROLLOUT_PREFIX}.aqn.*, "
                              "and W4A16 of the actor's forward is verl's own QAT "
                              "(actor_rollout_ref.actor.fsdp_config.qat.*)")
        if emulation.error is not None and emulation.where != "ops":
            raise ConfigError(f"{key}={spec!r}: only @ops (operator level) reaches verl's workers; got @{emulation.where}")
        if emulation.error is not None:
            if ops_key in values:
                if emulation.ops != DEFAULT_OPS:
                    raise ConfigError(f"{key}={spec!r} names its ops and {ops_key} is set too; give the ops once "
                                      f"(e.g. +{key}={emulation.error}@ops[linear,matmul])")
                try:
                    emulation = dataclasses.replace(emulation, ops=resolve_ops(values[ops_key]))
                except (ValueError, TypeError) as err:
                    raise ConfigError(f"{ops_key}={values[ops_key]!r}: {err}") from None
            out["operator_noise"] = emulation
    elif ops_key in values:
        raise ConfigError(f"{ops_key} is set but {key} is not; set e.g. +{key}=relative:0.05@ops")
    return out


def _values(config) -> dict:
    values = {}
    for prefix in (ROLLOUT_PREFIX, TRAINER_PREFIX):
        node = _select(config, prefix)
        if node is not None:
            values.update(_leaves(_plain(node), prefix))
    _check_known(values)
    # hwnoise keys put where verl has no room for them never reach validation otherwise
    for misplaced in ("actor_rollout_ref.actor.hwnoise", "actor_rollout_ref.model.hwnoise",
                      "actor_rollout_ref.rollout.hwnoise", "hwnoise"):
        if _select(config, misplaced) is not None:
            raise ConfigError(f"{misplaced}: verl keeps no hwnoise keys there; use +{ROLLOUT_PREFIX}.* "
                              f"or +{TRAINER_PREFIX}.*")
    return values


def rollout_settings(custom) -> VerlSettings:
    """The rollout-side settings from ``RolloutConfig.custom`` (in a rollout worker: no trainer keys)."""
    node = (_plain(custom) or {}).get("hwnoise") if custom is not None else None
    if node is None:
        return VerlSettings()
    values = dict(_leaves(node, ROLLOUT_PREFIX))
    _check_known(values)
    return VerlSettings(**_rollout_part(values))


# -- combinations with the rest of verl's config -----------------------------------------------------


def _check_combinations(config, s: VerlSettings, *, defaults_pending: bool) -> None:
    if not s.active:
        return
    what = "AQN" if s.aqn else "the weight format" if s.weight_format else "operator noise"
    if _select(config, "trainer.use_v1", True) is False:
        raise ConfigError(f"trainer.use_v1=False: the legacy trainer has none of the hooks hwnoise uses for {what}; "
                          "use the V1 trainer (trainer.use_v1=True, verl's default)")
    mode = _select(config, "trainer.v1.trainer_mode", "sync")
    if mode in ASYNC_TRAINER_MODES:
        raise ConfigError(f"trainer.v1.trainer_mode={mode}: async modes overlap generation with training, so the "
                          f"per-step noise state and its validation switch have no defined step; use "
                          f"trainer.v1.trainer_mode={TRAINER_MODE} (the sync trainer with hwnoise's hooks)")
    if mode != TRAINER_MODE and not (defaults_pending and mode == "sync"):
        raise ConfigError(f"trainer.v1.trainer_mode={mode}: hwnoise needs trainer.v1.trainer_mode={TRAINER_MODE}")
    rollout = "actor_rollout_ref.rollout"
    name = _select(config, f"{rollout}.name", "vllm")
    # checkpoint_engine.backend needs no check: the sync trainer (the only mode hwnoise accepts) sets
    # it to "naive" whatever the config says (verl trainer/ppo/v1/trainer_base.py:382), so whole
    # weights always reach the stream and every norm is re-sent (tests/verl pin that line).
    _check_lora(config, s)
    strategy = _select(config, "actor_rollout_ref.actor.strategy", "fsdp")
    if s.operator_noise is not None and strategy not in ACTOR_STRATEGIES:
        raise ConfigError(f"actor_rollout_ref.actor.strategy={strategy}: {TRAINER_PREFIX}.emulation="
                          f"{s.operator_noise.spec} reaches GEMMs through torch's F.linear/matmul, which "
                          f"{strategy} actors bypass (Megatron/TransformerEngine fused kernels), so the actor would "
                          f"train clean; use actor_rollout_ref.actor.strategy={' or '.join(ACTOR_STRATEGIES)}")
    dp = _select(config, f"{rollout}.data_parallel_size", 1)
    if s.aqn and isinstance(dp, int) and dp > 1:
        raise ConfigError(f"{rollout}.data_parallel_size={dp}: AQN states reach a replica's workers through "
                          "vLLM's collective_rpc, which reaches one data-parallel shard only (verl "
                          "vllm_async_server.py:1307-1314), so the other shards would roll out with stale noise; "
                          f"use {rollout}.data_parallel_size=1 (more replicas instead) with {ROLLOUT_PREFIX}.aqn.enabled=true")
    if (s.aqn or s.weight_format) and name != "vllm":
        key = f"{ROLLOUT_PREFIX}.aqn.enabled" if s.aqn else f"{ROLLOUT_PREFIX}.emulation"
        raise ConfigError(f"{rollout}.name={name}: {key} is implemented for the vLLM rollout only; use "
                          f"{rollout}.name=vllm")
    if s.weight_format and _select(config, f"{rollout}.quantization") is not None:
        raise ConfigError(f"{rollout}.quantization={_select(config, f'{rollout}.quantization')}: verl's rollout "
                          f"quantization and {ROLLOUT_PREFIX}.emulation=weights:{s.weight_format} would quantize "
                          "twice; choose one")
    extension = _select(config, _EXT_PATH)
    if s.aqn and extension not in (None, WORKER_EXTENSION):
        raise ConfigError(f"{_EXT_PATH}={extension}: AQN needs {WORKER_EXTENSION} (subclass it to combine "
                          "with another extension)")
    if s.operator_noise is not None and not _select(config, f"{rollout}.enforce_eager", False):
        raise ConfigError(f"{rollout}.enforce_eager=False: with {TRAINER_PREFIX}.emulation="
                          f"{s.operator_noise.spec} vLLM's CUDA graphs would replay one noise draw (or none); set "
                          f"{rollout}.enforce_eager=True")
    env = _plain(_select(config, _ENV_PATH)) or {}
    if s.operator_noise is not None:
        wanted = s.env_vars()
        clash = sorted(k for k in env if k in ENV_VARS and str(env[k]) != wanted.get(k))
        if clash:
            raise ConfigError(f"{_ENV_PATH}.{clash[0]} is set and so is {TRAINER_PREFIX}.emulation; "
                              "give the operator noise once")


def _check_lora(config, s: VerlSettings) -> None:
    """LoRA adapters (not merged) with a weight format: the base weights must pass the stream once.

    verl sends the base weights only when ``rollout.load_format`` is "dummy" (then once, at the first
    sync; afterwards only adapters: ``base_sync_done``, verl workers/engine_workers.py:673, :791-806).
    With "safetensors" vLLM loads its own base from disk and the stream never sees it: the format
    would silently do nothing. Merged LoRA (``model.lora.merge=True``) sends merged weights each sync."""
    if not s.weight_format:
        return
    model = "actor_rollout_ref.model"
    rank = _select(config, f"{model}.lora_rank", 0) or 0
    lora = _plain(_select(config, f"{model}.lora")) or {}
    rank = rank or (lora.get("rank", 0) if isinstance(lora, Mapping) else 0) or 0
    merge = bool(lora.get("merge", False)) if isinstance(lora, Mapping) else False
    load_format = str(_select(config, "actor_rollout_ref.rollout.load_format", "dummy"))
    if rank and not merge and "dummy" not in load_format:
        raise ConfigError(
            f"actor_rollout_ref.rollout.load_format={load_format} with {model}.lora_rank={rank}: verl then syncs "
            f"only the LoRA adapters (base_sync_done) and vLLM keeps the base weights it loaded itself, so "
            f"{ROLLOUT_PREFIX}.emulation=weights:{s.weight_format} would never reach them; use "
            "actor_rollout_ref.rollout.load_format=dummy (the base then passes the stream once, at the first "
            f"sync, and is quantized; adapters stay unquantized, as in QLoRA) or {model}.lora.merge=True "
            "(every sync sends merged weights, quantized each time)")


def validate(config) -> VerlSettings:
    """Check the hwnoise keys of a composed verl config and their combination with verl's own keys."""
    values = _values(config)
    fields = {**_rollout_part(values), **_trainer_part(values)}
    settings = VerlSettings(**fields)
    _check_combinations(config, settings, defaults_pending=True)
    return settings


def prepare(config) -> VerlSettings:
    """``validate``, then fill in what the settings need (an OmegaConf config, changed in place):
    trainer mode ``hwnoise_sync``, the vLLM worker extension (AQN), and in Ray's runtime_env the
    plugin (``VERL_USE_EXTERNAL_MODULES``) and the HWNOISE_* variables of the operator noise."""
    from omegaconf import OmegaConf, open_dict

    settings = validate(config)
    if not settings.active:
        return settings
    with open_dict(config):
        if _select(config, "trainer.v1.trainer_mode", "sync") == "sync":
            OmegaConf.update(config, "trainer.v1.trainer_mode", TRAINER_MODE, force_add=True)
        if settings.aqn is not None:
            OmegaConf.update(config, _EXT_PATH, WORKER_EXTENSION, force_add=True)
        env = dict(_plain(_select(config, _ENV_PATH)) or {})
        modules = [m for m in str(env.get("VERL_USE_EXTERNAL_MODULES", "")).split(",") if m]
        if PLUGIN_MODULE not in modules:
            modules.append(PLUGIN_MODULE)
        env["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
        env.update(settings.env_vars())
        OmegaConf.update(config, _ENV_PATH, env, force_add=True, merge=False)
    _check_combinations(config, settings, defaults_pending=False)
    return settings
