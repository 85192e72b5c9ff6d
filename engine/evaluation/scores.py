"""Scoring a method: the one pipeline the benchmark, the sweeps and the Compare table share
(`split_context` -> fit -> `run_split` / `score_split`), and whole-gallery scores, every gallery
item a query against the rest.

The explorer's Compare table and its per-query numbers for gallery picks come from here, so the
AP a user sees for one picked image is exactly that image's term in the table's mAP. Scores are
cached as JSON beside the gallery cache, keyed on the gallery fingerprint, the method and its
parameters, so they are computed once per gallery and setting.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.knn import knn_graph
from engine.core.storage import atomic_save_npz, atomic_write_json, fingerprint, load_json
from engine.core.types import GalleryContext, RerankResult, TrainingSet
from engine.errors import CacheError, InvalidInputError
from engine.evaluation.metrics import RetrievalScores, evaluate
from engine.evaluation.paired import (
    BOOTSTRAP_RESAMPLES,
    bootstrap_interval,
    holm_adjusted_by_key,
)
from engine.evaluation.protocols import Split, leave_one_out

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.json"
PER_QUERY_FOLDER = "per-query"
ONLINE_TIMING_QUERIES = 20
SCORE_SAMPLE = 500
"""Queries a gallery too large for whole leave-one-out runs is scored on (a fixed random
sample; each a query against the rest): the mAP's 95 % interval is then about +-0.02."""
UNKNOWN = "unknown"
"""What the table shows for a timing whose conditions were not recorded (scores cached before
they were)."""


def split_context(features: np.ndarray, labels: np.ndarray, split: Split, *,
                  knn_depth: int | None = None, offer_training: bool = True,
                  state_dir: Path | None = None) -> tuple[GalleryContext, np.ndarray | None]:
    """What a method is fitted on for a split, and the split's queries (None: leave-one-out).

    The gallery's labels go to `fit` only as a class count (SGRR's number of clusters); no
    method trains on them. With `offer_training`, a protocol that holds training items out
    offers them (with labels) to the methods that learn. With `knn_depth`, the gallery's kNN
    graph is computed once here, for every method fitted on the context (a sweep's trials).
    """
    gallery = np.ascontiguousarray(features[split.gallery_rows])
    training = None
    if offer_training and split.training_rows is not None:
        training = TrainingSet(features[split.training_rows], labels[split.training_rows],
                               f"the {split.name} training items ({len(split.training_rows)})")
    context = GalleryContext(gallery, knn=None if knn_depth is None else knn_graph(gallery,
                                                                                  knn_depth),
                             labels=labels[split.gallery_rows], training=training,
                             state_dir=state_dir)
    return context, (None if split.leave_one_out else features[split.query_rows])


def sample_rows(size: int, count: int, seed_text: str) -> np.ndarray:
    """A fixed random sample of `count` rows of `size` (all rows when fewer), ascending, seeded
    by `seed_text` (the gallery's fingerprint): the same queries every time for one gallery."""
    if count >= size:
        return np.arange(size, dtype=np.int64)
    seed = int(fingerprint([seed_text, "score sample"])[:12], 16)
    return np.sort(np.random.default_rng(seed).choice(size, count, replace=False)).astype(
        np.int64)


def score_split(indices: np.ndarray, split: Split, labels: np.ndarray,
                ks: Sequence[int] = (1, 5)) -> RetrievalScores:
    """mAP and precision@ks of rankings of the split's queries (rows of `indices` in the
    split's query order, gallery indices within the split's gallery)."""
    return evaluate(indices, split.query_labels(labels), labels[split.gallery_rows], ks=ks,
                    n_positives=split.n_positives)


@dataclass(frozen=True)
class SplitRun:
    """A fitted method's batch rankings of a split's queries, their time and their scores."""

    result: RerankResult
    seconds: float
    scores: RetrievalScores


def run_split(reranker: Any, split: Split, labels: np.ndarray, queries: np.ndarray | None,
              k: int | None = None, ks: Sequence[int] = (1, 5)) -> SplitRun:
    """Rank the split's queries with a fitted method (batch mode), timed, and score them."""
    started = time.perf_counter()
    result = reranker.rerank(queries, k)
    seconds = time.perf_counter() - started
    return SplitRun(result, seconds, score_split(result.indices, split, labels, ks))


