"""LHRR hypergraph manifold learning and SGCC leader clustering: the first two steps of SGRR.

LHRR (Log-based Hypergraph of Ranking References, Pedronette et al., IEEE TIP 2019) as SGRR
vendors it (Lopes, Valem, Pedronette, SIBGRAPI 2024; `sgrr/sgcc/lhrr/source.cpp`), with K the
neighbourhood, L = 4K the list depth and T iterations:

- Initial similarity W[i, v] = (L - pos_i(v)) + (L - pos_v(i)) (each term where the item is
  listed); every list is re-sorted by W behind its first entry, then the item is swapped to the
  front.
- Each iteration builds one hyperedge per item, e_i: h(i, i) = 1, and for o at position p_o of
  tau_i's top-K and v at position p_v of tau_o's top-K, h(i, v) += w(p_o) w(p_v), with
  w(p) = 1 - log(p) / log(K). conf(i) is the sum of the K largest memberships of e_i.
- W is reset to 1 on every listed pair; the Cartesian product adds conf(e) h(e, a) h(e, b) for
  every ordered pair of members of every hyperedge (W = 1 + (H^T diag(conf) H)[a, b]); pairs not
  listed become candidates. Listed pairs (past the first entry) are then multiplied by the
  hyperedge similarity <H[q], H[v]> = (H H^T)[q, v] and the reciprocal similarity
  sum_e h(e, q) h(v, e) = (H^T H^T)[q, v]. The list tail is re-sorted by W and the candidates,
  sorted by W, are merged in.

SGCC (`sgrr/sgcc/clustering.py`) picks c leaders by conf(i) h(i, i) penalised by overlap with the
leaders already chosen, then assigns the best-scored fraction of the collection greedily to the
cluster whose members' hyperedges hold it most.

Where the paper leaves a detail open (docs/methods/sgrr.md), the authors' code decides:

- Hyperedges keep members whose membership is 0 (reached only through a K-th position, where
  w(K) = 0). They add nothing to the sums but, in the Cartesian product, their pairs become
  candidates with W = 1 (the C++ sets an untouched pair to 1 before adding), which can enter a
  list in place of listed items whose W fell below 1.
- Candidates are never multiplied by the two similarities (the C++ multiplies listed pairs only).
- The candidate merge (`merge_candidates`) compares each candidate with the value the list held
  at that position *before* any insertion (the C++ `joinRks` keeps its value array unshifted),
  so it is not an exact sorted merge; we reproduce it because the published lists come from it.
- The initial re-sort and each iteration's tail re-sort are stable (the C++ insertion sort keeps
  equal values in list order).

Where the authors' code is undefined or unsafe, we choose (and the oracle follows):

- Ties in the hyperedge sort and the candidate sort (`std::sort`, unspecified order) go to the
  smaller item id.
- Numbers: memberships are summed in float64 and rounded to float32 (`memberships`); W is
  accumulated in float64 and rounded to float32 where the C++ stores it in its float matrix
  (after the Cartesian product, after each similarity product). The rounding, like
  `engine.core.knn.canonical_similarity`, makes the result independent of summation order, so
  the vectorised code and a plain loop give identical lists.
- A list that does not contain its item (more than L exact duplicates) gets it prepended and its
  last entry dropped (the C++ reads past the row there).
- K outside [1, min(n, list width) // 4] is clamped with a logged warning (the C++ calls `exit`).
  K = 1 uses w(1) = 1 (the formula divides by log 1 = 0).
- SGCC never re-picks a leader (the authors' argmax could, leaving a cluster id unused); ties
  go where the authors' reverse-of-a-stable-sort sends them: the larger item id among equal
  scores, the later cluster among equal assignment scores (an item no cluster member holds goes
  to the last cluster). Scores are compared after rounding to float32.

Everything is vectorised over items with numpy and scipy.sparse, in blocks of rows whose
products hold about `BLOCK_ELEMENTS` numbers; a block's products are read at the listed pairs and
their stored entries only, so memory and time grow as n times the list depth plus the hyperedges'
products (n K^4 at most), never n^2 (the authors' code holds dense n x n matrices).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from engine.core.knn import knn_graph, reciprocal_mask, top_k_smallest
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
"""Called with (fraction done in [0, 1], message)."""

BLOCK_ELEMENTS = 1 << 22
"""Numbers in one block of rows: their hyperedge keys, their dense (rows, n) products, or the
entries of their sparse products (at most min(n, K^4) per row)."""
DENSE_ITEMS = 8192
"""Up to this many items an LHRR iteration reads its products as dense (rows, n) blocks
(measured faster there: 1.3 s against 3.4 s at 1,360 items, K = 30); beyond, as sparse ones
(0.7 s against 28 s at 10,000 items, K = 8), so the work is no longer n^2."""

__all__ = [
    "Clustering",
    "Hypergraph",
    "default_clusters",
    "hyperedges",
    "lhrr",
    "lhrr_from_features",
    "merge_candidates",
    "position_weights",
    "reciprocal_edges",
    "sgcc",
    "usable_k",
]


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Hypergraph:
    """The result of LHRR.

    ranked_lists: (n, L) int64 final lists, L = 4k, each item first.
    members: (n, M) int64 members of each hyperedge of the last iteration, by membership
        descending (ties by id), -1 padded; members of membership 0 are kept (see module doc).
    memberships: (n, M) float32 h(i, members[i, j]), 0 where padded.
    confidence: (n,) float64 conf(i), the sum of the k largest memberships of e_i.
    k: the neighbourhood actually used (after clamping); iterations: T.
    """

    ranked_lists: np.ndarray
    members: np.ndarray
    memberships: np.ndarray
    confidence: np.ndarray
    k: int
    iterations: int

    def __post_init__(self) -> None:
        for name in ("ranked_lists", "members", "memberships", "confidence"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def n(self) -> int:
        return int(self.ranked_lists.shape[0])

    def incidence(self) -> sp.csr_matrix:
        """H (n x n) float32 CSR, H[i, v] = h(i, v); members of membership 0 are not stored."""
        keep = self.memberships > 0
        rows = np.broadcast_to(np.arange(self.n)[:, None], keep.shape)[keep]
        matrix = sp.csr_matrix((self.memberships[keep], (rows, self.members[keep])),
                               shape=(self.n, self.n))
        matrix.sort_indices()
        return matrix


@dataclass(frozen=True)
class Clustering:
    """The result of SGCC.

    labels: (n,) int64 cluster id 0..c-1, or -1 for items left unlabelled.
    leaders: (c,) int64 the leader of each cluster (cluster j is led by leaders[j]).
    score: (n,) float64 conf(i) h(i, i), the leader and labelling order.
    """

    labels: np.ndarray
    leaders: np.ndarray
    score: np.ndarray

    def __post_init__(self) -> None:
        for name in ("labels", "leaders", "score"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))


# -- validation ---------------------------------------------------------------------------------
def usable_k(k: int, n: int, width: int | None = None) -> int:
    """K clamped to [1, min(n, width) // 4] (L = 4K list entries must exist), with a warning.

    Raises InvalidInputError when no K fits (fewer than 4 items or list entries).
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InvalidInputError(f"k must be an integer, got {k!r}")
    room = min(n, n if width is None else width)
    if n < 4:
        raise InvalidInputError(f"LHRR needs at least 4 items (lists of depth 4k), got {n}")
    if room < 4:
        raise InvalidInputError(f"LHRR needs ranked lists of at least 4 entries, got {room}")
    limit = room // 4
    used = min(max(int(k), 1), limit)
    if used != k:
        logger.warning("LHRR: k=%s does not fit %d items with lists of %d entries "
                       "(needs 1 <= k <= %d); using k=%d", k, n, room, limit, used)
    return used


def _check_lists(lists: np.ndarray, name: str = "ranked lists") -> np.ndarray:
    array = np.asarray(lists)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name} must be a non-empty (n, depth) array, got shape "
                                f"{array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer item ids, got {array.dtype}")
    n = array.shape[0]
    if array.min() < 0 or array.max() >= n:
        raise InvalidInputError(f"{name} must hold item ids in [0, {n}), got values in "
                                f"[{array.min()}, {array.max()}]")
    return array.astype(np.int64, copy=False)


