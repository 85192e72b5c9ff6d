"""A re-ranked result's evidence on the page (`app.evidence`): clicking a result of a method's
strip opens the sentence ("moved from #b to #m: " and the method's reason), the numbers, a
strip per group and the kNN graph with the evidence ringed, for every method; "Query with this
image" queries with it; a new query, gallery or setting closes the panel."""

from __future__ import annotations

from typing import Any

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest

import app.evidence
from app import plots
from app.evidence import moved_text, place_text, value_text
from app.handlers import PageHandlers
from app.page import build_app
from engine import Evidence, EvidenceGroup, Explanation
from engine.explorer import BASELINE, Explorer, GallerySession, QueryResult
from engine.rerank import Reranker, list_rerankers
from engine.views.neighbourhood import neighbourhood_graph

TOP = 10
PICK = 3  # a daffodil, as the other page tests pick

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")


@pytest.fixture(scope="module")
def picked(handlers: PageHandlers, session: GallerySession) -> dict[Any, Any]:
    return handlers.pick(session.key, session.gallery.files[PICK], True, TOP, BASELINE,
                         "backbone", *handlers.default_controls(session))


def click(index: int) -> gr.SelectData:
    return gr.SelectData(None, {"index": index, "value": None})


def moved_most(result: QueryResult, method: str) -> int:
    """The place (0-based) in the method's top N of the result the baseline ranked farthest
    below it."""
    baseline = result.rankings[BASELINE].indices.tolist()
    rows = result.top(method)[1].tolist()
    return max(range(len(rows)), key=lambda place: baseline.index(rows[place]) - place)


def node_positions(figure: go.Figure) -> dict[str, tuple[float, float]]:
    """Gallery file -> (x, y) of every node the kNN figure draws."""
    found = {}
    for trace in figure.data:
        if trace.customdata is None or trace.mode == "lines":
            continue
        for data, x, y in zip(trace.customdata, trace.x, trace.y, strict=True):
            found[data[0]] = (round(float(x), 9), round(float(y), 9))
    return found


def ring_positions(figure: go.Figure) -> set[tuple[float, float]]:
    ring = next(trace for trace in figure.data if trace.name == "evidence")
    assert ring.showlegend is not False
    return {(round(float(x), 9), round(float(y), 9)) for x, y in zip(ring.x, ring.y,
                                                                    strict=True)}


def ringed_rows(evidence: Evidence) -> list[int]:
    """The highlighted rows, once each, without the query's own (the pick is left out)."""
    rows = [row for group in evidence.groups if group.highlight for row in group.rows.tolist()]
    return [row for row in dict.fromkeys(rows) if row != PICK]


def check_panel(handlers: PageHandlers, session: GallerySession, updates: dict[Any, Any],
                method: str, explanation: Explanation) -> None:
    """The opened panel shows `explanation` (sentence, numbers, strips, ringed kNN graph)."""
    panel = handlers.ui.tabs[method].evidence
    evidence = explanation.evidence
    gallery = session.gallery
    assert updates[panel.panel].visible is True
    assert updates[panel.item] == gallery.files[evidence.item]
    assert f"{moved_text(explanation)}: {evidence.summary}" in updates[panel.sentence]
    for name in evidence.numbers:
        assert f"| {name} |" in updates[panel.numbers]
    for number, strip in enumerate(panel.groups):
        shown = updates[strip]
        if number >= len(evidence.groups):
            assert shown.visible is False
            continue
        group = evidence.groups[number]
        assert shown.visible is True and group.name in shown.label
        assert f"captioned with their {group.value_name}" in shown.label
        assert len(shown.value) == min(len(group.rows), app.evidence.GROUP_SHOWN)
        values = group.values[:len(shown.value)].tolist()
        assert [item["caption"].split(" · ")[0] for item in shown.value] == [
            value_text(value) for value in values]
    figure = updates[handlers.ui.knn_plot]
    ringed = ringed_rows(evidence)[:app.evidence.EVIDENCE_NODES]
    if not ringed:
        assert all(trace.name != "evidence" for trace in figure.data)
        return
    nodes = node_positions(figure)
    assert {nodes[gallery.files[row]] for row in ringed} == ring_positions(figure)
    assert len(ring_positions(figure)) == len(ringed)


