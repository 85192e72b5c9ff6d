"""Retrieval Explorer engine: features, galleries and search, re-ranking methods, evaluation,
plot data and the explorer that ties them together (no UI code).

This module is the engine's public face; the page (`app/`) imports only from here and from
`engine.errors`. Names load on first use, so `import engine` stays cheap (no torch, faiss or
timm until a name that needs them is used).

- explorer: `Explorer` (a backbone and its open galleries), `GallerySession` (one gallery's
  fitted methods, scores, maps, presets), `QueryResult`, `Ranking`, `Familiarity` (is a query
  out of distribution?), `Explanation` (a shown result's `Evidence` and where it moved),
  `QUERY_MODELS`, `method_title` and `distance_note` (what a method's distances mean).
- exports with their run card (`RunCard`: backbone and weights hash, gallery, protocol,
  settings, versions, device, date): `export_rankings`, `export_table`, `exports_folder`,
  `read_csv_export`.
- galleries and images: `Gallery`, `DEMO_GALLERY`, `extract_zip` (an upload's name:
  `write_upload_name`, `read_upload_name`), `load_image`, `make_thumbnail`, `MAX_FILE_BYTES`.
- re-ranking: `list_rerankers`, `create_reranker`, `get_reranker_class`.
- evaluation: `evaluate`, `scores_table` (headers: `SCORES_TABLE_COLUMNS`),
  `GROUND_TRUTH_FORMATS` (a revisited ground-truth file's suffix), `sweep`,
  `SweepRun` (a sweep in a background thread, read as it goes and cancellable),
  `SweepProgress`, `Trial`, `best_trial`.
- views: `neighbourhood_graph`, `NeighbourhoodGraph`.
- runtime: `JobQueue` and its `Job`s (states `WAITING`, `RUNNING`, `DONE`, `FAILED`;
  cancellable: `JobCancelled`), `Plan` and `PlanStep` (what long work will do and about how
  long, said before it starts; `LONG_JOB_SECONDS`),
  `configure_threads`, `configure_logging`, `resolve_device`, and the small file helpers the
  page's caches use (`atomic_write_bytes`, `load_json`).
- errors: every error the engine raises derives from `EngineError`.
"""

from __future__ import annotations

from engine.core.lazy import lazy_names
from engine.errors import (
    CacheError,
    EmptyGalleryError,
    EngineError,
    InvalidImageError,
    InvalidInputError,
    JobCancelled,
    MissingDependencyError,
    NotFittedError,
    TooLargeError,
    UnknownNameError,
    UnsafePathError,
)

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "BASELINE": "engine.explorer",
    "CUSTOM": "engine.explorer",
    "DEFAULT_TOP_N": "engine.explorer",
    "FULL_RANKING_LIMIT": "engine.explorer",
    "QUERY_MODELS": "engine.explorer",
    "Explanation": "engine.explorer",
    "Explorer": "engine.explorer",
    "Familiarity": "engine.explorer",
    "GallerySession": "engine.explorer",
    "QueryChanges": "engine.explorer",
    "QueryResult": "engine.explorer",
    "Ranking": "engine.explorer",
    "distance_note": "engine.explorer",
    "method_title": "engine.explorer",
    "export_rankings": "engine.explorer.exports",
    "export_table": "engine.explorer.exports",
    "exports_folder": "engine.explorer.exports",
    "read_csv_export": "engine.explorer.exports",
    "RunCard": "engine.evaluation.runcard",
    "DEMO_GALLERY": "engine.search.gallery",
    "Gallery": "engine.search.gallery",
    "ProgressCallback": "engine.search.gallery",
    "extract_zip": "engine.search.archive",
    "read_upload_name": "engine.search.archive",
    "write_upload_name": "engine.search.archive",
    "FEATURE_FILE_FORMATS": "engine.search.features_file",
    "MAX_FILE_BYTES": "engine.features.images",
    "load_image": "engine.features.images",
    "make_thumbnail": "engine.features.images",
    "Evidence": "engine.rerank",
    "EvidenceGroup": "engine.rerank",
    "create_reranker": "engine.rerank",
    "get_reranker_class": "engine.rerank",
    "list_rerankers": "engine.rerank",
    "evaluate": "engine.evaluation.metrics",
    "GROUND_TRUTH_FORMATS": "engine.evaluation.revisited",
    "SCORES_TABLE_COLUMNS": "engine.evaluation.scores",
    "scores_table": "engine.evaluation.scores",
    "SweepProgress": "engine.evaluation.tuning",
    "SweepRun": "engine.evaluation.tuning",
    "Trial": "engine.evaluation.tuning",
    "best_trial": "engine.evaluation.tuning",
    "sweep": "engine.evaluation.tuning",
    "NeighbourhoodGraph": "engine.views.neighbourhood",
    "neighbourhood_graph": "engine.views.neighbourhood",
    "JobQueue": "engine.core.jobs",
    "Job": "engine.core.jobs",
    "WAITING": "engine.core.jobs",
    "RUNNING": "engine.core.jobs",
    "DONE": "engine.core.jobs",
    "FAILED": "engine.core.jobs",
    "LONG_JOB_SECONDS": "engine.core.plans",
    "Plan": "engine.core.plans",
    "PlanStep": "engine.core.plans",
    "duration_text": "engine.core.plans",
    "configure_threads": "engine.core.threads",
    "configure_logging": "engine.core.logs",
    "resolve_device": "engine.core.device",
    "atomic_write_bytes": "engine.core.storage",
    "load_json": "engine.core.storage",
}

__all__ = [
    "CacheError",
    "EmptyGalleryError",
    "EngineError",
    "InvalidImageError",
    "InvalidInputError",
    "JobCancelled",
    "MissingDependencyError",
    "NotFittedError",
    "TooLargeError",
    "UnknownNameError",
    "UnsafePathError",
    *_PUBLIC,
]


__getattr__, __dir__ = lazy_names(__name__, globals(), _PUBLIC)
