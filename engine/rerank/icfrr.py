"""ICFRR: iterative cluster-free re-ranking (Hudson & Smith, arXiv 2303.17703).

A gallery item climbs when it sits high in the gallery->gallery rankings of the items currently
ranked first for the query. As the authors' code does it (`src/rerank.py`):

- the original scores are a per-**position** prior: base[p] is the p-th best original score
  (minus the Euclidean distance), attached to whichever item holds position p;
- R[a, b] is b's position in a's ascending distance list minus one, so a itself (first) gets -1;
- position weights alpha[r] = 1 - r / (n - 1) for 0 <= r < KG, and 0 beyond KG and for r = -1;
- each iteration, the KQ items ranked first vote: delta(b) = mean over voters a of alpha[R[a, b]],
  the item at position p scores base[p] + beta * delta(item), and the list is re-sorted.

`paper_literal=True` reads the paper's update as a per-item accumulating score instead
(s(b) <- s(b) + beta * delta(b), starting from minus the distance); the notes measured that it
gives other numbers, so the code's semantics are the default.

Only the first KG + 1 entries of each gallery list carry weight, so the gallery structure is
each item's top-(KG + 2) list (one spare for leave-one-out), never the dense G x G rank matrix.
The paper, the authors' code and the choices made here: docs/methods/icfrr.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from engine.core.knn import canonical_similarity, knn_graph, torch_canonical_similarity
from engine.core.threads import query_threads
from engine.core.types import GalleryContext, RerankResult
from engine.errors import InvalidInputError
from engine.rerank import register
from engine.rerank.base import Reranker, RerankParams, param

HISTORY_DEPTH = 20
"""Positions of each iteration's ranking kept in the result details."""
GATHER_BUDGET = 8_000_000
"""Voter-list entries gathered at once (queries are processed in chunks under this)."""
DISTANCE_CHUNK = 1024
QUERY_CHUNK = 512
"""Queries per matrix product of the consensus (gallery-only voting)."""
DENSE_LIMIT = 8192
"""Up to this many gallery items the vote matrix is dense."""


@dataclass(frozen=True)
class ICFRRParams(RerankParams):
    KG: int = param(256, minimum=1, maximum=4096, step=1,
                    help="positions of each gallery item's own ranking that vote (weight 0 "
                         "beyond)")
    KQ: int = param(250, minimum=1, maximum=4096, step=1,
                    help="top results of the query that vote each iteration")
    beta: float = param(0.5, minimum=0.0, maximum=10.0, step=0.05,
                        help="strength of the consensus term")
    n_times: int = param(5, minimum=0, maximum=100, step=1, help="iterations")
    paper_literal: bool = param(False, help="per-item accumulating scores (the paper's "
                                            "equation read literally) instead of the authors' "
                                            "per-position prior")


@dataclass(frozen=True)
class ICFRROutput:
    """Final orders and scores of a set of queries, and the ranking after each iteration.

    order: (Q, n) gallery ids, best first. score: (Q, n) descending final scores.
    history: (Q, n_times + 1, h) the first h ids after each iteration (0 = the original).
    """

    order: np.ndarray
    score: np.ndarray
    history: np.ndarray


