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

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from engine.core.knn import (
    NeighbourLists,
    canonical_similarity,
    lists_with_query,
    neighbour_lists,
    reciprocal_mask,
    squared_from_similarity,
    top_k_smallest,
    torch_canonical_similarity,
    torch_neighbour_lists,
    torch_topk_largest,
)
from engine.core.threads import query_threads
from engine.core.types import GalleryContext
from engine.rerank import register
from engine.rerank._k_reciprocal import (
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
from engine.rerank.base import Reranker, RerankParams, param

GPU_CELLS_PER_CHUNK = 1 << 25  # (query chunk x gallery) cells of the final distances per step
BATCH_ROWS = 512  # queries per step of the CPU batch (a (rows, G) float32 overlap block)
RANKING_MARGIN = 16
"""List entries searched past k in a CPU batch: the candidates' bound then usually proves the
top k (`_sparse_top_k`)."""
NO_ENTRY = np.iinfo(np.int64).max  # an empty slot of `_sparse_top_k`'s candidate keys


@dataclass(frozen=True)
class KReciprocalParams(RerankParams):
    k1: int = param(20, minimum=1, maximum=500, step=1,
                    help="k-reciprocal neighbourhood size (the paper's k1)")
    k2: int = param(6, minimum=1, maximum=100, step=1,
                    help="local query expansion size (1 disables the expansion)")
    lambda_value: float = param(0.3, minimum=0.0, maximum=1.0, step=0.05,
                                help="weight of the original distance in the final distance")


def _encode(features: np.ndarray, lists: NeighbourLists, k1: int, k2: int,
            rows_needed: np.ndarray) -> tuple[Any, Any]:
    """V_qe rows for `rows_needed` (CSR) given neighbour lists over all nodes of `features`."""
    n = features.shape[0]
    row_ids, member_ids = k_reciprocal_expansion(lists.indices, k1)
    squared = pair_squared_distances(features, row_ids, member_ids, lists)
    encoding = k_reciprocal_encoding(row_ids, member_ids, squared, lists.row_max, n, n)
    return local_query_expansion(encoding, lists.indices, k2, rows_needed)


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

    def _fit(self, context: GalleryContext) -> None:
        """Precompute the gallery-only graph: lists, reciprocal sets, V and V_qe.

        On the CPU with numpy/scipy whatever `self.device` is (only the online mode uses them).
        Everything is stored in the node numbering of an online query (query = node 0, gallery
        item j = node j + 1), so a query only recomputes the rows its presence changes.
        """
        size = context.size
        k1, k2, _ = self._effective(size + 1)
        depth = max(k1 + 1, k2)
        shared = context.knn
        if shared is not None and shared.canonical and shared.depth >= min(depth, size):
            lists = NeighbourLists.from_graph(shared, depth)  # the gallery's cached graph
        else:
            lists = neighbour_lists(context.features, depth)
        self._gallery_lists = lists
        self._gallery64 = context.features.astype(np.float64)  # for canonical similarities
        # A graph smaller than the neighbourhoods changes everywhere when a query joins it:
        # online queries then re-encode every row instead of patching stored ones.
        self._patchable = max(k1 + 1, k2) <= size
        if not self._patchable:
            return
        width, half = k1 + 1, half_neighbourhood(k1) + 1
        node_lists = lists.indices + 1
        masks = reciprocal_mask(lists.indices, width), reciprocal_mask(lists.indices, half)
        self._reciprocal_sets = _member_sets(node_lists, masks[0], width)
        self._half_sets = _member_sets(node_lists, masks[1], half)
        # the masks in node numbering, with a row for the query (recomputed per query)
        self._reciprocal_masks = tuple(np.vstack([np.zeros((1, mask.shape[1]), bool), mask])
                                       for mask in masks)
        row_ids, member_ids = k_reciprocal_expansion(lists.indices, k1)
        squared = pair_squared_distances(context.features, row_ids, member_ids, lists)
        # R* pair distances by node key, so a query looks up the pairs it keeps
        self._pair_keys = (row_ids + 1) * (size + 1) + member_ids + 1
        self._pair_squared = squared
        encoding = k_reciprocal_encoding(row_ids + 1, member_ids + 1, squared,
                                         np.concatenate([[1.0], lists.row_max]), size + 1,
                                         size + 1)
        padded_lists = np.vstack([np.zeros((1, node_lists.shape[1]), np.int64), node_lists])
        self._encoding = encoding
        gallery_rows = local_query_expansion(encoding, padded_lists, k2, np.arange(1, size + 1))
        # node 0 (the query) has no stored row
        self._expanded_columns = sp.vstack([sp.csr_matrix((1, size + 1), dtype=np.float32),
                                            gallery_rows]).tocsc()

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
        expanded = _encode(features, encoding_lists, k1, k2, np.arange(n_nodes))
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
        dots = np.empty(len(past_rows))
        bounds = np.searchsorted(past_rows, np.arange(n_rows + 1))
        gallery64 = self._gallery64
        for row in np.flatnonzero(np.diff(bounds)).tolist():  # a product per row: no row copies
            start, stop = bounds[row], bounds[row + 1]
            dots[start:stop] = gallery64[past_columns[start:stop]] @ gallery64[rows[row]]
        past_squared = squared_from_similarity(np.minimum(dots, 1.0).astype(np.float32))
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
        where it is closer than the list's last entry and raises row maxima it exceeds: the
        lists a batch run over (query + gallery) builds. Rows whose reciprocal sets, candidate
        half-sets and row maximum are all unchanged keep their precomputed encoding, so only
        the query's neighbourhood is re-encoded. Always on the CPU (numpy/scipy), also for a
        reranker on CUDA: patching a few sparse rows gains nothing from a GPU; and on one
        thread (`engine.core.threads.query_threads`): split over two, each small step waits for
        the second thread, which on a busy machine costs more than the step.
        """
        gallery = self.gallery.features
        size = gallery.shape[0]
        k1, k2, details = self._effective(size + 1)
        with query_threads():
            lists, to_query = self._lists_with_query(query_feature, max(k1 + 1, k2))
            if not self._patchable:
                features = np.vstack([query_feature[None, :], gallery])
                expanded = _encode(features, lists, k1, k2, np.arange(size + 1))
                overlap = jaccard_overlap(expanded[:1], expanded.tocsc())[0]
                dirty_rows = np.arange(size + 1)
            else:
                dirty_rows, overlap = self._patched_overlap(query_feature, to_query, lists, k1,
                                                            k2)
            final = self._final(overlap[None, 1:], to_query[None, :], lists.row_max[:1, None])
            distances, indices = top_k_smallest(final, k)
        details = {**details, "rows_reencoded": int(dirty_rows.size)}
        return distances[0], indices[0], details

    def _patched_overlap(self, query_feature: np.ndarray, to_query: np.ndarray,
                         lists: NeighbourLists, k1: int, k2: int
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Jaccard overlap of the query (node 0) with every node, re-encoding only the rows the
        query changes: those whose reciprocal set, a candidate's half-set or row maximum moved.

        A row's reciprocal mask over its first w entries can change only if its own first w
        entries or those of one of them changed, i.e. if the query is among them: only those
        rows' masks are recomputed, the others are the ones stored at fit.
        """
        size = lists.indices.shape[0] - 1
        width, half = k1 + 1, half_neighbourhood(k1) + 1
        stored_farthest = np.concatenate([[-np.inf], self._gallery_lists.farthest])
        max_changed = lists.farthest < stored_farthest
        changed_sets = []
        for mask_width, stored_mask, stored_sets in (
                (width, self._reciprocal_masks[0], self._reciprocal_sets),
                (half, self._reciprocal_masks[1], self._half_sets)):
            head = lists.indices[:, :mask_width]
            moved = (head == 0).any(axis=1)
            moved[0] = True
            rows = np.flatnonzero(moved | moved[head].any(axis=1))
            mask = stored_mask.copy()
            mask[rows] = reciprocal_mask(lists.indices, mask_width, rows)
            changed = np.zeros(size + 1, bool)
            gallery_rows = rows[rows > 0]
            changed[gallery_rows] = (
                _member_sets(lists.indices[gallery_rows], mask[gallery_rows], mask_width)
                != stored_sets[gallery_rows - 1]).any(axis=1)
            changed_sets.append((mask, changed))
        (reciprocal, set_changed), (half_mask, half_changed) = changed_sets
        half_changed[0] = True
        candidates_changed = (half_changed[lists.indices[:, :width]] & reciprocal).any(axis=1)
        dirty = max_changed | candidates_changed | set_changed
        dirty[0] = True
        dirty_rows = np.flatnonzero(dirty)
        row_ids, member_ids = k_reciprocal_expansion(lists.indices, k1, dirty_rows,
                                                     masks=(reciprocal, half_mask))
        squared = self._pair_distances(row_ids, member_ids, to_query)
        fresh = k_reciprocal_encoding(row_ids, member_ids, squared, lists.row_max, size + 1,
                                      size + 1)
        encoding = sp.diags((~dirty).astype(np.float32)) @ self._encoding + fresh
        stored_heads = np.vstack([np.full((1, k2), -1), self._gallery_lists.indices[:, :k2] + 1])
        qe_changed = ((lists.indices[:, :k2] != stored_heads).any(axis=1)
                      | dirty[lists.indices[:, :k2]].any(axis=1))
        qe_changed[0] = True
        changed_rows = np.flatnonzero(qe_changed)
        expanded = local_query_expansion(encoding.tocsr(), lists.indices, k2, changed_rows)
        query_row = expanded[:1]
        overlap = jaccard_overlap(query_row, self._expanded_columns)[0]
        overlap[changed_rows] = jaccard_overlap(query_row, expanded.tocsc())[0]
        return dirty_rows, overlap

    def _pair_distances(self, row_ids: np.ndarray, member_ids: np.ndarray,
                        to_query: np.ndarray) -> np.ndarray:
        """Squared distances of (row, member) node pairs: the query's from `to_query` (its
        squared distances to the gallery), gallery pairs from the fit's R* pairs where there,
        the rest from canonical (float64) products; self pairs exactly 0."""
        n = self.gallery.size + 1
        result = np.zeros(len(row_ids), np.float32)
        with_query = (row_ids == 0) | (member_ids == 0)
        other = row_ids[with_query] + member_ids[with_query]
        result[with_query] = to_query[np.maximum(other - 1, 0)]
        rest = np.flatnonzero(~with_query & (row_ids != member_ids))
        keys = row_ids[rest] * n + member_ids[rest]
        found = np.searchsorted(self._pair_keys, keys).clip(max=len(self._pair_keys) - 1)
        known = self._pair_keys[found] == keys
        result[rest[known]] = self._pair_squared[found[known]]
        rest = rest[~known]
        for start in range(0, len(rest), 8192):
            part = rest[start:start + 8192]
            dots = np.einsum("ij,ij->i", self._gallery64[row_ids[part] - 1],
                             self._gallery64[member_ids[part] - 1])
            result[part] = squared_from_similarity(np.minimum(dots, 1.0).astype(np.float32))
        result[(row_ids == member_ids)] = 0.0
        return result

    def _lists_with_query(self, query_feature: np.ndarray, depth: int
                          ) -> tuple[NeighbourLists, np.ndarray]:
        """Neighbour lists over (query + gallery) from the stored gallery lists
        (`knn.lists_with_query`), and the query's squared distances to the gallery."""
        stored = self._gallery_lists
        to_query = canonical_similarity(self._gallery64, query_feature[None])[:, 0]
        similarities, indices = lists_with_query(
            torch.from_numpy(stored.similarities), torch.from_numpy(stored.indices),
            torch.from_numpy(to_query), depth)
        farthest = np.concatenate([[to_query.min()], np.minimum(stored.farthest, to_query)])
        lists = NeighbourLists(indices.numpy(), similarities.numpy(),
                               farthest.astype(np.float32))
        return lists, squared_from_similarity(to_query)


def _sort_keys(distances: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """int64 keys that sort as (distance, column) for float32 distances >= 0 and columns
    < 2**31: the distance's bits above the column."""
    return (distances.view(np.uint32).astype(np.int64) << 32) | columns


def _member_sets(lists: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """Each row's set {lists[r, a] : mask[r, a]} as a sorted, -1 padded (n, width) array."""
    return np.sort(np.where(mask, lists[:, :width], -1), axis=1)
