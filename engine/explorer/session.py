"""`GallerySession`: one open gallery with its presets, fitted re-rankers (per parameter
setting), leave-one-out rankings, whole-gallery scores and embedding map, shared by every
request (caches fill under locks). With a job queue the slow work runs in the background.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engine.asymmetric.query_models import DEFAULT_QUERY_MODEL, QUERY_MODELS
from engine.core.jobs import CANCELLED, DONE, FAILED, Job, JobProgress, JobQueue
from engine.core.storage import fingerprint
from engine.core.threads import background_threads
from engine.errors import EngineError, InvalidInputError, JobCancelled
from engine.evaluation.metrics import average_precision
from engine.evaluation.paired import PairedComparison, paired_comparison
from engine.evaluation.revisited import (
    REVISITED_TABLE_COLUMNS,
    RevisitedCache,
    RevisitedRun,
    revisited_map,
    revisited_table,
    score_query,
)
from engine.evaluation.scores import (
    SCORE_SAMPLE,
    LeaveOneOutRankings,
    MethodScores,
    QueryAPs,
    ScoreCache,
    median_ms,
    sample_rows,
    scored_rankings,
    time_online,
    timing_queries,
    without_self,
)
from engine.evaluation.tuning import load_presets, save_preset
from engine.explorer._cache import _LruCache
from engine.explorer.results import (
    BASELINE,
    BASELINE_TITLE,
    DEFAULT_TOP_N,
    Explanation,
    Familiarity,
    QueryChanges,
    QueryResult,
    Ranking,
    method_title,
    nearest_other_similarities,
    query_similarities,
    rank_of,
    unit_query,
)
from engine.rerank import Reranker, get_reranker_class, list_rerankers
from engine.rerank.setting import MethodSetting, resolve_setting
from engine.search.gallery import DEMO_GALLERY, Gallery, ProgressCallback
from engine.views.embedding_map import EmbeddingMap

logger = logging.getLogger(__name__)

ParamsOrSetting = Mapping[str, Any] | MethodSetting | None
"""A method's parameters: a name -> value mapping, an already resolved setting, or None for
the gallery's default setting."""

MAX_EXAMPLES = 8
FULL_RANKING_LIMIT = 5000
"""Galleries up to this size get full rankings (exact AP), leave-one-out gallery picks and
Compare scores over every item; above, picks are ranked online and the Compare table scores a
fixed sample of `SCORE_SAMPLE` items, each ranked online against the rest."""
PARTIAL_DEPTH = 1000
"""Ranking depth for larger galleries (AP is then AP@1000)."""
FITTED_CACHE_SIZE = 16
LEAVE_ONE_OUT_CACHE_SIZE = 8
"""Fewest leave-one-out runs a session keeps (LRU); a session keeps at least one per method
plus the baseline's, so that every gallery pick reads a prepared run."""
MEASURE_NOW_QUERIES = 5
"""Queries `measure_online` times: a median in well under a second for every method."""


