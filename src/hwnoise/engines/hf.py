"""The HF engine: transformers' ``generate`` on a model in this process (``hwnoise eval``'s default)."""

from __future__ import annotations

from ..eval.generate import Completion, Prompt, generate_greedy
from ..identity import model_placement

__all__ = ["HFEngine"]


class HFEngine:
    """Greedy batches on an HF model, each under ``setting.applied(model, seed, step)``.

    Args:
        model: an HF causal LM (placed where it should run).
        tokenizer: its tokenizer.

    Example::

        engine = HFEngine(model, tokenizer)
        with engine.applied(Emulation.parse("weights:mxfp4"), seed=0, step=0):
            completions = engine.generate(build_prompts(tokenizer, ["2+3?"]), 64)
    """

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @property
    def reference(self):
        """The model the settings are resolved on (here: the model that generates)."""
        return self.model

    def check(self, emulations) -> None:
        """Every emulation applies on the HF path (``check_settings`` checks them against the model)."""

    def placement(self) -> tuple[str, str]:
        """(dtype, device) the model really has, for the run's identity."""
        return model_placement(self.model)

    def applied(self, setting, seed: int, step: int):
        """The context a batch runs in: the setting applied to the model (undone on exit)."""
        return setting.applied(self.model, seed=seed, step=step)

    def generate(self, prompts: list[Prompt], max_new_tokens: int) -> list[Completion]:
        """Greedy completions of one batch (left-padded ``generate``), each stopped at its first EOS."""
        return generate_greedy(self.model, self.tokenizer, prompts, max_new_tokens)

    def close(self) -> None:
        """Nothing to release (the model is the caller's)."""
