"""GNN re-ranking's online paths on the CPU: the gallery-only graph propagated once at fit, and
one query's scores from the rows its arrival changes (scipy; private to `gnn`).

Nodes are numbered as for an online query: the query is node 0 (an empty row at fit), gallery
item j is node j + 1. With W the propagation weights (row r: s^2 at its first k2 neighbours),
B0 = A0 + A0^T the symmetrised binary kNN adjacency, A1 = normalise(W B0), B1 = A1 + A1^T and
A2 = normalise(W B1), a query's graph score against node j is <A2'[0], A2'[j]>, primes marking
the graph with the query in.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


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


def _rows(stored: sp.csr_matrix, fresh: sp.csr_matrix, fresh_ids: np.ndarray,
          wanted: np.ndarray) -> sp.csr_matrix:
    """Rows `wanted` of a matrix equal to `stored` except rows `fresh_ids` (sorted), which are
    the rows of `fresh`."""
    position = np.searchsorted(fresh_ids, wanted).clip(max=len(fresh_ids) - 1)
    is_fresh = fresh_ids[position] == wanted
    kept = sp.diags((~is_fresh).astype(np.float32)) @ stored[wanted]
    pick = sp.csr_matrix((np.ones(is_fresh.sum(), np.float32),
                          (np.flatnonzero(is_fresh), position[is_fresh])),
                         shape=(len(wanted), len(fresh_ids)))
    return (kept + pick @ fresh).tocsr()


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


class GalleryPropagation:
    """The gallery-only graph propagated once, so an online query recomputes only the rows its
    arrival changes (exactly; CPU, scipy).

    Nodes are numbered as for an online query: the query is node 0 (an empty row here), gallery
    item j is node j + 1. Adding the query changes the kNN lists of the rows that take it in
    (each drops its last entry); each layer then changes only the rows whose first k2
    neighbours have changed rows, plus, through A + A^T, the columns of changed rows.
    """

    def __init__(self, neighbours: np.ndarray, similarities: np.ndarray, k1: int, k2: int
                 ) -> None:
        self.k1, self.k2 = k1, k2
        self.n, self.lists, _, adjacency, weight = _query_layout(neighbours, similarities,
                                                                 k1, k2)
        self.adjacency_t = adjacency.T.tocsr()
        self.b0 = (adjacency + self.adjacency_t).tocsr()
        self.a1 = _normalise_rows(weight @ self.b0)
        self.a1_t = self.a1.T.tocsr()
        self.b1 = (self.a1 + self.a1_t).tocsr()
        self.a2_columns = _normalise_rows(weight @ self.b1).tocsc()

    def graph_scores(self, lists: np.ndarray, similarities: np.ndarray
                     ) -> tuple[np.ndarray, int]:
        """<A2[query], A2[node]> for every node, given the (n, k1) lists with the query in.

        Returns the (n,) scores and how many rows of the last layer were recomputed.
        """
        n = self.n
        took_query = np.flatnonzero((lists[1:] == 0).any(axis=1)) + 1
        dropped = self.lists[took_query, self.k1 - 1]
        changed0 = np.unique(np.concatenate([[0], took_query, dropped, lists[0]]))
        # rows of B0 = A0 + A0^T that change: their own list, or their column of A0
        forward = _adjacency_rows(lists[changed0], n)
        backward = self.adjacency_t[changed0].tocoo()
        stale = np.isin(backward.col, took_query)
        stale[stale] = (dropped[np.searchsorted(took_query, backward.col[stale])]
                        == changed0[backward.row[stale]])
        rows = [backward.row[~stale], np.searchsorted(changed0, lists[0]),
                np.full(len(took_query), np.searchsorted(changed0, 0))]
        cols = [backward.col[~stale], np.zeros(len(lists[0]), np.int64), took_query]
        backward = sp.csr_matrix((np.ones(sum(map(len, rows)), np.float32),
                                  (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(len(changed0), n))
        b0_fresh = (forward + backward).tocsr()
        changed1 = self._affected(lists, changed0)
        a1_fresh = self._layer(lists, similarities, changed1, self.b0, b0_fresh, changed0)
        # rows of B1 = A1 + A1^T that change: changed rows of A1 and their (old and new) columns
        touched = np.unique(np.concatenate([changed1, self.a1[changed1].indices,
                                            a1_fresh.indices]))
        a1_rows = _rows(self.a1, a1_fresh, changed1, touched)
        old_t = self.a1_t[touched].tocoo()
        keep = ~np.isin(old_t.col, changed1)
        new_t = a1_fresh.T.tocsr()[touched].tocoo()
        a1_t_rows = sp.csr_matrix(
            (np.concatenate([old_t.data[keep], new_t.data]),
             (np.concatenate([old_t.row[keep], new_t.row]),
              np.concatenate([old_t.col[keep], changed1[new_t.col]]))),
            shape=(len(touched), n))
        b1_fresh = (a1_rows + a1_t_rows).tocsr()
        changed2 = self._affected(lists, touched)
        a2_fresh = self._layer(lists, similarities, changed2, self.b1, b1_fresh, touched)
        query_row = a2_fresh[np.searchsorted(changed2, 0)]
        scores = np.asarray(self.a2_columns[:, query_row.indices] @ query_row.data).ravel()
        scores[changed2] = (a2_fresh @ query_row.T).toarray().ravel()
        return scores.astype(np.float32), len(changed2)

    def _affected(self, lists: np.ndarray, changed: np.ndarray) -> np.ndarray:
        """Rows whose first k2 neighbours include a changed row (the query's row included)."""
        marked = np.zeros(self.n, bool)
        marked[changed] = True
        return np.flatnonzero(marked[lists[:, :self.k2]].any(axis=1))

    def _layer(self, lists: np.ndarray, similarities: np.ndarray, rows: np.ndarray,
               stored: sp.csr_matrix, fresh: sp.csr_matrix, fresh_ids: np.ndarray
               ) -> sp.csr_matrix:
        """normalise(W B)[rows], with B = `stored` except rows `fresh_ids` taken from `fresh`."""
        needed = np.unique(lists[rows, :self.k2])
        weights = _weight_rows(lists[rows], similarities[rows], self.k2, columns=needed)
        return _normalise_rows(weights @ _rows(stored, fresh, fresh_ids, needed))


def _segments(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments [starts[s], starts[s] + lengths[s]): (segment id, position) of each item."""
    segment = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    return segment, np.arange(int(lengths.sum())) - first[segment] + starts[segment]


def _csr_rows_of_entries(matrix: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))


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
        n, k1, k2, old = self.n, self.k1, self.k2, self.lists
        took = np.flatnonzero((lists[1:] == 0).any(axis=1)) + 1
        dropped = old[took, k1 - 1]
        # B0' - B0: the query's row, and each row that took it in gains node 0, loses its last
        entries = np.concatenate([np.zeros(k1, np.int64), took, took])
        columns = np.concatenate([lists[0], np.zeros(len(took), np.int64), dropped])
        values = np.concatenate([np.ones(k1 + len(took), np.float32),
                                 np.full(len(took), -1.0, np.float32)])
        change0 = sp.csr_matrix((values, (entries, columns)), shape=(n, n))
        change0 = (change0 + change0.T).tocsr()
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
        # rows propagated afresh: W'[r] B1' for the rewired rows (the query's among them)
        needed = np.unique(lists[rewired, :k2])
        alpha = 1.0 + s
        columns_scaled = self.a1_t[needed]
        columns_scaled.data = columns_scaled.data * alpha[columns_scaled.indices]
        b1_needed = (sp.diags(alpha[needed]) @ self.a1[needed] + columns_scaled
                     + change_rows[needed] + change_t[needed])
        fresh = _normalise_rows(_weight_rows(lists[rewired], similarities[rewired], k2,
                                             columns=needed) @ b1_needed)
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
