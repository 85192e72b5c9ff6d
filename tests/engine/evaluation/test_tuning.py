"""Sweeps on real features and presets next to a gallery cache."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest

from engine.errors import InvalidInputError
from engine.evaluation import tuning
from engine.evaluation.metrics import evaluate
from engine.evaluation.protocols import make_split
from engine.evaluation.tuning import (
    PRESETS_FILE,
    SweepProgress,
    SweepRun,
    Trial,
    best_trial,
    load_presets,
    save_preset,
    sweep,
)
from engine.rerank import create_reranker, get_reranker_class
from engine.rerank.setting import default_setting
from engine.search.gallery import DEMO_GALLERY


def test_sweep_scores_each_setting_like_a_direct_run(demo_features):
    features, labels = demo_features.features, demo_features.labels
    seen = []
    trials = sweep("gnn", {"k1": [10, 26], "lambda_value": [0.0, 0.3]}, features, labels,
                   progress=lambda done, total: seen.append((done, total)))
    assert [(t.params["k1"], t.params["lambda_value"]) for t in trials] == [
        (10, 0.0), (10, 0.3), (26, 0.0), (26, 0.3)]
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # the (26, 0.3) trial is exactly a direct batch run of the defaults on the same split
    split = make_split("oxford17-split", labels)
    direct = create_reranker("gnn").fit(features[split.gallery_rows]).rerank(
        features[split.query_rows])
    expected = evaluate(direct.indices, split.query_labels(labels), labels[split.gallery_rows],
                        ks=(1,), n_positives=split.n_positives)
    assert trials[3].map == pytest.approx(expected.map, abs=1e-9)
    assert trials[3].p1 == pytest.approx(expected.precision_at[1], abs=1e-9)
    assert best_trial(trials).map == max(t.map for t in trials)


def test_sweep_can_be_cancelled(demo_features):
    calls = []
    trials = sweep("k_reciprocal", {"k1": [5, 10, 20]}, demo_features.features,
                   demo_features.labels, should_stop=lambda: len(calls.append(1) or calls) > 1)
    assert len(trials) == 1 and trials[0].params["k1"] == 5


def test_a_sweep_run_streams_the_trials_of_sweep(demo_features):
    features, labels = demo_features.features, demo_features.labels
    run = SweepRun("k_reciprocal", {"k1": [5, 10]}, features, labels)
    assert run.total == 2
    events = list(run)
    assert run.join(10)
    trials = [event for event in events if isinstance(event, Trial)]
    assert [type(event) for event in events] == [Trial, SweepProgress] * 2
    assert [event for event in events if isinstance(event, SweepProgress)] == [
        SweepProgress(1, 2), SweepProgress(2, 2)]
    expected = sweep("k_reciprocal", {"k1": [5, 10]}, features, labels)
    assert [(t.params, t.map, t.p1) for t in trials] == [(t.params, t.map, t.p1)
                                                         for t in expected]
    with pytest.raises(RuntimeError, match="read once"):
        list(run)


@pytest.fixture()
def gated(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], threading.Event]:
    """`sweep` held after each trial until the returned event is set; the trials it made."""
    trials: list[Any] = []
    resume = threading.Event()
    unpatched = tuning.sweep

    def gated_sweep(*args: Any, on_trial: Any, **kwargs: Any) -> Any:
        def record(trial: Any) -> None:
            trials.append(trial)
            on_trial(trial)
            assert resume.wait(10)

        return unpatched(*args, on_trial=record, **kwargs)

    monkeypatch.setattr(tuning, "sweep", gated_sweep)
    return trials, resume


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_a_sweep_run_stops_after_the_setting_in_progress(demo_features, gated, how):
    trials, resume = gated
    run = SweepRun("k_reciprocal", {"k1": [5, 6, 7, 8]}, demo_features.features,
                   demo_features.labels)
    events = iter(run)
    assert isinstance(next(events), Trial)
    if how == "cancel":
        run.cancel()
        resume.set()
        assert list(events) == [SweepProgress(1, 4)]  # the setting in progress is reported
    else:
        events.close()  # what a page's generator does when its event is cancelled
        resume.set()
    assert run.cancelled
    assert run.join(10)
    assert len(trials) == 1


def test_a_sweep_run_raises_the_sweeps_errors(demo_features):
    run = SweepRun("gnn", {"nope": [1]}, demo_features.features, demo_features.labels)
    with pytest.raises(InvalidInputError, match="no parameter"):
        list(run)
    assert run.join(10)


def test_sweep_refuses_bad_grids(demo_features):
    features, labels = demo_features.features, demo_features.labels
    with pytest.raises(InvalidInputError, match="no parameter"):
        sweep("gnn", {"nope": [1]}, features, labels)
    with pytest.raises(InvalidInputError, match="at least one value"):
        sweep("gnn", {"k1": []}, features, labels)
    with pytest.raises(InvalidInputError, match="below its minimum"):
        sweep("gnn", {"k1": [0]}, features, labels)


def test_presets_round_trip_and_override(tmp_path, caplog):
    shipped, cache = tmp_path / "gallery", tmp_path / "cache"
    shipped.mkdir()
    save_preset(shipped, "gnn", {"k1": 20, "k2": 5, "lambda_value": 0.1}, note="shipped")
    save_preset(cache, "gnn", {"k1": 30})
    save_preset(cache, "k_reciprocal", {"k1": 15.0})
    presets = load_presets(shipped, cache)
    assert presets["gnn"] == {"k1": 30, "k2": 7, "lambda_value": 0.3}  # the cache wins, whole
    assert presets["k_reciprocal"]["k1"] == 15
    assert load_presets(shipped)["gnn"]["lambda_value"] == 0.1
    # a preset saved before a parameter existed: the missing ones take the defaults
    (shipped / PRESETS_FILE).write_text(json.dumps({"ssr": {"params": {"k": 50}}}))
    older = load_presets(shipped)["ssr"]
    assert older == {**get_reranker_class("ssr").Params().as_dict(), "k": 50}
    assert older["k1"] == 20 and older["lambda_value"] == 0.3
    setting = default_setting("gnn", presets)
    assert (dict(setting.params), setting.source) == (presets["gnn"], "preset")
    setting = default_setting("gnn", {})
    params, source = dict(setting.params), setting.source
    assert source == "authors' defaults" and params["k1"] == 26
    with pytest.raises(InvalidInputError):
        save_preset(cache, "gnn", {"k1": -3})
    # a hand-edited file with a bad entry: that entry is skipped, the rest kept
    stored = json.loads((cache / PRESETS_FILE).read_text())
    stored["gnn"]["params"]["k1"] = 100000
    stored["nope"] = {"params": {}}
    (cache / PRESETS_FILE).write_text(json.dumps(stored))
    with caplog.at_level(logging.WARNING):
        presets = load_presets(cache)
    assert set(presets) == {"k_reciprocal"}
    assert "ignoring the gnn preset" in caplog.text and "ignoring the nope preset" in caplog.text
    (cache / PRESETS_FILE).write_text("{broken")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_presets(cache) == {}
    assert "ignoring" in caplog.text


def test_the_shipped_demo_presets_load_whole():
    """Every entry of the demo gallery's presets.json is valid and, with the defaults filled in,
    gives each parameter the page builds a control for."""
    presets = load_presets(DEMO_GALLERY)
    stored = json.loads((DEMO_GALLERY / PRESETS_FILE).read_text())
    assert set(presets) == set(stored)
    for name, params in presets.items():
        controls = {spec["name"] for spec in get_reranker_class(name).Params.describe()}
        assert set(params) == controls, name
