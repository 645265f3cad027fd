"""RL fine-tuning under emulated hardware: TRL GRPO/DAPO with rollout/training emulation and AQN.

``TrainConfig`` (one dataclass, YAML + ``key=value`` overrides), ``build_trainer(config)`` (a TRL
``GRPOTrainer`` subclass with hwnoise's callbacks) and ``train(config) -> run_dir``. TRL is imported
only when a trainer is built, so reading and validating a config needs none of the RL extra.
"""

from .config import ConfigError, TrainConfig

__all__ = ["ConfigError", "HwnoiseGRPOTrainer", "TrainConfig", "build_trainer", "train"]


def __getattr__(name):
    if name in ("build_trainer", "train"):
        from . import run

        return getattr(run, name)
    if name == "HwnoiseGRPOTrainer":
        from .trainer import HwnoiseGRPOTrainer

        return HwnoiseGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
