"""The kNN-graph plot's data: hand-worked edges, a plain-loop oracle, MDS, spreading, stability,
real data."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.knn import knn_graph
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError
from engine.views.neighbourhood import (
    NODE_SPACING,
    classical_mds,
    fit_to_unit_box,
    neighbourhood_graph,
    spread_apart,
)

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
    graph = neighbourhood_graph(same[0], same, rows, exact_knn(same), spacing=0.0)
    np.testing.assert_array_equal(graph.positions, 0.0)             # no blown-up rounding noise
    assert graph.edges.shape == (len(graph.edges), 2)
    spread = neighbourhood_graph(same[0], same, rows, exact_knn(same))
    assert closest_pair(spread.positions) >= NODE_SPACING - 1e-9   # coincident images separated


def closest_pair(positions: np.ndarray) -> float:
    """The least distance between two of (n, 2) points (inf for fewer than two)."""
    gaps = np.linalg.norm(positions[:, None] - positions[None], axis=2)
    return float(gaps[np.triu_indices(len(positions), k=1)].min(initial=np.inf))


def clustered_gallery(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """300 unit features in 5 tight classes, a query inside class 3 and its 30 nearest rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 32))
    features = centres[np.arange(300) % 5] + 0.3 * rng.normal(size=(300, 32))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    query = features[3] + 0.05 * rng.normal(size=32)
    query /= np.linalg.norm(query)
    return features, query, np.argsort(-(features @ query), kind="stable")[:30]


def test_thirty_clustered_nodes_are_spread_to_the_spacing():
    features, query, rows = clustered_gallery()
    knn = exact_knn(features)
    packed = neighbourhood_graph(query, features, rows, knn, spacing=0.0)
    assert closest_pair(packed.positions) < NODE_SPACING / 2        # MDS alone overlaps them
    graph = neighbourhood_graph(query, features, rows, knn)
    assert len(graph.positions) == 31
    assert closest_pair(graph.positions) >= NODE_SPACING - 1e-9
    assert np.abs(graph.positions).max() == pytest.approx(1.0)
    again = neighbourhood_graph(query, features, rows, knn)
    np.testing.assert_array_equal(graph.positions, again.positions)
    # the spreading is a property of the set of nodes, not of their order
    reordered = neighbourhood_graph(query, features, rows[::-1], knn)
    np.testing.assert_allclose(reordered.positions[reordered.nodes_of(rows)],
                               graph.positions[graph.nodes_of(rows)], atol=1e-9)
    # it separates, it does not scramble: the MDS picture's large distances are kept
    before = np.linalg.norm(packed.positions[:, None] - packed.positions[None], axis=2)
    after = np.linalg.norm(graph.positions[:, None] - graph.positions[None], axis=2)
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.9


def test_spread_apart_moves_only_the_close_pairs():
    points = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.05, 0.0], [0.0, 0.8]])
    spread = spread_apart(points, 0.1)
    np.testing.assert_array_equal(spread[[0, 1, 4]], points[[0, 1, 4]])
    gap = spread[3] - spread[2]
    assert gap[1] == 0.0 and 0.1 <= gap[0] < 0.102                # 1 % past the spacing
    assert spread[2, 0] + spread[3, 0] == pytest.approx(0.05)      # both moved, equally
    np.testing.assert_array_equal(spread_apart(points, 0.0), points)


def test_coincident_points_spread_by_their_ids_whatever_their_order():
    points = np.zeros((4, 2))
    ids = np.array([40, 7, 19, 3])
    spread = spread_apart(points, 0.2, ids)
    assert closest_pair(spread) > 0
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(spread_apart(points, 0.2, ids[order]), spread[order], atol=1e-12)
    assert closest_pair(fit_to_unit_box(spread)) >= 0.2 - 1e-9


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
    with pytest.raises(InvalidInputError, match="spacing"):
        neighbourhood_graph(features[0], features, [1], knn, spacing=-0.1)
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
