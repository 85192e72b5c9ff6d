"""A re-ranked result's evidence, one click away in every method's tab.

Clicking a result of a method's ranking (the right-hand strip of its tab) opens a panel below
the strips: where the method moved it ("moved from #14 to #3: " and the method's one-clause
reason), the numbers that made its score as a small table, each set of gallery images the
score rests on as a thumbnail strip captioned with its number, and a button that queries with
the image (what the click did before). The kNN graph is redrawn with the evidence nodes
ringed. The page renders any `Evidence` (engine.core.types) without knowing the method.

`evidence_panel` builds a tab's components; `EvidenceEvents` (mixed into
`app.handlers.PageHandlers`) holds the events; `app.wiring` connects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from app import plots
from app.feedback import engine_errors_as_gradio
from app.render import EDGE_K, QueryView, hover_urls
from app.thumbnails import Mark, ThumbnailCache
from engine import (
    Evidence,
    Explanation,
    Explorer,
    GallerySession,
    QueryResult,
    method_title,
    neighbourhood_graph,
)

if TYPE_CHECKING:
    from app.layout import MethodWidgets, PageComponents

MAX_GROUPS = 6
"""Thumbnail strips a panel holds (a method's evidence has a few groups, ICFRR's six: its
voters per iteration; more are named, not shown)."""
GROUP_SHOWN = 30
"""Thumbnails shown per group (the strip's label gives the group's full size)."""
EVIDENCE_NODES = 40
"""Evidence rows drawn on the kNN graph at most (in the groups' order): the layout stays
legible and quick."""


@dataclass
class EvidencePanel:
    """The evidence panel of one method's tab (hidden until a result is clicked)."""

    panel: gr.Column
    sentence: gr.Markdown
    numbers: gr.Markdown
    groups: list[gr.Gallery]
    requery: gr.Button
    """"Query with this image": what clicking a result did before the panel."""
    item: gr.State
    """The gallery file explained (what `requery` queries with), or None."""

    def outputs(self) -> list[Any]:
        """What opening the panel updates (the kNN plot aside)."""
        return [self.panel, self.sentence, self.numbers, *self.groups, self.item]


def evidence_panel(name: str) -> EvidencePanel:
    """Build one method's evidence panel (inside its tab, below the strips), hidden."""
    with gr.Column(visible=False, elem_id=f"evidence-{name}",
                   elem_classes=["evidence"]) as panel:
        sentence = gr.Markdown("", elem_id=f"evidence-sentence-{name}")
        numbers = gr.Markdown("", elem_id=f"evidence-numbers-{name}")
        groups = [gr.Gallery(value=[], visible=False, columns=10, height=210,
                             object_fit="cover", interactive=False, allow_preview=False,
                             elem_id=f"evidence-group-{name}-{number}")
                  for number in range(MAX_GROUPS)]
        requery = gr.Button("Query with this image", size="sm", elem_id=f"evidence-query-{name}")
    return EvidencePanel(panel, sentence, numbers, groups, requery, gr.State(None))


def hidden(panel: EvidencePanel) -> dict[Any, Any]:
    """The panel closed (a new query or gallery: its evidence would be stale)."""
    return {panel.panel: gr.Column(visible=False), panel.item: None}


# -- text -------------------------------------------------------------------------------------
def place_text(rank: int | None, depth: int) -> str:
    """'#3', or 'beyond the top 1000' for an item a ranking does not hold."""
    return f"#{rank}" if rank is not None else f"beyond the top {depth}"


def moved_text(explanation: Explanation) -> str:
    """'moved from #14 to #3' (from the baseline's place to the method's), or 'stayed at #3'."""
    before = place_text(explanation.baseline_rank, explanation.depth)
    after = place_text(explanation.method_rank, explanation.depth)
    if before == after:
        return f"stayed at {after}"
    return f"moved from {before} to {after}"


def sentence_text(explanation: Explanation, name: str) -> str:
    """The panel's first line: which image, where the method moved it, and why."""
    title = method_title(explanation.evidence.method)
    return (f"**{title}** · `{name}` {moved_text(explanation)}: "
            f"{explanation.evidence.summary}")


def numbers_table(evidence: Evidence) -> str:
    """The evidence's named numbers as a two-column Markdown table ('' for none)."""
    if not evidence.numbers:
        return ""
    lines = ["| number | value |", "|---|---:|"]
    lines += [f"| {name} | {value_text(value)} |" for name, value in evidence.numbers.items()]
    return "\n".join(lines)


def value_text(value: float) -> str:
    """A number of the evidence with 4 significant digits ('–' when it has none)."""
    return f"{value:.4g}" if np.isfinite(value) else "–"


# -- components ---------------------------------------------------------------------------------
def group_updates(panel: EvidencePanel, thumbnails: ThumbnailCache, session: GallerySession,
                  result: QueryResult, evidence: Evidence) -> dict[Any, Any]:
    """A strip per evidence group (its first `GROUP_SHOWN` images, captioned with their
    value), the unused strips hidden; groups past `MAX_GROUPS` are named in the last label."""
    gallery = session.gallery
    updates: dict[Any, Any] = {}
    groups = evidence.groups
    for number, strip in enumerate(panel.groups):
        if number >= len(groups):
            updates[strip] = gr.Gallery(value=[], visible=False)
            continue
        group = groups[number]
        items = []
        for row, value in zip(group.rows[:GROUP_SHOWN].tolist(),
                              group.values[:GROUP_SHOWN].tolist(), strict=True):
            name = gallery.class_of(row) or Path(gallery.files[row]).stem
            if row == evidence.item:
                name = f"this result · {name}"
            elif row == result.source_row:
                name = f"the query · {name}"
            items.append((str(thumbnails.get(gallery.path_of(row), _mark(result, session,
                                                                          row))),
                          f"{value_text(value)} · {name}"))
        label = f"{group.name} · {len(group.rows)} images"
        if len(group.rows) > GROUP_SHOWN:
            label += f" (the first {GROUP_SHOWN})"
        label += f", captioned with their {group.value_name}"
        if group.highlight:
            label += " · ringed on the kNN graph"
        if number == len(panel.groups) - 1 and len(groups) > len(panel.groups):
            label += " · not shown: " + ", ".join(g.name for g in groups[len(panel.groups):])
        updates[strip] = gr.Gallery(value=items, label=label, visible=True)
    return updates


def _mark(result: QueryResult, session: GallerySession, row: int) -> Mark:
    """A hit or miss frame when the query's class is known (as the ranked strips have)."""
    labels = session.gallery.labels
    if result.query_label is None or labels is None or labels[row] < 0:
        return None
    return "hit" if int(labels[row]) == result.query_label else "miss"


def evidence_rows(evidence: Evidence, skip: int | None) -> np.ndarray:
    """The highlighted groups' rows in their order, once each, without `skip` (the query's
    own row: it is the query's node)."""
    rows = [row for group in evidence.groups if group.highlight for row in group.rows.tolist()]
    return np.asarray([row for row in dict.fromkeys(rows) if row != skip], np.int64)


def evidence_figure(session: GallerySession, view: QueryView, method: str,
                    explanation: Explanation, thumbnails: ThumbnailCache) -> Any:
    """The kNN graph of `method`'s results with the evidence nodes ringed: the view's layout
    when it holds every evidence row, else one laid out again with them added."""
    result = view.result
    distances, indices = result.top(method)
    skip = result.source_row if result.leave_out else None
    every = evidence_rows(explanation.evidence, skip)
    evidence = every[:EVIDENCE_NODES]
    graph = view.graph
    missing = evidence[~np.isin(evidence, graph.rows)]
    if missing.size:
        gallery = session.gallery
        with engine_errors_as_gradio():
            graph = neighbourhood_graph(
                result.feature, gallery.features, [*graph.rows.tolist(), *missing.tolist()],
                gallery.knn, edge_k=EDGE_K, query_row=skip)
    gallery = session.gallery
    count = (f"{len(every)}" if len(every) == len(evidence)
             else f"the first {len(evidence)} of {len(every)}")
    return plots.knn_figure(
        graph, indices.tolist(), distances.tolist(), files=gallery.files,
        labels=gallery.labels, class_names=gallery.class_names,
        query_label=result.query_label,
        title=f"Evidence of {method_title(method)} "
              f"{place_text(explanation.method_rank, explanation.depth)}: {count} ringed",
        thumbnail_urls=hover_urls(thumbnails, session), evidence_rows=evidence.tolist())


# -- events -----------------------------------------------------------------------------------
class EvidenceEvents:
    """Opening a re-ranked result's evidence, and querying with it (mixed into
    PageHandlers)."""

    explorer: Explorer
    thumbnails: ThumbnailCache
    ui: PageComponents
    session: Callable[[str | None], GallerySession]
    pick: Callable[..., dict[Any, Any]]

    def show_evidence(self, method: str, event: gr.SelectData, view: QueryView | None
                      ) -> dict[Any, Any]:
        """A result of `method`'s ranking was clicked: open its evidence in the method's
        tab and ring the evidence on the kNN graph. Nothing before a query."""
        if view is None:
            return {}
        result = view.result
        if method not in result.rankings:
            return {}
        rows = result.top(method)[1]
        if not 0 <= event.index < len(rows):
            return {}
        item = int(rows[event.index])
        session = self.session(result.gallery_key)
        with engine_errors_as_gradio():
            explanation = session.explain(result, method, item)
        panel = self.evidence_panel_of(method)
        file = session.gallery.files[item]
        return {
            panel.panel: gr.Column(visible=True),
            panel.sentence: sentence_text(explanation, file),
            panel.numbers: numbers_table(explanation.evidence),
            **group_updates(panel, self.thumbnails, session, result, explanation.evidence),
            panel.item: file,
            self.ui.knn_plot: evidence_figure(session, view, method, explanation,
                                              self.thumbnails),
        }

    def query_evidence_item(self, key: str, file: str | None, leave_out: bool, top_n: float,
                            plot_method: str, space: str, *control_values: Any
                            ) -> dict[Any, Any]:
        """"Query with this image": the explained result becomes the query (`pick`)."""
        if not file:
            return {}
        return self.pick(key, file, leave_out, top_n, plot_method, space, *control_values)

    def evidence_panel_of(self, method: str) -> EvidencePanel:
        panel = self.ui.tabs[method].evidence
        if panel is None:
            raise RuntimeError(f"the tab of {method} was built without an evidence panel")
        return panel

    def hide_evidence(self, tabs: list[MethodWidgets] | None = None) -> dict[Any, Any]:
        """Every tab's (or `tabs`') evidence panel closed: what a new query shows."""
        updates: dict[Any, Any] = {}
        for tab in self.ui.tabs.values() if tabs is None else tabs:
            if tab.evidence is not None:
                updates.update(hidden(tab.evidence))
        return updates
