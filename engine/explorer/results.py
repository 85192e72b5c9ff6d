"""What one query returns: each method's `Ranking` and the `QueryResult` that holds them, with
per-query AP and P@N when the query has a class, the cosine similarity of every shown result
(one scale for every method, whose own distances mean different things: `distance_note`), and
how familiar the query is to the gallery (`Familiarity`: out of distribution?)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.core.knn import FLOAT32_SLACK, canonical_similarity
from engine.core.types import Evidence, KnnGraph
from engine.errors import InvalidInputError
from engine.rerank import documented_details, get_reranker_class
from engine.search.gallery import Gallery

BASELINE = "baseline"
"""Name of the plain faiss ranking (no re-ranker may use it)."""
BASELINE_TITLE = "Baseline (faiss, cosine)"
BASELINE_DISTANCE_NOTE = ("1 - cosine similarity of the query's and the item's features "
                          "(0: the same direction, 1: unrelated, 2: opposite)")
DEFAULT_TOP_N = 10
UNUSUAL_PERCENTILE = 1.0
"""A query whose nearest gallery item is less similar than this percentile of the gallery's own
nearest-neighbour similarities is unusual (see `Familiarity`)."""

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
    junk: (depth,) bool, the results its revisited ground truth ignores (neither hit nor
        miss: AP and precision leave them out), for a query of a query set with one; else None.
    similarities: (top N,) float32 cosine similarity of the query's feature to each of the
        first N results' gallery features: one scale for every method (its `distances` are
        its own, see `distance_note`). None until the ranking is scored.
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
    junk: np.ndarray | None = None
    ap: float | None = None
    precision: float | None = None
    similarities: np.ndarray | None = None

    def detail(self, key: str) -> Any:
        """One documented detail of the method (see `Reranker.details_schema`), or None when
        this ranking has none. The page reads details only through here: a key no method
        documents is a programming error (KeyError)."""
        if key not in documented_details():
            raise KeyError(f"{key!r} is not a documented detail of any method")
        return self.details.get(key)


@dataclass(frozen=True)
class QueryChanges:
    """How a method changed each scored query's AP against the baseline (leave-one-out, the
    Compare table's queries), largest loss first: what the failure browser and the per-query
    plot show. rows: (n,) the queries' gallery rows; before, after: (n,) their APs under the
    baseline and under `method`."""

    method: str
    rows: np.ndarray
    before: np.ndarray
    after: np.ndarray

    @property
    def change(self) -> np.ndarray:
        """AP after minus AP before, per query."""
        return self.after - self.before

    def losses(self, count: int) -> np.ndarray:
        """Positions of the `count` largest losses (most negative change first; only losses)."""
        return np.flatnonzero(self.change < 0)[:count]

    def gains(self, count: int) -> np.ndarray:
        """Positions of the `count` largest gains (largest first; only gains)."""
        return np.flatnonzero(self.change > 0)[::-1][:count]


def unit_query(feature: np.ndarray) -> np.ndarray:
    """The query's (d,) feature divided by its norm (float64): gallery features are unit rows,
    and a query model's output need not be exactly one. A zero or non-finite feature raises
    InvalidInputError."""
    vector = np.asarray(feature, np.float64).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise InvalidInputError("the query's feature is zero or not finite: no cosine to it")
    return vector / norm


def query_similarities(feature: np.ndarray, gallery_features: np.ndarray, rows: np.ndarray
                       ) -> np.ndarray:
    """(len(rows),) float32 cosine similarity of the query to the gallery rows `rows`
    (canonical: float64 sums, as the kNN graph's)."""
    rows = np.asarray(rows, np.int64)
    return canonical_similarity(unit_query(feature)[None, :], gallery_features[rows])[0]


def nearest_other_similarities(knn: KnnGraph) -> np.ndarray:
    """(G,) float32: each gallery item's similarity to its nearest other item, read from the
    gallery's kNN graph (self first; an exact duplicate gives 1). Empty when no item has another
    in its list (a one-item gallery)."""
    others = knn.indices != np.arange(len(knn.indices))[:, None]
    found = others.any(axis=1)
    if not found.all():
        return np.empty(0, np.float32)
    first = others.argmax(axis=1)
    return knn.similarities[np.arange(len(first)), first].astype(np.float32)


@dataclass(frozen=True)
class Familiarity:
    """How close the query is to the gallery, against how close gallery items usually are to
    each other: a query far from everything (out of distribution) gets rankings that mean
    little, whatever the method.

    nearest: cosine similarity of the query to its nearest gallery item (its own row excluded
        when a gallery pick is left out); nearest_row: that item's row.
    typical: the median, over gallery items, of the similarity to their nearest other item.
    percentile: where `nearest` falls among those (0-100): the share of gallery items whose
        nearest is less similar, ties (within float32 error) counting half.
    threshold: the 1st percentile of those similarities, as the lower order statistic
        (`np.quantile(..., method="lower")`): in a gallery of up to 100 items, the least
        similar item's nearest.
    unusual: nearest < threshold (beyond float32 error). So in a gallery of up to 100 items no
        gallery item is unusual, and in a larger one at most 1 % are; a tiny gallery's own
        spread sets the bar, nothing fixed.
    """

    nearest: float
    nearest_row: int
    typical: float
    percentile: float
    threshold: float
    unusual: bool

    @classmethod
    def of(cls, nearest: float, nearest_row: int, usual: np.ndarray) -> Familiarity:
        """Place the query's `nearest` similarity among the gallery's `usual` (G,) nearest-
        neighbour similarities (`nearest_other_similarities`); G >= 1."""
        usual = np.asarray(usual, np.float64)
        if usual.size == 0:
            raise InvalidInputError("no nearest-neighbour similarities to compare the query "
                                    "with: the gallery needs at least 2 images")
        below = int((usual < nearest - FLOAT32_SLACK).sum())
        tied = int((np.abs(usual - nearest) <= FLOAT32_SLACK).sum())
        threshold = float(np.quantile(usual, UNUSUAL_PERCENTILE / 100, method="lower"))
        return cls(float(nearest), int(nearest_row), float(np.median(usual)),
                   100.0 * (below + 0.5 * tied) / usual.size, threshold,
                   bool(nearest < threshold - FLOAT32_SLACK))


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
    familiarity: the query against the gallery's usual nearest-neighbour similarity (None for a
        one-image gallery).
    query_set_name: the name of the session's query-set query this is (`query_from_set`),
        or None.
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
    familiarity: Familiarity | None = None
    query_set_name: str | None = None

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
        """A JSON-ready summary: per method the top-N file names, classes, distances (with what
        they mean) and cosine similarities; the query's familiarity to the gallery."""
        methods = {}
        for name, ranking in self.rankings.items():
            distances, indices = self.top(name)
            methods[name] = {
                "title": ranking.title,
                "files": [gallery.files[row] for row in indices.tolist()],
                "classes": [gallery.class_of(row) for row in indices.tolist()],
                "distances": [round(float(d), 6) for d in distances],
                "distance_note": distance_note(name),
                "similarities": (None if ranking.similarities is None else
                                 [round(float(c), 6) for c in ranking.similarities]),
                "ms": round(ranking.seconds * 1000, 2), "how": ranking.how,
                "params": ranking.params, "params_source": ranking.params_source,
                "ap": ranking.ap, f"p@{self.top_n}": ranking.precision,
            }
        return {
            "query": {"file": self.source_file, "class": self.query_class,
                      "imagenet_top3": [{"label": label, "probability": round(p, 6)}
                                        for label, p in self.imagenet]},
            "methods": methods,
            "familiarity": (None if self.familiarity is None
                            else dataclasses.asdict(self.familiarity)),
            "not_ready": dict(self.not_ready),
            "timings_ms": {stage: round(s * 1000, 2) for stage, s in self.timings.items()},
        }


@dataclass(frozen=True)
class Explanation:
    """Why a shown result of one method sits where it does: the method's `Evidence` for the
    query's feature, and where the item is in the method's and the baseline's rankings of
    the result (1-based; None when the ranking, `depth` items deep, does not hold it)."""

    evidence: Evidence
    method_rank: int | None
    baseline_rank: int | None
    depth: int


def rank_of(ranking: Ranking, row: int) -> int | None:
    """The 1-based place of gallery row `row` in `ranking`, None when it is not there."""
    found = np.flatnonzero(ranking.indices == row)
    return int(found[0]) + 1 if found.size else None


def method_title(name: str) -> str:
    if name == BASELINE:
        return BASELINE_TITLE
    cls = get_reranker_class(name)
    return cls.title or name


def distance_note(name: str) -> str:
    """One line saying what a method's distances mean (each method's are its own; compare
    methods by `Ranking.similarities` instead). Unknown names raise UnknownNameError."""
    if name == BASELINE:
        return BASELINE_DISTANCE_NOTE
    return get_reranker_class(name).distance_note


