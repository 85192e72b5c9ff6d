"""What the explorer holds for the whole process: the backbone, the open galleries, fitted methods.

Everything here is loaded once and shared by every request; a request only reads it (caches
fill under locks). No UI code: the page (`app.page`), `launch.py` and tests use the same objects.

- `Explorer`: the backbone and every open gallery (the demo, folders on the server, uploaded
  zips), by key.
- `GallerySession`: one gallery with its presets, fitted re-rankers (per parameter setting),
  leave-one-out rankings, whole-gallery scores and embedding map.
- `QueryResult`: one query's rankings by every method, with per-query AP and P@N when the query
  has a class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.asymmetric.query_models import DEFAULT_QUERY_MODEL, QUERY_MODELS
from engine.core.jobs import DONE, FAILED, JobProgress, JobQueue
from engine.core.storage import fingerprint
from engine.errors import EngineError, InvalidInputError, UnknownNameError
from engine.evaluation.metrics import average_precision
from engine.evaluation.scores import (
    LeaveOneOutRankings,
    MethodScores,
    ScoreCache,
    median_ms,
    score_rankings,
    timing_queries,
    without_self,
)
from engine.evaluation.tuning import load_presets, resolve_params, save_preset
from engine.features.backbone import FeatureExtractor, get_extractor
from engine.rerank import Reranker, get_reranker_class, list_rerankers
from engine.search.archive import extract_zip, resolve_allowed_folder
from engine.search.gallery import DEMO_GALLERY, Gallery, ProgressCallback, default_cache_root
from engine.views.embedding_map import EmbeddingMap

logger = logging.getLogger(__name__)

BASELINE = "baseline"
"""Name of the plain faiss ranking (no re-ranker may use it)."""
BASELINE_TITLE = "Baseline (faiss, cosine)"
DEFAULT_TOP_N = 10
MAX_EXAMPLES = 8
FULL_RANKING_LIMIT = 5000
"""Galleries up to this size get full rankings (exact AP) and leave-one-out gallery picks."""
PARTIAL_DEPTH = 1000
"""Ranking depth for larger galleries (AP is then AP@1000)."""
FITTED_CACHE_SIZE = 16
LEAVE_ONE_OUT_CACHE_SIZE = 8

CUSTOM = "custom"


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
        """The first `top_n` (indices, distances) of a method's ranking."""
        ranking = self.rankings[method]
        return ranking.indices[:self.top_n], ranking.distances[:self.top_n]

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
            indices, distances = self.top(name)
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


