"""Benchmark run cards: every run writes one, and `--card` runs it again with zero accuracy
difference on the same machine (a tiny synthetic collection, one fast method)."""

from __future__ import annotations

import re

import pytest

from engine.bench.cards import full_spec, method_entries_of
from engine.bench.rerankers import main, parse_method
from engine.errors import InvalidInputError
from engine.evaluation.runcard import RunCard, figures_of, run_card
from engine.rerank import list_rerankers
from engine.rerank.setting import CUSTOM


def test_a_run_writes_its_card_and_the_card_runs_again_with_zero_difference(tmp_path, capsys):
    card_path = tmp_path / "run.json"
    argv = ["--synthetic", "60", "--dim", "8", "--methods", "k_reciprocal:k1=5,k2=3",
            "--online-queries", "2", "--device", "cpu", "--top", "20",
            "--cache-dir", str(tmp_path / "cache"), "--card-out", str(card_path)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert f"run card: {card_path}" in first
    card = RunCard.load(card_path)
    assert card.kind == "benchmark" and card.device == "cpu"
    assert card.protocol == "leave-one-out" and card.gallery["size"] == 60
    assert card.gallery["recipe"] == {"n": 60, "dim": 8, "spread": 0.6}
    assert [(m.method, m.source) for m in card.methods] == [("baseline", ""),
                                                            ("k_reciprocal", CUSTOM)]
    assert card.methods[1].params == {"k1": 5, "k2": 3, "lambda_value": 0.3}
    assert card.figures["headers"][:2] == ["method", "mAP"]
    assert [row[0] for row in card.figures["rows"]] == ["baseline (cosine)",
                                                       "k_reciprocal:k1=5,k2=3"]
    # the re-run names every parameter, so that changed defaults do not change it
    assert "k_reciprocal:k1=5,k2=3,lambda_value=0.3" in card.extra["bench"]["argv"]

    assert main(["--card", str(card_path), "--card-out", str(tmp_path / "again.json")]) == 0
    again = capsys.readouterr().out
    differences = re.findall(r"^\| (.+?) \| mAP \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \|$",
                             again, re.MULTILINE)
    assert [row[0] for row in differences] == ["baseline (cosine)", "k_reciprocal:k1=5,k2=3"]
    assert all(row[1] == row[2] and float(row[3]) == 0.0 for row in differences), differences
    assert re.search(r"\| batch s \| [\d.]+ \| [\d.]+ \| x[\d.]+ \|", again)  # a ratio
    assert "same environment" in again
    rerun = RunCard.load(tmp_path / "again.json")
    assert rerun.figures["rows"][1][1] == card.figures["rows"][1][1]


def test_a_card_the_benchmark_did_not_write_is_refused(tmp_path):
    other = run_card(kind="compare table", gallery={"name": "x"}, protocol="leave-one-out",
                     methods=[], figures=figures_of(["method"], [["a"]]), device="cpu")
    path = other.save(tmp_path / "page.json")
    with pytest.raises(InvalidInputError, match=r"not written by `python -m engine\.bench`"):
        main(["--card", str(path)])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InvalidInputError, match="not JSON"):
        main(["--card", str(tmp_path / "broken.json")])


@pytest.mark.parametrize("method", list_rerankers())
def test_every_methods_complete_spec_parses_back_to_its_parameters(method):
    """What a card records for a re-run (every parameter, booleans included) is read back by
    `--methods` as the same parameters."""
    entry = method_entries_of([method], parse_method)[1]
    name, params = parse_method(full_spec(entry))
    assert name == method and params == entry.params
