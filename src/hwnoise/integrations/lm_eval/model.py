"""``EmulatedHFLM``: lm-eval's HF model (``lm_eval.models.huggingface.HFLM``) under an emulation.

lm-eval sends every request of every task through two methods of ``HFLM``: ``_model_call``
(one forward over a batch of token ids: loglikelihood, multiple choice, rolling perplexity) and
``_model_generate`` (``model.generate`` for ``generate_until``). ``EmulatedHFLM`` overrides exactly
those two, so any task runs under the emulation without knowing of it, and nothing else of lm-eval
changes: the clean setting is lm-eval's own ``hf`` model, call for call.

Noise is keyed by content, not by call order: each call runs inside
``emulation.applied(model, seed=seed, step=key)`` where ``key`` is a hash of the call's own token
ids (and, for generation, its stop sequences and generation arguments). A rerun, a resumed run, or
the same request in another task order draws the same noise. With ``batch_size=1`` (lm-eval's
default) a request's noise depends on that request alone; with larger batches on the batch it is
in (lm-eval's batching is deterministic for the same documents and batch size, so reruns still
agree).

The weight format (``weights:FMT`` or a plan) is deterministic, so ``static_applied()`` applies it
once around a whole evaluation instead of re-quantizing every weight on every call; without it,
each call applies the full emulation itself (same results, slower).
"""

from __future__ import annotations

import dataclasses
import hashlib
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ...emulation import Emulation

__all__ = ["EmulatedHFLM", "REGISTERED_NAME", "content_key", "split_emulation"]

REGISTERED_NAME = "hwnoise-hf"
_KEY_MASK = 0x7FFF_FFFF_FFFF_FFFF


def content_key(*parts) -> int:
    """A 63-bit key of tensors and plain values (their bytes, shapes and dtypes): the ``step`` a call's
    noise is drawn under, so that the same request gets the same noise whenever it runs.

    Example:
        >>> content_key(torch.tensor([[1, 2, 3]])) == content_key(torch.tensor([[1, 2, 3]]))
        True
    """
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") & _KEY_MASK


def split_emulation(emulation: Emulation) -> tuple[Emulation, Emulation]:
    """(static, dynamic): the weight format alone, and everything else.

    Applying ``static`` outside and ``dynamic`` inside is what ``emulation.applied`` does (weights
    first, then AQN, input formats and errors), since the weight swap draws no noise.

    Example:
        >>> s, d = split_emulation(Emulation.parse("weights:mxfp4+relative:0.05@ops"))
        >>> s.spec, d.spec
        ('weights:mxfp4', 'relative:0.05@ops')
    """
    static = Emulation(weight_format=emulation.weight_format, targets=emulation.targets,
                       exclude=emulation.exclude) if emulation.weight_format else Emulation()
    # Without the weights, targets/exclude select nothing unless inputs or a module-level error read them
    # (an Emulation refuses selections that do nothing).
    selects = emulation.input_format or (emulation.error is not None and emulation.where != "ops")
    dynamic = dataclasses.replace(emulation, weight_format=None,
                                  **({} if selects else {"targets": "linear", "exclude": ()}))
    return static, dynamic


@register_model(REGISTERED_NAME)
class EmulatedHFLM(HFLM):
    """lm-eval's ``hf`` model with every forward and every generation under ``emulation``.

    Args:
        pretrained: an already loaded ``transformers.PreTrainedModel`` (e.g. ``hwnoise.models.load``)
            or anything ``HFLM`` accepts.
        emulation: an ``Emulation`` or a spec string (``"weights:mxfp4"``, ``"relative:0.05@ops"``,
            ``"aqn:0.01"``, ``"inputs:fp8_e4m3+relative:0.01@ops"``, ``"clean"``).
        noise_seed: the emulation's seed; each call's step is ``content_key`` of its inputs.
        **kwargs: passed to ``HFLM`` (``tokenizer``, ``batch_size``, ``max_length`` ...).

    Example:
        >>> from hwnoise.models import load
        >>> import lm_eval
        >>> model, tok = load("default")
        >>> lm = EmulatedHFLM(pretrained=model, tokenizer=tok, emulation="relative:0.05@ops")
        >>> with lm.static_applied():
        ...     results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=8)  # doctest: +SKIP
    """

    def __init__(self, pretrained, emulation: Emulation | str = "clean", noise_seed: int = 0, **kwargs):
        self.emulation = Emulation.parse(emulation)  # a bad spec fails before HFLM touches the model
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
            raise ValueError(f"noise_seed must be an integer; got {noise_seed!r}")
        self.noise_seed = noise_seed
        self._static, self._dynamic = split_emulation(self.emulation)
        self._static_active = False
        self.emulated_calls = 0  # calls that ran under a non-clean emulation (a check that it was reached)
        super().__init__(pretrained=pretrained, **kwargs)

    @contextmanager
    def static_applied(self):
        """Apply the weight format once for the enclosed block (restored on exit, also on errors)."""
        if self._static_active or self._static.is_clean:
            yield self
            return
        with self._static.applied(self.model, seed=self.noise_seed):
            self._static_active = True
            try:
                yield self
            finally:
                self._static_active = False

    def _emulated(self, key: int):
        if self.emulation.is_clean:
            return nullcontext()
        stack = ExitStack()
        if not self._static_active:
            stack.enter_context(self._static.applied(self.model, seed=self.noise_seed))
        if not self._dynamic.is_clean:
            stack.enter_context(self._dynamic.applied(self.model, seed=self.noise_seed, step=key))
        self.emulated_calls += 1
        return stack

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.emulation.is_clean:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with self._emulated(content_key("call", inps, attn_mask, labels)):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.emulation.is_clean:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        extra = [x for k in sorted(generation_kwargs) for x in (k, generation_kwargs[k])]  # attention_mask is a tensor
        key = content_key("generate", context, max_length, list(stop), *extra)
        with torch.no_grad(), self._emulated(key):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
