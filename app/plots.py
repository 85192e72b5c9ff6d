"""Plotly figures of the explorer page: the kNN graph around a query's results, the gallery
embedding with the results marked, and parameter sweeps.

Pure builders (arrays in, `go.Figure` out, no gradio), so they are tested without a UI. Figures
that the page redraws when the user toggles between methods keep their axis ranges and trace
order fixed and set a constant `uirevision`, so nothing moves or rescales and a zoom survives.

Every point of a gallery image carries `customdata` = [file name, thumbnail URL or ""], which
the page's script (`app/plot_events.js`) reads to show the thumbnail on hover and to turn a
click or a lasso into a query; the query's own marker carries none.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import plotly.colors
import plotly.graph_objects as go

from engine import NeighbourhoodGraph, Trial, best_trial
from engine.errors import InvalidInputError

UNLABELLED_COLOUR = "#9e9e9e"
QUERY_COLOUR = "#222222"
OUTLINE_COLOUR = "#1a1a1a"
BACKGROUND_COLOUR = "#ffffff"
PALETTE_SIZE = 24
PALETTE_LIGHTNESS = (0.40, 0.75)
"""OKLab lightness of class colours: visible on white, white node numbers legible on them."""
PALETTE_CHROMA = 0.10
"""Least OKLab chroma of a class colour: far from the grey of unlabelled images."""
LARGEST_NODE, SMALLEST_NODE = 28.0, 12.0
EVIDENCE_NODE = 10.0
"""Size of an evidence node of the kNN graph that is not among the results (unnumbered)."""
EVIDENCE_COLOUR = "#111111"
EVIDENCE_RING_GAP, EVIDENCE_RING_WIDTH = 9.0, 2.5
"""An evidence node's ring: this much wider than the node, this thick (the nodes' own
outline is thin and white, so the dark ring stands out on any class colour)."""
AXIS_MARGIN = 0.15
"""Room around the layout's bounding box (fraction of its wider side) for markers and labels."""
PLOT_HEIGHT = 460
"""Height of the kNN graph and the map in px (the kNN layout's node spacing assumes it)."""
MAP_FENCE = 1.5
MAP_POINT_LIMIT = 20000
"""The most gallery points the map draws: a larger gallery shows a fixed random sample of
this many (its query and results always), so one update stays a few MB."""
MAX_CLASS_TRACES = 40
"""Above this many classes on the map, one trace coloured per point (no legend) replaces one
trace per class: plotly slows down with thousands of traces."""
WEBGL_POINTS = 2000
"""Above this many points a scatter is drawn with WebGL (SVG slows down past a few thousand)."""
"""The embedding map's initial view spans the quartiles -/+ this many interquartile ranges
(Tukey's fences) on each axis, clipped to the data: a few far clusters fall outside instead of
squeezing the bulk of the gallery into a corner (zooming out shows them)."""
MAP_MARGIN = 0.05
"""Room on each side of the map's initial view, as a fraction of its span."""
FILE_ROUTE = "gradio_api/file="
"""Where Gradio 6 serves a file under `launch(allowed_paths=...)`: `<page root>/gradio_api/
file=<absolute path>` (gradio/routes.py `file`, API_PREFIX in gradio/route_utils.py)."""


@functools.lru_cache(maxsize=1 << 16)
def file_url(path: str | Path) -> str:
    """The URL of a file the page serves (it must lie under one of launch's `allowed_paths`).

    Relative to the page (no leading slash), so it also works behind a proxy that serves the
    page under a sub-path; the absolute path is percent-encoded (spaces, '#', '?').
    """
    return FILE_ROUTE + quote(Path(path).absolute().as_posix(), safe="/")


