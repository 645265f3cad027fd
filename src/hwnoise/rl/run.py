"""Build and run a GRPO/DAPO trainer from a ``TrainConfig``: ``build_trainer`` and ``train``.

``train(config)`` validates the config and checks it against the model's structure (LoRA targets,
multiplier layers) before any weight is loaded, writes ``RUN_DIR/hwnoise_config.yaml``, trains, and
writes ``RUN_DIR/run.json`` (status "finished" or "failed") atomically. AQN noise and emulation live
only inside the trainer's rollout / loss contexts, which undo them also when something raises; on
the way out ``train`` still checks that no AQN noise is left on the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import ConfigError, TrainConfig, aqn_schedule

__all__ = ["CONFIG_FILE", "IDENTITY_FILE", "TRAIN_RUN_FILE", "build_trainer", "run_identity_of", "train_outputs", "check_model_structure", "finished_at", "latest_checkpoint",
           "preflight", "train"]

CONFIG_FILE = "hwnoise_config.yaml"
TRAIN_RUN_FILE = "run.json"
TENSORBOARD_DIR = "tensorboard"
IDENTITY_FILE = "identity.json"
EVALS_DIR = "evals"


def train_outputs() -> dict:
    """What a run writes into its run directory, each with the test that tells an earlier run's
    file (``hwnoise.io.check_outputs``). TRL's model card (README.md) is not among them: hwnoise
    turns it off (run.json describes the run), so a user's README.md is never replaced."""
    from ..io import is_directory, json_with_keys, jsonl_with_keys, text_starting
    from .callbacks import EVALS_FILE

    return {
        TRAIN_RUN_FILE: json_with_keys("status", "steps"),
        CONFIG_FILE: _is_train_config,
        IDENTITY_FILE: json_with_keys("model", "settings", "plans", "dtype", "device", "engine"),
        EVALS_FILE: jsonl_with_keys("step", "report"),
        EVALS_DIR: is_directory,
        TENSORBOARD_DIR: is_directory,
    }


def _is_train_config(path) -> bool:
    try:
        TrainConfig.from_yaml(path)
    except Exception:  # noqa: BLE001  (anything that is not a config this version reads)
        return False
    return True


def _holds_run(run_dir: Path) -> str | None:
    """A description of the training run ``run_dir`` holds (its files or checkpoints), else None."""
    if not run_dir.is_dir():
        return None
    run_file = run_dir / TRAIN_RUN_FILE
    described = None
    if run_file.is_file():
        try:
            data = json.loads(run_file.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "status" in data:
                described = f"a {data['status']} run, step {data.get('steps')} of {data.get('max_steps')}"
        except (OSError, ValueError):
            pass
    checkpoint = latest_checkpoint(run_dir)
    if described is None and (checkpoint or (run_dir / CONFIG_FILE).is_file()):
        described = "a run" + (f" with checkpoints up to {Path(checkpoint).name}" if checkpoint else "")
    return described


def run_identity_of(config: TrainConfig) -> dict:
    """The run's identity (``hwnoise.identity``): model, the per-phase emulation specs, the plans they
    use by content, the dtype (bf16 or fp32 as the Trainer will resolve it), the device and the
    rollout engine. A resume must match it."""
    from ..identity import run_identity

    device = config.resolved_device()
    settings = [config.emulation_for(phase) for phase in ("rollout", "training")]
    return run_identity(config.model, settings, dtype="bf16" if _resolved_bf16(config, device) else "fp32",
                        device=device.split(":")[0], engine="vllm" if config.use_vllm else "hf")


def _resolved_bf16(config: TrainConfig, device: str) -> bool:
    if config.bf16 is not None:
        return bool(config.bf16)
    import torch

    return device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# -- checks that need the model's structure, not its weights -----------------------------------------


def _meta_model(spec: str):
    """The model built from its config on the meta device: module names without loading weights."""
    from ..models import meta_model

    return meta_model(spec)


def check_model_structure(config: TrainConfig, model=None) -> None:
    """LoRA targets that match no module, AQN multipliers for layers the model lacks, an emulation
    spec that selects nothing in the model or a plan for another model: ConfigError.

    ``model`` None: the model is built on the meta device from its config (no weights read).
    """
    phases = [(phase, config.emulation_for(phase)) for phase in ("rollout", "training")]
    phases = [(phase, e) for phase, e in phases if not e.is_clean]
    if config.finetune != "lora" and (not config.aqn.enabled or config.aqn.multipliers is None) and not phases:
        return
    if model is None:
        model = _meta_model(config.model)
    problems = []
    from ..eval.core import check_settings

    for phase, emulation in phases:  # targets, layer ranges, excludes, a plan for another model
        try:
            check_settings(model, [emulation], config.seed)
        except ValueError as err:
            problems.append(f"emulation.{phase}: {err}")
    names = [name for name, _ in model.named_modules() if name]
    if config.finetune == "lora":
        leaves = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if name and not list(m.children())})
        for target in config.lora.targets:
            if not any(name == target or name.endswith(f".{target}") for name in names):
                problems.append(f"lora.targets: {target!r} matches no module of {config.model!r}; "
                                f"module names there: {', '.join(leaves)}")
    if config.aqn.enabled and config.aqn.multipliers is not None:
        from ..aqn import LayerMultipliers
        from ..select import decoder_layer_indices

        try:
            LayerMultipliers.from_json(config.aqn.multipliers).check_model(decoder_layer_indices(model))
        except ValueError as err:
            problems.append(f"aqn.multipliers: {err}")
    if problems:
        raise ConfigError("invalid training configuration for this model:\n  - " + "\n  - ".join(problems))


