"""verl's PPO / GRPO / DAPO main with hwnoise switched on.

    python -m hwnoise.integrations.verl.main_ppo <verl args> \\
        +trainer.hwnoise.emulation=relative:0.05@ops actor_rollout_ref.rollout.enforce_eager=True \\
        +actor_rollout_ref.rollout.custom.hwnoise.aqn.enabled=true ...

Composes verl's own ``ppo_trainer`` config (``pkg://verl.trainer.config``), validates the hwnoise
keys (``hwnoise.integrations.verl.config``) before Ray or any worker starts, fills in the
extension points they need (trainer mode ``hwnoise_sync``, the vLLM worker extension, the plugin
and HWNOISE_* variables in Ray's ``runtime_env``), then runs verl's ``run_ppo`` with
``HwnoiseTaskRunner``, verl's V1 TaskRunner whose process registers ``HwnoiseTrainer``.
"""

from __future__ import annotations

import sys

import hydra
import ray
from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config
from verl.utils.device import auto_set_device

from .config import ConfigError, prepare

__all__ = ["HwnoiseTaskRunner", "main", "prepare_config"]


class _HwnoiseTaskRunner(TaskRunnerV1.__ray_actor_class__):
    def run(self, config):
        from . import trainer  # noqa: F401  registers trainer mode hwnoise_sync in this process

        return super().run(config)


HwnoiseTaskRunner = ray.remote(_HwnoiseTaskRunner)


def prepare_config(config):
    """hwnoise's checks and defaults, then verl's own ``validate_config``; returns ``VerlSettings``."""
    auto_set_device(config)
    settings = prepare(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    return settings


@hydra.main(config_path="pkg://verl.trainer.config", config_name="ppo_trainer", version_base=None)
def main(config):
    try:
        settings = prepare_config(config)
    except ConfigError as err:
        print(f"hwnoise: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"hwnoise: {settings}")
    run_ppo(config, task_runner_class=HwnoiseTaskRunner)


if __name__ == "__main__":
    main()
