"""A query result as component updates: the ranked thumbnails of each method's tab and of the
Compare tab, the kNN graph and the embedding map. Functions return {component: value} dicts for
the components they are given; they read the engine's results and draw nothing themselves
(`app.plots` draws)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
import numpy as np

from app import plots
from app.feedback import engine_errors_as_gradio
from app.plots import file_url
from app.text import (
    BASELINE_LABEL,
    distance_text,
    familiarity_text,
    history_text,
    imagenet_text,
    metrics_text,
    rank_change,
    source_text,
)
from app.thumbnails import ThumbnailCache
from engine import (
    BASELINE,
    GallerySession,
    NeighbourhoodGraph,
    QueryResult,
    distance_note,
    method_title,
    neighbourhood_graph,
)

if TYPE_CHECKING:
    from app.layout import MethodWidgets, PageComponents

EDGE_K = 10
"""Neighbours drawn per node in the kNN graph."""
JUNK_CAPTION = "junk (ignored)"
"""A result the revisited ground truth ignores: neither hit nor miss (AP and P@N skip it)."""


@dataclass
class QueryView:
    """One user's last query: the result, its kNN-graph layout and map positions."""

    result: QueryResult
    graph: NeighbourhoodGraph
    map_positions: dict[str, np.ndarray | None] = field(default_factory=dict)


def query_view(session: GallerySession, result: QueryResult, previous: QueryView | None
               ) -> QueryView:
    """The view of a result; the graph layout is kept when the drawn rows did not change,
    so node positions stay put."""
    rows = _drawn_rows(result)
    if previous is not None and set(rows) <= set(previous.graph.rows.tolist()):
        return QueryView(result, previous.graph, previous.map_positions)
    with engine_errors_as_gradio():
        graph = neighbourhood_graph(
            result.feature, session.gallery.features, rows, session.gallery.knn,
            edge_k=EDGE_K, query_row=result.source_row if result.leave_out else None)
    return QueryView(result, graph)


def _drawn_rows(result: QueryResult) -> list[int]:
    rows: list[int] = []
    for method in result.rankings:
        rows.extend(result.top(method)[1].tolist())
    return list(dict.fromkeys(rows))


def ranked_items(thumbnails: ThumbnailCache, session: GallerySession, result: QueryResult,
                 method: str, compare_to_baseline: bool) -> list[tuple[str, str]]:
    """(thumbnail, caption) per top-N result: rank, class, cosine similarity to the query (the
    same scale for every method), the method's own distance, rank change and hit mark (a
    green or red frame and ✓/✗); a result the revisited ground truth ignores (`Ranking.junk`)
    is neither: unframed, captioned "junk (ignored)"."""
    ranking = result.rankings[method]
    distances, indices = result.top(method)
    similarities = ranking.similarities
    baseline_rank = {}
    if compare_to_baseline:
        baseline_rank = {row: rank for rank, row in
                         enumerate(result.rankings[BASELINE].indices.tolist(), start=1)}
    items = []
    for rank, (row, distance) in enumerate(zip(indices.tolist(), distances.tolist(),
                                               strict=True), start=1):
        label = session.gallery.class_of(row) or Path(session.gallery.files[row]).stem
        caption = f"#{rank} · {label}"
        if similarities is not None and rank <= len(similarities):
            caption += f" · cos {similarities[rank - 1]:.3f}"
        caption += f" · d {distance_text(distance)}"
        if compare_to_baseline:
            caption += " · " + rank_change(rank, baseline_rank.get(row), result.top_n)
        mark = None
        if ranking.junk is not None and bool(ranking.junk[rank - 1]):
            caption += f" · {JUNK_CAPTION}"
        elif ranking.relevant is not None:
            hit = bool(ranking.relevant[rank - 1])
            mark = "hit" if hit else "miss"
            caption += " ✓" if hit else " ✗"
        items.append((str(thumbnails.get(session.gallery.path_of(row), mark)), caption))
    return items


