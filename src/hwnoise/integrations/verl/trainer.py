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

The state reaches each replica's engine through ``engine_call``, run on the replica's first server
(node rank 0, the one that holds the engine; the servers of other nodes of a multi-node replica are
headless and drive no engine) with Ray's ``__ray_call__``: it awaits vLLM's ``collective_rpc`` on
the server's own event loop and returns what every worker's ``hwnoise_set_state`` returned (verl's
``vLLMHttpServer.collective_rpc`` discards it), then resets the engine's prefix cache, so KV blocks
computed under one noise state (clean ones from validation) are never reused under another. The
measured AQN std of every worker and the weight stream's statistics (SQNR, weights quantized,
stored on the server by ``HwnoiseServerAdapter``) come back the same way and go into verl's metrics
of the step whose rollout they describe.
"""

from __future__ import annotations

import asyncio
import logging
import math

import ray
from omegaconf import open_dict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from .config import TRAINER_MODE, validate
from .rollout import STREAM_STATS_ATTR

__all__ = ["HwnoiseTrainer", "engine_call"]

logger = logging.getLogger(__name__)



def engine_call(server, method: str | None = None, kwargs: dict | None = None, reset_prefix_cache: bool = False):
    """Run on a verl ``vLLMHttpServer`` actor (``server.__ray_call__.remote(engine_call, ...)``).

    Returns ``{"workers": [what each vLLM worker's ``method`` returned], "prefix_cache_reset": bool
    or None, "stream": the last weight sync's stream statistics or None}``; ``{"headless": True}``
    on a server without an engine (node rank > 0 of a multi-node replica).
    ``__ray_call__`` runs on a thread of the actor; vLLM's engine client lives on the actor's event
    loop, so the calls are scheduled there (the loop of the uvicorn task verl started with the engine).
    """
    if getattr(server, "node_rank", 0) != 0:
        return {"headless": True}
    engine = getattr(server, "engine", None)
    if engine is None:
        raise RuntimeError(f"hwnoise: the rollout server {server!r} has no vLLM engine (not launched yet?)")

    async def calls():
        workers = await engine.collective_rpc(method=method, kwargs=kwargs or {}) if method else []
        reset = None
        if reset_prefix_cache:
            reset = await engine.reset_prefix_cache()
            if reset is False:  # vLLM refuses while requests run: KV of the old state would survive
                raise RuntimeError("hwnoise: vLLM refused to reset its prefix cache after an AQN state change "
                                   "(requests still running); cached KV of the previous noise state would be reused")
        return {"workers": list(workers or []), "prefix_cache_reset": reset,
                "stream": getattr(server, STREAM_STATS_ATTR, None)}

    task = getattr(server, "_server_task", None)
    loop = task.get_loop() if task is not None else None
    if loop is None or not loop.is_running():
        return asyncio.run(calls())
    return asyncio.run_coroutine_threadsafe(calls(), loop).result()


def _engine_metrics(results: list[dict]) -> dict[str, float]:
    """verl metrics from ``engine_call`` results of every replica: AQN as measured in the engines'
    weights (mean std of the noise that landed, noised weights per worker), the stream's SQNR."""
    metrics: dict[str, float] = {}
    workers = [w for r in results for w in r.get("workers", []) if isinstance(w, dict) and w]
    if workers:
        metrics["hwnoise/aqn/effective_std"] = sum(w.get("hwnoise/aqn/effective_std", 0.0) for w in workers) / len(workers)
        metrics["hwnoise/aqn/noised_weights"] = sum(w.get("hwnoise/aqn/noised_weights", 0.0) for w in workers) / len(workers)
        metrics["hwnoise/aqn/engine_workers"] = float(len(workers))
    streams = [r["stream"] for r in results if r.get("stream")]
    if streams:
        sqnr = [s["hwnoise/weights/sqnr_db"] for s in streams if math.isfinite(s["hwnoise/weights/sqnr_db"])]
        if sqnr:
            metrics["hwnoise/weights/sqnr_db"] = min(sqnr)
        metrics["hwnoise/weights/quantized"] = float(max(s["hwnoise/weights/quantized"] for s in streams))
    resets = [r.get("prefix_cache_reset") for r in results if r.get("prefix_cache_reset") is not None]
    if resets:
        metrics["hwnoise/engine/prefix_cache_resets"] = float(sum(bool(x) for x in resets))
    return metrics


@register_trainer(TRAINER_MODE)
class HwnoiseTrainer(PPOTrainerSync):
    def __init__(self, config):
        self.hwnoise = validate(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # verl's branches test for "sync"
        self.hwnoise_state: dict | None = None
        self.hwnoise_rollout_state: dict | None = None  # the state this step's rollout ran under
        self.hwnoise_engine_metrics: dict[str, float] = {}  # measured for this step's rollout
        super().__init__(config)

    # -- the state -------------------------------------------------------------------------------

    def _hwnoise_servers(self):
        """One server per replica: its first (node rank 0), the one holding the engine; the servers
        of the other nodes of a multi-node replica are headless (vLLM drives their workers from node 0)."""
        return [replica.servers[0] for replica in self.llm_server_manager.get_replicas() if replica.servers]

    def _hwnoise_engines(self, state: dict | None) -> list[dict]:
        """``engine_call`` on every replica: the AQN state (if any; then the prefix cache is reset),
        and the stream statistics of the last sync."""
        method = "hwnoise_set_state" if state is not None else None
        kwargs = {"state": state} if state is not None else None
        refs = [s.__ray_call__.remote(engine_call, method, kwargs, state is not None) for s in self._hwnoise_servers()]
        return [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in refs]

    def _hwnoise_broadcast(self, state: dict) -> list[dict]:
        self.hwnoise_state = state
        if self.hwnoise.aqn is None and not self.hwnoise.weight_format:
            return []
        return self._hwnoise_engines(state if self.hwnoise.aqn is not None else None)

    def _hwnoise_send(self, active: bool) -> dict:
        """The state of the rollout at ``self.global_steps``, sent to every rollout server.

        Past the last step no rollout follows: the state is inactive, so the engine ends clean.
        """
        active = active and self.global_steps <= self.total_training_steps
        state = self.hwnoise.state(self.global_steps, self.total_training_steps, self.steps_per_epoch, active)
        self.hwnoise_engine_metrics = _engine_metrics(self._hwnoise_broadcast(state))
        return state

    def _hwnoise_metrics(self, state: dict | None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if state is not None and self.hwnoise.aqn is not None:
            metrics.update({"hwnoise/aqn/sigma": state["sigma"] if state["active"] else 0.0,
                            "hwnoise/aqn/epoch": float(state["epoch"]), "hwnoise/aqn/step": float(state["step"])})
        if self.hwnoise.operator_noise is not None and self.hwnoise.operator_noise.scale is not None:
            metrics["hwnoise/noise/scale"] = self.hwnoise.operator_noise.scale
        metrics.update(self.hwnoise_engine_metrics)  # measured in the engines for this rollout
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