class _LruCache:
    """A small thread-safe LRU map whose values are built once per key, even under concurrency."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Any, threading.Lock] = {}

    def peek(self, key: Any) -> Any:
        """The value of `key` if it is built, else None (never waits for a build)."""
        with self._lock:
            return self._values.get(key)

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._values:
                    return self._values[key]
            value = build()
            with self._lock:
                self._values[key] = value
                self._building.pop(key, None)
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
            return value


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


class GallerySession:
    """One open gallery and what the explorer computes on it, shared by all requests.

    Re-rankers are fitted per parameter setting on first use and kept (LRU); leave-one-out
    rankings likewise; whole-gallery scores are cached on disk beside the gallery cache.

    With a job queue (`jobs`), the slow work runs there (see `schedule`) and a query never
    waits for it: a method whose fit is queued or running is left out of the query's rankings
    with its job's state, and a gallery pick whose leave-one-out run is not made yet is ranked
    online. Without one, everything is computed on first use, in the asking thread.
    """

    def __init__(self, key: str, gallery: Gallery, device: str = "auto",
                 methods: Sequence[str] | None = None, query_model: str = DEFAULT_QUERY_MODEL,
                 base_key: str | None = None, jobs: JobQueue | None = None) -> None:
        self.key = key
        self.jobs = jobs
        self.base_key = base_key or key
        self.query_model = query_model
        self.query_encoder: Any = None
        """The SSP query model of an asymmetric session."""
        self.gallery = gallery
        self.device = device
        self.presets = load_presets(gallery.root, gallery.state_dir)
        self.method_names = list(list_rerankers() if methods is None else methods)
        self.unavailable: dict[str, str] = {}
        self._fitted = _LruCache(FITTED_CACHE_SIZE)
        self._leave_one_out = _LruCache(LEAVE_ONE_OUT_CACHE_SIZE)
        self._scores = ScoreCache(gallery.cache_dir, gallery.fingerprint)
        self._maps: dict[str, EmbeddingMap] = {}
        self._map_lock = threading.Lock()
        self._positions = {name: row for row, name in enumerate(gallery.files)}

    @property
    def title(self) -> str:
        gallery = self.gallery
        name = "Oxford-17 demo" if gallery.root == DEMO_GALLERY.resolve() else gallery.root.name
        suffix = ("" if self.query_model == DEFAULT_QUERY_MODEL
                  else f", {QUERY_MODELS[self.query_model].title}")
        return f"{name} ({gallery.size} images{suffix})"

    @property
    def asymmetric(self) -> bool:
        """Queries are embedded by another model than the gallery: a gallery pick is then not
        its gallery row, and is ranked online with its own image dropped."""
        return QUERY_MODELS[self.query_model].asymmetric

    @property
    def embedded_by(self) -> str:
        spec = QUERY_MODELS[self.query_model]
        query_side = (self.gallery.meta.backbone if spec.gallery_backbone is None
                      else spec.query_side)
        return f"query: {query_side} · gallery: {self.gallery.meta.backbone}"

    @property
    def full_rankings(self) -> bool:
        return self.gallery.size <= FULL_RANKING_LIMIT

    # -- methods and parameters ------------------------------------------------------------------
    def methods(self) -> list[tuple[str, str]]:
        """(name, title) of the baseline and of every available re-ranker, in display order."""
        return [(BASELINE, BASELINE_TITLE)] + [
            (name, method_title(name)) for name in self.method_names
            if name not in self.unavailable]

    def params_for(self, method: str) -> tuple[dict[str, Any], str]:
        """The parameters a method runs with by default here, and their source."""
        return resolve_params(method, self.presets)

    def resolve(self, method: str, params: Mapping[str, Any] | None
                ) -> tuple[dict[str, Any], str]:
        """Validated parameters (the default setting when None) and their source; a setting
        that differs from the preset or the authors' defaults is "custom"."""
        default, source = self.params_for(method)
        if params is None:
            return default, source
        if not isinstance(params, Mapping):
            raise InvalidInputError(f"the parameters of {method} must be a mapping of name to "
                                    f"value, got {type(params).__name__}")
        cls = get_reranker_class(method)
        known = {spec["name"] for spec in cls.Params.describe()}
        unknown = set(params) - known
        if unknown:
            raise InvalidInputError(f"{method} has no parameter(s) {sorted(unknown)}; "
                                    f"it takes {sorted(known)}")
        validated = cls.Params(**dict(params)).as_dict()
        return validated, (source if validated == default else CUSTOM)

    def reranker(self, method: str, params: Mapping[str, Any] | None = None,
                 progress: ProgressCallback | None = None) -> Reranker:
        """The method fitted on this gallery with `params` (fitted once per setting; a method
        that learns loads its saved state or trains, reporting to `progress`)."""
        validated, _ = self.resolve(method, params)

        def build() -> Reranker:
            started = time.perf_counter()
            reranker = get_reranker_class(method)(device=self.device, **validated)
            if reranker.learns and progress is not None:
                reranker.progress = progress
            reranker.fit(self.gallery.context())
            logger.info("fitted %s on %s in %.2f s", method, self.key,
                        time.perf_counter() - started)
            return reranker

        return self._fitted.get((method, _params_key(validated)), build)

    def fit_defaults(self, progress: ProgressCallback | None = None) -> None:
        """Fit every method with its default setting; a method whose fit fails is recorded in
        `unavailable` (with the engine's message) instead of stopping the page."""
        for method in self.method_names:
            with contextlib.suppress(EngineError):
                self._fit_or_mark_unavailable(method, None, progress)

    def _fit_or_mark_unavailable(self, method: str, params: Mapping[str, Any] | None,
                                 progress: ProgressCallback | None) -> Reranker:
        """Fit `method`; when its default setting (params None) fails, record the method as
        unavailable here (shown in its tab) before passing the error on."""
        try:
            return self.reranker(method, params, progress=progress)
        except Exception as error:  # recorded, then raised again: any failure of a fit counts
            logger.error("%s is unavailable on %s: %s", method, self.key, error)
            if params is None:
                self.unavailable[method] = str(error) or type(error).__name__
            raise

    # -- background preparation ------------------------------------------------------------------
    def schedule(self) -> None:
        """Queue what the page needs beyond features and index, in a fixed order: the fits of
        the methods that do not learn (seconds), the backbone's embedding map, the fits (or
        training) of the methods that learn, the maps of their embedding spaces, then every
        method's Compare scores (labelled galleries) and leave-one-out run (what gallery picks
        read), and last the map's projection of new queries. Each piece is saved where it
        always is, so a restart resumes from what was done."""
        if self.jobs is None:
            raise InvalidInputError("this gallery has no background job queue")
        classes = {name: get_reranker_class(name) for name in self.method_names}
        for name in [n for n in self.method_names if not classes[n].learns]:
            self._submit_fit(name)
        self._submit(("map", "backbone"), "Embedding map",
                     lambda progress: self.embedding_map("backbone", progress=progress))
        for name in [n for n in self.method_names if classes[n].learns]:
            self._submit_fit(name)
            self._submit(("map", name), f"Embedding map of {method_title(name)}",
                         functools.partial(self._learned_map, name))
        for method in [BASELINE, *self.method_names]:
            if self.gallery.labels is not None:
                self._submit(("scores", method), f"{method_title(method)} scores",
                             functools.partial(self._scores_job, method))
            self.leave_one_out(method, wait=False)
        self._submit(("map projection", "backbone"), "Embedding map projection",
                     self._warm_up_map)

    def _warm_up_map(self, progress: JobProgress) -> None:
        """Load the map's model and compile its `transform` (numba), so that the first upload
        is placed on the map without paying for it."""
        layout = self.embedding_map("backbone", fit=False)
        if layout is not None:
            layout.warm_up()

    def _submit(self, what: tuple[Any, ...], title: str, work: Callable[[JobProgress], Any]):
        assert self.jobs is not None
        return self.jobs.submit((self.key, *what), title, work)

    def _fit_job_key(self, method: str, validated: Mapping[str, Any]) -> tuple[Any, ...]:
        return ("fit", method, _params_key(validated))

    def _submit_fit(self, method: str, params: Mapping[str, Any] | None = None):
        validated, _ = self.resolve(method, params)
        title = method_title(method)
        return self._submit(self._fit_job_key(method, validated), title,
                            lambda progress: self._fit_or_mark_unavailable(
                                method, None if params is None else validated, progress))

    def _learned_map(self, method: str, progress: JobProgress) -> EmbeddingMap | None:
        if method in self.unavailable or self.fitted(method) is None:
            return None
        if self.reranker(method).gallery_embeddings() is None:
            return None
        return self.embedding_map(method, progress=progress)

    def _scores_job(self, method: str, progress: JobProgress) -> MethodScores | None:
        if method in self.unavailable:
            return None
        progress(0.0, "scoring every image against the others")
        return self.scores(method)

    def fitted(self, method: str, params: Mapping[str, Any] | None = None) -> Reranker | None:
        """The method fitted with `params` if it is in memory now, else None (never fits)."""
        validated, _ = self.resolve(method, params)
        return self._fitted.peek((method, _params_key(validated)))

    def not_ready(self, method: str, params: Mapping[str, Any] | None = None) -> str | None:
        """Why `method` cannot answer a query at once, or None when it can (fitted, or cheap
        to fit now, or there is no job queue).

        A method whose fit at this setting is queued or running is not ready (its job's state
        says how far it is); so is a method that learns at a setting never fitted (its
        training is queued now). A failed fit raises its error again.
        """
        if method == BASELINE or self.jobs is None or self.fitted(method, params) is not None:
            return None
        validated, _ = self.resolve(method, params)
        job = self.jobs.get((self.key, *self._fit_job_key(method, validated)))
        if job is None:
            if not get_reranker_class(method).learns:
                return None
            job = self._submit_fit(method, validated)
        if job.state == DONE:
            return None
        if job.state == FAILED:
            raise InvalidInputError(f"{method_title(method)} could not be fitted: {job.error}")
        return self.jobs.describe(job.key)

    def state_text(self, method: str) -> str:
        """The state of a method on this gallery, for its tab: ready, unavailable (why), its
        fit's background job's state, and any other job of it (scores, leave-one-out run, map)
        that failed."""
        if method in self.unavailable:
            return f"**Unavailable on this gallery:** {self.unavailable[method]}"
        text = "Ready."
        if self.jobs is not None and self.fitted(method) is None:
            validated, _ = self.resolve(method, None)
            described = self.jobs.describe((self.key, *self._fit_job_key(method, validated)))
            text = text if described is None or described.endswith(": ready") else described
        if self.jobs is not None:
            failed = [job.describe() for job in self.jobs.jobs()
                      if job.state == FAILED and job.key[0] == self.key
                      and job.key[1] != "fit" and method in job.key[2:3]]
            text = " · ".join([text, *failed])
        return text

    def save_preset(self, method: str, params: Mapping[str, Any], note: str = "") -> dict:
        """Store `params` as this gallery's preset for `method` (beside the gallery cache)."""
        self.resolve(method, params)  # unknown names and out-of-range values: a typed error
        stored = save_preset(self.gallery.state_dir, method, params, note)
        self.presets = load_presets(self.gallery.root, self.gallery.state_dir)
        return stored

    # -- whole-gallery runs ----------------------------------------------------------------------
    def depth(self, leave_one_out: bool) -> int:
        available = self.gallery.size - (1 if leave_one_out else 0)
        return available if self.full_rankings else min(PARTIAL_DEPTH, available)

    def leave_one_out(self, method: str, params: Mapping[str, Any] | None = None, *,
                      wait: bool = True) -> LeaveOneOutRankings | None:
        """Every gallery item's ranking of the others by `method` (batch mode), cached.

        With wait=False: the run if it is made, else None (and, with a job queue, the run is
        queued there)."""
        if self.gallery.size < 2:
            raise InvalidInputError("a leave-one-out ranking needs at least 2 gallery images")
        depth = self.depth(leave_one_out=True)
        if method == BASELINE:
            key: tuple[Any, ...] = (BASELINE,)

            def build() -> LeaveOneOutRankings:
                started = time.perf_counter()
                result = self.gallery.search(self.gallery.features, depth + 1)
                indices, distances = without_self(result.indices, result.distances, depth)
                return LeaveOneOutRankings(indices, distances, time.perf_counter() - started)
        else:
            validated, _ = self.resolve(method, params)
            key = (method, _params_key(validated))

            def build() -> LeaveOneOutRankings:
                reranker = self.reranker(method, validated)
                started = time.perf_counter()
                result = reranker.rerank(None, depth)
                return LeaveOneOutRankings(result.indices, result.distances,
                                           time.perf_counter() - started, dict(result.details))

        if not wait:
            found = self._leave_one_out.peek(key)
            if found is None and self.jobs is not None:
                self._submit(("leave-one-out", *key), f"{method_title(method)} leave-one-out",
                             lambda progress: None if method in self.unavailable
                             else self._leave_one_out.get(key, build))
            return found
        return self._leave_one_out.get(key, build)

    def scores(self, method: str, params: Mapping[str, Any] | None = None,
               cached_only: bool = False) -> MethodScores | None:
        """Leave-one-out mAP, P@1, P@5 and online ms/query of a method (disk-cached).

        With `cached_only`, returns None instead of computing missing scores.
        """
        validated = {} if method == BASELINE else self.resolve(method, params)[0]
        stored = self._scores.get(method, validated)
        if stored is not None or cached_only:
            return stored
        rankings = self.leave_one_out(method, validated)
        queries = timing_queries(self.gallery.features)
        k = min(DEFAULT_TOP_N, self.gallery.size)
        if method == BASELINE:
            online = median_ms(lambda query: self.gallery.search(query, k), queries)
        else:
            reranker = self.reranker(method, validated)
            online = median_ms(lambda query: reranker.rerank(query, k, mode="online"), queries)
        scores = score_rankings(method, validated, rankings, self.gallery.labels, online)
        self._scores.put(scores)
        return scores

    # -- embedding maps ----------------------------------------------------------------------------
    def map_spaces(self) -> list[tuple[str, str]]:
        """(space name, title) of the feature spaces the embedding map can show: the backbone's,
        and that of each method that learns its own embeddings (with a job queue: once it is
        fitted)."""
        spaces = [("backbone", f"backbone features ({self.gallery.meta.backbone})")]
        for method in self.method_names:
            if method in self.unavailable:
                continue
            try:
                reranker = (self.reranker(method) if self.jobs is None
                            else self.fitted(method))
                if reranker is not None and reranker.gallery_embeddings() is not None:
                    spaces.append((method, f"{method_title(method)} embeddings"))
            except EngineError:
                continue
        return spaces

    def _space_features(self, space: str) -> np.ndarray:
        if space == "backbone":
            return self.gallery.features
        embeddings = self.reranker(space).gallery_embeddings()
        if embeddings is None:
            raise InvalidInputError(f"{space} has no embedding space of its own")
        return embeddings

    def embedding_map(self, space: str = "backbone", progress: ProgressCallback | None = None,
                      fit: bool = True) -> EmbeddingMap | None:
        """The 2-D map of a feature space (fitted once per gallery and cached on disk); with
        fit=False, None when it has not been computed yet (never waiting for a fit)."""
        found = self._maps.get(space)
        if found is not None:
            return found
        key = fingerprint([self.gallery.fingerprint, space, self._space_key(space)])
        found = EmbeddingMap.load(self.gallery.cache_dir, space, key)
        if found is None and fit:
            with self._map_lock:  # one fit at a time; readers do not take this lock
                found = self._maps.get(space) or EmbeddingMap.load_or_fit(
                    self._space_features(space), self.gallery.cache_dir, space, key,
                    progress=progress)
        if found is not None:
            found = self._maps.setdefault(space, found)
        return found

    def _space_key(self, space: str) -> Any:
        return None if space == "backbone" else self.params_for(space)[0]

    def query_map_position(self, result: QueryResult, space: str = "backbone"
                           ) -> np.ndarray | None:
        """The query's 2-D position on a map: its own point for a gallery pick, else projected
        with the map's `transform`."""
        layout = self.embedding_map(space, fit=False)
        if layout is None:
            return None
        if result.source_row is not None:
            return layout.coordinates[result.source_row]
        feature = result.feature[None, :]
        if space != "backbone":
            feature = self.reranker(space).query_embeddings(feature)
        return layout.transform(feature)[0]

    # -- gallery browsing ------------------------------------------------------------------------
    def position_of(self, file: str) -> int:
        """Gallery row of a relative file name; unknown names raise InvalidInputError."""
        try:
            return self._positions[file]
        except KeyError:
            raise InvalidInputError(
                f"{file!r} is not an image of the gallery {self.gallery.root.name}") from None

    def label_of_class(self, class_name: str | None) -> int | None:
        if not class_name:
            return None
        try:
            return self.gallery.class_names.index(class_name)
        except ValueError:
            raise InvalidInputError(f"{class_name!r} is not a class of this gallery; classes: "
                                    f"{', '.join(self.gallery.class_names)}") from None

    def rows_of_class(self, class_name: str | None) -> np.ndarray:
        """Gallery rows of a class (all rows when no class is given)."""
        label = self.label_of_class(class_name)
        if label is None or self.gallery.labels is None:
            return np.arange(self.gallery.size)
        return np.flatnonzero(self.gallery.labels == label)

    def example_files(self, limit: int = MAX_EXAMPLES) -> list[str]:
        """Gallery files to offer as example queries: those of `examples.txt` in the gallery
        folder (names relative to it or to its `images/` sub-folder), else the first file of each
        class, else the first files."""
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

    # -- one query -------------------------------------------------------------------------------
    def rank(self, method: str, feature: np.ndarray, source_row: int | None, leave_out: bool,
             params: Mapping[str, Any] | None = None) -> Ranking:
        """One method's ranking of one query, without per-query scores (see `score`).

        A gallery pick left out of its own results takes its row of the method's leave-one-out
        run (up to `FULL_RANKING_LIMIT` images; above, it is ranked online and its own image
        dropped). Anything else is ranked online against the fitted gallery.
        """
        drop = source_row if leave_out else None
        depth = self.depth(leave_one_out=drop is not None)
        if method == BASELINE:
            validated, source, title = {}, "", BASELINE_TITLE
        else:
            validated, source = self.resolve(method, params)
            title = method_title(method)
        rankings = None
        if drop is not None and self.full_rankings and not self.asymmetric:
            rankings = self.leave_one_out(method, validated, wait=self.jobs is None)
        if rankings is not None:
            per_query = rankings.seconds / self.gallery.size
            return Ranking(method, title, rankings.indices[drop], rankings.distances[drop],
                           per_query, "leave-one-out", validated, source,
                           rankings.details_of(drop))
        fetch = min(depth + (drop is not None), self.gallery.size)
        started = time.perf_counter()
        if method == BASELINE:
            result = self.gallery.search(feature[None, :], fetch)
        else:
            result = self.reranker(method, validated).rerank(feature[None, :], fetch,
                                                             mode="online")
        seconds = time.perf_counter() - started
        indices, distances = result.indices[0], result.distances[0]
        if drop is not None:
            keep = indices != drop
            indices, distances = indices[keep], distances[keep]
        return Ranking(method, title, indices[:depth].astype(np.int64),
                       distances[:depth].astype(np.float32), seconds, "online", validated, source,
                       dict(result.details))

    def score(self, ranking: Ranking, query_label: int | None, n_positives: int | None,
              top_n: int) -> Ranking:
        """The ranking with its hits, AP and precision@top_n filled in (when the class is known)."""
        if query_label is None or self.gallery.labels is None or not n_positives:
            return ranking
        relevant = self.gallery.labels[ranking.indices] == query_label
        ap = float(average_precision(relevant, n_positives))
        precision = float(relevant[:top_n].mean()) if top_n else None
        return dataclasses.replace(ranking, relevant=relevant, ap=ap, precision=precision)