def method_updates(tab: MethodWidgets, thumbnails: ThumbnailCache, session: GallerySession,
                   result: QueryResult) -> dict[Any, Any]:
    """One method's tab: the baseline and the method's ranking side by side, its scores."""
    method = tab.name
    baseline_items = gr.Gallery(value=ranked_items(thumbnails, session, result, BASELINE, False),
                                label=f"{BASELINE_LABEL} · top {result.top_n}")
    if method in result.not_ready:
        return {tab.baseline: baseline_items,
                tab.reranked: gr.Gallery(value=[], label=f"{method_title(method)}: "
                                         "not ready yet"),
                tab.metrics: f"**Not ready yet:** {result.not_ready[method]}. The "
                             "baseline is shown; search again when it is ready."}
    if method not in result.rankings:
        message = session.unavailable.get(method, "not run")
        return {tab.metrics: f"**Unavailable on this gallery:** {message}"}
    ranking = result.rankings[method]
    baseline = result.rankings[BASELINE]
    return {
        tab.baseline: baseline_items,
        tab.reranked: gr.Gallery(value=ranked_items(thumbnails, session, result, method, True),
                                 label=f"{ranking.title} · top {result.top_n} · click a "
                                 "result for its evidence"),
        tab.metrics: metrics_text(result, baseline, ranking)
        + f"  \n<small>Captions: cos = cosine similarity to the query in the gallery's "
          f"feature space (the same for every method); d = the method's own distance: "
          f"{distance_note(method)}</small>"
        + history_text(session, result, ranking),
        tab.source: source_text(method, ranking.params, ranking.params_source),
    }


def compare_updates(rows: dict[str, gr.Gallery], thumbnails: ThumbnailCache,
                    session: GallerySession, result: QueryResult) -> dict[Any, Any]:
    """The Compare tab's row per method (`rows`: method -> its gallery component)."""
    updates = {}
    for method, gallery in rows.items():
        if method not in result.rankings:
            why = "not ready yet" if method in result.not_ready else "unavailable"
            updates[gallery] = gr.Gallery(value=[], label=f"{method_title(method)}: {why}")
            continue
        ranking = result.rankings[method]
        label = f"{ranking.title}"
        if ranking.ap is not None:
            label += f" · AP {ranking.ap:.3f} · P@{result.top_n} {ranking.precision:.2f}"
        updates[gallery] = gr.Gallery(
            value=ranked_items(thumbnails, session, result, method, method != BASELINE),
            label=label)
    return updates


def plot_updates(ui: PageComponents, session: GallerySession, view: QueryView,
                 plot_method: str, space: str, thumbnails: ThumbnailCache) -> dict[Any, Any]:
    """The kNN graph and the embedding map of a query, showing `plot_method`'s top results."""
    result = view.result
    method = plot_method if plot_method in result.rankings else BASELINE
    distances, indices = result.top(method)
    gallery = session.gallery
    urls = hover_urls(thumbnails, session)  # both figures show the same hover images
    knn = plots.knn_figure(
        view.graph, indices.tolist(), distances.tolist(), files=gallery.files,
        labels=gallery.labels, class_names=gallery.class_names,
        query_label=result.query_label,
        title=f"kNN graph: query and {method_title(method)} top {result.top_n}",
        thumbnail_urls=urls)
    return {ui.knn_plot: knn,
            ui.map_plot: map_figure(session, view, method, space, thumbnails, urls)}


def hover_urls(thumbnails: ThumbnailCache, session: GallerySession) -> list[str]:
    """The URL of every gallery row's hover thumbnail, "" for one not made yet (they are
    made in the background on first use) and for rows a large gallery's map does not draw
    (`plots.map_sample`)."""
    size = session.gallery.size
    drawn = plots.map_sample(size)
    paths = thumbnails.hover_thumbnails(session.gallery, None if drawn is None else drawn)
    if drawn is None:
        return [file_url(path) if path is not None else "" for path in paths]
    urls = [""] * size  # a large gallery's map draws a sample: only its points hover
    for row, path in zip(drawn.tolist(), paths, strict=True):
        if path is not None:
            urls[row] = file_url(path)
    return urls


