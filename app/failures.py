"""Where a method hurts: the "Where it hurts" tab (failure browser) and the Compare tab's chosen
pair of methods.

The failure browser lists the gallery's scored queries by how much a method changed their AP
against the baseline (leave-one-out, the Compare table's queries): the largest losses (or
gains) first, each with its before/after top-10 strip and a button that makes it the query;
a class filter; a plot of every query's AP before against after (click a point to query with
it: the page's plot script, `app.plot_events`); and each class's mean AP before and after.
The pair compares any two methods on those queries (`GallerySession.paired`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from app.feedback import engine_errors_as_gradio
from app.plot_events import QUERY_AP_ELEM_ID
from app.plots import query_ap_figure
from app.render import hover_urls
from app.text import ALL_CLASSES, BASELINE_LABEL
from engine import BASELINE, GallerySession, QueryChanges, method_title

if TYPE_CHECKING:
    from app.handlers import PageHandlers

FAILURE_SLOTS = 6
"""Queries the failure browser shows at once, each with its two strips."""
STRIP_LENGTH = 10
LOSSES = "largest losses first"
GAINS = "largest gains first"
CLASS_COLUMNS = ["class", "queries", "mAP baseline", "mAP method", "change"]


@dataclass
class FailureSlot:
    """One listed query: its heading, the button that makes it the query, its two strips."""

    heading: gr.Markdown
    query: gr.Button
    before: gr.Gallery
    after: gr.Gallery


@dataclass
class FailureWidgets:
    """The "Where it hurts" tab."""

    method: gr.Dropdown
    class_filter: gr.Dropdown
    order: gr.Radio
    show: gr.Button
    summary: gr.Markdown
    plot: gr.Plot
    classes: gr.Dataframe
    slots: list[FailureSlot]
    listed: gr.State
    """The gallery rows the slots show, in slot order."""

    def outputs(self) -> list[Any]:
        """Every component `show_failures` updates."""
        shown: list[Any] = [self.summary, self.plot, self.classes, self.listed]
        for slot in self.slots:
            shown += [slot.heading, slot.query, slot.before, slot.after]
        return shown


@dataclass
class PairWidgets:
    """The Compare tab's chosen pair of methods."""

    first: gr.Dropdown
    second: gr.Dropdown
    run: gr.Button
    result: gr.Markdown


def build_failures_tab(method_names: list[str], session: GallerySession) -> FailureWidgets:
    """The failure browser's components (inside the caller's `gr.Tab`)."""
    gr.Markdown("Each labelled gallery image as a query against the others (the Compare "
                "table's queries), sorted by how much the method changed its AP against the "
                "baseline. Click a point of the plot, or *Query with it*, to make it the "
                "query.")
    with gr.Row():
        method = gr.Dropdown(choices=[(method_title(name), name) for name in method_names],
                             value=method_names[0] if method_names else None, label="Method",
                             scale=2, elem_id="failures-method")
        class_filter = gr.Dropdown(choices=[ALL_CLASSES, *session.gallery.class_names],
                                   value=ALL_CLASSES, label="Class", scale=2,
                                   elem_id="failures-class")
        order = gr.Radio(choices=[LOSSES, GAINS], value=LOSSES, label="Order", scale=2)
        show = gr.Button("Show", scale=1, elem_id="failures-show")
    summary = gr.Markdown(elem_id="failures-summary")
    with gr.Row(equal_height=False):
        plot = gr.Plot(label="AP per query: baseline against the method (click a point to "
                       "query with it)", elem_id=QUERY_AP_ELEM_ID)
        classes = gr.Dataframe(headers=CLASS_COLUMNS, interactive=False, wrap=True,
                               label="Per class: mean AP before and after, hurt most first",
                               elem_id="failures-classes")
    listed = gr.State([])
    slots = []
    for index in range(FAILURE_SLOTS):
        with gr.Group():
            with gr.Row(equal_height=True):
                heading = gr.Markdown(elem_id=f"failure-{index}")
                query = gr.Button("Query with it", size="sm", scale=0, min_width=140,
                                  visible=False, elem_id=f"failure-query-{index}")
            with gr.Row():
                before = gr.Gallery(label=BASELINE_LABEL, columns=STRIP_LENGTH, rows=1,
                                    height=120, object_fit="cover", interactive=False,
                                    allow_preview=False, visible=False)
                after = gr.Gallery(label="method", columns=STRIP_LENGTH, rows=1, height=120,
                                   object_fit="cover", interactive=False, allow_preview=False,
                                   visible=False)
        slots.append(FailureSlot(heading, query, before, after))
    return FailureWidgets(method, class_filter, order, show, summary, plot, classes, slots,
                          listed)


