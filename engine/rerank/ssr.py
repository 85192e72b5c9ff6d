"""SSR: the Subgraph Similarity Refiner (Shen, Xiao, Hu, Sbai, Aubry, NeurIPS 2021).

A small learned module that re-orders a query's top-k. Take the query and its top-k (k + 1
reference nodes, features F, similarities S = F F^T of the L2-normalised rows). For every
reference r, order the k database items by similarity to r (d_(1) .. d_(k)) and read the
(2k + 1)-vector [S(r, q), S(r, d_(1..k)), S(q, d_(1..k))] (the first two rows' upper triangle of
the similarity matrix of [r, q, d_(1..k)]). Two synthetic-gradient MLPs turn those k + 1 views
into gradients with respect to the views; their vector-Jacobian products move the query, then
the database features (`q_steps` times), and the cosine of the refined features re-orders the
top-k. Everything after the top-k keeps its order.

Training follows the authors: episodes of a random query, a random pool (1,000 items, or all
there are), the query's top-k in that pool, kept when the top-k's AP < 0.8 and it holds more than
5 positives; an InfoNCE-style loss with a learnable scale; SGD (lr 1e-3, momentum 0.9, weight
decay 5e-4), one episode per step. Positives come from labels (classes 0..train_classes-1 of the
training items) or, with no labels, from pseudo-labels: the LHRR hypergraph's SGCC clusters
(`_hypergraph.py`, as SGRR uses), unclustered items left out of the loss. Similarities are
computed per episode, never for the whole training set at once.

Choices where the authors' code is silent or cannot run here (docs/methods/ssr.md):
a fixed number of training episodes (the authors kept the checkpoint best on the test set); a
training set under 1,001 items gives every other item to the pool; a model for q_steps = s > 1
continues training the (s - 1)-step model for a sixth of the episodes (the authors: 10,000 after
60,000). With `after_k_reciprocal` the same module, trained on cosine lists, refines the top-k
of k-reciprocal re-ranking, as the authors' `test_ssr_kreciprocal.py` does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.knn import (
    canonical_similarity,
    top_k_smallest,
    torch_canonical_similarity,
    torch_topk_largest,
)
from engine.core.state import MissingStateError, StaleStateError, load_state, save_state
from engine.core.storage import fingerprint
from engine.core.types import (
    Evidence,
    EvidenceGroup,
    GalleryContext,
    KnnGraph,
    TrainingSet,
    check_features,
)
from engine.errors import CacheError, InvalidInputError
from engine.rerank import register
from engine.rerank._scale import canonical_block, canonical_rows, gib, memory_budget, query_top
from engine.rerank.base import Reranker, RerankParams, param

logger = logging.getLogger(__name__)

STATE_VERSION = 4
"""4: saved by `engine.core.state` (manifest with its own checksum, kind and format); 3: episodes
and subgraph views ordered by canonical cosines (self first in its own view). States of an
earlier version are retrained."""
POOL_SIZE = 1000
MAX_EPISODE_AP = 0.8
MIN_POSITIVES = 5
"""More than this many positives in an episode's top-k (the authors'); at most a quarter of k."""
LEARNING_RATE = 1e-3
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
INITIAL_SCALE = 10.0
PROGRESS_EVERY_MAX = 50
"""Training reports progress every 1 % of its episodes, and at least every this many (an
episode costs about 0.1 s on one core, a report microseconds)."""
EPISODES_PER_ITEM = 2
MIN_EPISODES = 300
"""The default training budget on a gallery of n items (`SSRParams.for_gallery`): the
authors' 3,000 episodes, capped at EPISODES_PER_ITEM x n with a floor of MIN_EPISODES.