def _oklab(rgb: np.ndarray) -> np.ndarray:
    """(n, 3) sRGB in [0, 255] as (n, 3) OKLab (L, a, b), whose Euclidean distance follows
    perceived difference (Ottosson 2020) better than CIELAB's, notably among pinks and blues."""
    value = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)
    to_lms = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                       [0.2119034982, 0.6806995451, 0.1073969566],
                       [0.0883024619, 0.2817188376, 0.6299787005]])
    to_lab = np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                       [1.9779984951, -2.4285922050, 0.4505937099],
                       [0.0259040371, 0.7827717662, -0.8086757660]])
    return np.cbrt(linear @ to_lms.T) @ to_lab.T


def _hex_rgb(colour: str) -> list[int]:
    return [int(colour[i:i + 2], 16) for i in (1, 3, 5)]


def perceptual_distance(first: str, second: str) -> float:
    """Euclidean OKLab distance of two '#rrggbb' colours (about 0.02 is just noticeable)."""
    lab = _oklab(np.array([_hex_rgb(first), _hex_rgb(second)]))
    return float(np.linalg.norm(lab[0] - lab[1]))


def distinct_palette(size: int = PALETTE_SIZE) -> tuple[str, ...]:
    """`size` class colours, each the farthest (in OKLab) from those before it.

    Candidates are an sRGB grid (steps of 15) within PALETTE_LIGHTNESS and PALETTE_CHROMA;
    the greedy farthest-point pick starts as far as it can from the unlabelled grey, the
    query's near-black and the white background, so no class looks like those. Deterministic:
    ties go to the first candidate. Any prefix is as spread as the greedy pick allows, so the
    first classes of a gallery get the most distinct colours.
    """
    levels = np.arange(0, 256, 15)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = _oklab(grid)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    usable = ((lab[:, 0] >= PALETTE_LIGHTNESS[0]) & (lab[:, 0] <= PALETTE_LIGHTNESS[1])
              & (chroma >= PALETTE_CHROMA))
    grid, lab = grid[usable], lab[usable]
    avoided = _oklab(np.array([_hex_rgb(colour) for colour in
                               (UNLABELLED_COLOUR, QUERY_COLOUR, BACKGROUND_COLOUR)]))
    nearest = np.linalg.norm(lab[:, None] - avoided[None], axis=2).min(axis=1)
    picked = []
    for _ in range(size):
        best = int(np.argmax(nearest))
        picked.append("#{:02x}{:02x}{:02x}".format(*grid[best].tolist()))
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[best], axis=1))
    return tuple(picked)


PALETTE = distinct_palette()
"""Class colours by label, cycled after PALETTE_SIZE (Oxford-17 needs no repeat)."""


def class_colour(label: int | None) -> str:
    """The colour of class `label`, the same in every figure; grey for None or -1 (unlabelled)."""
    if label is None or int(label) < 0:
        return UNLABELLED_COLOUR
    return PALETTE[int(label) % len(PALETTE)]


def class_name(label: int | None, class_names: Sequence[str]) -> str:
    """The display name of `label` ("unlabelled" for None or -1, the number if unnamed)."""
    if label is None or int(label) < 0:
        return "unlabelled"
    return str(class_names[int(label)]) if int(label) < len(class_names) else str(int(label))


