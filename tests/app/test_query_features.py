"""The page on a features gallery with query features and revisited ground truth: the examples
list offers the queries, picking one ranks it with every method and shows its Medium AP, and
the Compare table is the revisited one (its own headers, Easy/Medium/Hard mAP and mP@k)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

import gradio as gr
import numpy as np
import pytest

from app.handlers import QUERY_SET_PICK, PageHandlers
from app.page import build_app
from engine.evaluation.revisited import REVISITED_TABLE_COLUMNS
from engine.explorer import BASELINE, Explorer, GallerySession
from tests.engine.explorer.test_query_features import (
    A_EASY,
    A_HARD,
    A_JUNK,
    A_MEDIUM_AP,
    A_NEG,
    constructed,
)

# gradio's queue uses pandas options that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")


METHODS = ["k_reciprocal", "gnn"]
"""Two training-free methods keep the module quick; the page still has every method's tab."""


@pytest.fixture(scope="module")
def explorer(tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    """An explorer (no backbone) starting on the constructed gallery with its two queries and
    their ground truth, and a second features gallery without queries."""
    root = tmp_path_factory.mktemp("query-features")
    db, queries, truth = constructed(root)
    explorer = Explorer(None, device="cpu", cache_root=root / "cache", allowed_roots=[root],
                        methods=METHODS)
    explorer.open_features(db, queries=queries, ground_truth=truth)
    plain = root / "allowed" / "plain.npz"
    np.savez(plain, features=np.eye(12, 8, dtype=np.float32) + 0.1)
    explorer.open_features(plain)
    return explorer


@pytest.fixture(scope="module")
def page(explorer: Explorer) -> tuple[gr.Blocks, PageHandlers]:
    handlers = PageHandlers(explorer)
    return build_app(explorer, handlers=handlers), handlers


@pytest.fixture(scope="module")
def handlers(page: tuple[gr.Blocks, PageHandlers]) -> PageHandlers:
    return page[1]


@pytest.fixture(scope="module")
def split(explorer: Explorer) -> GallerySession:
    return explorer.session(None)


def link(query: str) -> Any:
    """Stands in for the gr.Request of a page opened at `?query`."""
    return SimpleNamespace(query_params=dict(parse_qsl(query)))


def controls(handlers: PageHandlers, session: GallerySession) -> list[Any]:
    return [session.params_for(method)[0][name] for method in handlers.method_names
            for name in handlers.ui.tabs[method].param_names]


def test_the_examples_offer_the_query_features(handlers: PageHandlers, split: GallerySession,
                                               explorer: Explorer) -> None:
    ui = handlers.ui
    other = next(key for key in explorer.galleries if key != split.key)
    updates = handlers.switch_gallery(split.key)
    examples = updates[ui.examples]
    assert [item["caption"] for item in examples.value] == ["qa", "qb"]
    assert examples.label == ("Queries from queries.npz (2, scored by gnd_constructed.pkl): "
                              "click to query")
    table = updates[ui.compare_table]
    assert table["headers"] == list(REVISITED_TABLE_COLUMNS)
    back = handlers.switch_gallery(other)
    assert back[ui.examples].label == "Examples: click to query"
    assert isinstance(back[ui.compare_table], list)


def test_a_picked_query_ranks_with_every_method_and_shows_its_medium_ap(
        handlers: PageHandlers, split: GallerySession) -> None:
    ui = handlers.ui
    values = controls(handlers, split)
    event = gr.SelectData(None, {"index": 0, "value": None})
    updates = handlers.pick_example(event, split.key, True, 4, BASELINE, "backbone", *values)
    assert updates[ui.picked] == f"{QUERY_SET_PICK}qa"
    result = updates[ui.state].result
    assert set(result.rankings) == {BASELINE, *METHODS}
    baseline = result.rankings[BASELINE]
    assert baseline.indices[:4].tolist() == [A_EASY, A_JUNK, A_NEG, A_HARD]
    assert baseline.ap == pytest.approx(A_MEDIUM_AP / 100)
    assert f"AP {A_MEDIUM_AP / 100:.3f}" in updates[ui.compare_rows[BASELINE]].label
    assert "`qa` from queries.npz" in updates[ui.query_note]
    assert "Medium protocol: 2 positives" in updates[ui.query_note]
    # "search again" (a new top N) runs the same query
    again = handlers.search(split.key, None, updates[ui.picked], "", True, 6, BASELINE,
                            "backbone", *values)
    assert again[ui.state].result.top_n == 6
    assert again[ui.state].result.rankings[BASELINE].ap == pytest.approx(A_MEDIUM_AP / 100)
    # a method's parameters changed: re-ranked and scored by the ground truth again
    tab = ui.tabs["k_reciprocal"]
    params = dict(split.params_for("k_reciprocal")[0], k1=5, k2=2)
    reranked = handlers.rerank_method("k_reciprocal", split.key, updates[ui.state], BASELINE,
                                      "backbone", *[params[name] for name in tab.param_names])
    ranking = reranked[ui.state].result.rankings["k_reciprocal"]
    assert ranking.params["k1"] == 5 and ranking.ap is not None and 0 <= ranking.ap <= 1
    # the picked state of a query reopens it through `pick` as well (a gallery item named
    # like a query stays a gallery item)
    picked = handlers.pick(split.key, f"{QUERY_SET_PICK}qb", True, 4, BASELINE, "backbone",
                           *values)
    assert picked[ui.state].result.rankings[BASELINE].ap == pytest.approx(1.0)
    with pytest.raises(gr.Error, match="not a query of queries"):
        handlers.pick(split.key, f"{QUERY_SET_PICK}nope", True, 4, BASELINE, "backbone",
                      *values)


def test_compare_computes_the_revisited_table(handlers: PageHandlers,
                                              split: GallerySession) -> None:
    values = controls(handlers, split)
    table = handlers.compute_compare(lambda *args, **kwargs: None, split.key, *values)
    assert table["headers"] == list(REVISITED_TABLE_COLUMNS)
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 1 + len(METHODS)
    assert rows[0]["method"].startswith("Baseline")
    assert (rows[0]["E mAP"], rows[0]["H mAP"]) == (pytest.approx(100.0), pytest.approx(62.5))
    assert rows[0]["M mAP"] == pytest.approx(round((A_MEDIUM_AP + 100) / 2, 2))
    for row in rows:
        scores = [row[name] for name in REVISITED_TABLE_COLUMNS[1:13]]
        assert all(0 <= score <= 100 for score in scores)
    # cached: the table reads the same rows without computing (the timer's refresh)
    assert handlers.compare_rows(split, handlers.all_params(values)) == table
    assert np.isfinite(split.revisited(BASELINE, cached_only=True).scores.map["medium"])


def test_a_junk_result_is_shown_as_junk_not_as_a_miss(handlers: PageHandlers,
                                                      split: GallerySession) -> None:
    """qa's baseline begins easy, junk, negative, hard: ✓, junk (ignored), ✗, ✓; the junk is
    unframed where a hit is green and a miss red, and the AP is the one without it."""
    ui = handlers.ui
    updates = handlers.pick_query(split.key, "qa", 4, BASELINE, "backbone",
                                  *controls(handlers, split))
    row = updates[ui.compare_rows[BASELINE]]
    captions = [item["caption"] for item in row.value]
    assert captions[0].endswith(" ✓") and captions[3].endswith(" ✓")
    assert captions[1].endswith(" · junk (ignored)") and "✗" not in captions[1]
    assert captions[2].endswith(" ✗")
    marks = [item["image"]["orig_name"].rsplit("-", 1)[1] for item in row.value]
    assert marks == ["hit.jpg", "plain.jpg", "miss.jpg", "hit.jpg"]
    assert f"AP {A_MEDIUM_AP / 100:.3f}" in row.label
    assert "junk ignored (unframed" in updates[ui.query_note]
    # every method's strip flags the junk it ranks (the engine's flags, not recomputed)
    for method in METHODS:
        ranking = updates[ui.state].result.rankings[method]
        strip = updates[ui.tabs[method].reranked].value
        for item, junk in zip(strip, ranking.junk[:4].tolist(), strict=True):
            assert ("junk (ignored)" in item["caption"]) == junk


def test_the_link_of_a_query_set_pick_reopens_it(handlers: PageHandlers,
                                                 split: GallerySession) -> None:
    ui = handlers.ui
    changed = {**split.params_for("k_reciprocal")[0], "k1": 7}
    values = [changed[name] if method == "k_reciprocal" else split.params_for(method)[0][name]
              for method in handlers.method_names
              for name in ui.tabs[method].param_names]
    updates = handlers.pick_query(split.key, "qa", 4, BASELINE, "backbone", *values)
    query = handlers.share_link(split.key, updates[ui.state], None, "compare", *values)
    shared = dict(parse_qsl(query))
    assert shared["query"] == "qa" and shared["tab"] == "compare"
    assert shared["k_reciprocal.k1"] == "7" and "file" not in shared and "upload" not in shared

    reopened = handlers.restore(link(query), BASELINE, "backbone", True, 4)
    result = reopened[ui.state].result
    assert result.query_set_name == "qa" and result.source_row is None
    assert reopened[ui.picked] == f"{QUERY_SET_PICK}qa"
    assert result.rankings["k_reciprocal"].params["k1"] == 7
    assert result.rankings[BASELINE].ap == pytest.approx(A_MEDIUM_AP / 100)
    assert result.rankings[BASELINE].indices[:4].tolist() == [A_EASY, A_JUNK, A_NEG, A_HARD]
    assert ui.message not in reopened
    # a name the query set does not hold says so, and the page opens anyway
    gone = handlers.restore(link(f"gallery={split.key}&query=nope"), BASELINE, "backbone",
                            True, 4)
    assert "the link's query" in gone[ui.message] and "'nope' is not a query" in (
        gone[ui.message])


def test_query_features_attach_from_the_page(page: tuple[gr.Blocks, PageHandlers],
                                            explorer: Explorer, tmp_path: Path) -> None:
    """Uploaded query features and ground truth (outside the allowed folders, as Gradio's
    temporary files are) attach to the features gallery shown from kept copies; the examples
    list then offers the queries and the Compare table is the revisited one."""
    demo, handlers = page
    ui = handlers.ui
    wired = [block_fn for block_fn in demo.fns.values()
             if getattr(block_fn.fn, "__wrapped__", None) == handlers.attach_queries]
    assert len(wired) == 1
    assert [block._id for block in wired[0].inputs] == [
        ui.gallery._id, ui.queries_file._id, ui.truth_file._id]
    assert {ui.examples._id, ui.compare_table._id, ui.message._id} <= {
        block._id for block in wired[0].outputs}
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, check_allowed=False)
    assert session.query_set is None
    uploads = tmp_path / "gradio-temp"
    uploads.mkdir()
    shutil.copy(queries, uploads / queries.name)
    shutil.copy(truth, uploads / truth.name)
    with pytest.raises(gr.Error, match="Choose a query features file"):
        handlers.attach_queries(session.key, None, None)
    updates = handlers.attach_queries(session.key, str(uploads / queries.name),
                                      str(uploads / truth.name))
    assert [item["caption"] for item in updates[ui.examples].value] == ["qa", "qb"]
    assert updates[ui.examples].label.startswith("Queries from queries.npz (2, scored by "
                                                 "gnd_constructed.pkl)")
    assert updates[ui.compare_table]["headers"] == list(REVISITED_TABLE_COLUMNS)
    assert "Attached **2 queries** from `queries.npz`" in updates[ui.gallery_status]
    assert updates[ui.queries_file] is None and updates[ui.truth_file] is None
    attached = session.query_set
    assert attached is not None and attached.ground_truth == "gnd_constructed.pkl"
    for upload in uploads.iterdir():  # Gradio cleans its temporary files: copies were kept
        upload.unlink()
    picked = handlers.pick_query(session.key, "qb", 4, BASELINE, "backbone",
                                 *controls(handlers, session))
    assert picked[ui.state].result.rankings[BASELINE].ap == pytest.approx(1.0)
    # a bad file is refused by name and leaves the gallery's queries as they were
    wide = uploads / "wide.npy"
    np.save(wide, np.eye(2, 100, dtype=np.float32))
    with pytest.raises(gr.Error, match=r"wide\.npy have 100 dimensions"):
        handlers.attach_queries(session.key, str(wide), None)
    notes = uploads / "notes.txt"
    notes.write_text("not a pickle")
    np.savez(uploads / "q.npz", features=np.eye(2, 96, dtype=np.float32))
    with pytest.raises(gr.Error, match=r"ground-truth file must be one of \.pkl"):
        handlers.attach_queries(session.key, str(uploads / "q.npz"), str(notes))
    assert session.query_set is attached
