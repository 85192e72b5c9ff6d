"""GNN re-ranking's private sparse helpers (Zhang et al.): row-sparse adjacency and its row
normalisation on torch sparse tensors. Used by `gnn.py` only."""

from __future__ import annotations

import numpy as np
import torch


def sparse_rows(row_ids: torch.Tensor, column_ids: torch.Tensor, values: torch.Tensor,
                shape: tuple[int, int]) -> torch.Tensor:
    """A coalesced COO sparse tensor from (row, column, value) triplets (duplicates summed)."""
    return torch.sparse_coo_tensor(torch.stack([row_ids, column_ids]), values, shape,
                                   check_invariants=False).coalesce()


def normalise_sparse_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Divide every row of a coalesced COO matrix by its L2 norm (empty rows stay empty)."""
    rows = matrix.indices()[0]
    values = matrix.values()
    norms = torch.zeros(matrix.shape[0], dtype=values.dtype, device=values.device)
    norms.index_add_(0, rows, values * values)
    norms = norms.sqrt()
    return torch.sparse_coo_tensor(matrix.indices(), values / norms[rows], matrix.shape,
                                   check_invariants=False, is_coalesced=True)


def float32_error(dim: int) -> float:
    """Bound on |float32 inner product - exact| for unit vectors of `dim` entries, doubled for
    the canonical value's own rounding: any order of float32 sums errs by at most
    dim * 2^-24 * sum |x_i y_i| <= dim * 2^-24."""
    return (dim + 2) * 2.0 ** -23


def canonical_pairs(rows: np.ndarray, columns: np.ndarray, left: np.ndarray,
                    right: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """`knn.canonical_similarity` of the pairs (left[rows[i]], right[columns[i]]) only:
    float64 sums of the float32 rows, rounded to float32 and capped at 1. (m,) float32."""
    out = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), chunk):
        stop = start + chunk
        product = np.einsum("ij,ij->i", left[rows[start:stop]].astype(np.float64),
                            right[columns[start:stop]].astype(np.float64))
        out[start:stop] = np.minimum(product, 1.0)
    return out


def query_similarities(raw: np.ndarray, gallery: np.ndarray, query: np.ndarray,
                       floors: np.ndarray, depth: int) -> np.ndarray:
    """One query's similarity to every gallery row, canonical wherever it decides a list.

    `raw` is the float32 product (G,). A gallery row can take the query only if the canonical
    similarity reaches its list's smallest (`floors`), and the query's own list is its `depth`
    largest: only the rows within float32 error of either bound get the canonical value, the
    others keep the float32 one, which cannot change any list (`knn.lists_with_query` gives the
    same lists as with every value canonical). No float64 copy of the gallery is needed.
    """
    slack = float32_error(gallery.shape[1])
    bound = np.partition(raw, raw.size - depth)[raw.size - depth] if depth else np.inf
    near = np.flatnonzero((raw >= floors - slack) | (raw >= bound - 2.0 * slack))
    out = raw.copy()
    out[near] = canonical_pairs(near, np.zeros(len(near), np.int64), gallery, query[None, :])
    return out


def query_lists(similarities: np.ndarray, neighbours: np.ndarray, floors: np.ndarray,
                to_query: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of `knn.lists_with_query` that differ from the gallery's own lists, in numpy.

    Node 0 is the query, gallery item j node j + 1. The query enters a gallery list where it
    sorts (before equal similarities, after the item itself) and the list drops its last entry.

    Args:
        similarities, neighbours: (G, >= depth) gallery lists, self first, descending.
        floors: (G,) each list's smallest similarity within `depth`.
        to_query: (G,) the query's similarity to each item (`query_similarities`).
    Returns:
        node ids (m,) sorted, 0 first, and their (m, depth) new lists and similarities.
    """
    took = np.flatnonzero(to_query >= floors)
    old_similarities = similarities[took, :depth]
    above = (old_similarities > to_query[took, None]).sum(axis=1)
    took, above, old_similarities = took[above < depth], above[above < depth], \
        old_similarities[above < depth]
    position = np.maximum(above, 1)[:, None]
    columns = np.arange(depth)[None, :]
    old_ids = neighbours[took, :depth] + 1
    shifted = np.clip(columns - (columns > position), 0, depth - 1)
    ids = np.where(columns == position, 0, np.take_along_axis(old_ids, shifted, 1))
    values = np.where(columns == position, to_query[took, None],
                      np.take_along_axis(old_similarities, shifted, 1))
    bound = np.partition(to_query, to_query.size - (depth - 1))[to_query.size - (depth - 1)]
    near = np.flatnonzero(to_query >= bound)
    order = near[np.lexsort((near, -to_query[near]))][:depth - 1]
    query_ids = np.concatenate([[0], order + 1])
    query_values = np.concatenate([[1.0], to_query[order]]).astype(np.float32)
    return (np.concatenate([[0], took + 1]), np.vstack([query_ids, ids]),
            np.vstack([query_values, values]).astype(np.float32))


