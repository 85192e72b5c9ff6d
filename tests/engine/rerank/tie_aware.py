"""Tie-aware comparison of a returned ranking with a reference's scores, shared by the tests.

Bits differ between CPUs (BLAS kernels, SIMD widths), so two items whose reference scores
differ by less than the arithmetic's error may come in either order on another machine. A test
therefore states the largest error `atol` of a returned score against the reference's score
(derived from the arithmetic, with a comment saying how) and accepts exactly the orders that
such errors can produce:

- each returned value equals the reference's score of the returned item within `atol`;
- an item comes before another only if its reference score is worse by at most 2 * atol (both
  scores may be off by atol in opposite directions); so any permutation inside a group of
  mutually tied items is accepted and nothing else (the ties are pairwise, not chained: items
  a, b, c with b within 2 * atol of a and c but a and c further apart never swap a and c);
- a truncated top-k holds the k best items up to such ties;
- items whose reference score is infinite on the worse side (+inf when smaller is better:
  leave-one-out's self) are never returned.

`assert_order_matches` returns the number of positions whose item the reference pins exactly
(its score more than 2 * atol from every other item's) and asserts there are at least
`min_pinned`, so a comparison on scores that are all tied cannot pass vacuously.

`perturb_ulps` moves features by a few ulps, so the same comparisons also run where other pairs
of items are near-tied (as on another CPU's bits).

Import it as `tie_aware` (the `pythonpath` of pyproject.toml includes tests/engine/rerank).
"""

from __future__ import annotations

import numpy as np

__all__ = ["U32", "assert_order_matches", "perturb_ulps", "pinned_positions"]

U32 = 2.0 ** -24
"""float32 unit roundoff: one rounding moves a value by at most U32 * |value|; a sum of n terms
is off by at most about n * U32 * (sum of |terms|), a dot product of unit vectors of dimension
d by d * U32."""


def _as_rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array[None] if array.ndim == 1 else array


def _smaller_is_better(scores: np.ndarray, larger_is_better: bool) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    return -scores if larger_is_better else scores