def knn_figure(graph: NeighbourhoodGraph, ranking_rows: Sequence[int],
               ranking_distances: Sequence[float], *, files: Sequence[str],
               labels: np.ndarray | None, class_names: Sequence[str],
               query_label: int | None = None, title: str = "",
               thumbnail_urls: Sequence[str] | None = None,
               evidence_rows: Sequence[int] = ()) -> go.Figure:
    """The query and one method's results as a graph, laid out by `graph.positions`.

    Only the edges between shown nodes are drawn: mutual ones (each among the other's nearest)
    wide and solid in one trace, one-way ones thin and dotted in another. Nodes are coloured by
    class, numbered by rank and shrink with rank. The axis ranges come from every node of
    `graph`, so the figures of two methods made from the same graph line up exactly. Box and
    lasso selection are left out of the modebar (only the map selects).

    Args:
        graph: the layout and edges of the union of the methods' results.
        ranking_rows: gallery rows of this method's results, best first (all in graph.rows).
        ranking_distances: their distances, same length.
        files: file name of every gallery row; labels: (G,) int class of every row, or None.
        class_names: name of each label; query_label: the query's class, if known.
        thumbnail_urls: URL of every gallery row's thumbnail ("" for none; see `file_url`),
            carried in each node's customdata for the hover image; None: no images.
        evidence_rows: gallery rows a method's evidence rests on (all in graph.rows; see
            `app.evidence`): each gets a dark ring, under one legend entry "evidence"; those
            that are not among the results are drawn too, as small unnumbered nodes.
    Returns:
        Traces in a fixed order: one-way edges, mutual edges, one node trace per class shown
        (ascending label, unlabelled last), with evidence: the evidence beyond the results
        and the rings; the query.
    """
    rows, distances = _ranking(ranking_rows, ranking_distances)
    _check_urls(thumbnail_urls, files)
    nodes = graph.nodes_of(rows)
    evidence = np.asarray(evidence_rows, dtype=np.int64).reshape(-1)
    evidence = evidence[np.sort(np.unique(evidence, return_index=True)[1])]
    beyond = evidence[~np.isin(evidence, rows)]
    beyond_nodes = graph.nodes_of(beyond)
    shown = np.zeros(len(graph.positions), bool)
    shown[0] = True
    shown[nodes] = True
    shown[beyond_nodes] = True
    drawn = shown[graph.edges].all(axis=1)
    positions = graph.positions
    figure = go.Figure()
    for mutual, name, line in ((False, "one-way neighbours",
                                {"width": 1.0, "dash": "dot", "color": "rgba(90,90,90,0.45)"}),
                               (True, "mutual neighbours",
                                {"width": 3.0, "color": "rgba(40,40,40,0.85)"})):
        x, y = _segments(positions, graph.edges[drawn & (graph.mutual == mutual)])
        figure.add_trace(go.Scatter(x=x, y=y, mode="lines", name=name, line=line,
                                    hoverinfo="skip"))

    ranks = np.arange(1, len(rows) + 1)
    sizes = LARGEST_NODE - (LARGEST_NODE - SMALLEST_NODE) * (ranks - 1) / max(len(rows) - 1, 1)
    row_labels = _labels_of(rows, labels)
    for label in _label_order(row_labels):
        members = np.flatnonzero(row_labels == label)
        name = class_name(label, class_names)
        figure.add_trace(go.Scatter(
            x=positions[nodes[members], 0], y=positions[nodes[members], 1],
            mode="markers+text", name=name, text=[str(rank) for rank in ranks[members]],
            textposition="middle center", textfont={"color": "white", "size": 10},
            marker={"color": class_colour(label), "size": sizes[members],
                    "line": {"color": "white", "width": 1}},
            hovertext=[f"<b>#{ranks[i]}</b> {files[rows[i]]}<br>class: {name}"
                       f"<br>distance: {distances[i]:.4f}" for i in members],
            customdata=_point_data(rows[members], files, thumbnail_urls),
            hovertemplate="%{hovertext}<extra></extra>"))
    if evidence.size:
        _evidence_traces(figure, positions, evidence, rows, nodes, sizes, beyond,
                         beyond_nodes, files, labels, class_names, thumbnail_urls)
    query_class = ("" if query_label is None
                   else f"<br>class: {class_name(query_label, class_names)}")
    figure.add_trace(go.Scatter(
        x=positions[:1, 0], y=positions[:1, 1], mode="markers+text", name="query",
        text=["query"], textposition="top center", showlegend=False,
        marker={"symbol": "star", "size": 30, "line": {"color": OUTLINE_COLOUR, "width": 1.5},
                "color": QUERY_COLOUR if query_label is None else class_colour(query_label)},
        hovertext=[f"<b>query</b>{query_class}"], hovertemplate="%{hovertext}<extra></extra>"))

    x_range, y_range = _fixed_ranges(positions)
    figure.update_layout(
        title=title, uirevision="knn-graph", height=PLOT_HEIGHT, hovermode="closest",
        plot_bgcolor="white",
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        legend={"orientation": "h", "yanchor": "top", "y": -0.02},
        modebar={"remove": ["select2d", "lasso2d"]},
        xaxis={"range": x_range, "visible": False, "constrain": "domain"},
        yaxis={"range": y_range, "visible": False, "constrain": "domain",
               "scaleanchor": "x", "scaleratio": 1})
    return figure