@pytest.mark.parametrize("method", list_rerankers())
def test_a_clicked_result_opens_its_evidence(handlers: PageHandlers, session: GallerySession,
                                             picked: dict[Any, Any], method: str) -> None:
    view = picked[handlers.ui.state]
    place = moved_most(view.result, method)
    item = int(view.result.top(method)[1][place])
    updates = handlers.show_evidence(method, click(place), view)
    explanation = session.explain(view.result, method, item)
    baseline_rank = view.result.rankings[BASELINE].indices.tolist().index(item) + 1
    assert (explanation.method_rank, explanation.baseline_rank) == (place + 1, baseline_rank)
    if baseline_rank != place + 1:
        assert f"moved from #{baseline_rank} to #{place + 1}: " in updates[
            handlers.ui.tabs[method].evidence.sentence]
    check_panel(handlers, session, updates, method, explanation)
    assert handlers.ui.state not in updates  # the query stays; only the panel and plot change


def fake_evidence(result: QueryResult, method: str, item: int) -> Evidence:
    """One group more than the panel shows, one not highlighted, one of every row
    beyond the method's results, the query's own row and a NaN value among them."""
    size = len(result.rankings[BASELINE].indices) + 1
    beyond = np.setdiff1d(np.arange(size), [*result.top(method)[1].tolist(), PICK])
    other = next(row for row in range(size) if row not in (item, PICK))
    return Evidence(method, item, "the test says so", {"first": 1.5, "second": -0.25},
                    (EvidenceGroup("near", np.array([item, PICK, other]),
                                   np.array([1.0, 2.0, np.nan]), "weight"),
                     EvidenceGroup("far", beyond, np.linspace(0, 1, len(beyond)), "vote"),
                     EvidenceGroup("quiet", np.array([1, 2]), np.zeros(2), "weight",
                                   highlight=False),
                     *(EvidenceGroup(f"more {number}", np.array([number]), np.ones(1), "weight")
                       for number in range(4, 4 + app.evidence.MAX_GROUPS - 2))))