class Explorer:
    """The backbone and every open gallery of the process.

    allowed_roots: folders under which `open_folder` may open galleries (server paths typed in
    the page); uploaded zips are extracted under the cache root.
    jobs: where slow work runs (see `GallerySession.schedule`); None computes it on first use.
    """

    def __init__(self, extractor: FeatureExtractor, *, device: str = "auto",
                 cache_root: str | os.PathLike | None = None,
                 allowed_roots: Sequence[str | os.PathLike] | None = None,
                 methods: Sequence[str] | None = None, ssp_config: Any = None,
                 jobs: JobQueue | None = None) -> None:
        self.extractor = extractor
        self.jobs = jobs
        self.device = device
        self.ssp_config = ssp_config
        """SSPConfig of the asymmetric query model (None: the engine's default recipe)."""
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()
        self.allowed_roots = [Path(root).expanduser().resolve() for root in (
            allowed_roots if allowed_roots is not None else default_allowed_roots())]
        self.method_names = methods
        self.galleries: dict[str, GallerySession] = {}
        self._lock = threading.Lock()
        self._variant_locks: dict[str, threading.Lock] = {}
        self._open_locks: dict[Path, threading.Lock] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike = DEMO_GALLERY, *, device: str = "auto",
             cache_root: str | os.PathLike | None = None,
             progress: ProgressCallback | None = None,
             allowed_roots: Sequence[str | os.PathLike] | None = None,
             methods: Sequence[str] | None = None, jobs: JobQueue | None = None) -> Explorer:
        """The explorer with its first gallery open (indexed, or loaded from its cache; with
        `jobs`, the rest of its preparation queued there)."""
        explorer = cls(get_extractor(device=device), device=device, cache_root=cache_root,
                       allowed_roots=allowed_roots, methods=methods, jobs=jobs)
        explorer.open_folder(folder, progress=progress, check_allowed=False)
        return explorer

    @property
    def thumbnail_root(self) -> Path:
        return self.cache_root / "thumbnails"

    @property
    def upload_root(self) -> Path:
        return self.cache_root / "uploads"

    @property
    def default_key(self) -> str:
        return next(iter(self.galleries))

    def choices(self) -> list[tuple[str, str]]:
        """(title, key) of every open gallery, in the order they were opened."""
        # a copy: galleries open and close in other threads
        return [(session.title, key) for key, session in list(self.galleries.items())]

    def session(self, key: str | None) -> GallerySession:
        """An open gallery by key (the first one when key is empty)."""
        if not key:
            return self.galleries[self.default_key]
        try:
            return self.galleries[key]
        except KeyError:
            raise UnknownNameError(f"no open gallery {key!r}; open it again") from None

    def with_query_model(self, key: str | None, query_model: str, *,
                         progress: ProgressCallback | None = None) -> GallerySession:
        """The gallery of `key` as `query_model` sees it (see `QUERY_MODELS`).

        "lite0" is the gallery as opened. "lite2" indexes the same folder with lite2 (once,
        cached like any gallery) and embeds queries with lite2. "ssp" searches that lite2 index
        with queries embedded by the SSP query model, trained on the gallery's images (labels
        unused) on first use and saved beside the lite2 gallery cache. Re-rankers are fitted
        here too, so the page's progress bar covers all the waiting. The new session joins the
        gallery choices.
        """
        if query_model not in QUERY_MODELS:
            raise InvalidInputError(f"no query model {query_model!r}; choose one of "
                                    f"{', '.join(QUERY_MODELS)}")
        base = self.session(self.session(key).base_key)
        spec = QUERY_MODELS[query_model]
        if spec.gallery_backbone is None:
            return base
        variant_key = f"{base.key}@{query_model}"
        with self._lock:
            gate = self._variant_locks.setdefault(variant_key, threading.Lock())
        with gate:
            if variant_key in self.galleries:
                return self.galleries[variant_key]
            gallery_extractor = get_extractor(spec.gallery_backbone, device=self.device)
            gallery = Gallery.open(base.gallery.root, extractor=gallery_extractor,
                                   cache_root=self.cache_root, progress=progress,
                                   device=self.device)
            session = GallerySession(variant_key, gallery, self.device, self.method_names,
                                     query_model=query_model, base_key=base.key,
                                     jobs=self.jobs)
            if spec.asymmetric:
                from engine.asymmetric.ssp import fit_or_load

                session.query_encoder = fit_or_load(
                    [gallery.path_of(row) for row in range(gallery.size)], gallery.state_dir,
                    gallery_features=gallery.features, gallery_meta=gallery.meta,
                    config=self.ssp_config, device=self.device, progress=progress)
            self._prepare(session, progress)
            with self._lock:
                self.galleries[variant_key] = session
            return session

    def embed_query(self, session: GallerySession, image: Any
                    ) -> tuple[np.ndarray, list[tuple[str, float]]]:
        """The query's feature in the session's gallery space, and ImageNet top-3 of the
        backbone that embedded it (none for the SSP query model, which has no classifier)."""
        if session.query_encoder is not None:
            return session.query_encoder.embed([image])[0], []
        backbone = QUERY_MODELS[session.query_model].gallery_backbone
        extractor = (self.extractor if backbone is None
                     else get_extractor(backbone, device=self.device))
        return extractor.embed_and_classify(image)

    def open_folder(self, folder: str | os.PathLike, *, progress: ProgressCallback | None = None,
                    check_allowed: bool = True) -> GallerySession:
        """Open (index, or load from cache) a gallery folder; reopening is instant.

        With `check_allowed`, the folder must lie inside one of `allowed_roots`.
        """
        if check_allowed:
            root = resolve_allowed_folder(folder, self.allowed_roots)
        else:
            root = Path(folder).expanduser().resolve()
        with self._lock:
            gate = self._open_locks.setdefault(root, threading.Lock())
        with gate:
            for session in self.galleries.values():
                if session.gallery.root == root and session.key == session.base_key:
                    return session
            gallery = Gallery.open(root, extractor=self.extractor, cache_root=self.cache_root,
                                   progress=progress, device=self.device)
            key = gallery.cache_dir.name
            session = GallerySession(key, gallery, self.device, self.method_names,
                                     jobs=self.jobs)
            self._prepare(session, progress)
            with self._lock:
                self.galleries[key] = session
            logger.info("opened gallery %s: %d images, %d classes, %d skipped", root,
                        gallery.size, len(gallery.class_names), len(gallery.skipped))
            return session

    def _prepare(self, session: GallerySession, progress: ProgressCallback | None) -> None:
        """Fit a new session's methods now, or, with a job queue, queue all its preparation."""
        if self.jobs is None:
            session.fit_defaults(progress)
        else:
            session.schedule()

    def prepare_query_model(self, key: str | None, query_model: str) -> None:
        """Queue `with_query_model` (indexing with the gallery model, training SSP) as a
        background job; its session's own preparation is queued when it opens."""
        if self.jobs is None:
            raise InvalidInputError("this explorer has no background job queue")
        base = self.session(key)
        self.jobs.submit((base.key, "query model", query_model),
                         f"Query model {QUERY_MODELS[query_model].title}",
                         lambda progress: self.with_query_model(base.key, query_model,
                                                                progress=progress))

    def open_zip(self, archive: str | os.PathLike, *,
                 progress: ProgressCallback | None = None) -> GallerySession:
        """Extract an uploaded zip (safely, content-addressed) and open it as a gallery."""
        extracted = extract_zip(archive, self.upload_root)
        for name, reason in extracted.skipped.items():
            logger.info("zip entry %s not extracted: %s", name, reason)
        return self.open_folder(extracted.root, progress=progress, check_allowed=False)

    def close(self, key: str) -> list[GallerySession]:
        """Forget an open gallery and the query-model variants opened from it (a public page
        closes a visitor's upload this way); returns them, so that the caller can delete their
        files. The first gallery, the one the page starts on, stays open. Their waiting
        background jobs are dropped (one running now finishes: see `JobQueue.running`)."""
        with self._lock:
            if key == self.default_key:
                raise InvalidInputError("the gallery the page starts on cannot be closed")
            closed = [session for name, session in self.galleries.items()
                      if name == key or session.base_key == key]
            for session in closed:
                del self.galleries[session.key]
                self._variant_locks.pop(session.key, None)
                self._open_locks.pop(session.gallery.root, None)
        if self.jobs is not None:
            keys = {session.key for session in closed} | {key}
            self.jobs.drop(lambda job_key: isinstance(job_key, tuple) and job_key[0] in keys)
        return closed

    # -- queries ---------------------------------------------------------------------------------
    def query(self, key: str | None, image: Any = None, *, source_file: str | None = None,
              query_class: str | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
              top_n: int = DEFAULT_TOP_N, leave_out: bool = True) -> QueryResult:
        """Embed one image and rank the gallery with the baseline and every method.

        Args:
            key: the gallery (empty: the first one).
            image: a path, bytes, array or PIL image; None when `source_file` is given.
            source_file: the gallery file the query is (a pick); gives the query its class.
            query_class: the class of an uploaded query, to score its rankings (optional).
            params: per method, the parameters to run (default: preset or authors' defaults).
            top_n: results shown per method; the rankings themselves go deeper (full up to
                `FULL_RANKING_LIMIT`) so that AP is over the whole ranking.
            leave_out: drop a pick's own image from its results (leave-one-out).
        """
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise InvalidInputError(f"the number of results must be a positive integer, got "
                                    f"{top_n!r}")
        _check_method_params(params)
        session = self.session(key)
        gallery = session.gallery
        source_row = None if source_file is None else session.position_of(source_file)
        if image is None:
            if source_row is None:
                raise InvalidInputError("give a query image or the name of a gallery image")
            image = gallery.path_of(source_row)
        leave_out = bool(leave_out) and source_row is not None
        if gallery.size - leave_out < 1:
            raise InvalidInputError("the gallery has no other image to return")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        feature, imagenet = self.embed_query(session, image)
        timings["embed"] = time.perf_counter() - started
        if source_row is not None:
            if not session.asymmetric:
                feature = gallery.features[source_row]  # the row every method was fitted on
            query_label = None if gallery.labels is None else int(gallery.labels[source_row])
            query_label = None if query_label is not None and query_label < 0 else query_label
        else:
            query_label = session.label_of_class(query_class)
        n_positives = None
        if query_label is not None and gallery.labels is not None:
            n_positives = int((gallery.labels == query_label).sum()) - int(
                leave_out and source_row is not None)
        query_name = None if query_label is None else gallery.class_names[query_label]
        rankings: dict[str, Ranking] = {}
        not_ready: dict[str, str] = {}
        for method, _ in session.methods():
            chosen = None if params is None else params.get(method)
            reason = session.not_ready(method, chosen)
            if reason is not None:
                not_ready[method] = reason
                continue
            ranking = session.rank(method, feature, source_row, leave_out, chosen)
            rankings[method] = session.score(ranking, query_label, n_positives, top_n)
            timings[method] = ranking.seconds
        return QueryResult(session.key, source_row, source_file, query_label, query_name,
                           n_positives, feature, imagenet, rankings, timings,
                           min(top_n, len(rankings[BASELINE].indices)), leave_out,
                           session.embedded_by, not_ready)

    def rerank(self, result: QueryResult, method: str, params: Mapping[str, Any] | None
               ) -> QueryResult:
        """The same query with one method re-run at new parameters."""
        session = self.session(result.gallery_key)
        reason = session.not_ready(method, params)
        if reason is not None:
            return result.without(method, reason)
        ranking = session.rank(method, result.feature, result.source_row, result.leave_out,
                               params)
        ranking = session.score(ranking, result.query_label, result.n_positives, result.top_n)
        return result.with_ranking(ranking)


def _check_method_params(params: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Per-method parameters must name registered methods (a misspelt name would otherwise be
    ignored silently and the method run with its defaults)."""
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise InvalidInputError(f"params must map method names to their parameters, got "
                                f"{type(params).__name__}")
    known = [BASELINE, *list_rerankers()]
    unknown = sorted(str(name) for name in params if name not in known)
    if unknown:
        raise InvalidInputError(f"params names no method {unknown}; the methods are "
                                f"{', '.join(known)}")


def default_allowed_roots() -> list[Path]:
    """Folders a gallery may be opened from when none are configured: the home folder, the
    working folder and the shipped demo gallery."""
    return [Path.home(), Path.cwd(), DEMO_GALLERY]