def pinned_positions(reference: np.ndarray, atol: float, k: int | None = None, *,
                     larger_is_better: bool = False) -> np.ndarray:
    """(Q, k) bool: whether the item at each position of the reference's own (stable) order is
    more than 2 * atol from every other item's score, so every valid order puts it there."""
    key = _smaller_is_better(_as_rows(reference), larger_is_better)
    ordered = np.sort(key, axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf: two excluded items, tied
        gaps = np.diff(ordered, axis=1)
    apart = gaps > 2 * atol  # NaN compares False
    pinned = np.ones(key.shape, dtype=bool)
    pinned[:, 1:] &= apart
    pinned[:, :-1] &= apart
    pinned &= np.isfinite(ordered)
    return pinned[:, :key.shape[1] if k is None else k]


def assert_order_matches(indices: np.ndarray, reference: np.ndarray, *, atol: float,
                         values: np.ndarray | None = None, larger_is_better: bool = False,
                         ties_by_index: bool = False, min_pinned: int = 1,
                         label: str = "") -> int:
    """Assert that `indices` is a valid best-first order of `reference` up to float ties.

    Args:
        indices: (Q, k) or (k,) int, the returned order, best first; k <= G (a top-k).
        reference: (Q, G) or (G,) float, the reference's score of every item, in the same
            sense as `values`. Items to be excluded (leave-one-out's self) hold +inf when
            smaller is better, -inf when larger is better.
        atol: the largest error of a returned score against the reference's, from the
            arithmetic; reference scores within 2 * atol of each other count as tied.
        values: (Q, k) float, the returned scores (e.g. `result.distances`), checked against
            the reference at the returned indices; None checks the order only.
        larger_is_better: the scores are similarities (best = largest) rather than distances.
        ties_by_index: also require that exactly equal returned `values` come in ascending
            index (the engine's rule for exact ties, e.g. duplicates or integer scores).
        min_pinned: the least number of positions (over all rows) that the reference pins
            to one item; guards against a vacuous comparison.
        label: prefixed to failure messages (which query set, which parameters).

    Returns:
        The number of pinned positions compared (>= min_pinned).
    """
    indices = _as_rows(indices)
    key = _smaller_is_better(_as_rows(reference), larger_is_better)
    prefix = f"{label}: " if label else ""
    n_rows, k = indices.shape
    assert key.shape[0] == n_rows, f"{prefix}{n_rows} returned rows, {key.shape[0]} reference"
    assert k <= key.shape[1], f"{prefix}{k} returned of {key.shape[1]} items"
    assert not np.isnan(key).any(), f"{prefix}NaN in the reference"
    assert np.issubdtype(indices.dtype, np.integer), f"{prefix}indices are {indices.dtype}"
    assert ((indices >= 0) & (indices < key.shape[1])).all(), f"{prefix}index out of range"
    assert (np.diff(np.sort(indices, axis=1), axis=1) > 0).all(), f"{prefix}repeated index"
    tie = 2 * atol

    got = np.take_along_axis(key, indices, 1)
    excluded = ~np.isfinite(got)
    assert not excluded.any(), (
        f"{prefix}excluded items returned (row, position): {np.argwhere(excluded)[:5].tolist()}")
    if values is not None:
        returned = _smaller_is_better(_as_rows(values), larger_is_better)
        assert returned.shape == indices.shape, f"{prefix}values {returned.shape}"
        np.testing.assert_allclose(returned, got, rtol=0, atol=atol,
                                   err_msg=f"{prefix}returned values vs the reference")

    # no item after a worse one beyond the tie tolerance: compare with the running worst
    worst_before = np.maximum.accumulate(got, axis=1)
    jumped = got[:, 1:] < worst_before[:, :-1] - tie
    if jumped.any():
        row, position = np.argwhere(jumped)[0]
        position += 1
        before = int(np.argmax(got[row, :position]))
        raise AssertionError(
            f"{prefix}row {row}: item {indices[row, position]} (reference {got[row, position]!r})"
            f" at position {position} comes after item {indices[row, before]} (reference "
            f"{got[row, before]!r}) at position {before}: apart by more than the tie "
            f"tolerance {tie:g}; {int(jumped.sum())} such positions in all")

    # a top-k leaves out nothing better than what it returned, beyond the tie tolerance
    if k < key.shape[1]:
        left_out = key.copy()
        np.put_along_axis(left_out, indices, np.inf, axis=1)
        best_left_out = left_out.min(axis=1)
        missed = best_left_out < got.max(axis=1) - tie
        if missed.any():
            row = int(np.flatnonzero(missed)[0])
            item = int(np.argmin(left_out[row]))
            raise AssertionError(
                f"{prefix}row {row}: item {item} (reference {best_left_out[row]!r}) left out of "
                f"the top {k}, which holds reference {got[row].max()!r}; tie tolerance {tie:g}")

    if ties_by_index:
        assert values is not None, "ties_by_index needs the returned values"
        equal = np.diff(np.asarray(_as_rows(values)), axis=1) == 0
        assert (np.diff(indices, axis=1)[equal] > 0).all(), (
            f"{prefix}exactly equal values not in ascending index")

    # implied by the checks above; compared explicitly for a plain message and the count
    pinned = pinned_positions(key, atol, k)
    expected = np.argsort(key, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices[pinned], expected[pinned],
                                  err_msg=f"{prefix}pinned positions")
    compared = int(pinned.sum())
    assert compared >= min_pinned, (
        f"{prefix}only {compared} positions pinned by the reference (need {min_pinned}): "
        f"the comparison would be vacuous")
    return compared


PERTURBATION_ULPS = 3
"""Largest move, in units in the last place, of each value of perturbed features."""


def perturb_ulps(features: np.ndarray, max_ulps: int = PERTURBATION_ULPS, seed: int = 0
                 ) -> np.ndarray:
    """float32 unit rows with every value moved by a seeded random -max_ulps..max_ulps ulps,
    then re-normalised: the same collection as another CPU's BLAS kernels may embed it, so
    other pairs of items are near-tied."""
    rng = np.random.default_rng(seed)
    features = np.asarray(features, np.float32)
    steps = rng.integers(-max_ulps, max_ulps + 1, features.shape).astype(np.float32)
    moved = features + steps * np.spacing(np.abs(features))
    norms = np.linalg.norm(moved.astype(np.float64), axis=-1, keepdims=True)
    return (moved / norms).astype(np.float32)
