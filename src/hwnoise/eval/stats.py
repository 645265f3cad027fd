"""The statistics of a robustness evaluation, all computed by scipy.

- ``wilson_interval(k, n)``: 95 % Wilson score interval of an accuracy k / n
  (``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``).
- ``mcnemar_exact(b, c)``: exact McNemar test of two paired settings. Only the discordant pairs
  carry information (b: right clean, wrong under the setting; c: the reverse); under the null both
  kinds are equally likely, so p is the two-sided binomial test of b successes in b + c trials at 1/2.
- ``paired_bootstrap(clean, other)``: 95 % bootstrap interval (BCa, ``scipy.stats.bootstrap`` with
  ``paired=True`` and a fixed seed) of the accuracy drop clean - other, in points.
- ``exact_conditional_interval(b, c, n)``: the drop's interval from the Clopper-Pearson interval of
  b / (b + c), consistent with the exact McNemar test.
- ``robustness_class(drop, interval, n, b, c)``: the class of the drop, stated only when the whole
  bootstrap interval and the whole exact interval lie in one class, else "inconclusive" with the
  number of problems that would settle it.

All accuracies and differences in this module's results are in points (percent of problems).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOUNDARIES",
    "CLASSES",
    "CONFIDENCE",
    "Comparison",
    "compare",
    "exact_conditional_interval",
    "mcnemar_exact",
    "n_needed",
    "paired_bootstrap",
    "robustness_class",
    "wilson_interval",
]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
# Resamples (and BCa jackknife samples) per vectorized call: bounds memory at ~batch x n values.
BOOTSTRAP_BATCH = 1000
# DESIGN's classes of an accuracy drop, in points: < 1 robust, 1-3 moderate, > 3 not robust.
ROBUST_MAX = 1.0
MODERATE_MAX = 3.0
BOUNDARIES = (ROBUST_MAX, MODERATE_MAX)
CLASSES = ("robust", "moderate", "not robust", "inconclusive")


def _check_counts(k: int, n: int) -> None:
    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer; got {value!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1; got k={k}, n={n}")


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n, in points (0-100)."""
    _check_counts(k, n)
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact (binomial) two-sided McNemar p-value from the discordant counts b and c; 1.0 when b + c = 0."""
    for name, value in (("b", b), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"discordant count {name} must be an integer >= 0; got {value!r}")
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def paired_bootstrap(clean, other, seed: int = 0, confidence: float = CONFIDENCE,
                     n_resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Bootstrap interval of mean(clean) - mean(other), in points, resampling problems (pairs).

    ``clean`` and ``other`` are per-problem correctness (0/1) on the same problems, in the same order.
    BCa (scipy's default) is used; when every pair has the same difference (for example no discordant
    pairs) every resample gives that value and the interval is that single point.
    """
    x = np.asarray(clean, dtype=float) * 100.0
    y = np.asarray(other, dtype=float) * 100.0
    if x.shape != y.shape or x.ndim != 1 or x.size < 1:
        raise ValueError(f"clean and other must be 1-D and of the same nonzero length; got {x.shape} and {y.shape}")
    d = x - y
    if np.all(d == d[0]):  # degenerate: BCa is undefined, and the resampled mean is always d[0]
        return float(d[0]), float(d[0])

    def drop(a, b, axis=-1):
        return a.mean(axis=axis) - b.mean(axis=axis)

    result = stats.bootstrap((x, y), drop, paired=True, vectorized=True, n_resamples=n_resamples,
                             batch=BOOTSTRAP_BATCH, confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa can fail on extreme discrete data
        result = stats.bootstrap((x, y), drop, paired=True, vectorized=True, n_resamples=n_resamples,
                                 batch=BOOTSTRAP_BATCH, confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return low, high


def _class_of_interval(low: float, high: float) -> str | None:
    if high < ROBUST_MAX:
        return "robust"
    if low >= ROBUST_MAX and high <= MODERATE_MAX:
        return "moderate"
    if low > MODERATE_MAX:
        return "not robust"
    return None


def n_needed(drop: float, interval: tuple[float, float], n: int) -> int | None:
    """How many problems would make the interval of ``drop`` fall inside one class.

    The half-width h = (high - low) / 2 observed at n problems is assumed to shrink as 1/sqrt(n), and
    the drop d to stay where it is. The interval then sits inside d's class once its half-width is
    below the distance to the nearest class boundary, delta = min over b in {1, 3} of |d - b| (for
    1 < d < 3 both boundaries count; for d < 1 or d > 3 the nearest is the only one that matters):

        h * sqrt(n / n') < delta   <=>   n' > n * (h / delta)^2,   n_needed = floor(n * (h / delta)^2) + 1

    It is at least n + 1: the interval at n problems did not separate them (a skewed BCa interval
    can span a boundary with h < delta). None ("not determinable") when d sits on a boundary
    (delta = 0) or the interval has no width (no discordant pairs: nothing to scale).
    """
    low, high = interval
    half = (high - low) / 2.0
    delta = min(abs(drop - b) for b in BOUNDARIES)
    if delta <= 1e-9 or half <= 0:
        return None
    return max(math.floor(n * (half / delta) ** 2) + 1, n + 1)


def exact_conditional_interval(b: int, c: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Exact interval of the drop (points) given the discordant pairs: None when b + c = 0.

    Given m = b + c discordant pairs, b ~ Binomial(m, pi) and the drop is (m / n) * (2 pi - 1). The
    Clopper-Pearson interval of pi (``binomtest(b, m).proportion_ci(method="exact")``, the interval
    that inverts the exact McNemar test) maps to an interval of the drop. It holds m fixed, but it
    sees what the bootstrap cannot: with few discordant pairs, flips in the direction that happened
    not to occur (the bootstrap only reshuffles the flips that did occur).
    """
    m = b + c
    if m == 0:
        return None
    ci = stats.binomtest(int(b), int(m), 0.5).proportion_ci(confidence_level=confidence, method="exact")
    scale = 100.0 * m / n
    return scale * (2 * float(ci.low) - 1), scale * (2 * float(ci.high) - 1)


def robustness_class(drop: float, interval: tuple[float, float], n: int, b: int, c: int) -> tuple[str, int | None, str]:
    """(class, n_needed, reason) of an accuracy drop (points) with its 95 % bootstrap interval over n
    problems, b and c being the discordant counts (b: right clean and wrong under the setting).

    "robust": the whole interval < 1 pt; "moderate": the whole interval within [1, 3]; "not robust":
    the whole interval > 3. The class is stated only when the bootstrap interval AND the exact
    conditional interval (``exact_conditional_interval``, consistent with the exact McNemar test) both
    lie within it: with few discordant pairs the bootstrap interval is too narrow (b = 5, c = 0 of 64
    gives a bootstrap interval above 3 pts while the exact test cannot even reject "no change",
    p = 0.0625). Anything else is "inconclusive", with ``n_needed`` computed (see ``n_needed``) from the
    hull of the two intervals. With no discordant pairs both intervals are empty of information
    (every problem had the same outcome): "inconclusive", n_needed not determinable.
    """
    if b + c == 0:
        return "inconclusive", None, ("no discordant pairs: every problem had the same outcome clean and under "
                                      "the setting, so the interval has no width; n_needed not determinable")
    low, high = interval
    exact = exact_conditional_interval(b, c, n)
    boot_cls, exact_cls = _class_of_interval(low, high), _class_of_interval(*exact)
    text = f"95 % interval [{low:.2f}, {high:.2f}] pts (bootstrap), [{exact[0]:.2f}, {exact[1]:.2f}] (exact)"
    if boot_cls is not None and boot_cls == exact_cls:
        return boot_cls, None, f"{text}: both within the '{boot_cls}' range"
    hull = (min(low, exact[0]), max(high, exact[1]))
    need = n_needed(drop, hull, n)
    if boot_cls is None:
        why = "the bootstrap interval spans a class boundary"
    else:
        exact_says = "spans a class boundary" if exact_cls is None else f"says '{exact_cls}'"
        why = f"the bootstrap interval says '{boot_cls}' but the exact interval {exact_says}"
    if need is None:
        return "inconclusive", None, (f"{text}: {why}, and the observed drop {drop:.2f} sits on a boundary; "
                                      "n_needed not determinable")
    return "inconclusive", need, (f"{text}: {why}; about {need} problems would separate the observed drop "
                                  f"{drop:.2f} from the nearest class boundary")


@dataclass(frozen=True)
class Comparison:
    """One setting against clean on the same problems (points; drop = clean - setting accuracy)."""

    setting: str
    metric: str
    n: int
    clean_accuracy: float
    accuracy: float
    drop: float
    drop_ci: tuple[float, float]
    exact_drop_ci: tuple[float, float] | None
    mcnemar_p: float
    b: int  # right clean, wrong under the setting
    c: int  # wrong clean, right under the setting
    robustness: str
    n_needed: int | None
    reason: str

    def to_json(self) -> dict:
        return {
            "setting": self.setting, "metric": self.metric, "n": self.n,
            "clean_accuracy": self.clean_accuracy, "accuracy": self.accuracy,
            "difference": -self.drop, "drop": self.drop, "drop_ci": list(self.drop_ci),
            "exact_drop_ci": None if self.exact_drop_ci is None else list(self.exact_drop_ci),
            "mcnemar_p": self.mcnemar_p, "b": self.b, "c": self.c,
            "robustness": self.robustness, "n_needed": self.n_needed, "reason": self.reason,
        }


def compare(setting: str, clean, other, metric: str = "strict", seed: int = 0) -> Comparison:
    """Paired comparison of per-problem correctness ``other`` (under ``setting``) against ``clean``."""
    x = np.asarray(clean, dtype=bool)
    y = np.asarray(other, dtype=bool)
    if x.shape != y.shape or x.ndim != 1 or x.size < 1:
        raise ValueError(f"clean and other must be 1-D and of the same nonzero length; got {x.shape} and {y.shape}")
    n = int(x.size)
    b = int(np.sum(x & ~y))
    c = int(np.sum(~x & y))
    acc_clean, acc = 100.0 * x.mean(), 100.0 * y.mean()
    drop = float(acc_clean - acc)
    ci = paired_bootstrap(x, y, seed=seed)
    cls, need, reason = robustness_class(drop, ci, n, b, c)
    return Comparison(setting=setting, metric=metric, n=n, clean_accuracy=float(acc_clean), accuracy=float(acc),
                      drop=drop, drop_ci=ci, exact_drop_ci=exact_conditional_interval(b, c, n), mcnemar_p=mcnemar_exact(b, c), b=b, c=c, robustness=cls,
                      n_needed=need, reason=reason)
