"""hwnoise inside upstream verl (0.9.x), through verl's extension points, without a fork.

- ``main_ppo``: ``python -m hwnoise.integrations.verl.main_ppo <verl args> +trainer.hwnoise.*=...
  +actor_rollout_ref.rollout.custom.hwnoise.*=...`` validates the hwnoise keys before Ray starts,
  fills in the extension points below, then runs verl's ``run_ppo`` with a TaskRunner subclass.
- ``trainer``: ``HwnoiseTrainer``, a ``PPOTrainerSync`` registered as trainer mode
  ``hwnoise_sync``; after each weight sync it tells the rollout engine the AQN state
  ``{step, sigma, seed, active}`` (off during validation) and logs it into verl's metrics.
- ``vllm_ext``: ``HwnoiseWorkerExtension``, vLLM ``worker_extension_cls``: AQN on norm weights
  from cached fp32 clean copies, restored before each redraw, re-snapshotted only for norms a
  weight sync really sent (adapter-only LoRA syncs and sleep/wake do not accumulate noise).
- ``rollout``: ``HwnoiseServerAdapter``, the vLLM ``ServerAdapter`` with the weight stream to the
  engine fake-quantized to any hwnoise format (W4A16 rollouts).
- ``plugin``: the ``VERL_USE_EXTERNAL_MODULES`` target: operator noise from HWNOISE_* variables in
  every process and thread, and the rollout adapter registered; a bad setting raises at import.
- ``config``: the hwnoise keys, their validation (with close-match suggestions) and defaults.

Only ``config`` is importable without verl; the rest import verl (``pip install "hwnoise[verl]"``).
"""

from .config import ConfigError, VerlSettings, validate

__all__ = ["ConfigError", "VerlSettings", "validate"]
