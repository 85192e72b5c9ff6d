"""The Gradio explorer page; it only calls `engine`."""

from engine import BASELINE, Explorer, GallerySession, QueryResult, Ranking

__all__ = ["BASELINE", "Explorer", "GallerySession", "QueryResult", "Ranking"]
