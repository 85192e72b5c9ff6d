"""GNN re-ranking against a dense reference written from the method (docs/methods/gnn.md)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from oracles import gnn_atol
from tie_aware import assert_order_matches

from engine.core.knn import torch_topk_largest, torch_topk_similar
from engine.rerank import create_reranker
from engine.rerank.gnn import propagate

FEATURE_DIM = 1280  # lite0 features


def dense_knn(features: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k1 most similar nodes of each node (self included), ties to the smaller index.

    Similarities are float64 sums rounded to float32, so exact duplicates tie exactly (a raw
    float64 product still differs in the last bits between duplicate columns).
    """
    similarity = (features.astype(np.float64) @ features.astype(np.float64).T
                  ).astype(np.float32).astype(np.float64)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k1]
    return order, np.take_along_axis(similarity, order, 1)


def dense_propagation(order: np.ndarray, similarities: np.ndarray, k2: int) -> np.ndarray:
    """The notes' stages 1-2 with dense matrices and a plain loop over rows."""
    n = order.shape[0]
    adjacency = np.zeros((n, n))
    for i in range(n):
        adjacency[i, order[i]] = 1.0
    if k2 == 1:
        return adjacency  # no propagation: the raw binary kNN rows
    weights = similarities ** 2
    for _ in range(2):
        adjacency = adjacency + adjacency.T
        propagated = np.zeros_like(adjacency)
        for i in range(n):
            for j in range(k2):
                propagated[i] += weights[i, j] * adjacency[order[i, j]]
        adjacency = propagated / np.linalg.norm(propagated, axis=1, keepdims=True)
    return adjacency


def gnn_reference(queries: np.ndarray | None, gallery: np.ndarray, k1: int, k2: int,
                  lambda_value: float) -> np.ndarray:
    """(Q, G) distances 1 - score; queries None = leave-one-out (self at +inf)."""
    nodes = gallery if queries is None else np.vstack([queries, gallery])
    n_queries = len(gallery) if queries is None else len(queries)
    offset = 0 if queries is None else n_queries
    order, similarities = dense_knn(nodes, k1)
    adjacency = dense_propagation(order, similarities, k2)
    x = nodes.astype(np.float64)
    score = ((1 - lambda_value) * adjacency[:n_queries] @ adjacency[offset:].T
             + lambda_value * x[:n_queries] @ x[offset:].T)
    distances = 1.0 - score
    if queries is None:
        np.fill_diagonal(distances, np.inf)
    return distances


def assert_matches_reference(result, ref: np.ndarray, k1: int, k2: int,
                             lambda_value: float = 0.3, n_nodes: int | None = None) -> int:
    """Distances equal the reference at the returned indices; order equal up to float ties
    (`tie_aware`); exact ties (duplicates; k2 = 1, lambda = 0 gives integer scores) in
    ascending gallery index. n_nodes: the graph's nodes (default queries + gallery)."""
    n_nodes = sum(ref.shape) if n_nodes is None else n_nodes
    return assert_order_matches(result.indices, ref, values=result.distances,
                                atol=gnn_atol(n_nodes, k1, k2, lambda_value, FEATURE_DIM),
                                ties_by_index=True)


def gnn(**params):
    return create_reranker("gnn", device="cpu", **params)


@pytest.mark.parametrize("lambda_value", [0.3, 0.0])
def test_batch_matches_dense_reference(oracle_split_features, lambda_value):
    queries, gallery = oracle_split_features
    result = gnn(lambda_value=lambda_value).fit(gallery).rerank(queries)
    assert (result.details["k1"], result.details["k2"]) == (26, 7)
    assert_matches_reference(result, gnn_reference(queries, gallery, 26, 7, lambda_value),
                             26, 7, lambda_value)


@pytest.mark.parametrize(("k1", "k2"), [(10, 3), (5, 5), (40, 12)])
def test_batch_matches_dense_reference_other_sizes(oracle_split_features, k1, k2):
    queries, gallery = oracle_split_features
    result = gnn(k1=k1, k2=k2).fit(gallery).rerank(queries)
    assert_matches_reference(result, gnn_reference(queries, gallery, k1, k2, 0.3), k1, k2)


