"""alpha-QE: alpha-weighted query expansion (Radenovic, Tolias, Chum, "Fine-tuning CNN Image
Retrieval with No Human Annotation", TPAMI 2018).

The query q is replaced by the unit vector of q + sum_j s_j^alpha g_j over its n nearest gallery
items g_j (s_j their cosine similarity to q; the query itself weighs 1), and the gallery is
searched again. alpha = 0 is AQE; a larger alpha lets the closest neighbours dominate, which
makes the expansion robust to a large n. Defaults: the paper's alpha = 3 and n = 50. Shared
math: `_expansion.py`; notes: docs/methods/query_expansion.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.rerank import register
from engine.rerank._expansion import ExpandedSearch
from engine.rerank.base import RerankParams, param


@dataclass(frozen=True)
class AlphaQEParams(RerankParams):
    n: int = param(50, minimum=0, maximum=1000, step=1,
                   help="nearest gallery items added to the query (the paper's nQE; 0: no "
                        "expansion, the cosine ranking)")
    alpha: float = param(3.0, minimum=0.0, maximum=20.0, step=0.5,
                         help="exponent of each neighbour's weight, similarity^alpha (0: AQE)")


@register
class AlphaQE(ExpandedSearch):
    """alpha-weighted query expansion."""

    name: ClassVar[str] = "alpha_qe"
    title: ClassVar[str] = "αQE (Radenović et al. 2018)"
    Params: ClassVar[type[RerankParams]] = AlphaQEParams

    def _expansion(self) -> tuple[int, float]:
        return self.params.n, self.params.alpha
