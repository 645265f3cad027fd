"""W4A16 rollouts in verl: the weights the rollout engine receives, fake-quantized to any format.

``fake_quantize_stream(weights, fmt)`` wraps verl's weight stream (``(name, tensor)`` pairs from
the actor to the engine): every linear weight (2-D ``*.weight``; embeddings, ``lm_head`` and LoRA
adapters left alone) becomes ``hwnoise.quantize(w, fmt)`` in its own dtype, the same call the
``weights:FMT`` emulation makes in ``hwnoise eval`` and ``hwnoise train``. The engine then runs
on the quantized grid while the actor keeps training its clean weights.

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

from ...formats import get as get_format, quantize
from .config import DEFAULT_STREAM_EXCLUDE, rollout_settings

__all__ = ["StreamStats", "fake_quantize_stream", "is_stream_linear_weight", "make_server_adapter"]

logger = logging.getLogger(__name__)


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


def fake_quantize_stream(weights, fmt: str, exclude=DEFAULT_STREAM_EXCLUDE, stats: StreamStats | None = None):
    """Yield ``weights`` (``(name, tensor)``) with every linear weight quantized to ``fmt``."""
    get_format(fmt)  # an unknown format fails before the first tensor, listing the known ones
    stats = stats if stats is not None else StreamStats()
    for name, tensor in weights:
        if not is_stream_linear_weight(name, tensor, exclude):
            stats.weights_passed += 1
            yield name, tensor
            continue
        q = quantize(tensor.detach(), fmt)
        diff = q.float() - tensor.float()
        stats.signal += float(tensor.float().pow(2).sum())
        stats.noise += float(diff.pow(2).sum())
        stats.weights_quantized += 1
        yield name, q


def make_server_adapter(base: type) -> type:
    """``HwnoiseServerAdapter`` on ``base`` (verl's vLLM ``ServerAdapter`` in production)."""

    class HwnoiseServerAdapter(base):
        async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
            settings = rollout_settings(getattr(self.config, "custom", None))
            stats = None
            if settings.weight_format:
                if wire_format != "named_tensors":
                    raise ValueError(f"hwnoise weight format {settings.weight_format!r} needs whole weights; "
                                     f"the checkpoint engine sends wire_format={wire_format!r} "
                                     "(use actor_rollout_ref.rollout.checkpoint_engine.backend=naive)")
                stats = StreamStats()
                weights = fake_quantize_stream(weights, settings.weight_format, settings.weight_exclude, stats)
            result = await super().update_weights(weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
            if stats is not None:
                self.hwnoise_stream_stats = stats
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
