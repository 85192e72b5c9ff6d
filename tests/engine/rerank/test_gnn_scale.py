"""GNN re-ranking at scale: the reuse of fit's kNN lists (no second search), the sparse online
patch (only the rows a query changes) and the batch's memory refusal, each against the
method's plain computation (`gnn_scores` searching every node itself) and the dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import gnn_atol
from test_gnn import FEATURE_DIM, gnn_reference
from tie_aware import assert_order_matches

import engine.rerank.gnn as gnn_module
from engine.bench.measure import synthetic_collection
from engine.core.knn import knn_graph, lists_with_query, torch_topk_similar
from engine.core.types import GalleryContext, KnnGraph
from engine.errors import TooLargeError
from engine.rerank import create_reranker
from engine.rerank._gnn import lists_with_queries, query_lists, query_similarities
from engine.rerank.gnn import GNNReranker, gnn_scores


def gnn(**params):
    return create_reranker("gnn", device="cpu", **params)


def tied_collection(n: int, dim: int = 48, seed: int = 0, duplicates: int = 6
                    ) -> np.ndarray:
    """Clustered unit rows whose last `duplicates` copy the first (exact similarity ties)."""
    features, _ = synthetic_collection(n, dim, n_classes=max(2, n // 20), seed=seed)
    features[n - duplicates:] = features[:duplicates]
    return features


def held_out(n: int, count: int, dim: int = 48, seed: int = 0) -> np.ndarray:
    """`count` new rows from the clusters of `tied_collection(n, dim, seed)`."""
    features, _ = synthetic_collection(n + count, dim, n_classes=max(2, n // 20), seed=seed)
    return features[n:]


def plain_scores(queries: np.ndarray | None, gallery: np.ndarray, k1: int, k2: int,
                 lambda_value: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the method computed before it reused fit's lists: `gnn_scores` searching all nodes
    itself. Returns (distances, indices)."""
    features = gallery if queries is None else np.vstack([queries, gallery])
    n_queries = len(gallery) if queries is None else len(queries)
    k1 = min(k1, len(features))
    with torch.inference_mode():
        scores, indices = gnn_scores(torch.from_numpy(features), n_queries, k1, min(k2, k1),
                                     lambda_value, k, exclude_self=queries is None)
    return (1.0 - scores).numpy(), indices.numpy()


def assert_same_ranking(result, distances: np.ndarray, indices: np.ndarray, atol: float
                        ) -> None:
    """The same items at the same places (distances within `atol`) except where two
    distances tie within `atol`; at least one row compared."""
    got_indices = np.atleast_2d(result.indices)
    got = np.atleast_2d(result.distances)
    assert got_indices.shape == indices.shape and got_indices.size > 0
    np.testing.assert_allclose(got, distances, atol=atol)
    tied = np.abs(np.diff(distances, axis=1)) <= 2 * atol
    fragile = np.zeros_like(tied[:, :1])
    fixed = ~(np.hstack([tied, fragile]) | np.hstack([fragile, tied]))
    assert fixed.sum() > 0
    np.testing.assert_array_equal(got_indices[fixed], indices[fixed])


# -- neighbour lists ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_lists_with_queries_equal_a_search_over_all_nodes(seed):
    gallery = tied_collection(300, seed=seed)
    queries = np.vstack([gallery[:3], gallery[150:152], held_out(300, 4, seed=seed),
                         tied_collection(40, seed=seed + 7)[:2]])
    depth = 12
    graph = knn_graph(gallery, depth)
    floors = graph.similarities.min(axis=1)
    similarities, lists = lists_with_queries(graph.similarities, graph.indices, floors,
                                             queries, gallery, depth)
    expected_similarities, expected = torch_topk_similar(
        torch.from_numpy(np.vstack([queries, gallery])), depth)
    np.testing.assert_array_equal(lists, expected.numpy())
    np.testing.assert_array_equal(similarities, expected_similarities.numpy())
    assert (lists[len(queries):] < len(queries)).any()  # some gallery lists took a query


def test_query_lists_equal_lists_with_query():
    gallery = tied_collection(400)
    depth = 10
    graph = knn_graph(gallery, depth)
    floors = graph.similarities.min(axis=1)
    for query in [gallery[0], gallery[200], *held_out(400, 2)]:
        canonical = np.minimum(gallery.astype(np.float64) @ query.astype(np.float64),
                               1.0).astype(np.float32)
        raw = gallery @ query
        to_query = query_similarities(raw, gallery, query, floors, depth - 1)
        expected_similarities, expected = lists_with_query(
            torch.from_numpy(graph.similarities), torch.from_numpy(graph.indices),
            torch.from_numpy(canonical), depth)
        rows, lists, similarities = query_lists(graph.similarities, graph.indices, floors,
                                                to_query, depth)
        assert rows[0] == 0 and len(rows) > 1
        np.testing.assert_array_equal(lists, expected.numpy()[rows])
        np.testing.assert_array_equal(similarities, expected_similarities.numpy()[rows])
        unchanged = np.setdiff1d(np.arange(1, len(gallery) + 1), rows)
        np.testing.assert_array_equal(expected.numpy()[unchanged], graph.indices[unchanged - 1]
                                      + 1)


