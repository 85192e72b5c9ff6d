"""Pure functions shared by the re-rankers: kNN lists, k-reciprocal sets, Jaccard, top-k.

Everything here is vectorised over rows and bounded by the neighbourhood sizes (never an N x N
dense matrix): neighbour lists are (n, K) arrays and encodings are scipy CSR matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from engine.rerank.base import KnnGraph

ROW_CHUNK = 1024
REFINE_CHUNK = 256
FLOAT32_SLACK = 1e-5  # bound on float32 inner-product error for unit vectors


def top_k_smallest(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k smallest entries, ascending, ties broken by the smaller column index.

    Deterministic even with exact ties at the k-th value (duplicate images give those), so two
    code paths that see the same numbers pick the same neighbours.

    Args:
        values: (n, m) float.
    Returns:
        indices (n, k) int64 and the values (n, k) at them.
    """
    n, m = values.shape
    if k >= m:
        indices = np.argsort(values, axis=1, kind="stable")[:, :k]
    else:
        threshold = np.partition(values, k - 1, axis=1)[:, k - 1]
        rows, columns = np.nonzero(values <= threshold[:, None])  # >= k per row, col-sorted
        order = np.lexsort((columns, values[rows, columns], rows))
        rows, columns = rows[order], columns[order]
        starts = np.searchsorted(rows, np.arange(n))
        rank_in_row = np.arange(rows.size) - starts[rows]
        keep = rank_in_row < k
        indices = columns[keep].reshape(n, k)
    return indices.astype(np.int64), np.take_along_axis(values, indices, axis=1)


