"""The mismatch statistics of one setting, from per-token log-probabilities, with 95 % intervals.

Per sampled completion token t, with log rho_t = log pi_train(y_t) - log pi_rollout(y_t) (verl's
``log_ratio``; TRL's ``old_per_token_logps - sampling_per_token_logps``):

- ``abs_logp_diff``: mean |log rho| -- TRL's ``sampling/sampling_logp_difference/mean``
  (``max_abs_logp_diff``: its ``/max``);
- ``kl_k1``: mean(-log rho), verl's ``rollout_corr/kl`` (the direct estimator of KL(rollout || training));
- ``kl_k2``: mean((log rho)^2 / 2);
- ``kl_k3``: mean(rho - 1 - log rho), verl's ``rollout_corr/k3_kl``;
- ``kl_exact``: the exact KL(rollout || training) of the two next-token distributions, averaged over
  the same positions: what k1, k2 and k3 estimate (neither host logs it; it needs the full logits);
- ``ratio_mean``: mean rho, TRL's ``sampling/importance_sampling_ratio/mean`` in its token modes;
- ``chi2_token``: mean(rho^2) - 1, verl's ``rollout_corr/chi2_token``;
- ``ratio_above_clip``: share of tokens with rho > C, the tokens truncated importance sampling
  (TIS, verl's ``rollout_is_threshold``, TRL's ``vllm_importance_sampling_clip_max``) clips;
  ``ratio_outside_clip``: share outside [1/C, C] (what TRL's ``token_mask`` mode drops with
  clip_min = 1/C);
- per sequence, with log R = sum_t log rho_t: ``seq_log_ratio_abs`` = mean |log R|,
  ``seq_ratio_outside_clip`` = share of sequences with R outside [1/C, C] (TRL's
  ``sequence_mask``), ``chi2_seq`` = mean(R^2) - 1 (verl's ``rollout_corr/chi2_seq``).

Token statistics are token-weighted means over the whole setting (as both hosts average over the
batch's tokens); their 95 % intervals resample prompts (a cluster bootstrap: a prompt's tokens stay
together), BCa with a fixed seed, ``hwnoise.eval.stats.CONFIDENCE`` and ``BOOTSTRAP_RESAMPLES``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from ..eval.stats import BOOTSTRAP_BATCH, BOOTSTRAP_RESAMPLES, CONFIDENCE

__all__ = ["METRICS", "SEQUENCE_METRICS", "TOKEN_METRICS", "cluster_interval", "position_buckets",
           "setting_stats"]

TOKEN_METRICS = ("abs_logp_diff", "kl_k1", "kl_k2", "kl_k3", "kl_exact", "ratio_mean", "chi2_token",
                 "ratio_above_clip", "ratio_outside_clip")
SEQUENCE_METRICS = ("seq_log_ratio_abs", "seq_ratio_outside_clip", "chi2_seq")
METRICS = TOKEN_METRICS + SEQUENCE_METRICS
# Where each metric comes from (the names the hosts log), for the JSON and the docs.
HOST_NAMES = {
    "abs_logp_diff": "TRL sampling/sampling_logp_difference/mean",
    "kl_k1": "verl rollout_corr/kl",
    "kl_k3": "verl rollout_corr/k3_kl",
    "ratio_mean": "TRL sampling/importance_sampling_ratio/mean (token modes)",
    "chi2_token": "verl rollout_corr/chi2_token",
    "chi2_seq": "verl rollout_corr/chi2_seq",
    "ratio_above_clip": "share clipped by TIS at C (verl rollout_is_threshold, TRL vllm_importance_sampling_clip_max)",
    "seq_ratio_outside_clip": "share masked by TRL vllm_importance_sampling_mode=sequence_mask",
}
SAFETY_BOUND = 20.0  # verl clamps log ratios to +-20 before exponentiating (rollout_corr_helper.SAFETY_BOUND)


def cluster_interval(sums, counts, seed: int = 0, confidence: float = CONFIDENCE,
                     n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95 % interval of sum(sums) / sum(counts), resampling clusters (prompts) with their counts.

    Example:
        >>> cluster_interval([1.0, 2.0, 3.0], [1, 1, 1])  # the mean of 1, 2, 3, resampled
    """
    s = np.asarray(sums, dtype=float)
    n = np.asarray(counts, dtype=float)
    keep = n > 0
    s, n = s[keep], n[keep]
    if s.size == 0:
        return math.nan, math.nan
    point = float(s.sum() / n.sum())
    per = s / n
    if s.size < 2 or np.all(per == per[0]):  # every cluster agrees: every resample gives the point
        return point, point

    def ratio(a, b, axis=-1):
        return a.sum(axis=axis) / b.sum(axis=axis)

    for method in ("BCa", "percentile"):
        res = sps.bootstrap((s, n), ratio, paired=True, vectorized=True, n_resamples=n_resamples,
                            batch=BOOTSTRAP_BATCH, confidence_level=confidence, method=method,
                            rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return min(low, point), max(high, point)
    return point, point


def _per_prompt(values: np.ndarray, prompt: np.ndarray, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    sums = np.bincount(prompt, weights=values, minlength=n_prompts)
    counts = np.bincount(prompt, minlength=n_prompts).astype(float)
    return sums, counts


def _metric(values, prompt, n_prompts, seed) -> dict:
    values = np.asarray(values, dtype=float)
    sums, counts = _per_prompt(values, prompt, n_prompts)
    low, high = cluster_interval(sums, counts, seed=seed)
    return {"mean": float(values.mean()) if values.size else math.nan, "low": low, "high": high}


def token_values(log_rho: np.ndarray, kl: np.ndarray, clip: float) -> dict[str, np.ndarray]:
    """Each token metric's per-token values (their mean is the metric)."""
    lr = np.clip(log_rho, -SAFETY_BOUND, SAFETY_BOUND)
    rho = np.exp(lr)
    return {
        "abs_logp_diff": np.abs(log_rho),
        "kl_k1": -log_rho,
        "kl_k2": 0.5 * log_rho ** 2,
        "kl_k3": rho - 1.0 - lr,
        "kl_exact": kl,
        "ratio_mean": rho,
        "chi2_token": rho ** 2 - 1.0,
        "ratio_above_clip": (rho > clip).astype(float),
        "ratio_outside_clip": ((rho > clip) | (rho < 1.0 / clip)).astype(float),
    }


def position_buckets(max_new_tokens: int) -> list[tuple[int, int]]:
    """Completion-position buckets [lo, hi): 0-8, 8-16, 16-32, ... (doubling) up to ``max_new_tokens``."""
    edges = [0, 8]
    while edges[-1] < max_new_tokens:
        edges.append(edges[-1] * 2)
    edges[-1] = max(max_new_tokens, edges[-2] + 1)
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < max_new_tokens]


def setting_stats(log_rho: np.ndarray, kl: np.ndarray, position: np.ndarray, prompt: np.ndarray,
                  sequence: np.ndarray, n_prompts: int, *, clip: float, max_new_tokens: int, seed: int = 0) -> dict:
    """Every statistic of one setting from flat per-token arrays (log rho, exact KL, completion
    position, prompt index, sequence index), with intervals over prompts."""
    values = token_values(log_rho, kl, clip)
    out = {"tokens": int(log_rho.size), "sequences": int(np.unique(sequence).size),
           "max_abs_logp_diff": float(np.abs(log_rho).max()) if log_rho.size else math.nan}
    metrics = {name: _metric(values[name], prompt, n_prompts, seed) for name in TOKEN_METRICS}
    # Per sequence.
    seqs = np.unique(sequence)
    seq_lr = np.bincount(sequence, weights=log_rho)[seqs]
    seq_prompt = np.array([prompt[sequence == s][0] for s in seqs]) if seqs.size else np.zeros(0, dtype=int)
    seq_lr_safe = np.clip(seq_lr, -SAFETY_BOUND, SAFETY_BOUND)
    seq_values = {"seq_log_ratio_abs": np.abs(seq_lr),
                  "seq_ratio_outside_clip": ((seq_lr_safe > math.log(clip)) | (seq_lr_safe < -math.log(clip))).astype(float),
                  "chi2_seq": np.exp(2 * seq_lr_safe) - 1.0}
    for name, v in seq_values.items():
        metrics[name] = _metric(v, seq_prompt, n_prompts, seed)
    out["metrics"] = metrics
    # Along the completion.
    rows = []
    for lo, hi in position_buckets(max_new_tokens):
        sel = (position >= lo) & (position < hi)
        if not sel.any():
            continue
        rows.append({"from": lo, "to": hi, "tokens": int(sel.sum()),
                     "abs_logp_diff": _metric(values["abs_logp_diff"][sel], prompt[sel], n_prompts, seed),
                     "kl_k3": _metric(values["kl_k3"][sel], prompt[sel], n_prompts, seed),
                     "kl_exact": _metric(values["kl_exact"][sel], prompt[sel], n_prompts, seed)})
    out["by_position"] = rows
    if len(rows) >= 2 and rows[0]["abs_logp_diff"]["mean"] > 0:
        out["growth"] = rows[-1]["abs_logp_diff"]["mean"] / rows[0]["abs_logp_diff"]["mean"]
    else:
        out["growth"] = None
    return out
