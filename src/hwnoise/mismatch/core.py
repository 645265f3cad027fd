"""``mismatch(model, tokenizer, rollouts, ...)``: the rollout-training mismatch of each rollout
setting, predicted before any training run.

For each rollout emulation: draw completions from the model with that emulation applied, then
score the drawn tokens twice by one teacher-forced forward each, once under the rollout emulation
(what the rollout engine believes it sampled from) and once under the training emulation (the
policy the trainer optimizes; by default the model as loaded, at its own precision). The
difference of the two log-probabilities per token is what verl's ``rollout_corr`` and TRL's
``sampling/...`` metrics measure during a run (``hwnoise.mismatch.stats`` names each).

``rollout_logprobs="rescore"`` (default) takes the rollout side from that teacher-forced forward:
the difference is the emulation's alone, and exactly 0 when both sides share numerics.
``"sampler"`` takes it from the logits the sampler drew with (HF ``generate``, KV cache, another
batch shape), so the engine's own numerics enter as they do with a real rollout engine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..emulation import Emulation
from ..eval.generate import build_prompts
from ..progress import ProgressCallback, progress_reporter
from .sampling import Samples, sample, score_pair, weights_digest
from .stats import HOST_NAMES, METRICS, setting_stats

__all__ = ["DEFAULTS", "ENGINES", "MISMATCH_FILE", "MismatchReport", "ROLLOUT_LOGPROBS", "check_options",
           "mismatch"]

MISMATCH_FILE = "mismatch.json"
ENGINES = ("hf",)
ROLLOUT_LOGPROBS = ("rescore", "sampler")
# Sized for the bundled model (SmolLM2-135M, fp32) on 2 CPU cores: about 1 CPU-minute a setting (measured on a
# machine at load ~24, where 5 settings took 49 min of wall time: docs/mismatch.md).
DEFAULTS = {"prompts": "arith", "n": 16, "samples_per_prompt": 1, "max_new_tokens": 64, "temperature": 1.0,
            "clip": 2.0, "batch_size": 8, "seed": 0, "rank_by": "abs_logp_diff", "rollout_logprobs": "rescore",
            "engine": "hf"}


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def check_options(*, n=None, samples_per_prompt=1, max_new_tokens=64, temperature=1.0, clip=2.0, batch_size=8,
                  seed=0, rank_by="abs_logp_diff", rollout_logprobs="rescore", engine="hf") -> None:
    """Refuse bad options before any work starts (the CLI calls this before the model loads).

    Example:
        >>> check_options(clip=0.5)
        Traceback (most recent call last):
        ValueError: clip must be a number > 1 (the TIS truncation C, e.g. 2.0); got 0.5
    """
    if n is not None:
        _positive_int("n (prompts)", n)
    _positive_int("samples_per_prompt", samples_per_prompt)
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 (1.0 samples the model's own distribution); got {temperature!r}")
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip > 1):
        raise ValueError(f"clip must be a number > 1 (the TIS truncation C, e.g. 2.0); got {clip!r}")
    if rank_by not in METRICS:
        raise ValueError(f"unknown rank_by {rank_by!r}; known: {', '.join(METRICS)}")
    if rollout_logprobs not in ROLLOUT_LOGPROBS:
        raise ValueError(f"unknown rollout_logprobs {rollout_logprobs!r}; known: {', '.join(ROLLOUT_LOGPROBS)} "
                         "(rescore: a teacher-forced forward under the rollout emulation; sampler: the logits "
                         "generate drew with)")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)} (the vLLM engine is not part "
                         "of this tree yet: hwnoise.engines does not exist)")


def parse_settings(rollouts) -> list[Emulation]:
    """Rollout settings from spec strings or Emulations, de-duplicated by spec, in the given order."""
    if isinstance(rollouts, (str, Emulation)):
        rollouts = [rollouts]
    out: list[Emulation] = []
    for r in rollouts or ():
        e = Emulation.parse(r)
        if e.spec not in [o.spec for o in out]:
            out.append(e)
    if not out:
        raise ValueError("give at least one rollout setting, e.g. 'clean' or 'weights:nvfp4'")
    return out


@dataclass
class MismatchReport:
    """The measured mismatch of every rollout setting (data first; views in ``hwnoise.mismatch.views``).

    ``settings``: one dict per rollout setting (``spec``, ``label``, ``tokens``, ``metrics`` (name ->
    mean/low/high), ``by_position``, ``growth``, ``mean_completion_tokens``, ``seconds``), in the
    ranked order; ``ranking``: the specs, largest ``rank_by`` first, each marked ``separated`` when
    its interval does not overlap the next one's."""

    model: str
    training: str
    config: dict
    identity: dict
    settings: list[dict]
    ranking: list[dict]
    seconds: dict = field(default_factory=dict)
    attribution: dict | None = None
    OUTPUT_FILES = (MISMATCH_FILE, "mismatch.png")

    def setting(self, spec: str) -> dict:
        spec = Emulation.parse(spec).spec
        for s in self.settings:
            if s["spec"] == spec:
                return s
        raise KeyError(f"no setting {spec!r}; measured: {', '.join(s['spec'] for s in self.settings)}")

    def value(self, spec: str, metric: str = "abs_logp_diff") -> float:
        return self.setting(spec)["metrics"][metric]["mean"]

    def to_json(self) -> dict:
        return {"kind": "hwnoise.mismatch", "model": self.model, "training": self.training, "config": self.config,
                "identity": self.identity, "metric_sources": HOST_NAMES, "ranking": self.ranking,
                "settings": [{k: v for k, v in s.items() if k not in _IN_MEMORY} for s in self.settings],
                "attribution": self.attribution, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> "MismatchReport":
        return cls(model=data["model"], training=data["training"], config=data["config"], identity=data["identity"],
                   settings=data["settings"], ranking=data["ranking"], seconds=data.get("seconds", {}),
                   attribution=data.get("attribution"))

    def save(self, directory, plots: bool = True):
        """Write mismatch.json (and mismatch.png) into ``directory``, each atomically; nothing else is touched."""
        from ..io import atomic_write_bytes, json_text, prepare_out_dir
        from . import views

        path = prepare_out_dir(directory)
        files = {MISMATCH_FILE: json_text(self.to_json()).encode()}
        if plots:
            files["mismatch.png"] = views.plot_png(self)
        for name, data in files.items():
            atomic_write_bytes(path / name, data)
        return path


_IN_MEMORY = ("tokens_data", "samples")  # kept with keep_tokens=True, never written


def rank(settings: list[dict], rank_by: str) -> list[dict]:
    """The settings' specs ordered by ``rank_by`` (largest first); ``separated``: its interval lies
    wholly above the next setting's."""
    order = sorted(settings, key=lambda s: -s["metrics"][rank_by]["mean"])
    out = []
    for i, s in enumerate(order):
        m = s["metrics"][rank_by]
        nxt = order[i + 1]["metrics"][rank_by] if i + 1 < len(order) else None
        out.append({"rank": i + 1, "spec": s["spec"], rank_by: m["mean"], "low": m["low"], "high": m["high"],
                    "separated": None if nxt is None else bool(m["low"] > nxt["high"])})
    return out


def flatten(samples: Samples, scores: list[dict], batches: list, mode: str) -> dict[str, np.ndarray]:
    """Flat per-token arrays over every scored row (in row order, then position): log rho, exact KL,
    completion position, prompt, sequence (row), and the two sides' log-probabilities."""
    log_rho, kl, pos, prompt, seq, lp_t, lp_r = [], [], [], [], [], [], []
    row = 0
    for batch, sc in zip(batches, scores):
        valid = batch.valid
        positions = batch.positions
        for r in range(valid.shape[0]):
            v = valid[r]
            train = sc["training"][r][v].double().numpy()
            if mode == "sampler":
                roll = np.asarray(samples.sampler_logp[row], dtype=float)
            else:
                roll = sc["rollout"][r][v].double().numpy()
            log_rho.append(train - roll)
            lp_t.append(train)
            lp_r.append(roll)
            kl.append(sc["kl"][r][v].double().numpy())
            pos.append(positions[r][v].numpy())
            prompt.append(np.full(int(v.sum()), samples.prompt_index[row]))
            seq.append(np.full(int(v.sum()), row))
            row += 1
    cat = np.concatenate
    return {"log_rho": cat(log_rho), "kl": cat(kl), "position": cat(pos).astype(int), "prompt": cat(prompt).astype(int),
            "sequence": cat(seq).astype(int), "training_logp": cat(lp_t), "rollout_logp": cat(lp_r)}


def mismatch(model, tokenizer, rollouts, *, training="clean", prompts="arith", n: int | None = None,
             samples_per_prompt: int = 1, max_new_tokens: int = 64, temperature: float = 1.0, clip: float = 2.0,
             batch_size: int = 8, seed: int = 0, rank_by: str = "abs_logp_diff", rollout_logprobs: str = "rescore",
             engine: str = "hf", model_name: str = "model", on_progress: ProgressCallback | None = None,
             keep_tokens: bool = False) -> MismatchReport:
    """Predict the rollout-training mismatch of each rollout setting (see the module docstring).

    Args:
        model, tokenizer: a causal LM (``hwnoise.models.load``) at its training precision.
        rollouts: emulation specs or ``Emulation``s, one per rollout setting ("clean", "weights:nvfp4",
            "relative:0.05@ops", "weights:plan.json", "aqn:0.01", ...).
        training: the training side's emulation spec ("clean": the model as it is).
        prompts: "arith", "arith:level=1", a GSM8K-format .jsonl/.parquet path (``hwnoise.data``),
            or a list of question strings. n: how many (default 16).
        samples_per_prompt, max_new_tokens, temperature: the sampling (multinomial, no top-k/top-p).
        clip: the TIS truncation C for the importance-ratio shares.
        batch_size: rows per generate call and per scoring forward.
        seed: the sampling and noise seed (every setting draws the same random numbers).
        rank_by: the metric the ranking uses (``hwnoise.mismatch.stats.METRICS``).
        rollout_logprobs: "rescore" or "sampler" (see the module docstring).
        engine: "hf" (transformers ``generate``).
        on_progress: ``on_progress(label, done, total)`` after each sampled and each scored batch.
        keep_tokens: also keep the per-token arrays (``settings[i]["tokens_data"]``, not written to JSON).

    Example:
        >>> model, tok = hwnoise.models.load("default")
        >>> report = mismatch(model, tok, ["clean", "weights:nvfp4"], n=8, max_new_tokens=32)
        >>> report.ranking[0]["spec"]
        'weights:nvfp4'
    """
    from ..data import load_problems
    from ..identity import model_placement, run_identity

    check_options(n=n, samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                  clip=clip, batch_size=batch_size, seed=seed, rank_by=rank_by, rollout_logprobs=rollout_logprobs,
                  engine=engine)
    settings = parse_settings(rollouts)
    train = Emulation.parse(training)
    n = n or DEFAULTS["n"]
    if isinstance(prompts, (list, tuple)):
        questions, source = [str(q) for q in prompts][:n], "list"
    else:
        questions, source = [p.question for p in load_problems(prompts, n=n, seed=seed)], str(prompts)
    report_progress = progress_reporter(on_progress, what="mismatch")
    rendered = build_prompts(tokenizer, questions)
    t0 = time.perf_counter()
    digest = weights_digest(model)
    results = []
    for si, setting in enumerate(settings):
        ts = time.perf_counter()
        samples = sample(model, tokenizer, rendered, setting, max_new_tokens=max_new_tokens, temperature=temperature,
                         samples_per_prompt=samples_per_prompt, batch_size=batch_size, seed=seed,
                         on_batch=lambda d, t, s=setting: report_progress("sample", s.spec, d, t))
        if weights_digest(model) != digest:
            from .sampling import WeightsChanged

            raise WeightsChanged(f"the model's weights changed while sampling under {setting.spec!r}")
        full = samples.batch()
        batches = [full.rows(slice(i, i + batch_size)) for i in range(0, full.input_ids.shape[0], batch_size)]
        scores = []
        for bi, b in enumerate(batches):
            scores.append(score_pair(model, b, setting, train, temperature=temperature, seed=seed, step=bi,
                                     digest=digest))
            report_progress("score", setting.spec, bi + 1, len(batches))
        flat = flatten(samples, scores, batches, rollout_logprobs)
        st = setting_stats(flat["log_rho"], flat["kl"], flat["position"], flat["prompt"], flat["sequence"],
                           len(rendered), clip=clip, max_new_tokens=max_new_tokens, seed=seed)
        entry = {"spec": setting.spec, "label": setting.label, **st,
                 "mean_completion_tokens": float(np.mean([len(c) for c in samples.completions])),
                 "seconds": round(time.perf_counter() - ts, 3)}
        if keep_tokens:
            entry["tokens_data"] = flat
            entry["samples"] = samples
        results.append(entry)
    dtype, device = model_placement(model)
    config = {"prompts": source, "n": len(rendered), "samples_per_prompt": samples_per_prompt,
              "max_new_tokens": max_new_tokens, "temperature": temperature, "clip": clip, "batch_size": batch_size,
              "seed": seed, "rank_by": rank_by, "rollout_logprobs": rollout_logprobs, "engine": engine,
              "training": train.spec}
    identity = run_identity(model_name, settings + [train], dtype=dtype, device=device, engine=engine)
    identity["config"] = dict(config)  # the batch shape too: padding and batch width change the numerics
    ordered = rank(results, rank_by)
    by_spec = {r["spec"]: r for r in results}
    return MismatchReport(model=model_name, training=train.spec, config=config, identity=identity,
                          settings=[by_spec[r["spec"]] for r in ordered], ranking=ordered,
                          seconds={"total": round(time.perf_counter() - t0, 3)})
