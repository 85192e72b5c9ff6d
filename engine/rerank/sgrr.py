"""SGRR: self-supervised re-ranking with a hypergraph and a GCN (Lopes, Valem, Pedronette,
SIBGRAPI 2024).

1. LHRR, a rank-based hypergraph manifold step, gives each item a reliable ranked list and a
   hyperedge (`engine.rerank._hypergraph`).
2. SGCC leader clustering turns the most confident items into c pseudo-labelled clusters.
3. A two-layer simplified GCN (SGConv, 2 hops each, hidden 32, ReLU, dropout 0.5) on the
   reciprocal LHRR kNN graph is trained on those pseudo-labels (NLL), then with a triplet margin
   loss on cluster triplets; its c-dimensional outputs (the logits) are the new embeddings.
   Both losses read the network's log-softmax, as the authors' `SGCNet.forward` returns it: the
   triplet stage pulls log-probabilities together, not logits (`epoch_loss`).
4. The gallery is ranked by cosine similarity of the embeddings.

Batch mode is the authors' transductive pipeline on all items at once. Online mode embeds a new
query with the trained network without moving the gallery: the query joins the graph with edges
to its K nearest gallery items (cosine), and its two propagation hops read the gallery's fitted
intermediate features. The trained state (network, pseudo-labels, embeddings) is saved beside
the gallery cache, keyed on the gallery fingerprint and the parameters, and loaded instead of
retraining. The paper, the authors' code and the choices made here: docs/methods/sgrr.md.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from engine.core.knn import knn_graph, torch_topk_largest
from engine.core.state import MissingStateError, load_state, save_state
from engine.core.storage import fingerprint
from engine.core.types import Evidence, EvidenceGroup, GalleryContext, KnnGraph
from engine.errors import CacheError, InvalidInputError
from engine.rerank import register
from engine.rerank._hypergraph import default_clusters, lhrr_from_features, reciprocal_edges, sgcc
from engine.rerank._scale import (
    canonical_block,
    canonical_rows,
    gib,
    memory_budget,
    query_top,
    torch_canonical_block,
)
from engine.rerank.base import Reranker, RerankParams, param

logger = logging.getLogger(__name__)

HIDDEN = 32
DROPOUT = 0.5
WEIGHT_DECAY = 5e-4
TRIPLET_MARGIN = 1.0
STATE_VERSION = 3
"""3: saved by `engine.core.state` (manifest with its own checksum, kind and format); 2: the
triplet stage reads log-softmax rows (1 read the logits). States of an earlier version
retrain."""
ESTIMATE_SAMPLE = 256
"""Items LHRR is timed on to estimate a fit's time (`SGRR.estimate_fit_seconds`)."""
ESTIMATE_EPOCHS = 4
"""Epochs of each training stage timed to estimate a fit's time."""
FITTED = ("degree", "once", "hidden", "hidden_once", "embeddings")
"""The fitted tensors of `train` that online queries read."""
TRIPLET_ELEMENTS = 1 << 25
"""Bound on triplets x clusters: each triplet epoch gathers three (triplets, clusters) rows of
log-probabilities. Every ordered pair of each cluster makes n^2 P^2 / c triplets (27,000 on
the 1,360 demo items; 11 million on 100,000 items in 224 clusters, 10 GiB a gather): above
the bound a seeded sample of them is kept (150,000 at 224 clusters)."""
EXPLAIN_NEIGHBOURS = 10
"""Nearest neighbours of the result, in the GCN space and in the original space, that its
evidence sets against the query's."""
BYTES_PER_PAIR = 40
"""Memory of a batch's ranking per (query, gallery item): float32 embedding distances and
original cosines (their float64 block), two int64 sort orders and the gathered values."""


@dataclass(frozen=True)
class SGRRParams(RerankParams):
    K: int = param(30, minimum=2, maximum=200, step=1,
                   help="LHRR neighbourhood (ranked lists of depth 4K; GCN edges among the "
                        "top K+1)")
    T: int = param(2, minimum=1, maximum=10, step=1, help="LHRR iterations")
    P: float = param(0.5, minimum=0.05, maximum=1.0, step=0.05,
                     help="fraction of the gallery given pseudo-labels")
    clusters: int = param(0, minimum=0, maximum=2000, step=1,
                          help="clusters = embedding size (0: the gallery's number of classes, "
                               "or an estimate when it has no labels)")
    nll_epochs: int = param(300, minimum=0, maximum=5000, step=10,
                            help="epochs of stage 1 (classification of pseudo-labels)")
    triplet_epochs: int = param(300, minimum=0, maximum=5000, step=10,
                                help="epochs of stage 2 (triplet loss on clusters)")
    learning_rate: float = param(1e-3, minimum=1e-6, maximum=1.0, step=1e-4, help="Adam")
    seed: int = param(0, minimum=0, maximum=2**31 - 1, step=1,
                      help="seed of initialisation, dropout and negatives")