The authors' 3,000 (an episode is one SGD step on one query's top-k) were set for training sets
of thousands of items, where each item is a query a few times at most. A gallery of n items
offers only n distinct queries, and the time grows linearly with the episodes (0.035 to 0.1 s
each on one core for a 60-image gallery, by the machine's load: 3,000 take 2 to 5 minutes, many
times the gallery's indexing). Measured on 60 demo images (4 classes, pseudo-labels, k = 58): the
training loss is flat for ~200 episodes, falls from 2.5 to 0.6 between 200 and 500, and is
~0 from 600 on, the gallery's pseudo-labels learnt by heart. The floor puts small galleries
into that descent without reaching the memorising end; two episodes per item keep larger ones
there too. Galleries of 1,500 items or more train with the authors' 3,000."""
QUADRATURE_NODES = 16
"""Gauss-Legendre nodes of the integrated gradient of a cosine along a straight line
(`cosine_path_gradient`): the cosine is analytic along it, and 16 nodes leave an error far
below float32 rounding for moves of the size the module makes."""
STRONGEST_REFERENCES = 5
"""References whose shares the evidence highlights on the kNN plot (the largest in size)."""
ESTIMATE_WARM_UP = 2
ESTIMATE_STEPS = 5
"""Training steps timed, after ESTIMATE_WARM_UP untimed ones (the first steps are slower), to
estimate a fit's time from their median."""
QUERY_CHUNK = 64
INITIAL_CHUNK = 4096
"""Query rows per block of the initial cosine ranking (4096 x G similarities at a time, fewer
where the memory budget holds fewer)."""
BYTES_PER_SIMILARITY = 24
"""Memory of the initial cosine ranking per (query, gallery item) of a block: the float32
similarities, their negation and partition, the selection mask and its indices."""
PSEUDO_LABEL_WORK = 2e10
"""Bound on the LHRR work of the pseudo-labels, n K^4 multiply-adds (its Cartesian products
sum K^2 hyperedges of K^2 members per item): the neighbourhood K, n / clusters, is capped at
(PSEUDO_LABEL_WORK / n)^(1/4) (61 at 1,360 items, 21 at 100,000, where n / clusters would be
447 and the work 4e15). Training sets of fewer than 1,711 items are not capped."""


@dataclass(frozen=True)
class SSRParams(RerankParams):
    k: int = param(100, minimum=2, maximum=500, step=1,
                   help="length of the top-k the module re-orders (the rest keeps its order)")
    q_steps: int = param(1, minimum=1, maximum=3, step=1,
                         help="feature updates by the predicted gradients")
    lr_dni: float = param(5e-4, minimum=1e-6, maximum=1.0, step=1e-4,
                          help="step size of the feature updates")
    hidden: int = param(512, minimum=16, maximum=4096, step=16,
                        help="hidden size of the synthetic-gradient MLPs")
    train_classes: int = param(0, minimum=0, maximum=100000, step=1,
                               help="0: learn without labels (pseudo-labels from LHRR clusters "
                                    "of the training items); N: learn with the labels of "
                                    "classes 0..N-1 only")
    episodes: int = param(3000, minimum=1, maximum=200000, step=100,
                          help="training episodes (one SGD step each)")
    after_k_reciprocal: bool = param(False, help="refine the top-k of k-reciprocal re-ranking "
                                                 "instead of the cosine ranking, the authors' "
                                                 "best combination")
    k1: int = param(20, minimum=1, maximum=500, step=1,
                    help="k-reciprocal's k1, with after_k_reciprocal")
    k2: int = param(6, minimum=1, maximum=500, step=1,
                    help="k-reciprocal's k2, with after_k_reciprocal")
    lambda_value: float = param(0.3, minimum=0.0, maximum=1.0, step=0.05,
                                help="k-reciprocal's weight of the original distance, with "
                                     "after_k_reciprocal")
    seed: int = param(0, minimum=0, maximum=2**31 - 1, step=1,
                      help="seed of initialisation and episode sampling")

    @classmethod
    def for_gallery(cls, size: int) -> dict[str, Any]:
        """The authors' episodes scaled to a gallery of `size` items (see `MIN_EPISODES`)."""
        default = cls().episodes
        return {"episodes": min(default, max(MIN_EPISODES, EPISODES_PER_ITEM * int(size)))}


class RowNorm(torch.nn.Module):
    """`InstanceNorm1d(1, affine=True)` on (n, 1, L) rows, written out: torch's fused kernel
    has no third derivative, which training two update steps needs."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        mean = rows.mean(dim=-1, keepdim=True)
        variance = rows.var(dim=-1, unbiased=False, keepdim=True)
        return (rows - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class SyntheticGradient(torch.nn.Module):
    """The authors' `dni_linear`: InstanceNorm -> Linear -> ReLU -> InstanceNorm -> Linear ->
    ReLU -> InstanceNorm -> Linear, each view (row) normalised on its own."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.input_norm = RowNorm()
        self.first = torch.nn.Linear(size, hidden)
        self.first_norm = RowNorm()
        self.second = torch.nn.Linear(hidden, hidden)
        self.second_norm = RowNorm()
        self.output = torch.nn.Linear(hidden, size)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        rows = views.reshape(-1, 1, views.shape[-1])
        rows = self.first_norm(F.relu(self.first(self.input_norm(rows))))
        rows = self.second_norm(F.relu(self.second(rows)))
        return self.output(rows).reshape(views.shape)


def subgraph_order(query: torch.Tensor, database: torch.Tensor,
                   database_order: torch.Tensor | None = None) -> torch.Tensor:
    """The order of every subgraph view: for each reference r of [query, d_1..d_k], the
    database items 0..k-1 in descending canonical cosine to r.

    Canonical as elsewhere in the engine (`knn.canonical_similarity`): products and norms in
    float64, the cosine rounded once to float32; ties go to the smaller index, and a database
    reference comes first in its own order. The float32 cosines that the views carry differ in
    the last bits between BLAS kernels and batch sizes, and a near-tie resolved the other way
    moves two items within a view (a jump in the refined score, not a rounding); the rounded
    float64 cosines are the same bits everywhere, barring a float32 rounding boundary.
    Computed without gradient, on the inputs' device.

    Args:
        query: (B, d) float32 or float64.
        database: (B, k, d) float32, or float64 (converted once by a caller that orders the
            same database twice).
        database_order: (B, k, k) the database rows of an earlier order of this database,
            when only the query has moved since: only the query's row is computed.
    Returns:
        (B, k + 1, k) int64, row 0 the query's.
    """
    with torch.no_grad():
        query = query.detach().double()[:, None, :]
        database = database.detach().double()
        norms = torch.linalg.vector_norm(database, dim=-1).clamp(min=1e-12)[:, None, :]
        query_norm = torch.linalg.vector_norm(query, dim=-1, keepdim=True).clamp(min=1e-12)
        to_query = ((query @ database.transpose(1, 2)) / (query_norm * norms)).clamp(max=1.0)
        query_order = torch.sort(to_query.float(), dim=2, descending=True, stable=True).indices
        if database_order is None:
            block = ((database @ database.transpose(1, 2)) / (norms.transpose(1, 2) * norms)
                     ).clamp(max=1.0).float()
            block.diagonal(dim1=1, dim2=2).fill_(torch.inf)
            database_order = torch.sort(block, dim=2, descending=True, stable=True).indices
        return torch.cat([query_order, database_order], dim=1)


def subgraph_views(nodes: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
    """(B, k + 1, d) features [query, d_1..d_k] -> (B, k + 1, 2k + 1) views, one per reference.

    Row r is [S(r, q), S(r, d_(1..k)), S(q, d_(1..k))] with d_(j) the database items in
    `order` (default `subgraph_order`: descending canonical cosine to r, ties to the earlier
    item, r itself first); S is the float32 cosine, which carries the gradient. One batched
    gather builds all views; the ordering itself carries no gradient.
    """
    unit = F.normalize(nodes, dim=-1, eps=1e-12)
    similarity = unit @ unit.transpose(1, 2)
    to_database = similarity[:, :, 1:]
    if order is None:
        order = subgraph_order(nodes[:, 0], nodes[:, 1:])
    own = to_database.gather(2, order)
    from_query = to_database[:, :1, :].expand_as(to_database).gather(2, order)
    return torch.cat([similarity[:, :, :1], own, from_query], dim=2)


@dataclass(frozen=True)
class RefinementStep:
    """One feature update of `SubgraphRefiner.refine`, as it ran: which nodes moved ("query"
    or "database"), the (B, d) query and (B, k, d) database it read, the views' order and the
    synthetic gradients (B, k + 1, 2k + 1) its network gave each view (row r: reference r's,
    row 0 the query's own). The update is moved - lr_dni * sum over r of J_r^T synthetic[r],
    J_r the Jacobian of view r: a sum of one term per reference."""

    moved: str
    query: torch.Tensor
    database: torch.Tensor
    order: torch.Tensor
    synthetic: torch.Tensor


class SubgraphRefiner(torch.nn.Module):
    """The SSR module: refines (B, d) queries and their (B, k, d) top-k, returns (B, k) cosine
    similarities of the refined features."""

    def __init__(self, k: int, q_steps: int, lr_dni: float, hidden: int) -> None:
        super().__init__()
        self.k, self.q_steps, self.lr_dni = int(k), int(q_steps), float(lr_dni)
        size = 2 * self.k + 1
        self.query_gradient = SyntheticGradient(size, hidden)
        self.database_gradient = SyntheticGradient(size, hidden)
        self.scale = torch.nn.Parameter(torch.tensor(INITIAL_SCALE))

    def refine(self, query: torch.Tensor, database: torch.Tensor,
               trace: list[RefinementStep] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`q_steps` updates: the query by the query network's gradients, then the database
        by the database network's (views rebuilt in between). `trace`, a list, receives each
        update's inputs (`RefinementStep`), what `explain_refinement` reads."""
        training = torch.is_grad_enabled() and self.training
        with torch.enable_grad():
            if not query.requires_grad:
                query = query.detach().requires_grad_(True)
            if not database.requires_grad:
                database = database.detach().requires_grad_(True)
            for _ in range(self.q_steps):
                database64 = database.detach().double()
                order = subgraph_order(query, database64)
                query = self._step(query, database, query, self.query_gradient, training,
                                   order, trace)
                # only the query has moved: the database rows keep their order
                order = subgraph_order(query, database64, order[:, 1:])
                database = self._step(query, database, database, self.database_gradient,
                                      training, order, trace)
        return query, database

    def _step(self, query: torch.Tensor, database: torch.Tensor, moved: torch.Tensor,
              network: SyntheticGradient, training: bool, order: torch.Tensor,
              trace: list[RefinementStep] | None = None) -> torch.Tensor:
        views = subgraph_views(torch.cat([query[:, None, :], database], dim=1), order)
        synthetic = network(views)
        gradient = torch.autograd.grad(views, moved, grad_outputs=synthetic,
                                       create_graph=training)[0]
        if trace is not None:
            trace.append(RefinementStep("query" if moved is query else "database",
                                        query.detach(), database.detach(), order,
                                        synthetic.detach()))
        updated = moved - self.lr_dni * gradient
        return updated if training else updated.detach().requires_grad_(True)

    @staticmethod
    def similarities(query: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        """(B, k) cosines of refined (B, d) queries and their (B, k, d) database rows."""
        return torch.einsum("bd,bkd->bk", F.normalize(query, dim=-1),
                            F.normalize(database, dim=-1))

    def forward(self, query: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
        return self.similarities(*self.refine(query, database))


def views_tangent(query: torch.Tensor, database: torch.Tensor, order: torch.Tensor,
                  query_direction: torch.Tensor, database_direction: torch.Tensor
                  ) -> torch.Tensor:
    """The derivative of `subgraph_views` (order fixed) at (query, database) along
    (query_direction, database_direction): J u, (B, k + 1, 2k + 1). Read as the gradient of
    <J^T w, u> with respect to w (two reverse passes; torch's forward mode compiles a
    decomposition of `normalize` on its first call, about a second)."""
    with torch.enable_grad():
        query = query.detach().requires_grad_(True)
        database = database.detach().requires_grad_(True)
        views = subgraph_views(torch.cat([query[:, None, :], database], dim=1), order)
        weights = torch.zeros_like(views, requires_grad=True)
        back = torch.autograd.grad(views, (query, database), grad_outputs=weights,
                                   create_graph=True)
        along = (back[0] * query_direction).sum() + (back[1] * database_direction).sum()
        return torch.autograd.grad(along, weights)[0]


@dataclass(frozen=True)
class RefinementSplit:
    """One item's refined similarity split over the module's per-reference terms
    (`explain_refinement`): refined[position] = cosine + own_view + references.sum(), up to
    the float32 rounding of the module's own run and a quadrature error far below it.

    refined: (k,) float32 the module's output for the whole top-k, the bits online mode ranks.
    cosine: the item's cosine to the query before refinement (float64).
    own_view: the share of the query's own view (reference 0).
    references: (k,) float64 the share of each database reference's view, top-k order.
    """

    refined: np.ndarray
    cosine: float
    own_view: float
    references: np.ndarray


def cosine_path_gradient(query: torch.Tensor, item: torch.Tensor, moved_query: torch.Tensor,
                         moved_item: torch.Tensor, nodes: int = QUADRATURE_NODES
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of cos(q, d) integrated along the straight line from (query, item) to
    (moved_query, moved_item), by `nodes`-point Gauss-Legendre quadrature in float64: (d,)
    for q and (d,) for d. Its inner product with the whole move is the change of the cosine
    (the fundamental theorem of calculus), and with any part of the move, that part's share
    (integrated gradients)."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    times = torch.from_numpy((points + 1.0) / 2.0).to(query.device)[:, None]
    weights = torch.from_numpy(weights / 2.0).to(query.device)[:, None]
    q = query.double() + times * (moved_query.double() - query.double())
    d = item.double() + times * (moved_item.double() - item.double())
    q_norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)
    d_norm = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    cosine = (q * d).sum(dim=1, keepdim=True) / (q_norm * d_norm)
    along_q = d / (q_norm * d_norm) - cosine * q / q_norm ** 2
    along_d = q / (q_norm * d_norm) - cosine * d / d_norm ** 2
    return (weights * along_q).sum(dim=0), (weights * along_d).sum(dim=0)


def explain_refinement(model: SubgraphRefiner, query: torch.Tensor, database: torch.Tensor,
                       position: int) -> RefinementSplit:
    """Why the module moved database item `position` of one query's top-k: its refined
    similarity, split over the references whose views' synthetic gradients moved the features.

    Every update is a sum of one term per view (`RefinementStep`: -lr_dni J_r^T g_r, g_r the
    synthetic gradient of reference r's view, J_r that view's Jacobian), so the query ends at
    q' = q + sum_r A_r and the item at d' = d + sum_r B_r (A_r, B_r: reference r's terms,
    summed over the steps). Reference r's share is the integrated gradient of the cosine along
    the straight line from (q, d) to (q', d') (`cosine_path_gradient`, (G_q, G_d)) times its
    terms: <G_q, A_r> + <G_d, B_r>. The shares add up to cos(q', d') - cos(q, d) exactly
    (completeness); a reference whose push lengthens the features without turning them
    towards each other gets the lowering this causes. On the inner product alone this is the
    symmetric split <A_r, d + B/2> + <q + A/2, B_r>. Each <A_r, u> is read as
    -lr_dni <g_r, J_r u>, one directional derivative of the views per step for all
    references at once (`views_tangent`, float64): the split costs about one more run of the
    module.

    Args:
        query: (1, d) float32; database: (1, k, d) float32 on the model's device.
        position: the item's row in `database`.
    """
    trace: list[RefinementStep] = []
    with torch.no_grad():  # as online mode runs the module (`SSR._refine`)
        moved_query, moved_database = model.refine(query, database, trace)
        refined = model.similarities(moved_query, moved_database)[0].cpu().numpy()
    q0, d0 = query[0].detach().double(), database[0, position].detach().double()
    along_query, along_item = cosine_path_gradient(
        q0, d0, moved_query.detach()[0], moved_database.detach()[0, position])
    shares = torch.zeros(database.shape[1] + 1, dtype=torch.float64, device=query.device)
    for step in trace:
        nodes_query, nodes_database = step.query.double(), step.database.double()
        query_direction = torch.zeros_like(nodes_query)
        database_direction = torch.zeros_like(nodes_database)
        if step.moved == "query":
            query_direction[0] = along_query
        else:
            database_direction[0, position] = along_item
        tangent = views_tangent(nodes_query, nodes_database, step.order, query_direction,
                                database_direction)
        shares -= model.lr_dni * (step.synthetic.double() * tangent).sum(dim=-1)[0]
    cosine = float(q0 @ d0) / float(torch.linalg.vector_norm(q0) * torch.linalg.vector_norm(d0))
    shares = shares.cpu().numpy()
    return RefinementSplit(refined=refined, cosine=cosine, own_view=float(shares[0]),
                           references=shares[1:])


def decimals_apart(before: float, after: float, least: int = 3, most: int = 6) -> int:
    """Decimals (`least` to `most`) at which two numbers print differently, so that a small
    refinement does not read "from 0.803 to 0.803"."""
    digits = least
    while digits < most and f"{before:.{digits}f}" == f"{after:.{digits}f}":
        digits += 1
    return digits


def signed(value: float) -> str:
    """A share with its sign: three decimals, or two significant digits below 0.001."""
    return f"{value:+.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:+.1e}"


def info_nce(similarity: torch.Tensor, relevant: torch.Tensor, known: torch.Tensor,
             scale: torch.Tensor) -> torch.Tensor:
    """The authors' "InfoBCE": mean over positives p of
    -log(exp(t s_p) / (exp(t s_p) + sum over negatives n of exp(t s_n))); items whose relevance
    is unknown (unclustered pseudo-labels) are left out."""
    logits = scale * similarity
    positives = logits[relevant & known]
    negatives = logits[~relevant & known]
    negative_mass = torch.logsumexp(negatives, dim=0)
    return (torch.logaddexp(positives, negative_mass) - positives).mean()


def list_average_precision(relevant: np.ndarray) -> float:
    """AP of a ranked list over the positives it holds (the authors' `mAP_sample`)."""
    hits = np.flatnonzero(relevant)
    if hits.size == 0:
        return 0.0
    return float(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))


def ranking_rows(size: int) -> int:
    """Query rows per block of `cosine_ranking` against `size` gallery items: `INITIAL_CHUNK`,
    fewer where the memory budget holds fewer."""
    budget = memory_budget()
    if budget is None:
        return INITIAL_CHUNK
    return int(min(INITIAL_CHUNK, max(1, budget // (size * BYTES_PER_SIMILARITY))))


def cosine_ranking(queries: np.ndarray, gallery: np.ndarray, depth: int, exclude_self: bool,
                   gallery_tensor: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Q, depth) gallery ids by descending canonical cosine (ties: smaller id first) and their
    distances 1 - cosine; `exclude_self` when the queries are the gallery's own rows. With
    `gallery_tensor` the products and the top-k run in torch on its device (same result)."""
    indices = np.empty((len(queries), depth), np.int64)
    distances = np.empty((len(queries), depth), np.float32)
    chunk = ranking_rows(len(gallery))
    for begin in range(0, len(queries), chunk):
        rows = slice(begin, begin + chunk)
        if gallery_tensor is None:
            similarity = canonical_block(queries[rows], gallery)
            if exclude_self:
                local = np.arange(len(similarity))
                similarity[local, local + begin] = -np.inf
            negated, indices[rows] = top_k_smallest(-similarity, depth)
            distances[rows] = 1.0 + negated
        else:
            device = gallery_tensor.device
            similarity = torch_canonical_similarity(
                torch.from_numpy(np.ascontiguousarray(queries[rows])).to(device), gallery_tensor)
            if exclude_self:
                local = torch.arange(similarity.shape[0], device=device)
                similarity[local, local + begin] = -torch.inf
            values, order = torch_topk_largest(similarity, depth)
            indices[rows], distances[rows] = order.cpu().numpy(), (1.0 - values).cpu().numpy()
    return distances, indices


@dataclass(frozen=True)
class Episode:
    query: int
    top: np.ndarray          # (k,) training rows, most similar first
    relevant: np.ndarray     # (k,) bool
    known: np.ndarray        # (k,) bool


def sample_episode(features: np.ndarray, labels: np.ndarray, k: int, pool_size: int,
                   rng: np.random.Generator, max_ap: float = MAX_EPISODE_AP,
                   min_positives: int = MIN_POSITIVES) -> Episode | None:
    """One episode as the authors draw it, or None when it fails their filter (AP of the top-k
    < max_ap and more than min_positives positives). Labels -1 are unknown. The top-k is the
    pool's k most similar items by canonical cosine (ties: the smaller id first)."""
    n = len(features)
    query = int(rng.integers(n))
    if labels[query] < 0:
        return None
    others = rng.choice(n - 1, size=pool_size, replace=False)
    pool = np.sort(others + (others >= query))  # skip the query itself; ascending ids
    # canonical cosines, ties to the smaller id: the same top-k on every CPU
    similarity = canonical_similarity(features[query][None, :], features[pool])
    top = pool[top_k_smallest(-similarity, k)[1][0]]
    known = labels[top] >= 0
    relevant = (labels[top] == labels[query]) & known
    if relevant.sum() <= min_positives or not (~relevant & known).any():
        return None
    if list_average_precision(relevant[known]) >= max_ap:
        return None
    return Episode(query, top, relevant, known)


def training_step(model: SubgraphRefiner, optimiser: torch.optim.Optimizer,
                  features: torch.Tensor, episode: Episode) -> tuple[float, np.ndarray]:
    """One SGD step on one episode; returns the loss and the refined order of its top-k."""
    device = features.device
    query = features[episode.query][None, :].clone().requires_grad_(True)
    database = features[torch.from_numpy(episode.top).to(device)][None].clone()
    database.requires_grad_(True)
    optimiser.zero_grad()
    similarity = model(query, database)[0]
    loss = info_nce(similarity, torch.from_numpy(episode.relevant).to(device),
                    torch.from_numpy(episode.known).to(device), model.scale)
    loss.backward()
    optimiser.step()
    return float(loss.detach()), np.argsort(-similarity.detach().cpu().numpy(), kind="stable")


def progress_interval(episodes: int) -> int:
    """Episodes between two training progress reports: 1 % of `episodes`, between 1 and
    PROGRESS_EVERY_MAX (the last episode is reported too)."""
    return max(1, min(PROGRESS_EVERY_MAX, episodes // 100))


def make_optimiser(model: SubgraphRefiner) -> torch.optim.Optimizer:
    """The authors' SGD: lr 1e-3, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                           weight_decay=WEIGHT_DECAY)


def train_refiner(features: np.ndarray, labels: np.ndarray, k: int, q_steps: int, lr_dni: float,
                  hidden: int, episodes: int, seed: int, device: torch.device,
                  start: SubgraphRefiner | None = None, progress: Any = None,
                  max_ap: float = MAX_EPISODE_AP, min_positives: int = MIN_POSITIVES
                  ) -> tuple[SubgraphRefiner, dict[str, Any]]:
    """Train an SSR module on (n, d) unit features with (n,) labels (-1 unknown); `start` is a
    model to continue from (its weights are copied).
    Returns the model and a training log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(features)
    pool_size = min(POOL_SIZE, n - 1)
    if n < k + 2 or pool_size < k:
        raise InvalidInputError(f"SSR with k={k} needs at least {k + 2} training items, got {n}")
    min_positives = min(min_positives, k // 4)
    model = SubgraphRefiner(k, q_steps, lr_dni, hidden).to(device)
    if start is not None:
        model.load_state_dict(start.state_dict())
    model.train()
    optimiser = make_optimiser(model)
    table = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
    losses, before, after = [], [], []
    attempts, budget = 0, max(1000, 200 * episodes)
    every = progress_interval(episodes)
    started = time.perf_counter()
    while len(losses) < episodes:
        attempts += 1
        if attempts > budget:
            raise InvalidInputError(
                f"SSR found only {len(losses)} training episodes in {budget} draws that pass the "
                f"authors' filter (top-{k} AP < {max_ap} with more than {min_positives} "
                "positives): the training set is too small, too easy or has too few positives")
        episode = sample_episode(features, labels, k, pool_size, rng, max_ap, min_positives)
        if episode is None:
            continue
        loss, order = training_step(model, optimiser, table, episode)
        losses.append(loss)
        before.append(list_average_precision(episode.relevant[episode.known]))
        after.append(list_average_precision(episode.relevant[order][episode.known[order]]))
        done = len(losses)
        if progress is not None and (done % every == 0 or done == episodes):
            progress(done / episodes, f"training episode {done}/{episodes}")
    model.eval()
    tail = max(1, episodes // 10)
    log = {"episodes": episodes, "draws": attempts, "seconds": time.perf_counter() - started,
           "first_loss": float(np.mean(losses[:tail])), "last_loss": float(np.mean(losses[-tail:])),
           "episode_ap_before": float(np.mean(before[-tail:])),
           "episode_ap_after": float(np.mean(after[-tail:]))}
    return model, log


def pseudo_label_neighbourhood(n: int, clusters: int) -> int:
    """LHRR's K for the pseudo-labels of n items in `clusters` clusters: about one cluster,
    n / clusters, capped so that LHRR's work stays under `PSEUDO_LABEL_WORK`."""
    cap = max(2, int((PSEUDO_LABEL_WORK / n) ** 0.25))
    return max(2, min(n // clusters, n - 1, cap))


def pseudo_labels(features: np.ndarray, knn: KnnGraph | None = None) -> tuple[np.ndarray, str]:
    """Label-free positives: SGCC clusters of the LHRR hypergraph (neighbourhood about one
    cluster, every item kept, `pseudo_label_neighbourhood`), -1 where an item joins no
    cluster. `knn`: the items' kNN graph (exact or approximate), LHRR's initial lists when
    deep enough."""
    from engine.rerank._hypergraph import default_clusters, lhrr_from_features, sgcc

    n = len(features)
    clusters = default_clusters(n)
    neighbourhood = pseudo_label_neighbourhood(n, clusters)
    hypergraph = lhrr_from_features(features, neighbourhood, knn=knn)
    clustering = sgcc(hypergraph, clusters, 1.0)
    return clustering.labels, (f"pseudo-labels: {clusters} LHRR/SGCC clusters "
                               f"(K={hypergraph.k})")


@register
class SSR(Reranker):
    """Subgraph Similarity Refiner; see the module docstring."""

    name: ClassVar[str] = "ssr"
    title: ClassVar[str] = "SSR (Shen et al. 2021)"
    distance_note: ClassVar[str] = (
        "1 - cosine of the refined features for the top k; beyond, the initial ranking's "
        "distance (1 - cosine, or k-reciprocal's), raised where needed to stay ascending")
    Params: ClassVar[type[RerankParams]] = SSRParams
    learns: ClassVar[bool] = True
    runs_on_gpu: ClassVar[bool] = True
    quick_params: ClassVar[dict[str, Any]] = {"k": 10, "hidden": 16, "episodes": 20}
    details_schema: ClassVar[dict[str, str]] = {
        "k": "size of the refined top-k subgraph",
        "q_steps": "refinement steps run",
        "initial": "the initial ranking refined (cosine, or k-reciprocal with its parameters)",
        "trained_on": "what the refiner was trained on (the gallery, or held-out items)",
        "refined_similarity": "the first query's refined similarities of its top-k, best first",
    }
    min_gallery: ClassVar[int] = 20
    """Training episodes need a top-k with several positives and negatives."""

    # -- fitting ---------------------------------------------------------------------------
    def _fit(self, context: GalleryContext) -> None:
        training = self._training_set(context)
        self.training_description = training.description
        self.k_used = min(self.params.k, context.size - 1, training.size - 2)
        if self.k_used < 2:
            raise InvalidInputError(
                f"SSR needs a gallery and a training set of at least 4 items (k >= 2); got "
                f"{context.size} and {training.size}")
        self._k_reciprocal = None
        if self.params.after_k_reciprocal:
            from engine.rerank import create_reranker

            self._k_reciprocal = create_reranker(
                "k_reciprocal", device=str(self.device), k1=self.params.k1, k2=self.params.k2,
                lambda_value=self.params.lambda_value).fit(context)
        self._gallery_tensor = torch.from_numpy(context.features).to(self.device)
        self.model, self.manifest = self.fit_or_load(
            training, context.state_dir, knn=context.knn if context.training is None else None)
        self.training_seconds = self.manifest["log"]["seconds"] + self.manifest.get(
            "earlier_seconds", 0.0)

    def estimate_fit_seconds(self, context: GalleryContext) -> float | None:
        """The training time of `fit(context)`: each q_steps level's episodes times the time
        of one training step of that level, the median of `ESTIMATE_STEPS` steps timed here
        on real top-k subgraphs of `context` (after `ESTIMATE_WARM_UP` steps; under a second
        at the defaults). About 0 when the state is saved; None when the gallery is too small.
        Drawing the episodes and the pseudo-labels of an unlabelled training set are left
        out."""
        training = self._training_set(context)
        k = min(self.params.k, context.size - 1, training.size - 2)
        if k < 2:
            return None
        self.k_used = k
        path, _ = self._state_path(training, context.state_dir, self.params.q_steps)
        if path is not None and path.with_suffix(".json").is_file():
            return 0.0
        features = np.ascontiguousarray(training.features, np.float32)
        rng = np.random.default_rng(self.params.seed)
        table = torch.from_numpy(features).to(self.device)
        rows = ESTIMATE_WARM_UP + ESTIMATE_STEPS
        _, tops = cosine_ranking(features[:rows], features, k, exclude_self=True)
        episodes = [Episode(row, tops[row], rng.random(k) < 0.25, np.ones(k, bool))
                    for row in range(len(tops))]
        for episode in episodes:
            episode.relevant[:2], episode.relevant[-1] = True, False
        total = 0.0
        for q_steps in range(1, self.params.q_steps + 1):
            model = SubgraphRefiner(k, q_steps, self.params.lr_dni, self.params.hidden
                                    ).to(self.device).train()
            optimiser = make_optimiser(model)
            times = []
            for number, episode in enumerate(episodes):
                started = time.perf_counter()
                training_step(model, optimiser, table, episode)
                if number >= ESTIMATE_WARM_UP:
                    times.append(time.perf_counter() - started)
            step = float(np.median(times))
            count = self.params.episodes if q_steps == 1 else max(1, self.params.episodes // 6)
            total += count * step
        return total

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """The initial cosine ranking works on blocks of queries against the whole gallery
        (`BYTES_PER_SIMILARITY` per pair, `ranking_rows`); refused when one query's row does
        not fit the memory budget, or when k-reciprocal, refined after, refuses."""
        if self._k_reciprocal is not None:
            refusal = self._k_reciprocal.batch_refusal(gallery_size, n_queries)
            if refusal is not None:
                return f"k-reciprocal's initial ranking: {refusal}"
        budget = memory_budget()
        need = gallery_size * BYTES_PER_SIMILARITY
        if budget is not None and need > budget:
            return (f"{gib(need)} for one query's cosines to the {gallery_size} items, beyond "
                    f"the {gib(budget)} this batch may use")
        return None

    def _training_set(self, context: GalleryContext) -> TrainingSet:
        """What the module learns from: the protocol's training items if the context has
        them, else the gallery; with `train_classes` N, only items of classes 0..N-1 and their
        labels."""
        if context.training is not None:
            source = context.training
            features = check_features(source.features, "training features",
                                      context.features.shape[1])
            labels, where = source.labels, source.description or "held-out training items"
        else:
            features, labels, where = context.features, context.labels, "the gallery"
        classes = self.params.train_classes
        if classes == 0:
            return TrainingSet(features, None, f"{where} without labels")
        if labels is None or not (np.asarray(labels) >= 0).any():
            raise InvalidInputError(
                f"SSR train_classes={classes} needs labelled training items, but {where} has no "
                "labels; set train_classes=0 to learn from pseudo-labels")
        labels = np.asarray(labels)
        keep = (labels >= 0) & (labels < classes)
        if keep.sum() < 4:
            raise InvalidInputError(f"SSR: {where} has only {int(keep.sum())} items of classes "
                                    f"0..{classes - 1}")
        return TrainingSet(features[keep], labels[keep],
                           f"labels of classes 0-{classes - 1} of {where} ({int(keep.sum())} "
                           "items)")

    def _state_path(self, training: TrainingSet, state_dir: Path | None, q_steps: int
                    ) -> tuple[Path | None, dict[str, Any]]:
        identity = {"version": STATE_VERSION, "training": training.fingerprint,
                    "labelled": training.labels is not None, "k": self.k_used,
                    "q_steps": q_steps, "lr_dni": self.params.lr_dni,
                    "hidden": self.params.hidden, "episodes": self.params.episodes,
                    # Episodes come from cosine lists whatever list the module refines; the
                    # field stays so that states saved before this was so keep their names.
                    "after_k_reciprocal": False,
                    "seed": self.params.seed, "dim": int(training.features.shape[1])}
        path = None if state_dir is None else Path(state_dir) / "ssr" / fingerprint(identity)
        return path, identity

    def fit_or_load(self, training: TrainingSet, state_dir: Path | None,
                    q_steps: int | None = None, knn: KnnGraph | None = None
                    ) -> tuple[SubgraphRefiner, dict[str, Any]]:
        """The trained module for this training set and parameters: loaded from `state_dir`
        when saved there, else trained (the (q_steps - 1)-step model first) and saved. `knn`:
        the training items' kNN graph, when they are the gallery (for the pseudo-labels)."""
        q_steps = q_steps or self.params.q_steps
        path, identity = self._state_path(training, state_dir, q_steps)
        if path is not None:
            try:
                loaded = load_refiner(path, training.fingerprint, self.device)
            except CacheError as error:
                logger.warning("retraining SSR: %s", error)
                loaded = None
            if loaded is not None:
                return loaded
        start, episodes, earlier = None, self.params.episodes, 0.0
        if q_steps > 1:
            start, before = self.fit_or_load(training, state_dir, q_steps - 1, knn)
            episodes = max(1, episodes // 6)
            earlier = before["log"]["seconds"] + before.get("earlier_seconds", 0.0)
        labels, mode = training.labels, training.description
        if labels is None:
            self._report(0.0, "pseudo-labels from the LHRR hypergraph")
            labels, how = pseudo_labels(training.features, knn)
            mode = f"{training.description}; {how}"
        model, log = train_refiner(
            training.features, np.asarray(labels, np.int64), self.k_used, q_steps,
            self.params.lr_dni, self.params.hidden, episodes, self.params.seed, self.device,
            start=start, progress=self._report)
        manifest = {**identity, "features_fingerprint": training.fingerprint,
                    "training_items": training.size, "mode": mode, "log": log,
                    "earlier_seconds": earlier}
        if path is not None:
            save_refiner(path, model, manifest)
        return model, manifest

    # -- ranking ---------------------------------------------------------------------------
    def _initial(self, query_features: np.ndarray | None, depth: int, mode: str
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, depth) initial ranking and its distances: cosine, or k-reciprocal's (in the
        same mode: an online query joins the fitted gallery graph, a batch re-builds it)."""
        if self._k_reciprocal is not None:
            result = self._k_reciprocal.rerank(query_features, depth, mode=mode)
            return result.distances, result.indices
        gallery = self.gallery.features
        if mode == "online" and self.device.type == "cpu":
            # one query: a float32 product proposes its top, only those get canonical cosines
            similarities, indices = query_top(gallery, query_features[0], depth)
            return (1.0 - similarities)[None, :], indices[None, :]
        return cosine_ranking(gallery if query_features is None else query_features, gallery,
                              depth, exclude_self=query_features is None,
                              gallery_tensor=None if self.device.type == "cpu"
                              else self._gallery_tensor)

    def _refine(self, query_features: np.ndarray | None, k: int, mode: str = "batch"
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        gallery = self.gallery.features
        top = self.k_used
        distances, indices = self._initial(query_features, max(k, top), mode)
        queries = gallery if query_features is None else query_features
        refined = np.empty((len(queries), top), np.float32)
        for begin in range(0, len(queries), QUERY_CHUNK):
            rows = slice(begin, begin + QUERY_CHUNK)
            query = torch.from_numpy(np.ascontiguousarray(queries[rows])).to(self.device)
            database = self._gallery_tensor[torch.from_numpy(indices[rows, :top])
                                            .to(self.device)]
            with torch.no_grad():
                refined[rows] = self.model(query, database).cpu().numpy()
        order = np.argsort(-refined, axis=1, kind="stable")
        head = np.take_along_axis(indices[:, :top], order, axis=1)
        head_distances = 1.0 - np.take_along_axis(refined, order, axis=1)
        ranked = np.concatenate([head, indices[:, top:]], axis=1)[:, :k]
        # Past the top-k the initial order stays; distances are kept ascending across the seam.
        ranked_distances = np.maximum.accumulate(
            np.concatenate([head_distances, distances[:, top:]], axis=1), axis=1)[:, :k]
        details = {"k": top, "q_steps": self.params.q_steps,
                   "initial": (f"k-reciprocal ({self.params.k1}, {self.params.k2}, "
                               f"{self.params.lambda_value:g})" if self._k_reciprocal
                               else "cosine"),
                   "trained_on": self.manifest["mode"],
                   "refined_similarity": refined[0, order[0]].tolist()}
        return ranked_distances.astype(np.float32), ranked, details

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        return self._refine(query_features, k)

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        distances, indices, details = self._refine(query_feature[None, :], k, "online")
        return distances[0], indices[0], details

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The online path for this query: the initial ranking's top-k, the module run on it
        once, and the item's refined similarity split over the references
        (`explain_refinement`). An item past the top-k keeps its initial place."""
        top = self.k_used
        initial = "k-reciprocal" if self._k_reciprocal is not None else "cosine"
        distances, indices = self._initial(query_feature[None, :], top, "online")
        head = indices[0, :top]
        where = np.flatnonzero(head == item)
        if not where.size:
            return self._explain_tail(query_feature, item, initial,
                                      self._head_distances(query_feature, head).max())
        position = int(where[0])
        split = explain_refinement(self.model, *self._subgraph(query_feature, head), position)
        distance = (1.0 - split.refined)[position]  # as `_refine`: float32, ascending already
        similarity = float(split.refined[position])
        change = similarity - split.cosine
        sign = 1.0 if change >= 0 else -1.0
        strongest = int(np.argmax(sign * split.references))
        if sign * split.own_view > sign * split.references[strongest]:
            who, share = "the query's own view", split.own_view
        elif strongest == position:
            who, share = "its own view", split.references[strongest]
        else:
            who, share = f"reference #{strongest + 1} of the top {top}", \
                split.references[strongest]
        order = np.argsort(-np.abs(split.references), kind="stable")[:STRONGEST_REFERENCES]
        value_name = "share of the refined similarity"
        digits = decimals_apart(split.cosine, similarity)
        return Evidence(
            self.name, item,
            f"refinement {'raised' if change >= 0 else 'lowered'} its similarity from "
            f"{split.cosine:.{digits}f} to {similarity:.{digits}f}; {who} moved it most "
            f"({signed(share)} of {signed(change)})",
            {f"initial distance ({initial})": float(distances[0, position]),
             "cosine similarity": split.cosine,
             "query's own view": split.own_view,
             "references' views": float(split.references.sum()),
             "refined similarity": similarity,
             "final distance": float(distance)},
            (EvidenceGroup("strongest references", head[order], split.references[order],
                           value_name),
             EvidenceGroup(f"references (initial top {top})", head, split.references,
                           value_name, highlight=False)))

    def _subgraph(self, query_feature: np.ndarray, head: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's (1, d) query and (1, k, d) database, built as `_refine` builds them."""
        query = torch.from_numpy(np.ascontiguousarray(query_feature[None, :])).to(self.device)
        return query, self._gallery_tensor[torch.from_numpy(head[None, :]).to(self.device)]

    def _head_distances(self, query_feature: np.ndarray, head: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            refined = self.model(*self._subgraph(query_feature, head))[0].cpu().numpy()
        return 1.0 - refined

    def _explain_tail(self, query_feature: np.ndarray, item: int, initial: str,
                      head_largest: np.floating) -> Evidence:
        """An item past the refined top-k: its initial distance, raised to the top-k's largest
        refined distance where that is larger (as `_refine` keeps the ranking ascending)."""
        if self._k_reciprocal is None and self.device.type == "cpu":
            similarity = canonical_rows(self.gallery.features, np.array([item]), query_feature)
            distance = (1.0 - similarity)[0]
        else:
            distances, indices = self._initial(query_feature[None, :], self.gallery.size,
                                               "online")
            distance = distances[0][indices[0] == item][0]
        final = np.maximum(distance, head_largest)
        return Evidence(
            self.name, item,
            f"it is past the top {self.k_used} that SSR refines, so it keeps its place in the "
            f"{initial} ranking (distance {float(distance):.3f})",
            {f"initial distance ({initial})": float(distance),
             "largest refined distance": float(head_largest), "final distance": float(final)})


# -- state on disk ---------------------------------------------------------------------------
def save_refiner(path: Path, model: SubgraphRefiner, manifest: dict[str, Any]) -> None:
    """Save the module's weights and `manifest` (which names the training features'
    `features_fingerprint`) at `path` with `save_state`."""
    save_state(path, kind="ssr", version=STATE_VERSION,
               fingerprint=manifest["features_fingerprint"], tensors=model.state_dict(),
               metadata=manifest)


def load_refiner(path: Path, features_fingerprint: str, device: torch.device
                 ) -> tuple[SubgraphRefiner, dict[str, Any]] | None:
    """The saved module and manifest, None when nothing is saved at `path`.

    Raises CacheError when the files are damaged or were trained on other features (a
    fingerprint mismatch): the caller retrains rather than use a wrong model.
    """
    try:
        state = load_state(path, kind="ssr", version=STATE_VERSION,
                           fingerprint=features_fingerprint)
    except MissingStateError:
        return None
    except StaleStateError as error:
        raise CacheError(f"the SSR state {path.name} was trained on other features ({error})"
                         ) from error
    manifest = state.manifest
    try:
        model = SubgraphRefiner(manifest["k"], manifest["q_steps"], manifest["lr_dni"],
                                manifest["hidden"])
        model.load_state_dict(state.tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CacheError(f"the SSR state {path.name} is unusable ({error})") from error
    return model.to(device).eval(), manifest