def _evidence_traces(figure: go.Figure, positions: np.ndarray, evidence: np.ndarray,
                     rows: np.ndarray, nodes: np.ndarray, sizes: np.ndarray,
                     beyond: np.ndarray, beyond_nodes: np.ndarray, files: Sequence[str],
                     labels: np.ndarray | None, class_names: Sequence[str],
                     thumbnail_urls: Sequence[str] | None) -> None:
    """The kNN figure's evidence: the evidence rows beyond the results as small class-coloured
    nodes (they hover and click as any node), then a ring around every evidence node (it
    neither hovers nor clicks: the node under it does)."""
    beyond_labels = _labels_of(beyond, labels)
    figure.add_trace(go.Scatter(
        x=positions[beyond_nodes, 0], y=positions[beyond_nodes, 1], mode="markers",
        name="evidence beyond the results", showlegend=False,
        marker={"color": [class_colour(label) for label in beyond_labels],
                "size": EVIDENCE_NODE, "line": {"color": "white", "width": 1}},
        hovertext=[f"{files[row]}<br>class: {class_name(label, class_names)}<br>evidence, "
                   "not among these results"
                   for row, label in zip(beyond, beyond_labels, strict=True)],
        customdata=_point_data(beyond, files, thumbnail_urls),
        hovertemplate="%{hovertext}<extra></extra>"))
    ranked = np.flatnonzero(np.isin(rows, evidence))
    ring_nodes = np.concatenate([nodes[ranked], beyond_nodes])
    ring_sizes = np.concatenate([sizes[ranked], np.full(len(beyond), EVIDENCE_NODE)])
    figure.add_trace(go.Scatter(
        x=positions[ring_nodes, 0], y=positions[ring_nodes, 1], mode="markers",
        name="evidence", hoverinfo="skip",
        marker={"symbol": "circle-open", "size": ring_sizes + EVIDENCE_RING_GAP,
                "color": EVIDENCE_COLOUR, "line": {"color": EVIDENCE_COLOUR,
                                                   "width": EVIDENCE_RING_WIDTH}}))


def map_sample(size: int, limit: int = MAP_POINT_LIMIT) -> np.ndarray | None:
    """The gallery rows a map of `size` points draws: None (all) up to `limit`, else a fixed
    seeded random sample of `limit` rows, ascending (the same every time)."""
    if size <= limit:
        return None
    return np.sort(np.random.default_rng(0).choice(size, limit, replace=False))


