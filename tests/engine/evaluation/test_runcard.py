"""Run cards: the fields a card records, the weights hash, the JSON round trip and refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.evaluation.runcard import (
    RUN_CARD_SCHEMA,
    MethodEntry,
    RunCard,
    figures_of,
    gallery_entry,
    method_entries,
    run_card,
    weights_sha256,
)
from engine.features.backbone import DEFAULT_BACKBONE, packaged_weights_path
from engine.rerank.setting import AUTHORS_DEFAULTS, CUSTOM, MethodSetting


def small_card(**changes) -> RunCard:
    gallery = SimpleNamespace(source=None, root=Path("/data/flowers"), fingerprint="abc123",
                              size=24)
    settings = [MethodSetting("baseline"),
                MethodSetting("k_reciprocal", {"k1": 20, "k2": 6, "lambda_value": 0.3},
                              AUTHORS_DEFAULTS),
                MethodSetting("gnn", {"k1": np.int64(5), "k2": 3, "lambda_value": 0.0}, CUSTOM)]
    figures = figures_of(["method", "mAP", "batch s"],
                         [["baseline", np.float32(0.5), float("nan")],
                          ["k_reciprocal", 0.625, 0.01], ["gnn", 0.75, None]])
    return run_card(kind="benchmark", gallery=gallery_entry(gallery), protocol="leave-one-out",
                    methods=method_entries(settings), figures=figures, device="cpu",
                    backbone=DEFAULT_BACKBONE, weights=changes.pop("weights", None),
                    extra={"top": 10})


def test_a_card_records_the_run_and_its_environment():
    card = small_card()
    assert card.schema == RUN_CARD_SCHEMA and card.kind == "benchmark"
    assert card.gallery == {"name": "flowers", "fingerprint": "abc123", "size": 24,
                            "path": "/data/flowers", "kind": "image folder"}
    assert card.protocol == "leave-one-out" and card.device == "cpu"
    assert [(m.method, m.source) for m in card.methods] == [
        ("baseline", ""), ("k_reciprocal", AUTHORS_DEFAULTS), ("gnn", CUSTOM)]
    assert card.methods[2].params == {"k1": 5, "k2": 3, "lambda_value": 0.0}
    assert type(card.methods[2].params["k1"]) is int
    assert {"python", "numpy", "torch", "timm"} <= card.packages.keys()
    assert card.date.endswith("+00:00")  # UTC
    assert card.engine_version
    # NaN and numpy scalars become JSON values
    assert card.figures["rows"][0] == ["baseline", pytest.approx(0.5), None]
    assert card.extra == {"top": 10}
    json.loads(card.to_json())  # strict JSON: no NaN


def test_the_weights_hash_is_the_sha256_of_the_packaged_file():
    path = packaged_weights_path(DEFAULT_BACKBONE)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert small_card().weights_sha256 == expected
    assert weights_sha256(DEFAULT_BACKBONE, "packaged") == expected
    # a features' weights identifier carries the hash already; hub weights have none
    assert weights_sha256("other", "sha256:" + "ab" * 32) == "ab" * 32
    assert weights_sha256("other", "hub:timm/other") is None
    assert weights_sha256(None, None) is None


def test_the_json_round_trip_keeps_every_field(tmp_path):
    card = small_card(weights="sha256:" + "cd" * 32)
    assert card.weights_sha256 == "cd" * 32
    again = RunCard.from_json(card.to_json())
    assert again == card
    assert RunCard.load(card.save(tmp_path / "cards" / "run.json")) == card
    assert again.rows_by_first_column()["gnn"] == {"method": "gnn", "mAP": 0.75,
                                                   "batch s": None}
    assert isinstance(again.methods[0], MethodEntry)


@pytest.mark.parametrize("broken, message", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"schema": 99}', "schema 99"),
    ('{"schema": 1}', "lacks"),
])
def test_a_malformed_card_is_refused_with_a_clear_error(broken, message):
    with pytest.raises(InvalidInputError, match=message):
        RunCard.from_json(broken)


def test_wrong_field_types_and_unknown_fields_are_refused(tmp_path):
    data = small_card().to_dict()
    with pytest.raises(InvalidInputError, match="'figures'"):
        RunCard.from_json({**data, "figures": [1, 2]})
    with pytest.raises(InvalidInputError, match="figures are"):
        RunCard.from_json({**data, "figures": {"headers": ["a"], "rows": [1]}})
    with pytest.raises(InvalidInputError, match="unknown fields surprise"):
        RunCard.from_json({**data, "surprise": 1})
    with pytest.raises(InvalidInputError, match="method entry"):
        RunCard.from_json({**data, "methods": [{"params": {}}]})
    with pytest.raises(InvalidInputError, match="cannot read"):
        RunCard.load(tmp_path / "missing.json")
