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
EXPANSION_ELEMENTS = 1 << 25
"""Elements of one chunk's membership test in `k_reciprocal_expansion` (32 MiB of bools)."""
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


def squared_from_similarity(similarity: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Squared Euclidean distance of unit vectors, 2 - 2 cos, in float32, clipped at 0 (a
    tensor stays a tensor on its device)."""
    if isinstance(similarity, torch.Tensor):
        return (2.0 - 2.0 * similarity.float()).clamp(min=0.0)
    return np.maximum(np.float32(2.0) - np.float32(2.0) * similarity, np.float32(0.0))


@dataclass(frozen=True)
class NeighbourLists:
    """Neighbour lists of every node, most similar first (self first), and each row's farthest.

    indices: (n, depth) int64; similarities: (n, depth) float32 canonical similarities;
    farthest: (n,) float32 smallest similarity of each row over all n nodes. All numpy, or all
    torch tensors on one device (`torch_neighbour_lists`).
    """

    indices: np.ndarray | torch.Tensor
    similarities: np.ndarray | torch.Tensor
    farthest: np.ndarray | torch.Tensor

    @property
    def distances(self) -> np.ndarray | torch.Tensor:
        """(n, depth) squared distances 2 - 2 cos, ascending."""
        return squared_from_similarity(self.similarities)

    @property
    def row_max(self) -> np.ndarray | torch.Tensor:
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
    mask = np.empty((len(rows), width), dtype=bool)
    step = max(1, EXPANSION_ELEMENTS // (width * width))    # bounds the (r, width, width) test
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        mask[start:start + step] = (head[head[part]] == part[:, None, None]).any(axis=2)
    return mask


def k_reciprocal_expansion(lists: np.ndarray, k1: int, rows: np.ndarray | None = None,
                           masks: tuple[np.ndarray, np.ndarray] | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The expanded k-reciprocal set R*(i) of each row (Zhong et al. 2017, eqs. 3-6).

    R(i, k) = {j in N(i, k) : i in N(j, k)} with N(i, k) the first k + 1 list entries (self
    included). For each c in R(i, k1), R(c, h) with h = round(k1 / 2) is added when
    |R(c, h) & R(i, k1)| > 2/3 |R(c, h)|.

    Args:
        lists: (n, >= k1 + 1) ascending neighbour lists over all n nodes.
        rows: the rows to expand (default all).
        masks: `reciprocal_mask(lists, k1 + 1)` and `reciprocal_mask(lists, h + 1)` of every
            row when already known (an online query patches stored ones), else computed.
    Returns:
        (row_ids, member_ids): parallel int64 arrays listing each (row, member) pair once,
        sorted by row then member.
    """
    n = lists.shape[0]
    rows = np.arange(n) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    width, half_width = k1 + 1, half_neighbourhood(k1) + 1
    # R(c, h) of every candidate c once, not once per row listing c
    candidates = np.unique(lists[rows, :width])
    candidate_half_masks = (reciprocal_mask(lists, half_width, candidates) if masks is None
                            else masks[1][candidates])                   # (u, H)
    position = np.zeros(n, dtype=np.int64)
    position[candidates] = np.arange(len(candidates))
    # a chunk holds a few (rows, W, H) int64 arrays and a (rows, n) bool mask: bound them
    row_chunk = max(1, min(ROW_CHUNK, EXPANSION_ELEMENTS // (4 * width * half_width),
                           EXPANSION_ELEMENTS // n))
    keys = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(rows), row_chunk):
        chunk = rows[start:start + row_chunk]
        local = np.arange(len(chunk))
        forward = lists[chunk, :width]                                   # (r, W)
        reciprocal = (reciprocal_mask(lists, width, chunk) if masks is None
                      else masks[0][chunk])                              # (r, W)
        candidate_half = lists[forward, :half_width]                     # (r, W, H)
        candidate_half_mask = candidate_half_masks[position[forward]]    # (r, W, H)
        in_reciprocal = np.zeros((len(chunk), n), dtype=bool)            # R(i, k1) per row
        in_reciprocal[np.broadcast_to(local[:, None], forward.shape)[reciprocal],
                      forward[reciprocal]] = True
        in_set = in_reciprocal[local[:, None, None], candidate_half]     # (r, W, H)
        overlap = (in_set & candidate_half_mask).sum(axis=2)             # (r, W)
        half_size = candidate_half_mask.sum(axis=2)
        selected = reciprocal & (overlap > (2.0 / 3.0) * half_size)
        expansion_mask = selected[..., None] & candidate_half_mask
        chunk_rows = np.broadcast_to(chunk[:, None], forward.shape)
        chunk_keys = [chunk_rows[reciprocal] * n + forward[reciprocal],
                      np.broadcast_to(chunk[:, None, None], candidate_half.shape)[expansion_mask]
                      * n + candidate_half[expansion_mask]]
        keys.append(np.unique(np.concatenate(chunk_keys)))  # rows ascend: chunks stay sorted
    keys = np.concatenate(keys)
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


def jaccard_distance(overlap: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """d_J = 1 - m / (2 - m) for rows of V that each sum to 1 (so sum max = 2 - sum min); a
    tensor stays a tensor."""
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

    Every node leads its own list, at similarity exactly 1: an exact duplicate (similarity 1
    too) follows it, whatever their indices; other ties go to the smaller index.

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
        refined[candidates == row_ids[:, None]] = torch.inf  # self first (1 after the choice)
        values, order = torch_topk_largest(refined, k, margin=width)
        order = candidates.gather(1, order)
        if width < n:
            # Rows whose weakest candidate comes within float32 error of the k-th value may
            # have tied or misordered items outside the candidates: redo them exactly.
            unsafe = refined.min(dim=1).values >= values[:, k - 1] - FLOAT32_SLACK
            if unsafe.any():
                redo = torch.nonzero(unsafe).flatten()
                exact = torch_canonical_similarity(rows[redo], features)
                exact[torch.arange(redo.shape[0]), row_ids[redo]] = torch.inf
                values[redo], order[redo] = torch_topk_largest(exact, k)
        similarities.append(values.clamp(max=1.0))
        indices.append(order)
    return torch.cat(similarities), torch.cat(indices)


def lists_with_query(neighbours: torch.Tensor, similarities: torch.Tensor,
                     to_query: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN lists of (query + gallery) from the gallery's own lists, without recomputing them.

    Node 0 is the query, gallery item j is node j + 1. The query's list is itself then its most
    similar gallery items; each gallery list gets the query inserted where it sorts (before
    equal similarities, as node 0 has the smallest id, but after the item itself, which leads
    its list even when the query duplicates it) and loses its last entry: exactly the lists a
    batch run over query + gallery builds.

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
    position = (similarities > to_query[:, None]).sum(dim=1, keepdim=True).clamp(min=1)
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


# ---------------------------------------------------------------------------------------------
# torch twins of the k-reciprocal pipeline (any device; the CUDA path of k-reciprocal re-ranking)
#
# Same numbers as the numpy/scipy functions above, vectorised over rows and chunked so that no
# intermediate grows past about TORCH_CHUNK_ELEMENTS elements. Encodings are torch sparse CSR
# tensors (the inverted index of a target set a sparse CSC tensor), never N x N dense matrices.

TORCH_CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(per_row: int) -> int:
    return max(1, TORCH_CHUNK_ELEMENTS // max(1, per_row))


def torch_neighbour_lists(features: torch.Tensor, depth: int) -> NeighbourLists:
    """Torch twin of `neighbour_lists` (the same lists, ties and farthest similarities as
    `knn_graph`), computed and kept on the features' device. features: (n, d) float32."""
    similarities, indices = torch_topk_similar(features, min(depth, features.shape[0]))
    return NeighbourLists(indices, similarities, torch_farthest_similarity(features))


def torch_reciprocal_mask(lists: torch.Tensor, width: int, rows: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Torch twin of `reciprocal_mask`: (len(rows), width) bool, mask[r, a] = True when node
    lists[r, a] has node r among its first `width` entries."""
    if rows is None:
        rows = torch.arange(lists.shape[0], device=lists.device)
    head = lists[:, :width]
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=lists.device)
    step = _rows_per_chunk(width * width)
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        mask[start:start + step] = (head[head[part]] == part[:, None, None]).any(dim=2)
    return mask


def torch_k_reciprocal_expansion(lists: torch.Tensor, k1: int, rows: torch.Tensor | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `k_reciprocal_expansion`: the expanded sets R*(i) as (row, member) pairs.

    Args:
        lists: (n, >= k1 + 1) int64 ascending neighbour lists over all n nodes.
        rows: the rows to expand (default all).
    Returns:
        (row_ids, member_ids): parallel int64 tensors listing each (row, member) pair once,
        sorted by row then member (exactly the numpy function's pairs).
    """
    n, device = lists.shape[0], lists.device
    rows = torch.arange(n, device=device) if rows is None else rows.to(device, torch.int64)
    width, half_width = k1 + 1, half_neighbourhood(k1) + 1
    head, half_head = lists[:, :width], lists[:, :half_width]
    half_mask = torch_reciprocal_mask(lists, half_width)                  # (n, H) all nodes
    keys = []
    for chunk in rows.split(_rows_per_chunk(width * width)):
        forward = head[chunk]                                            # (r, W)
        reciprocal = torch_reciprocal_mask(lists, width, chunk)          # (r, W)
        candidate_half = half_head[forward]                              # (r, W, H)
        candidate_half_mask = half_mask[forward]
        members = torch.where(reciprocal, forward, -1).sort(dim=1).values  # R(i, k1), sorted
        flat = candidate_half.reshape(len(chunk), -1)
        found = torch.searchsorted(members, flat).clamp(max=width - 1)
        in_set = (members.gather(1, found) == flat).reshape(candidate_half.shape)
        overlap = (in_set & candidate_half_mask).sum(dim=2)
        half_size = candidate_half_mask.sum(dim=2)
        # float64 as numpy computes it, so the 2/3 boundary falls identically
        selected = reciprocal & (overlap.double() > (2.0 / 3.0) * half_size.double())
        expansion_mask = selected[..., None] & candidate_half_mask
        chunk_keys = torch.cat([
            chunk[:, None].expand_as(forward)[reciprocal] * n + forward[reciprocal],
            chunk[:, None, None].expand_as(candidate_half)[expansion_mask] * n
            + candidate_half[expansion_mask]])
        keys.append(torch.unique(chunk_keys))
    keys = torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.int64,
                                                                   device=device)
    return keys // n, keys % n


def torch_pair_squared_distances(features: torch.Tensor, row_ids: torch.Tensor,
                                 member_ids: torch.Tensor,
                                 lists: NeighbourLists | None = None) -> torch.Tensor:
    """Torch twin of `pair_squared_distances`: (P,) float32 squared distances of the pairs,
    the listed distance where the member is in the row's list, canonical products for the rest
    (float64 accumulation, see `torch_canonical_similarity`), self pairs exactly 0."""
    result = torch.empty(len(row_ids), dtype=torch.float32, device=features.device)
    missing = torch.ones(len(row_ids), dtype=torch.bool, device=features.device)
    if lists is not None:
        listed = lists.distances
        step = _rows_per_chunk(lists.indices.shape[1])
        for start in range(0, len(row_ids), step):
            rows, members = row_ids[start:start + step], member_ids[start:start + step]
            hits = lists.indices[rows] == members[:, None]
            found = hits.any(dim=1)
            position = hits.to(torch.uint8).argmax(dim=1)
            result[start:start + step] = listed[rows, position]
            missing[start:start + step] = ~found
    todo = torch.nonzero(missing).flatten()
    step = max(1024, TORCH_CHUNK_ELEMENTS // (2 * features.shape[1]))
    for part in todo.split(step):
        dots = (features[row_ids[part]].double() * features[member_ids[part]].double()
                ).sum(dim=1).clamp(max=1.0).float()
        result[part] = squared_from_similarity(dots)
    result[row_ids == member_ids] = 0.0
    return result


def torch_k_reciprocal_encoding(row_ids: torch.Tensor, member_ids: torch.Tensor,
                                squared_distance: torch.Tensor, row_max: torch.Tensor,
                                n_rows: int, n_columns: int) -> torch.Tensor:
    """Torch twin of `k_reciprocal_encoding`: V as a (n_rows, n_columns) float32 sparse CSR
    tensor whose rows sum to 1 (rows without pairs are empty).

    Args:
        row_ids, member_ids: (row, member) pairs of R*, each pair at most once (as from
            `torch_k_reciprocal_expansion`).
        squared_distance: (P,) float32 squared distance of each pair.
        row_max: per-row maximum squared distance, indexed by row id.
    """
    normaliser = torch.where(row_max > 0, row_max, 1.0)  # all-identical rows: d' = 0
    weights = torch.exp(-(squared_distance / normaliser[row_ids]))
    totals = torch.zeros(n_rows, dtype=torch.float64, device=weights.device)
    totals.index_add_(0, row_ids, weights.double())  # float64 sums, as np.bincount
    values = (weights.double() / totals[row_ids]).float()
    order = torch.argsort(row_ids * n_columns + member_ids)
    return _csr(row_ids[order], member_ids[order], values[order], (n_rows, n_columns))


def _csr(row_ids: torch.Tensor, column_ids: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR tensor from triplets sorted by (row, column), each position once."""
    counts = torch.bincount(row_ids, minlength=shape[0])
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=values.device)
    crow[1:] = counts.cumsum(0)
    return torch.sparse_csr_tensor(crow, column_ids, values, shape, check_invariants=False)


def _csr_triplets(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_ids, column_ids, values) of a sparse CSR tensor, in storage order."""
    crow = matrix.crow_indices()
    rows = torch.arange(matrix.shape[0], device=crow.device).repeat_interleave(crow.diff())
    return rows, matrix.col_indices(), matrix.values()


def _segments(starts: torch.Tensor, lengths: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """For segments [starts[s], starts[s] + lengths[s]): (segment id, position) of every item."""
    total = int(lengths.sum())
    segment = torch.arange(len(lengths), device=lengths.device).repeat_interleave(
        lengths, output_size=total)
    first = lengths.cumsum(0) - lengths
    positions = torch.arange(total, device=lengths.device) - first[segment] + starts[segment]
    return segment, positions


def torch_csr_rows(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (any order, repeats allowed) of a sparse CSR tensor, as a sparse CSR tensor."""
    crow = matrix.crow_indices()
    rows = rows.to(crow.device, torch.int64)
    lengths = crow[rows + 1] - crow[rows]
    segment, positions = _segments(crow[rows], lengths)
    return _csr(segment, matrix.col_indices()[positions], matrix.values()[positions],
                (len(rows), matrix.shape[1]))


def torch_csc(matrix: torch.Tensor) -> torch.Tensor:
    """The same (n_rows, n_columns) matrix as a sparse CSC tensor (rows sorted in each column):
    the inverted index `torch_jaccard_overlap` walks."""
    rows, columns, values = _csr_triplets(matrix)
    n_rows, n_columns = matrix.shape
    order = torch.argsort(columns * n_rows + rows)
    counts = torch.bincount(columns, minlength=n_columns)
    ccol = torch.zeros(n_columns + 1, dtype=torch.int64, device=values.device)
    ccol[1:] = counts.cumsum(0)
    return torch.sparse_csc_tensor(ccol, rows[order], values[order], (n_rows, n_columns),
                                   check_invariants=False)


def torch_local_query_expansion(encoding: torch.Tensor, lists: torch.Tensor, k2: int,
                                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of `local_query_expansion`: V_qe[i] = mean of V[m] over the first k2 entries
    m of i's list, as a sparse CSR tensor with one row per entry of `rows` (default all).

    Gathers the nonzeros of the k2 source rows of each output row and sums them by
    (output row, column) key; products in float32 as scipy's, sums in float64.
    """
    rows = (torch.arange(lists.shape[0], device=lists.device) if rows is None
            else rows.to(lists.device, torch.int64))
    if k2 <= 1:
        return torch_csr_rows(encoding, rows)
    crow, columns, values = encoding.crow_indices(), encoding.col_indices(), encoding.values()
    n_columns = encoding.shape[1]
    weight = torch.tensor(1.0 / k2, dtype=torch.float32, device=values.device)
    row_lengths = crow.diff()
    average_nnz = max(1, int(row_lengths.float().mean().ceil()) if len(row_lengths) else 1)
    parts_rows, parts_columns, parts_values = [], [], []
    step = _rows_per_chunk(k2 * average_nnz)
    for start in range(0, len(rows), step):
        sources = lists[rows[start:start + step], :k2].reshape(-1)
        segment, positions = _segments(crow[sources], row_lengths[sources])
        keys = (segment // k2 + start) * n_columns + columns[positions]
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(len(unique), dtype=torch.float64, device=values.device)
        sums.index_add_(0, inverse, (values[positions] * weight).double())
        parts_rows.append(unique // n_columns)
        parts_columns.append(unique % n_columns)
        parts_values.append(sums.float())
    if not parts_rows:
        return torch_csr_rows(encoding, rows)  # no rows: an empty matrix
    return _csr(torch.cat(parts_rows), torch.cat(parts_columns), torch.cat(parts_values),
                (len(rows), n_columns))


def torch_jaccard_overlap(query_rows: torch.Tensor, target_columns: torch.Tensor,
                          max_pairs: int = TORCH_CHUNK_ELEMENTS) -> torch.Tensor:
    """Torch twin of `jaccard_overlap`: sum_l min(Q[i, l], T[j, l]) for every query row i and
    target row j, by the inverted index of T (each query entry meets the postings of its
    column), accumulated with `index_add_` into the dense block.

    Args:
        query_rows: (nq, n) sparse CSR; target_columns: (nt, n) sparse CSC (`torch_csc`).
        max_pairs: bound on the (query entry, posting) pairs held at once.
    Returns:
        (nq, nt) float32 overlap on the inputs' device (sums in float64, as np.bincount).
    """
    n_queries, n_targets = query_rows.shape[0], target_columns.shape[0]
    device = query_rows.values().device
    overlap = torch.zeros((n_queries, n_targets), dtype=torch.float32, device=device)
    query_row_ids, query_columns, query_values = _csr_triplets(query_rows)
    ccol, postings, posting_values = (target_columns.ccol_indices(),
                                      target_columns.row_indices(), target_columns.values())
    column_lengths = ccol.diff()
    pair_counts = column_lengths[query_columns]                       # per query entry
    per_row = torch.zeros(n_queries, dtype=torch.int64, device=device)
    per_row.index_add_(0, query_row_ids, pair_counts)
    # row groups of at most max_pairs pairs (or one row) and of at most max_pairs cells
    per_row = per_row.cpu().numpy()
    crow = query_rows.crow_indices().cpu().numpy()
    cell_rows = max(1, max_pairs // max(1, n_targets))
    start = 0
    while start < n_queries:
        budget = np.cumsum(per_row[start:start + cell_rows])
        stop = start + max(1, int(np.searchsorted(budget, max_pairs, side="right")))
        entries = slice(int(crow[start]), int(crow[stop]))
        lengths = pair_counts[entries]
        entry, positions = _segments(ccol[query_columns[entries]], lengths)
        if len(positions):
            minima = torch.minimum(query_values[entries][entry], posting_values[positions])
            keys = (query_row_ids[entries][entry] - start) * n_targets + postings[positions]
            sums = torch.zeros((stop - start) * n_targets, dtype=torch.float64, device=device)
            sums.index_add_(0, keys, minima.double())
            overlap[start:stop] = sums.view(stop - start, n_targets).float()
        start = stop
    return overlap
