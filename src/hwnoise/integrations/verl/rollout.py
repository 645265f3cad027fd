"""W4A16 rollouts in verl: the weights the rollout engine receives, fake-quantized to any format.

``fake_quantize_stream(weights, emulation)`` wraps verl's weight stream (``(name, tensor)`` pairs
from the actor to the engine) with the weight part of an ``Emulation``, resolved once: with
``weights:FMT`` every linear weight (2-D ``*.weight``; embeddings, ``lm_head`` and LoRA adapters
left alone) becomes its quantized copy in its own dtype; with ``weights:plan.json`` each module the
plan names is quantized in its planned format and every other tensor passes unchanged. The copy
is made by ``hwnoise.inject.swap.quantized_weight``, the call the ``weights:...`` emulation makes
in ``hwnoise eval`` and ``hwnoise train``. The engine then runs on the quantized grid while the
actor keeps training its clean weights.

``HwnoiseServerAdapter`` is verl's vLLM ``ServerAdapter`` with its ``update_weights`` stream
wrapped when ``actor_rollout_ref.rollout.custom.hwnoise.emulation=weights:FMT``; the plugin puts it
in verl's rollout registry. Per-tensor formats (NVFP4's tensor scale) see q, k, v (and gate, up)
separately, as the actor holds them; vLLM fuses them after loading.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass

import torch

from ...emulation import Emulation
from ...inject.swap import quantized_weight
from ...plans import WeightPlan
from .config import DEFAULT_STREAM_EXCLUDE, rollout_settings

__all__ = ["StreamStats", "fake_quantize_stream", "is_stream_linear_weight", "make_server_adapter", "stream_emulation"]

logger = logging.getLogger(__name__)

STREAM_STATS_ATTR = "_hwnoise_stream_stats"  # on the vLLM server actor, read by trainer.engine_call


def _store_stream_stats(server, stats: dict) -> None:
    """Run on verl's vLLM server actor (``__ray_call__``): keep the last sync's stream statistics there."""
    setattr(server, STREAM_STATS_ATTR, stats)


@dataclass
class StreamStats:
    """What one weight sync's fake quantization did (SQNR over every quantized weight)."""

    weights_quantized: int = 0
    weights_passed: int = 0
    signal: float = 0.0
    noise: float = 0.0

    @property
    def sqnr_db(self) -> float:
        return 10 * math.log10(self.signal / self.noise) if self.noise > 0 else math.inf

    def as_dict(self) -> dict[str, float]:
        return {"hwnoise/weights/quantized": float(self.weights_quantized), "hwnoise/weights/sqnr_db": self.sqnr_db}


def _excluded(name: str, exclude) -> bool:
    parts = name.split(".")
    return any(p in parts or fnmatch.fnmatchcase(name, p) for p in exclude)


def is_stream_linear_weight(name: str, tensor: torch.Tensor, exclude=DEFAULT_STREAM_EXCLUDE) -> bool:
    """Whether a streamed weight is a linear layer's weight the format applies to."""
    return (
        name.endswith(".weight")
        and tensor.dim() == 2
        and tensor.is_floating_point()
        and "lora_" not in name  # adapters: W4A16 quantizes the base weights
        and not _excluded(name, exclude)
    )


def stream_emulation(value) -> Emulation:
    """The Emulation a weight stream applies: an ``Emulation`` as is, or a weights value
    (``"mxfp4"``, ``"plan.json"``) as ``weights:VALUE``. Only a weight part can reach the engine.

    Example:
        >>> stream_emulation("mxfp4").spec
        'weights:mxfp4'
    """
    emulation = value if isinstance(value, Emulation) else Emulation(weight_format=value)
    if not emulation.weight_format or emulation.input_format or emulation.error or emulation.aqn_sigma:
        raise ValueError(f"the verl weight stream applies weights:FMT or weights:plan.json only; got {emulation.spec!r}")
    return emulation


