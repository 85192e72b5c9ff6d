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

from engine.core.knn import float32_scores, knn_graph
from engine.core.types import Evidence, EvidenceGroup, GalleryContext, RerankResult
from engine.errors import InvalidInputError
from engine.rerank import register
from engine.rerank._scale import (
    canonical_block,
    gib,
    memory_budget,
    query_top,
    torch_canonical_block,
)
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
BYTES_PER_PAIR = 96
"""Memory of a batch per (query, gallery item) pair of a chunk: canonical similarities and
distances, their sort, the iterations' orders, scores and votes (measured peak: 52 bytes, 512
queries against 20,000 items), with room."""
HEAD_MARGIN = 256
"""Online: gallery items ranked beyond those that must be exact (voters, top-k, history) at
the first try; each failed proof takes HEAD_GROWTH times as many (the whole gallery at
last)."""
HEAD_GROWTH = 16
HEAD_LIMIT = 0.125
"""A head grown past this share of the gallery is replaced by the whole gallery: gathered rows
cost about what contiguous ones do (20k of 100k: 17 against 90 ms), and where a small head
fails the next one rarely holds (its proof failed on 20 of 20 queries of a clustered 100k
gallery), so the attempt would mostly add its cost to the whole-gallery run."""


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
    trace: ItemTrace | None = None


@dataclass(frozen=True)
class ItemTrace:
    """One gallery item followed through an online run (`online_head`'s `follow`): what its
    score was made of at every iteration, as the run computed it.

    item: the gallery id. original_place: its 0-based position in the original order,
    original_score: minus its distance there.
    voters: per iteration, the (KQ,) ids that voted (the first KQ of the order it scored).
    places: (n_times,) its 0-based position in that order (per-position: the prior it took).
    priors: (n_times,) float32 what the vote was added to: the original score at that
    position (the authors' code), or its own accumulated score (`paper_literal`).
    votes: (n_times,) float32 delta, its mean vote. scores: (n_times,) float32 its score
    after each iteration, prior + beta * vote. final_score: its score in the returned ranking.
    """

    item: int
    original_place: int
    original_score: np.float32
    voters: tuple[np.ndarray, ...]
    places: np.ndarray
    priors: np.ndarray
    votes: np.ndarray
    scores: np.ndarray
    final_score: np.float32