@pytest.mark.parametrize("lambda_value", [0.3, 0.0])
def test_k2_one_scores_raw_binary_rows(oracle_split_features, lambda_value):
    """No propagation: the graph score counts shared kNN neighbours (rows not normalised)."""
    queries, gallery = oracle_split_features
    result = gnn(k1=15, k2=1, lambda_value=lambda_value).fit(gallery).rerank(queries)
    ref = gnn_reference(queries, gallery, 15, 1, lambda_value)
    assert_matches_reference(result, ref, 15, 1, lambda_value)
    # a query shares at most k1 neighbours with anything: scores reach (1 - lambda) * k1 at most
    atol = gnn_atol(len(queries) + len(gallery), 15, 1, lambda_value, FEATURE_DIM)
    assert result.distances.min() >= 1.0 - (1 - lambda_value) * 15 - lambda_value - atol
    if lambda_value == 0.0:  # integer counts
        np.testing.assert_allclose(result.distances, np.round(result.distances), atol=1e-5)


def test_online_matches_dense_reference(split_features):
    queries, gallery = split_features
    reranker = gnn().fit(gallery)
    for query in queries[:4]:
        result = reranker.rerank_online(query)
        assert_matches_reference(result, gnn_reference(query[None, :], gallery, 26, 7, 0.3),
                                 26, 7)


def test_leave_one_out_matches_dense_reference_and_never_returns_self(oracle_split_features):
    _, gallery = oracle_split_features
    reranker = gnn(k1=12, k2=4).fit(gallery)
    result = reranker.rerank(None)
    n = len(gallery)
    assert result.indices.shape == (n, n - 1)
    assert not (result.indices == np.arange(n)[:, None]).any()
    assert_matches_reference(result, gnn_reference(None, gallery, 12, 4, 0.3), 12, 4,
                             n_nodes=n)
    top = reranker.rerank(None, 5)
    assert not (top.indices == np.arange(n)[:, None]).any()


@pytest.mark.parametrize(("k1", "k2"), [(8, 3), (12, 6), (26, 7)])
@pytest.mark.parametrize("mode", ["batch", "online"])
def test_duplicates_match_dense_reference(split_features, k1, k2, mode):
    """Exact duplicates (exact similarity ties), queries that are gallery items included."""
    queries, gallery = split_features
    base = gallery[:30]
    gallery = np.vstack([base, base[:6]])  # rows 30..35 duplicate rows 0..5
    queries = np.vstack([base[:3], queries[:2]])
    reranker = gnn(k1=k1, k2=k2).fit(gallery)
    if mode == "batch":
        assert_matches_reference(reranker.rerank(queries),
                                 gnn_reference(queries, gallery, k1, k2, 0.3), k1, k2)
    else:
        for query in queries:
            assert_matches_reference(reranker.rerank_online(query),
                                     gnn_reference(query[None, :], gallery, k1, k2, 0.3),
                                     k1, k2)


def test_leave_one_out_never_returns_self_with_duplicates(split_features):
    _, gallery = split_features
    gallery = np.vstack([gallery[:20], gallery[:5]])  # rows 20..24 duplicate rows 0..4
    result = gnn().fit(gallery).rerank(None, 3)
    assert not (result.indices == np.arange(25)[:, None]).any()
    np.testing.assert_array_equal(result.indices[:5, 0], np.arange(20, 25))
    np.testing.assert_array_equal(result.indices[20:, 0], np.arange(5))


def test_clamped_graph_matches_reference(split_features):
    queries, gallery = split_features
    gallery = gallery[:9]
    result = gnn().fit(gallery).rerank(queries[:3])
    # 12 nodes: k1 = 26 is clamped to 12, k2 = 7 stays
    assert (result.details["k1"], result.details["k2"]) == (12, 7)
    assert "clamped" in result.details
    assert_matches_reference(result, gnn_reference(queries[:3], gallery, 12, 7, 0.3), 12, 7)