# -- fit reuses the context's graph --------------------------------------------------------------
def forbid_search(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("searched the gallery although the context's graph was deep enough")
    monkeypatch.setattr(gnn_module, "torch_topk_similar", refuse)


@pytest.mark.parametrize("canonical", [True, False])
def test_fit_and_batch_use_the_contexts_graph(monkeypatch, canonical):
    gallery = tied_collection(300)
    graph = knn_graph(gallery, 40)
    graph = KnnGraph(graph.indices, graph.similarities, graph.farthest, canonical=canonical)
    expected = plain_scores(None, gallery, 20, 5, 0.3, 10)
    forbid_search(monkeypatch)
    reranker = gnn(k1=20, k2=5).fit(GalleryContext(gallery, knn=graph))
    np.testing.assert_array_equal(reranker._lists, graph.indices[:, :20])
    assert not [name for name, value in vars(reranker).items()  # no float64 gallery copy
                if isinstance(value, np.ndarray) and value.dtype == np.float64
                and value.shape == gallery.shape]
    loo = reranker.rerank(None, 10)
    assert_same_ranking(loo, *expected, atol=gnn_atol(300, 20, 5, 0.3, 48))


def test_approximate_graph_is_used_as_given(monkeypatch):
    """An approximate graph's lists are the method's lists (here one list is deliberately
    wrong: the leave-one-out result follows it instead of an exact search)."""
    gallery = tied_collection(200)
    exact = knn_graph(gallery, 30)
    indices = exact.indices.copy()
    indices[5, 1:] = np.roll(indices[5, 1:], 1)
    forbid_search(monkeypatch)
    reranker = gnn(k1=10, k2=3).fit(GalleryContext(
        gallery, knn=KnnGraph(indices, exact.similarities, exact.farthest, canonical=False)))
    np.testing.assert_array_equal(reranker._lists[5], indices[5, :10])


# -- batch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(26, 7, 0.3), (12, 4, 0.0), (9, 1, 0.3)])
def test_batch_with_fits_lists_equals_the_plain_computation(k1, k2, lambda_value):
    gallery = tied_collection(500)
    queries = np.vstack([gallery[:4], held_out(500, 4), tied_collection(60, seed=5)[:2]])
    reranker = gnn(k1=k1, k2=k2, lambda_value=lambda_value).fit(
        GalleryContext(gallery, knn=knn_graph(gallery, 40)))
    atol = gnn_atol(510, k1, k2, lambda_value, 48)
    assert_same_ranking(reranker.rerank(queries, 30),
                        *plain_scores(queries, gallery, k1, k2, lambda_value, 30), atol=atol)
    assert_same_ranking(reranker.rerank(None, 30),
                        *plain_scores(None, gallery, k1, k2, lambda_value, 30), atol=atol)


def test_batch_with_fits_lists_matches_dense_reference():
    gallery = tied_collection(120)
    queries = np.vstack([gallery[:2], held_out(120, 3)])
    reranker = gnn(k1=10, k2=4).fit(GalleryContext(gallery, knn=knn_graph(gallery, 20)))
    result = reranker.rerank(queries)
    compared = assert_order_matches(result.indices, gnn_reference(queries, gallery, 10, 4, 0.3),
                                    values=result.distances,
                                    atol=gnn_atol(125, 10, 4, 0.3, FEATURE_DIM),
                                    ties_by_index=True)
    assert compared > 0


def test_batch_refusal(monkeypatch):
    reranker = gnn().fit(GalleryContext(tied_collection(300), knn=None))
    monkeypatch.setattr(gnn_module, "memory_budget", lambda: 1 << 40)
    assert reranker.batch_refusal(300, 10) is None
    needed = reranker._batch_bytes(300, 10)
    assert needed > 300 * 26 * 12  # at least the lists
    monkeypatch.setattr(gnn_module, "memory_budget", lambda: needed // 2)
    refusal = reranker.batch_refusal(300, 10)
    assert refusal is not None and "GiB" in refusal and "online" in refusal
    with pytest.raises(TooLargeError, match="GiB"):
        reranker.rerank(tied_collection(20, seed=2)[:2])
    # the estimate grows with the nodes
    assert reranker._batch_bytes(3000, 10) > 5 * needed
    monkeypatch.setattr(gnn_module, "memory_budget", lambda: None)
    assert reranker.batch_refusal(10 ** 9, 10) is None  # unknown memory: no refusal


def test_batch_refusal_uses_the_measured_edges(monkeypatch):
    monkeypatch.setattr(GNNReranker, "patch_min_nodes", 0)
    reranker = gnn().fit(tied_collection(400))
    edges = reranker._propagation.edges
    assert 0 < edges < 400 * 400
    expected = 410 * edges / 400 * gnn_module.BATCH_BYTES_PER_EDGE
    assert expected <= reranker._batch_bytes(400, 10) <= 1.5 * expected



def test_fit_refuses_a_propagated_graph_beyond_the_memory_budget(monkeypatch):
    """The propagated gallery graph's entry bound is at least its real count (so the refusal
    never lets through a graph that does not fit); below the budget fit refuses with
    TooLargeError, saying how much it may need, and leaves nothing half-fitted."""
    import engine.rerank._gnn_online as online

    monkeypatch.setattr(GNNReranker, "patch_min_nodes", 0)
    features = tied_collection(400)
    seen = {}
    original = online.check_propagation_memory

    def recording(weight, b1):
        seen["bound"] = float(((weight != 0).astype(np.float64)
                               @ np.diff(b1.indptr).astype(np.float64)).sum())
        return original(weight, b1)

    monkeypatch.setattr(online, "check_propagation_memory", recording)
    fitted = gnn().fit(features)
    assert fitted._propagation.edges <= seen["bound"] <= 5 * fitted._propagation.edges
    needed = seen["bound"] * online.PROPAGATED_BYTES_PER_EDGE
    monkeypatch.setattr(online, "memory_budget", lambda: int(needed) - 1)
    refused = gnn()
    with pytest.raises(TooLargeError, match=r"propagated gallery graph may need up to .* GiB "
                                            r"for 400 items"):
        refused.fit(features)
    assert not refused.is_fitted
    monkeypatch.setattr(online, "memory_budget", lambda: int(needed) + 1)
    assert gnn().fit(features).is_fitted

# -- the online patch -----------------------------------------------------------------------------
@pytest.mark.parametrize("lambda_value", [0.3, 0.0])
@pytest.mark.parametrize(("k1", "k2"), [(26, 7), (8, 3)])
def test_patched_online_equals_the_plain_computation(monkeypatch, k1, k2, lambda_value):
    """The sparse patch (forced on a small gallery) against `gnn_scores` over query + gallery,
    duplicates and queries that duplicate gallery items included."""
    monkeypatch.setattr(GNNReranker, "patch_min_nodes", 0)
    gallery = tied_collection(600)
    reranker = gnn(k1=k1, k2=k2, lambda_value=lambda_value).fit(
        GalleryContext(gallery, knn=knn_graph(gallery, 30)))
    assert isinstance(reranker._propagation, gnn_module.GalleryPropagation)
    queries = np.vstack([gallery[:2], gallery[300:301], held_out(600, 4),
                         tied_collection(80, seed=4)[:1]])
    atol = gnn_atol(601, k1, k2, lambda_value, 48)
    for query in queries:
        online = reranker.rerank_online(query, 50)
        assert_same_ranking(online, *plain_scores(query[None, :], gallery, k1, k2,
                                                  lambda_value, 50), atol=atol)


def test_patch_recomputes_only_the_rows_the_query_touches(monkeypatch):
    """On a clustered gallery the rows propagated afresh stay a small, bounded set."""
    monkeypatch.setattr(GNNReranker, "patch_min_nodes", 0)
    gallery, _ = synthetic_collection(4000, 64, n_classes=200, seed=1)
    reranker = gnn().fit(GalleryContext(gallery, knn=knn_graph(gallery, 26)))
    queries, _ = synthetic_collection(4006, 64, n_classes=200, seed=1)
    counts = []
    for query in queries[4000:4003]:
        online = reranker.rerank_online(query, 20)
        counts.append(online.details["rows_recomputed"])
        assert_same_ranking(online, *plain_scores(query[None, :], gallery, 26, 7, 0.3, 20),
                            atol=gnn_atol(4001, 26, 7, 0.3, 64))
    # layer 1: the rows with a changed row among their first k2 (the query's list, the rows
    # that take it in and their dropped items: <= 3 k1 + 1 rows, each in ~k2 lists), layer 2:
    # the query's row and those that take it within their first k2
    assert 0 < max(counts) <= (3 * 26 + 1) * 7 * 2 + 26
    assert max(counts) < 4000 / 8

