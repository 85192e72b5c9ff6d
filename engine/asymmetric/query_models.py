"""The query models a user can pick: how queries and gallery are embedded, with one backbone on
both sides (symmetric) or SSP's light query model into a larger gallery model's space."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryModelChoice:
    """How queries and gallery are embedded: one backbone on both sides (symmetric), or a light
    query model trained into a larger gallery model's space (asymmetric, SSP)."""

    name: str
    title: str
    query_side: str
    gallery_backbone: str | None   # None: the explorer's own backbone
    asymmetric: bool = False


QUERY_MODELS: dict[str, QueryModelChoice] = {
    "lite0": QueryModelChoice("lite0", "symmetric lite0", "tf_efficientnet_lite0", None),
    "lite2": QueryModelChoice("lite2", "symmetric lite2", "tf_efficientnet_lite2",
                        "tf_efficientnet_lite2"),
    "ssp": QueryModelChoice("ssp", "asymmetric lite0 → lite2 (SSP)",
                      "tf_efficientnet_lite0 + SSP head", "tf_efficientnet_lite2",
                      asymmetric=True),
}
DEFAULT_QUERY_MODEL = "lite0"
