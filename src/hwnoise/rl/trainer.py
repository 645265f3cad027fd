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

What was applied is logged through TRL's metrics (``aqn/sigma``, ``aqn/effective_std``,
``rollout/...``, ``training/...``), so every ``report_to`` backend gets it at each logging step.
"""

from __future__ import annotations

from contextlib import ExitStack

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
        super().__init__(*args, **kwargs)
        self.aqn = aqn
        self.rollout_emulation = None if rollout_emulation is None or rollout_emulation.is_clean else rollout_emulation
        self.training_emulation = (None if training_emulation is None or training_emulation.is_clean
                                   else training_emulation)
        self.emulation_seed = emulation_seed
        self._steps_per_epoch = steps_per_epoch
        self._training_calls = (-1, 0)  # (global step, training-emulation forwards so far in it)

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