REVISITED_DEPTH = 100_000
"""The revisited Compare table ranks the whole gallery for each query (as revisitop scores) up
to this many items; a larger gallery is ranked to this depth (positives beyond it count as
misses)."""


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """Query features of a gallery opened from a features file (a query/gallery split), kept
    on its session: the page offers them as queries and, with ground truth, scores them.

    source: the queries file's name. names: Q unique item names. features: (Q, d) float32 unit
    rows in the gallery's feature space. labels: (Q,) int64 gallery labels (-1: none), or None.
    ground_truth: the revisited ground truth's file name, and `gnd` its Q per-query dicts
    ('easy', 'hard', 'junk': gallery rows, in the queries' order), or None.
    fingerprint: of the queries file and the ground truth's contents (caches key on it).
    """

    source: str
    names: list[str]
    features: np.ndarray
    labels: np.ndarray | None
    fingerprint: str
    ground_truth: str | None = None
    gnd: list[dict[str, list[int]]] | None = None

    def row_of(self, name: str) -> int:
        """The row of a query by name; an unknown name raises InvalidInputError."""
        try:
            return self.names.index(name)
        except ValueError:
            raise InvalidInputError(f"{name!r} is not a query of {self.source}") from None


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
                 base_key: str | None = None, jobs: JobQueue | None = None,
                 name: str | None = None) -> None:
        self.key = key
        self.name = name
        """What the page calls the gallery (an upload's file name); None: its folder's name."""
        self.jobs = jobs
        self.base_key = base_key or key
        self.query_model = query_model
        self.query_encoder: Any = None
        """The query model of an asymmetric session (SSP's, or a closed-form map)."""
        self.query_model_rows: Callable[..., list[MethodScores]] | None = None
        """An asymmetric session's extra Compare rows, one per query model's search:
        `(compute, progress)` -> scores (set by the explorer, which holds the query models)."""
        self.gallery = gallery
        self.device = device
        self.presets = load_presets(gallery.root, gallery.state_dir)
        self.method_names = list(list_rerankers() if methods is None else methods)
        self.unavailable: dict[str, str] = {}
        self._fitted = _LruCache(FITTED_CACHE_SIZE)
        # at least the baseline's and every method's run at one setting, which the background
        # preparation makes for gallery picks (ten with the query-expansion baselines)
        self._leave_one_out = _LruCache(max(LEAVE_ONE_OUT_CACHE_SIZE,
                                            1 + len(self.method_names)))
        self._scores = ScoreCache(gallery.cache_dir, gallery.fingerprint)
        self._maps: dict[str, EmbeddingMap] = {}
        self._map_lock = threading.Lock()
        self._estimates: dict[Any, float | None] = {}
        self._estimate_lock = threading.Lock()
        self._positions = {name: row for row, name in enumerate(gallery.files)}

    @property
    def title(self) -> str:
        gallery = self.gallery
        name = self.name or ("Oxford-17 demo" if gallery.root == DEMO_GALLERY.resolve()
                             else gallery.root.name)
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

    def setting(self, method: str, params: ParamsOrSetting = None) -> MethodSetting:
        """The setting of `method` here: `params` validated (None: the gallery's preset, else
        the authors' defaults, scaled to the gallery's size where the method says so), with its
        source. A query resolves each method's setting once
        and passes it to the calls below, which accept it in place of `params`."""
        if method == BASELINE:
            return MethodSetting(BASELINE)
        return resolve_setting(method, params, self.presets, gallery_size=self.gallery.size)

    def params_for(self, method: str) -> tuple[dict[str, Any], str]:
        """The parameters a method runs with by default here, and their source."""
        setting = self.setting(method)
        return dict(setting.params), setting.source

    def resolve(self, method: str, params: ParamsOrSetting) -> tuple[dict[str, Any], str]:
        """Validated parameters (the default setting when None) and their source; a setting
        that differs from the preset or the authors' defaults is "custom"."""
        setting = self.setting(method, params)
        return dict(setting.params), setting.source

    def reranker(self, method: str, params: ParamsOrSetting = None,
                 progress: ProgressCallback | None = None) -> Reranker:
        """The method fitted on this gallery with `params` (fitted once per setting; a method
        that learns loads its saved state or trains, reporting to `progress`)."""
        setting = self.setting(method, params)

        def build() -> Reranker:
            started = time.perf_counter()
            reranker = get_reranker_class(method)(device=self.device, **setting.params)
            reranker.fit(self.gallery.context(), progress=progress)
            logger.info("fitted %s on %s in %.2f s", method, self.key,
                        time.perf_counter() - started)
            return reranker

        return self._fitted.get(setting.key, build)

    def fit_defaults(self, progress: ProgressCallback | None = None) -> None:
        """Fit every method with its default setting; a method whose fit fails is recorded in
        `unavailable` (with the engine's message) instead of stopping the page."""
        for method in self.method_names:
            with contextlib.suppress(EngineError):
                self._fit_or_mark_unavailable(method, None, progress)

    def _fit_or_mark_unavailable(self, method: str, params: ParamsOrSetting,
                                 progress: ProgressCallback | None) -> Reranker:
        """Fit `method`; when its default setting fails, record the method as unavailable here
        (shown in its tab) before passing the error on."""
        setting = self.setting(method, params)
        try:
            return self.reranker(method, setting, progress=progress)
        except JobCancelled:  # not a failure of the method: it may be fitted again
            raise
        except Exception as error:  # recorded, then raised again: any failure of a fit counts
            logger.error("%s is unavailable on %s: %s", method, self.key, error)
            if setting.is_default:
                self.unavailable[method] = str(error) or type(error).__name__
            raise

    # -- background preparation ------------------------------------------------------------------
    def schedule(self) -> None:
        """Queue what the page needs beyond features and index, everything cheap first: the
        fits of the methods that do not learn (seconds), the backbone's embedding map, those
        methods' Compare scores (labelled galleries) and leave-one-out runs (what gallery picks
        read), the map's projection of new queries; then, for each method that learns, its fit
        (training), the map of its embedding space, its scores and its leave-one-out run. So a
        new gallery is complete but for the learned methods within seconds, and a method that
        learns never holds up the rest; `train_now` moves one to the head of the queue. Each
        piece is saved where it always is, so a restart resumes from what was done."""
        if self.jobs is None:
            raise InvalidInputError("this gallery has no background job queue")
        classes = {name: get_reranker_class(name) for name in self.method_names}
        cheap = [name for name in self.method_names if not classes[name].learns]
        learned = [name for name in self.method_names if classes[name].learns]
        for name in cheap:
            self._submit_fit(name)
        self._submit(("map", "backbone"), "Embedding map",
                     lambda progress: self.embedding_map("backbone", progress=progress))
        for method in [BASELINE, *cheap]:
            self._schedule_runs(method)
        self._submit(("map projection", "backbone"), "Embedding map projection",
                     self._warm_up_map)
        for name in learned:
            self._schedule_learned(name)

    def _schedule_learned(self, method: str) -> Job:
        """Queue a method that learns: its fit, the map of its embedding space, its scores and
        leave-one-out run (each only if not queued yet, or cancelled). Returns the fit job."""
        fit = self._submit_fit(method)
        self._submit(("map", method), f"Embedding map of {method_title(method)}",
                     functools.partial(self._learned_map, method))
        self._schedule_runs(method)
        return fit

    def _schedule_runs(self, method: str) -> None:
        """Queue `method`'s Compare scores (labelled galleries) and leave-one-out run (up to
        `FULL_RANKING_LIMIT` items: above, picks are ranked online and no whole run is made)."""
        if self.gallery.labels is not None:
            self._submit(("scores", method), f"{method_title(method)} scores",
                         functools.partial(self._scores_job, method))
        if self.full_rankings:
            self.leave_one_out(method, wait=False)

    def train_now(self, method: str) -> Job:
        """Fit (train) `method` at its default setting next: its fit job is queued if it is
        not (or was cancelled) and moved to the head of the background queue; for a method
        that learns, its map, scores and leave-one-out run are queued again too if they were
        cancelled with it. Returns the fit job (already done when the method is fitted)."""
        if self.jobs is None:
            raise InvalidInputError("this gallery has no background job queue")
        if method not in self.method_names:
            raise InvalidInputError(f"{method!r} is not a method of this gallery; its methods "
                                    f"are {', '.join(self.method_names)}")
        if get_reranker_class(method).learns:
            job = self._schedule_learned(method)
        else:
            job = self._submit_fit(method)
        self.jobs.promote(job.key)
        return job

    def fit_estimate(self, method: str) -> float | None:
        """Seconds the fit of `method` at its default setting would take here (measured
        briefly by the method, under the background thread budget the fit will run under, and
        remembered); None when the method cannot say, or when it is fitted already."""
        if method == BASELINE or self.fitted(method) is not None:
            return None
        setting = self.setting(method)
        with self._estimate_lock:
            if setting.key not in self._estimates:
                reranker = get_reranker_class(method)(device=self.device, **setting.params)
                with background_threads():
                    self._estimates[setting.key] = reranker.estimate_fit_seconds(
                        self.gallery.context())
            return self._estimates[setting.key]

    def prepare_views(self, progress: ProgressCallback | None = None) -> None:
        """Without a job queue, compute now what `schedule` would queue for the page's views:
        every map space, and every method's Compare scores on a labelled gallery. With a queue
        there is nothing to do here (it was queued when the gallery opened)."""
        if self.jobs is not None:
            return
        for space, _ in self.map_spaces():
            self.embedding_map(space, progress=progress)
        if self.gallery.labels is not None:
            methods = self.methods()
            for index, (method, title) in enumerate(methods):
                if progress is not None:
                    progress(index / len(methods), f"scoring {title}")
                self.scores(method)

    def _warm_up_map(self, progress: JobProgress) -> None:
        """Load the map's model and compile its `transform` (numba), so that the first upload
        is placed on the map without paying for it."""
        layout = self.embedding_map("backbone", fit=False)
        if layout is not None:
            layout.warm_up()

    def _submit(self, what: tuple[Any, ...], title: str, work: Callable[[JobProgress], Any]
                ) -> Job:
        assert self.jobs is not None
        return self.jobs.submit((self.key, *what), title, work)

    @staticmethod
    def _fit_job_key(setting: MethodSetting) -> tuple[Any, ...]:
        return ("fit", setting.method, setting.key[1])

    def fit_job(self, method: str, params: ParamsOrSetting = None) -> Job | None:
        """The background job fitting `method` here with `params` (default: its default
        setting), None when there is none (no job queue, or never queued)."""
        if self.jobs is None:
            return None
        return self.jobs.get((self.key, *self._fit_job_key(self.setting(method, params))))

    def _submit_fit(self, method: str, params: ParamsOrSetting = None) -> Job:
        setting = self.setting(method, params)
        return self._submit(self._fit_job_key(setting), method_title(method),
                            lambda progress: self._fit_or_mark_unavailable(
                                method, setting, progress))

    def _learned_map(self, method: str, progress: JobProgress) -> EmbeddingMap | None:
        self._check_fit_not_cancelled(method, self.setting(method))
        if method in self.unavailable or self.fitted(method) is None:
            return None
        if self.reranker(method).gallery_embeddings() is None:
            return None
        return self.embedding_map(method, progress=progress)

    def _scores_job(self, method: str, progress: JobProgress) -> MethodScores | None:
        if method in self.unavailable:
            return None
        self._check_fit_not_cancelled(method, self.setting(method))
        progress(0.0, "scoring every image against the others" if self.full_rankings
                 else f"scoring a sample of {min(SCORE_SAMPLE, self.gallery.size)} images")
        return self.scores(method, progress=progress)

    def _check_fit_not_cancelled(self, method: str, setting: MethodSetting) -> None:
        """Work that needs a method that learns, fitted at `setting`, is cancelled too when
        that fit's job was cancelled (rather than train it after all); `train_now` queues
        them all again."""
        if method == BASELINE or self.jobs is None or not get_reranker_class(method).learns:
            return
        if self.fitted(method, setting) is not None:
            return
        job = self.fit_job(method, setting)
        if job is not None and job.state == CANCELLED:
            raise JobCancelled(f"the training of {method_title(method)} was cancelled")

    def fitted(self, method: str, params: ParamsOrSetting = None) -> Reranker | None:
        """The method fitted with `params` if it is in memory now, else None (never fits)."""
        return self._fitted.peek(self.setting(method, params).key)

    def not_ready(self, method: str, params: ParamsOrSetting = None) -> str | None:
        """Why `method` cannot answer a query at once, or None when it can (fitted, or cheap
        to fit now, or there is no job queue).

        A method whose fit at this setting is queued or running is not ready (its job's state
        says how far it is); so is a method that learns at a setting never fitted (its
        training is queued now). A failed fit raises its error again.
        """
        if method == BASELINE or self.jobs is None:
            return None
        setting = self.setting(method, params)
        if self.fitted(method, setting) is not None:
            return None
        job = self.fit_job(method, setting)
        if job is None:
            if not get_reranker_class(method).learns:
                return None
            job = self._submit_fit(method, setting)
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
        job = self.fit_job(method)
        if job is not None and self.fitted(method) is None:
            described = self.jobs.describe(job.key)
            text = text if described is None or described.endswith(": ready") else described
        if self.jobs is not None:
            failed = [job.describe() for job in self.jobs.jobs()
                      if job.state == FAILED and job.key[0] == self.key
                      and job.key[1] != "fit" and method in job.key[2:3]]
            text = " · ".join([text, *failed])
        return text

    def save_preset(self, method: str, params: Mapping[str, Any], note: str = "") -> dict:
        """Store `params` as this gallery's preset for `method` (beside the gallery cache)."""
        self.setting(method, params)  # unknown names and out-of-range values: a typed error
        stored = save_preset(self.gallery.state_dir, method, params, note)
        self.presets = load_presets(self.gallery.root, self.gallery.state_dir)
        return stored

    # -- whole-gallery runs ----------------------------------------------------------------------
    def depth(self, leave_one_out: bool) -> int:
        available = self.gallery.size - (1 if leave_one_out else 0)
        return available if self.full_rankings else min(PARTIAL_DEPTH, available)

    def leave_one_out(self, method: str, params: ParamsOrSetting = None, *,
                      wait: bool = True) -> LeaveOneOutRankings | None:
        """Every gallery item's ranking of the others by `method` (batch mode), cached.

        With wait=False: the run if it is made, else None (and, with a job queue, the run is
        queued there)."""
        if self.gallery.size < 2:
            raise InvalidInputError("a leave-one-out ranking needs at least 2 gallery images")
        depth = self.depth(leave_one_out=True)
        setting: MethodSetting | None = None
        if method == BASELINE:
            key: tuple[Any, ...] = (BASELINE,)

            def build() -> LeaveOneOutRankings:
                started = time.perf_counter()
                result = self.gallery.search(self.gallery.features, depth + 1)
                distances, indices = without_self(result.distances, result.indices, depth)
                return LeaveOneOutRankings(indices, distances, time.perf_counter() - started)
        else:
            setting = self.setting(method, params)
            key = setting.key

            def build() -> LeaveOneOutRankings:
                reranker = self.reranker(method, setting)
                started = time.perf_counter()
                result = reranker.rerank(None, depth)
                return LeaveOneOutRankings(result.indices, result.distances,
                                           time.perf_counter() - started, dict(result.details))

        if not wait:
            found = self._leave_one_out.peek(key)
            if found is None and self.jobs is not None:
                self._submit(("leave-one-out", *key), f"{method_title(method)} leave-one-out",
                             functools.partial(self._leave_one_out_job, method, setting, key,
                                               build))
            return found
        return self._leave_one_out.get(key, build)

    def _leave_one_out_job(self, method: str, setting: MethodSetting | None,
                           key: tuple[Any, ...], build: Callable[[], LeaveOneOutRankings],
                           progress: JobProgress) -> LeaveOneOutRankings | None:
        if method in self.unavailable:
            return None
        if setting is not None:
            self._check_fit_not_cancelled(method, setting)
        return self._leave_one_out.get(key, build)

    def scores(self, method: str, params: ParamsOrSetting = None,
               cached_only: bool = False, progress: ProgressCallback | None = None
               ) -> MethodScores | None:
        """Leave-one-out mAP (with its 95 % bootstrap interval), P@1, P@5 and online ms/query
        of a method (disk-cached): over every gallery item up to `FULL_RANKING_LIMIT`, above
        over `score_sample`'s fixed sample, each ranked online against the rest; for a method,
        also its difference from the baseline on the same queries (paired interval and
        randomisation p-value, `engine.evaluation.paired`). Each query's AP is kept beside
        (`query_aps`).

        With `cached_only`, returns None instead of computing missing scores (and cached
        scores from before the per-query APs were kept, without their difference); computing
        replaces those.
        """
        setting = self.setting(method, params)
        validated = dict(setting.params)
        stored = self._scores.get(method, validated)
        if stored is not None and (cached_only or self._scores_complete(stored)):
            return stored
        if cached_only:
            return None
        online = time_online(self._rank_one(method, setting),
                             timing_queries(self.gallery.features))
        if self.full_rankings:
            rankings = self.leave_one_out(method, setting)
            scores, aps = scored_rankings(method, validated, rankings, self.gallery.labels,
                                          online)
        else:
            rows = self.score_sample
            rankings = self._sampled_rankings(method, setting, rows, progress)
            scores, aps = scored_rankings(method, validated, rankings, self.gallery.labels,
                                          online, query_rows=rows,
                                          gallery_size=self.gallery.size)
        if aps is not None and method != BASELINE:
            baseline = self.query_aps(BASELINE)
            if baseline is not None and np.array_equal(baseline.rows, aps.rows):
                compared = paired_comparison(aps.ap, baseline.ap)
                scores = dataclasses.replace(
                    scores, delta=compared.difference, delta_low=compared.low,
                    delta_high=compared.high, p_value=compared.p_value,
                    permutations=compared.permutations)
        self._scores.put(scores, aps)
        return scores

    def _scores_complete(self, stored: MethodScores) -> bool:
        """Whether cached scores have what this version adds: per-query APs and, for a
        method, its difference from the baseline (scores without labels have neither)."""
        if not np.isfinite(stored.map):
            return True
        if self._scores.aps(stored.method, stored.params) is None:
            return False
        return stored.method == BASELINE or stored.p_value is not None

    def query_aps(self, method: str, params: ParamsOrSetting = None,
                  cached_only: bool = False) -> QueryAPs | None:
        """Each scored query's AP for `method` (the queries of its Compare row: every gallery
        item or the fixed sample), scoring it first unless `cached_only`; None without labels
        (or, with `cached_only`, before it is scored)."""
        setting = self.setting(method, params)
        if self.scores(method, setting, cached_only=cached_only) is None:
            return None
        return self._scores.aps(method, dict(setting.params))

    def paired(self, first: str, second: str = BASELINE,
               params: Mapping[str, ParamsOrSetting] | None = None) -> PairedComparison:
        """Method `first` against `second` on the Compare table's queries (paired bootstrap
        interval of the mAP difference and randomisation p-value, unadjusted), from their
        cached per-query APs. Raises InvalidInputError until both are scored."""
        aps = []
        for method in (first, second):
            chosen = None if params is None or method == BASELINE else params.get(method)
            found = self.query_aps(method, chosen, cached_only=True)
            if found is None:
                raise InvalidInputError(
                    f"{method_title(method)} has no per-query scores on this gallery yet: "
                    "compute the Compare table first")
            aps.append(found)
        if not np.array_equal(aps[0].rows, aps[1].rows):
            raise InvalidInputError("the two methods were scored on different queries")
        return paired_comparison(aps[0].ap, aps[1].ap)

    def query_changes(self, method: str, params: ParamsOrSetting = None,
                      class_name: str | None = None) -> QueryChanges:
        """Each scored query's AP under the baseline and under `method` (leave-one-out, the
        Compare table's queries), largest loss first; only the class `class_name`'s queries
        when given. Queries without positives are left out. Raises InvalidInputError until
        both are scored (cached)."""
        before = self.query_aps(BASELINE, cached_only=True)
        after = self.query_aps(method, params, cached_only=True)
        if before is None or after is None:
            missing = method_title(BASELINE if before is None else method)
            raise InvalidInputError(f"{missing} has no per-query scores on this gallery yet: "
                                    "they come with its Compare row")
        if not np.array_equal(before.rows, after.rows):
            raise InvalidInputError("the baseline and the method were scored on different "
                                    "queries")
        keep = np.isfinite(before.ap) & np.isfinite(after.ap)
        if class_name is not None:
            label = self.label_of_class(class_name)
            keep &= self.gallery.labels[before.rows] == label
        rows, ap_before, ap_after = before.rows[keep], before.ap[keep], after.ap[keep]
        order = np.lexsort((rows, ap_after - ap_before))
        return QueryChanges(method, rows[order], ap_before[order], ap_after[order])

    def class_changes(self, method: str, params: ParamsOrSetting = None
                      ) -> list[tuple[str, int, float, float]]:
        """Per class: (class name, queries, mAP under the baseline, mAP under `method`) over the
        Compare table's queries, the class the method hurts most first."""
        changes = self.query_changes(method, params)
        labels = self.gallery.labels[changes.rows]
        names = self.gallery.class_names
        found = []
        for label in np.unique(labels):
            members = labels == label
            name = names[label] if 0 <= label < len(names) else str(label)
            found.append((name, int(members.sum()), float(changes.before[members].mean()),
                          float(changes.after[members].mean())))
        return sorted(found, key=lambda entry: (entry[3] - entry[2], entry[0]))

    @functools.cached_property
    def score_sample(self) -> np.ndarray:
        """The gallery rows a large gallery's Compare table is scored on: `SCORE_SAMPLE` fixed
        random rows (seeded by the gallery's fingerprint)."""
        return sample_rows(self.gallery.size, SCORE_SAMPLE, self.gallery.fingerprint)

    def _sampled_rankings(self, method: str, setting: MethodSetting, rows: np.ndarray,
                          progress: ProgressCallback | None) -> LeaveOneOutRankings:
        """Each sampled gallery item's ranking of the others: `rank` of it as a gallery pick
        left out (online against the fitted gallery, its own row dropped)."""
        rankings = []
        started = time.perf_counter()
        for done, row in enumerate(rows):
            rankings.append(self.rank(method, self.gallery.features[row], int(row), True,
                                      setting))
            if progress is not None and done % 25 == 0:
                progress(done / len(rows), f"scoring sampled image {done + 1}/{len(rows)}")
        return LeaveOneOutRankings(np.stack([ranking.indices for ranking in rankings]),
                                   np.stack([ranking.distances for ranking in rankings]),
                                   time.perf_counter() - started)

    def _rank_one(self, method: str, setting: MethodSetting) -> Callable[[np.ndarray], Any]:
        """What the online timing times: one (1, d) query ranked online, top `DEFAULT_TOP_N`."""
        k = min(DEFAULT_TOP_N, self.gallery.size)
        if method == BASELINE:
            return lambda query: self.gallery.search(query, k)
        reranker = self.reranker(method, setting)
        return lambda query: reranker.rerank(query, k, mode="online")

    def measure_online(self, method: str, params: ParamsOrSetting = None) -> float:
        """Median ms of one online query of `method` measured now, for a "measure now" button
        beside the Compare table's (maybe old, maybe busy) timing: the same measurement on
        `MEASURE_NOW_QUERIES` gallery rows. Nothing is stored. A method whose fit is not done
        yet raises InvalidInputError (with its job's state) instead of waiting for it."""
        setting = self.setting(method, params)
        reason = self.not_ready(method, setting)
        if reason is not None:
            raise InvalidInputError(f"{method_title(method)} is not ready to be timed: {reason}")
        queries = timing_queries(self.gallery.features, MEASURE_NOW_QUERIES)
        return median_ms(self._rank_one(method, setting), queries)

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
             params: ParamsOrSetting = None) -> Ranking:
        """One method's ranking of one query, without per-query scores (see `score`).

        A gallery pick left out of its own results takes its row of the method's leave-one-out
        run (up to `FULL_RANKING_LIMIT` images; above, it is ranked online and its own image
        dropped). Anything else is ranked online against the fitted gallery.
        """
        drop = source_row if leave_out else None
        depth = self.depth(leave_one_out=drop is not None)
        setting = self.setting(method, params)
        validated, source, title = dict(setting.params), setting.source, method_title(method)
        rankings = None
        if drop is not None and self.full_rankings and not self.asymmetric:
            rankings = self.leave_one_out(method, setting, wait=self.jobs is None)
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
            result = self.reranker(method, setting).rerank(feature[None, :], fetch,
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
              top_n: int, feature: np.ndarray | None = None) -> Ranking:
        """The ranking with its hits, AP and precision@top_n filled in (when the class is
        known), and, given the query's (d,) `feature` (in the gallery's space), the cosine
        similarity of its first top_n results (`Ranking.similarities`)."""
        similarities = None
        if feature is not None:
            similarities = query_similarities(feature, self.gallery.features,
                                              ranking.indices[:top_n])
        if query_label is None or self.gallery.labels is None or not n_positives:
            return dataclasses.replace(ranking, similarities=similarities)
        relevant = self.gallery.labels[ranking.indices] == query_label
        ap = float(average_precision(relevant, n_positives))
        precision = float(relevant[:top_n].mean()) if top_n else None
        return dataclasses.replace(ranking, relevant=relevant, ap=ap, precision=precision,
                                   similarities=similarities)

    @functools.cached_property
    def usual_nearest(self) -> np.ndarray:
        """(G,) each gallery item's cosine similarity to its nearest other item, read once from
        the gallery's kNN graph (what `familiarity` compares a query with)."""
        return nearest_other_similarities(self.gallery.knn)

    def familiarity(self, feature: np.ndarray, source_row: int | None, leave_out: bool,
                    nearest_row: int | None = None) -> Familiarity | None:
        """How close the query's (d,) `feature` is to the gallery, against how close gallery
        items are to each other (see `Familiarity`): its nearest item is `nearest_row` (the
        baseline ranking's first, when the caller has it) or found by the index, the pick's
        own row skipped when it is left out. None for a one-image gallery."""
        usual = self.usual_nearest
        if usual.size == 0:
            return None
        drop = source_row if leave_out else None
        row = nearest_row
        if row is None:
            query = unit_query(feature).astype(np.float32)[None, :]
            found = self.gallery.search(query, min(self.gallery.size, 1 + (drop is not None)))
            row = next(int(row) for row in found.indices[0] if row != drop)
        nearest = float(query_similarities(feature, self.gallery.features, np.array([row]))[0])
        return Familiarity.of(nearest, row, usual)

    def explain(self, result: QueryResult, method: str, item: int,
                params: ParamsOrSetting = None) -> Explanation:
        """Why `method` put gallery row `item` where it is for `result`'s query: the fitted
        re-ranker's `Reranker.explain` of the query's feature as ranked (`result.feature`, in
        the gallery's space), with the item's place in the method's and the baseline's
        rankings of `result`. `params`: None for the setting that made the shown ranking (the
        default setting when there is none). A method not fitted yet at that setting raises
        InvalidInputError with its job's state instead of waiting; so do the baseline (it
        re-ranks nothing) and a method unavailable here."""
        if result.gallery_key != self.key:
            raise InvalidInputError(f"the result is of gallery {result.gallery_key!r}, not of "
                                    f"{self.key!r}")
        if method == BASELINE:
            raise InvalidInputError("the baseline re-ranks nothing: only a method's results "
                                    "have evidence")
        title = method_title(method)
        if method in self.unavailable:
            raise InvalidInputError(f"{title} is unavailable on this gallery: "
                                    f"{self.unavailable[method]}")
        shown = result.rankings.get(method)
        setting = self.setting(method, shown.params if params is None and shown is not None
                               else params)
        reason = self.not_ready(method, setting)
        if reason is not None:
            raise InvalidInputError(f"{title} is not ready to explain its results: {reason}")
        evidence = self.reranker(method, setting).explain(result.feature, item)
        baseline = result.rankings.get(BASELINE)
        depth = len((shown or baseline).indices) if (shown or baseline) is not None else 0
        return Explanation(evidence, None if shown is None else rank_of(shown, item),
                           None if baseline is None else rank_of(baseline, item), depth)

    # -- query features and the revisited protocol -----------------------------------------------
    query_set: QuerySet | None = None
    """The query features of a features gallery (`Explorer.open_features(queries=...)`), or
    None: then its queries are its own items."""
    _revisited_cache: RevisitedCache | None = None

    def attach_queries(self, query_set: QuerySet) -> None:
        """Keep `query_set` (checked by the explorer) as this gallery's queries; with ground
        truth and a job queue, queue the revisited Compare table's runs."""
        self.query_set = query_set
        self._revisited_cache = RevisitedCache(self.gallery.cache_dir, self.gallery.fingerprint,
                                               query_set.fingerprint)
        if query_set.gnd is not None and self.jobs is not None:
            self.schedule_revisited()

    @property
    def revisited_ready(self) -> bool:
        """Whether this gallery has query features with revisited ground truth (the Compare
        table is then the revisited one)."""
        return self.query_set is not None and self.query_set.gnd is not None

    def revisited(self, method: str, params: ParamsOrSetting = None, cached_only: bool = False,
                  progress: ProgressCallback | None = None) -> RevisitedRun | None:
        """The revisited protocol's scores of `method` (Easy/Medium/Hard mAP and mP@1/5/10,
        `revisited_map`, as `python -m engine.bench --queries --gnd` computes them): every
        query ranked against the whole gallery (up to `REVISITED_DEPTH`) in batch mode by the
        method fitted here, the baseline by the gallery's index; cached on disk per gallery,
        query set, method and parameters. With `cached_only`, None instead of computing."""
        if not self.revisited_ready:
            raise InvalidInputError(
                "this gallery has no query features with revisited ground truth; open it with "
                "queries and a ground-truth file (launch.py --features-queries "
                "--ground-truth)")
        assert self.query_set is not None and self.query_set.gnd is not None
        setting = self.setting(method, params)
        validated = dict(setting.params)
        store = self._revisited_cache
        assert store is not None
        stored = store.get(method, validated)
        if stored is not None or cached_only:
            return stored
        queries = np.ascontiguousarray(self.query_set.features, np.float32)
        k = min(self.gallery.size, REVISITED_DEPTH)
        if progress is not None:
            progress(0.0, f"ranking {len(queries)} queries with {method_title(method)}")
        if method == BASELINE:
            started = time.perf_counter()
            indices = self.gallery.search(queries, k).indices
        else:
            reranker = self.reranker(method, setting)
            started = time.perf_counter()
            indices = reranker.rerank(queries, k).indices
        seconds = time.perf_counter() - started
        run = RevisitedRun(method, validated, revisited_map(indices, self.query_set.gnd),
                           seconds)
        store.put(run)
        return run

    def schedule_revisited(self) -> None:
        """Queue the revisited Compare table's runs: the baseline, then each method (those
        that learn after their fit, which `schedule` queued first). Keyed by the query set,
        so that another one attached later is scored too."""
        if self.jobs is None:
            raise InvalidInputError("this gallery has no background job queue")
        assert self.query_set is not None
        for method, title in self.methods():
            self._submit(("revisited", method, self.query_set.fingerprint),
                         f"{title} revisited scores",
                         functools.partial(self._revisited_job, method))

    def _revisited_job(self, method: str, progress: JobProgress) -> RevisitedRun | None:
        if method in self.unavailable or not self.revisited_ready:
            return None
        self._check_fit_not_cancelled(method, self.setting(method))
        return self.revisited(method, progress=progress)

    def score_ground_truth(self, ranking: Ranking, query_row: int, top_n: int) -> Ranking:
        """A query-set query's ranking scored by its revisited ground truth, Medium protocol
        (`score_query`: AP with junk removed, this query's term in the table's Medium mAP),
        precision over the first `top_n` places once junk is removed, hits as relevance and
        the junk flagged (`Ranking.junk`)."""
        assert self.query_set is not None and self.query_set.gnd is not None
        scored = score_query(ranking.indices, self.query_set.gnd[query_row], "medium", top_n)
        ap = None if not np.isfinite(scored.ap) else scored.ap
        return dataclasses.replace(ranking, relevant=scored.hits, junk=scored.junk, ap=ap,
                                   precision=None if ap is None else scored.precision)

    def revisited_rows(self, params: Mapping[str, ParamsOrSetting] | None = None,
                       compute: bool = False, progress: ProgressCallback | None = None
                       ) -> tuple[list[str], list[list[Any]]]:
        """The revisited Compare table: its headers and a row per method (the baseline and
        every available method; `params` per method, default their setting) with a run
        (cached ones; all of them, computed now, with `compute`)."""
        runs = self._per_method(self.revisited, "revisited scores of", params, compute,
                                progress)
        return list(REVISITED_TABLE_COLUMNS), revisited_table(runs, dict(self.methods()),
                                                              baseline=BASELINE)

    def scores_rows(self, params: Mapping[str, ParamsOrSetting] | None = None,
                    compute: bool = False, progress: ProgressCallback | None = None
                    ) -> list[MethodScores]:
        """The Compare table's scores, one per method with scores (the baseline and every
        available method; `params` per method, default their setting): cached ones, or all
        of them, computed now, with `compute`. Under an asymmetric query model, then a row per
        query model's search (`query_model_rows`)."""
        rows = self._per_method(self.scores, "scoring", params, compute, progress)
        if self.query_model_rows is not None:
            rows += self.query_model_rows(compute, progress)
        return rows

    def _per_method(self, run: Callable[..., Any], doing: str,
                    params: Mapping[str, ParamsOrSetting] | None, compute: bool,
                    progress: ProgressCallback | None) -> list[Any]:
        """`run(method, setting, cached_only=...)` of every method, those that gave one."""
        found = []
        methods = self.methods()
        for index, (method, title) in enumerate(methods):
            if progress is not None:
                progress(index / len(methods), f"{doing} {title}")
            chosen = None if params is None or method == BASELINE else params.get(method)
            result = run(method, chosen, cached_only=not compute)
            if result is not None:
                found.append(result)
        return found
