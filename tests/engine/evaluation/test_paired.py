"""Paired statistics of two methods' per-query APs, against hand-worked cases and scipy."""

import numpy as np
import pytest
from scipy import stats

from engine.errors import InvalidInputError
from engine.evaluation.paired import holm_adjusted, paired_comparison, sign_flip_p_value


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
