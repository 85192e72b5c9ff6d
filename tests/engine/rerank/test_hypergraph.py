"""engine.rerank._hypergraph: LHRR and SGCC against plain-loop oracles, hand-worked tables."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from oracles import lhrr_reference, merge_candidates_reference, sgcc_reference
from tie_aware import U32, assert_order_matches

import engine.rerank._hypergraph as hypergraph_module
from engine.core.knn import (
    canonical_similarity,
    knn_graph,
    lists_with_query,
    neighbour_lists,
    torch_neighbour_lists,
    torch_topk_similar,
)
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError
from engine.evaluation.metrics import evaluate
from engine.rerank._hypergraph import (
    Hypergraph,
    default_clusters,
    hyperedges,
    lhrr,
    lhrr_from_features,
    merge_candidates,
    position_weights,
    reciprocal_edges,
    sgcc,
)

SUBSET = 120  # items of the oracle comparisons, spread over all 17 classes


@pytest.fixture(scope="module")
def subset(demo_features) -> np.ndarray:
    rows = np.linspace(0, len(demo_features.labels) - 1, SUBSET).astype(int)
    return demo_features.features[rows]


def edge_dicts(graph: Hypergraph) -> list[dict[int, float]]:
    """The hyperedges as {member: membership} (the oracle's form)."""
    return [{int(v): float(h) for v, h in zip(members[members >= 0], weights[members >= 0],
                                               strict=True)}
            for members, weights in zip(graph.members, graph.memberships, strict=True)]


def assert_matches_reference(graph: Hypergraph, reference: tuple) -> None:
    lists, edges, confidence = reference
    np.testing.assert_array_equal(graph.ranked_lists, lists)
    for i, edge in enumerate(edges):
        ordered = sorted(edge, key=lambda v, e=edge: (-e[v], v))
        count = len(ordered)
        np.testing.assert_array_equal(graph.members[i, :count], ordered)
        assert (graph.members[i, count:] == -1).all()
        np.testing.assert_allclose(graph.memberships[i, :count], [edge[v] for v in ordered],
                                   rtol=0, atol=1e-6)
    np.testing.assert_allclose(graph.confidence, confidence, rtol=1e-6)


def leave_one_out(lists: np.ndarray, labels: np.ndarray):
    """mAP / P@1 of lists without their first entry (the item itself)."""
    positives = np.bincount(labels)[labels] - 1
    return evaluate(lists[:, 1:], labels, labels, ks=(1,), n_positives=positives)


# -- hand-worked tables -------------------------------------------------------------------------
def test_position_weights_hand_worked():
    np.testing.assert_allclose(position_weights(4),
                               [1.0, 0.5, 1.0 - math.log(3) / math.log(4), 0.0], atol=1e-15)
    np.testing.assert_allclose(position_weights(2), [1.0, 0.0])
    np.testing.assert_allclose(position_weights(1), [1.0])  # w(1) = 1 even where log K = 0
    weights = position_weights(30)
    assert weights[0] == 1.0 and abs(weights[-1]) < 1e-15 and (np.diff(weights) < 0).all()


def test_hyperedge_hand_worked():
    # K = 3: w = (1, w2, 0), w2 = 1 - log 2 / log 3. Item 0's top-3 is (0, 1, 2):
    #   o = 0 (w 1):  0 += 1,  1 += w2,  2 += 0
    #   o = 1 (w w2): 1's list (1, 3, 4): 1 += w2,  3 += w2^2,  4 += 0
    #   o = 2 (w 0):  2's list (2, 5, 6): all += 0
    # so e_0 = {0: 1 + 1, 1: 2 w2, 3: w2^2, 2: 0, 4: 0, 5: 0, 6: 0} (7 members), conf = the top 3.
    lists = np.array([[0, 1, 2], [1, 3, 4], [2, 5, 6], [3, 0, 1], [4, 5, 6], [5, 6, 7],
                      [6, 7, 0], [7, 0, 1]])
    w2 = 1.0 - math.log(2) / math.log(3)
    incidence, members, memberships, confidence = hyperedges(lists, 3)
    np.testing.assert_array_equal(members[0, :7], [0, 1, 3, 2, 4, 5, 6])
    assert (members[0, 7:] == -1).all()
    np.testing.assert_allclose(memberships[0, :7], [2.0, 2 * w2, w2 ** 2, 0, 0, 0, 0],
                               rtol=1e-7)
    assert confidence[0] == pytest.approx(2.0 + 2 * w2 + w2 ** 2, rel=1e-7)
    assert incidence[0].nnz == 7  # zero memberships stay members inside LHRR
    graph = Hypergraph(ranked_lists=lists, members=members,
                       memberships=memberships, confidence=confidence, k=3, iterations=1)
    row = graph.incidence()[0]
    np.testing.assert_array_equal(row.indices, [0, 1, 3])  # ... but H stores the non-zeros
    np.testing.assert_allclose(row.data, [2.0, 2 * w2, w2 ** 2], rtol=1e-7)


def test_merge_candidates_hand_worked():
    tail = np.array([[10, 11, 12, 13]])
    values = np.array([[10.0, 9.0, 8.0, 7.0]])
    # 20 (9.5) beats position 1 (9); 21 (8.5) is compared with position 2's value *before* the
    # insertion (8), so it lands at 2, ahead of 11 (9): the authors' joinRks, not a sorted merge
    merged = merge_candidates(tail, values, np.array([[20, 21]]), np.array([[9.5, 8.5]]))
    np.testing.assert_array_equal(merged, [[10, 20, 21, 11]])
    # an equal value does not beat a position; -inf is no candidate
    merged = merge_candidates(tail, values, np.array([[20, 21]]), np.array([[9.0, -np.inf]]))
    np.testing.assert_array_equal(merged, [[10, 11, 20, 12]])
    # candidates above everything fill the list
    merged = merge_candidates(tail, values, np.array([[20, 21, 22, 23, 24]]),
                              np.full((1, 5), 50.0))
    np.testing.assert_array_equal(merged, [[20, 21, 22, 23]])


def test_merge_candidates_matches_loop():
    rng = np.random.default_rng(0)
    rows, width, count = 200, 12, 9
    tail = np.stack([rng.permutation(100)[:width] for _ in range(rows)])
    tail_values = -np.sort(-rng.integers(0, 6, (rows, width)).astype(float), axis=1)
    incoming = 100 + np.arange(count) + np.zeros((rows, 1), int)
    incoming_values = -np.sort(-rng.integers(0, 7, (rows, count)).astype(float), axis=1)
    incoming_values[rng.random((rows, count)) < 0.2] = -np.inf
    incoming_values = -np.sort(-incoming_values, axis=1)
    merged = merge_candidates(tail, tail_values, incoming, incoming_values)
    for r in range(rows):
        expected = merge_candidates_reference(tail[r].tolist(), tail_values[r].tolist(),
                                              incoming[r].tolist(), incoming_values[r].tolist())
        assert merged[r].tolist() == expected


# -- LHRR against the oracle --------------------------------------------------------------------
@pytest.fixture(params=["dense", "sparse"])
def layout(request, monkeypatch) -> str:
    """Run a test with the iteration's products read as dense blocks (small collections) and
    as sparse ones (large: `DENSE_ITEMS` set to 0 here)."""
    if request.param == "sparse":
        monkeypatch.setattr(hypergraph_module, "DENSE_ITEMS", 0)
    return request.param


@pytest.mark.parametrize(("k", "iterations"), [(5, 2), (8, 2), (6, 1), (4, 3)])
def test_lhrr_matches_reference(subset, layout, k, iterations):
    lists = knn_graph(subset, 4 * k).indices
    graph = lhrr(lists, k, iterations)
    assert graph.k == k and graph.iterations == iterations
    assert_matches_reference(graph, lhrr_reference(lists, k, iterations))


def test_lhrr_blocks_match_one_block(subset, layout, monkeypatch):
    lists = knn_graph(subset, 24).indices
    whole = lhrr(lists, 6)
    monkeypatch.setattr(hypergraph_module, "BLOCK_ELEMENTS", 7 * SUBSET + 5)  # 7-row blocks
    blocked = lhrr(lists, 6)
    np.testing.assert_array_equal(blocked.ranked_lists, whole.ranked_lists)
    np.testing.assert_array_equal(blocked.members, whole.members)
    np.testing.assert_array_equal(blocked.memberships, whole.memberships)
    np.testing.assert_array_equal(blocked.confidence, whole.confidence)


def test_lhrr_duplicates_match_reference(subset, layout):
    # Exact duplicates tie with the item itself. The kNN graph puts the item first; the
    # authors' BallTree may list the duplicate first instead (the C++ then swaps the item to
    # the front after its first re-sort): both kinds of list match the reference.
    features = np.concatenate([subset[:60], subset[:12]])
    lists = knn_graph(features, 20).indices
    items = np.arange(len(features))
    assert (lists[:, 0] == items).all()
    duplicate_first = lists.copy()
    duplicate_first[:12, :2] = lists[:12, 1::-1]      # item i < 12: its duplicate 60 + i first
    assert (duplicate_first[:12, 0] == items[:12] + 60).all()
    for initial in (lists, duplicate_first):
        graph = lhrr(initial, 5)
        assert_matches_reference(graph, lhrr_reference(initial, 5))
        assert (graph.ranked_lists[:, 0] == items).all()


def test_lhrr_lists_without_their_item(subset, layout, caplog):
    lists = knn_graph(subset[:60], 21).indices[:, 1:]  # the item removed from every list
    with caplog.at_level(logging.WARNING, logger="engine.rerank._hypergraph"):
        graph = lhrr(lists, 5)
    assert "do not contain their own item" in caplog.text
    assert_matches_reference(graph, lhrr_reference(lists, 5))


def test_lhrr_invariants_and_determinism(subset):
    lists = knn_graph(subset, 40).indices
    first, second = lhrr(lists, 10), lhrr(lists, 10)
    for name in ("ranked_lists", "members", "memberships", "confidence"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
        assert not getattr(first, name).flags.writeable
    ranked = first.ranked_lists
    assert ranked.shape == (SUBSET, 40) and ranked.dtype == np.int64
    assert (ranked[:, 0] == np.arange(SUBSET)).all()
    assert all(len(set(row)) == 40 for row in ranked.tolist())
    assert first.members.dtype == np.int64 and first.memberships.dtype == np.float32
    h = first.incidence()
    assert h.shape == (SUBSET, SUBSET)
    assert (h.diagonal() >= 2.0).all()  # h(i, i) = 1 + w(1) w(1) at least
    assert (first.confidence >= h.diagonal() - 1e-9).all()
    np.testing.assert_allclose(first.confidence, np.sort(h.toarray(), axis=1)[:, ::-1][:, :10]
                               .sum(axis=1), rtol=1e-6)


# -- K and input checks --------------------------------------------------------------------------
def test_k_is_clamped_with_a_warning(subset, caplog):
    lists = knn_graph(subset[:10], 10).indices
    with caplog.at_level(logging.WARNING, logger="engine.rerank._hypergraph"):
        graph = lhrr(lists, 5)
    assert graph.k == 2 and graph.ranked_lists.shape == (10, 8)
    assert "using k=2" in caplog.text
    assert lhrr(lists, 0).k == 1
    narrow = knn_graph(subset[:40], 9).indices  # lists of 9 entries allow k <= 2
    assert lhrr(narrow, 5).k == 2
    assert lhrr_from_features(subset[:20], 10).k == 5


def test_lhrr_from_features_equals_lhrr_of_knn_lists(subset):
    graph = lhrr_from_features(subset, 6)
    np.testing.assert_array_equal(graph.ranked_lists,
                                  lhrr(knn_graph(subset, 24).indices, 6).ranked_lists)
    # rows are used as unit vectors: divided by their norm, which moves them by an ulp or two,
    # so their kNN lists sort the unit rows' cosines up to float ties (each element rounded
    # twice, 2 U32 relative, moves a cosine by 4 U32; the canonical rounding adds U32), and
    # LHRR runs on those lists (near-tied neighbours may swap: not the unscaled lists exactly)
    rows = (subset * 3.0).astype(np.float32)
    unit = (rows / np.linalg.norm(rows.astype(np.float64), axis=1)[:, None]).astype(np.float32)
    lists = knn_graph(unit, 24).indices
    exact = subset.astype(np.float64) / np.linalg.norm(subset.astype(np.float64), axis=1)[:, None]
    assert_order_matches(lists, exact @ exact.T, atol=5 * U32, larger_is_better=True)
    scaled = lhrr_from_features(subset * 3.0, 6)
    np.testing.assert_array_equal(scaled.ranked_lists, lhrr(lists, 6).ranked_lists)


@pytest.mark.parametrize("bad", [
    np.zeros((3, 3), np.int64),              # fewer than 4 items
    np.zeros((8, 3), np.int64),              # lists shorter than 4
    np.arange(16.0).reshape(4, 4),           # not integers
    np.full((4, 4), 7),                      # ids out of range
    np.array([[0, 1, 1, 2]] * 4),            # a repeated item
    np.zeros(8, np.int64),                   # not 2-D
])
def test_lhrr_rejects_bad_lists(bad):
    with pytest.raises(InvalidInputError):
        lhrr(bad, 1)


def test_lhrr_rejects_bad_parameters(subset):
    lists = knn_graph(subset[:20], 8).indices
    for iterations in (0, -1, 1.5):
        with pytest.raises(InvalidInputError):
            lhrr(lists, 2, iterations)
    with pytest.raises(InvalidInputError):
        lhrr(lists, 2.5)
    with pytest.raises(InvalidInputError):
        lhrr_from_features(np.full((8, 4), np.nan), 2)
    with pytest.raises(InvalidInputError):
        lhrr_from_features(np.zeros((8, 4)), 2)


# -- SGCC -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_clusters", "fraction"), [(10, 0.5), (17, 0.5), (5, 0.8), (1, 1.0)])
def test_sgcc_matches_reference(subset, n_clusters, fraction):
    graph = lhrr(knn_graph(subset, 28).indices, 7)
    clustering = sgcc(graph, n_clusters, fraction)
    labels, leaders, score = sgcc_reference(edge_dicts(graph), graph.confidence.tolist(),
                                            n_clusters, fraction)
    np.testing.assert_array_equal(clustering.leaders, leaders)
    np.testing.assert_array_equal(clustering.labels, labels)
    np.testing.assert_allclose(clustering.score, score, rtol=1e-12)
    assert len(set(clustering.leaders.tolist())) == n_clusters
    order = np.lexsort((-np.arange(SUBSET), -clustering.score.astype(np.float32)))
    targets = order[:int(SUBSET * fraction)]
    labelled = np.union1d(targets, clustering.leaders)
    np.testing.assert_array_equal(np.flatnonzero(clustering.labels >= 0), labelled)
    np.testing.assert_array_equal(clustering.labels[clustering.leaders], np.arange(n_clusters))


def test_sgcc_rejects_bad_parameters(subset):
    graph = lhrr(knn_graph(subset[:20], 8).indices, 2)
    for clusters in (0, 21, 2.0):
        with pytest.raises(InvalidInputError):
            sgcc(graph, clusters)
    for fraction in (-0.1, 1.5):
        with pytest.raises(InvalidInputError):
            sgcc(graph, 3, fraction)


# -- the kNN lists LHRR starts from: the item itself first, duplicates or not ------------------
def gallery_with_duplicates(subset: np.ndarray) -> np.ndarray:
    """60 real features plus exact copies: rows 60..65 repeat rows 0..5, rows 30, 40 and 66
    are one image, and rows 67..78 are twelve more copies of row 50 (more copies than some
    lists are deep): items with copies of a smaller and of a larger index."""
    rows = np.concatenate([np.arange(60), np.arange(6), [40], np.full(12, 50)])
    features = subset[rows].copy()
    features[30] = features[66]
    return features


def self_first_reference(features: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities) by a stable sort: the item first, then canonical similarity
    descending, ties to the smaller index."""
    similarity = np.minimum(features.astype(np.float64) @ features.T.astype(np.float64), 1.0
                            ).astype(np.float32)
    key = -similarity.astype(np.float64)
    np.fill_diagonal(key, -np.inf)
    np.fill_diagonal(similarity, 1.0)
    order = np.argsort(key, axis=1, kind="stable")[:, :depth]
    return order, np.take_along_axis(similarity, order, axis=1)


@pytest.mark.parametrize("builder", ["knn_graph", "neighbour_lists", "torch_neighbour_lists",
                                     "torch_topk_similar, small chunks, no margin"])
@pytest.mark.parametrize("depth", [1, 2, 5, 30])
def test_knn_lists_put_the_item_first_with_exact_duplicates(subset, builder, depth):
    """Each item leads its own list at similarity 1, whatever its duplicates' indices; the
    rest follow by similarity, exact ties (the duplicates) by index. Without a margin the
    candidates of the twelve copies of row 50 need not hold the item itself: the exact redo
    must still put it first."""
    features = gallery_with_duplicates(subset)
    if builder == "knn_graph":
        graph = knn_graph(features, depth)
        indices, similarities = graph.indices, graph.similarities
    elif builder == "neighbour_lists":
        lists = neighbour_lists(features, depth)
        indices, similarities = lists.indices, lists.similarities
    elif builder == "torch_neighbour_lists":
        lists = torch_neighbour_lists(torch.from_numpy(features), depth)
        indices, similarities = lists.indices.numpy(), lists.similarities.numpy()
    else:
        found = torch_topk_similar(torch.from_numpy(features), depth, chunk=7, margin=0)
        indices, similarities = found[1].numpy(), found[0].numpy()
    items = np.arange(len(features))
    np.testing.assert_array_equal(indices[:, 0], items)
    np.testing.assert_array_equal(similarities[:, 0], 1.0)
    expected, expected_similarities = self_first_reference(features, depth)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(similarities, expected_similarities)
    if depth >= 5:  # copies with a smaller index than the item come after it, not first
        assert indices[66, :3].tolist() == [66, 30, 40] and indices[60, :2].tolist() == [60, 0]
        assert indices[78, :5].tolist() == [78, 50, 67, 68, 69]


def test_lists_with_query_keep_the_item_first(subset):
    """A query that duplicates gallery items joins their lists right after the item itself
    (and before its other copies): the lists a batch run over query + gallery builds."""
    gallery = gallery_with_duplicates(subset)
    depth = 8
    similarities, neighbours = torch_topk_similar(torch.from_numpy(gallery), depth)
    for row in (0, 30, 50, 66, 12):
        query = gallery[row]
        to_query = torch.from_numpy(canonical_similarity(gallery, query[None, :])[:, 0])
        values, lists = lists_with_query(similarities, neighbours, to_query, depth)
        union = torch.from_numpy(np.vstack([query[None, :], gallery]))
        batch_values, batch = torch_topk_similar(union, depth)
        np.testing.assert_array_equal(lists.numpy(), batch.numpy(), err_msg=f"query {row}")
        np.testing.assert_array_equal(values.numpy(), batch_values.numpy())
        assert (lists[:, 0] == torch.arange(len(gallery) + 1)).all()
        assert lists[row + 1, 1] == 0  # the query right after the item it duplicates


def test_lhrr_from_features_with_duplicates_starts_from_self_first_lists(subset, caplog):
    features = gallery_with_duplicates(subset)
    with caplog.at_level(logging.WARNING, logger="engine.rerank._hypergraph"):
        graph = lhrr_from_features(features, 5)
    assert "do not contain their own item" not in caplog.text
    lists = knn_graph(features, 20).indices
    assert_matches_reference(graph, lhrr_reference(lists, 5))


# -- GCN graph and number of clusters -------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 4, 9, 100])
def test_reciprocal_edges_match_brute_force(subset, k):
    lists = lhrr(knn_graph(subset, 40).indices, 10).ranked_lists
    width = min(k + 1, lists.shape[1])
    expected = [(i, int(v)) for i in range(len(lists)) for v in lists[i, :width]
                if v != i and i in lists[v, :width]]
    edges = reciprocal_edges(lists, k)
    assert edges.dtype == np.int64 and edges.shape == (2, len(expected))
    assert list(zip(*edges.tolist(), strict=True)) == expected  # the authors' order
    pairs = set(expected)
    assert all((v, i) in pairs for i, v in pairs)
    assert all(i != v for i, v in pairs)


def test_reciprocal_edges_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        reciprocal_edges(np.zeros((4, 4), np.int64), -1)
    with pytest.raises(InvalidInputError):
        reciprocal_edges(np.zeros((4, 4)), 1)


def test_default_clusters():
    assert default_clusters(1360, 80) == 17  # the authors' Flowers setting: K = class size
    assert default_clusters(1360) == 26      # sqrt(n / 2)
    assert default_clusters(1) == 1 and default_clusters(3) == 2 and default_clusters(10, 100) == 2
    with pytest.raises(InvalidInputError):
        default_clusters(0)


# -- quality on real features ---------------------------------------------------------------------
def test_lhrr_and_sgcc_quality_on_real_features(demo_features):
    features, labels = demo_features.features, demo_features.labels
    k = 10
    baseline = knn_graph(features, 4 * k).indices
    graph = lhrr(baseline, k)
    before, after = leave_one_out(baseline, labels), leave_one_out(graph.ranked_lists, labels)
    clustering = sgcc(graph, 17)
    kept = clustering.labels >= 0
    purity = sum(np.bincount(labels[kept & (clustering.labels == c)]).max()
                 for c in range(17)) / kept.sum()
    print(f"\ndemo (n={len(labels)}, K={k}): cosine mAP {before.map:.4f} P@1 "
          f"{before.precision_at[1]:.4f} -> LHRR mAP {after.map:.4f} P@1 "
          f"{after.precision_at[1]:.4f}; SGCC purity {purity:.3f} over {kept.sum()} items")
    assert after.map > before.map + 0.02
    assert purity > 0.5  # chance is ~1/17


def test_lhrr_from_features_reads_a_deep_enough_graph(subset, monkeypatch):
    """Given the items' graph 4K deep (exact or approximate), LHRR starts from its lists
    without searching; a shallower one is not used."""
    graph = knn_graph(subset, 30)
    searched = lhrr_from_features(subset, 6)
    approximate = KnnGraph(graph.indices, graph.similarities, graph.farthest,
                           canonical=False, recall=0.9)

    def no_search(*args, **kwargs):
        raise AssertionError("searched the items")

    with monkeypatch.context() as patch:
        patch.setattr(hypergraph_module, "knn_graph", no_search)
        given = lhrr_from_features(subset, 6, knn=approximate)
    np.testing.assert_array_equal(given.ranked_lists, searched.ranked_lists)
    shallow = KnnGraph(graph.indices[:, :20], graph.similarities[:, :20], graph.farthest)
    np.testing.assert_array_equal(lhrr_from_features(subset, 6, knn=shallow).ranked_lists,
                                  searched.ranked_lists)