def euclidean_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """Euclidean distance of unit vectors from their inner product, sqrt(2 - 2 s)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(similarity, np.float64), 0.0)
                   ).astype(np.float32)


def query_distances(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor
                    ) -> np.ndarray | torch.Tensor:
    """(Q, G) float32 Euclidean distances of unit queries to the gallery from canonical
    similarities (float64 products rounded to float32), so both layouts give the same values.

    A numpy gallery (the CPU path) gives numpy; a torch gallery gives a tensor on its device,
    the queries moved there. The gallery is converted to float64 a block at a time, never whole.
    """
    if isinstance(gallery, torch.Tensor):
        similarity = torch_canonical_block(torch.as_tensor(queries, device=gallery.device),
                                           gallery)
        return torch.sqrt(torch.clamp(2.0 - 2.0 * similarity.double(), min=0.0)).float()
    return euclidean_from_similarity(canonical_block(queries, gallery))


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


def vote_weights(n_items: int, kg: int, depth: int) -> np.ndarray:
    """(depth,) float32 weight of each column of a gallery list, as `vote_matrix` gives it:
    alpha[c - 1] for columns 1..kg, 0 for the item itself (column 0) and beyond."""
    ranks = np.arange(depth) - 1
    weights = np.float32(1.0) - ranks.astype(np.float32) / np.float32(max(n_items - 1, 1))
    return np.where((ranks >= 0) & (ranks < kg), weights, np.float32(0.0)).astype(np.float32)


def sparse_consensus(lists: np.ndarray, voters: np.ndarray, weights: np.ndarray, size: int
                     ) -> np.ndarray:
    """delta of one query (`consensus`) from its voters' lists alone, O(KQ * KG) work.

    The float32 weights are summed in float64 (exactly, in practice: KQ terms of at most 24
    significant bits) and the mean rounded once to float32, so the order of the sum does not
    matter. Returns (size,) float32, 0 for items no voter lists.
    """
    columns = np.flatnonzero(weights)
    listed = lists[voters][:, columns]
    sums = np.bincount(listed.ravel(), np.broadcast_to(weights[columns], listed.shape).ravel(),
                       minlength=size)
    return (sums / len(voters)).astype(np.float32)


def online_head(distances: np.ndarray, ids: np.ndarray, size: int, lists: np.ndarray,
                params: ICFRRParams, kg: int, kq: int, needed: int,
                history_depth: int = HISTORY_DEPTH, follow: int | None = None
                ) -> ICFRROutput | None:
    """ICFRR for one query from its nearest gallery items only, or None when they cannot
    prove the result of the run over the whole gallery (the caller then gives more).

    The head is the query's first N items; an item beyond it climbs only by its votes. With
    the per-position prior, any item outside the `exact` leading positions of the previous
    order scores at most base[exact] + beta * (the largest vote outside them), so the items
    scoring above that bound lead the full run's order too, in the same order: they are its
    new `exact` positions. Paper-literal scores are per item and the bound is the tail's best
    accumulated score. The run is exact when the voters, the history and the `needed`
    returned items stay within the exact positions.

    Args:
        distances, ids: (N + 1,) the query's nearest items by ascending distance (ties: the
            smaller id), the last one only bounding the tail; or all `size` items (the full
            run, always exact).
        lists: (size, >= kg + 1) the gallery lists; kg, kq: as clamped for `size` items.
        follow: a gallery id whose score to trace (`ItemTrace`); the head then also has to
            prove that id's positions (per-position: within the exact positions of every
            order it is scored at), else None.
    Returns:
        ICFRROutput of one query: order and score (1, needed), history (1, n_times + 1, h),
        and the trace of `follow`.
    """
    complete = len(ids) >= size
    head = size if complete else len(ids) - 1
    width = min(history_depth, size)
    exact = head
    if max(needed, width, kq if params.n_times else 0) > head:
        return None
    base = -np.asarray(distances, np.float32)
    order = np.asarray(ids[:head], np.int64)
    score = base[:head]
    tail = None if complete else base[head]        # the best score beyond the head
    weights = vote_weights(size, kg, lists.shape[1])
    beta = np.float32(params.beta)
    history = [order[:width]]
    trace: dict[str, list] = {name: [] for name in ("voters", "places", "priors", "votes",
                                                    "scores")}
    if follow is not None and not (order == follow).any():
        return None
    for _ in range(params.n_times):
        if kq > exact:
            return None
        votes = sparse_consensus(lists, order[:kq], weights, size)
        gain = beta * votes
        if follow is not None:
            place = int(np.flatnonzero(order == follow)[0])
            if place >= exact and not params.paper_literal:
                return None  # its prior's position is not proven
            trace["voters"].append(order[:kq].copy())
            trace["places"].append(place)
            trace["priors"].append(score[place] if params.paper_literal else base[place])
            trace["votes"].append(votes[follow])
        bound = None
        if params.paper_literal:
            score = score + gain[order]
            if tail is not None:
                gain[ids[:head]] = 0
                tail = np.float32(tail + gain.max())
                bound = tail
        else:
            if tail is not None:
                outside = gain.copy()
                outside[order[:exact]] = 0
                bound = np.float32(base[exact] + outside.max())
            score = base[:head] + gain[order]
        if follow is not None:
            trace["scores"].append(score[trace["places"][-1]])
        permutation = np.argsort(-score, kind="stable")
        order, score = order[permutation], score[permutation]
        if bound is not None:
            exact = int(np.count_nonzero(score > bound))
        if width > exact:
            return None
        history.append(order[:width])
    if needed > exact:
        return None
    item_trace = None
    if follow is not None:
        original_place = int(np.flatnonzero(np.asarray(ids[:head]) == follow)[0])
        item_trace = ItemTrace(
            follow, original_place, base[original_place], tuple(trace["voters"]),
            np.array(trace["places"], np.int64),
            np.array(trace["priors"], np.float32), np.array(trace["votes"], np.float32),
            np.array(trace["scores"], np.float32),
            np.float32(trace["scores"][-1] if trace["scores"] else base[original_place]))
    return ICFRROutput(order[None, :needed], score[None, :needed], np.stack(history)[None],
                       item_trace)


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

    def graph_depth(self) -> int:
        """Fit reads each item's KG + 2 nearest (itself first)."""
        return self.params.KG + 2

    def _fit(self, context: GalleryContext) -> None:
        depth = min(self.params.KG + 2, context.size)
        knn = context.knn
        if knn is not None and knn.depth >= depth:  # the gallery's graph, exact or approximate
            self._lists = np.ascontiguousarray(knn.indices[:, :depth], np.int64)
        else:
            self._lists = knn_graph(context.features, depth, self.device).indices
        self._lists_t = torch.from_numpy(self._lists).to(self.device)
        self._votes_cache: torch.Tensor | sp.csr_matrix | None = None
        # the float32 gallery the batch reads (on a GPU a tensor there, so the distances and
        # their sort stay on the device); canonical products convert it a block at a time
        self._gallery_source = (context.features if self.device.type == "cpu"
                                else torch.from_numpy(context.features).to(self.device))

    @property
    def _votes(self) -> torch.Tensor | sp.csr_matrix | None:
        """The gallery's vote matrix that batches of new queries multiply by, built at the
        first batch (online queries read the lists alone)."""
        if self._votes_cache is None:
            kg, _, _ = clamped(self.params, self.gallery.size)
            self._votes_cache = vote_matrix(self._lists_t, self.gallery.size, kg)
        return self._votes_cache

    def _fixed_bytes(self, size: int) -> int:
        """Memory of the gallery-side structures of a batch: the vote matrix (dense, or KG
        entries of value and column per row, built from 20-byte triplets) and the lists."""
        kg = min(self.params.KG, max(size - 1, 1))
        votes = 4 * size * size if size <= DENSE_LIMIT else 28 * size * kg
        return votes + 16 * size * (kg + 2)

    def _chunk_rows(self, size: int, n_queries: int) -> int:
        """Queries per chunk of a batch: `DISTANCE_CHUNK`, fewer where the memory budget
        (`memory_budget`) holds fewer (Q, G) rows."""
        rows = min(DISTANCE_CHUNK, max(1, n_queries))
        budget = memory_budget()
        if budget is not None:
            room = (budget - self._fixed_bytes(size)) // (size * BYTES_PER_PAIR)
            rows = min(rows, max(1, room))
        return rows

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """A batch works on chunks of queries against the whole gallery ((rows, G) distances,
        orders and scores, `BYTES_PER_PAIR` each) beside the vote matrix; refused when even
        one query's row does not fit the memory budget."""
        budget = memory_budget()
        need = self._fixed_bytes(gallery_size) + gallery_size * BYTES_PER_PAIR
        if budget is not None and need > budget:
            return (f"{gib(need)} for the vote matrix and one query's (1, {gallery_size}) rows, "
                    f"beyond the {gib(budget)} this batch may use")
        return None

    def _run(self, queries: np.ndarray | None, k: int
             ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        source = self._gallery_source if queries is None else queries
        size = self.gallery.size
        chunk = self._chunk_rows(size, len(source))
        orders, scores, histories, details = [], [], [], {}
        for start in range(0, len(source), chunk):
            stop = min(start + chunk, len(source))
            exclude = None if queries is not None else np.arange(start, stop)
            output, details = run(query_distances(source[start:stop], self._gallery_source),
                                  self._lists_t, self.params, exclude, self.device,
                                  None if exclude is not None else self._votes)
            # copies, so that the chunk's (rows, G) arrays are freed
            orders.append(np.ascontiguousarray(output.order[:, :k]))
            scores.append(np.ascontiguousarray(output.score[:, :k]))
            histories.append(output.history)
        details = {**details, "history": np.concatenate(histories),
                   "distance": "minus the final ICFRR score"}
        return -np.concatenate(scores), np.concatenate(orders), details

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        return self._run(query_features, k)

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One query from its nearest items only (`online_head`): one float32 product with the
        gallery (`float32_scores`, shared with the other methods ranking this query) proposes
        them, their canonical distances are computed, and the head grows `HEAD_GROWTH`-fold
        (to the whole gallery past `HEAD_LIMIT` of it) until it proves the full run's result.
        Only the voters' lists are read (no vote vector or matrix of the gallery); where no
        head short of the gallery proves it (items that climb by a few votes past
        near-equidistant ones, iteration after iteration), the whole gallery's distances are
        computed and sorted, as in a batch of one."""
        _, _, note = clamped(self.params, self.gallery.size)
        output = self._online_output(query_feature, k)
        details = {"clamped": note} if note else {}
        return -output.score[0], output.order[0], {
            **details, "history": output.history[0], "distance": "minus the final ICFRR score"}

    def _online_output(self, query_feature: np.ndarray, needed: int,
                       follow: int | None = None) -> ICFRROutput:
        """`online_head` on heads growing until one proves the first `needed` items (and the
        positions of `follow`, traced: a head then starts past that item's float32 rank)."""
        gallery = self.gallery.features
        size = len(gallery)
        kg, kq, _ = clamped(self.params, size)
        head = max(needed, kq, min(HISTORY_DEPTH, size)) + HEAD_MARGIN
        scores = float32_scores(gallery, query_feature)
        if follow is not None:
            head = max(head, 2 * int(np.count_nonzero(scores > scores[follow])) + HEAD_MARGIN)
            if head > HEAD_LIMIT * size:
                head = size
        while True:
            if head + 1 < size:
                distances, ids = query_top(gallery, query_feature, head + 1, scores=scores,
                                           key=euclidean_from_similarity)
            else:  # the whole gallery, read in contiguous blocks
                distances = euclidean_from_similarity(
                    canonical_block(query_feature[None, :], gallery))[0]
                ids = np.argsort(distances, kind="stable")
                distances = distances[ids]
            output = online_head(distances, ids, size, self._lists, self.params, kg, kq,
                                 needed, follow=follow)
            if output is not None:
                return output
            head *= HEAD_GROWTH
            if head > HEAD_LIMIT * size:
                head = size

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The voters of every iteration (the query's KQ first) with the place each gives the
        item in its own ranking, the item's mean vote, the prior it was added to and its
        final score, traced in the online run itself (`online_head`'s `follow`): the final
        distance is the one online mode returns for the item (every item has one: k = the
        gallery)."""
        size = self.gallery.size
        kg, kq, _ = clamped(self.params, size)
        output = self._online_output(query_feature, 1, follow=item)
        trace = output.trace
        beta = self.params.beta
        columns = np.arange(self._lists.shape[1])
        voting = (columns >= 1) & (columns <= kg)
        value_name = (f"the item's place in this voter's own ranking (1 = its nearest; none: "
                      f"not in its first {kg}, no vote); its vote is 1 - (place - 1) / "
                      f"{max(size - 1, 1)}")
        numbers: dict[str, float] = {
            "original distance": -float(trace.original_score),
            "original place": float(trace.original_place + 1)}
        groups = []
        for t, voters in enumerate(trace.voters, start=1):
            hits = (self._lists[voters] == item) & voting
            places = np.where(hits.any(axis=1), hits.argmax(axis=1), np.nan)
            numbers[f"vote, iteration {t}"] = float(trace.votes[t - 1])
            groups.append(EvidenceGroup(f"voters, iteration {t}", voters, places, value_name,
                                        highlight=False))
        numbers["beta"] = float(beta)
        if trace.voters:
            last = groups[-1]
            listing = np.isfinite(last.values)
            weights = 1.0 - (last.values[listing] - 1.0) / max(size - 1, 1)
            groups.append(EvidenceGroup("voters that rank it", last.rows[listing], weights,
                                        "the vote it gives the item in the last iteration"))
            if not self.params.paper_literal:
                numbers["place it was scored at"] = float(trace.places[-1] + 1)
            numbers["prior"] = float(trace.priors[-1])
            summary = (f"{int(listing.sum())} of the query's {kq} nearest rank it in their own "
                       f"first {kg} (a vote of {trace.votes[-1]:.2f})")
        else:
            summary = "no iterations: its original distance"
        numbers["final score"] = float(trace.final_score)
        numbers["final distance"] = float(-trace.final_score)
        return Evidence(self.name, item, summary, numbers, tuple(groups))