def embedding_figure(coordinates: np.ndarray, *, files: Sequence[str],
                     labels: np.ndarray | None, class_names: Sequence[str],
                     query_xy: Sequence[float] | None = None,
                     result_rows: Sequence[int] = (), result_distances: Sequence[float] = (),
                     query_row: int | None = None, title: str = "",
                     thumbnail_urls: Sequence[str] | None = None,
                     point_limit: int = MAP_POINT_LIMIT) -> go.Figure:
    """The whole gallery in 2-D coloured by class, the query as a star joined to its results.

    The gallery is drawn with WebGL (thousands of points stay fast); the few results, lines and
    the query are SVG traces, which plotly draws on top. The initial view (`map_ranges`) fills
    the plot with the bulk of the gallery and the query; far outliers may lie outside it. The
    modebar offers box and lasso selection (the drag still zooms by default).

    Args:
        coordinates: (G, 2) position of every gallery row.
        files, labels, class_names: as for `knn_figure` (labels None: one colour).
        query_xy: the query's position; without it, `query_row`'s position (a gallery pick).
        result_rows: gallery rows of the results, best first; result_distances: their
            distances (or empty: hover without them).
        thumbnail_urls: as for `knn_figure` (only the drawn rows' are read).
        point_limit: above this many rows, only `map_sample`'s fixed sample of the gallery is
            drawn (the results and the query always), and the title says so.
    Returns:
        Traces in a fixed order: the gallery (one per class, ascending label, "unlabelled"
        last; one "gallery" trace without labels or above `MAX_CLASS_TRACES` classes), the
        query-result lines, the results, the query.
    """
    coordinates = np.asarray(coordinates, dtype=np.float64)
    if coordinates.ndim != 2 or coordinates.shape[1] != 2:
        raise InvalidInputError(f"coordinates must be (G, 2), got shape {coordinates.shape}")
    size = len(coordinates)
    results = np.asarray(result_rows, dtype=np.int64).reshape(-1)
    distances = np.asarray(result_distances, dtype=np.float64).reshape(-1)
    if len(distances) not in (0, len(results)):
        raise InvalidInputError(f"{len(results)} result rows but {len(distances)} distances")
    if results.size and (results.min() < 0 or results.max() >= size):
        raise InvalidInputError(f"result rows must lie in [0, {size})")
    if query_row is not None and not 0 <= int(query_row) < size:
        raise InvalidInputError(f"query_row must lie in [0, {size}), got {query_row}")
    _check_urls(thumbnail_urls, files)
    if query_xy is not None:
        query = np.asarray(query_xy, dtype=np.float64).reshape(2)
    elif query_row is not None:
        query = coordinates[int(query_row)]
    else:
        query = None

    figure = go.Figure()
    sample = map_sample(size, point_limit)
    drawn = np.arange(size) if sample is None else sample
    drawn_labels = _labels_of(drawn, labels)
    order = _label_order(drawn_labels)
    # (trace name, its members' positions in `drawn`, colour, shown in the legend)
    if labels is None:
        groups = [("gallery", np.arange(len(drawn)), PALETTE[0], True)]
    elif len(order) > MAX_CLASS_TRACES:
        groups = [("gallery", np.arange(len(drawn)),
                   [class_colour(label) for label in drawn_labels], False)]
    else:
        groups = [(class_name(label, class_names), np.flatnonzero(drawn_labels == label),
                   class_colour(label), True) for label in order]
    for name, positions, colour, legend in groups:
        members = drawn[positions]
        point_classes = ["gallery" if labels is None else class_name(label, class_names)
                         for label in drawn_labels[positions]]
        figure.add_trace(go.Scattergl(
            x=coordinates[members, 0], y=coordinates[members, 1], mode="markers", name=name,
            showlegend=None if legend else False,
            marker={"color": colour, "size": 5, "opacity": 0.6},
            hovertext=[f"{files[row]}<br>class: {point_class}"
                       for row, point_class in zip(members, point_classes, strict=True)],
            customdata=_point_data(members, files, thumbnail_urls),
            hovertemplate="%{hovertext}<extra></extra>"))
    if sample is not None:
        title += (f"<br><sup>{len(sample):,} of {size:,} points drawn (a fixed random sample; "
                  "the query and its results always)</sup>")

    x, y = [], []
    if query is not None:                       # point 0 = the query, 1.. = the results
        spokes = np.stack([np.zeros(len(results), np.int64), np.arange(1, len(results) + 1)], 1)
        x, y = _segments(np.concatenate([query[None], coordinates[results]]), spokes)
    figure.add_trace(go.Scatter(x=x, y=y, mode="lines", name="query → results", showlegend=False,
                                line={"color": "rgba(40,40,40,0.5)", "width": 1},
                                hoverinfo="skip"))
    result_labels = _labels_of(results, labels)
    hover = [f"<b>#{rank}</b> {files[row]}<br>class: {class_name(label, class_names)}"
             + (f"<br>distance: {distances[rank - 1]:.4f}" if len(distances) else "")
             for rank, (row, label) in enumerate(zip(results, result_labels, strict=True), 1)]
    figure.add_trace(go.Scatter(
        x=coordinates[results, 0], y=coordinates[results, 1], mode="markers", name="results",
        marker={"color": [class_colour(label) for label in result_labels], "size": 12,
                "line": {"color": OUTLINE_COLOUR, "width": 2}},
        hovertext=hover, customdata=_point_data(results, files, thumbnail_urls),
        hovertemplate="%{hovertext}<extra></extra>"))
    figure.add_trace(go.Scatter(
        x=[] if query is None else [query[0]], y=[] if query is None else [query[1]],
        mode="markers", name="query",
        marker={"symbol": "star", "size": 22, "color": QUERY_COLOUR,
                "line": {"color": "white", "width": 1.5}},
        hovertemplate="<b>query</b><extra></extra>"))
    view = map_ranges(coordinates[drawn], query)
    # No equal axis scales: a UMAP's axes mean nothing, and on a wide plot equal scales would
    # widen the x range again and squeeze the points into the middle.
    x_axis: dict[str, Any] = {"visible": False}
    y_axis: dict[str, Any] = {"visible": False}
    if view is not None:
        x_axis["range"], y_axis["range"] = view
        outside = _outside(coordinates[drawn], view)
        if outside:
            title += (f"<br><sup>{outside} of {len(drawn)} points outside this view "
                      "(autoscale in the toolbar shows all)</sup>")
    figure.update_layout(
        title=title, uirevision="embedding", height=PLOT_HEIGHT, hovermode="closest",
        plot_bgcolor="white",
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10},
        modebar={"add": ["select2d", "lasso2d"]}, xaxis=x_axis, yaxis=y_axis)
    return figure


