"""The evaluation's statistics against independent references: closed forms, hand-worked sums,
coverage on synthetic data, and the class rule on constructed intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hwnoise.eval import (
    compare,
    exact_conditional_interval,
    mcnemar_exact,
    n_needed,
    paired_bootstrap,
    robustness_class,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5 % quantile of N(0, 1)


def wilson_closed_form(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half), 100 * (centre + half)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (30, 64), (1, 1319), (700, 1319)])
def test_wilson_matches_closed_form(k, n):
    low, high = wilson_interval(k, n)
    ref_low, ref_high = wilson_closed_form(k, n)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert low <= 100 * k / n <= high


def test_wilson_rejects_bad_counts():
    for k, n in ((5, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="k <= n"):
            wilson_interval(k, n)


def test_mcnemar_exact_hand_worked():
    # b=1, c=7: p = 2 * sum_{k<=1} C(8, k) / 2^8 = 2 * (1 + 8) / 256
    assert mcnemar_exact(1, 7) == pytest.approx(0.0703125, abs=1e-12)
    assert mcnemar_exact(7, 1) == pytest.approx(0.0703125, abs=1e-12)
    # b=0, c=5: 2 * 1 / 32
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625, abs=1e-12)
    # b=2, c=10: 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096, abs=1e-12)
    assert mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(-1, 3)


def test_bootstrap_covers_the_true_difference():
    """Pairs drawn with P(right clean, wrong noisy) = 0.15 and the reverse 0.05: the true drop is 10
    points. The 95 % interval should cover it in about 95 % of independent samples."""
    rng = np.random.default_rng(1234)
    n, reps, covered = 300, 40, 0
    for rep in range(reps):
        u = rng.random(n)
        base = rng.random(n) < 0.5
        clean = np.where(u < 0.15, True, np.where(u < 0.20, False, base))
        noisy = np.where(u < 0.15, False, np.where(u < 0.20, True, base))
        low, high = paired_bootstrap(clean, noisy, seed=rep)
        covered += low <= 10.0 <= high
        assert low <= 100 * (clean.mean() - noisy.mean()) <= high
    assert covered >= 0.85 * reps, f"coverage {covered}/{reps}"


def test_bootstrap_is_seeded_and_degenerate_cases_are_points():
    clean = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 8, dtype=bool)
    noisy = clean.copy()
    noisy[:6] = False
    assert paired_bootstrap(clean, noisy, seed=3) == paired_bootstrap(clean, noisy, seed=3)
    assert paired_bootstrap(clean, clean) == (0.0, 0.0)
    assert paired_bootstrap([1, 1, 1], [0, 0, 0]) == (100.0, 100.0)
    with pytest.raises(ValueError, match="same nonzero length"):
        paired_bootstrap([1, 0], [1])


@pytest.mark.parametrize("interval,n,b,c,expected", [
    ((-0.5, 0.8), 5000, 10, 10, "robust"),
    ((-9.0, -2.0), 1000, 5, 60, "robust"),  # the setting helps: the whole interval is below 1 pt
    ((1.0, 3.0), 5000, 150, 50, "moderate"),
    ((1.2, 2.8), 5000, 150, 50, "moderate"),
    ((3.5, 9.0), 1000, 80, 20, "not robust"),
])
def test_class_when_both_intervals_support_it(interval, n, b, c, expected):
    exact = exact_conditional_interval(b, c, n)
    drop = 100 * (b - c) / n
    assert exact[0] <= drop <= exact[1]
    cls, need, reason = robustness_class(drop, interval, n, b, c)
    assert (cls, need) == (expected, None)
    assert expected in reason


def test_exact_conditional_interval_matches_clopper_pearson():
    # b = 5, c = 0: pi's Clopper-Pearson interval is [0.025^(1/5), 1]; the drop is (5 / 64) (2 pi - 1)
    low, high = exact_conditional_interval(5, 0, 64)
    assert low == pytest.approx(100 * 5 / 64 * (2 * 0.025 ** (1 / 5) - 1), abs=1e-9)
    assert high == pytest.approx(100 * 5 / 64, abs=1e-9)
    assert exact_conditional_interval(0, 0, 64) is None


def test_few_discordant_pairs_are_not_a_finding():
    """b = 5, c = 0 of 64: the bootstrap interval lies above 3 pts, but the exact McNemar test cannot
    reject 'no change' (p = 2 / 32); the class must not be stated."""
    clean = np.zeros(64, dtype=bool)
    clean[:6] = True
    noisy = clean.copy()
    noisy[:5] = False
    boot = paired_bootstrap(clean, noisy, seed=0)
    assert boot[0] > 3  # the bootstrap alone would say "not robust"
    result = compare("relative:0.2@ops", clean, noisy, seed=0)
    assert result.mcnemar_p == pytest.approx(0.0625)
    assert result.robustness == "inconclusive" and result.n_needed > 64
    assert "exact interval spans" in result.reason
    # one problem that improved out of 64 is not evidence of robustness either
    one = compare("x", noisy, np.where(np.arange(64) == 10, True, noisy), seed=0)
    assert (one.b, one.c, one.robustness) == (0, 1, "inconclusive")


def test_inconclusive_with_n_needed():
    # drop 1.5 pts, interval [0.5, 2.5] over 100 problems: half-width 1, nearest boundary 0.5 away,
    # so n' > 100 * (1 / 0.5)^2 = 400.
    assert n_needed(1.5, (0.5, 2.5), 100) == 401
    # drop 5 pts, interval [-1, 11] at n=64: half 6, distance to 3 is 2: n' > 64 * 9 = 576
    assert n_needed(5.0, (-1.0, 11.0), 64) == 577
    # at n_needed the scaled half-width is below the distance, one fewer it is not
    half, delta = 6.0, 2.0
    assert half * math.sqrt(64 / 577) < delta <= half * math.sqrt(64 / 576)
    # robustness_class scales the hull of the bootstrap and the exact interval
    b, c, n = 32, 18, 400
    drop, boot = 100 * (b - c) / n, (0.5, 5.5)
    exact = exact_conditional_interval(b, c, n)
    hull = (min(boot[0], exact[0]), max(boot[1], exact[1]))
    cls, need, reason = robustness_class(drop, boot, n, b, c)
    assert cls == "inconclusive" and need == n_needed(drop, hull, n)
    assert need == math.floor(n * ((hull[1] - hull[0]) / 2 / abs(drop - 3)) ** 2) + 1
    assert str(need) in reason


def test_inconclusive_not_determinable():
    cls, need, reason = robustness_class(1.0, (-1.0, 3.0), 100, 5, 4)  # drop on a boundary
    assert (cls, need) == ("inconclusive", None) and "not determinable" in reason
    cls, need, reason = robustness_class(0.0, (0.0, 0.0), 100, 0, 0)  # nothing to scale
    assert (cls, need) == ("inconclusive", None) and "no discordant pairs" in reason


def test_compare_counts_and_classes():
    n = 2000
    clean = np.zeros(n, dtype=bool)
    clean[:1000] = True
    noisy = clean.copy()
    noisy[:300] = False  # b = 300 (15 points lost)
    noisy[1000:1020] = True  # c = 20
    c = compare("relative:0.2@ops", clean, noisy, seed=0)
    assert (c.b, c.c, c.n) == (300, 20, n)
    assert c.drop == pytest.approx(100 * 280 / n)
    assert c.robustness == "not robust"
    assert c.mcnemar_p < 1e-50
    assert c.drop_ci[0] <= c.drop <= c.drop_ci[1]
    # a small sample of the same kind of drop is inconclusive, and says how many problems would settle it
    small = compare("relative:0.2@ops", clean[::50], noisy[::50], seed=0)
    assert small.robustness in ("not robust", "inconclusive")
    few = compare("x", [1, 1, 0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 0, 0, 1, 1])
    assert (few.b, few.c, few.robustness) == (1, 0, "inconclusive")
    assert few.n_needed is not None and few.n_needed > 8
    assert few.mcnemar_p == 1.0
