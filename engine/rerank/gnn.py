"""GNN re-ranking (Zhang et al., "Understanding Image Retrieval Re-Ranking: A Graph Neural
Network Perspective", arXiv 2012.07620).

A kNN graph over queries and gallery (k1 neighbours, self included) gives a binary adjacency A.
Twice: A <- A + A^T, then every row becomes the sum of its k2 nearest neighbours' rows weighted
by their squared cosine, and is L2-normalised. The score is
(1 - lambda) <A_q, A_g> + lambda <x_q, x_g>; lambda = 0 is the paper's version. Pure PyTorch with
sparse tensors (no custom CUDA op): memory grows with the edges, not with N^2. The paper, the
authors' code and the choices made here: docs/methods/gnn.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from engine.core.knn import (
    float32_scores,
    lists_with_query,
    read_only_tensor,
    torch_canonical_similarity,
    torch_topk_largest,
    torch_topk_similar,
)
from engine.core.types import Evidence, EvidenceGroup, GalleryContext
from engine.rerank import register
from engine.rerank._gnn import (
    lists_with_queries,
    normalise_sparse_rows,
    query_lists,
    query_similarities,
    sparse_rows,
)
from engine.rerank._gnn_online import GalleryPropagation, SmallGraphPropagation
from engine.rerank._scale import MEMORY_FRACTION, gib, memory_budget
from engine.rerank.base import Reranker, RerankParams, param

SCORE_CHUNK = 1024
DENSE_NODE_LIMIT = 4096
STRONGEST_NEIGHBOURS = 10
"""Shared neighbours an explanation names first (the rest follow in a second group)."""
NEGLIGIBLE = 2.0 ** -20
"""Entries of a propagated row below this share of its largest are rounding residues."""
BATCH_BYTES_PER_EDGE = 80
"""Peak bytes per non-zero of the propagated graph in a batch run: COO entries (two int64
indices, a float32 value) alive in about four copies at once (A + A^T, the product, its
coalesced and normalised forms)."""


@dataclass(frozen=True)
class GNNParams(RerankParams):
    k1: int = param(26, minimum=1, maximum=500, step=1,
                    help="kNN graph size, the node itself included")
    k2: int = param(7, minimum=1, maximum=100, step=1,
                    help="neighbours aggregated per propagation step (1 disables propagation)")
    lambda_value: float = param(0.3, minimum=0.0, maximum=1.0, step=0.05,
                                help="weight of the original cosine (0 = the paper's version)")


def propagate(neighbours: torch.Tensor, similarities: torch.Tensor, k2: int,
              layers: int = 2, dense_limit: int = DENSE_NODE_LIMIT) -> torch.Tensor:
    """The two message-passing layers on a kNN graph.

    Args:
        neighbours: (n, k1) int64 top-k1 node ids per node, most similar first (self first).
        similarities: (n, k1) cosine similarities matching `neighbours`.
        dense_limit: up to this many nodes the adjacency is held dense (after two layers it is
            nearly full on small graphs, where dense arithmetic is several times faster);
            above it, sparse COO, so memory follows the edges.
    Returns:
        The propagated (n, n) adjacency with unit-norm rows (binary A itself when k2 == 1),
        dense or sparse COO as above.
    """
    n, k1 = neighbours.shape
    device, dtype = neighbours.device, similarities.dtype
    dense = n <= dense_limit
    rows = torch.arange(n, device=device).repeat_interleave(k1)
    if dense:
        adjacency = torch.zeros((n, n), dtype=dtype, device=device)
        adjacency[rows, neighbours.reshape(-1)] = 1.0
    else:
        adjacency = sparse_rows(rows, neighbours.reshape(-1),
                                torch.ones(n * k1, device=device, dtype=dtype), (n, n))
    if k2 == 1:
        return adjacency
    weight_rows = torch.arange(n, device=device).repeat_interleave(k2)
    weights = sparse_rows(weight_rows, neighbours[:, :k2].reshape(-1),
                          (similarities[:, :k2] ** 2).reshape(-1), (n, n))
    for _ in range(layers):
        if dense:
            adjacency = torch.sparse.mm(weights, adjacency + adjacency.t())
            adjacency = adjacency / adjacency.norm(dim=1, keepdim=True)
        else:
            symmetric = (adjacency + adjacency.t()).coalesce()
            adjacency = normalise_sparse_rows(torch.sparse.mm(weights, symmetric).coalesce())
    return adjacency


def gnn_scores(features: torch.Tensor, n_queries: int, k1: int, k2: int, lambda_value: float,
               k: int, exclude_self: bool, neighbours: torch.Tensor | None = None,
               similarities: torch.Tensor | None = None,
               adjacency: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k re-ranked gallery items for the first `n_queries` nodes.

    Args:
        features: (n, d) unit rows; rows [0, n_queries) are queries, the gallery is rows
            [n_queries, n) or, with `exclude_self`, all rows (leave-one-out, n_queries = n).
        neighbours, similarities: the (n, k1) kNN graph when already known.
        adjacency: its `propagate`d adjacency when already known.
    Returns:
        scores (n_queries, k) descending and gallery indices (n_queries, k).
    """
    if adjacency is None:
        if neighbours is None:
            similarities, neighbours = torch_topk_similar(features, k1)
        adjacency = propagate(neighbours, similarities, k2)
    offset = 0 if exclude_self else n_queries
    gallery_features = features[offset:]
    if adjacency.is_sparse:
        gallery_adjacency = (adjacency if offset == 0 else
                             _sparse_row_slice(adjacency, offset, features.shape[0]))
        gallery_transposed = gallery_adjacency.t().coalesce().to_sparse_csr()
    else:
        gallery_adjacency = adjacency[offset:]
    top_scores, top_indices = [], []
    for start in range(0, n_queries, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, n_queries)
        if adjacency.is_sparse:
            query_rows = _sparse_row_slice(adjacency, start, stop).to_sparse_csr()
            graph_score = _csr_to_dense(torch.sparse.mm(query_rows, gallery_transposed))
        else:
            graph_score = adjacency[start:stop] @ gallery_adjacency.t()
        score = (1.0 - lambda_value) * graph_score
        if lambda_value:
            score = score + lambda_value * (features[start:stop] @ gallery_features.t())
        if exclude_self:
            score[torch.arange(stop - start), torch.arange(start, stop)] = -torch.inf
        values, order = torch_topk_largest(score, k)
        top_scores.append(values)
        top_indices.append(order)
    return torch.cat(top_scores), torch.cat(top_indices)


