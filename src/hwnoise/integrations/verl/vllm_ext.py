"""AQN inside the vLLM rollout engine: a vLLM ``worker_extension_cls`` for verl.

verl starts vLLM with ``worker_extension_cls`` (``actor_rollout_ref.rollout.engine_kwargs.vllm.
worker_extension_cls``; ``hwnoise.integrations.verl.main_ppo`` sets it). ``HwnoiseWorkerExtension``
is verl's ``vLLMColocateWorkerExtension`` plus:

- ``hwnoise_set_state(state)``: called by the trainer (``collective_rpc``) after every weight sync
  and around validation with ``{step, sigma, seed, active, multipliers}``; restores each norm
  weight from its cached fp32 clean copy, then (``active``) writes fresh noise
  ``cast(clean + sigma * multiplier * N(0, 1))``, drawn from (seed, replica, parameter name, step):
  every tensor-parallel rank of a replica draws the same noise, each replica its own
  (``hwnoise.inject.keys.process_seed``), and a step replays exactly. In place (``copy_``):
  storage stays where vLLM's CUDA graphs expect it.
- weight syncs: ``update_weights_from_ipc`` re-snapshots the clean copy of only those norms the
  sync really sent (names seen by ``_update_weights``, or a norm whose content is no longer what
  hwnoise wrote), then re-applies the current state. An adapter-only LoRA sync sends no norm and
  sleep level 1 keeps the noisy weights: neither is ever taken as clean, so noise never accumulates.

``RolloutNormNoise`` is the engine-independent part (tested on a tiny HF model);
``make_worker_extension(base)`` builds the extension class on any base, so the tests need no vLLM.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ...aqn import AQN, Constant, LayerMultipliers
from ...errors import noise_key
from ...formats import quantize
from ...inject.keys import process_seed, replica_index
from ...select import decoder_layer_index, is_rmsnorm

__all__ = ["RolloutNormNoise", "make_worker_extension"]

logger = logging.getLogger(__name__)

# Casts with stochastic rounding (unbiased: sub-ulp noise still lands on bf16 weights near 1.0).
_STOCHASTIC_CASTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_STATE_KEYS = ("step", "sigma", "seed", "active")


def _check_state(state) -> dict:
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise ValueError(f"hwnoise state must be a dict with keys {', '.join(_STATE_KEYS)}; got {state!r}")
    return state


class RolloutNormNoise:
    """AQN state of one rollout model: fp32 clean copies of its RMSNorm weights and the last write."""

    def __init__(self, replica: int | None = -1):
        # -1: this process's replica (VERL_REPLICA_RANK, which verl sets in each vLLM server actor)
        self.replica = replica_index() if replica == -1 else replica
        self.clean: dict[str, torch.Tensor] = {}  # fp32 (exact for bf16/fp16 weights)
        self.written: dict[str, torch.Tensor] = {}  # what hwnoise last wrote, in the weight's dtype
        self.state: dict | None = None
        self.stats: dict[str, float] = {}
        self.resnapshots = 0  # how many clean copies were (re)taken, for tests and logs

    @staticmethod
    def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
        """``{parameter name: weight}`` of the RMSNorm-like modules (duck typed, as ``hwnoise.select``)."""
        out = {}
        for name, module in model.named_modules():
            if is_rmsnorm(module):
                out[f"{name}.weight" if name else "weight"] = module._parameters["weight"]
        return out

    def synced(self, model: nn.Module, names=()) -> list[str]:
        """After a weight sync: take new clean copies of the norms it sent; returns their names.

        A norm counts as sent when its name is in ``names`` or when its content is no longer what
        hwnoise wrote (an engine that renames weights, a reload after sleep level 2).
        """
        names = set(names)
        fresh = []
        for name, weight in self.norm_weights(model).items():
            written = self.written.get(name)
            if name in names or name not in self.clean or written is None or not torch.equal(weight.detach(), written):
                self.clean[name] = weight.detach().to(torch.promote_types(weight.dtype, torch.float32)).clone()
                self.written[name] = weight.detach().clone()
                fresh.append(name)
        self.resnapshots += len(fresh)
        return fresh

    def apply(self, model: nn.Module, state: dict | None = None) -> dict[str, float]:
        """Restore every norm from its clean copy, then write the noise ``state`` asks for."""
        if state is not None:
            self.state = dict(_check_state(state))
        self.synced(model)  # norms never seen (first call) get their clean copy now
        state = self.state
        if state is None:
            return {}
        sigma, step, active = float(state["sigma"]), int(state["step"]), bool(state["active"])
        multipliers = LayerMultipliers.coerce(state.get("multipliers"))
        # Keyed by replica, not by TP rank: the norms are replicated on the TP ranks of one replica
        # and must stay equal there; another replica is another device and draws its own noise.
        seed = process_seed(int(state["seed"]), rank=0, replica=self.replica)
        draw = AQN(Constant(1.0), seed=seed)  # only its seeded (seed, name, step) draw
        effective, requested = [], []
        with torch.no_grad():
            for name, weight in self.norm_weights(model).items():
                clean = self.clean[name]
                scale = sigma * multipliers.multiplier(decoder_layer_index(name)) if active else 0.0
                if scale == 0:
                    new = clean.to(weight.dtype)
                else:
                    noisy = clean + scale * draw.standard_noise(name, clean.shape, step, clean.device).to(clean.dtype)
                    new = self._cast(noisy, weight.dtype, seed, name, step)
                    effective.append(float((new.to(clean.dtype) - clean).double().std()))  # what the model sees
                    requested.append(scale)
                weight.copy_(new)
                self.written[name] = weight.detach().clone()
        self.stats = {
            "hwnoise/aqn/sigma": sigma if active else 0.0,
            "hwnoise/aqn/effective_std": sum(effective) / len(effective) if effective else 0.0,
            "hwnoise/aqn/noised_weights": float(len(effective)),
        }
        return self.stats

    @staticmethod
    def _cast(noisy: torch.Tensor, dtype: torch.dtype, seed: int, name: str, step: int) -> torch.Tensor:
        if noisy.dtype == dtype:
            return noisy
        if dtype in _STOCHASTIC_CASTS:
            key = noise_key(seed, f"aqn-rollout/{name}", "forward", step) & 0x7FFF_FFFF_FFFF_FFFF
            return quantize(noisy.float(), _STOCHASTIC_CASTS[dtype], rounding="stochastic", seed=key).to(dtype)
        return noisy.to(dtype)


@contextmanager
def _layerwise_reload(model_runner):
    """A weight sync into an engine whose backend repacks weights after loading (vLLM's CPU build).

    vLLM's CPU backend packs every linear weight into a oneDNN handle after loading and leaves the
    Parameter empty, so verl's plain ``model.load_weights`` sync fails there (``linear.py``: cannot
    load into a parameter of size 0). vLLM's layerwise reload restores each layer's parameters,
    loads, and runs the layer's post-loading processing again. Other platforms load as verl does.
    """
    try:
        from vllm.platforms import current_platform
    except ImportError:  # the tests' fake engines
        yield
        return
    if not current_platform.is_cpu() or getattr(model_runner, "model_config", None) is None:
        yield  # a GPU build loads in place; a model without vLLM's config is not vLLM's (test fakes)
        return
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = model_runner.model
    initialize_layerwise_reload(model)
    yield
    finalize_layerwise_reload(model, model_runner.model_config)


def make_worker_extension(base: type) -> type:
    """``HwnoiseWorkerExtension`` on ``base`` (verl's ``vLLMColocateWorkerExtension`` in production).

    ``base`` must provide ``self.model_runner.model``, ``update_weights_from_ipc(...)`` and
    ``_update_weights(weights, peft_config, base_sync_done)`` (called per received bucket).
    """

    class HwnoiseWorkerExtension(base):
        def _hwnoise(self) -> RolloutNormNoise:
            noise = self.__dict__.get("_hwnoise_noise")
            if noise is None:
                noise = self.__dict__["_hwnoise_noise"] = RolloutNormNoise()
                self.__dict__["_hwnoise_synced_names"] = set()
            return noise

        def _update_weights(self, weights, peft_config, base_sync_done):
            weights = list(weights)
            self._hwnoise()
            self.__dict__["_hwnoise_synced_names"].update(name for name, _ in weights)
            return super()._update_weights(weights, peft_config, base_sync_done)

        def update_weights_from_ipc(self, *args, **kwargs):
            noise = self._hwnoise()
            self.__dict__["_hwnoise_synced_names"] = set()
            with _layerwise_reload(self.model_runner):
                result = super().update_weights_from_ipc(*args, **kwargs)
            model = self.model_runner.model
            fresh = noise.synced(model, self.__dict__["_hwnoise_synced_names"])
            if noise.state is not None:
                noise.apply(model)
            logger.info("hwnoise: weight sync sent %d norm weight(s); state %s re-applied", len(fresh), noise.state)
            return result

        def hwnoise_set_state(self, state: dict) -> dict[str, float]:
            """Restore clean norms and write the noise of ``state`` (``{step, sigma, seed, active, ...}``)."""
            stats = self._hwnoise().apply(self.model_runner.model, state)
            logger.info("hwnoise: AQN state %s: %s", state, stats)
            return stats

        def hwnoise_stats(self) -> dict[str, float]:
            return dict(self._hwnoise().stats)

    HwnoiseWorkerExtension.__qualname__ = HwnoiseWorkerExtension.__name__
    return HwnoiseWorkerExtension


def __getattr__(name):
    # Built on first use: verl's base class imports vLLM, which only rollout workers have.
    if name == "HwnoiseWorkerExtension":
        from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

        cls = make_worker_extension(vLLMColocateWorkerExtension)
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