def _outside(coordinates: np.ndarray, view: tuple[list[float], list[float]]) -> int:
    """How many points fall outside the map's initial view."""
    points = np.asarray(coordinates, dtype=np.float64).reshape(-1, 2)
    (x_low, x_high), (y_low, y_high) = view
    inside = ((points[:, 0] >= x_low) & (points[:, 0] <= x_high)
              & (points[:, 1] >= y_low) & (points[:, 1] <= y_high))
    return int((~inside).sum())


def map_ranges(coordinates: np.ndarray, query: np.ndarray | None = None
               ) -> tuple[list[float], list[float]] | None:
    """The embedding map's initial x and y ranges: per axis Tukey's fences (MAP_FENCE), clipped
    to the data, widened to take in the query, plus MAP_MARGIN of the span on each side.

    The bulk of the points then fills the plot (the figure's title counts the points left
    outside). None for no points (plotly picks the ranges).
    """
    points = np.asarray(coordinates, dtype=np.float64).reshape(-1, 2)
    if len(points) == 0:
        return None
    first, third = np.percentile(points, [25, 75], axis=0)
    fence = MAP_FENCE * (third - first)
    low = np.maximum(first - fence, points.min(axis=0))
    high = np.minimum(third + fence, points.max(axis=0))
    if query is not None:
        low, high = np.minimum(low, query), np.maximum(high, query)
    margin = np.where(high > low, MAP_MARGIN * (high - low), 0.5)
    return ([float(low[0] - margin[0]), float(high[0] + margin[0])],
            [float(low[1] - margin[1]), float(high[1] + margin[1])])