def _first_per_row(rows: np.ndarray, width: int) -> np.ndarray:
    """Positions of the first `width` entries of each row in row-grouped entries."""
    starts = np.searchsorted(rows, rows, side="left")
    return np.flatnonzero(np.arange(rows.size) - starts < width)


def lists_with_queries(similarities: np.ndarray, neighbours: np.ndarray, floors: np.ndarray,
                       queries: np.ndarray, gallery: np.ndarray, depth: int,
                       chunk_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """The kNN lists of (queries + gallery) from the gallery's own lists: no gallery search.

    Node q < Q is query q, gallery item j is node Q + j. A gallery list takes the queries whose
    canonical similarity reaches its smallest entry (`floors`), where they sort (before equal
    similarities: smaller ids; never before the item itself), and keeps its first `depth`. A
    query's list is itself, then its most similar nodes (ties to the smaller id), from float32
    products whose candidates within float32 error of the cut get canonical values: the lists
    `knn.torch_topk_similar` gives over all nodes when the gallery's lists are exact.

    Args:
        similarities, neighbours: (G, >= depth) gallery lists, self first, descending.
        floors: (G,) each list's smallest similarity within `depth`.
        queries: (Q, d), gallery: (G, d) float32 unit rows.
    Returns:
        (Q + G, depth) similarities (float32) and node ids (int64), faiss's order.
    """
    n_queries, size = queries.shape[0], gallery.shape[0]
    nodes = np.vstack([queries, gallery])
    slack = float32_error(gallery.shape[1])
    step = max(1, chunk_elements // (n_queries + size))
    query_ids, query_values, enter_q, enter_j, enter_values = [], [], [], [], []
    for start in range(0, n_queries, step):
        raw = queries[start:start + step] @ nodes.T                        # (c, Q + G)
        rows = np.arange(start, min(start + step, n_queries))
        raw[np.arange(len(rows)), rows] = np.inf                           # self first
        bound = np.partition(raw, raw.shape[1] - depth, axis=1)[:, raw.shape[1] - depth]
        r, c = np.nonzero(raw >= bound[:, None] - 2.0 * slack)
        values = canonical_pairs(rows[r], c, queries, nodes)
        values[c == rows[r]] = np.inf
        order = np.lexsort((c, -values, r))
        keep = order[_first_per_row(r[order], depth)]
        query_ids.append(c[keep].reshape(len(rows), depth))
        query_values.append(np.minimum(values[keep], 1.0).reshape(len(rows), depth))
        g_raw = raw[:, n_queries:]
        q, j = np.nonzero(g_raw >= floors[None, :] - slack)
        exact = canonical_pairs(rows[q], j, queries, gallery)
        enters = exact >= floors[j]
        enter_q.append(rows[q][enters])
        enter_j.append(j[enters])
        enter_values.append(exact[enters])
    lists = neighbours[:, :depth] + n_queries
    values = similarities[:, :depth].copy()
    enter_q, enter_j = np.concatenate(enter_q), np.concatenate(enter_j)
    if enter_j.size:
        taking = np.unique(enter_j)
        slot = np.searchsorted(taking, enter_j)
        exact = np.concatenate(enter_values)
        # candidates per row: its old list (self first, then in order) and the queries in
        row = np.concatenate([np.repeat(np.arange(len(taking)), depth), slot])
        ids = np.concatenate([lists[taking].ravel(), enter_q])
        sims = np.concatenate([values[taking].ravel(), exact])
        position = np.concatenate([np.tile(np.arange(depth), len(taking)),
                                   np.zeros(len(slot), np.int64)])
        not_self = np.concatenate([np.tile(np.arange(depth) > 0, len(taking)),
                                   np.ones(len(slot), bool)])
        # ties: queries (smaller ids) first, then the old list's own order
        tie = np.where(ids < n_queries, ids, n_queries + position)
        order = np.lexsort((tie, -sims, not_self, row))
        keep = order[_first_per_row(row[order], depth)]
        lists[taking] = ids[keep].reshape(len(taking), depth)
        values[taking] = sims[keep].reshape(len(taking), depth)
    return (np.vstack([np.concatenate(query_values), values]).astype(np.float32),
            np.vstack([np.concatenate(query_ids), lists]).astype(np.int64))

