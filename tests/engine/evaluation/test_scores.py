"""Whole-gallery scoring: hand-worked leave-one-out rankings, the score cache and timing."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from datetime import datetime

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.evaluation import scores as evaluation
from engine.evaluation.scores import (
    SCORES_FILE,
    SCORES_TABLE_COLUMNS,
    LeaveOneOutRankings,
    MethodScores,
    OnlineTiming,
    ScoreCache,
    median_ms,
    sample_rows,
    score_rankings,
    scores_table,
    time_online,
    timing_queries,
    without_self,
)

# Row i is query i of a gallery of 5 items (only 4 rows are queries).
RANKED = np.array([
    [0, 2, 1, 3],  # self first
    [2, 1, 0, 3],  # a duplicate (2) outranks the query itself
    [0, 1, 3, 2],  # self last
    [0, 1, 2, 4],  # self not in the ranking at all
])
RANKED_DISTANCES = np.array([
    [0.0, 0.1, 0.2, 0.3],
    [0.0, 0.0, 0.4, 0.5],
    [0.1, 0.2, 0.3, 0.6],
    [0.2, 0.3, 0.4, 0.7],
], np.float32)


@pytest.mark.parametrize(("depth", "indices", "distances"), [
    (3, [[2, 1, 3], [2, 0, 3], [0, 1, 3], [0, 1, 2]],
     [[0.1, 0.2, 0.3], [0.0, 0.4, 0.5], [0.1, 0.2, 0.3], [0.2, 0.3, 0.4]]),
    (2, [[2, 1], [2, 0], [0, 1], [0, 1]],
     [[0.1, 0.2], [0.0, 0.4], [0.1, 0.2], [0.2, 0.3]]),
])
def test_without_self_drops_the_query_wherever_it_lands(depth: int, indices: list,
                                                        distances: list) -> None:
    kept_distances, kept = without_self(RANKED_DISTANCES, RANKED, depth)
    np.testing.assert_array_equal(kept, indices)
    np.testing.assert_allclose(kept_distances, distances)
    assert kept_distances.dtype == np.float32
    for row in range(len(kept)):
        assert row not in kept[row]


# Leave-one-out rankings of 7 items, depth 5: classes 0 (rows 0-2), 1 (rows 3-5) and an
# unlabelled item 6, so every labelled query has 2 positives among the others.
LABELS = np.array([0, 0, 0, 1, 1, 1, -1])
LOO = np.array([
    [1, 3, 6, 2, 4],  # hits 1 0 0 1 0: AP (1/1 + 2/4) / 2 = 0.75, P@1 1, P@5 2/5
    [3, 0, 4, 5, 6],  # hits 0 1 0 0 0 (row 2 missing): AP (1/2) / 2 = 0.25, P@1 0, P@5 1/5
    [0, 1, 3, 4, 5],  # hits 1 1 0 0 0: AP 1, P@1 1, P@5 2/5
    [4, 5, 0, 1, 2],  # hits 1 1 0 0 0: AP 1, P@1 1, P@5 2/5
    [6, 3, 0, 5, 1],  # hits 0 1 0 1 0: AP (1/2 + 2/4) / 2 = 0.5, P@1 0, P@5 2/5
    [0, 1, 2, 6, 3],  # hits 0 0 0 0 1 (row 4 missing): AP (1/5) / 2 = 0.1, P@1 0, P@5 1/5
    [0, 1, 2, 3, 4],  # unlabelled: excluded from every mean
])


def loo_rankings(depth: int = 5) -> LeaveOneOutRankings:
    indices = LOO[:, :depth]
    distances = np.tile(np.linspace(0.1, 0.5, depth, dtype=np.float32), (len(LOO), 1))
    return LeaveOneOutRankings(indices, distances, seconds=1.25)


def test_score_rankings_matches_hand_computed_values() -> None:
    online = OnlineTiming(2.5, "2026-12-07T14:02:31+01:00", 1.25, 2)
    scores = score_rankings("k_reciprocal", {"k1": 4}, loo_rankings(), LABELS, online)
    assert scores.map == pytest.approx((0.75 + 0.25 + 1 + 1 + 0.5 + 0.1) / 6)
    assert scores.p1 == pytest.approx(3 / 6)
    assert scores.p5 == pytest.approx((0.4 + 0.2 + 0.4 + 0.4 + 0.4 + 0.2) / 6)
    assert scores.n_queries == 6  # the unlabelled item is no query
    assert (scores.method, scores.params) == ("k_reciprocal", {"k1": 4})
    assert (scores.online_ms, scores.batch_seconds) == (2.5, 1.25)
    assert scores.online == online  # when and under what load the timing was taken


def test_score_rankings_p5_falls_back_to_the_ranking_depth() -> None:
    scores = score_rankings("baseline", {}, loo_rankings(depth=3), LABELS, OnlineTiming(0.0))
    # P@3 per query: 1/3, 1/3, 2/3, 2/3, 1/3, 0
    assert scores.p5 == pytest.approx((1 + 1 + 2 + 2 + 1 + 0) / 3 / 6)
    assert scores.p1 == pytest.approx(3 / 6)


@pytest.mark.parametrize("labels", [None, np.full(7, -1)])
def test_score_rankings_without_labels_is_nan(labels: np.ndarray | None) -> None:
    scores = score_rankings("baseline", {}, loo_rankings(), labels, OnlineTiming(1.0))
    assert math.isnan(scores.map) and math.isnan(scores.p1) and math.isnan(scores.p5)
    assert scores.n_queries == 7
    assert scores.online_ms == 1.0


def make_scores(method: str = "k_reciprocal", params: dict | None = None,
                map_: float = 0.5) -> MethodScores:
    return MethodScores(method, {"k1": 20, "k2": 6} if params is None else params, map_, 0.75,
                        0.6, 3.25, 0.125, 24, "2026-12-07T14:02:31+01:00", 1.3, 2)


def test_score_cache_round_trip(tmp_path) -> None:
    cache = ScoreCache(tmp_path, "gallery-a")
    assert cache.get("k_reciprocal", {"k1": 20, "k2": 6}) is None
    stored = make_scores()
    cache.put(stored)
    cache.put(make_scores("baseline", {}, 0.25))
    again = ScoreCache(tmp_path, "gallery-a")  # a new process reads the same file
    assert again.get("k_reciprocal", {"k2": 6, "k1": 20}) == stored  # key order is irrelevant
    assert again.get("baseline", {}).map == 0.25
    assert json.loads((tmp_path / SCORES_FILE).read_text())  # plain JSON on disk


def test_score_cache_key_depends_on_params_and_gallery(tmp_path) -> None:
    cache = ScoreCache(tmp_path, "gallery-a")
    cache.put(make_scores())
    assert cache.get("k_reciprocal", {"k1": 21, "k2": 6}) is None
    assert cache.get("gnn", {"k1": 20, "k2": 6}) is None
    assert ScoreCache(tmp_path, "gallery-b").get("k_reciprocal", {"k1": 20, "k2": 6}) is None
    assert len({cache.key("k_reciprocal", {"k1": 20}), cache.key("k_reciprocal", {"k1": 21}),
                cache.key("gnn", {"k1": 20}),
                ScoreCache(tmp_path, "gallery-b").key("k_reciprocal", {"k1": 20})}) == 4


def test_score_cache_keeps_nan_scores(tmp_path) -> None:
    cache = ScoreCache(tmp_path, "gallery-a")
    cache.put(make_scores(map_=float("nan")))
    assert math.isnan(cache.get("k_reciprocal", {"k1": 20, "k2": 6}).map)


def test_damaged_score_cache_is_empty_then_replaced_atomically(tmp_path, monkeypatch) -> None:
    path = tmp_path / SCORES_FILE
    path.write_text('{"truncated": ')
    cache = ScoreCache(tmp_path, "gallery-a")
    assert cache.get("k_reciprocal", {"k1": 20, "k2": 6}) is None

    # A write that fails before its rename leaves the old file as it was, and no temporary.
    def refuse(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        cache.put(make_scores())
    assert path.read_text() == '{"truncated": '
    assert [entry.name for entry in tmp_path.iterdir()] == [SCORES_FILE]
    monkeypatch.undo()

    cache.put(make_scores())
    assert cache.get("k_reciprocal", {"k1": 20, "k2": 6}) == make_scores()
    assert len(json.loads(path.read_text())) == 1
    assert [entry.name for entry in tmp_path.iterdir()] == [SCORES_FILE]


def test_scores_cached_before_timings_had_conditions_still_load(tmp_path) -> None:
    """An entry written before measured_at, load and cpus existed loads; its timing's
    conditions are unknown (the table says so) rather than the scores being lost."""
    cache = ScoreCache(tmp_path, "gallery-a")
    old = {name: value for name, value in dataclasses.asdict(make_scores()).items()
           if name not in ("measured_at", "load", "cpus")}
    (tmp_path / SCORES_FILE).write_text(json.dumps({cache.key("k_reciprocal", old["params"]):
                                                    old}))
    loaded = cache.get("k_reciprocal", {"k1": 20, "k2": 6})
    assert (loaded.map, loaded.online_ms) == (0.5, 3.25)
    assert (loaded.measured_at, loaded.load, loaded.cpus) == (None, None, None)
    assert loaded.online.describe() == "unknown"
    assert scores_table([loaded], {})[0][SCORES_TABLE_COLUMNS.index("measured")] == "unknown"


def test_score_cache_ignores_entries_of_another_version(tmp_path) -> None:
    cache = ScoreCache(tmp_path, "gallery-a")
    key = cache.key("baseline", {})
    (tmp_path / SCORES_FILE).write_text(json.dumps({key: {"method": "baseline", "old": 1}}))
    assert cache.get("baseline", {}) is None


class FakeClock:
    """perf_counter that only moves when a timed call runs, by the next listed duration."""

    def __init__(self, durations: list[float]) -> None:
        self.now = 100.0
        self.durations = list(durations)
        self.calls: list[np.ndarray] = []

    def perf_counter(self) -> float:
        return self.now

    def rank_one(self, query: np.ndarray) -> None:
        self.calls.append(query)
        if len(self.calls) > 1:  # the first call is the warm-up
            self.now += self.durations.pop(0)


def test_median_ms_warms_up_then_times_each_query(monkeypatch) -> None:
    clock = FakeClock([0.001, 0.009, 0.003])
    monkeypatch.setattr(evaluation.time, "perf_counter", clock.perf_counter)
    queries = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert median_ms(clock.rank_one, queries) == pytest.approx(3.0)
    assert len(clock.calls) == 4
    np.testing.assert_array_equal(clock.calls[0], queries[:1])  # warm-up on the first query
    for call, query in zip(clock.calls[1:], queries, strict=True):
        assert call.shape == (1, 4)
        np.testing.assert_array_equal(call[0], query)


def test_median_ms_needs_a_query() -> None:
    with pytest.raises(InvalidInputError, match="at least one query"):
        median_ms(lambda query: None, np.zeros((0, 4), np.float32))


def test_time_online_records_when_and_under_what_load(monkeypatch) -> None:
    clock = FakeClock([0.002, 0.004, 0.003])
    monkeypatch.setattr(evaluation.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(evaluation.os, "getloadavg", lambda: (1.25, 0.5, 0.25))
    monkeypatch.setattr(evaluation.os, "cpu_count", lambda: 2)
    before = datetime.now().astimezone().replace(microsecond=0)
    timing = time_online(clock.rank_one, np.zeros((3, 4), np.float32))
    after = datetime.now().astimezone()
    assert timing.ms == pytest.approx(3.0)
    assert (timing.load, timing.cpus) == (1.25, 2)
    measured = datetime.fromisoformat(timing.measured_at)
    assert measured.utcoffset() is not None  # local time, with its offset
    assert before <= measured <= after


def test_time_online_without_a_load_average(monkeypatch) -> None:
    def refuse() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(evaluation.os, "getloadavg", refuse)
    timing = time_online(lambda query: None, np.zeros((2, 4), np.float32))
    assert timing.load is None and timing.measured_at


@pytest.mark.parametrize(("timing", "text"), [
    (OnlineTiming(1.0, "2026-12-07T14:02:31+01:00", 1.3, 2),
     "2026-12-07 14:02, load 1.3 on 2 CPUs"),
    (OnlineTiming(1.0, "2026-12-07T14:02:31", 0.04, 1), "2026-12-07 14:02, load 0.0 on 1 CPU"),
    (OnlineTiming(1.0, "2026-12-07T14:02:31+01:00", None, 8), "2026-12-07 14:02, 8 CPUs"),
    (OnlineTiming(1.0, "2026-12-07T14:02:31+01:00"), "2026-12-07 14:02"),
    (OnlineTiming(1.0), "unknown"),
])
def test_online_timing_describes_its_conditions(timing: OnlineTiming, text: str) -> None:
    assert timing.describe() == text


def test_timing_queries_spread_over_the_gallery() -> None:
    features = np.arange(100, dtype=np.float32)[:, None]
    chosen = timing_queries(features, count=5)
    np.testing.assert_array_equal(chosen[:, 0], [0, 24, 49, 74, 99])
    assert len(timing_queries(features[:3], count=5)) == 3


def test_scores_table_rows() -> None:
    rows = scores_table(
        [MethodScores("baseline", {}, 0.123456, 0.5, 0.4, 0.04449, 0.0004, 24,
                      "2026-12-07T14:02:31+01:00", 1.26, 2, 0.1, 0.15, None, 2000),
         MethodScores("k_reciprocal", {"k1": 20, "k2": 6}, float("nan"), float("nan"),
                      float("nan"), 6.789, float("nan"), 500, sampled_from=100000),
         MethodScores("gnn", {}, 0.2, 0.5, 0.4, 1.0, 0.1, 24, delta=0.076544,
                      delta_low=0.01, delta_high=0.15, p_value=0.02, permutations=10000),
         MethodScores("icfrr", {}, 0.1, 0.5, 0.4, 1.0, 0.1, 24, delta=-0.02,
                      delta_low=-0.05, delta_high=0.001, p_value=0.03, permutations=10000)],
        {"baseline": "Baseline (faiss, cosine)"})
    assert rows[:2] == [
        ["Baseline (faiss, cosine)", 0.1235, "0.1000 to 0.1500", "all 24", None, "-", None,
         0.5, 0.4, 0.04, "2026-12-07 14:02, load 1.3 on 2 CPUs", 0.0, "-"],
        ["k_reciprocal", None, "-", "500 sampled of 100000", None, "-", None, None, None, 6.79,
         "unknown", None, "k1=20, k2=6"],
    ]
    # Holm over the two rows with a p-value: 0.02 * 2 = 0.04, then max(0.03 * 1, 0.04)
    assert [row[4:7] for row in rows[2:]] == [[0.0765, "+0.0100 to +0.1500", 0.04],
                                              [-0.02, "-0.0500 to +0.0010", 0.04]]
    assert all(len(row) == len(SCORES_TABLE_COLUMNS) for row in rows)


def test_sample_rows_are_fixed_per_seed_and_sorted() -> None:
    rows = sample_rows(100000, 500, "gallery-a")
    assert rows.shape == (500,) and np.all(np.diff(rows) > 0) and rows[-1] < 100000
    np.testing.assert_array_equal(rows, sample_rows(100000, 500, "gallery-a"))
    assert not np.array_equal(rows, sample_rows(100000, 500, "gallery-b"))
    np.testing.assert_array_equal(sample_rows(30, 500, "x"), np.arange(30))


def test_sampled_scores_are_those_queries_leave_one_out_terms() -> None:
    """Rankings of sampled rows 1 and 4 of a 6-item gallery (labels 0 0 0 1 1 1): each is
    scored against its class less itself, and the table says which queries it covers."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    indices = np.array([[0, 3, 2, 4, 5],    # query 1: hits at ranks 1 and 3 of 2 positives
                        [5, 3, 0, 1, 2]])   # query 4: hits at ranks 1 and 2
    rankings = LeaveOneOutRankings(indices, np.zeros(indices.shape), 1.0)
    scores = score_rankings("m", {}, rankings, labels, OnlineTiming(1.0),
                            query_rows=np.array([1, 4]), gallery_size=6)
    assert scores.map == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    assert scores.p1 == 1.0 and scores.n_queries == 2 and scores.sampled_from == 6
    assert scores.queries_text == "2 sampled of 6" and math.isnan(scores.batch_seconds)
    assert scores.map_low == pytest.approx((1 + 2 / 3) / 2) and scores.map_high == 1.0