def euclidean_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """Euclidean distance of unit vectors from their inner product, sqrt(2 - 2 s)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(similarity, np.float64), 0.0)
                   ).astype(np.float32)


def query_distances(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor
                    ) -> np.ndarray | torch.Tensor:
    """(Q, G) float32 Euclidean distances of unit queries to the gallery from canonical
    similarities (float64 products rounded to float32), so both layouts give the same values.

    A numpy gallery (float64, the CPU path) gives numpy; a torch gallery gives a tensor on its
    device, the queries moved there.
    """
    if isinstance(gallery, torch.Tensor):
        rows = torch.as_tensor(queries, device=gallery.device)
        similarity = torch_canonical_similarity(rows, gallery).double()
        return torch.sqrt(torch.clamp(2.0 - 2.0 * similarity, min=0.0)).float()
    return euclidean_from_similarity(canonical_similarity(queries, gallery))


def ascending_candidates(distances: np.ndarray | torch.Tensor,
                         exclude: np.ndarray | torch.Tensor | None = None
                         ) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor]:
    """Each row's gallery ids by ascending distance (ties: smaller id first) and those
    distances, row i without the id exclude[i] when given.

    Args:
        distances: (B, G) float32, numpy (sorted by numpy) or torch (sorted on its device).
        exclude: (B,) ids of the same kind, or None.
    Returns:
        the sorted distances and their ids, order (B, G or G - 1) int64, of the input's kind
        (faiss's (distances, indices) order).
    """
    rows = distances.shape[0]
    if isinstance(distances, torch.Tensor):
        values, order = torch.sort(distances, dim=1, stable=True)
        if exclude is None:
            return values, order
        kept = order != exclude[:, None]
        return values[kept].reshape(rows, -1), order[kept].reshape(rows, -1)
    order = np.argsort(distances, axis=1, kind="stable")
    if exclude is not None:
        order = order[order != exclude[:, None]].reshape(rows, -1)
    return np.take_along_axis(distances, order, axis=1), order


def sorted_lists(distances: np.ndarray, depth: int) -> np.ndarray:
    """The first `depth` ids of each row's ascending order (ties: smaller id first)."""
    distances = np.asarray(distances)
    depth = min(depth, distances.shape[1])
    if depth < distances.shape[1]:
        head = np.argpartition(distances, depth - 1, axis=1)[:, :depth]
        threshold = np.take_along_axis(distances, head, axis=1).max(axis=1, keepdims=True)
        lists = []
        for row, limit in zip(distances, threshold[:, 0], strict=True):
            candidates = np.flatnonzero(row <= limit)  # all ties at the boundary
            lists.append(candidates[np.argsort(row[candidates], kind="stable")][:depth])
        return np.stack(lists).astype(np.int64)
    return np.argsort(distances, axis=1, kind="stable").astype(np.int64)


def consensus(lists: torch.Tensor, voters: torch.Tensor, n_items: int, kg: int,
              exclude: torch.Tensor | None = None) -> torch.Tensor:
    """delta(b) = mean over each row's voters a of alpha[R[a, b]] (see the module docstring).

    Args:
        lists: (G, D) each gallery item's ascending list (itself normally first).
        voters: (B, KQ) the voting items of each query.
        n_items: gallery size the weights are normalised by (G, or G - 1 when leaving out).
        kg: positions that vote.
        exclude: (B,) a gallery id removed from every list of that query (leave-one-out), or
            None.
    Returns:
        (B, G) float32 consensus.
    """
    batch, kq = voters.shape
    size = lists.shape[0]
    gathered = lists[voters]                                            # (B, KQ, D)
    if exclude is None:
        positions = torch.arange(gathered.shape[2], device=lists.device).expand_as(gathered)
        kept = None
    else:
        kept = gathered != exclude[:, None, None]
        positions = kept.cumsum(dim=2) - 1
    ranks = positions - 1
    weights = 1.0 - ranks.to(torch.float32) / max(n_items - 1, 1)
    voting = (ranks >= 0) & (ranks < kg)
    if kept is not None:
        voting &= kept
    weights = torch.where(voting, weights, torch.zeros((), dtype=torch.float32))
    delta = torch.zeros((batch, size), dtype=torch.float32, device=lists.device)
    delta.scatter_add_(1, gathered.reshape(batch, -1), weights.reshape(batch, -1))
    return delta / kq


def vote_matrix(lists: torch.Tensor, n_items: int, kg: int, dense_limit: int = DENSE_LIMIT
                ) -> torch.Tensor | sp.csr_matrix | None:
    """W[a, b] = alpha[R[a, b]]: the weight of b in a's list (KG non-zeros per row).

    Dense (torch, on the lists' device) up to `dense_limit` items: the consensus is then one
    matrix product. Above, a scipy CSR matrix for lists on the CPU, so memory follows G * KG,
    not G^2, and a query's consensus sums only its voters' KG-long rows (O(KQ * KG)); None for
    lists on a GPU, where `consensus` gathers those same rows on the device instead.
    """
    size, depth = lists.shape
    if size > dense_limit and lists.device.type != "cpu":
        return None
    positions = torch.arange(depth, device=lists.device)
    ranks = positions - 1
    weights = (1.0 - ranks.to(torch.float32) / max(n_items - 1, 1))
    voting = (ranks >= 0) & (ranks < kg)
    columns = lists[:, voting]
    values = weights[voting].expand(size, -1)
    rows = torch.arange(size, device=lists.device)[:, None].expand_as(columns)
    if size <= dense_limit:
        matrix = torch.zeros((size, size), dtype=torch.float32, device=lists.device)
        matrix[rows.reshape(-1), columns.reshape(-1)] = values.reshape(-1)
        return matrix
    return sp.csr_matrix((values.reshape(-1).cpu().numpy(),
                          (rows.reshape(-1).cpu().numpy(), columns.reshape(-1).cpu().numpy())),
                         shape=(size, size))


def consensus_from_votes(votes: torch.Tensor | sp.csr_matrix, voters: torch.Tensor
                         ) -> torch.Tensor:
    """delta = mean of the voters' rows of the vote matrix (`vote_matrix`), (B, G): one dense
    matrix product (for one query, a matrix-vector product measured three times faster here
    than gathering its voters' rows), or a sparse one."""
    batch, kq = voters.shape
    if isinstance(votes, torch.Tensor):
        selection = torch.zeros((batch, votes.shape[0]), dtype=torch.float32,
                                device=voters.device)
        selection.scatter_(1, voters, 1.0 / kq)
        return selection @ votes
    rows = np.repeat(np.arange(batch), kq)
    selection = sp.csr_matrix((np.full(batch * kq, 1.0 / kq, np.float32),
                               (rows, voters.reshape(-1).cpu().numpy())),
                              shape=(batch, votes.shape[0]))
    return torch.from_numpy((selection @ votes).toarray()).to(voters.device)


def iterate(order: torch.Tensor, distances: torch.Tensor, lists: torch.Tensor, n_items: int,
            params: ICFRRParams, kg: int, kq: int, exclude: torch.Tensor | None = None,
            history_depth: int = HISTORY_DEPTH, votes: torch.Tensor | sp.csr_matrix | None = None
            ) -> ICFRROutput:
    """Run ICFRR for a chunk of queries.

    order: (B, n) each query's candidate ids sorted by ascending distance; distances: (B, n) the
    matching ascending distances. votes: the gallery's `vote_matrix`, used when no item is
    excluded and it was built (a gather over the voters' lists otherwise). Returns numpy
    orders, scores, history.
    """
    def vote(voters: torch.Tensor) -> torch.Tensor:
        if votes is not None and exclude is None:
            return consensus_from_votes(votes, voters)
        return consensus(lists, voters, n_items, kg, exclude)

    width = min(history_depth, order.shape[1])
    history = [order[:, :width].clone()]
    if params.paper_literal:
        score_of = torch.full((order.shape[0], lists.shape[0]), -torch.inf,
                              device=order.device)
        score_of.scatter_(1, order, -distances)
        for _ in range(params.n_times):
            score_of = score_of + params.beta * vote(order[:, :kq])
            score = score_of.gather(1, order)
            score, permutation = torch.sort(score, dim=1, descending=True, stable=True)
            order = order.gather(1, permutation)
            history.append(order[:, :width].clone())
        score = score_of.gather(1, order)
    else:
        base = -distances
        score = base
        for _ in range(params.n_times):
            score = base + params.beta * vote(order[:, :kq]).gather(1, order)
            score, permutation = torch.sort(score, dim=1, descending=True, stable=True)
            order = order.gather(1, permutation)
            history.append(order[:, :width].clone())
    return ICFRROutput(order.cpu().numpy(), score.cpu().numpy(),
                       torch.stack(history, dim=1).cpu().numpy())


def clamped(params: ICFRRParams, n_items: int) -> tuple[int, int, dict[str, Any]]:
    """KG and KQ usable with `n_items` gallery items, and a note of what was clamped."""
    kg, kq = min(params.KG, max(n_items - 1, 1)), min(params.KQ, n_items)
    note = {}
    if kg != params.KG:
        note["KG"] = {"asked": params.KG, "used": kg}
    if kq != params.KQ:
        note["KQ"] = {"asked": params.KQ, "used": kq}
    return kg, kq, note


def run(query_gallery: np.ndarray | torch.Tensor, lists: np.ndarray | torch.Tensor,
        params: ICFRRParams, exclude: np.ndarray | torch.Tensor | None = None,
        device: torch.device | str = "cpu", votes: torch.Tensor | sp.csr_matrix | None = None
        ) -> tuple[ICFRROutput, dict[str, Any]]:
    """ICFRR for queries given by their distances to every gallery item.

    query_gallery: (Q, G) distances; numpy is sorted on the host, a tensor on `device` (the
    same order: both sorts are stable). lists: (G, D) gallery lists (`sorted_lists` of the
    gallery distances; D >= KG + 1, + 1 more when excluding). exclude: (Q,) gallery id of each
    query when it is itself a gallery item to leave out, else None. votes: the gallery's
    `vote_matrix` for G items when already built (the fitted re-ranker keeps it).
    """
    if isinstance(query_gallery, torch.Tensor):
        query_gallery = query_gallery.to(device, torch.float32)
        if exclude is not None:
            exclude = torch.as_tensor(exclude, device=device)
    else:
        query_gallery = np.asarray(query_gallery, np.float32)
    n_queries, size = query_gallery.shape
    n_items = size - (exclude is not None)
    if n_items < 1:
        raise InvalidInputError("ICFRR needs at least one gallery item to rank")
    kg, kq, note = clamped(params, n_items)
    lists_t = (lists if isinstance(lists, torch.Tensor)
               else torch.from_numpy(np.ascontiguousarray(lists, np.int64)).to(device))
    if exclude is not None:
        votes = None
    elif votes is None:
        votes = vote_matrix(lists_t, n_items, kg)
    chunk = (QUERY_CHUNK if votes is not None
             else max(1, GATHER_BUDGET // max(1, kq * lists.shape[1])))
    outputs = []
    for start in range(0, n_queries, chunk):
        block = query_gallery[start:start + chunk]
        left_out = None if exclude is None else exclude[start:start + len(block)]
        distances, order = ascending_candidates(block, left_out)
        outputs.append(iterate(
            torch.as_tensor(order, device=device), torch.as_tensor(distances, device=device),
            lists_t, n_items, params, kg, kq,
            None if left_out is None else torch.as_tensor(left_out, device=device),
            votes=votes))
    output = ICFRROutput(*(np.concatenate([getattr(o, name) for o in outputs])
                           for name in ("order", "score", "history")))
    return output, {"clamped": note} if note else {}


def icfrr_from_distances(query_gallery: np.ndarray, gallery_gallery: np.ndarray,
                         k: int | None = None, **params: Any) -> RerankResult:
    """ICFRR from given distance matrices (e.g. sketch queries against photos in another
    domain): (Q, G) query->gallery and (G, G) gallery->gallery distances, smaller is closer.

    Returns the top-k (default all) as a RerankResult whose distances are minus the final
    scores; the details hold the iteration history.
    """
    settings = ICFRRParams(**params)
    query_gallery = np.asarray(query_gallery, np.float32)
    gallery_gallery = np.asarray(gallery_gallery, np.float32)
    if gallery_gallery.ndim != 2 or gallery_gallery.shape[0] != gallery_gallery.shape[1]:
        raise InvalidInputError(f"gallery-gallery distances must be square, got "
                                f"{gallery_gallery.shape}")
    if query_gallery.ndim != 2 or query_gallery.shape[1] != gallery_gallery.shape[0]:
        raise InvalidInputError(f"query-gallery distances {query_gallery.shape} do not match "
                                f"{gallery_gallery.shape[0]} gallery items")
    if not (np.isfinite(query_gallery).all() and np.isfinite(gallery_gallery).all()):
        raise InvalidInputError("distances contain NaN or infinite values")
    if query_gallery.shape[0] == 0:
        raise InvalidInputError("no queries: query-gallery distances have 0 rows")
    size = query_gallery.shape[1]
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))
                          or not 1 <= k <= size):
        raise InvalidInputError(f"k must be an integer from 1 to {size}, got {k!r}")
    lists = sorted_lists(gallery_gallery, settings.KG + 1)
    output, details = run(query_gallery, lists, settings)
    k = size if k is None else int(k)
    return RerankResult(output.order[:, :k].astype(np.int64),
                        (-output.score[:, :k]).astype(np.float32),
                        {**details, "history": output.history})


