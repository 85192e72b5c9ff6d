"""The failure browser and the Compare tab's chosen pair, called as the page calls them, on the
tiny gallery."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from app.failures import (
    FAILURE_SLOTS,
    GAINS,
    LOSSES,
    STRIP_LENGTH,
    failures_summary,
    p_text,
)
from app.handlers import PageHandlers
from app.text import ALL_CLASSES
from engine import QueryChanges
from engine.explorer import BASELINE, Explorer, GallerySession

METHOD = "k_reciprocal"

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword):Warning")


@pytest.fixture(scope="module")
def session(explorer: Explorer) -> GallerySession:
    session = explorer.session(None)
    for method in (BASELINE, METHOD):
        session.scores(method)
    return session


def show(handlers: PageHandlers, session: GallerySession, order: str = LOSSES,
         class_filter: str = ALL_CLASSES, controls: list | None = None) -> dict:
    values = handlers.default_controls(session) if controls is None else controls
    return handlers.show_failures(session.key, METHOD, class_filter, order, *values)


@pytest.mark.parametrize("order", [LOSSES, GAINS])
def test_the_largest_changes_come_first_with_their_strips(handlers: PageHandlers,
                                                          session: GallerySession,
                                                          order: str) -> None:
    widgets = handlers.ui.failures
    updates = show(handlers, session, order)
    changes = session.query_changes(METHOD)
    chosen = changes.losses if order == LOSSES else changes.gains
    expected = changes.rows[chosen(FAILURE_SLOTS)].tolist()
    assert updates[widgets.listed] == expected
    if order == GAINS:  # k-reciprocal helps some query of the tiny gallery
        assert expected
    labels = session.gallery.labels
    for slot, row in zip(widgets.slots, expected, strict=False):
        position = int(np.flatnonzero(changes.rows == row)[0])
        assert f"AP {changes.before[position]:.3f} → {changes.after[position]:.3f}" in \
            updates[slot.heading]
        for strip, method in ((slot.before, BASELINE), (slot.after, METHOD)):
            items = updates[strip].value
            assert len(items) == STRIP_LENGTH
            ranking = session.rank(method, session.gallery.features[row], row, True)
            for rank, (item, result) in enumerate(zip(items, ranking.indices, strict=False),
                                                  start=1):
                hit = labels[result] == labels[row]
                assert item["caption"] == (f"#{rank} · {session.gallery.class_of(int(result))} "
                                           f"{'✓' if hit else '✗'}")
    for slot in widgets.slots[len(expected):]:
        assert updates[slot.heading] == "" and updates[slot.query]["visible"] is False
    losses = int((changes.change < 0).sum())
    assert f"{losses:,} lose AP" in updates[widgets.summary]


def test_gains_and_a_class_filter(handlers: PageHandlers, session: GallerySession) -> None:
    widgets = handlers.ui.failures
    name = session.gallery.class_names[2]
    updates = show(handlers, session, GAINS, name)
    changes = session.query_changes(METHOD, class_name=name)
    assert updates[widgets.listed] == changes.rows[changes.gains(FAILURE_SLOTS)].tolist()
    assert all(session.gallery.labels[row] == 2 for row in updates[widgets.listed])
    figure = updates[widgets.plot]
    points = [point for trace in figure.data[1:] for point in trace.customdata]
    assert sorted(file for file, _ in points) == sorted(
        session.gallery.files[row] for row in changes.rows)
    # every class's mean AP stays in the table (the filter lists queries, not classes)
    assert len(updates[widgets.classes]) == len(session.gallery.class_names)


def test_the_plot_puts_each_query_at_its_two_aps(handlers: PageHandlers,
                                                 session: GallerySession) -> None:
    figure = show(handlers, session)[handlers.ui.failures.plot]
    changes = session.query_changes(METHOD)
    by_file = {session.gallery.files[row]: (before, after) for row, before, after in
               zip(changes.rows, changes.before, changes.after, strict=True)}
    assert figure.data[0].name == "no change"
    seen = 0
    for trace in figure.data[1:]:
        for x, y, (file, _) in zip(trace.x, trace.y, trace.customdata, strict=True):
            assert (x, y) == pytest.approx(by_file[file])
            seen += 1
    assert seen == len(changes.rows)


def test_query_with_it_makes_the_listed_query_the_query(handlers: PageHandlers,
                                                        session: GallerySession) -> None:
    listed = show(handlers, session, GAINS)[handlers.ui.failures.listed]
    controls = handlers.default_controls(session)
    updates = handlers.query_failure(0, session.key, listed, True, 10, METHOD, "backbone",
                                     *controls)
    view = updates[handlers.ui.state]
    assert view.result.source_row == listed[0]
    assert handlers.query_failure(99, session.key, listed, True, 10, METHOD, "backbone",
                                  *controls) == {}


def test_unscored_parameters_say_what_to_do(handlers: PageHandlers,
                                            session: GallerySession) -> None:
    controls = handlers.default_controls(session)
    names = [name for method in handlers.method_names
             for name in handlers.ui.tabs[method].param_names]
    start = sum(len(handlers.ui.tabs[method].param_names)
                for method in handlers.method_names[:handlers.method_names.index(METHOD)])
    k1 = start + handlers.ui.tabs[METHOD].param_names.index("k1")
    assert names[k1] == "k1"
    controls[k1] = 7  # a setting no test scores
    with pytest.raises(gr.Error, match="per-query scores"):
        show(handlers, session, controls=controls)


def test_the_chosen_pair_is_the_engines_paired_comparison(handlers: PageHandlers,
                                                          session: GallerySession) -> None:
    controls = handlers.default_controls(session)
    text = handlers.compare_pair(session.key, METHOD, BASELINE, *controls)
    compared = session.paired(METHOD, BASELINE)
    assert f"mAP difference {compared.difference:+.4f}" in text
    assert f"{compared.low:+.4f} to {compared.high:+.4f}" in text
    assert f"p = {p_text(compared.p_value)}" in text
    assert f"over {compared.queries:,} queries" in text
    with pytest.raises(gr.Error, match="two different"):
        handlers.compare_pair(session.key, METHOD, METHOD, *controls)


def test_p_text() -> None:
    assert p_text(0.04321) == "0.043"
    assert p_text(1.0) == "1.000"
    assert p_text(9.999e-05) == "1.0e-04"


def test_switching_the_gallery_empties_the_browser(handlers: PageHandlers,
                                                   session: GallerySession) -> None:
    widgets = handlers.ui.failures
    updates = handlers.switch_gallery(session.key)
    assert updates[widgets.listed] == [] and updates[widgets.summary] == ""
    assert all(updates[slot.heading] == "" for slot in widgets.slots)


def test_the_summary_counts_and_says_when_nothing_moved() -> None:
    changes = QueryChanges(METHOD, np.arange(4), np.array([0.5, 0.5, 0.2, 0.9]),
                           np.array([0.3, 0.5, 0.6, 0.9]))
    text = failures_summary(changes, None, LOSSES, 1)
    assert "4 queries; 1 lose AP, 1 gain, 2 unchanged; mean change +0.0500" in text
    assert text.endswith("the 1 largest losses.")
    same = QueryChanges(METHOD, np.arange(2), np.array([0.5, 0.4]), np.array([0.5, 0.4]))
    assert failures_summary(same, "daisy", GAINS, 0).endswith("No query gained AP.")
    assert "class daisy" in failures_summary(same, "daisy", GAINS, 0)
