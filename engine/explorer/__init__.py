"""The explorer: a backbone with its open galleries, each with fitted methods, scores, maps and
presets. What the page drives."""

from engine.explorer.session import (
    BASELINE,
    CUSTOM,
    DEFAULT_TOP_N,
    QUERY_MODELS,
    Explorer,
    GallerySession,
    QueryResult,
    Ranking,
    method_title,
)

__all__ = ["BASELINE", "CUSTOM", "DEFAULT_TOP_N", "QUERY_MODELS", "Explorer", "GallerySession",
           "QueryResult", "Ranking", "method_title"]
