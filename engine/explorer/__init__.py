"""The explorer: a backbone with its open galleries, each with fitted methods, scores, maps and
presets. What the page drives."""

from engine.asymmetric.query_models import QUERY_MODELS
from engine.explorer.explorer import Explorer
from engine.explorer.results import (
    BASELINE,
    DEFAULT_TOP_N,
    Explanation,
    Familiarity,
    QueryChanges,
    QueryResult,
    Ranking,
    distance_note,
    method_title,
)
from engine.explorer.session import FULL_RANKING_LIMIT, GallerySession
from engine.rerank.setting import CUSTOM

__all__ = ["BASELINE", "CUSTOM", "DEFAULT_TOP_N", "FULL_RANKING_LIMIT", "QUERY_MODELS",
           "Explanation", "Explorer", "Familiarity", "GallerySession", "QueryChanges",
           "QueryResult", "Ranking", "distance_note", "method_title"]
