"""k-reciprocal encoding re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017).

Final distance d*(q, g) = (1 - lambda) d_J(q, g) + lambda d'(q, g), where d' is the squared
Euclidean distance normalised by each row's maximum, and d_J is the Jaccard distance between the
locally expanded k-reciprocal encodings of q and g. All queries and gallery items are nodes of
one graph (the method is transductive). Sparse throughout: only the k-neighbourhoods are stored.

Batch re-ranking runs with numpy/scipy on the CPU and with the torch twins of the same functions
(`torch_*` in `_k_reciprocal.py`) on a GPU; the online mode and the fitted gallery
structures stay on the CPU. The paper, the authors' code and the choices made here:
docs/methods/k_reciprocal.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from engine.core.knn import (
    NeighbourLists,
    canonical_similarity,
    float32_scores,
    lists_with_query,
    neighbour_lists,
    reciprocal_mask,
    squared_from_similarity,
    top_k_smallest,
    torch_canonical_similarity,
    torch_farthest_similarity,
    torch_neighbour_lists,
    torch_topk_largest,
)
from engine.core.types import Evidence, EvidenceGroup, GalleryContext
from engine.rerank import register
from engine.rerank._k_reciprocal import (
    canonical_pair_similarity,
    expansion_pairs,
    half_neighbourhood,
    jaccard_distance,
    jaccard_overlap,
    k_reciprocal_encoding,
    k_reciprocal_expansion,
    local_query_expansion,
    pair_squared_distances,
    torch_csc,
    torch_csr_rows,
    torch_jaccard_overlap,
    torch_k_reciprocal_encoding,
    torch_k_reciprocal_expansion,
    torch_local_query_expansion,
    torch_pair_squared_distances,
)
from engine.rerank._scale import (
    MEMORY_FRACTION,
    canonical_rows,
    device_memory_budget,
    gib,
)
from engine.rerank.base import Reranker, RerankParams, param

GPU_CELLS_PER_CHUNK = 1 << 25  # (query chunk x gallery) cells of the final distances per step
BATCH_ROWS = 512  # queries per step of the CPU batch (a (rows, G) float32 overlap block)
RANKING_MARGIN = 16
"""List entries searched past k in a CPU batch: the candidates' bound then usually proves the
top k (`_sparse_top_k`)."""
NO_ENTRY = np.iinfo(np.int64).max  # an empty slot of `_sparse_top_k`'s candidate keys
FLOAT32_DOT_ERROR_PER_DIM = 2.0 ** -23
"""Bound, per dimension, on the error of a float32 inner product of unit vectors against the
canonical (float64-accumulated) one: d unit roundoffs (2^-24) for a sum of d products, doubled
for margin. An online query ranks the gallery by one float32 product and takes canonical
products only for the items whose decisions fall within d times this of a boundary."""
PAIRS_PER_ROW = 2
"""Expected size of an expanded set R* in units of k1 + 1 (for the batch's memory estimate)."""


@dataclass(frozen=True)
class KReciprocalParams(RerankParams):
    k1: int = param(20, minimum=1, maximum=500, step=1,
                    help="k-reciprocal neighbourhood size (the paper's k1)")
    k2: int = param(6, minimum=1, maximum=100, step=1,
                    help="local query expansion size (1 disables the expansion)")
    lambda_value: float = param(0.3, minimum=0.0, maximum=1.0, step=0.05,
                                help="weight of the original distance in the final distance")


def _encode(features: np.ndarray, lists: NeighbourLists, k1: int, k2: int,
            rows_needed: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """V of every node and V_qe rows for `rows_needed` (CSR) given neighbour lists over all
    nodes of `features`."""
    n = features.shape[0]
    row_ids, member_ids = k_reciprocal_expansion(lists.indices, k1)
    squared = pair_squared_distances(features, row_ids, member_ids, lists)
    encoding = k_reciprocal_encoding(row_ids, member_ids, squared, lists.row_max, n, n)
    return encoding, local_query_expansion(encoding, lists.indices, k2, rows_needed)


def _encode_torch(features: torch.Tensor, lists: NeighbourLists, k1: int, k2: int
                  ) -> torch.Tensor:
    """`_encode` with the torch twins: V_qe of every node as a sparse CSR tensor."""
    n = features.shape[0]
    row_ids, member_ids = torch_k_reciprocal_expansion(lists.indices, k1)
    squared = torch_pair_squared_distances(features, row_ids, member_ids, lists)
    encoding = torch_k_reciprocal_encoding(row_ids, member_ids, squared, lists.row_max, n, n)
    return torch_local_query_expansion(encoding, lists.indices, k2)


@register
class KReciprocalReranker(Reranker):
    """k-reciprocal re-ranking with the reference code's exact arithmetic (squared distances)."""

    name = "k_reciprocal"
    title = "k-reciprocal (Zhong et al. 2017)"
    distance_note = ("the paper's final distance: (1 - λ) × Jaccard distance of the expanded "
                     "k-reciprocal sets + λ × squared Euclidean distance over its row's largest "
                     "(0 to 1)")
    Params = KReciprocalParams
    details_schema: ClassVar[dict[str, str]] = {
        "k1": "the neighbourhood size used (k1, clamped to the graph)",
        "k2": "the query-expansion size used (k2, clamped to k1 + 1)",
        "lambda_value": "weight of the original distance in the final one",
        "device": "where the batch ran (cpu, cuda:0, ...)",
        "clamped": "why k1 / k2 were lowered (a gallery smaller than the neighbourhood)",
        "rows_reencoded": "online: gallery rows re-encoded because the query changed them",
    }
    runs_on_gpu: ClassVar[bool] = True
    """Batch mode runs on `self.device`; `_fit` and the online mode always use the CPU (numpy
    and scipy.sparse), whatever the device: they patch a few sparse rows per query."""

    @staticmethod
    def batch_graph_depth(k: int) -> int:
        """The gallery kNN graph depth from which a CPU leave-one-out batch of top-k rankings
        takes each query's candidates (`_sparse_top_k`) instead of every item's distance."""
        return k + 1 + RANKING_MARGIN

    def _effective(self, n_nodes: int, device: str = "cpu") -> tuple[int, int, dict[str, Any]]:
        k1 = min(self.params.k1, n_nodes - 1)
        k2 = min(self.params.k2, k1 + 1)
        details: dict[str, Any] = {"k1": k1, "k2": k2, "lambda_value": self.params.lambda_value,
                                   "device": device}
        if (k1, k2) != (self.params.k1, self.params.k2):
            details["clamped"] = (f"k1={self.params.k1}, k2={self.params.k2} clamped to "
                                  f"k1={k1}, k2={k2} for a graph of {n_nodes} nodes")
        return k1, k2, details

    def graph_depth(self) -> int:
        """Fit reads each item's k1 + 1 nearest (itself first)."""
        return max(self.params.k1 + 1, self.params.k2)

    def _fit(self, context: GalleryContext) -> None:
        """Precompute the gallery-only graph: lists, reciprocal masks and sets, R* pair
        distances, V and V_qe, and an inverted index of the lists' heads.

        On the CPU with numpy/scipy whatever `self.device` is (only the online mode uses them).
        Everything is stored in the node numbering of an online query (query = node 0, gallery
        item j = node j + 1), so a query only recomputes the rows its presence changes. The
        lists come from the context's kNN graph when it is deep enough, exact or approximate
        (no search of the whole gallery then); pair products are computed from the float32
        features in chunks: no whole-gallery float64 copy and no N x N matrix.
        """
        size = context.size
        k1, k2, _ = self._effective(size + 1)
        depth = max(k1 + 1, k2)
        lists = _gallery_lists(context, depth)
        self._gallery_lists = lists
        # A graph smaller than the neighbourhoods changes everywhere when a query joins it:
        # online queries then re-encode every row instead of patching stored ones.
        self._patchable = depth <= size
        if not self._patchable:
            return
        width, half = k1 + 1, half_neighbourhood(k1) + 1
        masks = _chunked_mask(lists.indices, width), _chunked_mask(lists.indices, half)
        self._masks = {width: masks[0], half: masks[1]}
        node_lists = lists.indices[:, :width] + 1
        self._sets = {w: _member_sets(node_lists, mask, w).astype(np.int32)
                      for w, mask in self._masks.items()}
        self._listed_by = _inverted_heads(node_lists)
        self._list_floor = lists.similarities[:, :depth].min(axis=1)  # a query below: no entry
        self._farthest = np.asarray(lists.farthest, np.float32)
        self._row_max = squared_from_similarity(self._farthest)
        row_ids, member_ids = k_reciprocal_expansion(lists.indices, k1, masks=masks)
        squared = pair_squared_distances(context.features, row_ids, member_ids, lists)
        # R* pair distances by node key, so a query looks up the pairs it keeps
        self._pair_keys = (row_ids + 1) * (size + 1) + member_ids + 1
        self._pair_squared = squared
        encoding = k_reciprocal_encoding(row_ids + 1, member_ids + 1, squared,
                                         np.concatenate([[1.0], lists.row_max]), size + 1,
                                         size + 1)
        del row_ids, member_ids
        padded_lists = np.vstack([np.zeros((1, depth), np.int64), lists.indices[:, :depth] + 1])
        self._encoding = encoding
        # node 0 (the query) has no stored row: its V row and so its V_qe row are empty
        self._expanded_columns = local_query_expansion(encoding, padded_lists, k2).tocsc()

    def _final(self, overlap: np.ndarray, squared: np.ndarray, row_max: np.ndarray
               ) -> np.ndarray:
        """d* in float32 from overlaps, squared distances and their rows' maxima (`row_max`
        broadcast against them: (r, 1) for a block, one per entry for pairs)."""
        lam = self.params.lambda_value
        normaliser = np.where(row_max > 0, row_max, np.float32(1.0))  # all-identical: d' = 0
        return ((1.0 - lam) * jaccard_distance(overlap)
                + lam * squared / normaliser).astype(np.float32)

    def _final_torch(self, overlap: torch.Tensor, squared: torch.Tensor, row_max: torch.Tensor
                     ) -> torch.Tensor:
        """`_final` on tensors, with the same float32 operations in the same order."""
        lam = self.params.lambda_value
        normaliser = torch.where(row_max > 0, row_max, 1.0)
        return (1.0 - lam) * jaccard_distance(overlap) + lam * squared / normaliser[:, None]

    def _batch_nodes(self, query_features: np.ndarray | None) -> tuple[np.ndarray, int, int]:
        """The graph's nodes for a batch (the queries, then the gallery; the gallery alone when
        leaving one out), the number of queries and the node id of gallery item 0."""
        gallery = self.gallery.features
        if query_features is None:
            return gallery, gallery.shape[0], 0
        n_queries = query_features.shape[0]
        return np.vstack([query_features, gallery]), n_queries, n_queries

    def _rerank_batch(self, query_features: np.ndarray | None, k: int):
        """Batch re-ranking on the CPU.

        Leave-one-out searches no neighbours: its nodes are the gallery's, whose lists and row
        maxima the context's kNN graph or `fit` already hold. When those lists reach k + 1 +
        `RANKING_MARGIN` deep, each query's final distances are computed only for its
        candidates (`_sparse_top_k`); rows they cannot prove, shallower lists and query
        batches (whose nodes form a new graph, searched here) take every item's distance
        (`_dense_top_k`).
        """
        if self.device.type != "cpu":
            return self._rerank_batch_torch(query_features, k, self.device)
        features, n_queries, offset = self._batch_nodes(query_features)
        n_nodes = features.shape[0]
        k1, k2, details = self._effective(n_nodes)
        leave_one_out = query_features is None
        ranking_depth = self.batch_graph_depth(k)
        lists = self._batch_lists(features, leave_one_out, max(k1 + 1, k2), ranking_depth)
        sparse = (leave_one_out and ranking_depth < n_nodes
                  and lists.indices.shape[1] >= ranking_depth)
        depth = max(k1 + 1, k2)  # the encoding's lists: the same pairs' distances as ever
        encoding_lists = NeighbourLists(lists.indices[:, :depth], lists.similarities[:, :depth],
                                        lists.farthest)
        _, expanded = _encode(features, encoding_lists, k1, k2, np.arange(n_nodes))
        query_qe = expanded[:n_queries]
        gallery_qe = expanded[offset:].tocsc()
        indices = np.empty((n_queries, k), np.int64)
        distances = np.empty((n_queries, k), np.float32)
        for start in range(0, n_queries, BATCH_ROWS):
            rows = np.arange(start, min(start + BATCH_ROWS, n_queries))
            overlap = jaccard_overlap(query_qe[rows], gallery_qe)
            if sparse:
                rows_distances, rows_indices, proven = self._sparse_top_k(overlap, rows,
                                                                          lists, k)
            else:
                proven = np.zeros(len(rows), bool)
                rows_distances = np.empty((len(rows), k), np.float32)
                rows_indices = np.empty((len(rows), k), np.int64)
            if not proven.all():
                todo = np.flatnonzero(~proven)
                rows_distances[todo], rows_indices[todo] = self._dense_top_k(
                    overlap[todo], rows[todo], features, offset, lists.row_max, k)
            distances[rows], indices[rows] = rows_distances, rows_indices
        return distances, indices, details

    def _batch_lists(self, features: np.ndarray, leave_one_out: bool, depth: int,
                     ranking_depth: int) -> NeighbourLists:
        """Neighbour lists of every node of a batch, `depth` deep (or all nodes).

        Leave-one-out's nodes are the gallery's: its kNN graph, `ranking_depth` deep where it
        reaches that far, else the lists `fit` kept (from that graph or its own search). With
        queries the graph changes: the lists and their maxima are searched afresh.
        """
        if not leave_one_out:
            return neighbour_lists(features, min(depth, features.shape[0]))
        shared = self.gallery.knn
        size = features.shape[0]
        if shared is not None and shared.canonical and shared.farthest is not None:
            deepest = min(max(depth, ranking_depth, shared.depth), size)
            if shared.depth >= min(max(depth, ranking_depth), size):
                return NeighbourLists.from_graph(shared, deepest)
        return self._gallery_lists

    def _sparse_top_k(self, overlap: np.ndarray, rows: np.ndarray, lists: NeighbourLists,
                      k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Leave-one-out: the k best gallery items of query rows `rows`, from their candidates.

        A query's candidates are the gallery items of its neighbour list (squared distances
        from the list) and the items its expanded encoding overlaps. An item past the list has
        d' no smaller than the list's last entry, so its final distance is at least the one it
        would have there (`_final` is monotone in the squared distance): an overlapping item
        past the list whose such bound exceeds the row's k-th listed distance cannot enter the
        top k, and the others get canonical (float64) products. An item neither listed nor
        overlapping has Jaccard distance 1, so at least `bound`, the last entry's final
        distance without overlap: a row whose k-th candidate is below `bound` has its exact top
        k (ties by index, as `top_k_smallest`).

        Args:
            overlap: (r, G) Jaccard overlaps of the rows with the gallery.
            lists: the gallery's lists, more than k + 1 deep, with their row maxima.
        Returns:
            distances (r, k) float32, indices (r, k) int64, and which rows are proven (r,) bool
            (the others' entries are undefined).
        """
        n_rows, size = overlap.shape
        depth = lists.indices.shape[1]
        local = np.arange(n_rows)
        row_max = lists.row_max[rows]
        last_listed = squared_from_similarity(lists.similarities[rows, depth - 1])
        listed = lists.indices[rows]                                     # (r, D)
        keep = listed != rows[:, None]                                   # not the query itself
        listed_rows = np.broadcast_to(local[:, None], listed.shape)[keep]
        listed_columns = listed[keep]
        listed_squared = squared_from_similarity(lists.similarities[rows][keep])
        listed_final = self._final(overlap[listed_rows, listed_columns], listed_squared,
                                   row_max[listed_rows])
        kth_listed = np.full(n_rows, np.inf, np.float32)
        full = np.bincount(listed_rows, minlength=n_rows) >= k
        if full.any():
            per_row = np.full((n_rows, depth), np.inf, np.float32)
            slots = np.arange(len(listed_rows)) - np.searchsorted(listed_rows, listed_rows)
            per_row[listed_rows, slots] = listed_final
            kth_listed[full] = np.partition(per_row[full], k - 1, axis=1)[:, k - 1]
        # overlapping items past the lists that may still enter the top k
        # (overlaps are sums of positive minima: a zero is all zero bits, and integers scan
        # faster than floats)
        overlap_rows, overlap_columns = np.divmod(np.flatnonzero(overlap.view(np.int32)), size)
        listed_keys = np.sort(listed_rows * size + listed_columns)
        overlap_keys = overlap_rows * size + overlap_columns
        found = np.searchsorted(listed_keys, overlap_keys).clip(max=max(len(listed_keys) - 1, 0))
        past = (listed_keys[found] != overlap_keys) if len(listed_keys) else np.ones(
            len(overlap_keys), bool)
        past &= overlap_columns != rows[overlap_rows]
        past_rows, past_columns = overlap_rows[past], overlap_columns[past]
        lower = self._final(overlap[past_rows, past_columns], last_listed[past_rows],
                            row_max[past_rows])
        entering = lower <= kth_listed[past_rows]
        past_rows, past_columns = past_rows[entering], past_columns[entering]
        bounds = np.searchsorted(past_rows, np.arange(n_rows + 1))
        past_squared = squared_from_similarity(canonical_pair_similarity(
            self.gallery.features, rows[past_rows], past_columns))
        past_final = self._final(overlap[past_rows, past_columns], past_squared,
                                 row_max[past_rows])
        # the k smallest of each row's candidates, ties by index: one int64 key per entry,
        # (the float32 bits of a non-negative distance, which sort as it does, then the index)
        slots = np.full((n_rows, depth + int(np.diff(bounds).max(initial=0))), NO_ENTRY)
        slots[:, :depth][keep] = _sort_keys(listed_final, listed_columns)
        past_slot = depth + np.arange(len(past_rows)) - bounds[past_rows]
        slots[past_rows, past_slot] = _sort_keys(past_final, past_columns)
        slots.sort(axis=1)
        best = slots[:, :k]
        proven = best[:, -1] != NO_ENTRY
        distances = (best >> 32).astype(np.uint32).view(np.float32)
        indices = best & 0xFFFFFFFF
        if depth < lists.row_max.shape[0]:  # items past the lists exist: bound them
            bound = self._final(np.zeros(n_rows, np.float32), last_listed, row_max)
            proven &= distances[:, k - 1] < bound
        return distances, indices, proven

    def _dense_top_k(self, overlap: np.ndarray, rows: np.ndarray, features: np.ndarray,
                     offset: int, row_max: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best gallery items of query rows `rows` from their final distances to every
        item (canonical similarities to the whole gallery): rows `_sparse_top_k` cannot prove.
        """
        squared = squared_from_similarity(canonical_similarity(features[rows],
                                                               features[offset:]))
        final = self._final(overlap, squared, row_max[rows][:, None])
        if offset == 0:
            final[np.arange(len(rows)), rows] = np.inf
        return top_k_smallest(final, k)

    def _rerank_batch_torch(self, query_features: np.ndarray | None, k: int,
                            device: torch.device):
        """`_rerank_batch` with the torch twins of its functions, every step on `device`.

        The numpy path's numbers up to float rounding (exp, sum order) and the same neighbour
        lists, R* sets and tie rule (the CUDA path; on the CPU it runs in the tests). Lists,
        R* sets, V and V_qe are sparse tensors on the device, and each query
        chunk's (chunk, G) block of final distances is built, masked and cut to k there.
        """
        leave_one_out = query_features is None
        nodes, n_queries, offset = self._batch_nodes(query_features)
        size = self.gallery.size
        k1, k2, details = self._effective(nodes.shape[0], str(device))
        features = torch.from_numpy(nodes).to(device)
        lists = torch_neighbour_lists(features, max(k1 + 1, k2))
        expanded = _encode_torch(features, lists, k1, k2)
        gallery_qe = torch_csc(torch_csr_rows(
            expanded, torch.arange(offset, offset + size, device=device)))
        features64 = features.double()
        gallery64 = features64[offset:]
        row_max = lists.row_max
        indices = np.empty((n_queries, k), np.int64)
        distances = np.empty((n_queries, k), np.float32)
        chunk = max(1, GPU_CELLS_PER_CHUNK // size)
        for start in range(0, n_queries, chunk):
            stop = min(start + chunk, n_queries)
            rows = torch.arange(start, stop, device=device)
            overlap = torch_jaccard_overlap(torch_csr_rows(expanded, rows), gallery_qe)
            squared = squared_from_similarity(
                torch_canonical_similarity(features64[start:stop], gallery64))
            final = self._final_torch(overlap, squared, row_max[start:stop])
            if leave_one_out:
                final[torch.arange(stop - start, device=device), rows] = torch.inf
            values, order = torch_topk_largest(-final, k)  # ties: smaller index first
            indices[start:stop] = order.cpu().numpy()
            distances[start:stop] = (-values).cpu().numpy()
        return distances, indices, details

    def _rerank_online(self, query_feature: np.ndarray, k: int):
        """Exactly the batch result for this single query, recomputing only what it changes.

        The query is node 0 and gallery item j node j + 1. The query enters each gallery list
        where it is closer than the list's last entry and lowers row maxima it undercuts: the
        lists a batch run over (query + gallery) builds. Only the rows whose reciprocal sets,
        candidate half-sets or row maximum change are re-encoded (`_patched_overlap`); the
        fitted structures are read, never copied. The query's similarities come from one
        float32 product with the gallery, canonical ones only where a decision is that close
        (`_QuerySimilarities`). Always on the CPU (numpy/scipy), also for a reranker on CUDA:
        patching a few sparse rows gains nothing from a GPU.
        """
        _, _, details = self._effective(self.gallery.size + 1)
        state = self._online_encoding(query_feature)
        distances, indices = self._online_top_k(state.overlap[1:], state.similarities,
                                                state.row_max, k)
        details = {**details, "rows_reencoded": int(state.dirty.size)}
        return distances, indices, details

    def _online_encoding(self, query_feature: np.ndarray) -> _OnlineEncoding:
        """One online query's Jaccard overlaps with every node and the encodings they come
        from (`_rerank_online` ranks from them, `_explain` shows them): the fitted rows
        patched where the query changes them, or on a graph smaller than the neighbourhoods
        every row encoded afresh."""
        gallery = self.gallery.features
        size = gallery.shape[0]
        k1, k2, _ = self._effective(size + 1)
        depth = max(k1 + 1, k2)
        similarities = _QuerySimilarities(gallery, query_feature)
        if self._patchable:
            graph = self._graph_with_query(similarities, depth)
            dirty, overlap, fresh = self._patched_overlap(graph, similarities, k1, k2)
            return _OnlineEncoding(
                similarities, overlap, graph.query_row_max, dirty,
                encoding_rows=lambda nodes: self._encoding_rows(nodes, dirty, fresh),
                expanded_rows=lambda nodes: self._expanded_rows(graph.heads(nodes, k2), dirty,
                                                                fresh))
        lists = self._lists_with_query(similarities.exact(np.arange(size)), depth)
        features = np.vstack([query_feature[None, :], gallery])
        encoding, expanded = _encode(features, lists, k1, k2, np.arange(size + 1))
        overlap = jaccard_overlap(expanded[:1], expanded.tocsc())[0]
        return _OnlineEncoding(similarities, overlap, lists.row_max[0], np.arange(size + 1),
                               encoding_rows=lambda nodes: encoding[nodes],
                               expanded_rows=lambda nodes: expanded[nodes])

    def _encoding_rows(self, nodes: np.ndarray, dirty: np.ndarray, fresh: sp.csr_matrix
                       ) -> sp.csr_matrix:
        """V rows of `nodes` with the query in: `fresh` for the re-encoded (`dirty`) rows,
        the fitted encoding for the others."""
        slot, is_dirty = _lookup(dirty, nodes)
        return sp.vstack([fresh[slot[i]] if is_dirty[i] else self._encoding[node]
                          for i, node in enumerate(nodes)], format="csr")

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The query's and the item's expanded k-reciprocal sets R* (their V weights), the
        neighbours their expanded encodings V_qe share (the minima, which sum to the overlap
        m of d_J = 1 - m / (2 - m)), and the numbers of d* = (1 - lambda) d_J + lambda d',
        from the online computation itself (`_online_encoding`): the final distance is the
        one online mode returns for the item (every item has one: k = the gallery)."""
        state = self._online_encoding(query_feature)
        node = item + 1
        overlap = state.overlap[node:node + 1]
        squared = squared_from_similarity(state.similarities.exact(np.array([item])))
        row_max = state.row_max
        final = self._final(overlap, squared, row_max)[0]
        original = (squared / np.where(row_max > 0, row_max, np.float32(1.0)))[0]
        nodes = np.array([0, node])
        encoding, expanded = state.encoding_rows(nodes), state.expanded_rows(nodes)
        query_set, query_weights = _row_entries(encoding, 0)
        item_set, item_weights = _row_entries(encoding, 1)
        query_qe, query_qe_weights = _row_entries(expanded, 0)
        item_qe, item_qe_weights = _row_entries(expanded, 1)
        shared, at_query, at_item = np.intersect1d(query_qe, item_qe, assume_unique=True,
                                                   return_indices=True)
        minima = np.minimum(query_qe_weights[at_query], item_qe_weights[at_item])
        on_query = float(minima[shared == 0].sum())
        neighbours = item_set[item_set != node]
        common = int(np.isin(neighbours, query_set).sum())
        summary = (f"{common} of its {neighbours.size} k-reciprocal neighbours are also the "
                   "query's" if neighbours.size else
                   "it has no k-reciprocal neighbours but itself")
        numbers = {
            "shared weight": float(overlap[0]),
            "shared weight at the query": on_query,
            "Jaccard distance": float(jaccard_distance(overlap)[0]),
            "squared distance": float(squared[0]),
            "largest squared distance": float(row_max),
            "original distance": float(original),
            "lambda": float(self.params.lambda_value),
            "final distance": float(final),
        }
        groups = (
            _heaviest_first("shared neighbours", shared, minima,
                            "the smaller of the two expanded encodings' (V_qe) weights: with "
                            "the shared weight at the query they sum to the shared weight m"),
            _heaviest_first("query's k-reciprocal set", query_set, query_weights,
                            "weight in the query's encoding V (exp(-d') over the set's sum)",
                            highlight=False),
            _heaviest_first("its k-reciprocal set", item_set, item_weights,
                            "weight in the item's encoding V (exp(-d') over the set's sum)",
                            highlight=False),
        )
        return Evidence(self.name, item, summary, numbers, groups)

    def _graph_with_query(self, similarities: _QuerySimilarities, depth: int) -> _QueryGraph:
        """The lists of (query + gallery) as `knn.lists_with_query` builds them, as patches:
        the query's own row, the gallery rows it enters (a listed similarity at or below the
        query's) and the row maxima it lowers. Canonical similarities only for the items
        within the float32 error of those tests."""
        stored = self._gallery_lists
        approximate, slack = similarities.approximate, similarities.slack
        near = np.flatnonzero(approximate >= self._list_floor - slack)
        entered = near[similarities.exact(near) >= self._list_floor[near]]
        to_query = similarities.exact(entered)
        positions = np.maximum(
            (stored.similarities[entered, :depth] > to_query[:, None]).sum(axis=1), 1)
        rows = stored.indices[entered, :depth] + 1
        columns = np.arange(depth)[None, :]
        shifted = np.concatenate([rows[:, :1], rows[:, :-1]], axis=1)  # one slot later
        entered_rows = np.where(columns < positions[:, None], rows,
                                np.where(columns == positions[:, None], 0, shifted))
        low = np.flatnonzero(approximate < self._farthest + slack)
        lowered = low[similarities.exact(low) < self._farthest[low]]
        # the query's own row: itself, then its depth - 1 most similar items (ties: smaller
        # index), and its farthest similarity
        size = len(approximate)
        kth = np.partition(approximate, size - depth + 1)[size - depth + 1]
        candidates = np.flatnonzero(approximate >= kth - 2 * slack)
        order = np.lexsort((candidates, -similarities.exact(candidates)))[:depth - 1]
        query_row = np.concatenate([[0], candidates[order] + 1])
        lowest = np.flatnonzero(approximate <= approximate.min() + 2 * slack)
        query_farthest = similarities.exact(lowest).min()
        return _QueryGraph(
            stored=stored.indices, rows=np.vstack([query_row, entered_rows]),
            slots=_slots(np.concatenate([[0], entered + 1]), size + 1),
            entered=entered + 1, positions=positions, lowered=lowered + 1,
            lowered_max=squared_from_similarity(similarities.exact(lowered)),
            stored_max=self._row_max,
            query_row_max=squared_from_similarity(np.float32(query_farthest)))

    def _patched_overlap(self, graph: _QueryGraph, similarities: _QuerySimilarities,
                         k1: int, k2: int
                         ) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """Jaccard overlap of the query (node 0) with every node, re-encoding only the rows the
        query changes: those whose reciprocal set, a candidate's half-set or row maximum moved.

        A row's reciprocal mask over its first w entries can change only if its own first w
        entries or those of one of them changed, i.e. if the query is among them: only those
        rows' masks are recomputed (found through the inverted lists of `fit`), the others are
        the ones stored at fit. Returns the re-encoded rows (node ids), the (G + 1,)
        overlaps and the re-encoded rows' V (one row each, in their order).
        """
        size = self.gallery.size
        width, half = k1 + 1, half_neighbourhood(k1) + 1
        masks, changed = {}, {}
        for mask_width in (width, half):
            moved = graph.moved(mask_width)
            rows = np.union1d(moved, self._rows_listing(moved))
            heads = graph.heads(rows, mask_width)
            values = (graph.heads(heads, mask_width) == rows[:, None, None]).any(axis=2)
            masks[mask_width] = _PatchedMasks(_slots(rows, size + 1), values,
                                              self._masks[mask_width])
            gallery = np.flatnonzero(rows > 0)
            differs = (_member_sets(heads[gallery], values[gallery], mask_width)
                       != self._sets[mask_width][rows[gallery] - 1]).any(axis=1)
            changed[mask_width] = rows[gallery[differs]]
        half_changed = np.union1d([0], changed[half])
        near = np.union1d(graph.moved(width), self._rows_listing(half_changed))
        candidates_changed = near[(np.isin(graph.heads(near, width), half_changed)
                                   & masks[width].of(near)).any(axis=1)]
        dirty = np.union1d(np.union1d([0], graph.lowered),
                           np.union1d(candidates_changed, changed[width]))
        forward = graph.heads(dirty, width)
        row_ids, member_ids = expansion_pairs(dirty, forward, masks[width].of(dirty),
                                              graph.heads(forward, half),
                                              masks[half].of(forward), size + 1)
        squared = self._pair_distances(row_ids, member_ids, similarities)
        fresh = k_reciprocal_encoding(np.searchsorted(dirty, row_ids), member_ids, squared,
                                      graph.row_max(dirty), len(dirty), size + 1)
        # V_qe changes where the query entered the first k2 entries or one of them is dirty
        moved = graph.moved(k2)
        near = np.union1d(moved, self._rows_listing(dirty))
        changed_rows = near[np.isin(near, moved)
                            | np.isin(graph.heads(near, k2), dirty).any(axis=1)]
        expanded = self._expanded_rows(graph.heads(changed_rows, k2), dirty, fresh)
        query_row = expanded[:1]  # node 0 is the first changed row
        overlap = jaccard_overlap(query_row, self._expanded_columns)[0]
        overlap[changed_rows] = jaccard_overlap(query_row, expanded.tocsc())[0]
        return dirty, overlap, fresh

    def _expanded_rows(self, sources: np.ndarray, dirty: np.ndarray, fresh: sp.csr_matrix
                       ) -> sp.csr_matrix:
        """V_qe rows as `local_query_expansion` computes them: the mean of the V rows of each
        row's first k2 entries `sources` (c, k2), V being `fresh` for the `dirty` rows and the
        fitted encoding for the others; the sources keep node order (the same sums)."""
        needed, inverse = np.unique(sources, return_inverse=True)
        slot, is_dirty = _lookup(dirty, needed)
        stacked = sp.vstack([self._encoding[needed[~is_dirty]], fresh[slot[is_dirty]]],
                            format="csr")
        position = np.empty(len(needed), np.int64)
        position[~is_dirty] = np.arange(int((~is_dirty).sum()))
        position[is_dirty] = int((~is_dirty).sum()) + np.arange(int(is_dirty.sum()))
        encoding = stacked[position]  # in `needed` (node) order
        n_rows, k2 = sources.shape
        if k2 <= 1:
            return encoding[inverse.ravel()]
        averaging = sp.csr_matrix(
            (np.full(n_rows * k2, 1.0 / k2, np.float32),
             (np.repeat(np.arange(n_rows), k2), inverse.ravel())), shape=(n_rows, len(needed)))
        return (averaging @ encoding).tocsr()

    def _online_top_k(self, overlap: np.ndarray, similarities: _QuerySimilarities,
                      row_max: np.floating, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k smallest final distances (ties by index) from the overlaps (G,) and the
        query's similarities: every item's final distance from the float32 ones bounds which
        items can be in the top k, and only those get canonical similarities."""
        approximate = self._final(overlap, squared_from_similarity(similarities.approximate),
                                  row_max)
        # the float32 similarity's error through d' = lambda (2 - 2 s) / max, and roundings
        normaliser = float(row_max) if row_max > 0 else 1.0
        error = (self.params.lambda_value * (2 * similarities.slack + 2.0 ** -20) / normaliser
                 + 2.0 ** -20)
        kth = np.partition(approximate, k - 1)[k - 1] if k < len(approximate) else np.inf
        candidates = np.flatnonzero(approximate <= kth + 2 * error)
        final = self._final(overlap[candidates],
                            squared_from_similarity(similarities.exact(candidates)), row_max)
        distances, order = top_k_smallest(final[None, :], k)
        return distances[0], candidates[order[0]]

    def _rows_listing(self, nodes: np.ndarray) -> np.ndarray:
        """Gallery rows (node ids, ascending) whose fitted first k1 + 1 entries hold one of the
        gallery `nodes` (node 0, the query, is in no fitted list): a superset of the rows whose
        lists with the query hold them, since the query only pushes entries out."""
        starts, rows = self._listed_by
        nodes = nodes[nodes > 0]
        lengths = starts[nodes + 1] - starts[nodes]
        first = np.repeat(starts[nodes] - (np.cumsum(lengths) - lengths), lengths)
        return np.unique(rows[np.arange(int(lengths.sum())) + first])

    def _pair_distances(self, row_ids: np.ndarray, member_ids: np.ndarray,
                        similarities: _QuerySimilarities) -> np.ndarray:
        """Squared distances of (row, member) node pairs: the query's from its canonical
        similarities, gallery pairs from the fit's R* pairs where there, the rest from
        canonical products of the features; self pairs exactly 0."""
        n = self.gallery.size + 1
        result = np.zeros(len(row_ids), np.float32)
        with_query = (row_ids == 0) | (member_ids == 0)
        other = row_ids[with_query] + member_ids[with_query]
        result[with_query] = squared_from_similarity(similarities.exact(np.maximum(other - 1,
                                                                                   0)))
        rest = np.flatnonzero(~with_query & (row_ids != member_ids))
        keys = row_ids[rest] * n + member_ids[rest]
        found = np.searchsorted(self._pair_keys, keys).clip(max=len(self._pair_keys) - 1)
        known = self._pair_keys[found] == keys
        result[rest[known]] = self._pair_squared[found[known]]
        rest = rest[~known]
        result[rest] = squared_from_similarity(canonical_pair_similarity(
            self.gallery.features, row_ids[rest] - 1, member_ids[rest] - 1))
        result[(row_ids == member_ids)] = 0.0
        return result

    def _lists_with_query(self, to_query: np.ndarray, depth: int) -> NeighbourLists:
        """Neighbour lists over (query + gallery) from the stored gallery lists
        (`knn.lists_with_query`) and the query's canonical similarities (G,) to the gallery:
        the small-gallery way, where every row changes."""
        stored = self._gallery_lists
        similarities, indices = lists_with_query(
            torch.from_numpy(np.ascontiguousarray(stored.similarities)),
            torch.from_numpy(np.ascontiguousarray(stored.indices)),
            torch.from_numpy(to_query), depth)
        farthest = np.concatenate([[to_query.min()], np.minimum(stored.farthest, to_query)])
        return NeighbourLists(indices.numpy(), similarities.numpy(),
                              farthest.astype(np.float32))

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """Refuses a batch whose estimated memory (`_batch_bytes`) exceeds the share of the
        memory available now that a batch may plan to use (`_scale.memory_budget`; for a CUDA
        batch the same share of the GPU's free memory)."""
        need = self._batch_bytes(gallery_size, n_queries)
        budget = device_memory_budget(self.device)
        if budget is None or need <= budget:
            return None
        where = " on the GPU" if self.device.type == "cuda" else ""
        return (f"it needs about {gib(need)} for {n_queries:,} queries against "
                f"{gallery_size:,} items, more than {gib(budget)} ({MEMORY_FRACTION:.0%} of the "
                f"memory available{where}); re-rank one query at a time (online mode) or use a "
                "smaller gallery")

    def _batch_bytes(self, gallery_size: int, n_queries: int) -> int:
        """Estimated peak bytes of a batch, from the arrays it holds at once.

        `n_queries = gallery_size` is how leave-one-out arrives: its nodes are the gallery's
        and it searches nothing. A query batch searches its nodes: their features with the
        search's float32 and float64 copies (`knn.knn_graph`) and lists. Both encode: R* pairs
        (about `PAIRS_PER_ROW` (k1 + 1) a row) with their distances and V; V_qe (k2 rows of V
        each) and its CSC copy; and one step's (rows, G) blocks with the gallery in float64
        for the canonical products (`_dense_top_k`), or on a GPU the nodes in float64 and one
        chunk of final distances.
        """
        dim = self.gallery.features.shape[1] if self.is_fitted else 2048
        leave_one_out = n_queries == gallery_size
        nodes = gallery_size + (0 if leave_one_out else n_queries)
        k1, k2, _ = self._effective(nodes)
        pairs = PAIRS_PER_ROW * (k1 + 1)
        search = 0 if leave_one_out else nodes * dim * (4 + 4 + 8) + nodes * max(k1 + 1,
                                                                                  k2) * 12
        encoding = nodes * pairs * (8 + 8 + 4 + 8) + nodes * min(nodes, k2 * pairs) * 8 * 3
        if self.device.type == "cuda":
            block = nodes * dim * 12 + GPU_CELLS_PER_CHUNK * (8 + 4 + 4 + 4)
        else:
            block = BATCH_ROWS * gallery_size * (4 + 8 + 8 + 4 * 4) + gallery_size * dim * 8
        return int(search + encoding + block)


class _QuerySimilarities:
    """One online query's similarities to the gallery: float32 from one matrix-vector product
    (`approximate`, within `slack` of the canonical ones), canonical (float64-accumulated,
    rounded once, as `knn.canonical_similarity`) only for the items asked (`exact`): those
    whose decisions fall within `slack` of a boundary. A float64 pass over a large gallery
    would cost several times the float32 one."""

    def __init__(self, gallery: np.ndarray, query: np.ndarray) -> None:
        self._gallery, self._query = gallery, query
        self.approximate = float32_scores(gallery, query)           # (G,) float32
        self.slack = gallery.shape[1] * FLOAT32_DOT_ERROR_PER_DIM
        self._values = self.approximate.copy()
        self._known = np.zeros(len(self.approximate), bool)

    def exact(self, items: np.ndarray) -> np.ndarray:
        """Canonical float32 similarities of gallery `items` (computed once each)."""
        items = np.asarray(items, np.int64)
        todo = np.unique(items[~self._known[items]])
        if len(todo):
            self._values[todo] = canonical_rows(self._gallery, todo, self._query)
            self._known[todo] = True
        return self._values[items]


@dataclass(frozen=True)
class _OnlineEncoding:
    """One online query's encoding (`KReciprocalReranker._online_encoding`), nodes numbered
    as there (the query node 0, gallery item j node j + 1).

    overlap: (G + 1,) float32 Jaccard overlap m of the query's V_qe row with every node's.
    row_max: the query's largest squared distance (d' divides by it). dirty: the nodes whose
    V was encoded afresh. encoding_rows / expanded_rows: the V / V_qe rows (CSR, one per node
    asked, in that order) with the query in.
    """

    similarities: _QuerySimilarities
    overlap: np.ndarray
    row_max: np.floating
    dirty: np.ndarray
    encoding_rows: Callable[[np.ndarray], sp.csr_matrix]
    expanded_rows: Callable[[np.ndarray], sp.csr_matrix]


def _heaviest_first(name: str, nodes: np.ndarray, weights: np.ndarray, value_name: str,
                    highlight: bool = True) -> EvidenceGroup:
    """An evidence group of the gallery nodes among `nodes` (the query, node 0, is no gallery
    row), heaviest weight first (ties: smaller row)."""
    gallery = nodes > 0
    order = np.argsort(-weights[gallery], kind="stable")
    return EvidenceGroup(name, nodes[gallery][order] - 1, weights[gallery][order], value_name,
                         highlight)


def _row_entries(matrix: sp.csr_matrix, row: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSR row's columns (ascending, int64) and their values (float64)."""
    start, stop = matrix.indptr[row], matrix.indptr[row + 1]
    columns = matrix.indices[start:stop].astype(np.int64)
    order = np.argsort(columns)
    return columns[order], matrix.data[start:stop][order].astype(np.float64)


@dataclass(frozen=True)
class _QueryGraph:
    """The lists of (query + gallery) for one online query, as patches over the fitted gallery
    lists: node 0 is the query, gallery item j node j + 1. Only the query's row and the rows
    it entered differ from the stored lists; only the rows it lowered have another maximum.

    stored: (G, >= depth) fitted lists (gallery numbering); rows: (1 + m, depth) the lists
    (node ids) of the query and of the m rows it entered, slots (G + 1,) each node's row
    there or -1; entered: (m,) those rows' node ids, ascending, positions (m,) the query's
    place in them; lowered: (l,) ascending node ids whose maximum squared distance is now
    lowered_max (l,); stored_max: (G,) the fitted maxima; query_row_max: the query's.
    """

    stored: np.ndarray
    rows: np.ndarray
    slots: np.ndarray
    entered: np.ndarray
    positions: np.ndarray
    lowered: np.ndarray
    lowered_max: np.ndarray
    stored_max: np.ndarray
    query_row_max: np.floating

    def heads(self, nodes: np.ndarray, width: int) -> np.ndarray:
        """The first `width` entries of each node's list: nodes.shape + (width,) node ids."""
        flat = np.asarray(nodes).ravel()
        heads = self.stored[np.maximum(flat - 1, 0), :width] + 1
        slot = self.slots[flat]
        patched = slot >= 0
        heads[patched] = self.rows[slot[patched], :width]
        return heads.reshape((*np.shape(nodes), width))

    def moved(self, width: int) -> np.ndarray:
        """The nodes (ascending) whose first `width` entries hold the query: itself and the
        rows it entered that far up."""
        return np.concatenate([[0], self.entered[self.positions < width]])

    def row_max(self, nodes: np.ndarray) -> np.ndarray:
        """Each node's largest squared distance (the encoding's normaliser), (len(nodes),)."""
        result = self.stored_max[np.maximum(nodes - 1, 0)]
        result[nodes == 0] = self.query_row_max
        slot, hit = _lookup(self.lowered, nodes)
        result[hit] = self.lowered_max[slot[hit]]
        return result


@dataclass(frozen=True)
class _PatchedMasks:
    """Reciprocal masks of one width over (query + gallery): `values` for the recomputed rows
    (`slots` (G + 1,): each node's row in `values`, or -1; the query's is there), the fitted
    `stored` (G, w) for the others."""

    slots: np.ndarray
    values: np.ndarray
    stored: np.ndarray

    def of(self, nodes: np.ndarray) -> np.ndarray:
        """nodes.shape + (w,) bool masks."""
        flat = np.asarray(nodes).ravel()
        masks = self.stored[np.maximum(flat - 1, 0)]
        slot = self.slots[flat]
        patched = slot >= 0
        masks[patched] = self.values[slot[patched]]
        return masks.reshape((*np.shape(nodes), self.values.shape[1]))


def _slots(nodes: np.ndarray, n: int) -> np.ndarray:
    """(n,) int32: each node's position in `nodes`, -1 for the others (a lookup by gather)."""
    slots = np.full(n, -1, np.int32)
    slots[nodes] = np.arange(len(nodes), dtype=np.int32)
    return slots


def _lookup(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ascending `keys`: each value's slot in them and whether it is there."""
    if len(keys) == 0:
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    slot = np.searchsorted(keys, values).clip(max=len(keys) - 1)
    return slot, keys[slot] == values


def _gallery_lists(context: GalleryContext, depth: int) -> NeighbourLists:
    """The gallery's lists `depth` deep: the context's kNN graph when it is that deep (or lists
    every item), exact or approximate, else an exact search; row maxima from the graph, or
    computed when it has none."""
    shared = context.knn
    if shared is None or shared.depth < min(depth, context.size):
        return neighbour_lists(context.features, depth)
    farthest = shared.farthest
    if farthest is None:
        farthest = torch_farthest_similarity(torch.from_numpy(context.features)).numpy()
    return NeighbourLists(shared.indices[:, :depth], shared.similarities[:, :depth], farthest)


MASK_CHUNK = 8192
"""Rows per step of fit's reciprocal masks (a (rows, w, w) int64 gather)."""


def _chunked_mask(lists: np.ndarray, width: int) -> np.ndarray:
    """`reciprocal_mask` of every row, a few thousand rows at a time."""
    return np.concatenate([reciprocal_mask(lists, width, np.arange(start, min(
        start + MASK_CHUNK, lists.shape[0]))) for start in range(0, lists.shape[0], MASK_CHUNK)])


def _inverted_heads(node_lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which rows list each node: (starts (n + 2,), rows) so that the rows (node ids) whose
    `node_lists` (G, w) hold node m are rows[starts[m]:starts[m + 1]]."""
    flat = node_lists.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.zeros(node_lists.shape[0] + 2, np.int64)
    starts[1:] = np.cumsum(np.bincount(flat, minlength=node_lists.shape[0] + 1))
    return starts, (order // node_lists.shape[1] + 1).astype(np.int32)


def _sort_keys(distances: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """int64 keys that sort as (distance, column) for float32 distances >= 0 and columns
    < 2**31: the distance's bits above the column."""
    return (distances.view(np.uint32).astype(np.int64) << 32) | columns


def _member_sets(lists: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """Each row's set {lists[r, a] : mask[r, a]} as a sorted, -1 padded (n, width) array."""
    return np.sort(np.where(mask, lists[:, :width], -1), axis=1)