def sweep_figure(trials: Sequence[Trial], swept: Sequence[str] | str) -> go.Figure:
    """mAP (solid) and P@1 (dashed) of a sweep against the first swept parameter.

    With a second swept parameter there is one mAP / P@1 pair of lines per value of it (same
    colour for a pair). The best-mAP trial (`engine.evaluation.tuning.best_trial`) is marked
    with a star.
    No trials: an empty figure that says so.
    """
    names = [swept] if isinstance(swept, str) else list(swept)
    figure = go.Figure()
    if not trials:
        figure.add_annotation(text="no trials yet", showarrow=False, x=0.5, y=0.5,
                              xref="paper", yref="paper", font={"size": 16})
        figure.update_layout(xaxis={"visible": False}, yaxis={"visible": False},
                             plot_bgcolor="white")
        return figure
    if len(names) not in (1, 2):
        raise InvalidInputError(f"a sweep plot shows one or two parameters, got {names}")
    missing = [name for name in names if any(name not in trial.params for trial in trials)]
    if missing:
        raise InvalidInputError(f"the trials have no parameter(s) {missing}")

    first = names[0]
    groups = ([(None, list(trials))] if len(names) == 1 else
              [(value, [t for t in trials if t.params[names[1]] == value])
               for value in sorted({trial.params[names[1]] for trial in trials})])
    colours = plotly.colors.qualitative.Plotly
    for number, (value, members) in enumerate(groups):
        members = sorted(members, key=lambda trial: trial.params[first])
        x = [trial.params[first] for trial in members]
        suffix = "" if value is None else f", {names[1]}={_number(value)}"
        for metric, dash, scores in (("mAP", "solid", [t.map for t in members]),
                                     ("P@1", "dash", [t.p1 for t in members])):
            # one parameter: a colour per metric; two: a colour per value of the second
            colour = (colours[number % len(colours)] if value is not None
                      else colours[0 if metric == "mAP" else 1])
            figure.add_trace(go.Scatter(
                x=x, y=scores, mode="lines+markers", name=metric + suffix,
                legendgroup=str(value), line={"color": colour, "dash": dash},
                hovertemplate=f"{first}=%{{x}}{suffix}<br>{metric} %{{y:.4f}}<extra></extra>"))
    best = best_trial(trials)
    setting = ", ".join(f"{name}={_number(best.params[name])}" for name in names)
    figure.add_trace(go.Scatter(
        x=[best.params[first]], y=[best.map], mode="markers", name="best mAP",
        marker={"symbol": "star", "size": 18, "color": "gold",
                "line": {"color": OUTLINE_COLOUR, "width": 1}},
        hovertemplate=f"best mAP {best.map:.4f} (P@1 {best.p1:.4f})<br>{setting}<extra></extra>"))
    figure.add_annotation(x=best.params[first], y=best.map, text=f"best mAP {best.map:.3f}",
                          showarrow=True, arrowhead=2, ax=0, ay=-30)
    figure.update_layout(xaxis_title=first, yaxis={"title": "mAP / P@1", "range": [0, 1]},
                         hovermode="closest", legend={"orientation": "h", "y": -0.2})
    return figure