# -- propagate on random data --------------------------------------------------------------------
def random_graph(seed: int, n: int, d: int, k1: int, duplicates: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    if duplicates:
        x[-duplicates:] = x[:duplicates]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order, similarities = dense_knn(x, k1)
    return x, order, similarities


def as_dense(adjacency: torch.Tensor) -> np.ndarray:
    return (adjacency.to_dense() if adjacency.is_sparse else adjacency).numpy()


# propagate keeps small graphs dense; `dense_limit=0` forces the sparse path where it exists
STORAGE = [{}] + ([{"dense_limit": 0}]
                  if "dense_limit" in inspect.signature(propagate).parameters else [])


@pytest.mark.parametrize("storage", STORAGE, ids=lambda s: "sparse" if s else "default")
@pytest.mark.parametrize(("k1", "k2", "duplicates"), [(6, 3, 0), (10, 10, 0), (8, 4, 5),
                                                     (1, 1, 0), (7, 1, 0), (3, 2, 0)])
def test_propagate_matches_dense_reference(k1, k2, duplicates, storage):
    _, order, similarities = random_graph(k1 * 10 + k2, 60, 12, k1, duplicates)
    adjacency = propagate(torch.from_numpy(order), torch.from_numpy(similarities).float(), k2,
                          **storage)
    assert adjacency.shape == (60, 60)
    if storage:
        assert adjacency.is_sparse
    dense = as_dense(adjacency)
    expected = dense_propagation(order, similarities, k2)
    np.testing.assert_allclose(dense, expected, atol=1e-6)
    if k2 == 1:
        assert set(np.unique(dense)) <= {0.0, 1.0}
        np.testing.assert_array_equal(dense.sum(axis=1), k1)
    else:
        np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-6)


def test_propagate_layers():
    _, order, similarities = random_graph(1, 30, 6, 5)
    one_layer = as_dense(propagate(torch.from_numpy(order),
                                   torch.from_numpy(similarities).float(), 3, layers=1))
    adjacency = np.zeros((30, 30))
    for i in range(30):
        adjacency[i, order[i]] = 1
    adjacency = adjacency + adjacency.T
    expected = np.stack([sum(similarities[i, j] ** 2 * adjacency[order[i, j]] for j in range(3))
                         for i in range(30)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(one_layer, expected, atol=1e-6)


def test_torch_topk_breaks_ties_by_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    for margin in (0, 1, 8):
        values, order = torch_topk_largest(scores, 4, margin=margin)
        np.testing.assert_array_equal(order.numpy(), [[1, 2, 4, 0], [0, 1, 2, 3], [5, 4, 3, 2]])
        np.testing.assert_array_equal(values.numpy(), scores.gather(1, order).numpy())


def test_torch_topk_similar_matches_stable_sort():
    rng = np.random.default_rng(4)
    # unit vectors with three entries of +-1/sqrt(3): inner products take few values, many ties
    x = np.zeros((50, 6), np.float32)
    for row in x:
        row[rng.choice(6, 3, replace=False)] = rng.choice([-1.0, 1.0], 3)
    x /= np.float32(np.sqrt(3.0))
    similarities, indices = torch_topk_similar(torch.from_numpy(x), 9, chunk=16)
    canonical = np.minimum(x.astype(np.float64) @ x.T.astype(np.float64), 1.0).astype(np.float32)
    np.fill_diagonal(canonical, 1.0)
    expected = np.argsort(-canonical, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_array_equal(similarities.numpy(),
                                  np.take_along_axis(canonical, expected, 1))


@pytest.mark.parametrize("lambda_value", [0.3, 0.0])
def test_patched_online_matches_batch(split_features, monkeypatch, lambda_value):
    """The patched online path (used above the dense size) equals batch with the single query,
    duplicates of gallery items among the queries included."""
    from engine.rerank.gnn import GNNReranker

    monkeypatch.setattr(GNNReranker, "patch_min_nodes", 0)
    queries, gallery = split_features
    gallery = np.vstack([gallery, gallery[:4]])  # exact duplicates
    reranker = gnn(lambda_value=lambda_value).fit(gallery)
    assert reranker._propagation is not None
    for query in np.vstack([queries[:4], gallery[:2]]):
        online = reranker.rerank_online(query)
        assert online.details["rows_recomputed"] > 0
        assert_matches_reference(online,
                                 gnn_reference(query[None, :], gallery, 26, 7, lambda_value),
                                 26, 7, lambda_value)
