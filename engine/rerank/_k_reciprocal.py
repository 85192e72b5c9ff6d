"""k-reciprocal re-ranking's private pipeline (Zhong et al. 2017): reciprocal expansion, Gaussian
encoding, local query expansion and Jaccard overlap, in numpy / scipy CSR and their torch twins.
Used by `k_reciprocal.py` only."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from engine.core import knn
from engine.core.knn import (
    NeighbourLists,
    reciprocal_mask,
    rows_per_chunk,
    squared_from_similarity,
    torch_reciprocal_mask,
)

ROW_CHUNK = 1024
PAIR_CHUNK = 65536  # pairs per step of the pair distances (a (chunk, d) float64 gather)


def half_neighbourhood(k1: int) -> int:
    """round(k1 / 2) with numpy's half-to-even rounding, as the reference code computes it."""
    return int(np.around(k1 / 2.0))


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
            row when already known (fit computes them once), else computed.
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
    # a chunk holds a few (rows, W, H) int64 arrays: bound them
    row_chunk = max(1, min(ROW_CHUNK, knn.EXPANSION_ELEMENTS // (4 * width * half_width)))
    row_ids, member_ids = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, len(rows), row_chunk):
        chunk = rows[start:start + row_chunk]
        forward = lists[chunk, :width]                                   # (r, W)
        reciprocal = (reciprocal_mask(lists, width, chunk) if masks is None
                      else masks[0][chunk])                              # (r, W)
        pairs = expansion_pairs(chunk, forward, reciprocal, lists[forward, :half_width],
                                candidate_half_masks[position[forward]], n)
        row_ids.append(pairs[0])
        member_ids.append(pairs[1])
    return np.concatenate(row_ids), np.concatenate(member_ids)


def expansion_pairs(rows: np.ndarray, forward: np.ndarray, reciprocal: np.ndarray,
                    candidate_half: np.ndarray, candidate_half_mask: np.ndarray, n: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """R*(i) of the given rows from their gathered neighbourhoods (see
    `k_reciprocal_expansion`): the online mode gathers them from patched lists.

    Args:
        rows: (r,) ascending node ids; forward: (r, W) their first k1 + 1 entries;
        reciprocal: (r, W) `reciprocal_mask` of those entries; candidate_half: (r, W, H) each
            entry's own first h + 1 entries, candidate_half_mask: (r, W, H) their masks.
        n: the number of nodes (ids are below it).
    Returns:
        (row_ids, member_ids) int64, each pair once, sorted by row then member.
    """
    local = np.arange(len(rows))
    # R(i, k1) per row, sorted, with a row offset: one searchsorted tests every membership
    members = np.sort(np.where(reciprocal, forward, -1), axis=1) + 1 + local[:, None] * (n + 1)
    flat = members.ravel()
    wanted = (candidate_half + 1 + local[:, None, None] * (n + 1)).reshape(len(rows), -1)
    found = np.searchsorted(flat, wanted).clip(max=max(len(flat) - 1, 0))
    in_set = (flat[found] == wanted).reshape(candidate_half.shape) if len(flat) else (
        np.zeros(candidate_half.shape, bool))                          # (r, W, H)
    overlap = (in_set & candidate_half_mask).sum(axis=2)               # (r, W)
    half_size = candidate_half_mask.sum(axis=2)
    selected = reciprocal & (overlap > (2.0 / 3.0) * half_size)
    expansion_mask = selected[..., None] & candidate_half_mask
    keys = np.concatenate([
        np.broadcast_to(rows[:, None], forward.shape)[reciprocal] * n + forward[reciprocal],
        np.broadcast_to(rows[:, None, None], candidate_half.shape)[expansion_mask] * n
        + candidate_half[expansion_mask]])
    keys = np.unique(keys)
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


def pair_squared_distances(features: np.ndarray, row_ids: np.ndarray, member_ids: np.ndarray,
                           lists: NeighbourLists | None = None) -> np.ndarray:
    """Squared distance (2 - 2 cos) of each (row, member) pair, self pairs exactly 0.

    Pairs whose member is in the row's neighbour list take the listed distance; only the rest
    are computed from the features (`canonical_pair_similarity`). In chunks of `PAIR_CHUNK`
    pairs, so a whole gallery's pairs need no (pairs, depth) gather at once.
    """
    result = np.empty(len(row_ids), np.float32)
    for start in range(0, len(row_ids), PAIR_CHUNK):
        rows, members = row_ids[start:start + PAIR_CHUNK], member_ids[start:start + PAIR_CHUNK]
        part = result[start:start + PAIR_CHUNK]
        missing = np.ones(len(rows), bool)
        if lists is not None:
            hits = lists.indices[rows] == members[:, None]
            found = hits.any(axis=1)
            part[found] = squared_from_similarity(
                lists.similarities[rows[found], hits[found].argmax(axis=1)])
            missing = ~found
        part[missing] = squared_from_similarity(
            canonical_pair_similarity(features, rows[missing], members[missing]))
    result[row_ids == member_ids] = 0.0
    return result


def canonical_pair_similarity(features: np.ndarray, rows: np.ndarray, columns: np.ndarray
                              ) -> np.ndarray:
    """(P,) float32 similarity of each pair of rows (features[rows[p]], features[columns[p]]):
    float64 accumulation, rounded once and capped at 1, as `knn.canonical_similarity`, from the
    float32 features in chunks (no float64 copy of the whole matrix)."""
    result = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        dots = np.einsum("ij,ij->i", features[rows[part]].astype(np.float64),
                         features[columns[part]].astype(np.float64))
        result[part] = np.minimum(dots, 1.0)
    return result


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
    for chunk in rows.split(rows_per_chunk(width * width)):
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
        step = rows_per_chunk(lists.indices.shape[1])
        for start in range(0, len(row_ids), step):
            rows, members = row_ids[start:start + step], member_ids[start:start + step]
            hits = lists.indices[rows] == members[:, None]
            found = hits.any(dim=1)
            position = hits.to(torch.uint8).argmax(dim=1)
            result[start:start + step] = listed[rows, position]
            missing[start:start + step] = ~found
    todo = torch.nonzero(missing).flatten()
    step = max(1024, knn.TORCH_CHUNK_ELEMENTS // (2 * features.shape[1]))
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
    step = rows_per_chunk(k2 * average_nnz)
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
                          max_pairs: int = knn.TORCH_CHUNK_ELEMENTS) -> torch.Tensor:
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
