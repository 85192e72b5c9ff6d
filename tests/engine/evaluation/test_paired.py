"""Paired statistics of two methods' per-query APs, against hand-worked cases and scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from engine.errors import InvalidInputError
from engine.evaluation.paired import (
    bootstrap_interval,
    holm_adjusted,
    holm_adjusted_by_key,
    paired_comparison,
    sign_flip_p_value,
)


def test_identical_runs_differ_by_nothing_with_p_one():
    aps = np.random.default_rng(0).random(40)
    result = paired_comparison(aps, aps)
    assert result.difference == 0.0 and (result.low, result.high) == (0.0, 0.0)
    assert result.p_value == 1.0 and result.queries == 40 and not result.exact


def test_a_constant_shift_is_its_own_interval():
    """Every query gains 0.1: the difference and both ends of the interval are 0.1, and only
    the two all-same-sign flips (of 2^8) reach it."""
    base = np.linspace(0.1, 0.8, 8)
    result = paired_comparison(base + 0.1, base)
    assert result.difference == pytest.approx(0.1)
    assert result.low == pytest.approx(0.1) and result.high == pytest.approx(0.1)
    assert result.exact and result.permutations == 256
    assert result.p_value == pytest.approx(2 / 256)


def test_a_hand_worked_example():
    """Differences (0.3, -0.1, 0.2): sum 0.4. Of the 8 sign flips, the sums are +-0.6, +-0.4,
    +-0.2, +-0.0 (0.3 - 0.1 - 0.2 and its negation): |sum| >= 0.4 for 4 of them."""
    p, flips, exact = sign_flip_p_value(np.array([0.3, -0.1, 0.2]))
    assert (p, flips, exact) == (0.5, 8, True)


@pytest.mark.parametrize("seed", range(4))
def test_the_exact_test_equals_scipys(seed):
    """Enumerated flips give scipy's exact paired permutation test (two-sided)."""
    rng = np.random.default_rng(seed)
    a, b = rng.random(11), rng.random(11)
    ours = paired_comparison(a, b, permutations=4096)
    assert ours.exact and ours.permutations == 2048
    theirs = stats.permutation_test((a, b), lambda x, y: np.mean(x - y),
                                    permutation_type="samples", n_resamples=np.inf,
                                    alternative="two-sided")
    assert ours.p_value == pytest.approx(theirs.pvalue, abs=1e-12)


def test_the_drawn_test_agrees_with_scipy_and_never_gives_zero():
    """Above 2^13 flips they are drawn (seeded): within sampling error of scipy's drawn test,
    and a difference no flip reaches still gets 1 / (1 + flips)."""
    rng = np.random.default_rng(7)
    a = rng.random(60)
    b = a - 0.02 + 0.2 * rng.standard_normal(60)
    ours = paired_comparison(a, b, permutations=20_000)
    assert not ours.exact and ours.permutations == 20_000
    theirs = stats.permutation_test((a, b), lambda x, y: np.mean(x - y),
                                    permutation_type="samples", n_resamples=20_000,
                                    alternative="two-sided", random_state=1)
    assert 0.01 < theirs.pvalue < 0.99  # a case where the comparison says something
    assert ours.p_value == pytest.approx(theirs.pvalue, abs=0.02)
    far = paired_comparison(np.ones(40), np.zeros(40), permutations=500)
    assert far.p_value == 1 / 501
    again = paired_comparison(a, b, permutations=20_000)
    assert again == ours  # seeded


def test_the_interval_agrees_with_scipys_paired_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.random(200)
    b = np.clip(a - 0.03 + 0.1 * rng.standard_normal(200), 0, 1)
    ours = paired_comparison(a, b, resamples=5000)
    theirs = stats.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                             paired=True, method="percentile", n_resamples=5000,
                             random_state=0, vectorized=True).confidence_interval
    assert ours.low < ours.difference < ours.high
    assert ours.low == pytest.approx(theirs.low, abs=0.004)
    assert ours.high == pytest.approx(theirs.high, abs=0.004)


def test_queries_without_an_ap_for_either_method_are_left_out():
    a = np.array([0.5, np.nan, 0.7, 0.2])
    b = np.array([0.4, 0.3, np.nan, 0.1])
    result = paired_comparison(a, b)
    assert result.queries == 2 and result.difference == pytest.approx(0.1)
    with pytest.raises(InvalidInputError, match="no query has an average precision"):
        paired_comparison([np.nan], [0.5])
    with pytest.raises(InvalidInputError, match="one value per query"):
        paired_comparison([0.5, 0.4], [0.5])


def test_holm_adjustment_by_hand():
    """Sorted 0.01, 0.03, 0.04 of three: x3, x2, x1 = 0.03, 0.06, 0.04, made non-decreasing:
    0.03, 0.06, 0.06, in the given order."""
    np.testing.assert_allclose(holm_adjusted([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm_adjusted([0.5, 0.6]), [1.0, 1.0])  # capped
    assert holm_adjusted([0.02]).tolist() == [0.02]
    with pytest.raises(InvalidInputError):
        holm_adjusted([1.5])


def test_bootstrap_interval_hand_cases() -> None:
    assert bootstrap_interval(np.full(40, 0.25)) == (0.25, 0.25)  # no spread, no width
    assert bootstrap_interval(np.array([0.7])) == (0.7, 0.7)
    assert all(math.isnan(bound) for bound in bootstrap_interval(np.array([np.nan, np.nan])))
    values = np.array([0.0, 1.0] * 50)
    with_nan = np.concatenate([values, [np.nan] * 7])  # queries without positives: left out
    assert bootstrap_interval(with_nan) == bootstrap_interval(values)
    low, high = bootstrap_interval(values)
    # The mean of 100 fair coin flips: sd 0.05, so a 95 % interval of about 0.40 to 0.60.
    assert 0.38 < low < 0.42 and 0.58 < high < 0.62
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)


def test_bootstrap_interval_agrees_with_scipy() -> None:
    """scipy's percentile bootstrap of the mean as the oracle: the bounds agree within the
    resampling noise of 2000 resamples (a small fraction of the interval's width)."""
    stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(5).beta(2, 3, 300)
    low, high = bootstrap_interval(values)
    oracle = stats.bootstrap((values,), np.mean, n_resamples=20000, method="percentile",
                             confidence_level=0.95, random_state=1).confidence_interval
    width = oracle.high - oracle.low
    assert width > 0.03
    assert abs(low - oracle.low) < 0.08 * width and abs(high - oracle.high) < 0.08 * width


def test_many_queries_are_drawn_not_enumerated():
    """2^n overflows a float for n > 1023: the exact branch is chosen by n, not by 2.0 ** n."""
    differences = np.full(2000, 0.01)
    p_value, used, exact = sign_flip_p_value(differences, permutations=200)
    assert (used, exact) == (200, False)
    assert p_value == pytest.approx(1 / 201)  # no flip reaches an all-positive sum


def test_holm_by_key_keeps_the_names():
    assert holm_adjusted_by_key({}) == {}
    # 0.01 * 3, then max(0.04 * 2, 0.03), then max(0.05 * 1, 0.08)
    assert holm_adjusted_by_key({"gnn": 0.04, "icfrr": 0.05, "k": 0.01}) == pytest.approx(
        {"gnn": 0.08, "icfrr": 0.08, "k": 0.03})

