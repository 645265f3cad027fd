"""An ``hwnoise.emulation.Emulation`` applied inside a vLLM model.

vLLM runs its own model code (fused ``qkv_proj`` / ``gate_up_proj`` parameters, its own kernels), so
the HF path's weight swap and hooks do not reach it. What does reach it:

- **weight formats and plans** (``weights:mxfp4``, ``weights:plan.json``): applied to every weight the
  engine *receives*. ``VLLMEmulation.attach(model)`` wraps the vLLM model's ``load_weights`` (the call
  TRL's colocate weight sync and verl's weight stream make), so each incoming HF tensor is
  fake-quantized in its planned format *before* vLLM fuses it. Quantizing per original HF tensor
  (not per fused parameter) makes vLLM's weights equal ``hwnoise.quantize`` of the synced weight bit
  for bit: the fused ``qkv_proj`` rows of ``q_proj`` are ``quantize(q_proj.weight)``.
  ``load(model, weights)`` pushes a set of weights through the same path (an evaluation engine that
  starts from the checkpoint on disk: ``load(model, hf_weights(model_dir))``).
- **AQN** (a schedule's ``hwnoise.AQN`` and/or the spec's ``aqn:SIGMA``) on vLLM's RMSNorm weights,
  which vLLM keeps unfused under the HF names (``model.layers.0.input_layernorm.weight``): ``with
  noisy(model, step, ...)`` copies the clean weights, writes draws keyed by (seed, parameter name,
  step) -- the same draws ``AQN.apply`` makes on the HF model -- and writes the clean copies back on
  exit, bit for bit. Each block draws from the clean copy: noise never accumulates, and between
  blocks (evaluation, the end of a run) the engine holds clean norm weights.
- **input formats and operator / module-level noise**: they act through hooks and torch-op routing in
  the HF model's process, which vLLM's kernels (oneDNN on CPU, CUDA kernels on GPU) bypass;
  ``check_vllm_emulation`` refuses them by name, before any engine starts.

The functions take the vLLM model (an ``nn.Module``: ``llm.llm_engine.model_executor.driver_worker
.model_runner.model`` in-process, or the ``model`` argument of ``LLM.apply_model`` /
``collective_rpc``), so they run wherever the model lives.

Example::

    emu = VLLMEmulation("weights:mxfp4", reference=hf_model, seed=0)
    emu.attach(vllm_model)                   # every later load_weights is quantized
    emu.load(vllm_model, hf_model.named_parameters())
    with emu.noisy(vllm_model, step=3):      # AQN of the spec (and aqn=...) on the norms
        llm.generate(...)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..aqn import AQN, Constant
from ..emulation import Emulation, _derived_seed
from ..formats import quantize
from ..plans import WeightPlan, is_plan_spec
from ..select import select_modules

__all__ = ["VLLMEmulation", "check_vllm_emulation", "hf_name", "hf_weights", "vllm_weight"]

_HOOK = "_hwnoise_load_weights"  # the attribute holding the original bound load_weights while attached


def check_vllm_emulation(emulation) -> Emulation:
    """The ``Emulation`` of ``emulation`` (a spec or an Emulation) if vLLM can apply it; else ValueError.

    vLLM applies weight formats/plans and AQN (``aqn:SIGMA``). Input formats and operator or
    module-level noise work through hooks and op routing in the HF model's process, which vLLM's
    kernels bypass; they are refused by name.

    Example::

        check_vllm_emulation("weights:mxfp4+aqn:0.01")      # fine
        check_vllm_emulation("relative:0.05@ops")           # ValueError naming the part
    """
    emulation = Emulation.parse(emulation)
    refused = []
    if emulation.input_format is not None:
        refused.append(f"the input format 'inputs:{emulation.input_format}' (hooks on the HF model's linear layers)")
    if emulation.error is not None:
        where = "operator noise" if emulation.where == "ops" else f"the module-level error (@{emulation.where})"
        refused.append(f"{where} '{emulation.error}@{emulation.where}' (torch-op routing / hooks in this process)")
    if refused:
        raise ValueError(f"emulation {emulation.spec!r} cannot run inside vLLM: {'; '.join(refused)} "
                         "never reach vLLM's kernels. vLLM applies weights:FMT / weights:plan.json and aqn:SIGMA "
                         "(and AQN schedules); use the HF engine for the rest")
    return emulation


def hf_name(name: str) -> str:
    """A parameter name as vLLM's ``load_weights`` expects it (TRL's PEFT / checkpoint prefixes removed).

    Example: ``hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")``
    is ``"model.layers.0.self_attn.q_proj.weight"``.
    """
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("_checkpoint_wrapped_module.", "")


def hf_weights(model_dir) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor in an HF checkpoint directory's safetensors files.

    Example: ``emu.load(vllm_model, hf_weights(hwnoise.models.resolve("default")))``.
    """
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(model_dir)!r} has no .safetensors files (expected an HF checkpoint directory)")
    for path in files:
        yield from load_file(str(path)).items()


