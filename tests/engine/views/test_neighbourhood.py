"""The kNN-graph plot's data: hand-worked edges, a plain-loop oracle, MDS, stability, real data."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.knn import knn_graph
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError
from engine.views.neighbourhood import classical_mds, fit_to_unit_box, neighbourhood_graph

# Five gallery points on the unit circle (degrees), embedded in 3-D. Angular gaps, nearest first:
#   A(0):   B 20, C 50, D 120, E 160      D(120): C 70, E 80, B 100, A 120
#   B(20):  A 20, C 30, D 100, E 180      E(200): D 80, C 150, A 160, B 180
#   C(50):  B 30, A 50, D 70,  E 150
CIRCLE = {"A": 0.0, "B": 20.0, "C": 50.0, "D": 120.0, "E": 200.0}
ROW = {name: row for row, name in enumerate(CIRCLE)}


def on_circle(*degrees: float) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees))
    return np.stack([np.cos(radians), np.sin(radians), np.zeros_like(radians)], axis=1)


def exact_knn(features: np.ndarray) -> KnnGraph:
    """All neighbours of every row, most similar first, by plain numpy."""
    similarities = features.astype(np.float64) @ features.T.astype(np.float64)
    indices = np.argsort(-similarities, axis=1, kind="stable")
    return KnnGraph(indices=indices.astype(np.int64),
                    similarities=np.take_along_axis(similarities, indices, 1).astype(np.float32))


def named_edges(graph, names: dict[int, str]) -> dict[frozenset[str], bool]:
    """{frozenset of endpoint names: mutual}; node 0 is called 'q'."""
    label = {0: "q", **{graph.node_of(row): name for row, name in names.items()}}
    return {frozenset((label[a], label[b])): bool(mutual)
            for (a, b), mutual in zip(graph.edges.tolist(), graph.mutual, strict=True)}


@pytest.fixture
def circle():
    features = on_circle(*CIRCLE.values())
    return features, exact_knn(features)


def test_hand_worked_edges_with_an_uploaded_query(circle):
    features, knn = circle
    rows = [ROW[name] for name in "CAEBD"]
    names = {row: name for name, row in ROW.items()}
    graph = neighbourhood_graph(on_circle(5.0)[0], features, rows, knn, edge_k=2)
    # A->{B,C} B->{A,C} C->{B,A} D->{C,E} E->{D,C}; the query (5 deg) picks A and B and is
    # closer to each than their 2nd neighbour C, so it would be among their 2 nearest too
    assert named_edges(graph, names) == {
        frozenset("AB"): True, frozenset("AC"): True, frozenset("BC"): True,
        frozenset("CD"): False, frozenset("CE"): False, frozenset("DE"): True,
        frozenset("qA"): True, frozenset("qB"): True}
    assert graph.rows.tolist() == rows
    assert [graph.node_of(row) for row in rows] == [1, 2, 3, 4, 5]
    edge = graph.edges.tolist().index(sorted([graph.node_of(0), graph.node_of(1)]))
    assert graph.similarity[edge] == pytest.approx(np.cos(np.deg2rad(20.0)), abs=1e-6)

    # edge_k = 1: first neighbours A->B B->A C->B D->C E->D; a query at 290 deg picks A (70 deg
    # away) but A's nearest, B, is 20 deg away: one-way
    graph = neighbourhood_graph(on_circle(290.0)[0], features, rows, knn, edge_k=1)
    assert named_edges(graph, names) == {
        frozenset("AB"): True, frozenset("BC"): False, frozenset("CD"): False,
        frozenset("DE"): False, frozenset("qA"): False}


def test_hand_worked_edges_with_a_gallery_query(circle):
    features, knn = circle
    names = {row: name for name, row in ROW.items() if name != "A"}
    graph = neighbourhood_graph(features[ROW["A"]], features, list(range(5)), knn, edge_k=1,
                                query_row=ROW["A"])
    # A is the query: its knn row gives B, and B's nearest is A, so q-B is mutual
    assert graph.rows.tolist() == [1, 2, 3, 4]
    assert named_edges(graph, names) == {
        frozenset("qB"): True, frozenset("BC"): False, frozenset("CD"): False,
        frozenset("DE"): False}


def loop_oracle(query, features, rows, knn, edge_k, query_row):
    """{(a, b): mutual} by the definitions, one pair at a time."""
    rows = [r for i, r in enumerate(rows) if r not in rows[:i] and r != query_row]
    k = min(edge_k, knn.indices.shape[1] - 1)

    def first(row):
        return [j for j in knn.indices[row] if j != row][:k]

    edges = {}
    for a in range(len(rows)):
        for b in range(a + 1, len(rows)):
            ab, ba = rows[b] in first(rows[a]), rows[a] in first(rows[b])
            if ab or ba:
                edges[(a + 1, b + 1)] = ab and ba
    similarity = [float(np.float32(np.dot(query.astype(np.float64), features[r]))) for r in rows]
    if query_row is None:
        picked = sorted(range(len(rows)), key=lambda i: (-similarity[i], i))[:k]
    else:
        picked = [i for i, r in enumerate(rows) if r in first(query_row)]
    for i in picked:
        reverse = (query_row in first(rows[i]) if query_row is not None
                   else similarity[i] >= knn.similarities[rows[i], k])
        edges[(0, i + 1)] = bool(reverse)
    return edges


@pytest.mark.parametrize("seed", range(6))
def test_edges_match_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(60, 8))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    knn = exact_knn(features)
    knn = KnnGraph(knn.indices[:, :12], knn.similarities[:, :12])
    rows = rng.integers(0, 60, size=40).tolist()
    query_row = int(rows[3]) if seed % 2 else None
    query = features[query_row] if query_row is not None else rng.normal(size=8)
    query = query / np.linalg.norm(query)
    edge_k = [1, 3, 10, 30][seed % 4]                        # 30 is clamped to the depth 11
    graph = neighbourhood_graph(query, features, rows, knn, edge_k=edge_k, query_row=query_row)
    got = {tuple(e): bool(m) for e, m in zip(graph.edges.tolist(), graph.mutual, strict=True)}
    assert got == loop_oracle(query, features, rows, knn, edge_k, query_row)


def test_edges_are_each_pair_once_smaller_first(circle):
    features, knn = circle
    graph = neighbourhood_graph(on_circle(77.0)[0], features, [4, 3, 2, 1, 0], knn, edge_k=3)
    assert graph.edges.dtype == np.int64 and graph.mutual.dtype == bool
    assert graph.similarity.dtype == np.float32
    assert (graph.edges[:, 0] < graph.edges[:, 1]).all()
    assert len({tuple(e) for e in graph.edges.tolist()}) == len(graph.edges)
    assert graph.edges.tolist() == sorted(graph.edges.tolist())
    assert graph.edges.max() <= len(graph.rows)


def test_repeats_and_the_query_row_are_dropped(circle):
    features, knn = circle
    graph = neighbourhood_graph(features[1], features, [3, 1, 3, 0, 1, 2], knn, query_row=1)
    assert graph.rows.tolist() == [3, 0, 2]
    assert graph.rows.dtype == np.int64
    assert graph.positions.shape == (4, 2)
    with pytest.raises(InvalidInputError, match="not nodes"):
        graph.node_of(1)


def test_mds_recovers_planar_distances():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(12, 2)) * [3.0, 1.0]
    distances = np.linalg.norm(plane[:, None] - plane[None], axis=2)
    layout = classical_mds(distances)
    recovered = np.linalg.norm(layout[:, None] - layout[None], axis=2)
    np.testing.assert_allclose(recovered, distances, atol=1e-9)
    assert (layout[np.abs(layout).argmax(axis=0), [0, 1]] > 0).all()  # orientation fixed

    boxed = fit_to_unit_box(layout)
    scaled = np.linalg.norm(boxed[:, None] - boxed[None], axis=2)
    factor = scaled[0, 1] / distances[0, 1]
    np.testing.assert_allclose(scaled, distances * factor, atol=1e-9)
    low, high = boxed.min(axis=0), boxed.max(axis=0)
    np.testing.assert_allclose(low + high, 0.0, atol=1e-12)        # centred
    assert (high - low).max() == pytest.approx(2.0)                # the wider axis fills [-1, 1]


def test_positions_are_deterministic_and_belong_to_rows():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(50, 16))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    knn = exact_knn(features)
    query = features[7] + 0.1 * features[8]
    query /= np.linalg.norm(query)
    baseline, reranked = [3, 9, 12, 20, 33], [12, 40, 3, 41, 9, 5]
    union = neighbourhood_graph(query, features, baseline + reranked, knn)
    again = neighbourhood_graph(query, features, baseline + reranked, knn)
    np.testing.assert_array_equal(union.positions, again.positions)
    np.testing.assert_array_equal(union.edges, again.edges)
    assert np.abs(union.positions).max() == pytest.approx(1.0)
    # the layout is a property of the set of points: listing them in another order moves
    # nothing, so whichever ranking is shown its images sit at union.positions[node_of(row)]
    swapped = neighbourhood_graph(query, features, reranked + baseline, knn)
    for row in set(baseline + reranked):
        np.testing.assert_allclose(swapped.positions[swapped.node_of(row)],
                                   union.positions[union.node_of(row)], atol=1e-9)
    np.testing.assert_allclose(swapped.positions[0], union.positions[0], atol=1e-9)
    np.testing.assert_array_equal(union.nodes_of(reranked),
                                  [union.node_of(row) for row in reranked])


@pytest.mark.parametrize("rows", [[], [2], [0, 1, 2, 3]])
def test_degenerate_layouts_have_no_nan(circle, rows):
    features, _ = circle
    same = np.repeat(features[:1], 5, axis=0)                   # coincident points
    for gallery in (features, same):
        graph = neighbourhood_graph(gallery[0], gallery, rows, exact_knn(gallery))
        assert graph.positions.shape == (len(rows) + 1, 2)
        assert np.isfinite(graph.positions).all()
        assert np.abs(graph.positions).max() <= 1.0
    graph = neighbourhood_graph(same[0], same, rows, exact_knn(same))
    np.testing.assert_array_equal(graph.positions, 0.0)
    assert graph.edges.shape == (len(graph.edges), 2)


def test_bad_inputs_are_refused(circle):
    features, knn = circle
    with pytest.raises(InvalidInputError, match="2-D"):
        neighbourhood_graph(features[0], features[0], [1], knn)
    with pytest.raises(InvalidInputError, match="shape"):
        neighbourhood_graph(features[0, :2], features, [1], knn)
    with pytest.raises(InvalidInputError, match="outside the gallery"):
        neighbourhood_graph(features[0], features, [1, 5], knn)
    with pytest.raises(InvalidInputError, match="outside the gallery"):
        neighbourhood_graph(features[0], features, [1], knn, query_row=-1)
    with pytest.raises(InvalidInputError, match="integer"):
        neighbourhood_graph(features[0], features, [0.5], knn)
    with pytest.raises(InvalidInputError, match="edge_k"):
        neighbourhood_graph(features[0], features, [1], knn, edge_k=0)
    with pytest.raises(InvalidInputError, match="kNN graph"):
        neighbourhood_graph(features[0], features[:4], [1], knn)
    broken = features.copy()
    broken[2, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        neighbourhood_graph(features[0], broken, [1, 2], knn)
    with pytest.raises(InvalidInputError, match="NaN"):
        neighbourhood_graph(np.full(3, np.inf), features, [1], knn)


def test_mutual_edges_join_same_class_images_more_often(demo_features):
    features, labels = demo_features.features, demo_features.labels
    knn = knn_graph(features, 32)
    same = {True: [], False: []}
    for query_row in range(0, len(features), 7):
        rows = knn.indices[query_row, 1:31]
        for query, row in ((features[query_row], query_row), (features[query_row], None)):
            graph = neighbourhood_graph(query, features, rows, knn, edge_k=10, query_row=row)
            between = graph.edges[:, 0] > 0
            ends = graph.rows[graph.edges[between] - 1]
            matched = labels[ends[:, 0]] == labels[ends[:, 1]]
            for mutual in (True, False):
                same[mutual].extend(matched[graph.mutual[between] == mutual])
    assert len(same[True]) > 100 and len(same[False]) > 100
    assert np.mean(same[True]) > np.mean(same[False]) + 0.1  # about 0.84 vs 0.56
