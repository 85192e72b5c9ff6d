"""Is one method's gain over another on these queries real or noise: paired statistics over the
queries' average precisions (both methods ranked the same queries, so each query is a pair).

- `bootstrap_interval`: the percentile bootstrap interval of a mean over queries (one method's
  mAP in the Compare table).
- `paired_comparison`: the mean AP difference, its percentile bootstrap interval (queries
  resampled with replacement, seeded: `bootstrap_interval` of the differences) and the
  two-sided p-value of a paired randomisation test (`sign_flip_p_value`).
- `holm_adjusted`: Holm's step-down adjustment of several p-values (one per method against the
  baseline), which keeps the chance of any false claim among them at most the level.

Queries without an AP (NaN: no positives) are left out of a pair, for both methods.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import InvalidInputError

BOOTSTRAP_RESAMPLES = 2000
INTERVAL_LEVEL = 0.95
PERMUTATIONS = 10_000
"""Sign flips drawn by the randomisation test; with at most this many possible flips (up to
13 queries) all of them are enumerated and the p-value is exact."""
FLIP_CHUNK = 1 << 22
"""Signs drawn at a time (32 MiB of float64)."""


def bootstrap_interval(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = INTERVAL_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaN entries, queries without
    positives, left out): `resamples` resamples with replacement, seeded. (NaN, NaN) without
    values; a single value gives (value, value)."""
    kept = np.asarray(values, np.float64)
    kept = kept[np.isfinite(kept)]
    if kept.size == 0:
        return float("nan"), float("nan")
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 22) // kept.size)  # about 32 MiB of indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        picks = generator.integers(0, kept.size, (stop - start, kept.size))
        means[start:stop] = kept[picks].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B over the same queries (differences are A - B, in AP)."""

    difference: float
    """Mean over the queries of AP(A) - AP(B): the mAP difference."""
    low: float
    high: float
    """The `INTERVAL_LEVEL` paired bootstrap interval of `difference`."""
    p_value: float
    """Two-sided paired randomisation test: how often swapping A and B at random within each
    query gives a mean difference at least as far from 0 as the observed one."""
    queries: int
    resamples: int
    """Bootstrap resamples."""
    permutations: int
    """Sign flips the test used (2^queries when `exact`)."""
    exact: bool
    """Whether every sign flip was enumerated (else `permutations` drawn at random, seeded)."""


def sign_flip_p_value(differences: np.ndarray, permutations: int = PERMUTATIONS,
                      seed: int = 0) -> tuple[float, int, bool]:
    """Two-sided p-value of the paired randomisation test of mean(differences) = 0.

    Under the null hypothesis each query's two APs are exchangeable, so its difference is as
    likely negated. Every one of the 2^n sign vectors is enumerated when there are at most
    `permutations` of them (the observed one counts among them); else `permutations` are drawn
    and p = (1 + hits) / (1 + permutations), which never gives 0. A flip counts when its sum
    is at least the observed |sum| less a rounding allowance of the float64 sums.

    Returns (p, flips used, exact).
    """
    values = np.asarray(differences, np.float64)
    n = values.size
    if n == 0:
        raise InvalidInputError("no queries to compare")
    observed = abs(values.sum())
    allowance = 1e-12 * max(1.0, float(np.abs(values).sum()))
    if n <= permutations.bit_length() - 1:  # 2^n <= permutations, without overflow
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        hits = int((np.abs(signs @ values) >= observed - allowance).sum())
        return hits / 2 ** n, 2 ** n, True
    generator = np.random.default_rng(seed)
    hits = 0
    rows = max(1, FLIP_CHUNK // n)
    for start in range(0, permutations, rows):
        count = min(rows, permutations - start)
        signs = generator.choice(np.array([-1.0, 1.0]), size=(count, n))
        hits += int((np.abs(signs @ values) >= observed - allowance).sum())
    return (1 + hits) / (1 + permutations), permutations, False


def paired_comparison(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray,
                      *, resamples: int = BOOTSTRAP_RESAMPLES,
                      permutations: int = PERMUTATIONS, level: float = INTERVAL_LEVEL,
                      seed: int = 0) -> PairedComparison:
    """Method A's per-query APs (`first`) against method B's (`second`), query by query.

    Raises InvalidInputError when the two are not one value per query of the same queries, or
    when no query has an AP for both.
    """
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise InvalidInputError(f"paired APs need one value per query for both methods, got "
                                f"shapes {a.shape} and {b.shape}")
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any():
        raise InvalidInputError("no query has an average precision for both methods")
    differences = a[both] - b[both]
    low, high = bootstrap_interval(differences, resamples, level, seed)
    p_value, used, exact = sign_flip_p_value(differences, permutations, seed)
    return PairedComparison(float(differences.mean()), low, high, p_value,
                            int(differences.size), resamples, used, exact)


def holm_adjusted(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the given order: the i-th smallest of m is
    multiplied by m - i (i from 0), then made non-decreasing in that order and capped at 1."""
    values = np.asarray(p_values, np.float64)
    if values.ndim != 1 or not np.all((values >= 0) & (values <= 1)):
        raise InvalidInputError("p-values must be one list of numbers from 0 to 1")
    order = np.argsort(values, kind="stable")
    scaled = values[order] * (len(values) - np.arange(len(values)))
    adjusted = np.empty_like(values)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def holm_adjusted_by_key(p_values: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """`holm_adjusted` of named p-values (a table's rows, say), by the same names."""
    adjusted = holm_adjusted(list(p_values.values()))
    return {name: float(value) for name, value in zip(p_values, adjusted, strict=True)}