@dataclass(frozen=True)
class LeaveOneOutRankings:
    """Each gallery item's ranking of the other items: (G, depth) indices and distances, and
    the method's details (arrays with one row per query, e.g. ICFRR's iteration history)."""

    indices: np.ndarray
    distances: np.ndarray
    seconds: float
    details: Mapping[str, Any] = field(default_factory=dict)

    def details_of(self, row: int) -> dict[str, Any]:
        """The details of one query: its row of every per-query array, and the run's text
        notes (what a learned method learned from, say)."""
        size = len(self.indices)
        rows = {name: value[row] for name, value in self.details.items()
                if isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == size}
        notes = {name: value for name, value in self.details.items() if isinstance(value, str)}
        return {**notes, **rows}


@dataclass(frozen=True)
class OnlineTiming:
    """Median milliseconds of one online query, and when and under what load they were
    measured: a timing means little without them (a busy machine doubles it).

    measured_at: ISO-8601 local time with its UTC offset; load: the 1-minute load average
    (`os.getloadavg()[0]`); cpus: `os.cpu_count()`. None when unknown (not recorded, or the
    platform has no load average).
    """

    ms: float
    measured_at: str | None = None
    load: float | None = None
    cpus: int | None = None

    def describe(self) -> str:
        """Like "2026-12-07 14:02, load 1.3 on 2 CPUs" (local time); "unknown" when the time
        was not recorded."""
        if not self.measured_at:
            return UNKNOWN
        try:
            when = datetime.fromisoformat(self.measured_at).strftime("%Y-%m-%d %H:%M")
        except ValueError:
            when = self.measured_at
        cpus = None if self.cpus is None else f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"
        if self.load is None:
            return when if cpus is None else f"{when}, {cpus}"
        return f"{when}, load {self.load:.1f}" + ("" if cpus is None else f" on {cpus}")


@dataclass(frozen=True)
class MethodScores:
    """One method's leave-one-out scores on a gallery (NaN when the gallery has no labels).

    map_low, map_high: the mAP's 95 % percentile bootstrap interval over the queries
    (`resamples` resamples; None without labels, and in scores cached before intervals
    were). sampled_from: the
    gallery size when the queries are a fixed random sample of it (`SCORE_SAMPLE`), else None
    (every item a query); n_queries counts the queries scored either way.
    online_ms: median time of one online query against the fitted gallery; measured_at, load
    and cpus: when and under what load it was measured (see `OnlineTiming`; None in scores
    cached before they were recorded, which still load and read "unknown").
    """

    method: str
    params: dict[str, Any]
    map: float
    p1: float
    p5: float
    online_ms: float
    batch_seconds: float
    n_queries: int
    measured_at: str | None = None
    load: float | None = None
    cpus: int | None = None
    map_low: float | None = None
    map_high: float | None = None
    sampled_from: int | None = None
    resamples: int = 0
    delta: float | None = None
    delta_low: float | None = None
    delta_high: float | None = None
    p_value: float | None = None
    permutations: int = 0

    @property
    def queries_text(self) -> str:
        """Which queries the scores are over: "all 1360" or "500 sampled of 100000"."""
        if self.sampled_from is None:
            return f"all {self.n_queries}"
        return f"{self.n_queries} sampled of {self.sampled_from}"

    @property
    def interval_text(self) -> str:
        """The mAP's 95 % bootstrap interval, like "0.601 to 0.632" ("-" when unknown)."""
        if self.map_low is None or self.map_high is None:
            return "-"
        return f"{self.map_low:.4f} to {self.map_high:.4f}"

    @property
    def online(self) -> OnlineTiming:
        return OnlineTiming(self.online_ms, self.measured_at, self.load, self.cpus)

    @property
    def delta_interval_text(self) -> str:
        """The difference's interval, like "+0.012 to +0.031" ("-" when unknown)."""
        if self.delta_low is None or self.delta_high is None:
            return "-"
        return f"{self.delta_low:+.4f} to {self.delta_high:+.4f}"