def canonical_similarity(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Inner products accumulated in float64, rounded to float32 and capped at 1.

    Float32 products depend on the BLAS path (matrix-vector vs matrix-matrix, block edges), so
    two exact duplicates, or one pair computed in a batch and again online, can differ in the
    last bit and flip a tie. Rounding a float64 result to float32 gives the same value for the
    same pair whichever way it was computed (barring a one-in-a-billion rounding boundary).
    Every similarity that decides a neighbour list comes from here or its torch twin.

    Returns (len(rows), len(columns)) float32.
    """
    product = np.asarray(rows, np.float64) @ np.asarray(columns, np.float64).T
    return np.minimum(product, 1.0).astype(np.float32)


def squared_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of unit vectors, 2 - 2 cos, in float32, clipped at 0."""
    return np.maximum(np.float32(2.0) - np.float32(2.0) * similarity, np.float32(0.0))


@dataclass(frozen=True)
class NeighbourLists:
    """Neighbour lists of every node, most similar first (self first), and each row's farthest.

    indices: (n, depth) int64; similarities: (n, depth) float32 canonical similarities;
    farthest: (n,) float32 smallest similarity of each row over all n nodes.
    """

    indices: np.ndarray
    similarities: np.ndarray
    farthest: np.ndarray

    @property
    def distances(self) -> np.ndarray:
        """(n, depth) squared distances 2 - 2 cos, ascending."""
        return squared_from_similarity(self.similarities)

    @property
    def row_max(self) -> np.ndarray:
        """(n,) largest squared distance of each row (the k-reciprocal normaliser)."""
        return squared_from_similarity(self.farthest)

    @classmethod
    def from_graph(cls, graph: KnnGraph, depth: int) -> NeighbourLists:
        return cls(graph.indices[:, :depth], graph.similarities[:, :depth], graph.farthest)


def knn_graph(features: np.ndarray, depth: int, device: str | torch.device = "cpu"
              ) -> KnnGraph:
    """The exact kNN graph of `features` with canonical similarities (see `torch_topk_similar`).

    Shared by the gallery cache, the plots and every re-ranker, so they all see the same lists.
    Returns a KnnGraph of depth min(depth, n) with each row's farthest similarity.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
    similarities, indices = torch_topk_similar(tensor, min(depth, tensor.shape[0]))
    farthest = torch_farthest_similarity(tensor)
    return KnnGraph(indices=indices.cpu().numpy(), similarities=similarities.cpu().numpy(),
                    farthest=farthest.cpu().numpy(), canonical=True)


def neighbour_lists(features: np.ndarray, depth: int) -> NeighbourLists:
    """Exact neighbour lists over all rows of `features` (see `knn_graph`)."""
    return NeighbourLists.from_graph(knn_graph(features, depth), depth)


def half_neighbourhood(k1: int) -> int:
    """round(k1 / 2) with numpy's half-to-even rounding, as the reference code computes it."""
    return int(np.around(k1 / 2.0))


def reciprocal_mask(lists: np.ndarray, width: int, rows: np.ndarray | None = None) -> np.ndarray:
    """mask[r, a] = True when node lists[r, a] has node r among its first `width` entries.

    lists: (n, >= width) neighbour lists; rows: which rows to evaluate (default all).
    Returns (len(rows), width) bool.
    """
    rows = np.arange(lists.shape[0]) if rows is None else rows
    head = lists[:, :width]
    candidates = head[rows]                                  # (r, width)
    return (head[candidates] == rows[:, None, None]).any(axis=2)


def k_reciprocal_expansion(lists: np.ndarray, k1: int, rows: np.ndarray | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The expanded k-reciprocal set R*(i) of each row (Zhong et al. 2017, eqs. 3-6).

    R(i, k) = {j in N(i, k) : i in N(j, k)} with N(i, k) the first k + 1 list entries (self
    included). For each c in R(i, k1), R(c, h) with h = round(k1 / 2) is added when
    |R(c, h) & R(i, k1)| > 2/3 |R(c, h)|.

    Args:
        lists: (n, >= k1 + 1) ascending neighbour lists over all n nodes.
        rows: the rows to expand (default all).
    Returns:
        (row_ids, member_ids): parallel int64 arrays listing each (row, member) pair once,
        sorted by row then member.
    """
    n = lists.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    width, half_width = k1 + 1, half_neighbourhood(k1) + 1
    row_parts, member_parts = [], []
    for start in range(0, len(rows), ROW_CHUNK):
        chunk = rows[start:start + ROW_CHUNK]
        forward = lists[chunk, :width]                                   # (r, W)
        reciprocal = reciprocal_mask(lists, width, chunk)                # (r, W)
        candidate_half = lists[forward, :half_width]                     # (r, W, H)
        candidate_half_mask = reciprocal_mask(lists, half_width, forward.ravel()
                                              ).reshape(candidate_half.shape)
        members = np.where(reciprocal, forward, -1)                      # R(i, k1), -1 padded
        in_set = (candidate_half[..., None] == members[:, None, None, :]).any(axis=3)
        overlap = (in_set & candidate_half_mask).sum(axis=2)             # (r, W)
        half_size = candidate_half_mask.sum(axis=2)
        selected = reciprocal & (overlap > (2.0 / 3.0) * half_size)
        expansion_mask = selected[..., None] & candidate_half_mask
        chunk_rows = np.broadcast_to(chunk[:, None], forward.shape)
        row_parts += [chunk_rows[reciprocal],
                      np.broadcast_to(chunk[:, None, None], candidate_half.shape)[expansion_mask]]
        member_parts += [forward[reciprocal], candidate_half[expansion_mask]]
    keys = np.unique(np.concatenate(row_parts) * n + np.concatenate(member_parts))
    return keys // n, keys % n


def k_reciprocal_encoding(row_ids: np.ndarray, member_ids: np.ndarray,
                          squared_distance: np.ndarray, row_max: np.ndarray, n_rows: int,
                          n_columns: int) -> sp.csr_matrix:
    """V[i, j] = exp(-d'(i, j)) / sum_{m in R*(i)} exp(-d'(i, m)) for j in R*(i), else 0.

    d'(i, j) = d(i, j)^2 / max_m d(i, m)^2 (the reference's row normalisation).

    Args:
        row_ids, member_ids: (row, member) pairs of R*, as from `k_reciprocal_expansion`.
        squared_distance: (len(row_ids),) squared distance of each pair.
        row_max: per-row maximum squared distance, indexed by row id.
    Returns:
        (n_rows, n_columns) CSR float32 whose rows sum to 1 (rows without pairs are empty).
    """
    normaliser = np.where(row_max > 0, row_max, np.float32(1.0))  # all-identical rows: d' = 0
    weights = np.exp(-(squared_distance / normaliser[row_ids]).astype(np.float32))
    totals = np.bincount(row_ids, weights=weights, minlength=n_rows)
    values = (weights / totals[row_ids]).astype(np.float32)
    return sp.csr_matrix((values, (row_ids, member_ids)), shape=(n_rows, n_columns))


def local_query_expansion(encoding: sp.csr_matrix, lists: np.ndarray, k2: int,
                          rows: np.ndarray | None = None) -> sp.csr_matrix:
    """V_qe[i] = mean of V[m] over the first k2 entries m of i's list (self included).

    Returns a CSR with one row per entry of `rows` (default all rows of `lists`).
    """
    rows = np.arange(lists.shape[0]) if rows is None else rows
    if k2 <= 1:
        return encoding[rows]
    averaging = sp.csr_matrix(
        (np.full(len(rows) * k2, 1.0 / k2, np.float32),
         (np.repeat(np.arange(len(rows)), k2), lists[rows, :k2].ravel())),
        shape=(len(rows), encoding.shape[0]))
    return (averaging @ encoding).tocsr()


def jaccard_overlap(query_rows: sp.csr_matrix, target_columns: sp.csc_matrix,
                    chunk: int = 256) -> np.ndarray:
    """sum_l min(Q[i, l], T[j, l]) for every query row i and target row j.

    Uses the inverted index of T (its CSC form): the cost is the number of (query entry,
    posting) pairs, not n_queries x n_targets x n_columns.

    Args:
        query_rows: (nq, n) CSR; target_columns: (nt, n) CSC.
    Returns:
        (nq, nt) float32 overlap (dense: each row is one query's full ranking input).
    """
    n_queries, n_targets = query_rows.shape[0], target_columns.shape[0]
    overlap = np.zeros((n_queries, n_targets), np.float32)
    column_starts, column_ends = target_columns.indptr[:-1], target_columns.indptr[1:]
    for start in range(0, n_queries, chunk):
        block = query_rows[start:start + chunk].tocoo()
        lengths = column_ends[block.col] - column_starts[block.col]
        total = int(lengths.sum())
        if total == 0:
            continue
        entry = np.repeat(np.arange(block.nnz), lengths)
        offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = column_starts[block.col][entry] + offsets
        minima = np.minimum(block.data[entry], target_columns.data[positions])
        keys = block.row[entry].astype(np.int64) * n_targets + target_columns.indices[positions]
        sums = np.bincount(keys, weights=minima, minlength=min(chunk, n_queries - start)
                           * n_targets)
        overlap[start:start + chunk] = sums.reshape(-1, n_targets)
    return overlap


def jaccard_distance(overlap: np.ndarray) -> np.ndarray:
    """d_J = 1 - m / (2 - m) for rows of V that each sum to 1 (so sum max = 2 - sum min)."""
    return 1.0 - overlap / (2.0 - overlap)


# ---------------------------------------------------------------------------------------------
# torch helpers for graph propagation (GNN re-ranking)


def torch_topk_largest(scores: torch.Tensor, k: int, margin: int = 8
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest entries, descending, ties broken by the smaller column index.

    torch.topk orders ties arbitrarily; duplicate images make exact ties, and two code paths
    must pick the same neighbours. Takes k + margin candidates, orders them by (value desc,
    index asc), and falls back to a full stable sort for rows whose ties reach past them.
    """
    m = scores.shape[1]
    width = min(k + margin, m)
    values, order = scores.topk(width, dim=1, largest=True, sorted=True)
    by_index = order.sort(dim=1, stable=True)
    values = values.gather(1, by_index.indices)
    order = by_index.values
    resorted = values.sort(dim=1, descending=True, stable=True)
    values, order = resorted.values, order.gather(1, resorted.indices)
    if width < m:
        unsafe = values[:, width - 1] >= values[:, k - 1]  # a tie may continue past width
        if unsafe.any():
            rows = torch.nonzero(unsafe).flatten()
            full = scores[rows].sort(dim=1, descending=True, stable=True)
            values[rows], order[rows] = full.values[:, :width], full.indices[:, :width]
    return values[:, :k], order[:, :k]


def torch_canonical_similarity(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Torch twin of `canonical_similarity`: float64 accumulation, float32, capped at 1."""
    return (rows.double() @ columns.double().T).clamp(max=1.0).float()


def _flat_index(features: torch.Tensor):
    """A faiss exact inner-product index over CPU features (None on other devices)."""
    if features.device.type != "cpu":
        return None
    import faiss

    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features.contiguous().numpy())
    return index


def torch_farthest_similarity(features: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Each row's smallest canonical similarity to any row: (n,) float32."""
    index = _flat_index(features)
    farthest = []
    for start in range(0, features.shape[0], chunk):
        rows = features[start:start + chunk]
        if index is not None:
            _, found = index.search(-rows.contiguous().numpy(), 1)
            candidate = torch.from_numpy(found[:, 0])
        else:
            candidate = (rows @ features.T).argmin(dim=1)
        farthest.append((rows.double() * features[candidate].double()).sum(dim=1)
                        .clamp(max=1.0).float())
    return torch.cat(farthest)


def torch_topk_similar(features: torch.Tensor, k: int, chunk: int = 2048, margin: int = 8
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of every row against all rows (self included), in row chunks.

    A float32 pass proposes k + margin candidates per row; their similarities are recomputed
    canonically (`torch_canonical_similarity`) and the top k chosen from those, with ties
    broken by index, so duplicates and online/batch runs agree exactly.

    A node's similarity to itself is exactly 1, so it leads its own list (an exact duplicate
    ties with it and follows by index order).

    Returns (similarities (n, k) descending, indices (n, k) int64) on the features' device.
    """
    n = features.shape[0]
    width = min(k + margin, n)
    index = _flat_index(features)
    features64 = features.double()
    similarities, indices = [], []
    for start in range(0, n, chunk):
        rows = features[start:start + chunk]
        if index is not None:  # faiss: BLAS + a heap in C++, much faster than torch on a CPU
            _, found = index.search(rows.numpy(), width)
            candidates = torch.from_numpy(found)
        else:
            _, candidates = (rows @ features.T).topk(width, dim=1, largest=True, sorted=False)
        candidates = candidates.sort(dim=1).values  # position order = node order, for ties
        rows64 = features64[start:start + chunk]
        refined = torch.cat([  # gathers of (rows, width, d) float64, kept to ~100 MB
            torch.bmm(features64[candidates[part:part + REFINE_CHUNK]],
                      rows64[part:part + REFINE_CHUNK, :, None])[:, :, 0]
            for part in range(0, candidates.shape[0], REFINE_CHUNK)]).clamp(max=1.0).float()
        row_ids = torch.arange(start, start + rows.shape[0], device=features.device)
        refined[candidates == row_ids[:, None]] = 1.0
        values, order = torch_topk_largest(refined, k, margin=width)
        order = candidates.gather(1, order)
        if width < n:
            # Rows whose weakest candidate comes within float32 error of the k-th value may
            # have tied or misordered items outside the candidates: redo them exactly.
            unsafe = refined.min(dim=1).values >= values[:, k - 1] - FLOAT32_SLACK
            if unsafe.any():
                redo = torch.nonzero(unsafe).flatten()
                exact = torch_canonical_similarity(rows[redo], features)
                exact[torch.arange(redo.shape[0]), row_ids[redo]] = 1.0
                values[redo], order[redo] = torch_topk_largest(exact, k)
        similarities.append(values)
        indices.append(order)
    return torch.cat(similarities), torch.cat(indices)


def lists_with_query(neighbours: torch.Tensor, similarities: torch.Tensor,
                     to_query: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN lists of (query + gallery) from the gallery's own lists, without recomputing them.

    Node 0 is the query, gallery item j is node j + 1. The query's list is itself then its most
    similar gallery items; each gallery list gets the query inserted where it sorts (before
    equal similarities, as node 0 has the smallest id) and loses its last entry: exactly the
    lists a batch run over query + gallery builds.

    Args:
        neighbours, similarities: (G, >= depth - 1) gallery lists (self first), descending.
        to_query: (G,) canonical similarity of each gallery item to the query.
    Returns:
        (G + 1, depth) node ids and similarities.
    """
    size = neighbours.shape[0]
    neighbours, similarities = neighbours[:, :depth] + 1, similarities[:, :depth]
    if neighbours.shape[1] < depth:  # every gallery item is listed: leave one free slot
        neighbours = torch.nn.functional.pad(neighbours, (0, 1), value=-1)
        similarities = torch.nn.functional.pad(similarities, (0, 1), value=-torch.inf)
    position = (similarities > to_query[:, None]).sum(dim=1, keepdim=True)
    columns = torch.arange(depth, device=neighbours.device)[None, :]
    after, inserted = columns > position, columns == position
    neighbours = torch.where(inserted, 0, torch.where(after, neighbours.roll(1, 1), neighbours))
    similarities = torch.where(inserted, to_query[:, None].expand(size, depth),
                               torch.where(after, similarities.roll(1, 1), similarities))
    query_similarities, query_order = torch_topk_largest(to_query[None, :], depth - 1)
    query_row = torch.cat([torch.zeros(1, dtype=neighbours.dtype, device=neighbours.device),
                           query_order[0] + 1])
    query_row_similarities = torch.cat([torch.ones(1, dtype=similarities.dtype,
                                                   device=similarities.device),
                                        query_similarities[0]])
    return (torch.cat([query_row[None, :], neighbours]),
            torch.cat([query_row_similarities[None, :], similarities]))


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


def pair_squared_distances(features: np.ndarray, row_ids: np.ndarray, member_ids: np.ndarray,
                           lists: NeighbourLists | None = None) -> np.ndarray:
    """Squared distance (2 - 2 cos) of each (row, member) pair, self pairs exactly 0.

    Pairs whose member is in the row's neighbour list take the listed distance; only the rest
    are computed from the features.
    """
    result = np.empty(len(row_ids), np.float32)
    missing = np.ones(len(row_ids), bool)
    if lists is not None:
        hits = lists.indices[row_ids] == member_ids[:, None]
        found = hits.any(axis=1)
        result[found] = lists.distances[row_ids[found], hits[found].argmax(axis=1)]
        missing = ~found
    rows, members = row_ids[missing], member_ids[missing]
    for start in range(0, len(rows), 65536):
        part = slice(start, start + 65536)
        dots = np.minimum(np.einsum("ij,ij->i", features[rows[part]].astype(np.float64),
                                    features[members[part]].astype(np.float64)), 1.0
                          ).astype(np.float32)
        result[np.flatnonzero(missing)[part]] = squared_from_similarity(dots)
    result[row_ids == member_ids] = 0.0
    return result
