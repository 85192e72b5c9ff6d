"""Structure of the page's plotly figures: what is drawn, where, and that toggling moves nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.colors
import pytest

from app import plots
from app.plots import (
    PALETTE,
    UNLABELLED_COLOUR,
    class_colour,
    distinct_palette,
    embedding_figure,
    file_url,
    knn_figure,
    map_ranges,
    perceptual_distance,
    sweep_figure,
)
from engine.core.knn import knn_graph
from engine.errors import InvalidInputError
from engine.evaluation.tuning import Trial
from engine.views.neighbourhood import neighbourhood_graph

CLASS_NAMES = ["daffodil", "snowdrop", "lily", "bluebell"]
SIZE = 60


@pytest.fixture(scope="module")
def gallery():
    """Random unit features in 4 classes, a query near row 7, and two rankings of it."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 12))
    labels = np.arange(SIZE) % 4
    features = centres[labels] + 0.8 * rng.normal(size=(SIZE, 12))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    query = features[7] + 0.3 * rng.normal(size=12)
    query /= np.linalg.norm(query)
    order = np.argsort(-(features @ query), kind="stable")
    baseline, reranked = order[:10], np.concatenate([order[12:16], order[:10:2]])
    distances = 2 - 2 * (features @ query)
    knn = knn_graph(features.astype(np.float32), 16)
    graph = neighbourhood_graph(query, features, np.concatenate([baseline, reranked]), knn,
                                edge_k=5)
    files = [f"image_{row:04d}.jpg" for row in range(SIZE)]
    return {"graph": graph, "labels": labels, "files": files, "baseline": baseline,
            "reranked": reranked, "distances": distances}


def draw(gallery, ranking, **extra):
    return knn_figure(gallery["graph"], ranking, gallery["distances"][ranking],
                      files=gallery["files"], labels=gallery["labels"],
                      class_names=CLASS_NAMES, **extra)


def node_traces(figure):
    return [trace for trace in figure.data if "markers" in trace.mode and trace.name != "query"]


