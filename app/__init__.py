"""Retrieval Explorer web app: a Gradio page over the engine.

`app.session` holds what is loaded once per process (no UI imports); `app.page` builds the page.
"""

from app.session import BASELINE, ExplorerSession, QueryResult, Ranking

__all__ = ["BASELINE", "ExplorerSession", "QueryResult", "Ranking"]
