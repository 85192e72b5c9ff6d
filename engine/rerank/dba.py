"""alpha-DBA: database-side augmentation (Arandjelovic & Zisserman, "Three things everyone should
know to improve object retrieval", CVPR 2012; alpha-weighted: Radenovic, Tolias, Chum, TPAMI
2018), optionally followed by alpha-QE on the augmented gallery.

At fit every gallery vector x_i is replaced by the unit vector of sum_j s_ij^alpha x_j over its
n + 1 nearest items, itself first (similarity 1, weight 1); alpha = 0 is plain DBA (the mean of
the item and its n neighbours). Queries, as they are, are searched against the augmented
gallery. With qe_n > 0 the query is first expanded by alpha-QE over the augmented gallery (its
qe_n nearest augmented vectors, weights s^qe_alpha), the papers' "alpha-QE + alpha-DBA".
Shared math: `_expansion.py`; notes: docs/methods/query_expansion.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from engine.core.knn import device_tensor, knn_graph
from engine.core.types import Evidence, EvidenceGroup, GalleryContext
from engine.errors import TooLargeError
from engine.rerank import register
from engine.rerank._expansion import (
    ExpandedSearch,
    expansion_weights,
    torch_unit_rows,
    torch_weighted_sums,
    unit_rows,
    weighted_sums,
)
from engine.rerank._scale import gib, memory_budget
from engine.rerank.base import RerankParams, param

AUGMENT_ROWS = 4096
"""Gallery rows augmented at a time (their float64 sums: 40 MiB at d = 1280)."""


def augment(features: np.ndarray, ids: np.ndarray, weights: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Every gallery row replaced by the unit vector of sum_j weights[i, j] features[ids[i, j]]:
    ((G, d) float32, their norms (G,) float64), `AUGMENT_ROWS` rows at a time."""
    size, dim = features.shape
    augmented = np.empty((size, dim), np.float32)
    norms = np.empty(size, np.float64)
    for start in range(0, size, AUGMENT_ROWS):
        stop = min(start + AUGMENT_ROWS, size)
        augmented[start:stop], norms[start:stop] = unit_rows(
            weighted_sums(features, ids[start:stop], weights[start:stop]), features[start:stop])
    return augmented, norms