def _ensure_valid(config: TrainConfig) -> None:
    """Validate unless this very config (same settings) already passed ``validate``."""
    if not config.is_validated:
        config.validate()


def _ensure_structure(config: TrainConfig, model=None) -> None:
    """``check_model_structure`` once per config state and model (the meta-device build is not free)."""
    key = (config.state_key(), id(model))
    if config.__dict__.get("_structure_checked") == key:
        return
    check_model_structure(config, model)
    config.__dict__["_structure_checked"] = key


# -- pieces --------------------------------------------------------------------------------------


def _aqn(config: TrainConfig):
    if not config.aqn.enabled:
        return None
    from ..aqn import AQN

    q = config.aqn
    return AQN(aqn_schedule(q), targets=q.targets, multipliers=q.multipliers, seed=config.aqn_seed)


def _emulation(config: TrainConfig, phase: str):
    emulation = config.emulation_for(phase)
    return None if emulation.is_clean else emulation


def _problems(config: TrainConfig):
    from ..data import load_problems

    train = load_problems(config.data.train, n=config.data.n_train, seed=config.seed, split="train")
    eval_spec = config.data.eval or config.data.train
    # Generous draw, then drop problems seen in training: evaluation must be held out.
    held = load_problems(eval_spec, n=None if not eval_spec.startswith("arith") else config.data.n_eval * 2 + 16,
                         seed=config.eval_seed, split="test")
    seen = {p.question for p in train}
    held = [p for p in held if p.question not in seen]
    if len(held) < config.data.n_eval:
        raise ConfigError(f"data.eval: only {len(held)} held-out problems in {eval_spec!r} are not also training "
                          f"problems; data.n_eval is {config.data.n_eval}")
    return train, held[: config.data.n_eval]


def _dataset(problems, tokenizer):
    from datasets import Dataset

    from ..data import prompt_messages, prompt_text
    from ..eval.generate import uses_chat_template

    chat = uses_chat_template(tokenizer)
    return Dataset.from_list([
        {"prompt": prompt_messages(p.question) if chat else prompt_text(p.question), "gold": p.gold,
         "answer": p.answer, "id": p.id}
        for p in problems
    ])