def _kernel_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight ``[out, in]`` read back through the layer's own GEMM.

    vLLM's CPU backend packs linear weights into oneDNN / sgl-kernel handles after loading and
    leaves an empty Parameter behind, so the weight is read as ``apply(identity)``: every output
    element is one weight times 1 plus exact zeros, so the readout is exact in fp32."""
    size = module.input_size_per_partition
    eye = torch.eye(size, dtype=module.params_dtype, device=module.weight.device)
    with torch.no_grad():
        return module.quant_method.apply(module, eye, None).t().contiguous()


def vllm_weight(model: nn.Module, name: str, shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """What vLLM's model holds for the HF tensor ``name``: its slice of a fused parameter, read
    from the parameter or, where the CPU backend packed it away, through the layer's own kernel.

    shapes: ``{HF weight name: shape}`` of the HF model (fused parts are sliced in the order of
    the model's ``packed_modules_mapping``, as vLLM's loader packs them, tensor-parallel size 1).

    Example: ``vllm_weight(m, "model.layers.0.self_attn.k_proj.weight", shapes)`` is the k rows of
    ``model.layers.0.self_attn.qkv_proj.weight``.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    def read(param_name):
        value = params[param_name].data
        owner = modules.get(param_name.rpartition(".")[0])
        if value.numel() == 0 and owner is not None and hasattr(owner, "quant_method"):
            return _kernel_weight(owner)
        return value

    if name in params:
        return read(name)
    module, _, leaf = name.rpartition(".")
    parent, _, short = module.rpartition(".")
    for fused, parts in getattr(model, "packed_modules_mapping", {}).items():
        if short in parts:
            fused_name = f"{parent}.{fused}.{leaf}"
            if fused_name not in params:
                continue
            offset = 0
            for part in parts[: parts.index(short)]:
                offset += shapes[f"{parent}.{part}.{leaf}"][0]
            return read(fused_name).narrow(0, offset, shapes[name][0])
    raise KeyError(f"{name!r}: no parameter of the vLLM model holds it (neither by name nor fused through "
                   f"packed_modules_mapping {getattr(model, 'packed_modules_mapping', {})})")