def _check_unique(lists: np.ndarray) -> None:
    ordered = np.sort(lists, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise InvalidInputError(f"ranked lists must not repeat an item; row {row} does")


# -- LHRR pieces --------------------------------------------------------------------------------
def position_weights(k: int) -> np.ndarray:
    """w(p) = 1 - log(p) / log(k) for p = 1..k, float64 (w(1) = 1, w(k) = 0; k = 1 gives [1])."""
    if k == 1:
        return np.ones(1)
    return 1.0 - np.log(np.arange(1, k + 1, dtype=np.float64)) / math.log(k)


def hyperedges(ranked_lists: np.ndarray, k: int) -> tuple[sp.csr_matrix, np.ndarray,
                                                          np.ndarray, np.ndarray]:
    """The hyperedge of every item from ranked lists (each item first), as LHRR builds them.

    h(i, i) = 1 plus, for o at position p_o (1-based) of i's top-k and v at position p_v of o's
    top-k, h(i, v) += w(p_o) w(p_v). Sums are float64, rounded once to float32.

    Args:
        ranked_lists: (n, >= k) int64.
    Returns:
        incidence: (n x n) float64 CSR, sorted indices, storing every member (zeros included);
        members: (n, M) int64 by membership descending, ties by id, -1 padded;
        memberships: (n, M) float32, 0 where padded;
        confidence: (n,) float64 sum of each row's k largest memberships.
    """
    n = ranked_lists.shape[0]
    weight = position_weights(k)
    pair_weights = np.outer(weight, weight).ravel()
    edge_parts, member_parts, value_parts = [], [], []
    step = max(1, min(n, BLOCK_ELEMENTS // (k * k + 1)))
    for start in range(0, n, step):
        rows = np.arange(start, min(n, start + step))
        reached = ranked_lists[ranked_lists[rows, :k], :k].reshape(len(rows), k * k)
        keys = (((rows - start) * n)[:, None]
                + np.concatenate([rows[:, None], reached], axis=1)).ravel()
        values = np.concatenate([np.ones((len(rows), 1)),
                                 np.broadcast_to(pair_weights, reached.shape)], axis=1).ravel()
        # sums per (edge, member) key in input order, as a bincount over all keys would
        present, inverse = np.unique(keys, return_inverse=True)
        sums = np.bincount(inverse, weights=values, minlength=len(present))
        edge_parts.append(present // n + start)
        member_parts.append(present % n)
        value_parts.append(sums.astype(np.float32))
    edge = np.concatenate(edge_parts)
    member = np.concatenate(member_parts)
    value = np.concatenate(value_parts)
    sizes = np.bincount(edge, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(sizes)])
    incidence = sp.csr_matrix((value.astype(np.float64), member, indptr), shape=(n, n))
    order = np.lexsort((member, -value, edge))
    slot = np.arange(len(edge)) - indptr[edge[order]]
    width = int(sizes.max())
    members = np.full((n, width), -1, np.int64)
    memberships = np.zeros((n, width), np.float32)
    members[edge[order], slot] = member[order]
    memberships[edge[order], slot] = value[order]
    confidence = memberships[:, :k].astype(np.float64).sum(axis=1)
    return incidence, members, memberships, confidence


def merge_candidates(tail: np.ndarray, tail_values: np.ndarray, candidates: np.ndarray,
                     candidate_values: np.ndarray) -> np.ndarray:
    """Merge sorted candidates into sorted lists as the authors' `joinRks` does.

    Walking the positions t of the tail with a pointer j on the candidates, candidate j is
    inserted at t (shifting the rest down, the last entry falls off) when its value beats
    `tail_values[t]`, the value held at t *before* any insertion. With both sequences
    non-increasing, candidate j lands at p_j = max(s_j, p_{j-1} + 1), s_j the number of tail
    values >= its value, i.e. p_j = j + max_{j' <= j}(s_j' - j'); it is inserted if p_j < width.

    Args:
        tail: (r, m) int64 list entries, by tail_values descending.
        tail_values: (r, m) float values, non-increasing per row.
        candidates: (r, c) int64 candidate ids, by candidate_values descending (-inf = none).
        candidate_values: (r, c) float, non-increasing per row.
    Returns:
        (r, m) int64 merged lists.
    """
    rows, width = tail.shape
    n_candidates = candidates.shape[1]
    if n_candidates == 0:
        return tail.copy()
    # s_j by one sort: per row, values descending, a tail value before an equal candidate value
    row_ids = np.concatenate([np.repeat(np.arange(rows), width),
                              np.repeat(np.arange(rows), n_candidates)])
    values = np.concatenate([np.asarray(tail_values, np.float64).ravel(),
                             np.asarray(candidate_values, np.float64).ravel()])
    is_tail = np.concatenate([np.ones(rows * width, bool), np.zeros(rows * n_candidates, bool)])
    order = np.lexsort((~is_tail, -values, row_ids))
    tails_before = np.cumsum(is_tail[order]) - is_tail[order]
    at = np.empty(len(order), np.int64)
    at[order] = tails_before
    beaten = at[rows * width:].reshape(rows, n_candidates) - np.arange(rows)[:, None] * width
    steps = np.arange(n_candidates)
    position = steps + np.maximum.accumulate(beaten - steps, axis=1)
    inserted = position < width
    merged = np.empty_like(tail)
    taken = np.zeros((rows, width), bool)
    row_index, candidate_index = np.nonzero(inserted)
    slots = position[row_index, candidate_index]
    taken[row_index, slots] = True
    merged[row_index, slots] = candidates[row_index, candidate_index]
    source = np.cumsum(~taken, axis=1) - 1
    kept = np.take_along_axis(tail, np.maximum(source, 0), axis=1)
    merged[~taken] = kept[~taken]
    return merged


def _stable_tail_sort(lists: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort the tail (columns 1..) of each list by `values` descending, stably."""
    order = np.argsort(-values[:, 1:], axis=1, kind="stable")
    tail = np.take_along_axis(lists[:, 1:], order, axis=1)
    return (np.take_along_axis(values[:, 1:], order, axis=1),
            np.concatenate([lists[:, :1], tail], axis=1))


def _initial_lists(lists: np.ndarray) -> np.ndarray:
    """Self present (prepended where missing), then re-sorted by the position similarity."""
    n, depth = lists.shape
    items = np.arange(n)
    lists = lists.copy()
    missing = ~(lists == items[:, None]).any(axis=1)
    if missing.any():
        logger.warning("LHRR: %d ranked lists do not contain their own item (exact duplicates?); "
                       "it is put first", int(missing.sum()))
        lists[missing, 1:] = lists[missing, :-1].copy()
        lists[missing, 0] = items[missing]
    score = np.broadcast_to(depth - np.arange(depth, dtype=np.float64), lists.shape).ravel()
    rows = np.repeat(items, depth)
    similarity = sp.csr_matrix((score, (rows, lists.ravel())), shape=(n, n))
    similarity = (similarity + similarity.T).tocsr()
    values = np.asarray(similarity[rows, lists.ravel()]).reshape(n, depth)
    _, lists = _stable_tail_sort(lists, values)
    where = np.argmax(lists == items[:, None], axis=1)
    moved = np.flatnonzero(where > 0)
    lists[moved, where[moved]] = lists[moved, 0]
    lists[moved, 0] = moved
    return lists


def _entry_keys(matrix: sp.csr_matrix) -> np.ndarray:
    """row * n_columns + column of every stored entry of a CSR matrix with sorted indices:
    ascending, so pairs are found by `np.searchsorted`."""
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    return rows * matrix.shape[1] + matrix.indices


def _lookup(matrix: sp.csr_matrix, keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """matrix[r, c] (0 where not stored) for the pair keys `wanted` (`_entry_keys` form)."""
    if keys.size == 0:
        return np.zeros(wanted.shape)
    at = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
    return np.where(keys[at] == wanted, matrix.data[at], 0.0)


def _sorted_csr(matrix: sp.spmatrix) -> sp.csr_matrix:
    matrix = matrix.tocsr()
    matrix.sort_indices()
    return matrix


def _iteration(lists: np.ndarray, k: int) -> tuple[np.ndarray, tuple]:
    """One LHRR iteration: new lists and the hyperedges (members, memberships, confidence).
    Up to `DENSE_ITEMS` items the products are read as dense blocks, beyond as sparse ones
    (the same lists: the tests run both)."""
    n = lists.shape[0]
    incidence, members, memberships, confidence = hyperedges(lists, k)
    pattern = incidence.copy()
    pattern.data = np.ones_like(pattern.data)
    weighted = (sp.diags(confidence) @ incidence).tocsr()
    edges = (incidence, incidence.T.tocsr(), weighted, pattern, pattern.T.tocsr())
    rows = _dense_rows if n <= DENSE_ITEMS else _sparse_rows
    return rows(lists, k, edges), (members, memberships, confidence)


def _dense_rows(lists: np.ndarray, k: int, edges: tuple) -> np.ndarray:
    """The new lists of one iteration from dense (rows, n) blocks of the products: fastest
    while n is small (a row's products then reach most items anyway)."""
    n, depth = lists.shape
    incidence, transposed, weighted, pattern, pattern_transposed = edges
    result = np.empty_like(lists)
    step = max(1, min(n, BLOCK_ELEMENTS // n))
    for start in range(0, n, step):
        block = slice(start, min(n, start + step))
        rows = lists[block]
        local = np.arange(rows.shape[0])[:, None]
        tail = rows[:, 1:]
        product = (transposed[block] @ weighted).toarray()        # (H^T diag(conf) H)[rows]
        cartesian = (1.0 + product).astype(np.float32)
        value = cartesian[local, tail].astype(np.float64)
        value = (value * (incidence[block] @ transposed).toarray()[local, tail]
                 ).astype(np.float32).astype(np.float64)
        value = (value * (transposed[block] @ transposed).toarray()[local, tail]
                 ).astype(np.float32)
        order = np.argsort(-value, axis=1, kind="stable")
        tail = np.take_along_axis(tail, order, axis=1)
        tail_values = np.take_along_axis(value, order, axis=1)
        listed = np.zeros(product.shape, bool)
        listed[local, rows] = True
        candidate = (product > 0) & ~listed
        # pairs sharing a hyperedge only through zero memberships sit at W = 1: they matter
        # only where a listed value fell below 1
        low = np.flatnonzero(tail_values[:, -1] < 1.0)
        if low.size:
            shared = (pattern_transposed[start + low] @ pattern).toarray() > 0
            candidate[low] = shared & ~listed[low]
        candidate_value = np.where(candidate, cartesian, np.float32(-np.inf))
        negated, chosen = top_k_smallest(-candidate_value, depth - 1)
        result[block, 0] = rows[:, 0]
        result[block, 1:] = merge_candidates(tail, tail_values, chosen, -negated)
    return result


def _sparse_rows(lists: np.ndarray, k: int, edges: tuple) -> np.ndarray:
    """The new lists of one iteration, each block of rows reading its sparse products only at
    the listed pairs and at their stored entries (the candidates), never as dense (rows, n)
    arrays: a block costs its non-zeros, not n per row."""
    n, depth = lists.shape
    incidence, transposed, weighted, pattern, pattern_transposed = edges
    result = np.empty_like(lists)
    # a row's products hold at most min(n, K^4) entries (K^2 hyperedges of K^2 members)
    step = max(1, min(n, BLOCK_ELEMENTS // min(n, k ** 4 + 1)))
    for start in range(0, n, step):
        block = slice(start, min(n, start + step))
        rows = lists[block]
        count = rows.shape[0]
        local = np.arange(count)[:, None]
        tail = rows[:, 1:]
        tail_keys = (local * n + tail).ravel()
        product = _sorted_csr(transposed[block] @ weighted)    # (H^T diag(conf) H)[rows]
        product_keys = _entry_keys(product)
        value = (1.0 + _lookup(product, product_keys, tail_keys)).astype(np.float32)
        value = value.astype(np.float64)
        hyperedge = _sorted_csr(incidence[block] @ transposed)
        value = (value * _lookup(hyperedge, _entry_keys(hyperedge), tail_keys)
                 ).astype(np.float32).astype(np.float64)
        reciprocal = _sorted_csr(transposed[block] @ transposed)
        value = (value * _lookup(reciprocal, _entry_keys(reciprocal), tail_keys)
                 ).astype(np.float32).reshape(tail.shape)
        order = np.argsort(-value, axis=1, kind="stable")
        tail = np.take_along_axis(tail, order, axis=1)
        tail_values = np.take_along_axis(value, order, axis=1)
        listed_keys = np.sort((local * n + rows).ravel())
        # candidates: unlisted pairs sharing a hyperedge, W = 1 + product
        keys = product_keys[product.data > 0]
        # pairs sharing a hyperedge only through zero memberships sit at W = 1: they matter
        # only where a listed value fell below 1
        low = np.flatnonzero(tail_values[:, -1] < 1.0)
        if low.size:
            shared = _sorted_csr(pattern_transposed[start + low] @ pattern)
            shared_rows = np.repeat(low, np.diff(shared.indptr))
            keys = keys[~np.isin(keys // n, low)]
            keys = np.sort(np.concatenate([keys, shared_rows * n + shared.indices]))
        keys = keys[~np.isin(keys, listed_keys, assume_unique=True)]
        candidate_value = (1.0 + _lookup(product, product_keys, keys)).astype(np.float32)
        candidate_row = keys // n
        ranked = np.lexsort((keys % n, -candidate_value, candidate_row))
        rank = np.arange(len(ranked)) - np.searchsorted(candidate_row[ranked],
                                                        candidate_row[ranked])
        kept = ranked[rank < depth - 1]
        chosen = np.zeros((count, depth - 1), np.int64)
        chosen_value = np.full((count, depth - 1), -np.inf, np.float32)
        slots = rank[rank < depth - 1]
        chosen[candidate_row[kept], slots] = keys[kept] % n
        chosen_value[candidate_row[kept], slots] = candidate_value[kept]
        result[block, 0] = rows[:, 0]
        result[block, 1:] = merge_candidates(tail, tail_values, chosen, chosen_value)
    return result


def lhrr(initial_lists: np.ndarray, k: int, iterations: int = 2,
         progress: ProgressCallback | None = None) -> Hypergraph:
    """LHRR over a collection from each item's initial ranked list.

    Args:
        initial_lists: (n, >= 4k) int item ids, each item's ranked list (itself first), e.g.
            `knn_graph(features, 4 * k).indices`; only the first 4k entries are read.
        k: neighbourhood size K (list depth L = 4K); clamped into [1, min(n, depth) // 4]
            with a warning (`Hypergraph.k` is the one used).
        iterations: T >= 1.
        progress: optional (fraction, message) callback, once per stage.
    Returns:
        the Hypergraph: final lists and the last iteration's hyperedges and confidences.
    """
    lists = _check_lists(initial_lists, "initial lists")
    if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer) \
            or iterations < 1:
        raise InvalidInputError(f"iterations must be an integer >= 1, got {iterations!r}")
    n = lists.shape[0]
    k = usable_k(k, n, lists.shape[1])
    lists = lists[:, :4 * k]
    _check_unique(lists)
    lists = _initial_lists(lists)
    if progress is not None:
        progress(0.0, "LHRR: initial lists")
    edges: tuple = ()
    for done in range(int(iterations)):
        lists, edges = _iteration(lists, k)
        if progress is not None:
            progress((done + 1) / iterations, f"LHRR: iteration {done + 1}/{iterations}")
    members, memberships, confidence = edges
    return Hypergraph(ranked_lists=lists, members=members, memberships=memberships,
                      confidence=confidence, k=k, iterations=int(iterations))


def lhrr_from_features(features: np.ndarray, k: int, iterations: int = 2,
                       progress: ProgressCallback | None = None,
                       knn: KnnGraph | None = None) -> Hypergraph:
    """LHRR from features: initial lists from `knn` when it is 4K deep (the gallery's graph,
    exact or approximate: no search of the whole collection), else by
    `engine.core.knn.knn_graph` (depth 4K).

    Rows are used as unit vectors (the gallery stores them so); rows that are not are divided
    by their norm, so cosine order = Euclidean order (the authors' default BallTree metric).

    Args:
        features: (n, d) float, finite, no zero rows.
        knn: the rows' kNN graph (n rows, self first), or None.
    """
    array = np.asarray(features, np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise InvalidInputError(f"features must be a non-empty (n, d) array, got {array.shape}")
    if not np.isfinite(array).all():
        raise InvalidInputError("features contain NaN or infinite values")
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise InvalidInputError(f"feature row {int(np.flatnonzero(norms == 0)[0])} is all zeros")
    if np.abs(norms - 1.0).max() > 1e-3:
        logger.info("LHRR: normalising feature rows to unit length")
        array = (array / norms[:, None]).astype(np.float32)
    k = usable_k(k, array.shape[0])
    if knn is not None and knn.indices.shape[0] == array.shape[0] and knn.depth >= 4 * k:
        return lhrr(knn.indices[:, :4 * k], k, iterations, progress)
    return lhrr(knn_graph(array, 4 * k).indices, k, iterations, progress)


# -- SGCC ---------------------------------------------------------------------------------------
def _last_argmax(values: np.ndarray) -> int:
    """Index of the largest value, the last one among ties."""
    return int(len(values) - 1 - np.argmax(values[::-1]))


def sgcc(hypergraph: Hypergraph, n_clusters: int, labelled_fraction: float = 0.5) -> Clustering:
    """SGCC leader clustering: pseudo-labels for the most confident items.

    score(i) = conf(i) h(i, i). The first leader has the best score; each next one maximises
    score(j) / (1 + sum over leaders l of <H[l], H[j]>) among items not yet leaders. Each leader
    starts a cluster; then the floor(labelled_fraction * n) best-scored items, in score order,
    leaders skipped, join the cluster maximising mean_{m in cluster} h(m, item) (clusters grow
    as items join, so this is one pass over the items). The rest stay -1.

    Args:
        hypergraph: from `lhrr`.
        n_clusters: c, 1 <= c <= n.
        labelled_fraction: P in [0, 1].
    """
    n = hypergraph.n
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer) \
            or not 1 <= n_clusters <= n:
        raise InvalidInputError(f"n_clusters must be an integer in [1, {n}], got {n_clusters!r}")
    if not 0.0 <= float(labelled_fraction) <= 1.0:
        raise InvalidInputError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
    incidence = hypergraph.incidence().astype(np.float64)
    columns = incidence.T.tocsr()
    score = hypergraph.confidence * incidence.diagonal()
    items = np.arange(n)
    order = np.lexsort((-items, -score.astype(np.float32)))  # score desc, larger id first
    leaders = [int(order[0])]
    is_leader = np.zeros(n, bool)
    is_leader[order[0]] = True
    overlap = np.zeros(n)
    for _ in range(1, n_clusters):
        overlap += (incidence @ incidence[leaders[-1]].T).toarray().ravel()
        penalised = (score / (1.0 + overlap)).astype(np.float32)
        penalised[is_leader] = -np.inf
        leaders.append(_last_argmax(penalised))
        is_leader[leaders[-1]] = True
    labels = np.full(n, -1, np.int64)
    labels[leaders] = np.arange(n_clusters)
    sizes = np.ones(n_clusters)
    for item in order[:int(n * labelled_fraction)]:
        if is_leader[item]:
            continue
        start, stop = columns.indptr[item], columns.indptr[item + 1]
        holders = labels[columns.indices[start:stop]]
        known = holders >= 0
        sums = np.bincount(holders[known], weights=columns.data[start:stop][known],
                           minlength=n_clusters)
        target = _last_argmax((sums / sizes).astype(np.float32))
        labels[item] = target
        sizes[target] += 1
    return Clustering(labels=labels, leaders=np.asarray(leaders, np.int64), score=score)


# -- the GCN graph and the number of clusters ---------------------------------------------------
def reciprocal_edges(ranked_lists: np.ndarray, k: int) -> np.ndarray:
    """Undirected reciprocal kNN edges of the lists, both directions stored (SGRR's GCN graph).

    (i, v) is an edge when v is in the first k + 1 entries of i's list, v != i, and i is in the
    first k + 1 entries of v's list. Ordered by i, then by v's position in i's list (the
    authors' order).

    Args:
        ranked_lists: (n, depth) int64 lists (self first); k >= 0 (capped at depth - 1).
    Returns:
        (2, E) int64 [sources; targets].
    """
    lists = _check_lists(ranked_lists)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise InvalidInputError(f"k must be an integer >= 0, got {k!r}")
    width = min(int(k) + 1, lists.shape[1])
    head = lists[:, :width]
    mask = reciprocal_mask(lists, width) & (head != np.arange(lists.shape[0])[:, None])
    sources, positions = np.nonzero(mask)
    return np.stack([sources, head[sources, positions]]).astype(np.int64)


def default_clusters(n: int, k: int | None = None) -> int:
    """A label-free number of clusters c for SGCC.

    With the LHRR neighbourhood k: round(n / k). The authors set K to the class size (Flowers:
    K = 80 images per class, 17 classes = 1360 / 80), so the two priors are one: a neighbourhood
    is about one cluster. Without k: round(sqrt(n / 2)), the usual rule of thumb. Both are
    clamped to [min(2, n), n].
    """
    if n < 1:
        raise InvalidInputError(f"n must be >= 1, got {n}")
    guess = round(n / k) if k else round(math.sqrt(n / 2))
    return int(min(n, max(min(2, n), guess)))
