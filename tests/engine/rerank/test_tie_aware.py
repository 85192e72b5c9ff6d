"""The tie-aware order comparison the oracle tests share (tests/engine/rerank/tie_aware.py)."""

from __future__ import annotations

import numpy as np
import pytest
from tie_aware import assert_order_matches, perturb_ulps, pinned_positions

#                      0    1     2         3     4    5
REFERENCE = np.array([0.1, 0.5, 0.3, 0.3 + 1e-7, 0.9, np.inf])  # 2 and 3 tie within 2 * 1e-6
ATOL = 1e-6


def test_accepts_the_reference_order_and_counts_pinned_positions():
    assert assert_order_matches([0, 2, 3, 1, 4], REFERENCE, atol=ATOL) == 3  # 0, 1, 4 pinned
    np.testing.assert_array_equal(pinned_positions(REFERENCE, ATOL),
                                  [[True, False, False, True, True, False]])


def test_accepts_a_swap_inside_a_tie_group():
    assert assert_order_matches([0, 3, 2, 1, 4], REFERENCE, atol=ATOL) == 3
    # with values, and as similarities (larger is better)
    order = np.array([0, 3, 2, 1])
    assert_order_matches(order, REFERENCE, atol=ATOL, values=REFERENCE[order])
    assert_order_matches(order, -REFERENCE, atol=ATOL, values=-REFERENCE[order],
                         larger_is_better=True)
    # a top-2 may hold either member of the tie at its boundary
    assert_order_matches([[0, 2], [0, 3]], np.stack([REFERENCE, REFERENCE]), atol=ATOL)


def test_rejects_a_real_swap():
    with pytest.raises(AssertionError, match="comes after"):
        assert_order_matches([2, 0, 3, 1, 4], REFERENCE, atol=ATOL)
    with pytest.raises(AssertionError, match="comes after"):  # larger is better, reversed
        assert_order_matches([0, 2, 3, 1, 4], REFERENCE, atol=ATOL, larger_is_better=True)


def test_ties_are_pairwise_not_chained():
    chain = np.array([0.0, 1.5e-6, 3e-6, 1.0])  # 0-1 and 1-2 tie within 2e-6, 0-2 do not
    assert_order_matches([1, 0, 2, 3], chain, atol=ATOL)
    assert_order_matches([0, 2, 1, 3], chain, atol=ATOL)
    with pytest.raises(AssertionError, match="comes after"):
        assert_order_matches([2, 1, 0, 3], chain, atol=ATOL)


def test_rejects_a_top_k_that_leaves_out_a_better_item():
    with pytest.raises(AssertionError, match="left out"):
        assert_order_matches([0, 3, 1], REFERENCE, atol=ATOL)  # 2 is better than 1


def test_rejects_values_off_the_reference():
    with pytest.raises(AssertionError, match="returned values"):
        assert_order_matches([0, 2], REFERENCE, atol=ATOL, values=[0.1, 0.3 + 3e-6])


def test_rejects_excluded_and_repeated_items():
    with pytest.raises(AssertionError, match="excluded"):
        assert_order_matches([0, 2, 3, 1, 4, 5], REFERENCE, atol=ATOL)
    with pytest.raises(AssertionError, match="repeated"):
        assert_order_matches([0, 0, 3], REFERENCE, atol=ATOL)


def test_exact_ties_by_index():
    tied = np.array([1.0, 0.0, 1.0, 2.0])
    assert_order_matches([1, 0, 2, 3], tied, atol=ATOL, values=[0.0, 1.0, 1.0, 2.0],
                         ties_by_index=True)
    with pytest.raises(AssertionError, match="ascending index"):
        assert_order_matches([1, 2, 0, 3], tied, atol=ATOL, values=[0.0, 1.0, 1.0, 2.0],
                             ties_by_index=True)


def test_rejects_a_vacuous_comparison():
    with pytest.raises(AssertionError, match="vacuous"):
        assert_order_matches([2, 0, 1], np.zeros(3), atol=ATOL)
    assert assert_order_matches([2, 0, 1], np.zeros(3), atol=ATOL, min_pinned=0) == 0


def test_perturb_ulps_moves_each_value_a_few_ulps_and_keeps_unit_rows():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((20, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    moved = perturb_ulps(features, max_ulps=3, seed=5)
    assert moved.dtype == np.float32
    ulps = np.abs(moved.view(np.int32).astype(np.int64) - features.view(np.int32))
    assert ulps.max() <= 3 + 2  # the move, then the re-normalisation's rounding
    assert (ulps > 0).mean() > 0.5
    np.testing.assert_allclose(np.linalg.norm(moved.astype(np.float64), axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(perturb_ulps(features, max_ulps=3, seed=5), moved)
