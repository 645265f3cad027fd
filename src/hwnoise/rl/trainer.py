"""``HwnoiseGRPOTrainer``: TRL's GRPOTrainer with rollouts and loss passes under emulated hardware.

Two overrides, each calling ``super()``:

- ``_generate`` (the rollout): inside ``hwnoise.phase("rollout")``, AQN noise at the schedule's sigma
  for ``state.global_step`` on the norm weights, and the rollout ``Emulation`` (grad=False: quantized
  weights swapped in); both are undone when generation returns or raises. With vLLM the sync of the
  training weights to the engine happens inside ``_generate``, so the engine receives the noisy /
  quantized weights; nothing else reaches it.
- ``_get_per_token_logps_and_entropies`` (every forward of the policy outside generation: the loss
  pass, and the old/reference log-probs TRL computes after generation): inside
  ``hwnoise.phase("training")`` and the training ``Emulation`` (grad=True when autograd records:
  straight-through weights, noisy backward GEMMs). ``compute_loss`` declares the training phase too,
  so user hooks made with ``phase="training"`` see the whole loss computation.

With ``rollout.engine: vllm`` (TRL's ``use_vllm``, colocate mode) the rollout emulation runs inside the
engine instead (``hwnoise.engines.vllm_emulation``): the training model stays clean, every weight sync
goes through vLLM's layerwise reload with each selected HF tensor fake-quantized in its planned
format (plain ``load_weights`` cannot update vLLM's CPU backend, which packs linear weights away),
and AQN is drawn on vLLM's RMSNorm weights after the sync, keyed by (seed, name, step), and
restored when generation returns. After each emulated sync one weight is read back through vLLM's
own kernel and compared with ``hwnoise.quantize`` of the synced tensor, bit for bit
(``rollout/vllm_weight_check``); a mismatch raises. TRL's own evaluation loop generates from a
clean sync. The rollout-training mismatch is TRL's ``sampling/sampling_logp_difference/mean|max``.

What was applied is logged through TRL's metrics (``aqn/sigma``, ``aqn/effective_std``,
``rollout/...``, ``training/...``), so every ``report_to`` backend gets it at each logging step.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from trl import GRPOTrainer

from ..emulation import Emulation
from ..inject import phase

__all__ = ["HwnoiseGRPOTrainer"]


class HwnoiseGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts run under AQN and a rollout emulation, its loss under a training one.

    aqn: an ``hwnoise.AQN`` (its schedule gives sigma per global step) or None.
    rollout_emulation / training_emulation: ``hwnoise.emulation.Emulation`` or None (clean).
    emulation_seed: every draw is keyed by (emulation_seed, global step), so a resumed run replays
    the noise an uninterrupted one drew. steps_per_epoch: for epoch-aware AQN schedules; None: taken
    from the trainer (optimizer steps per pass over the data, as transformers counts them) when
    training by epochs.
    """

    def __init__(self, *args, aqn=None, rollout_emulation: Emulation | None = None,
                 training_emulation: Emulation | None = None, emulation_seed: int = 0,
                 steps_per_epoch: int | None = None, **kwargs):
        grpo_args = kwargs.get("args")
        use_vllm = grpo_args is not None and grpo_args.use_vllm
        if use_vllm:
            _prepare_vllm(grpo_args)
        with _eager_vllm() if use_vllm else nullcontext():
            super().__init__(*args, **kwargs)
        self.aqn = aqn
        self.rollout_emulation = None if rollout_emulation is None or rollout_emulation.is_clean else rollout_emulation
        self.training_emulation = (None if training_emulation is None or training_emulation.is_clean
                                   else training_emulation)
        self.emulation_seed = emulation_seed
        self._steps_per_epoch = steps_per_epoch
        self._training_calls = (-1, 0)  # (global step, training-emulation forwards so far in it)
        self.vllm_emulation = None
        if self.use_vllm:
            self._setup_vllm()

    @property
    def steps_per_epoch(self) -> int | None:
        if self._steps_per_epoch is not None:
            return self._steps_per_epoch
        if self.args.max_steps > 0:  # trained by steps: no epochs to restart in
            return None
        # transformers sets max_steps = ceil(epochs * update steps per epoch); epochs are whole here.
        return -(-self.state.max_steps // round(self.args.num_train_epochs))

    # -- rollout ---------------------------------------------------------------------------------

    def _noise_target(self):
        # The parameters accelerate wraps are the ones generation reads (and vLLM's sync sends).
        return self.accelerator.unwrap_model(self.model)

    def _generate(self, prompts):
        if self.vllm_emulation is not None:
            return self._generate_vllm(prompts)
        if not self.model.training:  # TRL's own evaluation loop: clean, like hwnoise's evaluation
            return super()._generate(prompts)
        step, model = self.state.global_step, self._noise_target()
        metrics = self._metrics["train"]
        with ExitStack() as stack:
            stack.enter_context(phase("rollout"))
            if self.aqn is not None:
                stack.enter_context(self.aqn.noisy(model, step, self.state.max_steps, self.steps_per_epoch))
                self._log_aqn(metrics)
            stats = None
            if self.rollout_emulation is not None:
                stats = stack.enter_context(self.rollout_emulation.applied(model, seed=self.emulation_seed,
                                                                           step=step, grad=False))
            result = super()._generate(prompts)
            if stats is not None:
                for key, value in stats.as_dict().items():
                    metrics[f"rollout/{key}"].append(value)
        return result

    # -- rollout in vLLM -------------------------------------------------------------------------

    def _setup_vllm(self) -> None:
        from ..engines.vllm_emulation import VLLMEmulation

        generation = self.vllm_generation
        emulated = self.aqn is not None or self.rollout_emulation is not None
        if generation.mode != "colocate":
            if emulated:
                raise ValueError("AQN and the rollout emulation run inside vLLM in colocate mode only "
                                 f"(vllm_mode={generation.mode!r}); use vllm_mode='colocate'")
            return
        if generation.enable_sleep_mode:
            raise ValueError("vllm_enable_sleep_mode: the rollout emulation re-syncs weights itself; turn sleep mode off")
        llm = generation.llm
        self._vllm_model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        self._vllm_model_config = llm.llm_engine.model_config
        reference = self._noise_target()
        self.vllm_emulation = VLLMEmulation(self.rollout_emulation or "clean", reference=reference,
                                            seed=self.emulation_seed, aqn=self.aqn)
        self._vllm_shapes = {name: tuple(p.shape) for name, p in reference.named_parameters()}
        self._vllm_synced = None  # (global step, emulated) of the weights the engine holds
        self._vllm_sync_stats: dict[str, float] = {}
        # TRL calls sync_weights when the step changed; hwnoise syncs first (below), so TRL's call
        # finds the step loaded. Any other caller still gets the reload-based sync.
        generation.sync_weights = lambda: self._vllm_sync(emulated=self.model.training)

    def _vllm_sync(self, emulated: bool) -> None:
        """Push the training weights into vLLM (layerwise reload), quantized when ``emulated``."""
        generation, emulation = self.vllm_generation, self.vllm_emulation
        with torch.no_grad(), (nullcontext() if emulated else emulation.suspended()):
            emulation.reload(self._vllm_model, generation._iter_named_params(), self._vllm_model_config)
        generation.llm.reset_prefix_cache()
        self._vllm_sync_stats = emulation.take_stats()
        if emulated and emulation.formats:
            self._vllm_sync_stats["vllm_weight_check"] = self._check_vllm_weight()
        self._vllm_synced = (self.state.global_step, emulated)
        self._last_loaded_step = self.state.global_step

    def _check_vllm_weight(self) -> float:
        """Read one formatted weight back from vLLM and compare it with quantize(synced weight)."""
        from ..engines.vllm_emulation import vllm_weight
        from ..formats import quantize

        reference = self._noise_target()
        if hasattr(reference, "peft_config"):  # the synced weight was the merged one: not at hand now
            return float("nan")
        name, fmt = next(iter(self.vllm_emulation.formats.items()))
        want = quantize(reference.get_parameter(name).detach(), fmt)
        got = vllm_weight(self._vllm_model, name, self._vllm_shapes)
        if not torch.equal(got.to(want.device), want):
            raise RuntimeError(f"after the weight sync, vLLM's {name} is not quantize(synced weight, {fmt!r}): the "
                               "rollout emulation did not reach the engine")
        return 1.0

    def _generate_vllm(self, prompts):
        step, training = self.state.global_step, self.model.training
        # Training rollouts: the emulated weights of this step; TRL's own evaluation: clean weights.
        emulated = training and not self.vllm_emulation.is_clean
        if self._vllm_synced != (step, emulated):
            self._vllm_sync(emulated)
        if not training:
            return super()._generate(prompts)
        metrics = self._metrics["train"]
        with phase("rollout"), self.vllm_emulation.noisy(self._vllm_model, step, self.state.max_steps,
                                                           self.steps_per_epoch) as noise:
            if self.aqn is not None:
                self._log_aqn(metrics)
            result = super()._generate(prompts)
        for key, value in self._vllm_sync_stats.items():
            metrics[f"rollout/{key}"].append(value)
        spec_noise = [a for a in noise if a is not self.aqn]
        for aqn in spec_noise:
            values = [s.effective_std for s in aqn.stats().values()]
            if values:
                metrics["rollout/aqn_effective_std"].append(sum(values) / len(values))
        return result

    def _log_aqn(self, metrics) -> None:
        noise = list(self.aqn.stats().values())
        sigma = noise[0].sigma if noise else self.aqn.sigma_at(self.state.global_step, self.state.max_steps,
                                                                 self.steps_per_epoch)
        metrics["aqn/sigma"].append(float(sigma))
        if noise:
            weights = [s.numel for s in noise]
            total = sum(weights)
            # The noise the model really sees after the cast, averaged over noised elements.
            metrics["aqn/effective_std"].append(sum(s.effective_std * w for s, w in zip(noise, weights)) / total)
            metrics["aqn/requested_std"].append(sum(s.requested_sigma * w for s, w in zip(noise, weights)) / total)
            metrics["aqn/changed_fraction"].append(sum(s.changed_fraction * w for s, w in zip(noise, weights)) / total)

    # -- loss pass -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with phase("training"):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self.training_emulation is None:
            with phase("training"):
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        grad = torch.is_grad_enabled()
        mode = "train" if self.model.training else "eval"
        # Each forward of a step (old log-probs, every micro-batch's loss pass) draws its own noise:
        # keyed by (global step, its index within the step), so a resumed run replays it too.
        step = self.state.global_step
        calls = self._training_calls[1] + 1 if self._training_calls[0] == step else 0
        self._training_calls = (step, calls)
        with phase("training"), self.training_emulation.applied(
                model, seed=self.emulation_seed, step=step, grad=grad, substep=calls) as stats:
            result = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            if grad:
                for key, value in stats.as_dict().items():
                    self._metrics[mode][f"training/{key}"].append(value)
        return result


def _prepare_vllm(args) -> None:
    """What TRL's colocate vLLM needs in one process, before the engine starts.

    The rendezvous variables of a one-process group (TRL sets RANK / WORLD_SIZE itself; MASTER_* are
    given defaults here so nothing waits on a launcher). On the CPU build, ``vllm_gpu_memory_utilization``
    is the fraction of *host* memory vLLM reserves (TRL's default 0.9 fails on a shared machine) and
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache: both are given small defaults when unset.
    """
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if args.use_cpu or not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if args.vllm_gpu_memory_utilization == 0.9:  # TRL's default, meant for a GPU
            args.vllm_gpu_memory_utilization = 0.15


@contextmanager
def _eager_vllm():
    """TRL's colocate ``LLM(...)`` built with ``enforce_eager=True`` (TRL passes no such option).

    Without it vLLM compiles the model (torch.compile / inductor, also on CPU): most of the engine's
    start-up on a CPU, and a compiled graph may keep the weight handles it traced, while every sync
    replaces them (the layerwise reload repacks the weights); eager mode runs vLLM's layer code as is.
    """
    from trl.generation import vllm_generation

    original = vllm_generation.LLM

    def eager_llm(*args, **kwargs):
        kwargs.setdefault("enforce_eager", True)
        return original(*args, **kwargs)

    vllm_generation.LLM = eager_llm
    try:
        yield
    finally:
        vllm_generation.LLM = original
