"""``HwnoiseTrainer``: verl's synchronous PPO trainer with hwnoise's hooks (trainer mode ``hwnoise_sync``).

Registered with verl's ``register_trainer``; ``main_ppo`` selects it with
``trainer.v1.trainer_mode=hwnoise_sync``. It runs as verl's ``PPOTrainerSync`` (internally the
mode reads ``sync``, so every branch of verl's trainer behaves as for the sync trainer) and adds:

- ``on_train_begin``: the AQN state of the first rollout goes to the rollout engine;
- ``on_step_end``: after verl's weight sync, the state ``{step, sigma, seed, active: True}`` of the
  next rollout (sigma from the schedule at that step and epoch; verl's ``steps_per_epoch``);
  this step's sigma, epoch and the operator-noise scale go into verl's metrics of the step;
- ``on_validate_begin`` / ``on_validate_end``: ``active: False`` (clean norms for validation),
  then the same state back (the same seeded draw: validation never shifts the noise);
- after the last step the state is inactive: the engine ends with the clean weights.

The state reaches every rollout server through ``collective_rpc("hwnoise_set_state")``, which
vLLM runs in each worker's ``HwnoiseWorkerExtension``.
"""

from __future__ import annotations

import logging

import ray
from omegaconf import open_dict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from .config import TRAINER_MODE, validate

__all__ = ["HwnoiseTrainer"]

logger = logging.getLogger(__name__)


@register_trainer(TRAINER_MODE)
class HwnoiseTrainer(PPOTrainerSync):
    def __init__(self, config):
        self.hwnoise = validate(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # verl's branches test for "sync"
        self.hwnoise_state: dict | None = None
        self.hwnoise_rollout_state: dict | None = None  # the state this step's rollout ran under
        super().__init__(config)

    # -- the state -------------------------------------------------------------------------------

    def _hwnoise_servers(self):
        return [server for replica in self.llm_server_manager.get_replicas() for server in replica.servers]

    def _hwnoise_broadcast(self, state: dict) -> dict:
        self.hwnoise_state = state
        if self.hwnoise.aqn is not None:
            refs = [s.collective_rpc.remote("hwnoise_set_state", kwargs={"state": state}) for s in self._hwnoise_servers()]
            pending = [r for r in refs if isinstance(r, ray.ObjectRef)]
            if pending:
                ray.get(pending)
        return state

    def _hwnoise_send(self, active: bool) -> dict:
        """The state of the rollout at ``self.global_steps``, sent to every rollout server.

        Past the last step no rollout follows: the state is inactive, so the engine ends clean.
        """
        active = active and self.global_steps <= self.total_training_steps
        return self._hwnoise_broadcast(
            self.hwnoise.state(self.global_steps, self.total_training_steps, self.steps_per_epoch, active))

    def _hwnoise_metrics(self, state: dict | None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if state is not None and self.hwnoise.aqn is not None:
            metrics.update({"hwnoise/aqn/sigma": state["sigma"] if state["active"] else 0.0,
                            "hwnoise/aqn/epoch": float(state["epoch"]), "hwnoise/aqn/step": float(state["step"])})
        if self.hwnoise.operator_noise is not None and self.hwnoise.operator_noise.scale is not None:
            metrics["hwnoise/noise/scale"] = self.hwnoise.operator_noise.scale
        return metrics

    # -- verl's hooks ------------------------------------------------------------------------------

    def on_train_begin(self):
        super().on_train_begin()
        self.hwnoise_rollout_state = self._hwnoise_send(active=True)

    def on_step_end(self):
        super().on_step_end()  # verl's weight sync (the extension re-applies the current state after it)
        metrics = self._hwnoise_metrics(self.hwnoise_rollout_state)
        self._pending_sync_metrics = {**(getattr(self, "_pending_sync_metrics", None) or {}), **metrics}
        self.global_steps += 1  # the next rollout's step; verl increments after logging
        try:
            self.hwnoise_rollout_state = self._hwnoise_send(active=True)
        finally:
            self.global_steps -= 1

    def on_validate_begin(self):
        super().on_validate_begin()
        if self.hwnoise_state is None:
            self._hwnoise_send(active=False)
        else:
            self._hwnoise_broadcast({**self.hwnoise_state, "active": False})

    def on_validate_end(self):
        super().on_validate_end()
        after = self.hwnoise_state["step"] <= self.total_training_steps  # after the last step: stay clean
        self._hwnoise_broadcast({**self.hwnoise_state, "active": after})