class VLLMEmulation:
    """One ``Emulation`` (weight format/plan, AQN) applied inside a vLLM model; see the module docstring.

    Args:
        emulation: an emulation spec or ``Emulation``; parts vLLM cannot apply are refused
            (``check_vllm_emulation``).
        reference: the HF model (any device, also meta) whose module names the selection and plans
            are resolved on: ``targets`` / ``exclude`` / plan names, exactly as the HF path selects.
            Needed only when the emulation has a weight format.
        seed: keys the ``aqn:SIGMA`` draws as ``Emulation.applied(model, seed, step)`` does.
        aqn: an ``hwnoise.AQN`` with a schedule (the training run's), applied in ``noisy`` at the
            schedule's sigma for the step, before the spec's ``aqn:SIGMA``.

    Example::

        emu = VLLMEmulation("weights:mxfp4", reference=hf_model)
        emu.attach(vllm_model)
    """

    def __init__(self, emulation="clean", reference: nn.Module | None = None, *, seed: int = 0, aqn: AQN | None = None):
        self.emulation = check_vllm_emulation(emulation)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}")
        if aqn is not None and set(aqn.targets) != {"rmsnorm"}:
            raise ValueError(f"AQN targets {aqn.targets!r}: inside vLLM only 'rmsnorm' (vLLM fuses the linear "
                             "weights, so per-weight linear noise would not match the HF draws); use targets rmsnorm")
        self.seed, self.aqn = seed, aqn
        self.formats: dict[str, str] = {}
        if self.emulation.weight_format is not None:
            if reference is None:
                raise ValueError(f"emulation {self.emulation.spec!r} has a weight format: pass reference= (the HF "
                                 "model, also on the meta device) to resolve which weights it selects")
            self.formats = weight_formats(self.emulation, reference)
        self.enabled = True  # False inside ``suspended()``: loads pass through unquantized
        self.weights_quantized = 0
        self._signal = self._noise = 0.0
        self._noise_aqn: list[AQN] = []

    def __repr__(self) -> str:
        return f"VLLMEmulation({self.emulation.spec!r}, {len(self.formats)} weights formatted, aqn={self.aqn!r})"

    @property
    def is_clean(self) -> bool:
        """True when nothing is applied: no weight format, no AQN."""
        return not self.formats and not self.emulation.aqn_sigma and self.aqn is None

    # -- weights -----------------------------------------------------------------------------

    def quantized(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights as the engine should receive them: each selected HF tensor fake-quantized in
        its format (``hwnoise.quantize``), every other one as given. Counts what it quantized."""
        for name, tensor in weights:
            name = hf_name(name)
            fmt = self.formats.get(name) if self.enabled else None
            if fmt is None:
                yield name, tensor
                continue
            with torch.no_grad():
                q = quantize(tensor.detach(), fmt)
                self._signal += float(tensor.detach().float().pow(2).sum())
                self._noise += float((q.float() - tensor.detach().float()).pow(2).sum())
            self.weights_quantized += 1
            yield name, q

    def take_stats(self) -> dict[str, float]:
        """What the loads since the last call quantized: ``weights_quantized``, ``weight_sqnr_db``
        (the names ``EmulationStats.as_dict`` uses); empty when nothing was quantized. Resets."""
        out = {}
        if self.weights_quantized:
            out["weights_quantized"] = float(self.weights_quantized)
            out["weight_sqnr_db"] = 10 * math.log10(self._signal / self._noise) if self._noise > 0 else math.inf
        self.weights_quantized, self._signal, self._noise = 0, 0.0, 0.0
        return out

    def attach(self, model: nn.Module) -> None:
        """Quantize every weight later loaded through ``model.load_weights`` (TRL's and verl's syncs).

        The bound method is shadowed on this model instance only; ``detach`` puts it back. Attaching
        twice is an error (it would quantize twice)."""
        if _HOOK in model.__dict__:
            raise RuntimeError("a VLLMEmulation is already attached to this vLLM model; detach it first")
        original = model.load_weights

        def load_weights(weights, *args, **kwargs):
            return original(self.quantized(weights), *args, **kwargs)

        model.__dict__[_HOOK] = original
        model.load_weights = load_weights

    def detach(self, model: nn.Module) -> None:
        """Undo ``attach`` (a no-op when not attached)."""
        original = model.__dict__.pop(_HOOK, None)
        if original is not None:
            del model.__dict__["load_weights"]

    def load(self, model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]):
        """Load ``weights`` (HF names) into the vLLM model, quantized per the plan. Returns what
        vLLM's ``load_weights`` returns (the names it loaded)."""
        original = model.__dict__.get(_HOOK, model.load_weights)
        return original(self.quantized(weights))

    def reload(self, model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], model_config=None):
        """Load new weights into a running engine's model the way vLLM reloads them, quantized per the plan.

        Plain ``load_weights`` (TRL's colocate sync) cannot update a model whose backend repacked its
        weights after loading: on vLLM's CPU backend every linear weight is packed into a oneDNN handle
        and its Parameter left empty, so loading into it fails (``Attempted to load weight ... into
        parameter (torch.Size([0]))``). vLLM's layerwise reload restores each layer's parameters,
        loads, and runs the layer's post-loading processing (the repacking) again, on any backend.
        model_config: the engine's ``ModelConfig`` (``llm.llm_engine.model_config``). Returns the
        names loaded."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        if model_config is None:
            raise ValueError("reload needs the engine's model_config (llm.llm_engine.model_config)")
        initialize_layerwise_reload(model)
        loaded = self.load(model, weights)
        finalize_layerwise_reload(model, model_config)
        return loaded

    @contextmanager
    def suspended(self):
        """Loads inside pass through unquantized (a clean sync, e.g. before a clean evaluation)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    # -- AQN -----------------------------------------------------------------------------------

    @contextmanager
    def noisy(self, model: nn.Module, step: int = 0, total_steps: int = 1, steps_per_epoch: int | None = None):
        """AQN on the vLLM model's RMSNorm weights for the block, clean copies written back on exit.

        The schedule AQN (``aqn=``) draws at its sigma for ``step`` of ``total_steps``; the spec's
        ``aqn:SIGMA`` then draws as ``Emulation.applied(model, seed, step)`` does (key (seed, step)).
        Draws are keyed by parameter name and step, never by what ran before: a block at step s
        writes the same weights whatever came earlier. Yields the list of AQNs applied (their
        ``stats()`` say what landed)."""
        applied: list[AQN] = []
        try:
            if self.aqn is not None:
                self.aqn.apply(model, step, total_steps, steps_per_epoch)
                applied.append(self.aqn)
            if self.emulation.aqn_sigma:
                spec_aqn = AQN(Constant(self.emulation.aqn_sigma), seed=_derived_seed(self.seed, step, "aqn"))
                spec_aqn.apply(model, 0, 1)
                applied.append(spec_aqn)
            self._noise_aqn = applied
            yield applied
        finally:
            for aqn in reversed(applied):  # the spec's AQN took the schedule-noisy weights as its clean copy
                aqn.restore(model)
            self._noise_aqn = []

    @property
    def noise_applied(self) -> bool:
        """True inside ``noisy``: the vLLM model's norm weights carry noise."""
        return any(a.applied for a in self._noise_aqn)


def weight_formats(emulation, reference: nn.Module) -> dict[str, str]:
    """``{HF weight name: format}`` the emulation's weight format selects on ``reference``.

    The same selection as the HF path's weight swap: a plan's module names (with ``exclude``), or
    ``targets`` / ``exclude`` through ``hwnoise.select.select_modules``. Names as vLLM's loader
    expects them (``hf_name``).

    Example: ``weight_formats("weights:mxfp4", model)["model.layers.0.mlp.up_proj.weight"] == "mxfp4"``.
    """
    emulation = Emulation.parse(emulation)
    fmt = emulation.weight_format
    if fmt is None:
        return {}
    plan = WeightPlan.coerce(fmt) if is_plan_spec(fmt) else None
    modules = (plan.select(reference, exclude=emulation.exclude) if plan
               else select_modules(reference, emulation.targets, exclude=emulation.exclude or None))
    out = {}
    for name, module in modules.items():
        if isinstance(module._parameters.get("weight"), torch.Tensor):
            out[hf_name(f"{name}.weight")] = plan.format_for(name) if plan else fmt
    if not out:
        raise ValueError(f"weight format {fmt!r}: no module selected by targets={emulation.targets!r} has a weight")
    return out
