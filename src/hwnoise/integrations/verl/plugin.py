"""The module verl imports in every process: ``VERL_USE_EXTERNAL_MODULES=hwnoise.integrations.verl.plugin``.

``hwnoise.integrations.verl.main_ppo`` puts it (with the HWNOISE_* variables of
``trainer.hwnoise.emulation``) into Ray's ``runtime_env``, so every actor and every vLLM worker
process imports it at ``import verl``. On import it

1. switches operator noise on from HWNOISE_* variables through ``hwnoise.inject.env`` (for every
   thread of the process: verl's workers are Ray async actors whose methods run on an asyncio
   thread, not on the importing one); with no HWNOISE_* variable set it changes nothing;
2. puts ``HwnoiseServerAdapter`` (the weight-stream fake quantization) into verl's rollout
   registry for vLLM; it passes weights through unchanged unless a weight format is configured.

A malformed HWNOISE_* value raises here, and verl re-raises errors of these modules: the worker
refuses to start instead of running clean. (The ``verl.plugins`` entry-point group would swallow
the error, which is why hwnoise does not register one.)
"""

from __future__ import annotations

from ...inject.env import enable_from_env

ROLLOUT_ADAPTER = "hwnoise.integrations.verl.rollout.HwnoiseServerAdapter"

MODE = enable_from_env()


def _register_rollout() -> None:
    from verl.workers.rollout import base

    key = ("vllm", "async")
    current = base._ROLLOUT_REGISTRY.get(key)
    if current != ROLLOUT_ADAPTER and current != "verl.workers.rollout.vllm_rollout.ServerAdapter":
        raise RuntimeError(f"verl's rollout registry already maps {key} to {current!r}; hwnoise would replace it "
                           f"with {ROLLOUT_ADAPTER} (subclass that adapter to combine both)")
    base._ROLLOUT_REGISTRY[key] = ROLLOUT_ADAPTER


_register_rollout()
