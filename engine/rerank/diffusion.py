"""Diffusion: a random walk with restart on the gallery's mutual kNN graph (Iscen, Tolias,
Avrithis, Furon, Chum, "Efficient diffusion on region manifolds", CVPR 2017), global
descriptors.

- Affinity: w_ij = max(0, s_ij)^gamma for mutual k-nearest neighbours (each in the other's
  top-k list, the item itself counted in its list as the authors' code does), zero otherwise
  and on the diagonal; S = D^-1/2 W D^-1/2.
- A query seeds y: its kq most similar gallery items hold max(0, s)^gamma, the rest 0.
- Its scores f solve (I - alpha S) f = y by conjugate gradient from f = 0, stopping at a
  relative residual of `tolerance` or after `iterations` steps (the code's 1e-6 and 20); the
  ranking is by f descending. Items the walk never reaches (f = 0: no path from a seed) follow,
  by their original similarity.

The graph is fitted once from the gallery's shared kNN graph (scipy.sparse, k - 1 entries a
row at most); a query costs its kq seeds and `iterations` sparse products. Leave-one-out runs
each item against the graph without it (its edges removed, its neighbours' degrees lowered;
their lists are not refilled). The walk (CG's products and updates) runs with torch on
`self.device`, the graph a sparse CSR tensor there; on a GPU a batch's seeds and top k are
found there too, and only (B, k) comes back. The paper, the authors' code and the choices made here:
docs/methods/diffusion.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from engine.core.knn import (
    device_tensor,
    float32_scores,
    read_only_tensor,
    top_k_smallest,
    torch_topk_largest,
    torch_topk_similar,
)
from engine.core.types import Evidence, EvidenceGroup, GalleryContext
from engine.rerank import register
from engine.rerank._diffusion import (
    Solution,
    conjugate_gradient,
    inverse_sqrt_degree,
    left_out_operator,
    left_out_scaling,
    mutual_affinity,
    normalised,
    rank_scores,
    replay,
    seed_vectors,
    shared_operator,
    sparse_tensor,
    torch_rank_scores,
)
from engine.rerank._scale import (
    canonical_block,
    canonical_rows,
    device_memory_budget,
    gib,
    query_top,
    torch_canonical_block,
)
from engine.rerank.base import Reranker, RerankParams, param

BLOCK_BYTES = 1 << 27
"""Largest (G, B) float64 block of right-hand sides a batch solves at once (128 MiB: B = 838
at G = 20,000); CG keeps about `BLOCKS_IN_FLIGHT` of them."""
BLOCKS_IN_FLIGHT = 10
"""(G, B) float64 arrays alive during a block's solve, with room: y, f, r, p, A p, the
temporaries of the CG updates and of the sparse product, the left-out scaling, and the (B, G)
ranking keys after it."""
GRAPH_BYTES_PER_EDGE = 48
"""Memory of one listed pair while the mutual graph is built (COO triplets, the pattern, its
transpose and the symmetric sum, float64 values and int32/int64 indices), with room."""
DISTANCE_NOTE = ("minus the diffusion score f (a random walk with restart from the query's "
                 "kq nearest items); items the walk never reaches follow at the last reached "
                 "distance (at least 0) + 1 - cosine")


@dataclass(frozen=True)
class DiffusionParams(RerankParams):
    k: int = param(50, minimum=1, maximum=1000, step=1,
                   help="neighbours in each item's list, itself included; an edge joins two "
                        "items that list each other")
    kq: int = param(10, minimum=1, maximum=1000, step=1,
                    help="the query's nearest gallery items that seed the walk (y)")
    alpha: float = param(0.99, minimum=0.0, maximum=0.999, step=0.01,
                         help="probability of walking on rather than restarting at the seeds")
    gamma: float = param(3.0, minimum=0.5, maximum=10.0, step=0.5,
                         help="exponent of the similarities in the graph and the seeds")
    iterations: int = param(20, minimum=1, maximum=1000, step=1,
                            help="most conjugate-gradient steps per query")
    tolerance: float = param(1e-6, minimum=0.0, maximum=0.1, step=1e-6,
                             help="conjugate gradient stops at this relative residual")


@register
class Diffusion(Reranker):
    """Diffusion on the mutual kNN graph; see the module docstring."""

    name: ClassVar[str] = "diffusion"
    title: ClassVar[str] = "Diffusion (Iscen et al. 2017)"
    distance_note: ClassVar[str] = DISTANCE_NOTE
    Params: ClassVar[type[RerankParams]] = DiffusionParams
    baseline: ClassVar[bool] = True
    runs_on_gpu: ClassVar[bool] = True
    exact_neighbours: ClassVar[bool] = False
    """With alpha near 1, f leans towards the seeds' well-connected items (as alpha -> 1 it
    tends to the component's sqrt-degree profile), so a near-duplicate of a gallery item can
    rank below a better-connected neighbour of it: the paper's method does not promise it."""
    details_schema: ClassVar[dict[str, str]] = {
        "distance": "what the distances are",
        "clamped": "parameters lowered to fit the gallery, with the values used",
        "cg_iterations": "conjugate-gradient steps each query took ((Q,) int; online: an int)",
        "cg_residual": "each query's final relative residual |y - A f| / |y| ((Q,); online: "
                       "a float)",
        "reached": "gallery items with f != 0, the walk's reach ((Q,) int; online: an int)",
    }

    # -- sizes ----------------------------------------------------------------------------------
    def graph_depth(self) -> int:
        """Fit reads each item's k nearest (the graph) and kq + 1 (leave-one-out's seeds)."""
        return max(self.params.k, self.params.kq + 1)

    def _clamped(self, size: int, leave_one_out: bool) -> tuple[int, int, dict[str, Any]]:
        """k and kq as used on a gallery of `size`, and the details saying what was lowered."""
        k = min(self.params.k, size)
        kq = min(self.params.kq, size - 1 if leave_one_out else size)
        lowered = {name: value for name, value, asked in (("k", k, self.params.k),
                                                          ("kq", kq, self.params.kq))
                   if value < asked}
        return k, kq, ({"clamped": lowered} if lowered else {})

    def _block_columns(self, size: int, n_queries: int) -> int:
        """Right-hand sides per CG block: `BLOCK_BYTES`, less where the memory budget is."""
        columns = max(1, BLOCK_BYTES // (8 * size))
        budget = device_memory_budget(self.device)
        if budget is not None:
            room = (budget - self._graph_bytes(size)) // (BLOCKS_IN_FLIGHT * 8 * size)
            columns = min(columns, max(1, room))
        return int(min(columns, max(1, n_queries)))

    def _graph_bytes(self, size: int) -> int:
        """The fitted graph: W and S in scipy CSR (12 bytes an entry each) and their torch
        copies (16 bytes an entry each: int64 columns), plus degrees; at most k - 1 entries a
        row."""
        k = min(self.params.k, size)
        return 56 * size * max(k - 1, 0) + 40 * size

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """A batch solves blocks of right-hand sides of (G, B) float64 each beside the graph;
        refused when one column does not fit the memory budget."""
        budget = device_memory_budget(self.device)
        need = self._graph_bytes(gallery_size) + BLOCKS_IN_FLIGHT * 8 * gallery_size
        if budget is not None and need > budget:
            return (f"{gib(need)} for the graph and one query's (G = {gallery_size}) CG vectors, "
                    f"beyond the {gib(budget)} this batch may use")
        return None

    # -- fit ------------------------------------------------------------------------------------
    def _fit(self, context: GalleryContext) -> None:
        size = context.size
        depth = min(self.graph_depth(), size)
        knn = context.knn
        if knn is not None and knn.depth >= depth:  # the gallery's graph, exact or approximate
            indices, similarities = knn.indices[:, :depth], knn.similarities[:, :depth]
        else:  # the exact lists `knn_graph` gives, without its farthest-item pass
            tensor = read_only_tensor(np.ascontiguousarray(context.features, np.float32))
            similarities, indices = torch_topk_similar(tensor.to(self.device), depth)
            similarities, indices = similarities.cpu().numpy(), indices.cpu().numpy()
        self._lists = np.ascontiguousarray(indices, np.int64)
        self._list_similarities = np.ascontiguousarray(similarities, np.float32)
        k = min(self.params.k, size)
        self._affinity = mutual_affinity(self._lists[:, :k], self._list_similarities[:, :k],
                                         self.params.gamma)
        self._degree, self._inverse = inverse_sqrt_degree(self._affinity)
        self._transition = normalised(self._affinity, self._inverse)
        self._affinity_product = sparse_tensor(self._affinity, self.device)
        self._transition_product = sparse_tensor(self._transition, self.device)

    # -- the walk -------------------------------------------------------------------------------
    def _solve(self, seeds: np.ndarray, left_out: np.ndarray | None = None) -> Solution:
        """CG on (I - alpha S) f = y for the columns of `seeds` (G, B), on `self.device`; with
        `left_out`, column b on the graph without item left_out[b]."""
        alpha = self.params.alpha
        if left_out is None:
            apply = shared_operator(self._transition_product, alpha)
        else:
            apply = left_out_operator(self._affinity_product, self._on_device(left_out_scaling(
                self._affinity, self._degree, self._inverse, left_out)), alpha)
        return conjugate_gradient(apply, self._on_device(seeds), self.params.tolerance,
                                  self.params.iterations)

    def _on_device(self, array: np.ndarray) -> torch.Tensor:
        return device_tensor(array, self.device)

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """All queries in blocks of right-hand sides (`_block_columns`), each solved by its
        own CG. New queries: canonical similarities to the whole gallery give the seeds and
        the unreached items' order. Leave-one-out: the seeds are each item's kq nearest but
        itself from the fitted lists, no search; the item's own node is taken out of its
        graph (`left_out_scaling`), so it neither seeds, carries nor receives the walk.
        On a GPU the new queries' similarities and every top k are taken there
        (`torch_twins`)."""
        return self._walk_batch(query_features, k, torch_twins=self.device.type != "cpu")

    def _walk_batch(self, query_features: np.ndarray | None, k: int, torch_twins: bool
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """`_rerank_batch`; `torch_twins`: the new queries' seeds and the rankings with torch
        on `self.device` (`torch_canonical_block`, `torch_rank_scores`) instead of numpy."""
        gallery = self.gallery.features
        on_device = (self._on_device(gallery) if torch_twins and query_features is not None
                     else None)
        rank = torch_rank_scores if torch_twins else (
            lambda f, *rest: rank_scores(f.cpu().numpy(), *rest))
        size = len(gallery)
        leave_one_out = query_features is None
        _, kq, details = self._clamped(size, leave_one_out)
        n_queries = size if leave_one_out else len(query_features)
        width = self._block_columns(size, n_queries)
        distances = np.empty((n_queries, k), np.float32)
        indices = np.empty((n_queries, k), np.int64)
        iterations = np.empty(n_queries, np.int64)
        residual = np.empty(n_queries, np.float64)
        reached = np.empty(n_queries, np.int64)
        for start in range(0, n_queries, width):
            rows = np.arange(start, min(start + width, n_queries))
            if leave_one_out:
                lists = self._lists
                others = np.argsort(lists[rows] == rows[:, None], axis=1, kind="stable")[:, :kq]
                ids = np.take_along_axis(lists[rows], others, 1)
                similar = np.take_along_axis(self._list_similarities[rows], others, 1)
                solution = self._solve(seed_vectors(ids, similar, size, self.params.gamma),
                                       left_out=rows)

                def similarity(columns: np.ndarray, rows=rows) -> np.ndarray:
                    return canonical_block(gallery[rows[columns]], gallery)

                exclude = rows
            elif on_device is not None:
                similarities = torch_canonical_block(self._on_device(query_features[rows]),
                                                     on_device)
                top, chosen = (part.cpu().numpy() for part in torch_topk_largest(
                    similarities, kq))
                solution = self._solve(seed_vectors(chosen, top, size, self.params.gamma))

                def similarity(columns: np.ndarray, block=similarities) -> np.ndarray:
                    return block[torch.from_numpy(columns).to(block.device)].cpu().numpy()

                exclude = None
            else:
                block = canonical_block(query_features[rows], gallery)
                negative, ids = top_k_smallest(-block, kq)
                solution = self._solve(seed_vectors(ids, -negative, size, self.params.gamma))

                def similarity(columns: np.ndarray, block=block) -> np.ndarray:
                    return block[columns]

                exclude = None
            distances[rows], indices[rows], reached[rows] = rank(
                solution.f, similarity, k, exclude)
            iterations[rows], residual[rows] = solution.iterations, solution.residual
        return distances, indices, {**details, "distance": DISTANCE_NOTE,
                                    "cg_iterations": iterations, "cg_residual": residual,
                                    "reached": reached}

    def _online_walk(self, query_feature: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, Solution, dict[str, Any]]:
        """One new query's seeds (ids, canonical similarities) and CG solution, as the batch
        computes them with that single query."""
        gallery = self.gallery.features
        _, kq, details = self._clamped(len(gallery), False)
        similar, ids = query_top(gallery, query_feature, kq,
                                 scores=float32_scores(gallery, query_feature))
        solution = self._solve(seed_vectors(ids[None, :], similar[None, :], len(gallery),
                                            self.params.gamma))
        return ids, similar, solution, details

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One query against the fitted graph: its kq seeds from one float32 product with the
        gallery (`float32_scores`, proven canonical by `query_top`), one CG; canonical
        similarities of the unreached items only when the top k needs them."""
        gallery = self.gallery.features
        _, _, solution, details = self._online_walk(query_feature)

        def similarity(columns: np.ndarray) -> np.ndarray:
            return canonical_rows(gallery, np.arange(len(gallery)), query_feature)[None, :]

        distances, indices, reached = rank_scores(solution.f.cpu().numpy(), similarity, k)
        return distances[0], indices[0], {
            **details, "distance": DISTANCE_NOTE, "cg_iterations": int(solution.iterations[0]),
            "cg_residual": float(solution.residual[0]), "reached": int(reached[0])}

    # -- evidence -------------------------------------------------------------------------------
    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """f_item decomposed over the seeds: f = sum_j y_j g_j with g_j the same CG polynomial
        applied to a unit seed at j (`replay`), so the contributions sum to the online f_item
        to rounding; and the item's mutual neighbours with their alpha S_ij f_j, its share
        of f = y + alpha S f (exact at convergence)."""
        gallery = self.gallery.features
        ids, similar, solution, _ = self._online_walk(query_feature)
        f = solution.f[:, 0].cpu().numpy()
        seeds = seed_vectors(ids[None, :], similar[None, :], len(gallery),
                             self.params.gamma)[:, 0]
        units = np.zeros((len(gallery), len(ids)), np.float64)
        units[ids, np.arange(len(ids))] = 1.0
        green = replay(shared_operator(self._transition_product, self.params.alpha),
                       self._on_device(units), solution.steps[:, 0],
                       solution.directions[:, 0]).cpu().numpy()
        contributions = seeds[ids] * green[item]
        start, stop = self._transition.indptr[item], self._transition.indptr[item + 1]
        neighbours = self._transition.indices[start:stop]
        through = self.params.alpha * self._transition.data[start:stop] * f[neighbours]
        cosine = float(canonical_rows(gallery, np.array([item]), query_feature)[0])
        score = float(f[item])
        if score != 0.0:
            top = int(np.argmax(contributions)) if len(ids) else 0
            share = contributions[top] / score if len(ids) else 0.0
            summary = (f"diffusion score {score:.3g} from the query's {len(ids)} seeds, "
                       f"{share:.0%} of it through seed #{int(ids[top])}; "
                       f"{len(neighbours)} mutual neighbours in the graph")
        else:
            summary = (f"the walk from the query's {len(ids)} seeds never reaches it (f = 0), "
                       f"so it follows every reached item, by its cosine {cosine:.3f}")
        numbers = {
            "cosine similarity": cosine,
            "seed weight y": float(seeds[item]),
            "diffusion score f": score,
            "sum of the seeds' contributions": float(contributions.sum()),
            "alpha": float(self.params.alpha),
            "gamma": float(self.params.gamma),
            "CG iterations": float(solution.iterations[0]),
            "CG relative residual": float(solution.residual[0]),
        }
        groups = (
            EvidenceGroup("seeds", ids, contributions,
                          "contribution y_j g_j(item) to f_item: the seed's weight times the "
                          "walk from it to the item; they sum to f_item"),
            EvidenceGroup("mutual neighbours", neighbours, through,
                          "alpha S_ij f_j: what the neighbour passes to the item in "
                          "f = y + alpha S f", highlight=False),
        )
        return Evidence(self.name, item, summary, numbers, groups)