def torch_augment(features: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """`augment` with the torch twins on `device`; the results come back to the CPU."""
    rows = device_tensor(features, device, np.float32)
    augmented, norms = [], []
    for start in range(0, len(rows), AUGMENT_ROWS):
        stop = min(start + AUGMENT_ROWS, len(rows))
        part_ids, part_weights = (device_tensor(part[start:stop], device)
                                  for part in (ids, weights))
        units, lengths = torch_unit_rows(
            torch_weighted_sums(rows, part_ids, part_weights), rows[start:stop])
        augmented.append(units.cpu().numpy())
        norms.append(lengths.cpu().numpy())
    return np.concatenate(augmented).astype(np.float32), np.concatenate(norms).astype(np.float64)


@dataclass(frozen=True)
class DBAParams(RerankParams):
    n: int = param(10, minimum=0, maximum=1000, step=1,
                   help="nearest gallery items (besides the item itself) each gallery vector "
                        "is augmented with (0: no augmentation)")
    alpha: float = param(3.0, minimum=0.0, maximum=20.0, step=0.5,
                         help="exponent of the augmenting weights, similarity^alpha (0: plain "
                              "DBA, the mean)")
    qe_n: int = param(0, minimum=0, maximum=1000, step=1,
                      help="alpha-QE on the augmented gallery: nearest augmented items added to "
                           "the query (0: off)")
    qe_alpha: float = param(3.0, minimum=0.0, maximum=20.0, step=0.5,
                            help="exponent of the query expansion's weights (with qe_n > 0)")


@register
class DBA(ExpandedSearch):
    """Database-side augmentation, with alpha-QE on the augmented gallery as a setting."""

    name: ClassVar[str] = "dba"
    title: ClassVar[str] = "αDBA (Arandjelović & Zisserman 2012)"
    distance_note: ClassVar[str] = (
        "1 - cosine similarity of the query (expanded when qe_n > 0) to the item's augmented "
        "vector (the item plus its nearest items, weighted, normalised) (0 to 2)")
    Params: ClassVar[type[RerankParams]] = DBAParams
    exact_neighbours: ClassVar[bool] = True
    """At the defaults (qe_n = 0) the query is searched as it is, and a near-duplicate's
    augmented vector holds it with weight 1: the contract test checks that it stays first.
    Not a guarantee for every gallery, and with qe_n > 0 the query drifts as alpha-QE's does."""
    details_schema: ClassVar[dict[str, str]] = {
        **ExpandedSearch.details_schema,
        "distance": "what the distances are",
        "expansion": "(queries, qe_n) int: each query's expansion neighbours in the augmented "
                     "gallery, best first (online: (qe_n,)); empty when qe_n = 0",
        "augmented_with": "the number of neighbours (besides itself) each gallery item was "
                          "augmented with",
    }

    def _expansion(self) -> tuple[int, float]:
        return self.params.qe_n, self.params.qe_alpha

    def graph_depth(self) -> int:
        """Fit reads each item's n + 1 nearest (itself first)."""
        return self.params.n + 1 if self.params.n else 0

    def _fit(self, context: GalleryContext) -> None:
        """The augmented gallery, from the gallery's kNN graph when it is n + 1 deep (exact or
        approximate), else from an exact graph of that depth; refused (TooLargeError) when
        its float32 copy of the gallery would not fit the memory budget."""
        features = context.features
        size, dim = features.shape
        n = min(self.params.n, size - 1)
        need = size * dim * 4 + size * (n + 1) * 16
        budget = memory_budget()
        if budget is not None and need > budget:
            raise TooLargeError(f"{self.title} needs {gib(need)} for the augmented copy of a "
                                f"{size} x {dim} gallery, beyond the {gib(budget)} it may use")
        if n == 0:
            ids = np.arange(size, dtype=np.int64)[:, None]
            similarities = np.ones((size, 1), np.float32)
        else:
            knn = context.knn
            if knn is not None and knn.depth >= n + 1:
                ids, similarities = knn.indices[:, :n + 1], knn.similarities[:, :n + 1]
            else:
                graph = knn_graph(features, n + 1, self.device)
                ids, similarities = graph.indices, graph.similarities
        ids = np.ascontiguousarray(ids, np.int64)
        weights = expansion_weights(similarities, self.params.alpha)
        if self.device.type == "cpu":
            augmented, norms = augment(features, ids, weights)
        else:
            augmented, norms = torch_augment(features, ids, weights, self.device)
        self._augmenting = (ids, weights, norms)
        self._n_used = n
        self._searched = augmented
        self._lists = None      # the graph is of the original features, not the augmented

    def _rerank_batch(self, query_features: np.ndarray | None, k: int
                      ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        distances, indices, details = super()._rerank_batch(query_features, k)
        return distances, indices, {**details, "augmented_with": self._n_used}

    def _rerank_online(self, query_feature: np.ndarray, k: int
                       ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        distances, indices, details = super()._rerank_online(query_feature, k)
        return distances, indices, {**details, "augmented_with": self._n_used}

    def augmented_features(self) -> np.ndarray:
        """(G, d) float32 the augmented gallery (read-only view), for tests and plots."""
        view = self._searched.view()
        view.setflags(write=False)
        return view

    def _explain(self, query_feature: np.ndarray, item: int) -> Evidence:
        """The item's augmenting neighbours with their weights and each one's term of the
        final similarity, s = sum_j w_j <q', x_j> / |sum_j w_j x_j| (q' the query, expanded
        when qe_n > 0); with qe_n > 0 also the query's expansion neighbours and their terms,
        s = (<q, a_t> + sum_m v_m <a_m, a_t>) / |q + sum_m v_m a_m| (a the augmented rows)."""
        expansion = self._expand_online(query_feature)
        query = np.asarray(query_feature, np.float64)
        searched = query if expansion.norm == 0.0 else expansion.total / expansion.norm
        ids, weights, norms = (part[item] for part in self._augmenting)
        features = self.gallery.features
        terms = weights * (features[ids].astype(np.float64) @ searched) / norms
        final = float(terms.sum())
        cosine = float(query @ features[item].astype(np.float64))
        numbers = {"cosine similarity": cosine, "similarity to the augmented item": final,
                   "augmentation norm": float(norms), "alpha": self.params.alpha}
        groups = [
            EvidenceGroup("augmenting neighbours", ids, terms,
                          "term of the item's final similarity"),
            EvidenceGroup("augmentation weights", ids, weights,
                          "weight in the item's augmented vector (similarity^alpha)",
                          highlight=False),
        ]
        summary = (f"augmented with its {len(ids) - 1} nearest items, it has similarity "
                   f"{final:.3f} to the query (cosine {cosine:.3f})")
        if len(expansion.ids):
            target = self._searched[item].astype(np.float64)
            own = float(query @ target) / expansion.norm
            expansion_terms = (expansion.weights
                               * (self._searched[expansion.ids].astype(np.float64) @ target)
                               / expansion.norm)
            numbers.update({"query's own term": own,
                            "expansion neighbours' terms": float(expansion_terms.sum()),
                            "query expansion norm": expansion.norm})
            groups += [
                EvidenceGroup("query expansion neighbours", expansion.ids, expansion_terms,
                              "term of the item's final similarity"),
                EvidenceGroup("query expansion weights", expansion.ids, expansion.weights,
                              "weight in the expanded query (similarity^qe_alpha)",
                              highlight=False),
            ]
            summary += f", the query expanded with {len(expansion.ids)} augmented items"
        return Evidence(self.name, item, summary, numbers, tuple(groups))