def fake_quantize_stream(weights, emulation, exclude=DEFAULT_STREAM_EXCLUDE, stats: StreamStats | None = None):
    """Yield ``weights`` (``(name, tensor)``) with each weight the Emulation's weight part names
    quantized: every linear weight under ``weights:FMT``, each planned module in its own format
    under ``weights:plan.json`` (its ``exclude:`` globs and ``exclude`` honoured).

    Args:
        weights: an iterable of (name, tensor), e.g. ``model.named_parameters()``.
        emulation: an ``Emulation`` with a weight part, or a weights value (``"mxfp4"``, a plan path).
        exclude: module names or globs left alone (default: embeddings and lm_head).
        stats: a ``StreamStats`` to fill (SQNR over the quantized weights).

    Example:
        >>> out = dict(fake_quantize_stream(model.named_parameters(), "mxfp4"))  # doctest: +SKIP
    """
    emulation = stream_emulation(emulation)  # a bad format or plan fails before the first tensor
    plan = emulation.weights if isinstance(emulation.weights, WeightPlan) else None
    exclude = tuple(exclude) + tuple(emulation.exclude)
    stats = stats if stats is not None else StreamStats()
    seen = set()
    for name, tensor in weights:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if plan is not None:
            fmt = plan.spec_for(module) if module is not None else None
            if fmt is not None:
                seen.add(module)
            take = fmt is not None and tensor.is_floating_point() and not _excluded(name, exclude)
        else:
            fmt = emulation.weights
            take = is_stream_linear_weight(name, tensor, exclude)
        if not take:
            stats.weights_passed += 1
            yield name, tensor
            continue
        q = quantized_weight(tensor, fmt)
        diff = q.float() - tensor.float()
        stats.signal += float(tensor.float().pow(2).sum())
        stats.noise += float(diff.pow(2).sum())
        stats.weights_quantized += 1
        yield name, q
    if plan is not None and stats.weights_quantized + stats.weights_passed:  # (an empty stream: a check only)
        missing = [n for n, _ in plan.formats if n not in seen and not _excluded(n, exclude)]
        if missing:  # a plan for another model (or names the actor does not stream): not a silent no-op
            raise ValueError(f"weight plan {plan} names {len(missing)} module(s) the weight stream did not carry: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def make_server_adapter(base: type) -> type:
    """``HwnoiseServerAdapter`` on ``base`` (verl's vLLM ``ServerAdapter`` in production)."""

    class HwnoiseServerAdapter(base):
        async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
            settings = rollout_settings(getattr(self.config, "custom", None))
            stats = None
            if settings.weight_format:
                # Parsed once per adapter (a plan file is read once), then reused at every sync.
                cached = getattr(self, "_hwnoise_emulation", None)
                if cached is None or cached.weight_format != settings.weight_format:
                    cached = stream_emulation(settings.weight_format)
                    self._hwnoise_emulation = cached
                if wire_format != "named_tensors":
                    raise ValueError(f"hwnoise weight format {settings.weight_format!r} needs whole weights; "
                                     f"the checkpoint engine sends wire_format={wire_format!r} "
                                     "(use actor_rollout_ref.rollout.checkpoint_engine.backend=naive)")
                stats = StreamStats()
                weights = fake_quantize_stream(weights, cached, settings.weight_exclude, stats)
            result = await super().update_weights(weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
            if stats is not None:
                self.hwnoise_stream_stats = stats
                if getattr(self, "_has_server", False) and self._ensure_server_handle():
                    # onto the vLLM server actor, where HwnoiseTrainer's engine_call picks it up for verl's metrics
                    await self.server_handle.__ray_call__.remote(_store_stream_stats, {**stats.as_dict(),
                                                                                      "step": global_steps})
                logger.info("hwnoise: step %s weight sync as %s: %s", global_steps, settings.weight_format, stats.as_dict())
            return result

    HwnoiseServerAdapter.__qualname__ = HwnoiseServerAdapter.__name__
    return HwnoiseServerAdapter


def __getattr__(name):
    # Built on first use: verl's vLLM ServerAdapter imports vLLM.
    if name == "HwnoiseServerAdapter":
        from verl.workers.rollout.vllm_rollout import ServerAdapter

        cls = make_server_adapter(ServerAdapter)
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
