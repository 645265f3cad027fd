"""The worker side of ``VLLMEngine``: a vLLM worker extension (``LLM(worker_extension_cls=...)``).

vLLM mixes this class into its worker (in the engine's own process), so its methods run where the
model lives and are called through ``llm.collective_rpc("hwnoise_...", args=...)``. They apply an
``Emulation`` with ``hwnoise.engines.vllm_emulation.VLLMEmulation`` (H4b's): weight formats at load,
through vLLM's layerwise reload (the CPU backend packs linear weights into oneDNN handles after
loading, so a plain ``load_weights`` cannot reach them), and AQN on the RMSNorm weights.

Only names, numbers and tensors cross the process boundary; the extension holds the state.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

__all__ = ["HwnoiseEvalExtension", "pack", "perturbed_weights", "unpack"]


class HwnoiseEvalExtension:
    """Methods ``VLLMEngine`` calls on the vLLM worker (see the module docstring)."""

    # -- state -------------------------------------------------------------------------------
    def _hw(self) -> dict:
        state = self.__dict__.get("_hwnoise_state")
        if state is None:
            state = self.__dict__["_hwnoise_state"] = {"emu": None, "noise": None, "reference": None}
        return state

    def _hw_model(self):
        return self.model_runner.model

    def _hw_reference(self, model_dir: str):
        from ..models import meta_model

        state = self._hw()
        if state["reference"] is None or state["reference"][0] != model_dir:
            state["reference"] = (model_dir, meta_model(model_dir))
        return state["reference"][1]

    def _hw_emulation(self, spec: str, model_dir: str, seed: int):
        from ..emulation import Emulation
        from .vllm_emulation import VLLMEmulation

        reference = self._hw_reference(model_dir) if Emulation.parse(spec).weight_format is not None else None
        return VLLMEmulation(spec, reference=reference, seed=seed)

    # -- weights -----------------------------------------------------------------------------
    def hwnoise_load(self, spec: str, model_dir: str, seed: int = 0, perturb_seed: int | None = None,
                     perturb_scale: float = 0.0, quantize: bool = True) -> dict:
        """Load the checkpoint in ``model_dir`` into the running model, weight-formatted per ``spec``.

        Goes through vLLM's layerwise reload (its ``load_weights`` inside, then each layer's
        post-loading processing again). ``perturb_seed``/``perturb_scale`` add a keyed Gaussian
        perturbation (scale x the tensor's std) to every floating-point tensor first: a stand-in
        for trained weights in tests and benchmarks (``perturbed_weights`` computes the same
        tensors in any process). ``quantize=False`` loads unformatted (a broken sync, for tests).
        Returns the emulation's load statistics (weights quantized, weight SQNR)."""
        from .vllm_emulation import hf_weights

        self._hw_end_noise()
        emu = self._hw_emulation(spec, model_dir, seed)
        weights = hf_weights(model_dir)
        if perturb_seed is not None:
            weights = perturbed_weights(weights, perturb_seed, perturb_scale)
        if quantize:
            emu.reload(self._hw_model(), weights, model_config=self.model_runner.model_config)
        else:
            with emu.suspended():
                emu.reload(self._hw_model(), weights, model_config=self.model_runner.model_config)
        self._hw()["emu"] = emu
        return emu.take_stats()

    def hwnoise_read(self, names: list[str], model_dir: str) -> dict[str, tuple]:
        """What the model holds for each HF weight name (read through the layer's own kernel where
        the backend packed the weight away; ``vllm_emulation.vllm_weight``)."""
        from .vllm_emulation import vllm_weight

        reference = self._hw_reference(model_dir)
        shapes = {n: tuple(p.shape) for n, p in reference.named_parameters()}
        model = self._hw_model()
        return {name: pack(vllm_weight(model, name, shapes)) for name in names}

    def hwnoise_norms(self) -> dict[str, tuple]:
        """Every RMSNorm weight of the model (name: ``pack``ed copy)."""
        from ..select import is_rmsnorm

        out = {}
        for name, module in self._hw_model().named_modules():
            weight = module._parameters.get("weight")
            if weight is not None and is_rmsnorm(module):
                out[f"{name}.weight"] = pack(weight)
        return out

    # -- AQN -----------------------------------------------------------------------------------
    def hwnoise_begin_noise(self, step: int) -> dict:
        """Enter the loaded emulation's AQN for ``step`` (a no-op without AQN); returns the measured
        noise: ``{"parameters": n, "effective_std_mean": ...}`` (empty without AQN)."""
        self._hw_end_noise()
        emu = self._hw()["emu"]
        if emu is None:
            raise RuntimeError("hwnoise_begin_noise before hwnoise_load: no emulation is loaded")
        stack = ExitStack()
        applied = stack.enter_context(emu.noisy(self._hw_model(), step=step))
        self._hw()["noise"] = stack
        stats = [s for aqn in applied for s in aqn.stats().values()]
        if not stats:
            return {}
        return {"parameters": len(stats), "effective_std_mean": sum(s.effective_std for s in stats) / len(stats),
                "requested_sigma": stats[0].requested_sigma}

    def hwnoise_end_noise(self) -> bool:
        """Leave the AQN block: the clean norm weights written back bit for bit. True if one was open."""
        return self._hw_end_noise()

    def _hw_end_noise(self) -> bool:
        stack = self._hw()["noise"]
        self._hw()["noise"] = None
        if stack is None:
            return False
        stack.close()
        return True


def pack(tensor: torch.Tensor) -> tuple:
    """A tensor as (dtype name, shape, raw bytes): what crosses collective_rpc intact (its msgpack
    encoder sends tensors as out-of-band buffers that results do not carry back). ``unpack`` inverts it."""
    t = tensor.detach().to("cpu").contiguous()
    return str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def unpack(packed) -> torch.Tensor:
    """The tensor ``pack`` packed, bit for bit.

    Example: ``torch.equal(unpack(pack(t)), t)``.
    """
    dtype, shape, data = packed
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


def perturbed_weights(weights, seed: int, scale: float):
    """``(name, tensor)`` with keyed Gaussian noise (``scale`` x the tensor's std) added to every
    floating-point tensor: the same tensors in every process for the same (seed, name).

    Example: ``dict(perturbed_weights(hf_weights(d), seed=1, scale=0.01))``.
    """
    import zlib

    for name, tensor in weights:
        if scale and tensor.is_floating_point():
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(tensor.shape, generator=g, dtype=torch.float32)
            tensor = (tensor.float() + noise * (scale * float(tensor.float().std()))).to(tensor.dtype)
        yield name, tensor

