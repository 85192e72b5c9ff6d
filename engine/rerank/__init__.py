"""Re-ranking methods, registered by name.

Each method lives in its own module of this package and registers itself with `@register`;
the modules are discovered automatically, so adding a method is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any

from engine.core.types import (
    Evidence,
    EvidenceGroup,
    GalleryContext,
    KnnGraph,
    RerankResult,
    TrainingSet,
)
from engine.errors import InvalidInputError, UnknownNameError
from engine.rerank.base import Reranker, RerankParams, param

_REGISTRY: dict[str, type[Reranker]] = {}
_discovered = False


def register(cls: type[Reranker]) -> type[Reranker]:
    """Class decorator: add a Reranker subclass to the registry under `cls.name`."""
    if not cls.name:
        raise InvalidInputError(f"{cls.__name__} must set a non-empty `name` to be registered")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise InvalidInputError(
            f"re-ranker name {cls.name!r} is already registered by {existing.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):  # `base` registers nothing; helpers are `_*.py`
            importlib.import_module(f"{__name__}.{module.name}")
    _discovered = True


def list_rerankers() -> list[str]:
    """Names of every registered method: the re-rankers, then the baselines they are compared
    with (`Reranker.baseline`), each in registration order (the page's tabs and tables)."""
    _discover()
    return sorted(_REGISTRY, key=lambda name: _REGISTRY[name].baseline)


def get_reranker_class(name: str) -> type[Reranker]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"no re-ranker named {name!r}; registered: {', '.join(_REGISTRY)}") from None


def documented_details() -> frozenset[str]:
    """Every detail key a registered method documents (`Reranker.details_schema`), plus the
    keys `rerank` adds for all (`COMMON_DETAILS`): what a reader of `details` may ask for."""
    from engine.rerank.base import COMMON_DETAILS

    _discover()
    return frozenset(COMMON_DETAILS).union(*(cls.details_schema for cls in _REGISTRY.values()))


def create_reranker(name: str, *, device: str = "auto", **params: Any) -> Reranker:
    """Build a registered method with the given parameter overrides (paper defaults otherwise)
    on `device` ("auto", "cpu", "cuda"; CPU-only methods stay on the CPU)."""
    return get_reranker_class(name)(device=device, **params)


def shared_graph_depth(methods: Iterable[str]) -> int:
    """The deepest kNN graph the methods read at their default settings; a gallery builds its
    shared graph at least this deep. Methods are created on the CPU, nothing is fitted."""
    return max([0, *(get_reranker_class(name)(device="cpu").graph_depth()
                     for name in methods)])


__all__ = [
    "Evidence",
    "EvidenceGroup",
    "GalleryContext",
    "KnnGraph",
    "RerankParams",
    "RerankResult",
    "Reranker",
    "TrainingSet",
    "create_reranker",
    "documented_details",
    "get_reranker_class",
    "list_rerankers",
    "param",
    "register",
    "shared_graph_depth",
]