def _grpo_config(config: TrainConfig, device: str, *, progress: bool = True, **extra):
    from trl import GRPOConfig

    a, log = config.algorithm, config.logging
    cpu = device == "cpu"
    bf16 = _resolved_bf16(config, device)
    report_to = [r for r in log.report_to if r != "none"] or "none"
    import dataclasses

    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in
                     dataclasses.fields(GRPOConfig)} else "gradient_checkpointing")
    extra.setdefault(checkpointing, a.gradient_checkpointing)
    if not progress:  # the caller shows its own progress (the CLI); else TRL's / transformers' default
        extra.setdefault("disable_tqdm", True)
    return GRPOConfig(
        output_dir=str(config.run_dir),
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        num_generations=a.num_generations,
        max_completion_length=a.max_completion_length,
        temperature=a.temperature,
        learning_rate=a.learning_rate,
        beta=a.beta,
        epsilon=a.epsilon,
        epsilon_high=a.epsilon_high,
        num_iterations=a.num_iterations,
        loss_type=a.loss_type,
        mask_truncated_completions=a.mask_truncated_completions,
        max_steps=config.steps if config.steps is not None else -1,
        num_train_epochs=config.epochs if config.epochs is not None else 1,
        seed=config.seed,
        logging_steps=log.logging_steps,
        save_strategy="steps" if log.save_steps else "no",
        save_steps=log.save_steps or 500,
        save_total_limit=log.save_total_limit,
        report_to=report_to,
        log_completions=log.log_completions,
        use_cpu=cpu,
        bf16=bf16,
        use_vllm=config.use_vllm,
        vllm_mode=config.rollout.vllm_mode,
        vllm_importance_sampling_correction=config.rollout.importance_sampling_correction,
        **extra,
    )