def _ranking(rows: Sequence[int], distances: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A method's ranking as int64 rows and float64 distances, checked for length and repeats."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    distances = np.asarray(distances, dtype=np.float64).reshape(-1)
    if len(rows) != len(distances):
        raise InvalidInputError(f"{len(rows)} ranked rows but {len(distances)} distances")
    if len(np.unique(rows)) != len(rows):
        raise InvalidInputError("a ranking lists a gallery row twice")
    return rows, distances


def _check_urls(thumbnail_urls: Sequence[str] | None, files: Sequence[str]) -> None:
    if thumbnail_urls is not None and len(thumbnail_urls) != len(files):
        raise InvalidInputError(f"{len(thumbnail_urls)} thumbnail URLs for {len(files)} "
                                "gallery files; give one per gallery row ('' for none)")


def _point_data(rows: np.ndarray, files: Sequence[str], thumbnail_urls: Sequence[str] | None
                ) -> list[list[str]]:
    """customdata of gallery points: [file name, thumbnail URL or ""] per row."""
    return [[str(files[row]), "" if thumbnail_urls is None else str(thumbnail_urls[row])]
            for row in rows]


def _labels_of(rows: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """(len(rows),) int64 labels of gallery rows, -1 for unlabelled (every row without labels)."""
    if labels is None:
        return np.full(len(rows), -1, np.int64)
    return np.maximum(np.asarray(labels, dtype=np.int64)[rows], -1)


def _label_order(labels: np.ndarray) -> list[int]:
    """Distinct labels ascending with the unlabelled (-1) last: a stable trace order."""
    distinct = np.unique(labels).tolist()
    labelled = [label for label in distinct if label >= 0]
    return [*labelled, -1] if -1 in distinct else labelled


def _segments(points: np.ndarray, pairs: np.ndarray) -> tuple[list[Any], list[Any]]:
    """x and y lists of line segments between points[a] and points[b], None-separated."""
    x = np.full((len(pairs), 3), None, dtype=object)
    y = np.full((len(pairs), 3), None, dtype=object)
    if len(pairs):
        x[:, 0], x[:, 1] = points[pairs[:, 0], 0], points[pairs[:, 1], 0]
        y[:, 0], y[:, 1] = points[pairs[:, 0], 1], points[pairs[:, 1], 1]
    return x.ravel().tolist(), y.ravel().tolist()


def _fixed_ranges(positions: np.ndarray) -> tuple[list[float], list[float]]:
    """Axis ranges around every node of a layout (not only the shown ones), with a margin."""
    low, high = positions.min(axis=0), positions.max(axis=0)
    margin = AXIS_MARGIN * max(float((high - low).max()), 1.0)
    return ([float(low[0] - margin), float(high[0] + margin)],
            [float(low[1] - margin), float(high[1] + margin)])


def _number(value: Any) -> str:
    """A parameter value for a label: 0.30000000000000004 -> 0.3."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def query_ap_figure(changes: Any, files: Sequence[str], labels: np.ndarray | None,
                    class_names: Sequence[str], thumbnail_urls: Sequence[str] | None,
                    method_title: str) -> go.Figure:
    """Each scored query's AP under the baseline (x) against the method (y), coloured by class,
    with the diagonal: points above it gained, below it lost. `changes` is the engine's
    `QueryChanges`; points carry [file, thumbnail URL] (click one to query with it)."""
    rows = np.asarray(changes.rows, np.int64)
    _check_urls(thumbnail_urls, files)
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="no change",
                                line={"color": "#9ca3af", "dash": "dash", "width": 1},
                                hoverinfo="skip"))
    row_labels = _labels_of(rows, labels)
    order = _label_order(row_labels)
    many = len(order) > MAX_CLASS_TRACES
    trace = go.Scattergl if len(rows) > WEBGL_POINTS else go.Scatter
    for label in [None] if many else order:
        members = np.arange(len(rows)) if label is None else np.flatnonzero(row_labels == label)
        name = "queries" if label is None else class_name(label, class_names)
        hover = [f"{Path(files[rows[i]]).name} · {class_name(row_labels[i], class_names)}"
                 f"<br>AP {changes.before[i]:.3f} → {changes.after[i]:.3f} "
                 f"({changes.after[i] - changes.before[i]:+.3f})" for i in members]
        figure.add_trace(trace(
            x=changes.before[members], y=changes.after[members], mode="markers", name=name,
            marker={"size": 7, "color": PALETTE[0] if label is None else class_colour(label),
                    "line": {"width": 0.5, "color": "white"}},
            hovertext=hover, hoverinfo="text",
            customdata=_point_data(rows[members], files, thumbnail_urls)))
    figure.update_layout(
        title=f"AP per query: baseline → {method_title}", height=420,
        xaxis={"title": "AP, baseline", "range": [-0.03, 1.03], "constrain": "domain"},
        yaxis={"title": f"AP, {method_title}", "range": [-0.03, 1.03],
               "scaleanchor": "x", "constrain": "domain"},
        margin={"l": 50, "r": 10, "t": 40, "b": 40}, legend={"itemsizing": "constant"})
    return figure
