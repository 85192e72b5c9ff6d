"""What AQE, alpha-QE and alpha-DBA share: weighted sums of neighbours and the expanded search.

Query expansion (Chum et al., ICCV 2007; Radenovic, Tolias, Chum, TPAMI 2018) replaces a query q
by the unit vector of q + sum_j w_j g_j over its n nearest gallery items g_j, w_j = s_j^alpha
(s_j their cosine similarity to q, alpha = 0: the plain mean, AQE), and searches the gallery
again. Database-side augmentation (Arandjelovic & Zisserman 2012; Radenovic et al. 2018) does
the same to every gallery item once, at fit, over the item's own neighbours (itself first, at
similarity 1, so weight 1), and searches the augmented gallery.

Batch mode and DBA's augmentation run on `self.device` with the torch twins of the numpy
functions here (`torch_*`: the same float64 sums and float32 products, ties to the smaller
index); the online mode, one query, runs on the CPU with numpy whatever the device.

A similarity below 0 weighs 0 for alpha > 0 (s^alpha of a negative s is undefined for most
alpha); alpha = 0 weighs every neighbour 1, whatever its similarity, as AQE's mean does.
Neighbours are chosen by canonical similarities (`engine.core.knn.canonical_similarity`), ties
to the smaller index, so batch and online runs expand a query with the same items; sums are
taken in float64 and the unit vectors stored in float32. The final search is one float32
product of the expanded query with the searched gallery (rows of queries at a time in batch
mode, never a (G, G) matrix). The notes: docs/methods/query_expansion.md.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from engine.core.knn import device_tensor, float32_scores, top_k_smallest, torch_topk_largest
from engine.core.types import Evidence, EvidenceGroup, GalleryContext
from engine.rerank._scale import canonical_block, query_top, torch_canonical_block
from engine.rerank.base import Reranker

GATHER_ELEMENTS = 1 << 22
"""float64 elements of one gathered (rows, n, d) block of neighbour features (32 MiB)."""
BLOCK_BYTES = 1 << 28
"""Memory of one block of a batch's (rows, G) arrays: canonical similarities for choosing the
neighbours, float32 scores, distances and the top-k selection (`BYTES_PER_SCORE` each)."""
BYTES_PER_SCORE = 32
MAX_BLOCK_ROWS = 1024
DISTANCE = "1 - cosine similarity of the expanded query to the item"


def expansion_weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """w = max(s, 0)^alpha in float64 (alpha = 0: every weight 1, AQE's mean)."""
    return np.maximum(np.asarray(similarities, np.float64), 0.0) ** float(alpha)


def weighted_sums(gallery: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                  base: np.ndarray | None = None) -> np.ndarray:
    """(B, d) float64 sums base[b] + sum_j weights[b, j] * gallery[ids[b, j]], gathered in
    blocks of `GATHER_ELEMENTS`.

    Args:
        gallery: (G, d) float rows; ids: (B, n) int rows of it; weights: (B, n) float.
        base: (B, d) vectors the sums start from (the queries), or None (zero).
    """
    rows, width = ids.shape
    dim = gallery.shape[1]
    out = np.zeros((rows, dim)) if base is None else np.array(base, np.float64)
    if width == 0:
        return out
    step = max(1, GATHER_ELEMENTS // (width * dim))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        gathered = np.asarray(gallery[ids[start:stop]], np.float64)          # (b, n, d)
        # a batched (1, n) x (n, d) product: 1.6 times faster than einsum's loop here
        out[start:stop] += np.matmul(
            np.asarray(weights[start:stop], np.float64)[:, None, :], gathered)[:, 0]
    return out


def unit_rows(vectors: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 rows divided by their norms, as float32 unit rows, and the norms (B,) float64.

    A row whose sum cancelled to (almost) nothing (AQE with neighbours opposite the query, a
    constructed case) keeps its `fallback` row (the query itself) and reports norm 0.
    """
    norms = np.linalg.norm(vectors, axis=1)
    empty = norms < 1e-12
    safe = np.where(empty, 1.0, norms)
    units = (vectors / safe[:, None]).astype(np.float32)
    if empty.any():
        units[empty] = np.asarray(fallback, np.float32)[empty]
        norms = np.where(empty, 0.0, norms)
    return units, norms


def torch_expansion_weights(similarities: torch.Tensor, alpha: float) -> torch.Tensor:
    """Torch twin of `expansion_weights`."""
    return similarities.double().clamp(min=0.0).pow(float(alpha))


def torch_weighted_sums(gallery: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        base: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin of `weighted_sums`, on the gallery's device."""
    rows, width = ids.shape
    dim = gallery.shape[1]
    out = (torch.zeros((rows, dim), dtype=torch.float64, device=gallery.device)
           if base is None else base.double().clone())
    if width == 0:
        return out
    step = max(1, GATHER_ELEMENTS // (width * dim))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        gathered = gallery[ids[start:stop]].double()                          # (b, n, d)
        out[start:stop] += torch.bmm(weights[start:stop].double()[:, None, :], gathered)[:, 0]
    return out


def torch_unit_rows(vectors: torch.Tensor, fallback: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `unit_rows`."""
    norms = torch.linalg.vector_norm(vectors, dim=1)
    empty = norms < 1e-12
    units = (vectors / torch.where(empty, 1.0, norms)[:, None]).float()
    if bool(empty.any()):
        units[empty] = fallback[empty].float()
        norms = torch.where(empty, 0.0, norms)
    return units, norms


def ranking(scores: np.ndarray, k: int, exclude: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by descending similarity, ties to the smaller index, as (distances 1 - s float32,
    indices int64), faiss's order. scores: (B, G) float32; exclude: (B,) a column per row that
    must not be returned (leave-one-out's self), or None."""
    distances = (np.float32(1.0) - np.asarray(scores, np.float32)).astype(np.float32)
    if exclude is not None:
        distances[np.arange(len(exclude)), exclude] = np.inf
    return top_k_smallest(distances, k)


def torch_ranking(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `ranking`, on the scores' device."""
    distances = 1.0 - scores.float()
    if exclude is not None:
        distances[torch.arange(len(exclude), device=distances.device), exclude] = torch.inf
    negative, indices = torch_topk_largest(-distances, k)
    return -negative, indices


def top_neighbours(queries: np.ndarray, searched: np.ndarray, n: int,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's n most similar rows of `searched` by canonical similarity, ties to the
    smaller index, without row exclude[b] for query b: (similarities (B, n) float32
    descending, ids (B, n) int64). Equal to `query_top` of one query (the online path)."""
    similarities = canonical_block(queries, searched)
    if exclude is not None:
        similarities[np.arange(len(exclude)), exclude] = -np.inf
    values, ids = top_k_smallest(-similarities, n)
    return -values, ids


def torch_top_neighbours(queries: torch.Tensor, searched: torch.Tensor, n: int,
                         exclude: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `top_neighbours`, on the searched rows' device."""
    similarities = torch_canonical_block(queries, searched)
    if exclude is not None:
        similarities[torch.arange(len(exclude), device=searched.device), exclude] = -torch.inf
    return torch_topk_largest(similarities, n)


def graph_neighbours(indices: np.ndarray, similarities: np.ndarray, rows: np.ndarray, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The first n entries of the graph rows `rows` other than the row's own item (the graph
    lists each item first in its own row): (similarities (B, n), ids (B, n))."""
    ids = indices[rows]
    others = ids != rows[:, None]
    keep = np.argsort(~others, axis=1, kind="stable")[:, :n]     # others first, in list order
    return (np.take_along_axis(similarities[rows], keep, 1),
            np.take_along_axis(ids, keep, 1).astype(np.int64))


def block_rows(gallery_size: int, n_queries: int) -> int:
    """Queries per block of a batch, so that its (rows, G) arrays stay near `BLOCK_BYTES`."""
    room = BLOCK_BYTES // max(1, BYTES_PER_SCORE * gallery_size)
    return int(max(1, min(MAX_BLOCK_ROWS, room, n_queries)))


@dataclass(frozen=True)
class Expansion:
    """One query's expansion over the searched rows, as the online path computed it.

    ids, similarities, weights: (n,) the expansion neighbours (best first), their canonical
    similarities to the query and weights. total: (d,) float64 q + sum_j w_j g_j; norm: its
    norm (0: nothing to expand, the query itself searched); query: (d,) float32 searched with.
    scores: (G,) float32 similarity of `query` to every searched row.
    """

    ids: np.ndarray
    similarities: np.ndarray
    weights: np.ndarray
    total: np.ndarray
    norm: float
    query: np.ndarray
    scores: np.ndarray


class ExpandedSearch(Reranker):
    """Base of AQE, alpha-QE and alpha-DBA (not registered): a query, expanded by its n nearest
    searched rows, against the searched rows.

    A subclass says how queries expand (`_expansion`: n and alpha; n = 0 searches the query as
    it is) and may replace the searched rows at fit (DBA's augmented gallery). Leave-one-out
    (batch, `query_features=None`): gallery item i is the query, with its original feature; it
    is never among its own expansion neighbours nor in its result. When the rows searched are
    the gallery's own features, those neighbours are read from the gallery's kNN graph when it
    is deep enough (exact or approximate, `graph_depth`).
    """

    distance_note: ClassVar[str] = (
        "1 - cosine similarity of the expanded query (the query plus its nearest items, "
        "weighted, normalised) to the item (0 to 2)")
    details_schema: ClassVar[dict[str, str]] = {
        "distance": "what the distances are",
        "expansion": "(queries, n) int: each query's expansion neighbours, best first "
                     "(online: (n,)); empty when expansion is off",
        "weights": "(queries, n) float: their weights in the expanded query, similarity^alpha "
                   "(online: (n,))",
        "clamped": "the expansion size lowered to fit the gallery, with the value used",
    }
    baseline: ClassVar[bool] = True
    runs_on_gpu: ClassVar[bool] = True
    """Batch mode (and DBA's augmentation at fit) run on `self.device`; online on the CPU."""
    exact_neighbours: ClassVar[bool] = False
    """An expanded query drifts towards its neighbours: a near-duplicate of a gallery item may
    rank a central neighbour of that item first (measured on the demo features, n = 10 and 50
    of a 120-item gallery)."""

    @abstractmethod
    def _expansion(self) -> tuple[int, float]:
        """(n, alpha) of the query expansion: neighbours and exponent of their weights."""

    def graph_depth(self) -> int:
        """Leave-one-out reads each item's n nearest besides itself from the gallery graph."""
        n, _ = self._expansion()
        return n + 1 if n else 0

    def _fit(self, context: GalleryContext) -> None:
        self._searched = context.features
        self._lists: tuple[np.ndarray, np.ndarray] | None = None
        n, _ = self._expansion()
        depth = min(n + 1, context.size)
        knn = context.knn
        if n and knn is not None and knn.depth >= depth:
            self._lists = (knn.indices[:, :depth], knn.similarities[:, :depth])

    def _clamped(self, available: int) -> tuple[int, dict[str, Any]]:
        n, _ = self._expansion()
        used = min(n, available)
        details: dict[str, Any] = {"distance": DISTANCE}
        if used != n:
            details["clamped"] = f"n={n} lowered to {used}: the gallery offers {available} items"
        return used, details

    # -- online -------------------------------------------------------------------------------
    def _expand_online(self, query: np.ndarray) -> Expansion:
        """The online expansion of one query (d,) over the searched rows: its n best by
        canonical similarity (`query_top`, from the float32 product shared with the other
        methods ranking this query), their weights, and the expanded query's scores."""
        searched = self._searched
        _, alpha = self._expansion()
        n, _ = self._clamped(len(searched))
        query = np.asarray(query, np.float32)
        original = float32_scores(searched, query)
        if n == 0:
            empty = np.zeros(0)
            return Expansion(empty.astype(np.int64), empty, empty, query.astype(np.float64),
                             1.0, query, original)
        similarities, ids = query_top(searched, query, n, scores=original)
        weights = expansion_weights(similarities, alpha)
        total = weighted_sums(searched, ids[None], weights[None], base=query[None])
        expanded, norm = unit_rows(total, query[None])
        return Expansion(ids, similarities, weights, total[0], float(norm[0]), expanded[0],
                         np.asarray(searched, np.float32) @ expanded[0])

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        expansion = self._expand_online(query_feature)
        _, details = self._clamped(len(self._searched))
        distances, indices = ranking(expansion.scores[None], k)
        return distances[0], indices[0], {**details, "expansion": expansion.ids,
                                          "weights": expansion.weights}

    # -- batch --------------------------------------------------------------------------------
    def _reads_graph(self, n: int) -> bool:
        """Leave-one-out reads n neighbours besides the item from the gallery graph's lists."""
        return self._lists is not None and self._lists[0].shape[1] > n

    def _batch_neighbours(self, block: np.ndarray, n: int, exclude: np.ndarray | None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """The block's expansion neighbours: from the gallery graph for leave-one-out rows
        when it lists n others, else by canonical similarity to every searched row."""
        if exclude is not None and self._reads_graph(n):
            return graph_neighbours(*self._lists, exclude, n)
        return top_neighbours(block, self._searched, n, exclude)

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Each query on its own (expansion is per query, not transductive), in blocks of
        rows: neighbours, expanded queries, their float32 product with the searched rows."""
        if self.device.type != "cpu":
            return self._rerank_batch_torch(query_features, k, self.device)
        searched = self._searched
        leave_one_out = query_features is None
        source = self.gallery.features if leave_one_out else query_features
        n, details = self._clamped(len(searched) - 1 if leave_one_out else len(searched))
        _, alpha = self._expansion()
        n_queries = len(source)
        distances = np.empty((n_queries, k), np.float32)
        indices = np.empty((n_queries, k), np.int64)
        expansion = np.empty((n_queries, n), np.int64)
        weights = np.empty((n_queries, n), np.float64)
        rows = block_rows(len(searched), n_queries)
        for start in range(0, n_queries, rows):
            stop = min(start + rows, n_queries)
            block = np.asarray(source[start:stop], np.float32)
            exclude = np.arange(start, stop) if leave_one_out else None
            expanded = block
            if n:
                similarities, ids = self._batch_neighbours(block, n, exclude)
                expansion[start:stop] = ids
                weights[start:stop] = expansion_weights(similarities, alpha)
                expanded, _ = unit_rows(
                    weighted_sums(searched, ids, weights[start:stop], base=block), block)
            distances[start:stop], indices[start:stop] = ranking(expanded @ searched.T, k,
                                                                 exclude)
        return distances, indices, {**details, "expansion": expansion, "weights": weights}

    def _rerank_batch_torch(self, query_features: np.ndarray | None, k: int,
                            device: torch.device
                            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """`_rerank_batch` with the torch twins of its functions, every step on `device`
        (leave-one-out's neighbours read from the gallery graph on the CPU, as there)."""
        searched = device_tensor(self._searched, device, np.float32)
        leave_one_out = query_features is None
        source = self.gallery.features if leave_one_out else query_features
        n, details = self._clamped(len(searched) - 1 if leave_one_out else len(searched))
        _, alpha = self._expansion()
        n_queries = len(source)
        distances, indices, expansion, weights = [], [], [], []
        rows = block_rows(len(searched), n_queries)
        for start in range(0, n_queries, rows):
            stop = min(start + rows, n_queries)
            block = device_tensor(source[start:stop], device, np.float32)
            exclude = torch.arange(start, stop, device=device) if leave_one_out else None
            expanded = block
            ids = torch.empty((stop - start, 0), dtype=torch.int64, device=device)
            weight = torch.empty((stop - start, 0), dtype=torch.float64, device=device)
            if n:
                if leave_one_out and self._reads_graph(n):
                    similarities, ids = (device_tensor(part, device) for part in graph_neighbours(
                        *self._lists, np.arange(start, stop), n))
                else:
                    similarities, ids = torch_top_neighbours(block, searched, n, exclude)
                weight = torch_expansion_weights(similarities, alpha)
                expanded, _ = torch_unit_rows(
                    torch_weighted_sums(searched, ids, weight, base=block), block)
            ranked = torch_ranking(expanded @ searched.T, k, exclude)
            for out, part in zip((distances, indices, expansion, weights),
                                 (*ranked, ids, weight), strict=True):
                out.append(part.cpu().numpy())
        distances, indices, expansion, weights = (np.concatenate(parts) for parts in (
            distances, indices, expansion, weights))
        return (distances.astype(np.float32), indices.astype(np.int64),
                {**details, "expansion": expansion.astype(np.int64),
                 "weights": weights.astype(np.float64)})

    # -- evidence -----------------------------------------------------------------------------
    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The expansion neighbours with their weights and each one's share of the item's
        final similarity: s = (<q, x> + sum_j w_j <g_j, x>) / |q + sum_j w_j g_j|, so the
        query's own term and the neighbours' terms sum to s."""
        expansion = self._expand_online(query_feature)
        searched = np.asarray(self._searched, np.float32)
        target = searched[item].astype(np.float64)
        query = np.asarray(query_feature, np.float64)
        cosine = float(query @ target)
        if expansion.norm == 0.0:         # nothing expanded: the query itself was searched
            own, terms = cosine, np.zeros(len(expansion.ids))
        else:
            own = cosine / expansion.norm
            terms = (expansion.weights * (searched[expansion.ids].astype(np.float64) @ target)
                     / expansion.norm)
        final = own + float(terms.sum())
        n, alpha = len(expansion.ids), self._expansion()[1]
        summary = (f"expanded with its {n} nearest items, the query has similarity "
                   f"{final:.3f} to it (cosine {cosine:.3f}), {float(terms.sum()):+.3f} of it "
                   f"from those items" if n else
                   f"expansion is off: its cosine similarity to the query is {cosine:.3f}")
        numbers = {"cosine similarity": cosine, "query's own term": own,
                   "neighbours' terms": float(terms.sum()), "expanded similarity": final,
                   "expansion norm": expansion.norm, "alpha": float(alpha)}
        groups = (
            EvidenceGroup("expansion neighbours", expansion.ids, terms,
                          "term of the item's expanded similarity"),
            EvidenceGroup("expansion weights", expansion.ids, expansion.weights,
                          "weight in the expanded query (similarity^alpha)", highlight=False),
        )
        return Evidence(self.name, item, summary, numbers, groups)
