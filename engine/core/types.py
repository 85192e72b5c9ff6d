"""The types every concept shares: a ranking result, the gallery kNN graph, what a method is
fitted on, and the feature check.

Conventions (one for the whole project):
- Features are float32, L2-normalised rows; similarity is the inner product.
- A ranking is `RerankResult(indices, distances)` of shape (n_queries, k), best first, and a
  smaller distance is closer; the baseline search returns one too. Per-method extras for the UI
  ride in `RerankResult.details`.
- Indices refer to gallery rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InvalidInputError

UNIT_NORM_TOLERANCE = 1e-3
CHECK_CHUNK = 16384  # rows per chunk of `check_features`' tests (80 MiB at d = 1280)


@dataclass(frozen=True)
class KnnGraph:
    """Top-K neighbours of every gallery item (itself first, at similarity exactly 1).

    indices: (G, K) int64 gallery rows, most similar first (ties: smaller index first).
    similarities: (G, K) float32 canonical inner products (`knn.canonical_similarity`).
    farthest: (G,) float32 smallest similarity of each row (k-reciprocal's normaliser), or None.
    canonical: True when built by `knn.knn_graph` (exact, canonical similarities): a re-ranker
        that reads it gives what its own exact search would.
    recall: for an approximate graph (built through an approximate index above the exact-search
        size), its measured recall of the exact lists on a sample of rows; None when unmeasured
        or exact. A re-ranker uses an approximate graph rather than search the whole gallery
        itself: that is what makes a gallery of a million workable, at the cost this states.
    """

    indices: np.ndarray
    similarities: np.ndarray
    farthest: np.ndarray | None = None
    canonical: bool = False
    recall: float | None = None

    @property
    def depth(self) -> int:
        return int(self.indices.shape[1])


@dataclass(frozen=True)
class TrainingSet:
    """Items a learning method may learn from besides the gallery (a protocol's held-out
    training classes, say): features (n, d) L2-normalised, labels (n,) int or None (-1 =
    unlabelled), and a short description the UI shows."""

    features: np.ndarray
    labels: np.ndarray | None = None
    description: str = ""

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @property
    def fingerprint(self) -> str:
        """Identifies the exact features and labels (learned state is keyed on it)."""
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.features, np.float32).tobytes())
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        return digest.hexdigest()[:16]


@dataclass
class GalleryContext:
    """What `Reranker.fit` receives: the gallery features and the structures shared by methods.

    features: (G, d) float32 L2-normalised rows.
    knn: the gallery kNN graph from the index (computed once and cached), or None.
    fingerprint: identifies how the features were made and which images they are; learned state
        is keyed on it.
    state_dir: folder beside the gallery cache where learned methods keep their state.
    labels: optional (G,) int labels (only some learned methods may use them).
    training: optional held-out items a learning method may train on instead of the gallery.
    """

    features: np.ndarray
    knn: KnnGraph | None = None
    fingerprint: str = ""
    state_dir: Path | None = None
    labels: np.ndarray | None = None
    training: TrainingSet | None = None

    @property
    def size(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class RerankResult:
    """The one ranking type: (n_queries, k) gallery indices and distances, best first.

    indices: int64, unique per row. distances: float32, finite, ascending (smaller is closer).
    details: method extras for the UI (clamped parameters, intermediate scores, ...).
    """

    indices: np.ndarray
    distances: np.ndarray
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvidenceGroup:
    """A named set of gallery rows a method's evidence rests on, with one number per row.

    rows: (n,) int64 gallery rows. values: (n,) float64, what `value_name` says (a
    contribution to the final similarity, the rank a voter gave the result, ...); NaN where a
    row has none. highlight: the kNN-graph plot marks these rows as evidence nodes.
    """

    name: str
    rows: np.ndarray
    values: np.ndarray
    value_name: str
    highlight: bool = True

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows, np.int64).reshape(-1)
        values = np.asarray(self.values, np.float64).reshape(-1)
        if rows.shape != values.shape:
            raise ValueError(f"evidence group {self.name!r}: {rows.size} rows but "
                             f"{values.size} values")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "values", values)


@dataclass(frozen=True)
class Evidence:
    """Why a method put one gallery item where it did for one query: the one schema the page
    renders for every method, without knowing the method.

    method: the method's registry name. item: the gallery row explained.
    summary: the reason in one clause, to follow "moved from #14 to #3: " on the page ("9 of
        its 20 k-reciprocal neighbours are also the query's").
    numbers: the named scalars that made the item's score, in reading order (say "Jaccard
        distance", "original distance", "lambda", "final distance"); JSON-able floats.
    groups: the sets of gallery rows the score rests on (`EvidenceGroup`), in reading order.
    """

    method: str
    item: int
    summary: str
    numbers: Mapping[str, float] = field(default_factory=dict)
    groups: tuple[EvidenceGroup, ...] = ()

    def group(self, name: str) -> EvidenceGroup:
        """The group called `name` (KeyError when this evidence has none)."""
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"{self.method} evidence has no group {name!r}; it has "
                       f"{[group.name for group in self.groups]}")

    def highlighted_rows(self) -> np.ndarray:
        """Every row of a highlighted group, once, ascending: the kNN plot's evidence nodes."""
        rows = [group.rows for group in self.groups if group.highlight]
        return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: numbers as floats, rows as ints, a NaN value as None."""
        return {"method": self.method, "item": int(self.item), "summary": self.summary,
                "numbers": {name: float(value) for name, value in self.numbers.items()},
                "groups": [{"name": group.name, "value_name": group.value_name,
                            "highlight": group.highlight, "rows": group.rows.tolist(),
                            "values": [None if not np.isfinite(value) else float(value)
                                       for value in group.values]}
                           for group in self.groups]}


def check_features(features: Any, name: str, dim: int | None = None, *,
                   unit_norm: bool = True) -> np.ndarray:
    """Validate a (n, d) feature matrix (a (d,) vector is one row) and return it as contiguous
    float32; with `unit_norm`, rows must be L2-normalised."""
    array = np.asarray(features)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D (n, d) array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"{name} is empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.number):
        raise InvalidInputError(f"{name} must be numeric, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise InvalidInputError(
            f"{name} has {array.shape[1]} dimensions but the gallery has {dim}: were they made "
            "with another backbone?")
    array = np.ascontiguousarray(array, dtype=np.float32)
    # In row chunks: a whole-array test would allocate a temporary as large as the gallery.
    finite = np.concatenate([np.isfinite(array[start:start + CHECK_CHUNK]).all(axis=1)
                             for start in range(0, array.shape[0], CHECK_CHUNK)])
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InvalidInputError(
            f"{name} contains NaN or infinite values in rows {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}; re-extract those features")
    if unit_norm:
        norms = np.concatenate([np.linalg.norm(array[start:start + CHECK_CHUNK], axis=1)
                                for start in range(0, array.shape[0], CHECK_CHUNK)])
        if (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).any():
            bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
            raise InvalidInputError(
                f"{name} must be L2-normalised (cosine = inner product); rows "
                f"{bad[:10].tolist()} have norms {np.round(norms[bad[:3]], 4).tolist()}: "
                "divide each row by its norm")
    return array