def _csr_to_dense(matrix: torch.Tensor) -> torch.Tensor:
    """Scatter a CSR matrix into a dense tensor (torch's own to_dense is slow on the CPU)."""
    counts = matrix.crow_indices().diff()
    rows = torch.arange(matrix.shape[0], device=counts.device).repeat_interleave(counts)
    dense = torch.zeros(matrix.shape, dtype=matrix.dtype, device=matrix.device)
    dense[rows, matrix.col_indices()] = matrix.values()
    return dense


def _sparse_row_slice(matrix: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    indices, values = matrix.indices(), matrix.values()
    keep = (indices[0] >= start) & (indices[0] < stop)
    shifted = torch.stack([indices[0, keep] - start, indices[1, keep]])
    return torch.sparse_coo_tensor(shifted, values[keep], (stop - start, matrix.shape[1]),
                                   check_invariants=False, is_coalesced=True)


@register
class GNNReranker(Reranker):
    """GNN re-ranking; distances are 1 - score (score in [-lambda, 1])."""

    name = "gnn"
    title = "GNN re-ranking (Zhang et al.)"
    distance_note = ("1 - score, where score = (1 - λ) × overlap of the two items' propagated "
                     "kNN-graph rows + λ × cosine: 0 to 1 + λ, smaller is closer")
    Params = GNNParams
    runs_on_gpu = True
    details_schema: ClassVar[dict[str, str]] = {
        "k1": "the kNN graph's size used (k1, clamped to the graph)",
        "k2": "the propagation's neighbourhood used (k2, clamped to k1 + 1)",
        "lambda_value": "weight of the original similarity in the final score",
        "device": "where the batch ran (cpu, cuda:0, ...)",
        "clamped": "why k1 / k2 were lowered (a gallery smaller than the neighbourhood)",
        "rows_recomputed": ("online: graph rows propagated afresh because the query changed "
                            "them (the other rows' scores are corrected, not recomputed)"),
    }
    patch_min_nodes: ClassVar[int] = DENSE_NODE_LIMIT
    """Graphs of more nodes patch online queries with the sparse `GalleryPropagation`; smaller
    ones with `SmallGraphPropagation` (dense (n, n) tables: 2 x 64 MiB at 4,096 nodes)."""

    def _effective(self, n_nodes: int) -> tuple[int, int, dict[str, Any]]:
        k1 = min(self.params.k1, n_nodes)
        k2 = min(self.params.k2, k1)
        details: dict[str, Any] = {"k1": k1, "k2": k2, "lambda_value": self.params.lambda_value,
                                   "device": str(self.device)}
        if (k1, k2) != (self.params.k1, self.params.k2):
            details["clamped"] = (f"k1={self.params.k1}, k2={self.params.k2} clamped to "
                                  f"k1={k1}, k2={k2} for a graph of {n_nodes} nodes")
        return k1, k2, details

    def graph_depth(self) -> int:
        """Fit reads each item's k1 nearest (itself first)."""
        return self.params.k1

    def _fit(self, context: GalleryContext) -> None:
        """Takes the gallery's kNN lists from `context.knn` when it is deep enough (exact or
        approximate; a search of its own otherwise) and, for CPU online queries, propagates
        the gallery-only graph once (`_gnn_online`)."""
        k1, _, _ = self._effective(context.size + 1)
        depth = min(k1, context.size)
        self._features = context.features
        self._gallery = read_only_tensor(context.features).to(self.device)
        shared = context.knn
        if shared is not None and shared.depth >= depth:
            self._lists = np.ascontiguousarray(shared.indices[:, :depth])
            self._list_similarities = np.ascontiguousarray(shared.similarities[:, :depth])
        else:
            similarities, neighbours = torch_topk_similar(self._gallery, depth)
            self._lists = neighbours.cpu().numpy()
            self._list_similarities = similarities.cpu().numpy()
        self._floors = self._list_similarities.min(axis=1)  # a list's smallest similarity
        self._gallery_neighbours = torch.from_numpy(self._lists).to(self.device)
        self._gallery_similarities = torch.from_numpy(self._list_similarities).to(self.device)
        # CPU online queries patch the propagated gallery graph instead of propagating every
        # row again: up to `patch_min_nodes` nodes through the small-graph path, above it the
        # sparse one.
        self._propagation: GalleryPropagation | SmallGraphPropagation | None = None
        if self.device.type == "cpu" and context.size >= k1 and self.params.k2 > 1:
            patch = (GalleryPropagation if context.size + 1 > self.patch_min_nodes
                     else SmallGraphPropagation)
            self._propagation = patch(self._lists, self._list_similarities, k1,
                                      min(self.params.k2, k1))

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """Refuses when the propagated graph of queries + gallery (its non-zeros per row
        measured on the fitted gallery's graph, or bounded) would not fit in the share of the
        memory available now that a batch may plan to use (`_scale.memory_budget`).
        `n_queries = gallery_size` is how leave-one-out arrives, and is counted as that (no
        extra nodes)."""
        budget = memory_budget()
        needed = self._batch_bytes(gallery_size, n_queries)
        if budget is None or needed <= budget:
            return None
        return (f"it would need about {gib(needed)} for the propagated graph of "
                f"{gallery_size + n_queries:,} nodes, more than {gib(budget)} "
                f"({MEMORY_FRACTION:.0%} of the memory available); use online mode")

    def _batch_bytes(self, gallery_size: int, n_queries: int) -> int:
        """Peak bytes of a batch run: the propagated graph's non-zeros times
        `BATCH_BYTES_PER_EDGE` (sparse copies alive at once), one dense score chunk, the
        nodes' kNN lists. Edges per row: as measured at fit on the gallery's graph, else the
        bound k1 (no propagation) or min(n, (2 k1 k2)^2)."""
        n = gallery_size + (0 if n_queries in (0, gallery_size) else n_queries)
        k1, k2 = min(self.params.k1, n), min(self.params.k2, self.params.k1, n)
        if k2 == 1:
            per_row = k1
        elif isinstance(getattr(self, "_propagation", None), GalleryPropagation):
            per_row = self._propagation.edges / max(1, self._propagation.n - 1)
        else:
            per_row = min(n, (2 * k1 * k2) ** 2)
        scored = min(SCORE_CHUNK, n_queries or gallery_size) * gallery_size * 4
        return int(n * per_row * BATCH_BYTES_PER_EDGE + scored + n * k1 * 12)

    def _node_lists(self, query_features: np.ndarray | None, k1: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch graph's kNN lists from fit's (no second gallery search), or None when
        fit's lists are too short (a gallery smaller than k1: the batch searches itself)."""
        if self._lists.shape[1] < k1:
            return None
        if query_features is None:
            similarities, lists = self._list_similarities[:, :k1], self._lists[:, :k1]
        else:
            floors = self._list_similarities[:, :k1].min(axis=1)
            similarities, lists = lists_with_queries(self._list_similarities, self._lists,
                                                     floors, query_features, self._features,
                                                     k1)
        return (torch.from_numpy(np.ascontiguousarray(lists)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(similarities)).to(self.device))

    def _rerank_batch(self, query_features: np.ndarray | None, k: int):
        gallery = self._gallery
        if query_features is None:
            features, n_queries = gallery, gallery.shape[0]
        else:
            features = torch.cat([torch.from_numpy(query_features).to(self.device), gallery])
            n_queries = query_features.shape[0]
        k1, k2, details = self._effective(features.shape[0])
        known = self._node_lists(query_features, k1)
        neighbours, similarities = known if known is not None else (None, None)
        with torch.inference_mode():
            scores, indices = gnn_scores(features, n_queries, k1, k2, self.params.lambda_value,
                                         k, exclude_self=query_features is None,
                                         neighbours=neighbours, similarities=similarities)
        return (1.0 - scores).cpu().numpy(), indices.cpu().numpy(), details

    def _rerank_online(self, query_feature: np.ndarray, k: int):
        """Batch with this single query, reusing the gallery's precomputed kNN graph.

        The query is node 0, gallery item j node j + 1 (`knn.lists_with_query`): only the
        query's own similarities are computed, in float32, and canonically (float64 sums) only
        where they decide a list (`_gnn.query_similarities`). On the CPU the propagated gallery
        graph is patched (`_gnn_online`): only the rows the query changes are propagated
        again; on a GPU (or a graph too small to patch) the graph is propagated as in batch.
        """
        size = self._gallery.shape[0]
        k1, k2, details = self._effective(size + 1)
        with torch.inference_mode():
            arrival = self._arrival(query_feature)
            if arrival.patched is not None:
                graph, recomputed = self._propagation.scores(arrival.patched)
                return self._online_result(graph, arrival.cosine, k,
                                           {**details, "rows_recomputed": recomputed})
            features = torch.cat([arrival.query[None, :], self._gallery])
            scores, indices = gnn_scores(features, 1, k1, k2, self.params.lambda_value, k,
                                         exclude_self=False, neighbours=arrival.neighbours,
                                         similarities=arrival.similarities)
        return (1.0 - scores[0]).cpu().numpy(), indices[0].cpu().numpy(), details

    def _arrival(self, query_feature: np.ndarray) -> _OnlineArrival:
        """One online query's cosine to the gallery, its kNN lists with the query in and, on
        the CPU paths, its arrival in the patched propagated graph (`_rerank_online`)."""
        gallery = self._gallery
        size = gallery.shape[0]
        k1, _, _ = self._effective(size + 1)
        query = torch.from_numpy(query_feature).to(self.device)
        if self.device.type == "cpu":
            # the product the baseline and the other methods ranking this query read too
            cosine = torch.from_numpy(float32_scores(self._features, query_feature).copy())
            floors = (self._floors if self._lists.shape[1] >= k1 else
                      np.full(size, -np.inf, np.float32))  # every list has a free slot
            to_query = torch.from_numpy(query_similarities(
                cosine.numpy(), self._features, query_feature, floors, min(k1 - 1, size)))
        else:
            cosine = (query[None, :] @ gallery.t())[0]
            to_query = torch_canonical_similarity(gallery, query[None, :])[:, 0]
        if isinstance(self._propagation, GalleryPropagation):
            rows, lists, similarities = query_lists(
                self._list_similarities, self._lists, self._floors, to_query.numpy(), k1)
            return _OnlineArrival(query, cosine, None, None,
                                  self._propagation.arrive(rows, lists, similarities))
        all_similarities, all_neighbours = lists_with_query(
            self._gallery_similarities, self._gallery_neighbours, to_query, k1)
        patched = None
        if self._propagation is not None:
            patched = self._propagation.arrive(all_neighbours.numpy(), all_similarities.numpy())
        return _OnlineArrival(query, cosine, all_neighbours, all_similarities, patched)

    def _final_scores(self, graph: np.ndarray, cosine: torch.Tensor) -> torch.Tensor:
        """(G,) final similarities from the graph scores of all nodes (the query's own, node
        0, dropped) and the query's cosine to every gallery item."""
        score = (1.0 - self.params.lambda_value) * torch.from_numpy(graph[1:])
        if self.params.lambda_value:
            score = score + self.params.lambda_value * cosine
        return score

    def _online_result(self, graph: np.ndarray, cosine: torch.Tensor, k: int,
                       details: dict[str, Any]):
        """Distances and indices of the top k from the graph scores of all nodes and the
        query's cosine to every gallery item (`_final_scores`)."""
        values, order = torch_topk_largest(self._final_scores(graph, cosine)[None, :], k)
        return (1.0 - values[0]).numpy(), order[0].numpy(), details

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The shared nodes of the query's and the item's propagated rows, each with its
        contribution (1 - lambda) A2'[q, m] A2'[item, m] to the final similarity, the
        cosine's lambda part, and whether the kNN edge query <-> item is mutual, from the
        online computation itself (`_arrival`): the final distance is the one online mode
        returns for the item (every item has one: k = the gallery). The rows come from the
        same propagation; the patched paths score most rows through a correction instead, so
        the contributions sum to the graph score up to float rounding."""
        size = self._gallery.shape[0]
        k1, k2, _ = self._effective(size + 1)
        node, lam = item + 1, self.params.lambda_value
        with torch.inference_mode():
            arrival = self._arrival(query_feature)
            if arrival.patched is not None:
                graph, _ = self._propagation.scores(arrival.patched)
                final = float(self._final_scores(graph, arrival.cosine)[item])
                graph_score = float(graph[node])
                rows = self._propagation.rows(arrival.patched, np.array([node]))
                query_row = arrival.patched.fresh[0]
                if isinstance(self._propagation, GalleryPropagation):
                    query_list = self._propagation.node_list(arrival.patched, 0)
                    item_list = self._propagation.node_list(arrival.patched, node)
                else:
                    query_list, item_list = arrival.patched.lists[[0, node]]
                query_entries, item_entries = _sparse_entries(query_row), _sparse_entries(rows)
            else:
                adjacency = propagate(arrival.neighbours, arrival.similarities, k2)
                features = torch.cat([arrival.query[None, :], self._gallery])
                scores, indices = gnn_scores(features, 1, k1, k2, lam, size, exclude_self=False,
                                             neighbours=arrival.neighbours,
                                             similarities=arrival.similarities,
                                             adjacency=adjacency)
                final = float(scores[0][indices[0] == item][0])
                query_entries, item_entries = (_adjacency_row(adjacency, 0),
                                               _adjacency_row(adjacency, node))
                graph_score = None  # the shared entries' sum below
                query_list, item_list = arrival.neighbours[[0, node]].cpu().numpy()
            cosine = float(arrival.cosine[item])
        shared, query_values, item_values = _shared_entries(_significant(query_entries),
                                                            _significant(item_entries))
        if graph_score is None:
            graph_score = float(np.dot(query_values, item_values))
        contributions = (1.0 - lam) * query_values * item_values
        order = np.argsort(-contributions, kind="stable")
        shared, contributions = shared[order], contributions[order]
        at_query = float(contributions[shared == 0].sum())
        gallery = shared > 0
        shared, contributions = shared[gallery] - 1, contributions[gallery]
        strongest = min(STRONGEST_NEIGHBOURS, shared.size)
        lists_item, listed_by_item = bool(np.isin(node, query_list)), bool(np.isin(0, item_list))
        edge = ("a mutual kNN edge with the query" if lists_item and listed_by_item else
                "in the query's kNN list only" if lists_item else
                "the query is in its kNN list only" if listed_by_item else
                "no kNN edge with the query")
        graph_part = (1.0 - lam) * graph_score
        top = float(contributions[:strongest].sum())
        share = top / graph_part if graph_part > 0 else 0.0
        summary = (f"{strongest} shared neighbours give {share:.0%} of its graph score; {edge}"
                   if strongest else f"no shared propagated neighbours; {edge}")
        if lam == 1.0:
            summary = f"lambda = 1 ranks by the cosine alone ({cosine:.3f}); {edge}"
        numbers = {
            "graph score": graph_score,
            "contribution of the query node": at_query,
            "cosine similarity": cosine,
            "lambda": float(lam),
            "cosine contribution": lam * cosine,
            "final similarity": final,
            "final distance": float(np.float32(1.0) - np.float32(final)),
            "query lists it": float(lists_item),
            "it lists the query": float(listed_by_item),
        }
        value_name = ("contribution (1 - lambda) A2'[query, m] A2'[item, m] to the final "
                      "similarity")
        groups = (EvidenceGroup("strongest neighbours", shared[:strongest],
                                contributions[:strongest], value_name),
                  EvidenceGroup("other shared neighbours", shared[strongest:],
                                contributions[strongest:], value_name, highlight=False))
        return Evidence(self.name, item, summary, numbers, groups)


@dataclass(frozen=True)
class _OnlineArrival:
    """One online query in the graph (`GNNReranker._arrival`): its feature (a tensor on the
    device), cosine (G,) to the gallery, and either the patched arrival of the CPU
    propagation (`_gnn_online`) or, for a graph propagated whole, the (G + 1, k1) lists and
    similarities with the query in (node 0)."""

    query: torch.Tensor
    cosine: torch.Tensor
    neighbours: torch.Tensor | None
    similarities: torch.Tensor | None
    patched: Any


def _sparse_entries(row: Any) -> tuple[np.ndarray, np.ndarray]:
    """A one-row scipy matrix's columns (ascending) and float64 values."""
    row = row.tocsr()
    order = np.argsort(row.indices)
    return row.indices[order].astype(np.int64), row.data[order].astype(np.float64)


def _adjacency_row(adjacency: torch.Tensor, node: int) -> tuple[np.ndarray, np.ndarray]:
    """Row `node` of a `propagate`d adjacency (dense or sparse COO) as its non-zero columns
    (ascending) and float64 values."""
    if adjacency.is_sparse:
        indices, values = adjacency.indices(), adjacency.values()
        keep = indices[0] == node
        columns, row = indices[1, keep].cpu().numpy(), values[keep].cpu().numpy()
    else:
        dense = adjacency[node].cpu().numpy()
        columns = np.flatnonzero(dense)
        row = dense[columns]
    order = np.argsort(columns)
    return columns[order].astype(np.int64), row[order].astype(np.float64)


def _significant(entries: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A row's entries without those at the float32 rounding of its largest (below
    `NEGLIGIBLE` of it): a patched row's change that cancels an entry leaves about 1e-9 of
    the row's largest there, where real entries are above 1e-4 of it."""
    columns, values = entries
    keep = values > NEGLIGIBLE * values.max(initial=0.0)
    return columns[keep], values[keep]


def _shared_entries(left: tuple[np.ndarray, np.ndarray], right: tuple[np.ndarray, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The columns two sparse rows share, with each row's values there."""
    shared, at_left, at_right = np.intersect1d(left[0], right[0], assume_unique=True,
                                               return_indices=True)
    return shared, left[1][at_left], right[1][at_right]