class SGCNet(torch.nn.Module):
    """The authors' network (`sgrr/network.py`: two torch_geometric `SGConv(K=2)` layers, ReLU,
    dropout 0.5 between them) with the first layer's propagation taken out, as it is fixed:

        z = M^2 dropout(relu((M^2 x) W1 + b1)) W2 + b2,

    M the normalised adjacency (`normalised_adjacency`). `forward` returns z, the logits (the
    authors' `model.embedding`); the log-softmax their forward returns is `epoch_loss`'s."""

    def __init__(self, dim: int, classes: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.first = torch.nn.Linear(dim, hidden)
        self.second = torch.nn.Linear(hidden, classes)

    def hidden(self, propagated: torch.Tensor) -> torch.Tensor:
        return F.relu(self.first(propagated))

    def forward(self, propagated: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(self.hidden(propagated), DROPOUT, self.training)
        return self.second(torch.sparse.mm(adjacency, torch.sparse.mm(adjacency, hidden)))


def normalised_adjacency(edges: np.ndarray, n: int, device: torch.device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGConv's propagation matrix M = D^-1/2 (A + I) D^-1/2 (one hop is M @ x) and the degrees.

    The conventions of torch_geometric's `gcn_norm`, so that a hop equals `SGConv`'s on any edge
    list: edge (s, t) carries s's row to t (M[t, s]); D counts each node's incoming edges plus its
    loop; every edge weighs 1 (an edge listed twice counts twice); a self loop already in `edges` is
    replaced by the one loop added. SGRR's reciprocal graph is symmetric, so there direction does
    not matter.

    Args:
        edges: (2, E) int [sources; targets].
    Returns:
        M, (n, n) coalesced sparse float32 on `device`, and the degrees (n,) float32 (loop
        included).
    """
    loops = np.arange(n)
    between = edges[0] != edges[1]
    sources = np.concatenate([edges[0][between], loops])
    targets = np.concatenate([edges[1][between], loops])
    degree = np.bincount(targets, minlength=n).astype(np.float32)
    values = 1.0 / np.sqrt(degree[sources] * degree[targets])
    adjacency = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([targets, sources])),
        torch.from_numpy(values.astype(np.float32)), (n, n), check_invariants=False
    ).coalesce().to(device)
    return adjacency, torch.from_numpy(degree).to(device)


def cluster_triplets(labels: np.ndarray, rng: np.random.Generator,
                     limit: int | None = None) -> np.ndarray:
    """(3, T) anchor, positive, negative: every ordered pair inside each cluster, with one
    negative drawn uniformly from the items outside that cluster (unlabelled ones included).
    Drawn once per training, as the authors' `_make_triplets` does before training starts.
    Above `limit` pairs, a seeded sample of `limit` of them in the same order, drawn without
    listing the pairs (one cluster of 50,000 items holds 2.5 billion)."""
    n = len(labels)
    clusters = []
    for cluster in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == cluster)
        if len(members) >= 2 and len(members) < n:
            clusters.append(members)
    if not clusters:
        return np.zeros((3, 0), np.int64)
    sizes = np.array([len(members) for members in clusters], np.int64)
    pairs = sizes * (sizes - 1)
    if limit is not None and pairs.sum() > limit:
        return _sampled_triplets(clusters, pairs, n, limit, rng)
    triplets = []
    for members in clusters:
        outside = np.setdiff1d(np.arange(n), members)
        anchors, positives = np.meshgrid(members, members, indexing="ij")
        keep = anchors != positives
        anchors, positives = anchors[keep], positives[keep]
        negatives = outside[rng.integers(0, len(outside), len(anchors))]
        triplets.append(np.stack([anchors, positives, negatives]))
    return np.concatenate(triplets, axis=1)


def _sampled_triplets(clusters: list[np.ndarray], pairs: np.ndarray, n: int, limit: int,
                      rng: np.random.Generator) -> np.ndarray:
    """`limit` of the ordered pairs of `clusters` (pairs[c] in cluster c), uniformly without
    replacement and in the full list's order, each with a negative outside its cluster."""
    chosen = np.sort(rng.choice(int(pairs.sum()), limit, replace=False))
    starts = np.concatenate([[0], np.cumsum(pairs)])
    which = np.searchsorted(starts, chosen, side="right") - 1
    triplets = []
    for c in np.unique(which):
        members = clusters[c]
        local = chosen[which == c] - starts[c]
        anchor, other = np.divmod(local, len(members) - 1)
        positive = other + (other >= anchor)  # skip the anchor itself
        outside = np.setdiff1d(np.arange(n), members)
        negatives = outside[rng.integers(0, len(outside), len(local))]
        triplets.append(np.stack([members[anchor], members[positive], negatives]))
    return np.concatenate(triplets, axis=1)


def triplet_limit(classes: int) -> int:
    """Most triplets a training keeps with `classes` clusters (`TRIPLET_ELEMENTS`)."""
    return max(1, TRIPLET_ELEMENTS // max(1, classes))


@dataclass(frozen=True)
class TrainingGraph:
    """What every training epoch reads, on one device.

    propagated: (n, d) float32 M^2 x, the first layer's fixed propagation; adjacency: (n, n)
    sparse M; labels: (n,) int64 pseudo-labels, -1 unlabelled; triplets: (3, T) int64 anchors,
    positives, negatives (`cluster_triplets`, the same every epoch).
    """

    propagated: torch.Tensor
    adjacency: torch.Tensor
    labels: torch.Tensor
    triplets: torch.Tensor


def epoch_loss(model: SGCNet, graph: TrainingGraph, stage: str) -> torch.Tensor:
    """One epoch's loss, as the authors' `_nll_loss` and `_triplet_loss` compute it from the
    output of their forward, log_softmax(z) over all nodes:

    - "nll": mean negative log-likelihood of the pseudo-labelled nodes (labels >= 0);
    - "triplet": mean triplet margin loss (margin 1, Euclidean distance) of the log-softmax rows
      of `graph.triplets` (log-probabilities, not the logits that become the embeddings).
    """
    log_probabilities = F.log_softmax(model(graph.propagated, graph.adjacency), dim=1)
    if stage == "nll":
        labelled = graph.labels >= 0
        return F.nll_loss(log_probabilities[labelled], graph.labels[labelled])
    if stage == "triplet":
        anchors, positives, negatives = graph.triplets
        return F.triplet_margin_loss(log_probabilities[anchors], log_probabilities[positives],
                                     log_probabilities[negatives], margin=TRIPLET_MARGIN)
    raise ValueError(f"unknown training stage {stage!r}")


def optimiser_for(model: SGCNet, learning_rate: float) -> torch.optim.Adam:
    """The authors' optimiser: Adam with weight decay 5e-4 on every parameter (biases and the
    output layer included), kept for both stages."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)


def train(features: np.ndarray, edges: np.ndarray, labels: np.ndarray, classes: int,
          params: SGRRParams, device: torch.device, progress: Any = None
          ) -> tuple[SGCNet, dict[str, torch.Tensor]]:
    """Train the GCN as the authors' `_train_gcn` does: one Adam (weight decay on every
    parameter) for `nll_epochs` of NLL then `triplet_epochs` of triplet loss, full batch, in
    training mode, one optimiser step per epoch; then embed in eval mode. Returns the network
    and its fitted tensors: degrees, M x, the hidden layer h, M h and the embeddings z (what
    online queries read).

    The triplet stage is skipped when no cluster has two members (the authors' mean over no
    triplets is NaN).
    """
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    n, dim = features.shape
    adjacency, degree = normalised_adjacency(edges, n, device)
    x = torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(device)
    once = torch.sparse.mm(adjacency, x)
    model = SGCNet(dim, classes).to(device)
    optimiser = optimiser_for(model, params.learning_rate)
    graph = TrainingGraph(
        propagated=torch.sparse.mm(adjacency, once), adjacency=adjacency,
        labels=torch.from_numpy(np.array(labels, np.int64)).to(device),
        triplets=torch.from_numpy(cluster_triplets(labels, rng, triplet_limit(classes))
                                  ).to(device))
    stages = ["nll"] * params.nll_epochs
    if graph.triplets.shape[1]:
        stages += ["triplet"] * params.triplet_epochs
    elif params.triplet_epochs:
        logger.info("SGRR: no cluster has two members; the triplet stage is skipped")
    total = params.nll_epochs + params.triplet_epochs
    model.train()
    for epoch, stage in enumerate(stages):
        optimiser.zero_grad()
        epoch_loss(model, graph, stage).backward()
        optimiser.step()
        if progress is not None and (epoch + 1) % 50 == 0:
            progress((epoch + 1) / total, f"training the GCN {epoch + 1}/{total}")
    model.eval()
    with torch.no_grad():
        hidden = model.hidden(graph.propagated)
        hidden_once = torch.sparse.mm(adjacency, hidden)
        embeddings = model(graph.propagated, adjacency)
    return model, {"degree": degree, "once": once, "hidden": hidden,
                   "hidden_once": hidden_once, "embeddings": embeddings}


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    rows = rows.float()
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


def rank_by_distance(distances: torch.Tensor, original: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k smallest distances, ascending; ties go to the higher `original`, then
    the smaller index (numpy's `lexsort((-original, distances))`, as two stable sorts).

    Args:
        distances, original: (Q, G) float32 on one device.
    Returns:
        the distances (Q, k) and their indices (Q, k) int64.
    """
    by_original = torch.sort(-original, dim=1, stable=True).indices
    by_distance = torch.sort(distances.gather(1, by_original), dim=1, stable=True)
    return by_distance.values[:, :k], by_original.gather(1, by_distance.indices[:, :k])


def rank_top(distances: np.ndarray, gallery: np.ndarray, query: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """`rank_by_distance` of one query, computing the original cosines only where they can
    decide: for the items at or below the k-th smallest distance (ties included).

    Args:
        distances: (G,) float32 embedding distances; gallery (G, d), query (d,) float32.
    Returns:
        the k smallest distances, ascending (ties: the higher canonical cosine, then the
        smaller index), and their ids int64.
    """
    size = len(distances)
    if k < size:
        kth = np.partition(distances, k - 1)[k - 1]
        candidates = np.flatnonzero(distances <= kth)
    else:
        candidates = np.arange(size)
    original = canonical_rows(gallery, candidates, query)
    order = np.lexsort((candidates, -original, distances[candidates]))[:k]
    return distances[candidates[order]], candidates[order].astype(np.int64)


def _others(rows: np.ndarray, item: int, n: int) -> np.ndarray:
    """The first n of `rows` other than `item`, int64."""
    return np.asarray(rows, np.int64)[np.asarray(rows) != item][:n]


class QueryLinks(NamedTuple):
    """Queries' rows of the normalised adjacency as they join the fitted graph (Q queries):
    neighbours (Q, K + 1) int64 their nearest gallery items (cosine), linked (Q, K + 1) bool
    the reciprocal ones the query is joined to, own (Q, 1) float64 A[q, q] and cross
    (Q, K + 1) float64 A[q, v] (0 where unlinked)."""

    neighbours: torch.Tensor
    linked: torch.Tensor
    own: torch.Tensor
    cross: torch.Tensor


@register
class SGRR(Reranker):
    """Self-supervised hypergraph + GCN re-ranking; see the module docstring."""

    name: ClassVar[str] = "sgrr"
    title: ClassVar[str] = "SGRR (Lopes et al.)"
    distance_note: ClassVar[str] = (
        "cosine distance in SGRR's learned embedding (one dimension per cluster): members of "
        "one cluster collapse near 0, so distances are tiny")
    Params: ClassVar[type[RerankParams]] = SGRRParams
    learns: ClassVar[bool] = True
    runs_on_gpu: ClassVar[bool] = True
    quick_params: ClassVar[dict[str, Any]] = {"nll_epochs": 40, "triplet_epochs": 40}
    details_schema: ClassVar[dict[str, str]] = {
        "pseudo_labelled": "batch: items the SGCC clusters labelled for training",
        "clusters": "number of classes the GCN was trained for",
        "K": "LHRR's neighbourhood size used (clamped to the gallery)",
    }
    min_gallery: ClassVar[int] = 4       # LHRR's lists are 4K deep, K >= 1
    online_is_batch: ClassVar[bool] = False
    exact_neighbours: ClassVar[bool] = False

    # -- fitting -----------------------------------------------------------------------------------
    def graph_depth(self) -> int:
        """Fit's LHRR reads each item's 4K nearest (its initial ranked lists)."""
        return 4 * self.params.K

    def _fit(self, context: GalleryContext) -> None:
        self._fitting_knn = context.knn
        classes = self._classes(context)
        key = self._state_key(context, classes)
        path = None if context.state_dir is None else Path(context.state_dir) / "sgrr" / key
        if path is not None and self._load(path, key, context):
            logger.info("loaded the trained SGRR state %s", path.name)
            return
        started = time.perf_counter()
        state = self._train(context.features, classes, context.knn)
        self._set_state(context.features, state)
        self.fit_seconds = time.perf_counter() - started
        if path is not None:
            self._save(path, key, state)

    def estimate_fit_seconds(self, context: GalleryContext) -> float | None:
        """The time of `fit(context)`: LHRR timed on a sample of `ESTIMATE_SAMPLE` items and
        scaled as n^1.5 (measured: 0.36 s at 340 demo items, 2 to 2.9 s at 1,360), plus the
        epochs, `ESTIMATE_EPOCHS` of each stage timed after a warm-up on the gallery's own
        features and kNN graph with `P` of the items spread over the clusters as pseudo-labels.
        About 0 when the state is saved; None on a gallery too small to fit."""
        n = context.size
        if n < 4:
            return None
        classes = self._classes(context)
        if classes < 2 or classes > n:
            return None
        key = self._state_key(context, classes)
        if context.state_dir is not None and (
                Path(context.state_dir) / "sgrr" / f"{key}.json").is_file():
            return 0.0
        features = np.ascontiguousarray(context.features, np.float32)
        sample = min(n, ESTIMATE_SAMPLE)
        started = time.perf_counter()
        lhrr_from_features(features[:sample], max(1, min(self.params.K, sample // 4)),
                           self.params.T)  # K clamped as LHRR would (lists 4K deep)
        seconds = (time.perf_counter() - started) * (n / sample) ** 1.5
        neighbours = min(self.params.K, n - 1) + 1
        knn = context.knn if context.knn is not None and context.knn.depth >= neighbours \
            else knn_graph(features, neighbours, self.device)
        edges = np.stack([np.repeat(np.arange(n), neighbours - 1),
                          knn.indices[:, 1:neighbours].reshape(-1)])
        labels = np.full(n, -1, np.int64)
        labelled = np.random.default_rng(self.params.seed).permutation(n)[
            :max(classes, int(self.params.P * n))]
        labels[labelled] = np.arange(len(labelled)) % classes
        adjacency, _ = normalised_adjacency(edges, n, self.device)
        x = torch.from_numpy(features).to(self.device)
        graph = TrainingGraph(
            propagated=torch.sparse.mm(adjacency, torch.sparse.mm(adjacency, x)),
            adjacency=adjacency, labels=torch.from_numpy(labels).to(self.device),
            triplets=torch.from_numpy(cluster_triplets(labels, np.random.default_rng(0),
                                                       triplet_limit(classes))).to(self.device))
        model = SGCNet(features.shape[1], classes).to(self.device).train()
        optimiser = optimiser_for(model, self.params.learning_rate)
        for stage, epochs in (("nll", self.params.nll_epochs),
                              ("triplet", self.params.triplet_epochs)):
            if not epochs:
                continue
            for repeat in range(ESTIMATE_EPOCHS + 1):
                if repeat == 1:  # after the warm-up epoch
                    started = time.perf_counter()
                optimiser.zero_grad()
                epoch_loss(model, graph, stage).backward()
                optimiser.step()
            seconds += epochs * (time.perf_counter() - started) / ESTIMATE_EPOCHS
        return seconds

    def _classes(self, context: GalleryContext) -> int:
        if self.params.clusters:
            return int(self.params.clusters)
        if context.labels is not None and (context.labels >= 0).any():
            return len(np.unique(context.labels[context.labels >= 0]))
        return default_clusters(context.size)

    def _state_key(self, context: GalleryContext, classes: int) -> str:
        identity = context.fingerprint or hashlib.sha256(
            np.ascontiguousarray(context.features).tobytes()).hexdigest()
        return fingerprint({"version": STATE_VERSION, "gallery": identity,
                            "params": self.params.as_dict(), "classes": classes})

    def _train(self, features: np.ndarray, classes: int, knn: KnnGraph | None = None
               ) -> dict[str, Any]:
        """LHRR (initial lists from `knn`, the features' graph, when 4K deep), SGCC and the
        GCN's training on `features`."""
        n = len(features)
        if n < 4:
            raise InvalidInputError(f"SGRR needs at least 4 gallery images, got {n}")
        if classes < 2 or classes > n:
            raise InvalidInputError(f"SGRR needs between 2 and {n} clusters, got {classes}")
        report = self._report
        report(0.0, "SGRR: LHRR hypergraph")
        hypergraph = lhrr_from_features(features, self.params.K, self.params.T, knn=knn)
        report(0.2, "SGRR: clustering")
        clustering = sgcc(hypergraph, classes, self.params.P)
        edges = reciprocal_edges(hypergraph.ranked_lists, hypergraph.k)
        model, fitted = train(features, edges, clustering.labels, classes, self.params,
                              self.device, lambda f, m: report(0.25 + 0.75 * f, m))
        return {"model": model, "fitted": fitted, "pseudo_labels": clustering.labels,
                "k_used": hypergraph.k, "edges": edges, "classes": classes}

    def _set_state(self, features: np.ndarray, state: dict[str, Any]) -> None:
        self._model: SGCNet = state["model"]
        self.k_used = int(state["k_used"])
        # Similarity of each gallery item to its (K + 1)-th nearest other item: a query that
        # beats it would be among that item's reciprocal neighbours.
        knn = self.gallery_knn(features, self.k_used + 2)
        self._thresholds = torch.from_numpy(
            np.ascontiguousarray(knn.similarities[:, self.k_used + 1])).to(self.device)
        self._features = self._on_device(features)
        # what online queries read, kept on the device they compute on
        fitted = {name: state["fitted"][name].to(self.device) for name in FITTED}
        self._degree = fitted["degree"]
        self._once = fitted["once"]
        self._hidden = fitted["hidden"]
        self._hidden_once = fitted["hidden_once"]
        self._embeddings = fitted["embeddings"]
        self._unit_embeddings = unit_rows(self._embeddings)
        self.pseudo_labels = state["pseudo_labels"]
        self.classes = int(state["classes"])

    def gallery_knn(self, features: np.ndarray, depth: int) -> KnnGraph:
        """The gallery's kNN graph of at least `depth`: the context's when deep enough, exact
        or approximate (no search of the whole gallery), else an exact one."""
        cached = self._fitting_knn
        if cached is not None and cached.depth >= depth and len(cached.indices) == len(features):
            return cached
        return knn_graph(features, min(depth, len(features)), self.device)

    # -- state on disk -----------------------------------------------------------------------
    def _save(self, path: Path, key: str, state: dict[str, Any]) -> None:
        """Weights, fitted tensors and pseudo-labels with `save_state`, keyed on `key`."""
        tensors = {f"model.{name}": value for name, value in state["model"].state_dict().items()}
        tensors.update(state["fitted"])
        tensors["pseudo_labels"] = torch.from_numpy(state["pseudo_labels"].astype(np.int64))
        save_state(path, kind="sgrr", version=STATE_VERSION, fingerprint=key, tensors=tensors,
                   metadata={"params": self.params.as_dict(), "classes": state["classes"],
                             "k_used": state["k_used"],
                             "fit_seconds": getattr(self, "fit_seconds", None)})

    def _load(self, path: Path, key: str, context: GalleryContext) -> bool:
        """Restore the state saved at `path`; False (retrain) when there is none or it is
        unusable: damaged, of an older format, of another gallery size, or not matching its
        manifest's checksums."""
        try:
            saved = load_state(path, kind="sgrr", version=STATE_VERSION, fingerprint=key)
        except MissingStateError:
            return False
        except CacheError as error:
            logger.warning("retraining SGRR: the saved state %s is unusable (%s)", path.name,
                           error)
            return False
        try:
            meta, tensors = saved.manifest, saved.tensors
            model = SGCNet(context.features.shape[1], int(meta["classes"])).to(self.device)
            model.load_state_dict({name.removeprefix("model."): value
                                   for name, value in tensors.items()
                                   if name.startswith("model.")})
            fitted = {name: tensors[name] for name in FITTED}
            if fitted["embeddings"].shape[0] != context.size:
                raise CacheError("state of another gallery size")
            pseudo_labels = tensors["pseudo_labels"].numpy()
            k_used, classes = int(meta["k_used"]), int(meta["classes"])
        except (CacheError, KeyError, TypeError, RuntimeError, ValueError) as error:
            logger.warning("retraining SGRR: the saved state %s is unusable (%s)", path.name,
                           error)
            return False
        model.eval()
        self._set_state(context.features, {
            "model": model, "fitted": fitted,
            "pseudo_labels": pseudo_labels, "k_used": k_used, "classes": classes})
        return True

    # -- embeddings --------------------------------------------------------------------------------
    def gallery_embeddings(self) -> np.ndarray:
        return self._unit_embeddings.cpu().numpy()

    def query_embeddings(self, query_features: np.ndarray) -> np.ndarray:
        """Embed new queries with the trained GCN; each joins the graph with edges to the items
        among its K + 1 nearest (cosine) whose own K + 1 nearest it would enter (reciprocal
        neighbours), the gallery's fitted propagation unchanged. Returns (Q, c) unit rows."""
        return self._embed_queries(self._on_device(query_features)).cpu().numpy()

    def _on_device(self, features: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(features, np.float32)).to(self.device)

    def _query_neighbours(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's K + 1 most similar gallery items by canonical cosine (ties: the smaller
        index) and those cosines, (Q, K + 1) each. On the CPU a float32 product proposes
        them and only the candidates get canonical cosines (`query_top`); on a GPU the whole
        row is canonical, the gallery converted a block at a time."""
        depth = self.k_used + 1
        if self.device.type == "cpu":
            found = [query_top(self.gallery.features, query, depth) for query in queries.numpy()]
            return (torch.from_numpy(np.stack([values for values, _ in found])),
                    torch.from_numpy(np.stack([ids for _, ids in found])))
        similarity = self._canonical(queries)
        values, neighbours = torch_topk_largest(similarity, depth)
        return values, neighbours

    def _canonical(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, G) canonical cosines of queries to the gallery, on the device, the gallery
        converted to float64 a block at a time."""
        if self.device.type == "cpu":
            return torch.from_numpy(canonical_block(queries.numpy(), self.gallery.features))
        return torch_canonical_block(queries, self._features)

    @torch.no_grad()
    def _query_links(self, queries: torch.Tensor) -> QueryLinks:
        """Each query's row of the normalised adjacency, as it joins the fitted graph."""
        similarity, neighbours = self._query_neighbours(queries)
        # Reciprocal, as the gallery's edges are: v is a neighbour when the query would also
        # enter v's own top K + 1 (at least the nearest item, so the query is connected).
        linked = similarity >= self._thresholds[neighbours]
        linked[:, 0] = True
        degree = linked.sum(dim=1, keepdim=True).double() + 1.0    # self loop included
        own = 1.0 / degree                                          # A[q, q]
        cross = linked / torch.sqrt(degree * self._degree[neighbours])  # A[q, v], 0 unlinked
        return QueryLinks(neighbours, linked, own, cross)

    @torch.no_grad()
    def _embed_queries(self, queries: torch.Tensor, links: QueryLinks | None = None
                       ) -> torch.Tensor:
        """`query_embeddings` on the device: (Q, d) float32 queries -> (Q, c) unit rows, with
        their `_query_links` when already computed. The propagation is accumulated in
        float64."""
        neighbours, _, own, cross = links if links is not None else self._query_links(queries)

        def step(rows: torch.Tensor, gallery_rows: torch.Tensor) -> torch.Tensor:
            """One propagation of the query row: A[q, q] rows + sum over v of A[q, v] g[v]."""
            return own * rows + torch.einsum("qk,qkd->qd", cross,
                                             gallery_rows[neighbours].double())

        propagated = step(step(queries.double(), self._features), self._once)
        hidden = self._model.hidden(propagated.float())
        hidden_twice = step(step(hidden.double(), self._hidden), self._hidden_once)
        return unit_rows(self._model.second(hidden_twice.float()))

    # -- ranking ---------------------------------------------------------------------------------
    def _rank(self, query_embeddings: torch.Tensor, gallery_embeddings: torch.Tensor, k: int,
              exclude_self: bool, query_features: torch.Tensor
              ) -> tuple[np.ndarray, np.ndarray]:
        """Cosine distances in the embedding space, best first; exact ties (a class collapses
        to nearly one point) go to the higher original cosine, then the smaller index."""
        distances = 1.0 - query_embeddings @ gallery_embeddings.T
        original = self._canonical(query_features)
        if exclude_self:
            distances.fill_diagonal_(torch.inf)
        distances, indices = rank_by_distance(distances, original, k)
        return distances.cpu().numpy(), indices.cpu().numpy()

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        details = {"pseudo_labelled": int((self.pseudo_labels >= 0).sum()),
                   "clusters": self.classes, "K": self.k_used}
        if query_features is None:
            distances, indices = self._rank(self._unit_embeddings, self._unit_embeddings, k,
                                            True, self._features)
            return distances, indices, details
        # The authors' transductive pipeline: queries and gallery embedded together.
        union = np.concatenate([query_features, self.gallery.features])
        state = self._train(union, self.classes)
        embeddings = unit_rows(state["fitted"]["embeddings"])
        queries, gallery = embeddings[:len(query_features)], embeddings[len(query_features):]
        distances, indices = self._rank(queries, gallery, k, False,
                                        self._on_device(query_features))
        return distances, indices, details

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One query embedded inductively (`_embed_queries`), ranked by embedding distance; on
        the CPU the original cosines that break exact ties are computed for the items that
        can reach the top k only (`rank_top`)."""
        details = {"K": self.k_used, "clusters": self.classes}
        query = self._on_device(query_feature[None, :])
        if self.device.type != "cpu":
            distances, indices = self._rank(self._embed_queries(query), self._unit_embeddings,
                                            k, False, query)
            return distances[0], indices[0], details
        embedding = self._embed_queries(query)
        distances = (1.0 - embedding @ self._unit_embeddings.T)[0].numpy()
        values, indices = rank_top(distances, self.gallery.features, query_feature, k)
        return values, indices, details

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The online path for this query (`_query_links`, `_embed_queries`, the embedding
        distance to every item) and what it rests on: the graph links the query's embedding
        was propagated from, the query's and the item's clusters (the largest of the c
        logits, the classes the GCN learnt from SGCC's pseudo-labels) and the item's pseudo-
        label, and the item's nearest neighbours in the GCN space and in the original space,
        set against the query's (`EXPLAIN_NEIGHBOURS` of each; ties as the ranking breaks
        them)."""
        gallery = self.gallery.features
        query = self._on_device(query_feature[None, :])
        links = self._query_links(query)
        embedding = self._embed_queries(query, links)
        similarity = (embedding @ self._unit_embeddings.T)[0]
        distances = (1.0 - similarity).cpu().numpy()   # the bits `_rerank_online` ranks
        n = min(EXPLAIN_NEIGHBOURS, self.gallery.size - 1)
        item_similarity = (self._unit_embeddings[item:item + 1] @ self._unit_embeddings.T)[0]
        item_distances = (1.0 - item_similarity).cpu().numpy()
        gcn_item = _others(rank_top(item_distances, gallery, gallery[item], n + 1)[1], item, n)
        gcn_query = _others(rank_top(distances, gallery, query_feature, n + 1)[1], item, n)
        original_item = self._original_neighbours(item, n)
        original_query = _others(query_top(gallery, query_feature, n + 1)[1], item, n)
        shared_gcn = np.intersect1d(gcn_item, gcn_query)
        shared_original = np.intersect1d(original_item, original_query)
        query_cluster = int(torch.argmax(embedding[0]))
        item_cluster = int(torch.argmax(self._unit_embeddings[item]))
        pseudo_label = int(self.pseudo_labels[item])
        linked = links.linked[0].cpu().numpy()
        if pseudo_label == query_cluster:
            clusters = f"it carries the query's cluster {query_cluster} as its pseudo-label"
        elif item_cluster == query_cluster:
            clusters = f"the GCN puts it in the query's cluster {query_cluster}" + (
                " (it had no pseudo-label)" if pseudo_label < 0
                else f" (its pseudo-label is {pseudo_label})")
        else:
            clusters = f"the GCN puts it in cluster {item_cluster}, the query in {query_cluster}"
        gcn_values = 1.0 - item_distances.astype(np.float64)
        return Evidence(
            self.name, item,
            f"{clusters}, and {len(shared_gcn)} of its {n} GCN-space neighbours are among the "
            f"query's {n} ({len(shared_original)} of {n} in the original space)",
            {"original cosine similarity": float(canonical_rows(gallery, np.array([item]),
                                                                 query_feature)[0]),
             "query's graph links": float(linked.sum()),
             "query's cluster": float(query_cluster),
             "result's cluster": float(item_cluster),
             "result's pseudo-label (-1: none)": float(pseudo_label),
             "GCN-space neighbours shared with the query": float(len(shared_gcn)),
             "original-space neighbours shared with the query": float(len(shared_original)),
             "GCN-space similarity": float(similarity[item]),
             "final distance": float(distances[item])},
            (EvidenceGroup("query's graph links", links.neighbours[0].cpu().numpy()[linked],
                           links.cross[0].cpu().numpy()[linked],
                           "propagation weight A[q, v] of the query's embedding"),
             EvidenceGroup("nearest in the GCN space", gcn_item, gcn_values[gcn_item],
                           "GCN-space cosine to the result"),
             EvidenceGroup("shared with the query's GCN-space neighbours", shared_gcn,
                           gcn_values[shared_gcn], "GCN-space cosine to the result",
                           highlight=False),
             EvidenceGroup("nearest in the original space", original_item,
                           canonical_rows(gallery, original_item, gallery[item]),
                           "cosine to the result", highlight=False)))

    def _original_neighbours(self, item: int, n: int) -> np.ndarray:
        """The item's n nearest other gallery items by cosine: from the gallery's kNN graph
        when it is that deep (approximate at scale), else an exact search of its own (its
        product not kept, so the query's stays kept)."""
        knn = self.gallery.knn
        if knn is not None and knn.depth >= n + 1:
            return _others(knn.indices[item], item, n)
        gallery = self.gallery.features
        scores = np.asarray(gallery, np.float32) @ gallery[item]
        return _others(query_top(gallery, gallery[item], n + 1, scores=scores)[1], item, n)

    def batch_refusal(self, gallery_size: int, n_queries: int) -> str | None:
        """A batch ranks every query against the whole gallery at once ((Q, G) embedding
        distances, original cosines and two sorts, `BYTES_PER_PAIR` each: leave-one-out is
        G x G) and, for new queries, retrains on them with the gallery; refused when that
        does not fit the memory budget."""
        budget = memory_budget()
        dim = self.gallery.features.shape[1]
        need = n_queries * gallery_size * BYTES_PER_PAIR
        if n_queries and n_queries != gallery_size:  # the transductive retraining's features
            need += 4 * (n_queries + gallery_size) * dim * 4
        if budget is not None and need > budget:
            return (f"{gib(need)} to rank {n_queries} queries against {gallery_size} items at "
                    f"once, beyond the {gib(budget)} this batch may use")
        return None