def map_figure(session: GallerySession, view: QueryView | None, method: str, space: str,
               thumbnails: ThumbnailCache, urls: list[str] | None = None) -> Any:
    """The gallery's embedding map in `space` (if computed), with the query and `method`'s top
    results when there is a query; hovering a point shows its thumbnail (`urls`: the hover
    URLs when the caller has them already, see `hover_urls`)."""
    spaces = dict(session.map_spaces())
    space = space if space in spaces else "backbone"
    with engine_errors_as_gradio():
        layout = session.embedding_map(space, fit=False)
    if layout is None:
        return plots.embedding_figure(np.zeros((0, 2)), files=[], labels=None,
                                      class_names=[], title="Embedding map: being computed "
                                      "in the background (see the line at the top)")
    gallery = session.gallery
    kwargs: dict[str, Any] = {}
    if view is not None:
        result = view.result
        if space not in view.map_positions:
            with engine_errors_as_gradio():
                view.map_positions[space] = session.query_map_position(result, space)
        distances, indices = result.top(method if method in result.rankings else BASELINE)
        kwargs = {"query_xy": view.map_positions[space], "result_rows": indices.tolist(),
                  "result_distances": distances.tolist()}
    return plots.embedding_figure(
        layout.coordinates, files=gallery.files, labels=gallery.labels,
        class_names=gallery.class_names, title=f"UMAP of {spaces[space]}",
        thumbnail_urls=hover_urls(thumbnails, session) if urls is None else urls, **kwargs)


def query_note(result: QueryResult) -> str:
    """Under the query: what it is, how far it is from the gallery, and the backbone's
    ImageNet guess (small: it is not the page's answer)."""
    what = (f"**Query:** gallery image `{result.source_file}`" if result.source_file
            else "**Query:** an uploaded image")
    if result.query_class:
        what += f" (class {result.query_class})"
    return "\n\n".join(part for part in (what, familiarity_text(result),
                                          imagenet_text(result)) if part)


def example_items(thumbnails: ThumbnailCache, session: GallerySession
                  ) -> list[tuple[str, str]]:
    """(thumbnail, class or file name) of the gallery's example queries."""
    return [(str(thumbnails.get(session.gallery.path_of(session.position_of(name)))),
             session.gallery.class_of(session.position_of(name)) or Path(name).stem)
            for name in session.example_files()]


def query_set_items(thumbnails: ThumbnailCache, session: GallerySession
                    ) -> list[tuple[str, str]]:
    """(thumbnail, name and class) of each query of the session's query features: its image
    under the gallery's image folder when there is one, else a tile with its name."""
    queries = session.query_set
    if queries is None:
        return []
    gallery = session.gallery
    items = []
    for row, name in enumerate(queries.names):
        label = None if queries.labels is None else int(queries.labels[row])
        caption = name if label is None or label < 0 else f"{name} · {gallery.class_names[label]}"
        items.append((str(thumbnails.get(gallery.root / name)), caption))
    return items


def examples_shown(thumbnails: ThumbnailCache, session: GallerySession
                   ) -> tuple[list[tuple[str, str]], str]:
    """The query panel's examples and their label: the session's query features when it has
    some (a query/gallery split), else example images of the gallery."""
    queries = session.query_set
    if queries is None:
        return example_items(thumbnails, session), "Examples: click to query"
    scored = (f", scored by {queries.ground_truth}" if queries.ground_truth
              else ", scored by their labels" if queries.labels is not None else "")
    return (query_set_items(thumbnails, session),
            f"Queries from {queries.source} ({len(queries.names)}{scored}): click to query")


def examples_for(thumbnails: ThumbnailCache, session: GallerySession) -> gr.Gallery:
    """`examples_shown` as an update of the examples gallery."""
    items, label = examples_shown(thumbnails, session)
    return gr.Gallery(value=items, label=label)


def query_set_note(result: QueryResult, name: str, source: str,
                   ground_truth: str | None) -> str:
    """Under the query, for a query of the session's query features: its name and file, what
    scores it (the revisited ground truth's Medium protocol, or its class) and how far it is
    from the gallery."""
    what = f"**Query:** `{name}` from {source}"
    if ground_truth and result.n_positives is not None:
        what += (f" · AP by {ground_truth}, Medium protocol: {result.n_positives} positives, "
                 f"junk ignored (unframed, captioned “{JUNK_CAPTION}”)")
    elif result.query_class:
        what += f" (class {result.query_class})"
    return "\n\n".join(part for part in (what, familiarity_text(result)) if part)
