"""Exports of a query's rankings and of the Compare table: CSV (read back with the csv
module), JSON and Markdown, each carrying its run card; on constructed features (a query set
with revisited ground truth, so that hits, misses and junk are known) and a labelled features
gallery."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engine.bench.measure import synthetic_collection
from engine.errors import InvalidInputError
from engine.evaluation.scores import SCORES_TABLE_COLUMNS, scores_table
from engine.explorer import BASELINE, Explorer
from engine.explorer.exports import (
    CARD_PREFIX,
    EXPORTS_FOLDER,
    export_rankings,
    export_table,
    exports_folder,
    rankings_table,
    read_csv_export,
)
from engine.rerank.setting import AUTHORS_DEFAULTS
from tests.engine.explorer.test_query_features import A_EASY, A_HARD, A_JUNK, A_NEG, constructed

METHODS = ["k_reciprocal"]


@pytest.fixture()
def explorer(tmp_path: Path) -> Explorer:
    return Explorer(None, device="cpu", cache_root=tmp_path / "cache",
                    allowed_roots=[tmp_path / "allowed"], methods=METHODS)


def csv_rows(text: str) -> list[list[str]]:
    """The CSV's rows as the csv module reads them, the run card's comment lines skipped."""
    return list(csv.reader(line for line in text.splitlines() if not line.startswith("# ")))


def test_a_querys_rankings_export_as_csv_and_json_with_their_run_card(
        explorer: Explorer, tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, queries=queries, ground_truth=truth)
    result = explorer.query_from_set(session.key, "qa", top_n=3)
    folder = exports_folder(explorer.cache_root)
    assert folder == explorer.cache_root / EXPORTS_FOLDER
    paths = export_rankings(session, result, folder, depth=5)
    assert set(paths) == {"csv", "json"}
    for path in paths.values():
        assert path.parent == folder and "db.npz" in path.name and "qa" in path.name
        assert not list(folder.glob(".*.tmp"))  # written atomically, nothing left behind

    text = paths["csv"].read_text()
    assert text.startswith("# Retrieval Explorer export: query rankings\n")
    headers, rows = rankings_table(result, session, depth=5)
    parsed = csv_rows(text)
    assert parsed[0] == headers
    assert parsed[1:] == [["" if cell is None else str(cell) for cell in row] for row in rows]
    # five places per method; the baseline's first four as worked out by hand: the junk item
    # is neither hit nor miss
    assert len(parsed) - 1 == 5 * len(result.rankings)
    baseline = [row for row in parsed[1:] if row[0] == BASELINE]
    names = session.gallery.files
    assert [row[2] for row in baseline[:4]] == [names[A_EASY], names[A_JUNK], names[A_NEG],
                                                names[A_HARD]]
    assert [row[6] for row in baseline[:4]] == ["hit", "junk", "miss", "hit"]
    assert float(baseline[0][7]) == pytest.approx(result.rankings[BASELINE].ap)
    # the similarity column is the cosine to the query (the gallery rows are unit vectors)
    query = result.feature / np.linalg.norm(result.feature)
    assert float(baseline[1][5]) == pytest.approx(float(session.gallery.features[A_JUNK]
                                                        @ query), abs=1e-5)

    card, card_headers, card_rows = read_csv_export(text)
    assert card_headers == headers and len(card_rows) == len(rows)
    assert card.kind == "query rankings" and "query 'qa'" in card.protocol
    assert card.gallery["fingerprint"] == session.gallery.fingerprint
    assert card.gallery["size"] == session.gallery.size
    assert [(m.method, m.source) for m in card.methods] == [(BASELINE, ""),
                                                            ("k_reciprocal", AUTHORS_DEFAULTS)]
    assert card.methods[1].params == result.rankings["k_reciprocal"].params
    assert card.extra["query"]["query_set_name"] == "qa"

    data = json.loads(paths["json"].read_text())
    assert data["run_card"] == card.to_dict()
    assert list(data["methods"]) == list(result.rankings)
    first = data["methods"][BASELINE]["results"]
    assert [item["file"] for item in first[:2]] == [names[A_EASY], names[A_JUNK]]
    assert first[1]["outcome"] == "junk"
    assert data["methods"][BASELINE]["p@3"] == pytest.approx(2 / 3)


def test_the_revisited_compare_table_exports_as_csv_json_and_markdown(
        explorer: Explorer, tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, queries=queries, ground_truth=truth)
    headers, rows = session.revisited_rows(compute=True)
    paths = export_table(session, headers, rows, tmp_path / "out")
    assert set(paths) == {"csv", "json", "md"}

    card, read_headers, read_rows = read_csv_export(paths["csv"].read_text())
    assert read_headers == headers and len(read_rows) == len(rows) == 1 + len(METHODS)
    assert [row[0] for row in read_rows] == [row[0] for row in rows]
    assert card.kind == "compare table" and card.protocol.startswith("revisited")
    assert card.figures["headers"] == headers and len(card.figures["rows"]) == len(rows)

    data = json.loads(paths["json"].read_text())
    assert data["headers"] == headers and len(data["rows"]) == len(rows)
    assert data["records"][0]["method"] == rows[0][0]
    assert data["run_card"] == card.to_dict()

    markdown = paths["md"].read_text().splitlines()
    header_line = "| " + " | ".join(headers) + " |"
    start = markdown.index(header_line)
    table = [line for line in markdown[start + 2:] if line.startswith("| ")]
    assert len(table) == len(rows)
    assert all(line.startswith(f"| {row[0]} |") for line, row in zip(table, rows, strict=True))
    assert "<details><summary>Run card</summary>" in markdown
    body = "\n".join(markdown)
    assert json.loads(body[body.index("```json") + 7:body.index("```", body.index("```json")
                                                                   + 7)]) == card.to_dict()


def test_the_leave_one_out_table_exports_whatever_columns_it_has(tmp_path: Path) -> None:
    features, labels = synthetic_collection(30, 8, n_classes=3, spread=0.5, seed=3)
    folder = tmp_path / "allowed"
    folder.mkdir()
    np.savez(folder / "clusters.npz", features=features, labels=labels)
    explorer = Explorer(None, device="cpu", cache_root=tmp_path / "cache",
                        allowed_roots=[folder], methods=METHODS)
    session = explorer.open_features(folder / "clusters.npz")
    scores = session.scores_rows(compute=True)
    rows = scores_table(scores, dict(session.methods()))
    headers = list(SCORES_TABLE_COLUMNS)
    paths = export_table(session, headers, rows, tmp_path / "out", formats=["csv"])
    card, read_headers, read_rows = read_csv_export(paths["csv"].read_text())
    assert read_headers == headers and len(read_rows) == 2
    assert card.protocol.startswith("leave-one-out")
    assert card.methods[1].params == scores[1].params
    # a table with an extra column (paired statistics, say) exports it too
    wider = export_table(session, [*headers, "extra"], [[*row, 1.5] for row in rows],
                         tmp_path / "out", formats=["json"])
    assert json.loads(wider["json"].read_text())["records"][1]["extra"] == 1.5


def test_exports_refuse_an_empty_table_and_unknown_formats(explorer: Explorer,
                                                           tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, queries=queries, ground_truth=truth)
    with pytest.raises(InvalidInputError, match="no rows yet"):
        export_table(session, ["method"], [], tmp_path)
    with pytest.raises(InvalidInputError, match="formats are csv, json, md"):
        export_table(session, ["method"], [["x"]], tmp_path, formats=["xlsx"])
    with pytest.raises(InvalidInputError, match="no run card"):
        read_csv_export("method\nx\n")
    assert CARD_PREFIX.startswith("# ")