def segments(trace) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The None-separated two-point segments of a line trace."""
    points = list(zip(trace.x, trace.y, strict=True))
    runs, run = [], []
    for point in [*points, (None, None)]:
        if point[0] is None:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(point)
    assert all(len(run) == 2 for run in runs)
    return [tuple(run) for run in runs]


def trace_named(figure, name):
    (trace,) = [trace for trace in figure.data if trace.name == name]
    return trace


def marker_positions(figure) -> dict[str, tuple[float, float]]:
    """file name -> marker position, read from the hover texts."""
    found = {}
    for trace in node_traces(figure):
        for x, y, hover in zip(trace.x, trace.y, trace.hovertext, strict=True):
            found[hover.split("</b> ")[1].split("<br>")[0]] = (x, y)
    return found


def test_knn_figure_draws_the_shown_nodes_and_their_edges(gallery):
    graph, ranking = gallery["graph"], gallery["reranked"]
    figure = draw(gallery, ranking)
    assert sum(len(trace.x) for trace in node_traces(figure)) == len(ranking)
    assert len(trace_named(figure, "query").x) == 1
    assert trace_named(figure, "query").marker.symbol == "star"

    node_at = {tuple(point): node for node, point in enumerate(graph.positions.tolist())}
    shown = {0, *graph.nodes_of(ranking).tolist()}
    for name, mutual in (("mutual neighbours", True), ("one-way neighbours", False)):
        drawn = {tuple(sorted(node_at[end] for end in segment))
                 for segment in segments(trace_named(figure, name))}
        expected = {tuple(edge) for edge, is_mutual in zip(graph.edges.tolist(), graph.mutual,
                                                          strict=True)
                    if is_mutual == mutual and set(edge) <= shown}
        assert drawn == expected and expected
    assert len(graph.edges) > sum(len(segments(trace_named(figure, name)))
                                  for name in ("mutual neighbours", "one-way neighbours"))
    mutual, one_way = trace_named(figure, "mutual neighbours"), trace_named(figure,
                                                                           "one-way neighbours")
    assert mutual.line.width > one_way.line.width


def test_knn_figures_of_two_rankings_line_up(gallery):
    baseline, reranked = draw(gallery, gallery["baseline"]), draw(gallery, gallery["reranked"])
    first, second = marker_positions(baseline), marker_positions(reranked)
    common = set(first) & set(second)
    assert len(common) >= 5
    assert all(first[name] == second[name] for name in common)
    assert trace_named(baseline, "query").x == trace_named(reranked, "query").x
    assert baseline.layout.xaxis.range == reranked.layout.xaxis.range
    assert baseline.layout.yaxis.range == reranked.layout.yaxis.range
    positions = gallery["graph"].positions
    assert baseline.layout.xaxis.range[0] < positions[:, 0].min()
    assert baseline.layout.yaxis.range[1] > positions[:, 1].max()
    assert baseline.layout.uirevision == reranked.layout.uirevision is not None
    present = sorted(set(gallery["labels"][gallery["baseline"]].tolist()))
    assert [trace.name for trace in baseline.data] == [
        "one-way neighbours", "mutual neighbours", *(CLASS_NAMES[i] for i in present), "query"]
    assert draw(gallery, gallery["baseline"]).to_dict() == baseline.to_dict()  # deterministic


def test_knn_nodes_shrink_with_rank_and_say_what_they_are(gallery):
    ranking, labels = gallery["baseline"], gallery["labels"]
    figure = draw(gallery, ranking, query_label=int(labels[7]))
    by_rank = {}
    for trace in node_traces(figure):
        assert trace.name in CLASS_NAMES
        for text, size, hover in zip(trace.text, trace.marker.size, trace.hovertext, strict=True):
            by_rank[int(text)] = (size, hover, trace.marker.color)
    assert sorted(by_rank) == list(range(1, len(ranking) + 1))
    sizes = [by_rank[rank][0] for rank in sorted(by_rank)]
    assert sizes[0] == 28 and all(np.diff(sizes) < 0) and sizes[-1] >= 10
    for rank, row in enumerate(ranking, start=1):
        _, hover, colour = by_rank[rank]
        assert gallery["files"][row] in hover and CLASS_NAMES[labels[row]] in hover
        assert f"{gallery['distances'][row]:.4f}" in hover and f"#{rank}" in hover
        assert colour == class_colour(labels[row])
    assert trace_named(figure, "query").marker.color == class_colour(labels[7])


def test_knn_figure_refuses_rows_outside_the_graph(gallery):
    outside = next(row for row in range(SIZE) if row not in gallery["graph"].rows)
    with pytest.raises(InvalidInputError, match="not nodes"):
        draw(gallery, np.array([gallery["baseline"][0], outside]))
    with pytest.raises(InvalidInputError, match="distances"):
        knn_figure(gallery["graph"], gallery["baseline"], [0.1], files=gallery["files"],
                   labels=None, class_names=[])


def test_class_colours_are_stable_and_grey_for_unlabelled():
    assert class_colour(3) == class_colour(np.int64(3))
    assert len({class_colour(label) for label in range(17)}) == 17
    assert class_colour(None) == class_colour(-1) == UNLABELLED_COLOUR != class_colour(0)
    assert class_colour(0) == class_colour(len(PALETTE))                 # cycles
    assert distinct_palette() == PALETTE                                  # deterministic


def closest_colours(colours) -> float:
    return min(perceptual_distance(a, b) for i, a in enumerate(colours) for b in colours[:i])


def test_the_first_twenty_class_colours_stay_apart():
    # Dark24's two pinks (its 2nd and 13th colours) were hard to tell apart on the map
    dark24 = plotly.colors.qualitative.Dark24
    assert perceptual_distance(dark24[1], dark24[12]) < 0.1
    assert closest_colours(dark24[:17]) < 0.1
    assert closest_colours(PALETTE[:20]) > 0.12
    assert closest_colours(PALETTE) > 0.1
    for colour in PALETTE:                                   # none passes for grey, black, white
        for other in (UNLABELLED_COLOUR, "#222222", "#ffffff"):
            assert perceptual_distance(colour, other) > 0.12
    assert perceptual_distance("#000000", "#ffffff") == pytest.approx(1.0, abs=1e-6)


def test_figures_carry_files_and_thumbnail_urls_for_the_page_script(gallery):
    urls = [f"gradio_api/file=/thumbs/{row}.jpg" for row in range(SIZE)]
    figure = draw(gallery, gallery["baseline"], thumbnail_urls=urls)
    for trace in node_traces(figure):
        for hover, (file, url) in zip(trace.hovertext, trace.customdata, strict=True):
            assert file in hover and url == urls[int(file[6:10])]
    assert trace_named(figure, "query").customdata is None               # not clickable
    plain = draw(gallery, gallery["baseline"])
    assert {url for trace in node_traces(plain) for _, url in trace.customdata} == {""}
    assert set(figure.layout.modebar.remove) == {"select2d", "lasso2d"}
    with pytest.raises(InvalidInputError, match="thumbnail URLs"):
        draw(gallery, gallery["baseline"], thumbnail_urls=urls[:-1])

    coordinates = np.random.default_rng(2).normal(size=(SIZE, 2))
    files = gallery["files"]
    embedded = embedding_figure(coordinates, files=files, labels=gallery["labels"],
                                class_names=CLASS_NAMES, result_rows=[5, 9], query_row=3,
                                thumbnail_urls=urls)
    pairs = [tuple(pair) for trace in embedded.data if trace.type == "scattergl"
             for pair in trace.customdata]
    assert sorted(pairs) == sorted(zip(files, urls, strict=True))
    assert [tuple(pair) for pair in trace_named(embedded, "results").customdata] == [
        (files[5], urls[5]), (files[9], urls[9])]
    assert trace_named(embedded, "query").customdata is None
    assert set(embedded.layout.modebar.add) == {"select2d", "lasso2d"}


def test_file_url_is_gradios_file_route():
    assert file_url("/cache/thumbs/a b#1.jpg") == "gradio_api/file=/cache/thumbs/a%20b%231.jpg"
    assert file_url(Path("x.png")) == "gradio_api/file=" + str(Path("x.png").absolute())


def test_the_map_fills_the_plot_with_the_bulk_of_the_gallery():
    rng = np.random.default_rng(4)
    blob = rng.normal(size=(1000, 2))
    outliers = 40 * np.stack([np.cos(np.arange(20)), np.sin(np.arange(20))], 1)
    coordinates = np.concatenate([blob, outliers])
    files = [f"f{row}" for row in range(len(coordinates))]
    figure = embedding_figure(coordinates, files=files, labels=None, class_names=[])
    x_range, y_range = figure.layout.xaxis.range, figure.layout.yaxis.range
    for axis, (low, high) in enumerate((x_range, y_range)):
        inside = (coordinates[:, axis] >= low) & (coordinates[:, axis] <= high)
        assert inside.mean() >= 0.97                        # the outliers may fall outside
        central = np.percentile(coordinates[:, axis], [5, 95])
        assert (central[1] - central[0]) / (high - low) >= 0.5  # 90 % of points: half the width
        # the old view (every point) squeezed them into a tenth of it
        assert (central[1] - central[0]) / np.ptp(coordinates[:, axis]) < 0.1
    # no equal axis scales: on a wide plot they would widen the x range again
    assert figure.layout.yaxis.scaleanchor is None
    outside = sum(not (x_range[0] <= x <= x_range[1] and y_range[0] <= y <= y_range[1])
                  for x, y in coordinates)
    assert outside > 0 and f"{outside} of {len(coordinates)} points outside" in (
        figure.layout.title.text)

    far_query = embedding_figure(coordinates, files=files, labels=None, class_names=[],
                                 query_xy=(30.0, -1.0))
    assert far_query.layout.xaxis.range[1] > 30.0                      # the query stays in view
    assert far_query.layout.yaxis.range == y_range
    spread = rng.uniform(-5, 5, size=(200, 2))             # no outliers: every point in view
    (low_x, high_x), (low_y, high_y) = map_ranges(spread)
    assert low_x < spread[:, 0].min() and high_x > spread[:, 0].max()
    assert low_y < spread[:, 1].min() and high_y > spread[:, 1].max()
    assert map_ranges(np.zeros((0, 2))) is None
    assert map_ranges(np.ones((3, 2))) == ([0.5, 1.5], [0.5, 1.5])


def test_embedding_figure_shows_the_gallery_and_the_results():
    rng = np.random.default_rng(0)
    coordinates = rng.normal(size=(SIZE, 2))
    labels = np.arange(SIZE) % 4
    labels[:3] = -1
    files = [f"image_{row:04d}.jpg" for row in range(SIZE)]
    results, distances = [5, 9, 2, 40], [0.1, 0.2, 0.3, 0.4]
    figure = embedding_figure(coordinates, files=files, labels=labels, class_names=CLASS_NAMES,
                              query_xy=(0.5, -0.5), result_rows=results,
                              result_distances=distances)
    gallery_traces = [trace for trace in figure.data if trace.type == "scattergl"]
    assert [trace.name for trace in gallery_traces] == [*CLASS_NAMES, "unlabelled"]
    assert sum(len(trace.x) for trace in gallery_traces) == SIZE
    assert gallery_traces[0].marker.color == class_colour(0)
    assert gallery_traces[0].hovertext[0] == "image_0004.jpg<br>class: daffodil"  # 0 unlabelled
    highlighted = trace_named(figure, "results")
    assert len(highlighted.x) == len(results)
    assert highlighted.marker.size > gallery_traces[0].marker.size
    assert highlighted.hovertext[1] == ("<b>#2</b> image_0009.jpg<br>class: snowdrop"
                                        "<br>distance: 0.2000")
    spokes = segments(trace_named(figure, "query → results"))
    assert len(spokes) == len(results)
    assert {end for _, end in spokes} == {tuple(coordinates[row]) for row in results}
    query = trace_named(figure, "query")
    assert (query.x, query.y) == ((0.5,), (-0.5,)) and query.marker.symbol == "star"


def test_embedding_figure_without_labels_or_query_position():
    coordinates = np.random.default_rng(1).normal(size=(SIZE, 2))
    files = [f"f{row}" for row in range(SIZE)]
    figure = embedding_figure(coordinates, files=files, labels=None, class_names=[],
                              result_rows=[1, 2], query_row=11)
    (gallery_trace,) = [trace for trace in figure.data if trace.type == "scattergl"]
    assert len(gallery_trace.x) == SIZE and isinstance(gallery_trace.marker.color, str)
    assert trace_named(figure, "query").x == (coordinates[11, 0],)
    assert len(segments(trace_named(figure, "query → results"))) == 2
    alone = embedding_figure(coordinates, files=files, labels=None, class_names=[],
                             result_rows=[1, 2])
    assert len(trace_named(alone, "query").x) == 0
    assert len(segments(trace_named(alone, "query → results"))) == 0


def trial(k1, map_, p1, lambda_value=0.3):
    return Trial({"k1": k1, "lambda_value": lambda_value}, map_, p1, 0.01)


def test_sweep_figure_of_one_parameter():
    trials = [trial(20, 0.6, 0.7), trial(5, 0.4, 0.5), trial(10, 0.65, 0.8), trial(30, 0.5, 0.6)]
    figure = sweep_figure(trials, ["k1"])
    assert [trace.name for trace in figure.data] == ["mAP", "P@1", "best mAP"]
    assert figure.data[0].x == (5, 10, 20, 30)
    assert figure.data[0].y == (0.4, 0.65, 0.6, 0.5)
    assert figure.data[1].y == (0.5, 0.8, 0.7, 0.6) and figure.data[1].line.dash == "dash"
    assert (figure.data[2].x, figure.data[2].y) == ((10,), (0.65,))
    assert figure.layout.xaxis.title.text == "k1"
    assert tuple(figure.layout.yaxis.range) == (0, 1)


def test_sweep_figure_of_two_parameters():
    trials = [trial(k1, 0.1 * k1 / 10 + lam, 0.5 + lam, lam)
              for k1 in (20, 10, 30) for lam in (0.3, 0.1)]
    figure = sweep_figure(trials, ("k1", "lambda_value"))
    assert [trace.name for trace in figure.data] == [
        "mAP, lambda_value=0.1", "P@1, lambda_value=0.1", "mAP, lambda_value=0.3",
        "P@1, lambda_value=0.3", "best mAP"]
    for map_trace, p1_trace in (figure.data[0:2], figure.data[2:4]):
        assert map_trace.x == p1_trace.x == (10, 20, 30)
        assert map_trace.line.color == p1_trace.line.color
        assert map_trace.line.dash == "solid" and p1_trace.line.dash == "dash"
    assert figure.data[0].line.color != figure.data[2].line.color
    assert (figure.data[4].x, figure.data[4].y) == ((30,), (pytest.approx(0.6),))
    with pytest.raises(InvalidInputError, match="one or two"):
        sweep_figure(trials, ["k1", "lambda_value", "k2"])
    with pytest.raises(InvalidInputError, match="no parameter"):
        sweep_figure(trials, ["k3"])


def test_sweep_figure_without_trials():
    figure = sweep_figure([], ["k1"])
    assert len(figure.data) == 0
    assert figure.layout.annotations[0].text == "no trials yet"


def test_a_large_map_draws_a_fixed_sample_and_always_the_results():
    size, limit = 500, 120
    coordinates = np.random.default_rng(2).normal(size=(size, 2))
    files = [f"item{row}" for row in range(size)]
    labels = np.arange(size) % 3
    results = [7, 450, 499]
    figure = embedding_figure(coordinates, files=files, labels=labels, class_names=["a", "b", "c"],
                              query_row=3, result_rows=results, point_limit=limit)
    gallery_traces = [trace for trace in figure.data if trace.name in ("a", "b", "c")]
    drawn = sorted(point[0] for trace in gallery_traces for point in trace.customdata)
    sample = plots.map_sample(size, limit)
    assert drawn == sorted(files[row] for row in sample) and len(drawn) == limit
    np.testing.assert_array_equal(sample, plots.map_sample(size, limit))  # fixed
    result_trace = next(trace for trace in figure.data if trace.name == "results")
    assert [point[0] for point in result_trace.customdata] == [files[row] for row in results]
    assert "120 of 500 points drawn" in figure.layout.title.text
    assert plots.map_sample(limit, limit) is None


def test_a_map_of_many_classes_is_one_trace_coloured_per_point():
    size = 200
    coordinates = np.random.default_rng(3).normal(size=(size, 2))
    labels = np.arange(size) // 2  # 100 classes
    names = [f"class{label}" for label in range(100)]
    figure = embedding_figure(coordinates, files=[str(row) for row in range(size)],
                              labels=labels, class_names=names)
    gallery = [trace for trace in figure.data if trace.name == "gallery"]
    assert len(gallery) == 1 and len(gallery[0].x) == size
    assert list(gallery[0].marker.color[:3]) == [plots.class_colour(0), plots.class_colour(0),
                                                 plots.class_colour(1)]
    assert "class: class1" in gallery[0].hovertext[2]