def test_any_evidence_renders(handlers: PageHandlers, session: GallerySession,
                              picked: dict[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips cut at GROUP_SHOWN and the graph's rings at EVIDENCE_NODES (both made small
    here: the tiny gallery has 24 images)."""
    method = "k_reciprocal"
    view = picked[handlers.ui.state]
    reranker_class = type(session.reranker(method, view.result.rankings[method].params))
    monkeypatch.setattr(reranker_class, "_explain",
                        lambda self, query, item: fake_evidence(view.result, self.name, item))
    monkeypatch.setattr(app.evidence, "GROUP_SHOWN", 4)
    monkeypatch.setattr(app.evidence, "EVIDENCE_NODES", 6)
    updates = handlers.show_evidence(method, click(0), view)
    explanation = session.explain(view.result, method, int(view.result.top(method)[1][0]))
    check_panel(handlers, session, updates, method, explanation)
    panel = handlers.ui.tabs[method].evidence
    assert f"not shown: more {app.evidence.MAX_GROUPS + 1}" in updates[panel.groups[-1]].label
    assert "| second | -0.25 |" in updates[panel.numbers]
    captions = [item["caption"] for item in updates[panel.groups[0]].value]
    assert captions[0].startswith("1 · this result · ")
    assert captions[1].startswith("2 · the query · ")
    assert captions[2].startswith("– · ")  # NaN: no value
    assert "ringed" not in updates[panel.groups[2]].label  # not highlighted
    far = explanation.evidence.group("far")
    assert updates[panel.groups[1]].label.startswith(f"far · {len(far.rows)} images (the "
                                                     "first 4)")
    title = updates[handlers.ui.knn_plot].layout.title.text
    assert title.endswith(f" #1: the first 6 of {len(ringed_rows(explanation.evidence))} ringed")


def test_a_method_without_evidence_of_its_own_renders_too(
        handlers: PageHandlers, session: GallerySession, picked: dict[Any, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    method = list_rerankers()[0]
    view = picked[handlers.ui.state]
    reranker_class = type(session.reranker(method, view.result.rankings[method].params))
    monkeypatch.setattr(reranker_class, "_explain", Reranker._explain)
    updates = handlers.show_evidence(method, click(1), view)
    explanation = session.explain(view.result, method, int(view.result.top(method)[1][1]))
    assert "gives no evidence of its own" in explanation.evidence.summary
    check_panel(handlers, session, updates, method, explanation)
    assert "| cosine similarity |" in updates[handlers.ui.tabs[method].evidence.numbers]


def test_clicking_before_any_query_or_past_the_results_does_nothing(
        handlers: PageHandlers, picked: dict[Any, Any]) -> None:
    assert handlers.show_evidence("k_reciprocal", click(0), None) == {}
    assert handlers.show_evidence("k_reciprocal", click(TOP), picked[handlers.ui.state]) == {}


def test_query_with_this_image_queries_and_closes_the_panels(
        handlers: PageHandlers, session: GallerySession, picked: dict[Any, Any]) -> None:
    ui = handlers.ui
    file = session.gallery.files[int(picked[ui.state].result.top("k_reciprocal")[1][2])]
    updates = handlers.query_evidence_item(session.key, file, True, TOP, BASELINE, "backbone",
                                           *handlers.default_controls(session))
    assert updates[ui.picked] == file and updates[ui.state].result.source_file == file
    assert all(updates[tab.evidence.panel].visible is False for tab in ui.tabs.values())
    assert handlers.query_evidence_item(session.key, None, True, TOP, BASELINE,
                                        "backbone") == {}


def test_a_new_query_gallery_or_setting_closes_the_panel(
        handlers: PageHandlers, session: GallerySession, picked: dict[Any, Any]) -> None:
    ui = handlers.ui
    assert all(picked[tab.evidence.panel].visible is False for tab in ui.tabs.values())
    switched = handlers.switch_gallery(session.key)
    assert all(switched[tab.evidence.panel].visible is False for tab in ui.tabs.values())
    tab = ui.tabs["k_reciprocal"]
    values = [session.params_for("k_reciprocal")[0][name] for name in tab.param_names]
    reranked = handlers.rerank_method("k_reciprocal", session.key, picked[ui.state], BASELINE,
                                      "backbone", *values)
    assert reranked[tab.evidence.panel].visible is False
    assert all(other.evidence.panel not in reranked for other in ui.tabs.values()
               if other is not tab)


def test_a_methods_strip_opens_evidence_and_the_others_still_query(
        explorer: Explorer) -> None:
    handlers = PageHandlers(explorer)
    demo = build_app(explorer, handlers=handlers)
    by_target = {}
    for block_fn in demo.fns.values():
        for target, event in block_fn.targets:
            by_target.setdefault((target, event), []).append(block_fn)
    for name, tab in handlers.ui.tabs.items():
        (opener,) = by_target[(tab.reranked._id, "select")]
        assert opener.name == f"show_evidence_{name}" and opener.concurrency_id == "query"
        assert tab.evidence.panel in opener.outputs
        assert handlers.ui.knn_plot in opener.outputs
        (picker,) = by_target[(tab.baseline._id, "select")]
        assert picker.name == "pick_result_baseline"
        (requery,) = by_target[(tab.evidence.requery._id, "click")]
        assert requery.name == "query_evidence_item" and handlers.ui.picked in requery.outputs
    for method, row in handlers.ui.compare_rows.items():
        (picker,) = by_target[(row._id, "select")]
        assert picker.name == f"pick_result_{method}"


# -- the words and the figure ------------------------------------------------------------------
def test_places_and_moves_are_worded() -> None:
    evidence = Evidence("k_reciprocal", 4, "because")
    assert moved_text(Explanation(evidence, 3, 14, 288)) == "moved from #14 to #3"
    assert moved_text(Explanation(evidence, 3, 3, 288)) == "stayed at #3"
    assert moved_text(Explanation(evidence, 2, None, 1000)) == (
        "moved from beyond the top 1000 to #2")
    assert place_text(None, 50) == "beyond the top 50"


def test_the_knn_figure_rings_evidence_and_draws_what_lies_beyond(
        session: GallerySession) -> None:
    gallery = session.gallery
    results, beyond = [10, 11, 12], [20, 21]
    graph = neighbourhood_graph(gallery.features[0], gallery.features,
                                [*results, *beyond], gallery.knn, query_row=0)
    figure = plots.knn_figure(graph, results, [0.1, 0.2, 0.3], files=gallery.files,
                              labels=gallery.labels, class_names=gallery.class_names,
                              evidence_rows=[11, 20, 11])
    names = [trace.name for trace in figure.data]
    assert names[-3:] == ["evidence beyond the results", "evidence", "query"]
    outside = figure.data[names.index("evidence beyond the results")]
    assert [data[0] for data in outside.customdata] == [gallery.files[20]]
    nodes = node_positions(figure)
    assert ring_positions(figure) == {nodes[gallery.files[11]], nodes[gallery.files[20]]}
    assert gallery.files[21] not in nodes  # neither a result nor evidence
    plain = plots.knn_figure(graph, results, [0.1, 0.2, 0.3], files=gallery.files,
                             labels=gallery.labels, class_names=gallery.class_names)
    assert "evidence" not in [trace.name for trace in plain.data]
    with pytest.raises(Exception, match="not nodes"):
        plots.knn_figure(graph, results, [0.1, 0.2, 0.3], files=gallery.files,
                         labels=gallery.labels, class_names=gallery.class_names,
                         evidence_rows=[22])
