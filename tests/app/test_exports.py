"""The page's downloads (`app.exports`): the files follow the query and the Compare table,
carry their run card and parse back; a download with nothing to download says why."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from app.exports import KEEP_EXPORTS, NO_QUERY, NO_TABLE, table_values
from app.handlers import PageHandlers
from app.page import launch_options
from engine import SCORES_TABLE_COLUMNS, exports_folder, read_csv_export
from engine.explorer import BASELINE, CUSTOM, Explorer, GallerySession

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")
TOP = 10


def read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def shown_table(handlers: PageHandlers, session: GallerySession) -> pd.DataFrame:
    """The Compare table as the Dataframe passes it to a handler."""
    rows = handlers.compare_rows(session)
    return pd.DataFrame(rows, columns=list(SCORES_TABLE_COLUMNS)[:len(rows[0])])


def test_the_buttons_are_on_the_page_and_their_folder_is_served(handlers: PageHandlers,
                                                                explorer: Explorer) -> None:
    exports = handlers.ui.exports
    assert exports is not None
    assert [button.elem_id for button in [*exports.rankings, *exports.table]] == [
        "download-rankings-csv", "download-rankings-json", "download-table-csv",
        "download-table-json", "download-table-md"]
    assert all(isinstance(button, gr.DownloadButton) and button.value is None
               for button in [*exports.rankings, *exports.table])
    allowed = launch_options(explorer)["allowed_paths"]
    assert str(exports_folder(explorer.cache_root)) in allowed


def test_a_download_before_a_query_says_so(handlers: PageHandlers) -> None:
    assert handlers.rankings_files(None) == {button: None
                                             for button in handlers.ui.exports.rankings}
    with pytest.raises(gr.Error, match="No query yet"):
        handlers.check_rankings_download(None)
    assert NO_QUERY.startswith("No query yet")
    empty = pd.DataFrame([], columns=list(SCORES_TABLE_COLUMNS))
    assert handlers.table_files("", empty) == {button: None
                                               for button in handlers.ui.exports.table}
    with pytest.raises(gr.Error, match="no rows yet"):
        handlers.check_table_download(empty)
    # an empty Dataframe holds one blank row
    with pytest.raises(gr.Error, match="no rows yet"):
        handlers.check_table_download(pd.DataFrame([["", ""]], columns=["a", "b"]))
    assert "Compute for the current parameters" in NO_TABLE


def test_a_picks_rankings_download_as_csv_and_json(handlers: PageHandlers,
                                                   session: GallerySession) -> None:
    updates = handlers.pick(session.key, session.gallery.files[3], True, TOP, "k_reciprocal",
                            "backbone", *handlers.default_controls(session))
    view = updates[handlers.ui.state]
    assert handlers.check_rankings_download(view) == {}
    csv_button, json_button = handlers.ui.exports.rankings
    files = handlers.rankings_files(view)
    card, headers, rows = read_csv_export(read(files[csv_button]))
    assert headers[:4] == ["method", "rank", "file", "class"]
    size = session.gallery.size - 1  # the pick is left out of its ranking
    assert len(rows) == size * len(view.result.rankings)
    first = next(row for row in rows if row[0] == BASELINE)
    assert first[1] == "1" and first[6] in ("hit", "miss")
    assert card.kind == "query rankings" and session.gallery.files[3] in card.protocol
    assert card.weights_sha256 and card.gallery["fingerprint"] == session.gallery.fingerprint
    data = json.loads(read(files[json_button]))
    assert data["run_card"] == card.to_dict()
    assert set(data["methods"]) == set(view.result.rankings)


def test_the_compare_table_downloads_as_csv_json_and_markdown(handlers: PageHandlers,
                                                              session: GallerySession) -> None:
    table = shown_table(handlers, session)
    assert handlers.check_table_download(table) == {}
    csv_button, json_button, md_button = handlers.ui.exports.table
    files = handlers.table_files(session.key, table, *handlers.default_controls(session))
    headers, rows = table_values(table)
    card, read_headers, read_rows = read_csv_export(read(files[csv_button]))
    assert read_headers == headers and len(read_rows) == len(rows)
    assert [row[0] for row in read_rows] == [title for _, title in session.methods()]
    assert card.protocol.startswith("leave-one-out")
    entries = {entry.method: entry for entry in card.methods}
    params, source = session.params_for("k_reciprocal")
    assert entries["k_reciprocal"].params == params and entries["k_reciprocal"].source == source
    data = json.loads(read(files[json_button]))
    assert data["headers"] == headers and len(data["rows"]) == len(rows)
    markdown = read(files[md_button]).splitlines()
    assert "| " + " | ".join(headers) + " |" in markdown
    assert len([line for line in markdown if line.startswith("| ")]) == len(rows) + 1
    assert "<details><summary>Run card</summary>" in markdown
    # tabs changed since the table was computed: the card names the setting the table shows
    tabs = handlers.all_params(handlers.default_controls(session))
    tabs["k_reciprocal"]["k1"] = 4
    changed = handlers.flat_controls(tabs)
    card = read_csv_export(read(handlers.table_files(session.key, table, *changed)[csv_button]))[0]
    shown = {entry.method: entry for entry in card.methods}["k_reciprocal"]
    assert shown.params == params and shown.source != CUSTOM


def test_the_exports_folder_keeps_the_newest_files(handlers: PageHandlers,
                                                   explorer: Explorer) -> None:
    folder = exports_folder(explorer.cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(KEEP_EXPORTS + 5):
        (folder / f"old-{number}.csv").write_text("x")
    handlers._prune()
    assert len(list(folder.iterdir())) == KEEP_EXPORTS