def build_pair(method_names: list[str]) -> PairWidgets:
    """The chosen pair's components (inside the caller's Compare tab)."""
    choices = [(BASELINE_LABEL, BASELINE)] + [(method_title(name), name)
                                              for name in method_names]
    with gr.Row():
        first = gr.Dropdown(choices=choices, value=method_names[0] if method_names
                            else BASELINE, label="Compare method", scale=2,
                            elem_id="pair-first")
        second = gr.Dropdown(choices=choices, value=method_names[1] if len(method_names) > 1
                             else BASELINE, label="with", scale=2, elem_id="pair-second")
        run = gr.Button("Compare the pair", scale=1, elem_id="pair-run")
    result = gr.Markdown(elem_id="pair-result")
    return PairWidgets(first, second, run, result)


def pair_text(first: str, second: str, compared: Any) -> str:
    """The pair's paired statistics in a sentence (`engine.evaluation.paired`)."""
    test = ("every sign flip enumerated (exact)" if compared.exact
            else f"{compared.permutations:,} random sign flips, seeded")
    return (f"**{method_title(first)} − {method_title(second)}: mAP difference "
            f"{compared.difference:+.4f}** (95 % paired bootstrap interval "
            f"{compared.low:+.4f} to {compared.high:+.4f}, {compared.resamples:,} resamples) "
            f"over {compared.queries:,} queries; paired randomisation test p = "
            f"{p_text(compared.p_value)} ({test}; unadjusted: one chosen pair).")


def p_text(p_value: float) -> str:
    """A p-value for a sentence: three decimals, or two significant digits below 0.001."""
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}"


