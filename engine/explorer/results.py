"""What one query returns: each method's `Ranking` and the `QueryResult` that holds them, with
per-query AP and P@N when the query has a class."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.rerank import documented_details, get_reranker_class
from engine.search.gallery import Gallery

BASELINE = "baseline"
"""Name of the plain faiss ranking (no re-ranker may use it)."""
BASELINE_TITLE = "Baseline (faiss, cosine)"
DEFAULT_TOP_N = 10



@dataclass(frozen=True)
class Ranking:
    """One method's answer to one query.

    indices / distances: the ranking (the whole gallery up to `FULL_RANKING_LIMIT`), best first.
    seconds: what it cost (a re-ranker's online call, or its share of the leave-one-out run).
    how: "online" (one query against the fitted gallery) or "leave-one-out" (the gallery
        pick's row of the whole-gallery run, the same run the Compare table scores).
    params / params_source: the parameters and where they came from ("authors' defaults",
        "preset" or "custom").
    ap / precision: per-query AP over the ranking and precision at the top N, when the query's
        class is known; relevant: (depth,) bool hits, likewise.
    """

    method: str
    title: str
    indices: np.ndarray
    distances: np.ndarray
    seconds: float
    how: str
    params: dict[str, Any] = field(default_factory=dict)
    params_source: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    relevant: np.ndarray | None = None
    ap: float | None = None
    precision: float | None = None

    def detail(self, key: str) -> Any:
        """One documented detail of the method (see `Reranker.details_schema`), or None when
        this ranking has none. The page reads details only through here: a key no method
        documents is a programming error (KeyError)."""
        if key not in documented_details():
            raise KeyError(f"{key!r} is not a documented detail of any method")
        return self.details.get(key)


@dataclass(frozen=True)
class QueryResult:
    """Everything one query produced.

    source_row / source_file: the gallery image the query is (None for an upload).
    query_label / query_class: the query's class (a pick's label, or the class given for an
        upload), None when unknown. n_positives: gallery items of that class (the pick excluded).
    feature: the query's (d,) feature. imagenet: the backbone head's top-3 (label, probability).
    rankings: by method, the baseline first. timings: seconds per stage ("embed", then methods).
    embedded_by: which model embedded the query and which the gallery.
    not_ready: by method, why it has no ranking yet (its background job's state: waiting,
        training 41 %, ...); such a method is missing from `rankings`.
    """

    gallery_key: str
    source_row: int | None
    source_file: str | None
    query_label: int | None
    query_class: str | None
    n_positives: int | None
    feature: np.ndarray
    imagenet: list[tuple[str, float]]
    rankings: dict[str, Ranking]
    timings: dict[str, float]
    top_n: int
    leave_out: bool
    embedded_by: str = ""
    not_ready: dict[str, str] = field(default_factory=dict)

    def top(self, method: str) -> tuple[np.ndarray, np.ndarray]:
        """The first `top_n` (distances, indices) of a method's ranking."""
        ranking = self.rankings[method]
        return ranking.distances[:self.top_n], ranking.indices[:self.top_n]

    def with_ranking(self, ranking: Ranking) -> QueryResult:
        """A copy with one method's ranking (and its timing) replaced."""
        not_ready = {name: text for name, text in self.not_ready.items()
                     if name != ranking.method}
        return dataclasses.replace(self, rankings={**self.rankings, ranking.method: ranking},
                                   timings={**self.timings, ranking.method: ranking.seconds},
                                   not_ready=not_ready)

    def without(self, method: str, reason: str) -> QueryResult:
        """A copy in which `method` has no ranking, for `reason` (not ready yet)."""
        rankings = {name: ranking for name, ranking in self.rankings.items() if name != method}
        timings = {stage: seconds for stage, seconds in self.timings.items() if stage != method}
        return dataclasses.replace(self, rankings=rankings, timings=timings,
                                   not_ready={**self.not_ready, method: reason})

    def as_dict(self, gallery: Gallery) -> dict[str, Any]:
        """A JSON-ready summary: per method the top-N file names, classes and distances."""
        methods = {}
        for name, ranking in self.rankings.items():
            distances, indices = self.top(name)
            methods[name] = {
                "title": ranking.title,
                "files": [gallery.files[row] for row in indices.tolist()],
                "classes": [gallery.class_of(row) for row in indices.tolist()],
                "distances": [round(float(d), 6) for d in distances],
                "ms": round(ranking.seconds * 1000, 2), "how": ranking.how,
                "params": ranking.params, "params_source": ranking.params_source,
                "ap": ranking.ap, f"p@{self.top_n}": ranking.precision,
            }
        return {
            "query": {"file": self.source_file, "class": self.query_class,
                      "imagenet_top3": [{"label": label, "probability": round(p, 6)}
                                        for label, p in self.imagenet]},
            "methods": methods,
            "not_ready": dict(self.not_ready),
            "timings_ms": {stage: round(s * 1000, 2) for stage, s in self.timings.items()},
        }


def method_title(name: str) -> str:
    if name == BASELINE:
        return BASELINE_TITLE
    cls = get_reranker_class(name)
    return cls.title or name