@register
class ICFRR(Reranker):
    """Iterative cluster-free re-ranking; see the module docstring."""

    name: ClassVar[str] = "icfrr"
    title: ClassVar[str] = "ICFRR (Hudson & Smith)"
    distance_note: ClassVar[str] = (
        "minus the final score: the original Euclidean distance at the item's rank position "
        "- β × its votes (0 to 1) from the top-KQ results' own rankings; can be below 0")
    Params: ClassVar[type[RerankParams]] = ICFRRParams
    runs_on_gpu: ClassVar[bool] = True
    quick_params: ClassVar[dict[str, Any]] = {"n_times": 1}
    details_schema: ClassVar[dict[str, str]] = {
        "history": "(queries, n_times + 1, h) int: the top-h ids after each iteration (the "
                   "first row is the initial ranking); online: (n_times + 1, h)",
        "distance": "what the distances are (minus the final ICFRR score)",
        "clamped": "parameters lowered to fit the gallery, with the values used",
    }
    """One iteration: from the second on, a float32 near-tie that the online and batch modes
    resolve differently changes every later score (the per-position prior), so quick runs that
    compare the two stay at one; test_icfrr.py checks every iteration against the oracle."""

    def _fit(self, context: GalleryContext) -> None:
        depth = min(self.params.KG + 2, context.size)
        knn = context.knn
        if knn is not None and knn.canonical and knn.depth >= depth:
            self._lists = np.ascontiguousarray(knn.indices[:, :depth])
        else:
            self._lists = knn_graph(context.features, depth, self.device).indices
        # Precomputed once per gallery: the lists on the device and the vote matrix that
        # online queries (and batches of new queries) multiply by.
        self._lists_t = torch.from_numpy(np.ascontiguousarray(self._lists, np.int64)).to(
            self.device)
        kg, _, _ = clamped(self.params, context.size)
        self._votes = vote_matrix(self._lists_t, context.size, kg)
        # float64 once, so each query's canonical similarities do not convert the gallery; on a
        # GPU a tensor there, so the distances and their sort stay on the device
        gallery64 = context.features.astype(np.float64)
        self._gallery64 = (gallery64 if self.device.type == "cpu"
                           else torch.from_numpy(gallery64).to(self.device))

    def _run(self, queries: np.ndarray | None, k: int
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        source = self._gallery64 if queries is None else queries
        orders, scores, histories, details = [], [], [], {}
        for start in range(0, len(source), DISTANCE_CHUNK):
            stop = min(start + DISTANCE_CHUNK, len(source))
            exclude = None if queries is not None else np.arange(start, stop)
            output, details = run(query_distances(source[start:stop], self._gallery64),
                                  self._lists_t, self.params, exclude, self.device,
                                  None if exclude is not None else self._votes)
            orders.append(output.order[:, :k])
            scores.append(output.score[:, :k])
            histories.append(output.history)
        details = {**details, "history": np.concatenate(histories),
                   "distance": "minus the final ICFRR score"}
        return -np.concatenate(scores), np.concatenate(orders), details

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        return self._run(query_features, k)

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One query as a batch of one, on one thread (`engine.core.threads.query_threads`): its
        (1, G) products and sorts are too small to gain from a second thread, and on a busy
        machine each would wait for it."""
        with query_threads():
            distances, indices, details = self._run(query_feature[None, :], k)
        return distances[0], indices[0], {**details, "history": details["history"][0]}