def _apply_lora(config: TrainConfig, model):
    from peft import LoraConfig, get_peft_model

    _ensure_structure(config, model)
    lora = LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.targets), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def build_trainer(config: TrainConfig, model=None, tokenizer=None, *, reward_funcs=(), callbacks=(),
                  on_eval=None, grpo_args=None, progress: bool = True):
    """A ``HwnoiseGRPOTrainer`` for ``config`` (validated here, before anything loads).

    model / tokenizer: use these instead of loading ``config.model`` (tests pass tiny models).
    reward_funcs: extra TRL reward functions after hwnoise's correctness reward. callbacks: extra
    TrainerCallbacks. on_eval(step, EvalReport): called after each periodic evaluation.
    grpo_args: extra ``trl.GRPOConfig`` fields the TrainConfig does not cover (e.g. generation_kwargs).
    progress: False turns the Trainer's tqdm bar off (the CLI draws its own); nothing global is changed.
    A config that already passed ``validate`` (unchanged since) is not validated again.
    """
    _ensure_valid(config)
    _ensure_structure(config, model)
    device = config.resolved_device()
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    train_problems, eval_problems = _problems(config)  # bad data fails before the model loads
    if model is None:
        from ..models import load

        model, tokenizer = load(config.model, device="cpu" if device == "cpu" else "cuda")
    elif tokenizer is None:
        raise ValueError("build_trainer: a model given without its tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.finetune == "lora":
        model = _apply_lora(config, model)

    from ..rewards import correctness_reward
    from .callbacks import EvalCallback
    from .trainer import HwnoiseGRPOTrainer

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = HwnoiseGRPOTrainer(
        model=model,
        reward_funcs=[correctness_reward(config.reward.mode, config.reward.format_bonus,
                                                   config.reward.bonus_only_if_correct), *reward_funcs],
        args=_grpo_config(config, device, progress=progress, **(grpo_args or {})),
        train_dataset=_dataset(train_problems, tokenizer),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        aqn=_aqn(config),
        rollout_emulation=_emulation(config, "rollout"),
        training_emulation=_emulation(config, "training"),
        emulation_seed=config.seed,
    )
    _refuse_sharded_parameters(trainer)
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(run_dir / TENSORBOARD_DIR)  # one place, also across resumes
    settings = ["clean"]
    if "rollout" in config.eval.settings:
        settings.append(_emulation(config, "rollout"))
    trainer.add_callback(EvalCallback(
        trainer, tokenizer, eval_problems, settings, run_dir, every=config.eval.every, at_start=config.eval.at_start,
        batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens, seed=config.eval_seed,
        on_eval=on_eval, model_name=config.model, data_name=config.data.eval or config.data.train,
    ))
    # TRL writes a model card (README.md) into the run directory at each checkpoint: not one of the
    # run's outputs (run.json describes the run), and it would replace a README.md of the user's.
    trainer.create_model_card = _no_model_card
    trainer.hwnoise_config = config
    trainer.eval_problems = eval_problems
    return trainer


def _no_model_card(*args, **kwargs) -> None:
    return None


def _refuse_sharded_parameters(trainer) -> None:
    """AQN and the weight format write / swap whole weights: not with parameters sharded across ranks."""
    if trainer.aqn is None and trainer.rollout_emulation is None and trainer.training_emulation is None:
        return
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and getattr(plugin, "zero_stage", None) == 3
    if zero3 or getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError("AQN and hardware emulation need whole (unsharded) parameters on each rank; DeepSpeed "
                          "ZeRO-3 and FSDP shard them. Use ZeRO-1/2 or DDP, or turn aqn and emulation off")


def latest_checkpoint(run_dir) -> str | None:
    """The newest ``checkpoint-N`` directory of a run, or None."""
    found = sorted((p for p in Path(run_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def finished_at(checkpoint) -> tuple[int, int] | None:
    """``(step, max_steps)`` when ``checkpoint`` (a ``checkpoint-N`` directory) ends its run, i.e. its
    ``trainer_state.json`` has reached ``max_steps``; None when training would continue from it."""
    if checkpoint is None:
        return None
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        step, max_steps = int(state["global_step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no readable state: let the Trainer say what is wrong with the checkpoint
    return (step, max_steps) if max_steps > 0 and step >= max_steps else None


def _resolve_resume(resume, run_dir) -> str | None:
    if resume in (None, False, ""):
        return None
    if resume in (True, "latest"):
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ConfigError(f"--resume latest: no checkpoint-N directory in {str(run_dir)!r} "
                              "(set logging.save_steps to save checkpoints)")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume: no checkpoint directory {str(resume)!r}; give a checkpoint-N directory of a "
                          "run, or 'latest' (the newest one in run_dir)")
    if not (path / "trainer_state.json").is_file():
        inside = latest_checkpoint(path)
        hint = (f" (it is a run directory: its newest checkpoint is {inside!r}; or use --resume latest with --out "
                f"{str(path)!r})" if inside else "")
        raise ConfigError(f"--resume {str(resume)!r} is not a checkpoint: it holds no trainer_state.json; give a "
                          f"checkpoint-N directory that a run saved (logging.save_steps), or 'latest'{hint}")
    return str(path)


def preflight(config: TrainConfig, resume=None, model=None) -> str | None:
    """Every check that needs no weights: the config, the checkpoint to resume (returned; None for a
    fresh run) and the config and identity of the run that saved it, the run directory (a fresh run
    into a folder holding a run is refused, and so is a file there named like an output that no run
    wrote), LoRA targets, multiplier layers and emulation specs against the model's structure."""
    from ..io import OutputPathError, check_outputs

    _ensure_valid(config)
    run_dir = Path(config.run_dir)
    checkpoint = _resolve_resume(resume, run_dir)
    if checkpoint is not None:
        _check_resume_config(config, Path(checkpoint).parent)  # the run that saved the checkpoint
    held = _holds_run(run_dir)
    resumes_here = checkpoint is not None and Path(checkpoint).resolve().parent == run_dir.resolve()
    if held is not None and not resumes_here:
        what = "a fresh run" if checkpoint is None else f"a run resumed from {checkpoint!r}"
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds {held}; {what} would replace its run.json, "
                          f"config and evaluations. Continue it with --resume latest, or give another --out")
    try:
        check_outputs(run_dir, train_outputs(), "hwnoise train", what="run_dir")
    except OutputPathError as err:
        raise ConfigError(str(err)) from None
    _ensure_structure(config, model)
    return checkpoint


# Settings a resumed run may change: where and how it reports. Everything else shapes the schedule,
# the data order or the model, and must match the run being resumed.
_RESUME_MAY_CHANGE = ("run_dir", "logging.", "eval.")


def _check_resume_config(config: TrainConfig, run_dir: Path) -> None:
    """The config and identity saved by the run in ``run_dir`` (the checkpoint's run) against these."""
    from ..identity import check_same_identity

    identity_path = run_dir / IDENTITY_FILE
    if identity_path.is_file():
        try:
            stored = json.loads(identity_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"--resume: {identity_path} is not readable ({err})") from None
        try:
            check_same_identity(stored, run_identity_of(config), str(run_dir),
                                "start a new run (another --out) instead of resuming this one")
        except ValueError as err:
            raise ConfigError(f"--resume: {err}") from None
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = TrainConfig.from_yaml(saved_path)
    current = {k: config._get(k) for k in TrainConfig.fields_help()}
    before = {k: saved._get(k) for k in TrainConfig.fields_help()}
    changed = [f"{k}: {before[k]!r} -> {current[k]!r}" for k in current
               if current[k] != before[k] and not k.startswith(_RESUME_MAY_CHANGE)]
    if changed:
        raise ConfigError(f"--resume: the config differs from the run being resumed ({saved_path}), so the AQN "
                          f"schedule or the data order would not continue: " + "; ".join(changed))


def train(config: TrainConfig, *, resume=None, model=None, tokenizer=None, reward_funcs=(), callbacks=(),
          on_eval=None, trainer_hook=None, progress: bool = True) -> Path:
    """Train; return the run directory. ``resume``: a checkpoint directory or "latest".

    Writes hwnoise_config.yaml (the resolved config) before training and run.json after, also when
    training raises (status "failed", then the exception propagates). trainer_hook(trainer) is
    called once the trainer is built (the CLI attaches its progress display there). Resuming from a
    checkpoint that already reached the run's last step (see ``finished_at``) trains nothing and
    leaves every file as it is: the run directory is returned at once. progress: False turns the
    Trainer's own tqdm bar off (``hwnoise train`` draws its own); no global setting is touched.
    """
    from ..io import atomic_write_json, atomic_write_text
    from .callbacks import read_evals

    run_dir = Path(config.run_dir)
    checkpoint = preflight(config, resume, model)
    if finished_at(checkpoint) is not None:
        return run_dir  # the Trainer would run one step past max_steps
    t0 = time.perf_counter()
    trainer = build_trainer(config, model, tokenizer, reward_funcs=reward_funcs, callbacks=callbacks,
                            on_eval=on_eval, progress=progress)
    identity = run_identity_of(config)
    atomic_write_text(run_dir / CONFIG_FILE, config.to_yaml())
    atomic_write_json(run_dir / IDENTITY_FILE, identity)
    if trainer_hook is not None:
        trainer_hook(trainer)
    status, error = "failed", None
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
        status = "finished"
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        aqn = trainer.aqn
        if aqn is not None and aqn.applied:  # the rollout context restores; this is the last guard
            aqn.restore(trainer.accelerator.unwrap_model(trainer.model))
        if trainer.is_world_process_zero():
            atomic_write_json(run_dir / TRAIN_RUN_FILE, {
                "config": config.to_dict(),
                "identity": identity,
                "status": status,
                "error": error,
                "steps": trainer.state.global_step,
                "max_steps": trainer.state.max_steps,
                "resumed_from": checkpoint,
                "evals": read_evals(run_dir),
                "log_history": trainer.state.log_history,
                "seconds": round(time.perf_counter() - t0, 2),
            })
    return run_dir
