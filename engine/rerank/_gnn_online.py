"""GNN re-ranking's online paths on the CPU: the gallery-only graph propagated once at fit, and
one query's scores from the rows its arrival changes (scipy; private to `gnn`).

Nodes are numbered as for an online query: the query is node 0 (an empty row at fit), gallery
item j is node j + 1. With W the propagation weights (row r: s^2 at its first k2 neighbours),
B0 = A0 + A0^T the symmetrised binary kNN adjacency, A1 = normalise(W B0), B1 = A1 + A1^T and
A2 = normalise(W B1), a query's graph score against node j is <A2'[0], A2'[j]>, primes marking
the graph with the query in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from engine.errors import TooLargeError
from engine.rerank._scale import gib, memory_budget

PROPAGATED_BYTES_PER_EDGE = 8
"""Memory of one entry of the propagated graph P (float32 value, int32 column)."""


def _adjacency_rows(lists: np.ndarray, n: int) -> sp.csr_matrix:
    """Binary rows: row r has ones at the node ids lists[r]."""
    width = lists.shape[1]
    indptr = np.arange(lists.shape[0] + 1, dtype=np.int64) * width
    return sp.csr_matrix((np.ones(lists.size, np.float32), lists.ravel(), indptr),
                         shape=(lists.shape[0], n))


def _weight_rows(lists: np.ndarray, similarities: np.ndarray, k2: int,
                 columns: np.ndarray | None = None, n: int | None = None) -> sp.csr_matrix:
    """Propagation weights: row r has s^2 at its first k2 neighbours (optionally renumbered)."""
    ids = lists[:, :k2] if columns is None else np.searchsorted(columns, lists[:, :k2])
    indptr = np.arange(lists.shape[0] + 1, dtype=np.int64) * k2
    return sp.csr_matrix(((similarities[:, :k2] ** 2).astype(np.float32).ravel(),
                          ids.ravel(), indptr),
                         shape=(lists.shape[0], n if columns is None else len(columns)))


def _normalise_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    return (sp.diags((1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)) @ matrix
            ).tocsr()


def _placed(rows: np.ndarray, n: int) -> sp.csr_matrix:
    """(n, len(rows)) selection: multiplied by a matrix of len(rows) rows, puts its row i at
    row rows[i] of an n-row matrix (zeros elsewhere)."""
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.arange(len(rows)))),
                         shape=(n, len(rows)))


def _query_layout(neighbours: np.ndarray, similarities: np.ndarray, k1: int, k2: int
                  ) -> tuple[int, np.ndarray, np.ndarray, sp.csr_matrix, sp.csr_matrix]:
    """The gallery graph numbered as for an online query (the query is node 0, an empty row
    until it arrives; gallery item j is node j + 1): the node count n, the (n, k1) lists and
    similarities, the binary kNN adjacency and the k2-row weight matrix."""
    n = neighbours.shape[0] + 1
    lists = np.vstack([np.zeros((1, k1), np.int64), neighbours[:, :k1] + 1])
    weights = np.vstack([np.zeros((1, k1), np.float32), similarities[:, :k1]])
    empty = sp.csr_matrix((1, n), dtype=np.float32)  # the query's row, not there yet
    adjacency = sp.vstack([empty, _adjacency_rows(lists[1:], n)]).tocsr()
    weight = sp.vstack([empty, _weight_rows(lists[1:], weights[1:], k2, n=n)]).tocsr()
    return n, lists, weights, adjacency, weight


def first_layer_change(n: int, k1: int, query_list: np.ndarray, took: np.ndarray,
                       dropped: np.ndarray) -> sp.csr_matrix:
    """B0' - B0 of a query joining the graph, symmetrised: the query's row (node 0) gains its
    k1 neighbours `query_list`, and each row in `took` gains node 0 and loses its last
    neighbour (`dropped`, in the same order)."""
    entries = np.concatenate([np.zeros(k1, np.int64), took, took])
    columns = np.concatenate([query_list, np.zeros(len(took), np.int64), dropped])
    values = np.concatenate([np.ones(k1 + len(took), np.float32),
                             np.full(len(took), -1.0, np.float32)])
    change = sp.csr_matrix((values, (entries, columns)), shape=(n, n))
    return (change + change.T).tocsr()


def check_propagation_memory(weight: sp.csr_matrix, b1: sp.csr_matrix) -> None:
    """Refuse (TooLargeError) before building P = W B1 when its entries may not fit the
    memory a fit may plan to use (`memory_budget`). The count is an upper bound read from the
    structures alone, W's entries times B1's row lengths (1.4 to 2.6 times the real count on
    clustered galleries): P takes about 1,000 entries per item at GNN's defaults, 11 GB at a
    million items, which killed a fit for memory rather than refusing it."""
    budget = memory_budget()
    if budget is None:
        return
    row_lengths = np.diff(b1.indptr).astype(np.float64)
    entries = float(((weight != 0).astype(np.float64) @ row_lengths).sum())
    need = entries * PROPAGATED_BYTES_PER_EDGE
    if need > budget:
        raise TooLargeError(
            f"GNN's propagated gallery graph may need up to {gib(need)} for "
            f"{weight.shape[0] - 1:,} items ({entries / max(1, weight.shape[0]):,.0f} entries "
            f"per item at most), beyond the {gib(budget)} a fit may use now; use a smaller "
            "gallery or smaller k1 and k2")


@dataclass(frozen=True)
class _Arrival:
    """A query's arrival in `GalleryPropagation`'s graph: its `graph_scores` arguments (rows,
    lists, similarities; new_heads: node id -> its row there), the rows C of A1 that change
    (changed) and their change (delta, A1' - A1), D = B1' - B1 (change1) and the rows whose
    weights change (rewired, 0 first) propagated afresh (fresh: A2' of those rows)."""

    rows: np.ndarray
    lists: np.ndarray
    similarities: np.ndarray
    new_heads: dict[int, int]
    changed: np.ndarray
    rewired: np.ndarray
    delta: sp.csr_matrix
    change1: sp.csr_matrix
    fresh: sp.csr_matrix


class GalleryPropagation:
    """The gallery-only graph propagated once, so that an online query's scores come from the
    few rows its arrival changes (exactly; CPU, scipy).

    Nodes are numbered as for an online query: the query is node 0 (an empty row here), gallery
    item j is node j + 1. The query changes the kNN lists of the rows that take it in (each
    drops its last entry), hence the rows C of A1 whose first k2 neighbours are among the
    changed rows of B0. Every row of A1 in C changes by a full renormalisation, and through
    B1 = A1 + A1^T so does one entry of each of its columns: on a kNN graph that leaks between
    clusters the rows of the last layer that move reach most of the gallery, so they are not
    propagated afresh. Instead, with D = B1' - B1 (rows and columns C only) and P = W B1 the
    unnormalised last layer kept at fit, a row j whose weights W[j] do not change has
    P'[j] = P[j] + E[j], E = W D, and

        score[j] = <a, A2'[j]> = W[j] (B1' a) / |P'[j]|,
        |P'[j]|^2 = |P[j]|^2 + 2 <P[j], E[j]> + |E[j]|^2,

    with a = A2'[0]: sparse products with one vector, plus the entries of E (a few per row it
    reaches). Only the rows whose first k2 neighbours change (the query's own and those that
    take it in there) and the rows C of A1 are propagated afresh.
    """

    def __init__(self, neighbours: np.ndarray, similarities: np.ndarray, k1: int, k2: int
                 ) -> None:
        self.k1, self.k2 = k1, k2
        self.n, self.lists, weights, adjacency, self.weight = _query_layout(
            neighbours, similarities, k1, k2)
        self.w = (weights[:, :k2] ** 2).astype(np.float32)               # (n, k2) W's values
        self.heads_of = self.weight.T.tocsr()  # row m: the rows with m among their first k2
        self.b0 = (adjacency + adjacency.T).tocsr()
        a1 = _normalise_rows(self.weight @ self.b0)
        self.a1 = a1
        self.b1 = (a1 + a1.T).tocsr()
        check_propagation_memory(self.weight, self.b1)
        self.p2 = (self.weight @ self.b1).tocsr()
        self.p2.sort_indices()  # entry look-ups by binary search
        self.p2_norms = np.bincount(_csr_rows_of_entries(self.p2),
                                    weights=np.square(self.p2.data, dtype=np.float64),
                                    minlength=self.n)

    @property
    def edges(self) -> int:
        """Non-zeros of the propagated gallery graph (what a batch run over it holds)."""
        return int(self.p2.nnz)

    def graph_scores(self, rows: np.ndarray, lists: np.ndarray, similarities: np.ndarray
                     ) -> tuple[np.ndarray, int]:
        """<A2'[0], A2'[node]> for every node, given the lists the query changes.

        Args:
            rows: (m,) sorted node ids whose kNN lists change, 0 (the query) first.
            lists, similarities: (m, k1) their new lists (node ids) and similarities.
        Returns:
            the (n,) float32 scores and how many rows were propagated afresh.
        """
        return self.scores(self.arrive(rows, lists, similarities))

    def arrive(self, rows: np.ndarray, lists: np.ndarray, similarities: np.ndarray
               ) -> _Arrival:
        """What the query's arrival changes (`graph_scores`' arguments): the layers' changes
        and the rows propagated afresh, the query's A2'[0] first."""
        n, k1, k2 = self.n, self.k1, self.k2
        took = rows[1:]
        dropped = self.lists[took, k1 - 1]
        change0 = first_layer_change(n, k1, lists[0], took, dropped)
        rewired = rows[(lists[:, :k2] != self.lists[rows, :k2]).any(axis=1) | (rows == 0)]
        new_heads = {int(r): i for i, r in enumerate(rows)}
        # C: rows of A1 with a changed row of B0 among their first k2 (old or new) neighbours
        moved = np.flatnonzero(np.diff(change0.indptr))
        changed = np.union1d(self.heads_of[moved].indices, rewired)
        heads, weights = self._heads(changed, rows, lists, similarities, new_heads)
        a1_fresh = self._layer(heads, weights, self.b0, change0)
        delta = (_placed(changed, n) @ (a1_fresh - self.a1[changed])).tocsr()  # A1' - A1
        delta.eliminate_zeros()
        change1 = (delta + delta.T).tocsr()                              # D = B1' - B1
        # the rows whose weights change (the query's among them), propagated afresh
        heads, weights = self._heads(rewired, rows, lists, similarities, new_heads)
        fresh = self._layer(heads, weights, self.b1, change1)
        return _Arrival(rows, lists, similarities, new_heads, changed, rewired, delta, change1,
                        fresh)

    def scores(self, arrival: _Arrival) -> tuple[np.ndarray, int]:
        """`graph_scores` of an arrival: the rewired rows' from their fresh rows, every other
        row's through the correction of its kept unnormalised row (see the class)."""
        n = self.n
        changed, rewired, delta, change1 = (arrival.changed, arrival.rewired, arrival.delta,
                                            arrival.change1)
        fresh = arrival.fresh
        query = fresh[0]                                                 # a = A2'[0]
        # numerators W[j] (B1' a) and squared norms |P[j] + E[j]|^2 of every other row
        through = np.zeros(n)
        reached = query @ self.b1 + query @ change1
        through[reached.indices] = reached.data
        numerator = self.weight @ through
        norms = self.p2_norms + self._correction(changed, delta, change1)
        norms = np.sqrt(np.maximum(norms, 0.0))
        scores = numerator / np.where(norms > 0, norms, 1.0)
        scores[rewired] = (fresh @ query.T).toarray().ravel()
        return scores.astype(np.float32), len(rewired) + len(changed)

    def rows(self, arrival: _Arrival, nodes: np.ndarray) -> sp.csr_matrix:
        """A2'[nodes], the last layer's rows with the query in, normalise(W'[j] B1'): how the
        rewired rows are propagated (`scores` corrects the others' kept rows instead; the
        same numbers up to float rounding)."""
        heads, weights = self._heads(np.asarray(nodes), arrival.rows, arrival.lists,
                                     arrival.similarities, arrival.new_heads)
        return self._layer(heads, weights, self.b1, arrival.change1)

    def node_list(self, arrival: _Arrival, node: int) -> np.ndarray:
        """A node's k1 neighbours (node ids) with the query in."""
        slot = arrival.new_heads.get(int(node))
        return self.lists[node] if slot is None else arrival.lists[slot]

    def _correction(self, changed: np.ndarray, delta: sp.csr_matrix, change: sp.csr_matrix
                    ) -> np.ndarray:
        """2 <P[j], E[j]> + |E[j]|^2 for every row j, E = W D, D = delta + delta^T = `change`.

        E splits by where D's entries lie: the rows with a head in C take whole rows of
        delta (E1, against the same rows of P), the rows with a head among delta's columns
        take entries at the columns C (E2, against P[:, C] = W B1[C]^T, B1 symmetric).
        """
        n = self.n
        delta_t = delta.T.tocsr()
        by_rows = np.unique(self.heads_of[changed].indices)
        by_columns = np.unique(self.heads_of[np.flatnonzero(np.diff(delta_t.indptr))].indices)
        e1 = self.weight[by_rows] @ delta
        e2 = self.weight[by_columns] @ delta_t[:, changed]                # columns C only
        along = np.zeros(n)
        along[by_rows] += np.asarray(self.p2[by_rows].multiply(e1).sum(axis=1)).ravel()
        p_changed = self.weight[by_columns] @ self.b1[changed].T           # P[:, C]
        along[by_columns] += np.asarray(p_changed.multiply(e2).sum(axis=1)).ravel()
        reached = np.union1d(by_rows, by_columns)
        spread = self.weight[reached] @ change                             # E's rows
        own = np.zeros(n)
        own[reached] = np.bincount(_csr_rows_of_entries(spread),
                                   weights=np.square(spread.data, dtype=np.float64),
                                   minlength=len(reached))
        return 2.0 * along + own

    def _heads(self, nodes: np.ndarray, rows: np.ndarray, lists: np.ndarray,
               similarities: np.ndarray, new: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The first k2 neighbours (ids and weights s^2) of `nodes`, with the query in."""
        k2 = self.k2
        heads, weights = self.lists[nodes, :k2], self.w[nodes]
        for i, node in enumerate(nodes):
            if int(node) in new:
                heads[i] = lists[new[int(node)], :k2]
                weights[i] = similarities[new[int(node)], :k2] ** 2
        return heads, weights

    def _layer(self, heads: np.ndarray, weights: np.ndarray, stored: sp.csr_matrix,
               change: sp.csr_matrix) -> sp.csr_matrix:
        """normalise(W' B')[rows] for rows with first k2 neighbours `heads` weighted by
        `weights`, where B' = `stored` + `change`."""
        needed, position = np.unique(heads, return_inverse=True)
        indptr = np.arange(len(heads) + 1, dtype=np.int64) * self.k2
        rows = sp.csr_matrix((weights.ravel(), position.ravel(), indptr),
                             shape=(len(heads), len(needed)))
        return _normalise_rows(rows @ (stored[needed] + change[needed]))


def _segments(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments [starts[s], starts[s] + lengths[s]): (segment id, position) of each item."""
    segment = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    return segment, np.arange(int(lengths.sum())) - first[segment] + starts[segment]


def _csr_rows_of_entries(matrix: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))


@dataclass(frozen=True)
class _SmallArrival:
    """A query's arrival in `SmallGraphPropagation`'s graph: the (n, k1) lists and
    similarities with the query in, the rows C of A1 that change (changed) with their scale
    change s (n,) (alpha - 1, zero outside C) and sparse part S (change_rows, its transpose
    change_t), A1[C] dense (a1_changed), and the rows whose weights change (rewired, 0
    first) propagated afresh (fresh: A2' of those rows)."""

    lists: np.ndarray
    similarities: np.ndarray
    changed: np.ndarray
    rewired: np.ndarray
    s: np.ndarray
    change_rows: sp.csr_matrix
    change_t: sp.csr_matrix
    a1_changed: np.ndarray
    fresh: sp.csr_matrix | None


class SmallGraphPropagation:
    """One query's graph scores on a small graph without propagating every row again.

    On a small graph the query's arrival reaches nearly every row of the last layer, so that
    layer is never recomputed row by row. Its rows are kept unnormalised, P = W B1, together
    with V = W A1^T (dense (n, n) float32 each, stored transposed), and the change is carried
    as a sparse difference through the layers:

    - layer 1 changes only the rows C whose first k2 neighbours include a changed row of B0;
      each is A1'[r] = alpha_r A1[r] + S[r], where X_r = W'[r] B0' - W[r] B0 is sparse (a few
      entries from the query's edges), |P1'[r]| follows from |P1[r]| and X_r, alpha_r is the
      ratio of the norms and S[r] = X_r / |P1'[r]| (node 0, empty at fit: alpha 0);
    - with s = alpha - 1 (zero outside C), a row j whose weights are unchanged then has
      P'[j] = P[j] + E[j], E = W D, D = B1' - B1 = diag(s) A1 + A1^T diag(s) + S + S^T, so
      E[j] = dU[j] + s * V[j] + Z[j] with dU = W diag(s) A1 (rows of A1 that changed scale),
      Z = W (S + S^T) (sparse, small);
    - its score is <a, P'[j]> / |P'[j]| with a = A2'[0]: the numerator is P a + W (D a) (sparse
      products with a vector), and |P'[j]|^2 = |P[j]|^2 + 2 <P[j], E[j]> + |E[j]|^2 is
      expanded into pieces that need only the columns C of P and V, tables kept at fit
      (<P[j], A1[m]> and the Gram <A1[m], A1[m']> over j's first k2 neighbours m, m') and
      the entries of Z.

    Only the rows whose first k2 neighbours change (the query's own and those that take it in
    there) are propagated afresh. Exact up to float rounding: per-query sums in float64.
    """

    def __init__(self, neighbours: np.ndarray, similarities: np.ndarray, k1: int, k2: int
                 ) -> None:
        self.k1, self.k2 = k1, k2
        self.n, self.lists, weights, adjacency, self.weight = _query_layout(
            neighbours, similarities, k1, k2)
        n = self.n
        self.w = (weights[:, :k2] ** 2).astype(np.float32)                # (n, k2) W's values
        self.b0 = (adjacency + adjacency.T).tocsr()
        p1 = (self.weight @ self.b0).tocsr()
        self.n1 = np.sqrt(np.bincount(_csr_rows_of_entries(p1),
                                      weights=np.square(p1.data, dtype=np.float64),
                                      minlength=n))
        self.a1 = _normalise_rows(p1)
        self.a1.sort_indices()
        self.a1_t = self.a1.T.tocsr()
        b1 = (self.a1 + self.a1_t).tocsr()
        weight_t = self.weight.T.tocsr()
        self.p_t = np.ascontiguousarray((b1 @ weight_t).toarray(), np.float32)   # P^T (B1 = B1^T)
        self.v_t = np.ascontiguousarray((self.a1 @ weight_t).toarray(), np.float32)  # V^T
        self.p_norms = np.einsum("cj,cj->j", self.p_t, self.p_t, dtype=np.float64)
        heads = self.lists[:, :k2]
        self.g = np.empty((n, k2))                                        # <P[j], A1[m_i]>
        for i in range(k2):
            rows = self.a1[heads[:, i]].tocoo()
            self.g[:, i] = np.bincount(rows.row, weights=rows.data.astype(np.float64)
                                       * self.p_t[rows.col, rows.row], minlength=n)
        gram = (self.a1 @ self.a1_t).toarray()
        self.gram = gram[heads[:, :, None], heads[:, None, :]].astype(np.float64)

    def graph_scores(self, lists: np.ndarray, similarities: np.ndarray
                     ) -> tuple[np.ndarray, int]:
        """<A2'[0], A2'[node]> for every node, given the (n, k1) lists with the query in.

        Returns the (n,) scores and how many rows were propagated afresh.
        """
        return self.scores(self.arrive(lists, similarities))

    def arrive(self, lists: np.ndarray, similarities: np.ndarray) -> _SmallArrival:
        """What the query's arrival changes (`graph_scores`' arguments): the first layer's
        scales and sparse change on the rows C, and the rows propagated afresh."""
        n, k1, k2, old = self.n, self.k1, self.k2, self.lists
        took = np.flatnonzero((lists[1:] == 0).any(axis=1)) + 1
        dropped = old[took, k1 - 1]
        change0 = first_layer_change(n, k1, lists[0], took, dropped)
        marked = np.zeros(n, bool)
        marked[np.flatnonzero(np.diff(change0.indptr))] = True
        changed = np.flatnonzero(marked[lists[:, :k2]].any(axis=1))      # C: rows of A1
        rewired = (lists[:, :k2] != old[:, :k2]).any(axis=1)             # W'[r] != W[r]
        rewired[0] = True
        rewired = np.flatnonzero(rewired)                                # within C
        # X = P1' - P1 on C: (W' - W) B0' + W dB0
        weight_change = (_weight_rows(lists[rewired], similarities[rewired], k2, n=n)
                         - self.weight[rewired]).tocsr()
        x = self.weight[changed] @ change0 + _placed(np.searchsorted(changed, rewired),
                                                    len(changed)) @ (
            weight_change @ self.b0 + weight_change @ change0)
        x = x.tocoo()
        a1_changed = self.a1[changed].toarray()                          # (|C|, n)
        n1 = self.n1[changed]
        x_values = x.data.astype(np.float64)
        along = np.bincount(x.row, weights=x_values * a1_changed[x.row, x.col],
                            minlength=len(changed))
        own = np.bincount(x.row, weights=x_values ** 2, minlength=len(changed))
        n1_new = np.sqrt(np.maximum(n1 ** 2 + 2.0 * n1 * along + own, 0.0))
        n1_new = np.where(n1_new > 0, n1_new, 1.0)
        s_changed = n1 / n1_new - 1.0
        s = np.zeros(n)
        s[changed] = s_changed
        change_rows = sp.csr_matrix((x_values / n1_new[x.row], (changed[x.row], x.col)),
                                    shape=(n, n))                        # S
        change_t = change_rows.T.tocsr()
        arrival = _SmallArrival(lists, similarities, changed, rewired, s, change_rows,
                                change_t, a1_changed, None)
        # rows propagated afresh: W'[r] B1' for the rewired rows (the query's among them)
        return dataclasses.replace(arrival, fresh=self.rows(arrival, rewired))

    def rows(self, arrival: _SmallArrival, nodes: np.ndarray) -> sp.csr_matrix:
        """A2'[nodes] = normalise(W'[j] B1'), B1' = diag(alpha) A1 + A1^T diag(alpha) + S +
        S^T on the rows of j's first k2 neighbours: how the rewired rows are propagated
        (`scores` corrects the others' kept rows instead; the same numbers up to float
        rounding)."""
        lists, k2 = arrival.lists, self.k2
        needed = np.unique(lists[nodes, :k2])
        alpha = 1.0 + arrival.s
        columns_scaled = self.a1_t[needed]
        columns_scaled.data = columns_scaled.data * alpha[columns_scaled.indices]
        b1_needed = (sp.diags(alpha[needed]) @ self.a1[needed] + columns_scaled
                     + arrival.change_rows[needed] + arrival.change_t[needed])
        return _normalise_rows(_weight_rows(lists[nodes], arrival.similarities[nodes], k2,
                                            columns=needed) @ b1_needed)

    def scores(self, arrival: _SmallArrival) -> tuple[np.ndarray, int]:
        """`graph_scores` of an arrival: the rewired rows' from their fresh rows, every other
        row's from its kept unnormalised row and the change (see the class)."""
        n, k2, old = self.n, self.k2, self.lists
        changed, rewired, s = arrival.changed, arrival.rewired, arrival.s
        change_rows, change_t, a1_changed = (arrival.change_rows, arrival.change_t,
                                             arrival.a1_changed)
        s_changed = s[changed]
        fresh = arrival.fresh
        query = fresh[0].toarray().ravel().astype(np.float32)           # a = A2'[0]
        # numerator <a, P'[j]> = P a + W (D a)
        a1_rows = self.a1[changed]
        d_query = change_rows @ query + change_t @ query
        d_query[changed] += s_changed * (a1_rows @ query)
        d_query += a1_rows.T @ (s_changed * query[changed])
        numerator = (self.p_t.T @ query).astype(np.float64) + self.weight @ d_query
        # |P'[j]|^2 = |P[j]|^2 + 2 <P[j], E[j]> + |E[j]|^2, E = dU + s V + Z
        scaled = self.w * s[old[:, :k2]]                                 # W diag(s) on heads
        total = self.p_norms + 2.0 * (scaled * self.g).sum(axis=1)
        total += np.einsum("ji,jik,jk->j", scaled, self.gram, scaled)    # |dU|^2
        sv = self.v_t[changed]
        sv *= s_changed[:, None].astype(np.float32)                       # s V on columns C
        total += np.einsum("cj,cj->j", sv, 2.0 * self.p_t[changed] + sv,  # 2 <P, sV> + |sV|^2
                           dtype=np.float64)
        pair_rows, pair_heads = np.nonzero(scaled)
        pair_weights = scaled[pair_rows, pair_heads]
        pair_nodes = np.searchsorted(changed, old[pair_rows, pair_heads])
        position = np.full(n, -1)
        position[changed] = np.arange(len(changed))
        kept = position[a1_rows.indices] >= 0
        block = sp.csr_matrix((a1_rows.data[kept], (_csr_rows_of_entries(a1_rows)[kept],
                                                    position[a1_rows.indices[kept]])),
                              shape=(len(changed), len(changed)))         # A1[C, C]
        pairs = sp.csr_matrix((pair_weights, (pair_rows, pair_nodes)), shape=(n, len(changed)))
        # 2 <dU, sV>, gathered by column c of C so that each reads one row of sV
        by_column = (block.T @ pairs.T).tocsr()                          # dU[:, C]^T
        total += 2.0 * np.bincount(by_column.indices, weights=by_column.data * sv.ravel()[
            _csr_rows_of_entries(by_column) * n + by_column.indices], minlength=n)
        z = (self.weight @ (change_rows + change_t)).tocsr()
        z_rows, z_columns, z_values = _csr_rows_of_entries(z), z.indices, z.data
        total += np.bincount(z_rows, weights=z_values * (2.0 * self.p_t[z_columns, z_rows]
                                                         + z_values), minlength=n)
        in_changed = np.flatnonzero(np.isin(z_columns, changed))         # 2 <sV, Z>
        total += 2.0 * np.bincount(
            z_rows[in_changed], weights=z_values[in_changed] * sv[
                np.searchsorted(changed, z_columns[in_changed]), z_rows[in_changed]],
            minlength=n)
        pair, entry = _segments(z.indptr[pair_rows], np.diff(z.indptr)[pair_rows])
        total += 2.0 * np.bincount(                                      # 2 <dU, Z>
            pair_rows[pair], weights=pair_weights[pair] * a1_changed[
                pair_nodes[pair], z_columns[entry]] * z_values[entry], minlength=n)
        norms = np.sqrt(np.maximum(total, 0.0))
        scores = numerator / np.where(norms > 0, norms, 1.0)
        scores[rewired] = fresh @ query
        return scores.astype(np.float32), len(rewired)
