"""Sweeps on real features and presets next to a gallery cache."""

from __future__ import annotations

import json
import logging

import pytest

from engine.errors import InvalidInputError
from engine.evaluation.metrics import evaluate
from engine.evaluation.protocols import make_split
from engine.evaluation.tuning import (
    PRESETS_FILE,
    best_trial,
    load_presets,
    resolve_params,
    save_preset,
    sweep,
)
from engine.rerank import create_reranker, get_reranker_class
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
    assert resolve_params("gnn", presets) == (presets["gnn"], "preset")
    params, source = resolve_params("gnn", {})
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