@dataclass(frozen=True)
class QueryAPs:
    """Each scored query's average precision: the pairs that paired statistics, the per-query
    plot and the failure browser read. rows: (n,) the queries' gallery rows; ap: (n,) float64,
    NaN for a query without positives."""

    rows: np.ndarray
    ap: np.ndarray


def without_self(distances: np.ndarray, indices: np.ndarray, depth: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own index (row i is query i) wherever it landed, keep `depth` columns.

    Duplicate images may outrank the query itself, so the query is removed by index, not by
    position; a row that does not contain itself keeps its first `depth` entries.
    """
    keep = indices != np.arange(len(indices))[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :depth]
    return (np.take_along_axis(distances, order, axis=1),
            np.take_along_axis(indices, order, axis=1))


def median_ms(rank_one: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    """Median milliseconds of `rank_one(query[None, :])` over the queries, after one warm-up."""
    if len(queries) == 0:
        raise InvalidInputError("timing needs at least one query")
    rank_one(queries[:1])
    timings = []
    for query in queries:
        started = time.perf_counter()
        rank_one(query[None, :])
        timings.append(time.perf_counter() - started)
    return 1000 * statistics.median(timings)


def timing_queries(features: np.ndarray, count: int = ONLINE_TIMING_QUERIES) -> np.ndarray:
    """`count` gallery rows spread evenly over the gallery, used as online timing queries."""
    rows = np.unique(np.linspace(0, len(features) - 1, min(count, len(features))).astype(int))
    return features[rows]


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows has no getloadavg; some sandboxes refuse it
        return None


def time_online(rank_one: Callable[[np.ndarray], Any], queries: np.ndarray) -> OnlineTiming:
    """`median_ms` of `rank_one` over the queries, stamped with the time and load when it
    finished."""
    ms = median_ms(rank_one, queries)
    return OnlineTiming(ms, datetime.now().astimezone().isoformat(timespec="seconds"),
                        load_average(), os.cpu_count())


def score_rankings(method: str, params: Mapping[str, Any], rankings: LeaveOneOutRankings,
                   labels: np.ndarray | None, online: OnlineTiming,
                   query_rows: np.ndarray | None = None, gallery_size: int | None = None
                   ) -> MethodScores:
    """mAP (with its bootstrap interval), P@1 and P@5 of leave-one-out rankings against the
    gallery's labels (NaN without labels), with the method's online timing and its conditions.

    `query_rows`: the gallery rows the rankings' rows are the queries of, when they are a
    sample (`sample_rows`) of the `gallery_size` items; None when every gallery item is (row i
    is item i).
    """
    return scored_rankings(method, params, rankings, labels, online, query_rows,
                           gallery_size)[0]


def scored_rankings(method: str, params: Mapping[str, Any], rankings: LeaveOneOutRankings,
                    labels: np.ndarray | None, online: OnlineTiming,
                    query_rows: np.ndarray | None = None, gallery_size: int | None = None
                    ) -> tuple[MethodScores, QueryAPs | None]:
    """`score_rankings`, and each query's AP (None without labels)."""
    n_queries = len(rankings.indices)
    aps = None
    map_ = p1 = p5 = float("nan")
    low = high = None
    if labels is not None and not (labels < 0).all():
        depth = rankings.indices.shape[1]
        split = leave_one_out(labels)
        rows = np.arange(len(labels)) if query_rows is None else np.asarray(query_rows)
        scores = evaluate(rankings.indices, labels[rows], labels, ks=(1, min(5, depth)),
                          n_positives=split.n_positives[rows])
        map_, p1, p5 = scores.map, scores.precision_at[1], scores.precision_at[min(5, depth)]
        n_queries -= scores.n_excluded
        aps = QueryAPs(rows.astype(np.int64), np.asarray(scores.per_query_ap, np.float64))
        if np.isfinite(scores.map):
            low, high = bootstrap_interval(scores.per_query_ap)
    sampled = query_rows is not None
    return MethodScores(method, dict(params), map_, p1, p5, online.ms,
                        float("nan") if sampled else rankings.seconds, n_queries,
                        online.measured_at, online.load, online.cpus, low, high,
                        gallery_size if sampled else None,
                        0 if low is None else BOOTSTRAP_RESAMPLES), aps


class ScoreCache:
    """Scores by (gallery fingerprint, method, parameters) in `folder/scores.json`, and each
    entry's per-query APs in `folder/per-query/<key>.npz`.

    A damaged file is treated as empty (and replaced on the next write); writes are atomic.
    """

    def __init__(self, folder: Path, gallery_fingerprint: str) -> None:
        self.path = Path(folder) / SCORES_FILE
        self.per_query_folder = Path(folder) / PER_QUERY_FOLDER
        self.gallery_fingerprint = gallery_fingerprint

    def key(self, method: str, params: Mapping[str, Any]) -> str:
        return fingerprint([self.gallery_fingerprint, method, dict(params)])

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            stored = load_json(self.path)
        except CacheError as error:
            logger.warning("ignoring the score cache %s (%s)", self.path, error)
            return {}
        return stored if isinstance(stored, dict) else {}

    def get(self, method: str, params: Mapping[str, Any]) -> MethodScores | None:
        entry = self._read().get(self.key(method, params))
        try:
            return None if entry is None else MethodScores(**entry)
        except TypeError:  # written by another version
            return None

    def aps(self, method: str, params: Mapping[str, Any]) -> QueryAPs | None:
        """The per-query APs stored with an entry; None when there are none or the file is
        damaged (logged)."""
        path = self.per_query_folder / f"{self.key(method, params)}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                rows, ap = stored["rows"].astype(np.int64), stored["ap"].astype(np.float64)
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring the per-query APs %s (%s)", path, error)
            return None
        if rows.ndim != 1 or rows.shape != ap.shape:
            logger.warning("ignoring the per-query APs %s (shapes %s, %s)", path, rows.shape,
                           ap.shape)
            return None
        return QueryAPs(rows, ap)

    def put(self, scores: MethodScores, aps: QueryAPs | None = None) -> None:
        """Store `scores` (and its per-query APs, written first: an entry never points at
        APs from another run)."""
        key = self.key(scores.method, scores.params)
        if aps is not None:
            atomic_save_npz(self.per_query_folder / f"{key}.npz", rows=aps.rows, ap=aps.ap)
        stored = self._read()
        stored[key] = asdict(scores)
        atomic_write_json(self.path, stored)


def scores_table(rows: Sequence[MethodScores], titles: Mapping[str, str]) -> list[list[Any]]:
    """Rows for a table: method title, mAP, its 95 % interval, the queries scored, the mAP
    difference from the baseline with its 95 % paired interval and Holm-adjusted p-value,
    P@1, P@5, online ms/query, when and under what load that was measured ("unknown" for
    scores cached before it was recorded), batch s (blank for sampled scores: no whole run),
    parameters.

    The p-values are adjusted over the rows that have one (Holm): the family is every method
    the table compares with the baseline."""
    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None or not np.isfinite(value) else round(float(value), digits)

    adjusted = holm_adjusted_by_key({index: row.p_value for index, row in enumerate(rows)
                                     if row.p_value is not None})
    return [[titles.get(row.method, row.method), rounded(row.map, 4), row.interval_text,
             row.queries_text, rounded(row.delta, 4), row.delta_interval_text,
             rounded(adjusted.get(index), 4), rounded(row.p1, 4), rounded(row.p5, 4),
             round(row.online_ms, 2), row.online.describe(), rounded(row.batch_seconds, 3),
             ", ".join(f"{name}={value}" for name, value in row.params.items()) or "-"]
            for index, row in enumerate(rows)]


SCORES_TABLE_COLUMNS = ("method", "mAP", "mAP 95 % interval", "queries",
                        "mAP - baseline", "difference 95 % interval", "p (Holm)", "P@1", "P@5",
                        "online ms/query", "measured", "batch s", "parameters")
"""Headers of `scores_table`'s columns, in order."""
