"""Retrieval Explorer engine: features, gallery index, metrics and re-rankers (no UI code)."""

from engine.errors import (
    CacheError,
    EmptyGalleryError,
    EngineError,
    InvalidImageError,
    InvalidInputError,
    MissingDependencyError,
    NotFittedError,
    UnknownNameError,
    UnsafePathError,
)

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "EmptyGalleryError",
    "EngineError",
    "InvalidImageError",
    "InvalidInputError",
    "MissingDependencyError",
    "NotFittedError",
    "UnknownNameError",
    "UnsafePathError",
]
