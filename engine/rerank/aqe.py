"""AQE: average query expansion (Chum, Philbin, Sivic, Isard, Zisserman, "Total Recall", ICCV 2007).

The query is replaced by the mean of itself and its n nearest gallery items, normalised, and
the gallery is searched again. The paper averages the top results that pass spatial
verification (at most 50); global descriptors have no verification step, so the n nearest are
taken as they are. Shared math: `_expansion.py`; notes: docs/methods/query_expansion.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.rerank import register
from engine.rerank._expansion import ExpandedSearch
from engine.rerank.base import RerankParams, param


@dataclass(frozen=True)
class AQEParams(RerankParams):
    n: int = param(10, minimum=0, maximum=1000, step=1,
                   help="nearest gallery items averaged with the query (0: no expansion, the "
                        "cosine ranking)")


@register
class AQE(ExpandedSearch):
    """Average query expansion: every expansion neighbour weighs 1, as the query does."""

    name: ClassVar[str] = "aqe"
    title: ClassVar[str] = "AQE (Chum et al. 2007)"
    Params: ClassVar[type[RerankParams]] = AQEParams

    def _expansion(self) -> tuple[int, float]:
        return self.params.n, 0.0
