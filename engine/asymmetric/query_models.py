"""The query models a user can pick: how queries and gallery are embedded, with one backbone on
both sides (symmetric), SSP's light query model trained into a larger gallery model's space, or
SSP's closed-form baselines (the light model's features mapped by a Procrustes rotation or a
ridge map fitted on the same images; `maps`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryModelChoice:
    """How queries and gallery are embedded: one backbone on both sides (symmetric), or a light
    query model put into a larger gallery model's space (asymmetric): trained (SSP) or mapped by
    a closed-form map (`closed_form`: "procrustes" or "ridge", see `engine.asymmetric.maps`)."""

    name: str
    title: str
    query_side: str
    gallery_backbone: str | None   # None: the explorer's own backbone
    asymmetric: bool = False
    closed_form: str | None = None


QUERY_MODELS: dict[str, QueryModelChoice] = {
    "lite0": QueryModelChoice("lite0", "symmetric lite0", "tf_efficientnet_lite0", None),
    "lite2": QueryModelChoice("lite2", "symmetric lite2", "tf_efficientnet_lite2",
                        "tf_efficientnet_lite2"),
    "ssp": QueryModelChoice("ssp", "asymmetric lite0 → lite2 (SSP)",
                      "tf_efficientnet_lite0 + SSP head", "tf_efficientnet_lite2",
                      asymmetric=True),
    "procrustes": QueryModelChoice("procrustes", "asymmetric lite0 → lite2 (Procrustes)",
                                   "tf_efficientnet_lite0 + Procrustes map",
                                   "tf_efficientnet_lite2", asymmetric=True,
                                   closed_form="procrustes"),
    "ridge": QueryModelChoice("ridge", "asymmetric lite0 → lite2 (ridge)",
                              "tf_efficientnet_lite0 + ridge map", "tf_efficientnet_lite2",
                              asymmetric=True, closed_form="ridge"),
}
DEFAULT_QUERY_MODEL = "lite0"
