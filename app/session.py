"""What the explorer holds for the whole process: the gallery, the backbone and fitted re-rankers.

Everything here is loaded once (by `ExplorerSession.load`) and shared by every request; a query
only reads it. No UI code: the page (`app.page`) and scripts use the same session.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.backbone import FeatureExtractor, get_extractor
from engine.errors import EngineError, InvalidInputError
from engine.gallery import DEMO_GALLERY, Gallery, ProgressCallback
from engine.rerank import Reranker, get_reranker_class, list_rerankers

logger = logging.getLogger(__name__)

BASELINE = "baseline"
"""Name of the plain faiss ranking in `QueryResult.rankings` (no re-ranker may use it)."""

BASELINE_TITLE = "Baseline (faiss, cosine)"
DEFAULT_K = 10
MAX_EXAMPLES = 8


@dataclass(frozen=True)
class Ranking:
    """One method's answer to one query.

    indices: (k,) int64 gallery rows, best first. distances: (k,) float32, ascending.
    seconds: time the method took (the baseline: the faiss search; a re-ranker: its rerank call).
    details: the method's extras (clamped parameters, ...), from `RerankResult.details`.
    """

    method: str
    title: str
    indices: np.ndarray
    distances: np.ndarray
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryResult:
    """Everything one query produced.

    source_file: the gallery file the query image is (None for an upload).
    source_class: that file's class name, when the gallery is labelled.
    imagenet: the backbone head's top classes of the query, (description, probability).
    rankings: by method name, the baseline first, then the re-rankers in registry order.
    timings: seconds per stage: "embed", then one entry per ranking.
    """

    source_file: str | None
    source_class: str | None
    imagenet: list[tuple[str, float]]
    rankings: dict[str, Ranking]
    timings: dict[str, float]

    def as_dict(self, gallery: Gallery) -> dict[str, Any]:
        """A JSON-ready summary: per method the ranked file names, classes and distances."""
        methods = {}
        for name, ranking in self.rankings.items():
            rows = ranking.indices.tolist()
            methods[name] = {
                "title": ranking.title,
                "files": [gallery.files[row] for row in rows],
                "classes": [gallery.class_of(row) for row in rows],
                "distances": [round(float(d), 6) for d in ranking.distances],
                "ms": round(ranking.seconds * 1000, 2),
            }
        return {
            "query": {"file": self.source_file, "class": self.source_class,
                      "imagenet_top3": [{"label": label, "probability": round(p, 6)}
                                        for label, p in self.imagenet]},
            "methods": methods,
            "timings_ms": {stage: round(s * 1000, 2) for stage, s in self.timings.items()},
        }


class ExplorerSession:
    """The gallery, the extractor and every fitted re-ranker, shared by all requests.

    Build it with `ExplorerSession.load(folder)`, or pass already-made parts to the constructor
    (tests do, with a tiny gallery). A re-ranker whose fit fails with an engine error is left
    out and its message kept in `unavailable`, so one broken method does not stop the app.
    """

    def __init__(self, gallery: Gallery, extractor: FeatureExtractor,
                 rerankers: Mapping[str, Reranker],
                 unavailable: Mapping[str, str] | None = None) -> None:
        if BASELINE in rerankers:
            raise InvalidInputError(f"a re-ranker may not be named {BASELINE!r}")
        self.gallery = gallery
        self.extractor = extractor
        self.rerankers = dict(rerankers)
        self.unavailable = dict(unavailable or {})
        self._positions = {name: row for row, name in enumerate(gallery.files)}

    @classmethod
    def load(cls, folder: str | os.PathLike = DEMO_GALLERY, *, device: str = "auto",
             cache_root: str | os.PathLike | None = None,
             progress: ProgressCallback | None = None,
             methods: Sequence[str] | None = None) -> ExplorerSession:
        """Open (or index) the gallery and fit every registered re-ranker once.

        Args:
            folder: the gallery folder (default: the demo gallery).
            device: "auto", "cpu" or "cuda" for the backbone, the index and re-rankers that
                take a device.
            cache_root: where gallery caches live (default: the engine's default cache root).
            progress: called with (fraction, message) while the gallery is embedded.
            methods: re-ranker names to fit (default: every registered one).
        """
        extractor = get_extractor(device=device)
        gallery = Gallery.open(folder, extractor=extractor, cache_root=cache_root,
                               progress=progress, device=device)
        logger.info("gallery %s: %d images, %d classes, %d skipped", gallery.root, gallery.size,
                    len(gallery.class_names), len(gallery.skipped))
        rerankers, unavailable = fit_rerankers(gallery, methods, device)
        return cls(gallery, extractor, rerankers, unavailable)

    # -- what the page shows ---------------------------------------------------------------------
    def methods(self) -> list[tuple[str, str]]:
        """(name, display title) of the baseline and of every fitted re-ranker, in display order."""
        return [(BASELINE, BASELINE_TITLE)] + [
            (name, type(reranker).title or name) for name, reranker in self.rerankers.items()]

    def example_files(self, limit: int = MAX_EXAMPLES) -> list[str]:
        """Gallery files to offer as example queries.

        From `examples.txt` in the gallery folder (one file name a line, relative to the folder
        or its `images/` sub-folder) when there is one, else the first file of each class, else
        the first files.
        """
        listed = self.gallery.root / "examples.txt"
        chosen: list[str] = []
        if listed.is_file():
            for line in listed.read_text().splitlines():
                name = line.strip().replace("\\", "/")
                if not name or name.startswith("#"):
                    continue
                match = next((c for c in (name, f"images/{name}") if c in self._positions), None)
                if match is None:
                    logger.warning("%s names %r, which is not an image of the gallery", listed,
                                   name)
                elif match not in chosen:
                    chosen.append(match)
        elif self.gallery.labels is not None:
            _, first_rows = np.unique(self.gallery.labels, return_index=True)
            chosen = [self.gallery.files[row] for row in sorted(first_rows)
                      if self.gallery.labels[row] >= 0]
        return (chosen or self.gallery.files)[:limit]

    def position_of(self, file: str) -> int:
        """Gallery row of a relative file name; unknown names raise InvalidInputError."""
        try:
            return self._positions[file]
        except KeyError:
            raise InvalidInputError(
                f"{file!r} is not an image of the gallery {self.gallery.root.name}") from None

    # -- the query ---------------------------------------------------------------------------------
    def query(self, image: Any = None, *, source_file: str | None = None, k: int = DEFAULT_K,
              leave_out_source: bool = True) -> QueryResult:
        """Embed one image, rank the gallery with the baseline and re-rank with every method.

        Args:
            image: a path, bytes, numpy array or PIL image; may be None when `source_file` is
                given, and is then read from the gallery.
            source_file: the gallery file (relative name) the query is, if it is one; it gives
                the query its class, and with `leave_out_source` it is removed from the results.
            k: results per method (at most the gallery size, less one when leaving out).
            leave_out_source: drop the query's own gallery row from every ranking. Re-rankers
                still see that row while they compute (online mode against the fixed gallery);
                only their output is filtered.
        Raises:
            InvalidImageError: the image cannot be decoded.
            InvalidInputError: unknown `source_file`, bad k, or neither image nor source.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        source_row = None if source_file is None else self.position_of(source_file)
        if image is None:
            if source_row is None:
                raise InvalidInputError("give a query image or the name of a gallery image")
            image = self.gallery.path_of(source_row)
        drop = source_row if leave_out_source else None
        available = self.gallery.size - (drop is not None)
        if available < 1:
            raise InvalidInputError("the gallery has no other image to return")
        k = min(k, available)
        fetch = min(k + (drop is not None), self.gallery.size)

        timings: dict[str, float] = {}
        start = time.perf_counter()
        feature, imagenet = self.extractor.embed_and_classify(image)
        timings["embed"] = time.perf_counter() - start
        query = feature[None, :]

        rankings: dict[str, Ranking] = {}
        start = time.perf_counter()
        baseline = self.gallery.search(query, fetch)
        distances, indices = baseline.distances, baseline.indices
        seconds = time.perf_counter() - start
        rankings[BASELINE] = Ranking(BASELINE, BASELINE_TITLE,
                                     *_without(indices[0], distances[0], drop, k), seconds)
        for name, reranker in self.rerankers.items():
            start = time.perf_counter()
            result = reranker.rerank(query, fetch, mode="online")
            seconds = time.perf_counter() - start
            rankings[name] = Ranking(name, type(reranker).title or name,
                                     *_without(result.indices[0], result.distances[0], drop, k),
                                     seconds, dict(result.details))
        timings.update({name: ranking.seconds for name, ranking in rankings.items()})
        source_class = None if source_row is None else self.gallery.class_of(source_row)
        return QueryResult(source_file, source_class, imagenet, rankings, timings)


def fit_rerankers(gallery: Gallery, methods: Sequence[str] | None = None, device: str = "auto"
                  ) -> tuple[dict[str, Reranker], dict[str, str]]:
    """Create each named (default: every registered) re-ranker with default parameters and fit it.

    Returns the fitted methods by name and, for each one whose creation or fit raised an
    EngineError, its message.
    """
    fitted: dict[str, Reranker] = {}
    failed: dict[str, str] = {}
    context = gallery.context()
    for name in list_rerankers() if methods is None else methods:
        cls = get_reranker_class(name)
        start = time.perf_counter()
        try:
            fitted[name] = cls(device=device).fit(context)
        except EngineError as error:
            logger.error("re-ranker %s is unavailable: %s", name, error)
            failed[name] = str(error)
            continue
        logger.info("fitted %s in %.2f s", name, time.perf_counter() - start)
    return fitted, failed


def _without(indices: np.ndarray, distances: np.ndarray, drop: int | None, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The first k entries of a ranking after removing the row `drop` (when not None)."""
    if drop is not None:
        keep = indices != drop
        indices, distances = indices[keep], distances[keep]
    return (np.asarray(indices[:k], dtype=np.int64), np.asarray(distances[:k], dtype=np.float32))