class FailureEvents:
    """The failure browser's and the pair's events, mixed into `app.handlers.PageHandlers`."""

    def show_failures(self: PageHandlers, key: str, method: str, class_filter: str,
                      order: str, *control_values: Any) -> dict[Any, Any]:
        """List the queries `method` (at its tab's parameters) hurt or helped most."""
        widgets = self.ui.failures
        session = self.session(key)
        if session.gallery.labels is None:
            raise gr.Error("The failure browser needs a labelled gallery (labels.csv or "
                           "sub-folders).", print_exception=False)
        if method not in self.method_names:
            raise gr.Error(f"Pick a method (got {method!r}).", print_exception=False)
        params = self.all_params(control_values)[method]
        class_name = None if class_filter in (None, "", ALL_CLASSES) else class_filter
        with engine_errors_as_gradio():
            changes = session.query_changes(method, params, class_name)
            classes = session.class_changes(method, params)
        positions = (changes.losses(FAILURE_SLOTS) if order == LOSSES
                     else changes.gains(FAILURE_SLOTS))
        rows = [int(changes.rows[position]) for position in positions]
        updates: dict[Any, Any] = {
            widgets.summary: failures_summary(changes, class_name, order, len(rows)),
            widgets.plot: query_ap_figure(changes, session.gallery.files,
                                          session.gallery.labels,
                                          session.gallery.class_names,
                                          hover_urls(self.thumbnails, session),
                                          method_title(method)),
            widgets.classes: [[name, count, round(before, 4), round(after, 4),
                               round(after - before, 4)]
                              for name, count, before, after in classes],
            widgets.listed: rows,
        }
        for index, slot in enumerate(widgets.slots):
            if index >= len(rows):
                updates.update({slot.heading: "", slot.query: gr.update(visible=False),
                                slot.before: gr.Gallery(value=[], visible=False),
                                slot.after: gr.Gallery(value=[], visible=False)})
                continue
            position = positions[index]
            row = rows[index]
            before, after = changes.before[position], changes.after[position]
            updates[slot.heading] = (
                f"**{index + 1}. {Path(session.gallery.files[row]).name}** · "
                f"{session.gallery.class_of(row)} · AP {before:.3f} → {after:.3f} "
                f"({after - before:+.3f})")
            updates[slot.query] = gr.update(visible=True)
            with engine_errors_as_gradio():
                updates[slot.before] = gr.Gallery(
                    value=self.failure_strip(session, BASELINE, row, None),
                    label=f"{BASELINE_LABEL} · AP {before:.3f}", visible=True)
                updates[slot.after] = gr.Gallery(
                    value=self.failure_strip(session, method, row, params),
                    label=f"{method_title(method)} · AP {after:.3f}", visible=True)
        return updates

    def failure_strip(self: PageHandlers, session: GallerySession, method: str, row: int,
                      params: dict[str, Any] | None) -> list[tuple[str, str]]:
        """A listed query's top-10 under `method` (left out of its own results, as scored),
        each captioned with its rank and class and framed hit or miss."""
        gallery = session.gallery
        ranking = session.rank(method, gallery.features[row], row, True, params)
        label = gallery.labels[row]
        items = []
        for rank, result in enumerate(ranking.indices[:STRIP_LENGTH].tolist(), start=1):
            hit = bool(gallery.labels[result] == label)
            items.append((str(self.thumbnails.get(gallery.path_of(result),
                                                  "hit" if hit else "miss")),
                          f"#{rank} · {gallery.class_of(result)} {'✓' if hit else '✗'}"))
        return items

    def query_failure(self: PageHandlers, slot: int, key: str, listed: list[int],
                      leave_out: bool, top_n: float, plot_method: str, space: str,
                      *control_values: Any) -> dict[Any, Any]:
        """*Query with it* under slot `slot`: the listed query becomes the query."""
        if not listed or slot >= len(listed):
            return {}
        session = self.session(key)
        return self.pick(key, session.gallery.files[int(listed[slot])], leave_out, top_n,
                         plot_method, space, *control_values)

    def compare_pair(self: PageHandlers, key: str, first: str, second: str,
                     *control_values: Any) -> str:
        """The chosen pair's paired statistics on the Compare table's queries."""
        if first == second:
            raise gr.Error("Pick two different methods.", print_exception=False)
        session = self.session(key)
        with engine_errors_as_gradio():
            compared = session.paired(first, second, self.all_params(control_values))
        return pair_text(first, second, compared)

    def failure_reset(self: PageHandlers, session: GallerySession) -> dict[Any, Any]:
        """Another gallery: the browser empty, its class filter that gallery's classes."""
        widgets = self.ui.failures
        updates: dict[Any, Any] = {
            widgets.summary: "", widgets.plot: None, widgets.classes: [], widgets.listed: [],
            widgets.class_filter: gr.Dropdown(
                choices=[ALL_CLASSES, *session.gallery.class_names], value=ALL_CLASSES)}
        for slot in widgets.slots:
            updates.update({slot.heading: "", slot.query: gr.update(visible=False),
                            slot.before: gr.Gallery(value=[], visible=False),
                            slot.after: gr.Gallery(value=[], visible=False)})
        return updates


def failures_summary(changes: QueryChanges, class_name: str | None, order: str,
                     shown: int) -> str:
    """One line over the listed queries: how many lose, gain, stay; the mean change."""
    change = changes.change
    if not len(change):
        return "No scored query in this class."
    worse, better = int((change < 0).sum()), int((change > 0).sum())
    scope = f"class {class_name}" if class_name else "every class"
    which = "losses" if order == LOSSES else "gains"
    below = (f"Below: the {shown} largest {which}." if shown
             else f"No query {'lost' if order == LOSSES else 'gained'} AP.")
    return (f"**{method_title(changes.method)}**, {scope}: {len(change):,} queries; "
            f"{worse:,} lose AP, {better:,} gain, {len(change) - worse - better:,} unchanged; "
            f"mean change {change.mean():+.4f}. {below}")
