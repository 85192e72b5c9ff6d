"""kNN primitives every concept shares: exact top-k with deterministic ties, canonical
similarities, neighbour lists and reciprocal masks, in numpy and their torch twins.

Conventions: features are float32 L2-normalised rows, similarity is the inner product, and a
function returning a pair returns faiss's order, (values, indices). Everything is vectorised
over rows and bounded by the neighbourhood sizes (never an N x N dense matrix).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.core.types import KnnGraph

EXPANSION_ELEMENTS = 1 << 25
"""Elements of one chunk of a reciprocal-membership test (32 MiB of bools): `reciprocal_mask`
and k-reciprocal's expansion."""
REFINE_CHUNK = 256

FLOAT32_SLACK = 1e-5  # bound on float32 inner-product error for unit vectors


def top_k_smallest(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k smallest entries, ascending, ties broken by the smaller column index.

    Deterministic even with exact ties at the k-th value (duplicate images give those), so two
    code paths that see the same numbers pick the same neighbours.

    Args:
        values: (n, m) float.
    Returns:
        the values (n, k) and their column indices (n, k) int64 (faiss's order).
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
    return np.take_along_axis(values, indices, axis=1), indices.astype(np.int64)


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


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory, for reading only. A memory-mapped features file is
    read-only; torch warns about that (it cannot mark a tensor read-only), and copying it
    would double the memory of a large gallery. Nothing here writes to it."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def device_tensor(array: np.ndarray, device: torch.device, dtype: np.typing.DTypeLike = None
                  ) -> torch.Tensor:
    """`array` (contiguous, of `dtype` when given) as a tensor on `device`: a copy there, or
    on the CPU the array's own memory (`read_only_tensor`: a memory-mapped gallery too)."""
    return read_only_tensor(np.ascontiguousarray(array, dtype)).to(device)


def knn_graph(features: np.ndarray, depth: int, device: str | torch.device = "cpu"
              ) -> KnnGraph:
    """The exact kNN graph of `features` with canonical similarities (see `torch_topk_similar`).

    Shared by the gallery cache, the plots and every re-ranker, so they all see the same lists.
    Returns a KnnGraph of depth min(depth, n) with each row's farthest similarity.
    """
    tensor = read_only_tensor(np.ascontiguousarray(features, np.float32)).to(device)
    similarities, indices = torch_topk_similar(tensor, min(depth, tensor.shape[0]))
    farthest = torch_farthest_similarity(tensor)
    return KnnGraph(indices=indices.cpu().numpy(), similarities=similarities.cpu().numpy(),
                    farthest=farthest.cpu().numpy(), canonical=True)


def neighbour_lists(features: np.ndarray, depth: int) -> NeighbourLists:
    """Exact neighbour lists over all rows of `features` (see `knn_graph`)."""
    return NeighbourLists.from_graph(knn_graph(features, depth), depth)


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


def lists_with_query(similarities: torch.Tensor, neighbours: torch.Tensor,
                     to_query: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN lists of (query + gallery) from the gallery's own lists, without recomputing them.

    Node 0 is the query, gallery item j is node j + 1. The query's list is itself then its most
    similar gallery items; each gallery list gets the query inserted where it sorts (before
    equal similarities, as node 0 has the smallest id, but after the item itself, which leads
    its list even when the query duplicates it) and loses its last entry: exactly the lists a
    batch run over query + gallery builds.

    Args:
        similarities, neighbours: (G, >= depth - 1) gallery lists (self first), descending.
        to_query: (G,) canonical similarity of each gallery item to the query.
    Returns:
        (G + 1, depth) similarities and node ids (faiss's order).
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
    return (torch.cat([query_row_similarities[None, :], similarities]),
            torch.cat([query_row[None, :], neighbours]))
TORCH_CHUNK_ELEMENTS = 1 << 22


def rows_per_chunk(per_row: int) -> int:
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
    step = rows_per_chunk(width * width)
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        mask[start:start + step] = (head[head[part]] == part[:, None, None]).any(dim=2)
    return mask


# -- the approximate graph, through an index, at scale ------------------------------------------
EXACT_CHUNK_ROWS = 65536
"""Gallery rows converted to float32 at a time by `exact_candidates` (192 MiB at d = 768)."""
GATHER_ELEMENTS = 1 << 23
"""Elements of one gathered (rows, candidates, d) block of the approximate graph (64 MiB in
float64): bounds its memory whatever the batch, width and dimension."""
FARTHEST_CANDIDATES = 8
"""Items the negated search proposes for each row's farthest (the smallest canonical similarity
among them is kept)."""
RECALL_ROWS = 200
"""Gallery rows on which an approximate graph's recall is measured against exact search."""
GRAPH_BATCH = 4096


class CandidateSearch(Protocol):
    """What `approximate_knn_graph` searches through (`engine.search.index.SearchIndex`):
    `neighbours(queries, k)` returns faiss's (similarities (Q, k) descending, indices (Q, k)
    int64) with -1 where the index found fewer than k items."""

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _float32_rows(features: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start:stop as contiguous float32 (no copy when they already are)."""
    return np.ascontiguousarray(features[start:stop], dtype=np.float32)


def merge_top_k(similarities: np.ndarray, indices: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (similarity descending, ties by the smaller index) of candidate
    lists; -1 indices (missing) sort last. Returns (similarities (n, k), indices (n, k))."""
    keyed = np.where(indices < 0, -np.inf, similarities)
    order = np.lexsort((np.where(indices < 0, np.iinfo(np.int64).max, indices), -keyed),
                       axis=-1)[:, :k]
    return (np.take_along_axis(similarities, order, 1),
            np.take_along_axis(indices, order, 1))


RECENT_QUERIES = 4
"""Queries whose float32 products `float32_scores` keeps: a pick on the page ranks one query
with the baseline and every method, one after another, and they read the gallery once between
them (about 35 ms each at 100k x 1280); a few more serve pages open at once."""
_recent_scores: OrderedDict[tuple, tuple[weakref.ref, np.ndarray]] = OrderedDict()
_recent_lock = threading.Lock()


def _memory_key(gallery: np.ndarray, query: np.ndarray) -> tuple:
    """What identifies a product: the gallery's memory (address, shape, strides, type: the
    methods' views of one gallery are distinct objects over the same memory) and the query's
    bytes."""
    interface = gallery.__array_interface__
    return (interface["data"][0], gallery.shape, gallery.strides, gallery.dtype.str,
            query.tobytes())


def float32_scores(gallery: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(G,) float32 inner products of one query (d,) with every gallery row: one
    matrix-vector product, read straight from the gallery (memory-mapped too).

    The last `RECENT_QUERIES` products are kept (read-only) while the array they were computed
    from is alive: its memory is then still the same gallery (features are never written in
    place), so a view of it with the same address, shape and strides gets the same product.
    """
    query = np.ascontiguousarray(query, np.float32)
    if not isinstance(gallery, np.ndarray):
        return np.asarray(gallery, np.float32) @ query
    key = _memory_key(gallery, query)
    with _recent_lock:
        kept = _recent_scores.get(key)
        if kept is not None and kept[0]() is not None:
            _recent_scores.move_to_end(key)
            return kept[1]
    scores = np.asarray(gallery, np.float32) @ query
    scores.setflags(write=False)
    with _recent_lock:
        _recent_scores[key] = (weakref.ref(gallery), scores)
        while len(_recent_scores) > RECENT_QUERIES:
            _recent_scores.popitem(last=False)
    return scores


def exact_candidates(features: np.ndarray, queries: np.ndarray, k: int,
                     chunk: int = EXACT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k float32 inner products of `queries` against `features`, read in row chunks.

    Works on the gallery's own array, of any float dtype and memory-mapped, without a second
    copy of it: each chunk is converted to float32 (no copy when it is float32 already) and
    searched with faiss's brute-force `knn`, and the chunks' best are merged.

    Args:
        features: (n, d) float rows; queries: (Q, d) float32; 1 <= k <= n.
    Returns:
        similarities (Q, k) float32 descending, indices (Q, k) int64 (faiss's order).
    """
    import faiss

    queries = np.ascontiguousarray(queries, np.float32)
    n = features.shape[0]
    best_values = best_indices = None
    for start in range(0, n, chunk):
        block = _float32_rows(features, start, start + chunk)
        values, found = faiss.knn(queries, block, min(k, block.shape[0]),
                                  metric=faiss.METRIC_INNER_PRODUCT)
        found = found.astype(np.int64) + start
        if best_values is not None:
            values, found = merge_top_k(np.concatenate([best_values, values], 1),
                                        np.concatenate([best_indices, found], 1), k)
        best_values, best_indices = values, found
    return best_values.astype(np.float32), best_indices


def gathered_similarity(features: np.ndarray, rows: np.ndarray, candidates: np.ndarray,
                        dtype: type = np.float64) -> np.ndarray:
    """Inner products of each row's features with its candidates' features, in `dtype`
    (float64: canonical before the cast), in blocks of `GATHER_ELEMENTS`.

    Args:
        features: (n, d) gallery; rows: (b,) row ids; candidates: (b, w) ids (-1: none, gives 0).
    Returns:
        (b, w) similarities in `dtype`.
    """
    b, width = candidates.shape
    out = np.empty((b, width), dtype)
    step = max(1, GATHER_ELEMENTS // max(1, width * features.shape[1]))
    for start in range(0, b, step):
        part = candidates[start:start + step]
        gathered = np.asarray(features[np.maximum(part, 0)], dtype)  # (p, w, d)
        own = np.asarray(features[rows[start:start + step]], dtype)[:, :, None]
        out[start:start + step] = np.matmul(gathered, own)[:, :, 0]
    return out


def _choose_lists(features: np.ndarray, row_ids: np.ndarray, candidates: np.ndarray,
                  depth: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `depth` best canonical neighbours among its candidates, itself first.

    Candidates (-1: none) are rescored in float32 when there are more than `keep` (an
    approximate index's scores, such as product quantisation's, do not order them well), the
    best `keep` canonically (float64, `canonical_similarity`), and the best `depth` of those kept.
    Rows with fewer than `depth` valid candidates are returned with -1 entries for the caller.
    """
    candidates = np.concatenate([row_ids[:, None], candidates], 1)
    candidates[:, 1:][candidates[:, 1:] == row_ids[:, None]] = -1  # self once, at the front
    if candidates.shape[1] > keep:
        rough = gathered_similarity(features, row_ids, candidates, np.float32)
        rough[:, 0] = np.inf
        _, candidates = merge_top_k(rough, candidates, keep)
    canonical = np.minimum(gathered_similarity(features, row_ids, candidates), 1.0)
    canonical = canonical.astype(np.float32)
    canonical[candidates[:, 0] == row_ids, 0] = np.inf
    similarities, indices = merge_top_k(canonical, candidates, depth)
    return np.minimum(similarities, np.float32(1.0)), indices


def graph_recall(features: np.ndarray, graph_indices: np.ndarray, rows: np.ndarray,
                 tolerance: float = FLOAT32_SLACK) -> float:
    """Recall of the listed neighbours of `rows` against the exact lists, tie-aware.

    A listed item counts as found when its canonical similarity to the row reaches the exact
    depth-th similarity (less `tolerance`): an item tied with the exact list's last one is as
    good as it. Returns the mean over rows of found / depth.
    """
    depth = graph_indices.shape[1]
    queries = _float32_rows(features[rows], 0, len(rows))
    _, exact_indices = exact_candidates(features, queries, depth)
    bound = np.minimum(gathered_similarity(features, rows, exact_indices), 1.0)[:, -1]
    listed = np.minimum(gathered_similarity(features, rows, graph_indices[rows]), 1.0)
    listed[graph_indices[rows] < 0] = -np.inf
    return float(np.mean((listed >= bound[:, None] - tolerance).sum(axis=1) / depth))


def approximate_knn_graph(features: np.ndarray, depth: int, index: CandidateSearch, *,
                          candidates: int | None = None, batch: int = GRAPH_BATCH,
                          recall_rows: int = RECALL_ROWS, seed: int = 0,
                          progress: Callable[[float, str], None] | None = None) -> KnnGraph:
    """The kNN graph of `features` through a search index, in batches of rows (never N x N).

    Each batch of rows is searched through `index` for `candidates` items (default depth + 8;
    more for an index whose scores are rough, such as IVF-PQ: see `SearchIndex.graph_width`);
    the candidates are rescored from `features` themselves and the best `depth` kept with
    canonical similarities (float64-accumulated, `canonical_similarity`), each row first in its
    own list at similarity 1. Each row's farthest similarity (k-reciprocal's normaliser) is
    min_y <x, y> = -max_y <-x, y>: the negated rows are searched through the same index for
    `FARTHEST_CANDIDATES` items and the smallest canonical similarity kept. Rows for which the
    index finds fewer than `depth` items are searched exactly (`exact_candidates`).

    Recall against the exact lists is measured on `recall_rows` seeded random rows
    (`graph_recall`) and returned in the graph; `canonical` is False, since an approximate
    index may miss neighbours.

    Args:
        features: (n, d) float unit rows, float16 or memory-mapped allowed (read in batches).
        depth: list length (self included), at most n.
    Returns:
        KnnGraph of depth min(depth, n), canonical=False, recall set.
    """
    n = features.shape[0]
    depth = min(int(depth), n)
    keep = min(depth + 8, n)
    width = min(max(candidates or keep, keep), n)
    indices = np.empty((n, depth), np.int64)
    similarities = np.empty((n, depth), np.float32)
    farthest = np.empty(n, np.float32)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        row_ids = np.arange(start, stop, dtype=np.int64)
        queries = _float32_rows(features, start, stop)
        _, found = index.neighbours(queries, width)
        values, lists = _choose_lists(features, row_ids, found.astype(np.int64), depth, keep)
        short = np.flatnonzero((lists < 0).any(axis=1))
        if short.size:  # the index found too few: those rows exactly
            _, found = exact_candidates(features, queries[short], keep)
            values[short], lists[short] = _choose_lists(features, row_ids[short], found,
                                                        depth, keep)
        indices[start:stop], similarities[start:stop] = lists, values
        _, opposite = index.neighbours(-queries, min(FARTHEST_CANDIDATES, n))
        far = gathered_similarity(features, row_ids, opposite.astype(np.int64))
        far[opposite < 0] = np.inf
        missing = ~np.isfinite(far.min(axis=1))
        if missing.any():
            _, exact_far = exact_candidates(features, -queries[missing], 1)
            far[missing, 0] = gathered_similarity(features, row_ids[missing], exact_far)[:, 0]
        farthest[start:stop] = np.minimum(far.min(axis=1), 1.0)
        if progress is not None:
            progress(stop / n, f"kNN graph {stop}/{n} rows")
    rows = np.sort(np.random.default_rng(seed).choice(n, min(recall_rows, n), replace=False))
    recall = graph_recall(features, indices, rows)
    return KnnGraph(indices=indices, similarities=similarities, farthest=farthest,
                    canonical=False, recall=recall)
