"""k-reciprocal re-ranking against the plain-loop reference, a hand-worked case and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from oracles import euclidean, k_reciprocal_atol, k_reciprocal_reference
from tie_aware import U32, assert_order_matches

from engine.core.knn import neighbour_lists, reciprocal_mask, top_k_smallest
from engine.rerank import _k_reciprocal as kr_ops
from engine.rerank import create_reranker
from engine.rerank._k_reciprocal import (
    half_neighbourhood,
    jaccard_distance,
    jaccard_overlap,
    k_reciprocal_encoding,
    k_reciprocal_expansion,
    local_query_expansion,
    pair_squared_distances,
)


def reference(queries: np.ndarray, gallery: np.ndarray, k1: int, k2: int,
              lambda_value: float) -> np.ndarray:
    return k_reciprocal_reference(euclidean(queries, gallery), euclidean(queries, queries),
                                  euclidean(gallery, gallery), k1, k2, lambda_value)


def assert_matches_reference(result, ref: np.ndarray, k2: int, lambda_value: float) -> int:
    """A full ranking whose distances equal the reference at the returned indices and whose
    order equals the reference's up to float ties (`tie_aware`); exact ties (lambda = 0 gives
    many d_J = 1) in ascending gallery index."""
    assert result.indices.shape == ref.shape  # full ranking
    atol = k_reciprocal_atol(sum(ref.shape), k2, lambda_value)
    return assert_order_matches(result.indices, ref, atol=atol, values=result.distances,
                                ties_by_index=True)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- the reference on real features --------------------------------------------------------------
@pytest.mark.parametrize(("oracle_split_features", "k1", "k2", "lambda_value"), [
    *[("original", *case) for case in [(20, 6, 0.3), (10, 1, 0.0), (7, 4, 1.0), (25, 3, 0.5)]],
    ("perturbed", 20, 6, 0.3), ("perturbed", 10, 1, 0.0)], indirect=["oracle_split_features"])
def test_batch_matches_reference_on_real_features(oracle_split_features, k1, k2, lambda_value):
    queries, gallery = oracle_split_features
    reranker = create_reranker("k_reciprocal", k1=k1, k2=k2, lambda_value=lambda_value)
    result = reranker.fit(gallery).rerank(queries)
    assert result.details["k1"] == k1 and result.details["k2"] == k2
    assert "clamped" not in result.details
    assert_matches_reference(result, reference(queries, gallery, k1, k2, lambda_value), k2,
                             lambda_value)


def test_online_matches_reference_with_one_query(oracle_split_features):
    queries, gallery = oracle_split_features
    reranker = create_reranker("k_reciprocal").fit(gallery)
    for query in queries[:3]:
        result = reranker.rerank_online(query)
        assert_matches_reference(result, reference(query[None, :], gallery, 20, 6, 0.3), 6, 0.3)


def test_small_graph_matches_reference_with_clamped_k1(split_features):
    queries, gallery = split_features
    gallery = gallery[:12]
    result = create_reranker("k_reciprocal", k1=20, k2=6).fit(gallery).rerank(queries[:3])
    # 15 nodes: k1 is clamped to 14 (every other node), k2 stays 6
    assert (result.details["k1"], result.details["k2"]) == (14, 6)
    assert "clamped" in result.details
    assert_matches_reference(result, reference(queries[:3], gallery, 14, 6, 0.3), 6, 0.3)


@pytest.mark.parametrize(("k1", "k2"), [(8, 3), (12, 6), (20, 6)])
@pytest.mark.parametrize("mode", ["batch", "online"])
def test_duplicates_match_reference(split_features, k1, k2, mode):
    """Exact duplicates (exact distance ties), queries that are gallery items included.

    Querying with a gallery image is the explorer's most common query; the query then has
    distance exactly 0 to its copies, and the reference orders such ties by node id.
    """
    queries, gallery = split_features
    base = gallery[:30]
    gallery = np.vstack([base, base[:6]])  # rows 30..35 duplicate rows 0..5
    queries = np.vstack([base[:3], queries[:2]])
    reranker = create_reranker("k_reciprocal", k1=k1, k2=k2).fit(gallery)
    if mode == "batch":
        assert_matches_reference(reranker.rerank(queries),
                                 reference(queries, gallery, k1, k2, 0.3), k2, 0.3)
    else:
        for query in queries:
            assert_matches_reference(reranker.rerank_online(query),
                                     reference(query[None, :], gallery, k1, k2, 0.3), k2, 0.3)


# -- a hand-worked tiny case ---------------------------------------------------------------------
def tiny_case() -> np.ndarray:
    """Six unit vectors in two orthogonal clusters with chosen cosines.

    Nodes: q (the query), then the gallery a1, a2 | b0, b1, b2.
    Cluster A = {q, a1, a2}: cos(q, a1) = 0.9, cos(q, a2) = 0.8, cos(a1, a2) = 0.85.
    Cluster B = {b0, b1, b2}: cos(b0, b1) = 0.95, cos(b0, b2) = 0.7, cos(b1, b2) = 0.75.
    Across the clusters cos = 0, so every row's largest squared distance is 2 - 2*0 = 2 and the
    normalised squared distance is d'(i, j) = (2 - 2 cos) / 2 = 1 - cos.
    """
    gram = np.zeros((6, 6))
    gram[:3, :3] = [[1, 0.9, 0.8], [0.9, 1, 0.85], [0.8, 0.85, 1]]
    gram[3:, 3:] = [[1, 0.95, 0.7], [0.95, 1, 0.75], [0.7, 0.75, 1]]
    vectors = np.linalg.cholesky(gram)  # rows have exactly these inner products
    return unit(vectors)


# Worked by hand for k1 = 2 (N(i, 2) = self + 2 nearest), k2 = 1 (no query expansion):
#   d'(q, .) = [0, .1, .2, 1, 1, 1]; N(q,2) = {q, a1, a2}; N(a1,2) = {a1, q (.1), a2 (.15)};
#   N(a2,2) = {a2, a1 (.15), q (.2)}: all reciprocal, so R(q,2) = {q, a1, a2}, and the
#   half-sets R(c,1) (h = round(1) = 1) are subsets of it, so R*(q) = R*(a1) = R*(a2) = A.
#   V[q]  = exp(-[0, .1, .2])  / 2.723568 = [.367165, .332225, .300610]
#   V[a1] = exp(-[.1, 0, .15]) / 2.765545 = [.327182, .361592, .311225]
#   V[a2] = exp(-[.2, .15, 0]) / 2.679439 = [.305561, .321227, .373212]
#   m(q, a1) = .327182 + .332225 + .300610 = .960017  -> d_J = 1 - .960017 / 1.039983 = .076892
#   m(q, a2) = .305561 + .321227 + .300610 = .927397  -> d_J = 1 - .927397 / 1.072603 = .135377
#   V of b0, b1, b2 lives on cluster B only, so m(q, b) = 0 and d_J(q, b) = 1 (three-way tie,
#   broken by gallery index).
HAND_JACCARD = np.array([0.076892, 0.135377, 1.0, 1.0, 1.0])
HAND_ORIGINAL = np.array([0.1, 0.2, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("lambda_value", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("mode", ["batch", "online"])
def test_hand_worked_case(lambda_value, mode):
    nodes = tiny_case()
    query, gallery = nodes[:1], nodes[1:]
    reranker = create_reranker("k_reciprocal", k1=2, k2=1, lambda_value=lambda_value)
    result = reranker.fit(gallery).rerank(query, mode=mode)
    expected = (1 - lambda_value) * HAND_JACCARD + lambda_value * HAND_ORIGINAL
    np.testing.assert_allclose(result.distances[0], expected, atol=1e-5)
    np.testing.assert_array_equal(result.indices[0], [0, 1, 2, 3, 4])
    # and the reference agrees
    np.testing.assert_allclose(reference(query, gallery, 2, 1, lambda_value)[0], expected,
                               atol=1e-5)


def test_lambda_one_is_the_normalised_squared_distance_ranking(split_features):
    queries, gallery = split_features
    result = create_reranker("k_reciprocal", lambda_value=1.0).fit(gallery).rerank(queries)
    nodes = np.vstack([queries, gallery])
    squared = squared_distances_to(nodes, slice(0, len(queries)))
    expected = squared[:, len(queries):] / squared.max(axis=1, keepdims=True)
    assert_order_matches(result.indices, expected, values=result.distances,
                         atol=k_reciprocal_atol(len(nodes), 6, 1.0))


# -- invariants of the ops -----------------------------------------------------------------------
def loop_reciprocal(lists: np.ndarray, i: int, k: int) -> set[int]:
    return {int(j) for j in lists[i, :k + 1] if i in lists[j, :k + 1]}


def loop_expansion(lists: np.ndarray, i: int, k1: int) -> set[int]:
    members = loop_reciprocal(lists, i, k1)
    expanded = set(members)
    for candidate in members:
        half = loop_reciprocal(lists, candidate, half_neighbourhood(k1))
        if len(half & members) > 2.0 / 3.0 * len(half):
            expanded |= half
    return expanded


def random_lists(rng: np.random.Generator, n: int, self_first: bool) -> np.ndarray:
    lists = np.empty((n, n), np.int64)
    for i in range(n):
        others = rng.permutation([j for j in range(n) if j != i])
        lists[i] = np.concatenate([[i], others]) if self_first else rng.permutation(n)
    return lists


@pytest.mark.parametrize("k1", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("source", ["features", "permutations", "unordered"])
def test_expansion_matches_plain_sets(k1, source):
    rng = np.random.default_rng(k1)
    n = 14
    if source == "features":
        clustered = np.repeat(rng.standard_normal((3, 6)), 5, axis=0)[:n]
        lists = neighbour_lists(unit(clustered + 0.4 * rng.standard_normal((n, 6))), n).indices
    else:
        lists = random_lists(rng, n, self_first=source == "permutations")
    rows, members = k_reciprocal_expansion(lists, k1)
    assert (np.diff(rows) >= 0).all()
    for i in range(n):
        got = members[rows == i]
        assert list(got) == sorted(set(got.tolist()))  # sorted, each pair once
        assert set(got.tolist()) == loop_expansion(lists, i, k1), i
    # a subset of rows gives those rows' sets
    subset = np.array([3, 0, 11])
    sub_rows, sub_members = k_reciprocal_expansion(lists, k1, subset)
    for i in subset:
        assert set(sub_members[sub_rows == i].tolist()) == loop_expansion(lists, i, k1)


def test_expansion_in_small_chunks_gives_the_same_pairs(monkeypatch):
    """The membership test is chunked by its (rows, W, H, W) size, so a wide k1 stays within
    memory; the pairs do not depend on the chunking."""
    from engine.core import knn

    rng = np.random.default_rng(3)
    clustered = np.repeat(rng.standard_normal((4, 8)), 15, axis=0)
    lists = neighbour_lists(unit(clustered + 0.5 * rng.standard_normal((60, 8))), 60).indices
    whole = k_reciprocal_expansion(lists, 30)
    monkeypatch.setattr(knn, "EXPANSION_ELEMENTS", 31 * 31 * 16 * 3)  # three rows a chunk
    chunked = k_reciprocal_expansion(lists, 30)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])
    for i in (0, 17, 59):
        assert set(whole[1][whole[0] == i].tolist()) == loop_expansion(lists, i, 30)


def test_reciprocal_mask_matches_a_loop():
    rng = np.random.default_rng(0)
    lists = random_lists(rng, 12, self_first=True)
    for width in (1, 3, 6):
        mask = reciprocal_mask(lists, width)
        for r in range(12):
            for a in range(width):
                assert mask[r, a] == (r in lists[lists[r, a], :width])


@pytest.mark.parametrize(("k1", "expected"), [(1, 0), (2, 1), (3, 2), (5, 2), (20, 10),
                                              (25, 12), (26, 13), (27, 14)])
def test_half_neighbourhood_rounds_half_to_even(k1, expected):
    assert half_neighbourhood(k1) == expected


def squared_distances_to(features: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
    """Dense squared distances 2 - 2 cos of features[rows] to every row (float64), self 0."""
    x = features.astype(np.float64)
    distances = np.maximum(2.0 - 2.0 * x[rows] @ x.T, 0.0)
    row_ids = np.arange(len(x))[rows]
    distances[np.arange(len(row_ids)), row_ids] = 0.0
    return distances


def test_encoding_rows_sum_to_one():
    rng = np.random.default_rng(5)
    features = unit(rng.standard_normal((60, 10)))
    for k1 in (3, 10):
        lists = neighbour_lists(features, k1 + 1)
        rows, members = k_reciprocal_expansion(lists.indices, k1)
        squared = pair_squared_distances(features, rows, members, lists)
        encoding = k_reciprocal_encoding(rows, members, squared, lists.row_max, 60, 60)
        assert encoding.dtype == np.float32
        np.testing.assert_allclose(np.asarray(encoding.sum(axis=1)).ravel(), 1.0, atol=1e-6)
        dense = encoding.toarray()
        for i in (0, 17, 59):
            support = members[rows == i]
            assert set(np.flatnonzero(dense[i]).tolist()) == set(support.tolist())
            full = squared_distances_to(features, np.array([i]))[0]
            weights = np.exp(-full[support] / full.max())
            np.testing.assert_allclose(dense[i, support], weights / weights.sum(), atol=1e-6)
        # query expansion averages rows: still sums to 1, and equals the dense mean
        expanded = local_query_expansion(encoding, lists.indices, 3)
        np.testing.assert_allclose(np.asarray(expanded.sum(axis=1)).ravel(), 1.0, atol=1e-6)
        dense_mean = np.stack([dense[lists.indices[i, :3]].mean(axis=0) for i in range(60)])
        np.testing.assert_allclose(expanded.toarray(), dense_mean, atol=1e-6)
        assert (local_query_expansion(encoding, lists.indices, 1) != encoding).nnz == 0


def test_neighbour_lists_and_pair_distances():
    rng = np.random.default_rng(9)
    features = unit(rng.standard_normal((50, 8)))
    lists = neighbour_lists(features, 7)
    true = np.maximum(2 - 2 * features.astype(np.float64) @ features.T.astype(np.float64), 0)
    np.fill_diagonal(true, 0)
    np.testing.assert_array_equal(lists.indices[:, 0], np.arange(50))
    # 2 - 2 cos from a float32-rounded product (2 U32) rounded once more (<= 4 U32: 2 - 2 cos <= 4)
    assert_order_matches(lists.indices, true, atol=6 * U32, values=lists.distances)
    np.testing.assert_allclose(lists.row_max, true.max(axis=1), atol=1e-5)
    rows, members = rng.integers(0, 50, 200), rng.integers(0, 50, 200)
    members[:10] = rows[:10]
    for given in (None, lists):
        np.testing.assert_allclose(pair_squared_distances(features, rows, members, given),
                                   true[rows, members], atol=1e-5)
    assert (pair_squared_distances(features, rows[:10], members[:10]) == 0).all()


def test_top_k_smallest_breaks_ties_by_index():
    values = np.array([[1.0, 0.0, 1.0, 0.0, 2.0, 1.0],
                       [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
                       [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], np.float32)
    for k, expected in [(1, [[1], [0], [5]]),
                        (3, [[1, 3, 0], [0, 1, 2], [5, 4, 3]]),
                        (4, [[1, 3, 0, 2], [0, 1, 2, 3], [5, 4, 3, 2]]),
                        (6, [[1, 3, 0, 2, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])]:
        picked, indices = top_k_smallest(values, k)
        np.testing.assert_array_equal(indices, expected)
        assert indices.dtype == np.int64
        np.testing.assert_array_equal(picked, np.take_along_axis(values, indices, 1))


@pytest.mark.parametrize("k", [1, 5, 19, 40])
def test_top_k_smallest_equals_stable_argsort(k):
    rng = np.random.default_rng(k)
    values = rng.integers(0, 6, (30, 40)).astype(np.float32)  # many exact ties
    picked, indices = top_k_smallest(values, k)
    expected = np.argsort(values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(picked, np.take_along_axis(values, expected, 1))
    np.testing.assert_array_equal(top_k_smallest(values, k)[1], indices)  # deterministic


def random_stochastic_rows(rng: np.random.Generator, n_rows: int, n_columns: int,
                           density: float) -> sp.csr_matrix:
    matrix = sp.random(n_rows, n_columns, density=density, format="csr", random_state=rng,
                       dtype=np.float32)
    matrix = matrix.tolil()
    matrix[1] = 0  # an empty row
    return matrix.tocsr()


@pytest.mark.parametrize("chunk", [2, 256])
def test_jaccard_overlap_equals_a_dense_loop(chunk):
    rng = np.random.default_rng(chunk)
    queries = random_stochastic_rows(rng, 9, 25, 0.3)
    targets = random_stochastic_rows(rng, 13, 25, 0.2)
    overlap = jaccard_overlap(queries, targets.tocsc(), chunk=chunk)
    dense_q, dense_t = queries.toarray(), targets.toarray()
    expected = np.zeros((9, 13))
    for i in range(9):
        for j in range(13):
            expected[i, j] = sum(min(dense_q[i, col], dense_t[j, col]) for col in range(25))
    assert overlap.shape == (9, 13) and overlap.dtype == np.float32
    np.testing.assert_allclose(overlap, expected, atol=1e-6)


def test_jaccard_distance_formula():
    # rows summing to 1: sum max = 2 - sum min, so d_J = 1 - m / (2 - m)
    a, b = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    m = np.minimum(a, b).sum()
    assert np.maximum(a, b).sum() == pytest.approx(2 - m)
    np.testing.assert_allclose(jaccard_distance(np.array([m, 1.0, 0.0])),
                               [1 - m / np.maximum(a, b).sum(), 0.0, 1.0])


# -- the torch twins (the CUDA batch path), run on the CPU against the numpy/scipy path -----------
def torch_ops():
    import torch

    from engine.core import knn

    return torch, knn


def nodes_with_duplicates(split_features) -> np.ndarray:
    """Real queries + gallery, and exact copies of some gallery rows (exact ties)."""
    queries, gallery = split_features
    return np.vstack([queries, gallery, gallery[:8], gallery[:2]])


@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (7, 1), (1, 2)])
def test_torch_twins_match_numpy(split_features, k1, k2):
    torch, knn = torch_ops()
    features = nodes_with_duplicates(split_features)
    n = features.shape[0]
    depth = max(k1 + 1, k2)
    lists = neighbour_lists(features, depth)
    tensor = torch.from_numpy(features)
    twin = knn.torch_neighbour_lists(tensor, depth)
    np.testing.assert_array_equal(twin.indices.numpy(), lists.indices)
    np.testing.assert_array_equal(twin.similarities.numpy(), lists.similarities)
    np.testing.assert_array_equal(twin.row_max.numpy(), lists.row_max)
    indices = twin.indices
    for width in (1, k1 + 1, half_neighbourhood(k1) + 1):
        np.testing.assert_array_equal(knn.torch_reciprocal_mask(indices, width).numpy(),
                                      reciprocal_mask(lists.indices, width))
    # R* sets: exactly the same pairs, in the same order; also for a subset of rows
    rows, members = k_reciprocal_expansion(lists.indices, k1)
    twin_rows, twin_members = kr_ops.torch_k_reciprocal_expansion(indices, k1)
    np.testing.assert_array_equal(twin_rows.numpy(), rows)
    np.testing.assert_array_equal(twin_members.numpy(), members)
    subset = np.array([n - 1, 3, 0, 25])
    expected = k_reciprocal_expansion(lists.indices, k1, subset)
    got = kr_ops.torch_k_reciprocal_expansion(indices, k1, torch.from_numpy(subset))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    # pair distances, encoding, query expansion, overlap
    twin_rows, twin_members = torch.from_numpy(rows), torch.from_numpy(members)
    squared = pair_squared_distances(features, rows, members, lists)
    twin_squared = kr_ops.torch_pair_squared_distances(tensor, twin_rows, twin_members, twin)
    np.testing.assert_allclose(twin_squared.numpy(), squared, atol=1e-6)
    assert (twin_squared[twin_rows == twin_members] == 0).all()
    np.testing.assert_allclose(kr_ops.torch_pair_squared_distances(tensor, twin_rows,
                                                                twin_members).numpy(),
                               squared, atol=1e-6)  # every pair from the features
    encoding = k_reciprocal_encoding(rows, members, squared, lists.row_max, n, n)
    twin_encoding = kr_ops.torch_k_reciprocal_encoding(twin_rows, twin_members, twin_squared,
                                                    twin.row_max, n, n)
    assert twin_encoding.layout == torch.sparse_csr and twin_encoding.dtype == torch.float32
    np.testing.assert_allclose(twin_encoding.to_dense().numpy(), encoding.toarray(), atol=1e-6)
    # rows sum to 1, but for the empty R* of a triplicate that k1 = 1 leaves out of its own N
    np.testing.assert_allclose(twin_encoding.to_dense().sum(dim=1).numpy(),
                               np.isin(np.arange(n), rows), atol=1e-6)
    expanded = local_query_expansion(encoding, lists.indices, k2)
    twin_expanded = kr_ops.torch_local_query_expansion(twin_encoding, indices, k2)
    np.testing.assert_allclose(twin_expanded.to_dense().numpy(), expanded.toarray(), atol=1e-6)
    assert twin_expanded.values().numel() == expanded.nnz  # the same support
    picked = np.array([5, n - 1, 5, 0])
    np.testing.assert_allclose(
        kr_ops.torch_local_query_expansion(twin_encoding, indices, k2,
                                        torch.from_numpy(picked)).to_dense().numpy(),
        local_query_expansion(encoding, lists.indices, k2, picked).toarray(), atol=1e-6)
    queries, targets = slice(0, 30), slice(20, n)
    overlap = jaccard_overlap(expanded[queries], expanded[targets].tocsc())
    twin_targets = kr_ops.torch_csc(kr_ops.torch_csr_rows(twin_expanded, torch.arange(20, n)))
    twin_queries = kr_ops.torch_csr_rows(twin_expanded, torch.arange(0, 30))
    for max_pairs in (1, 500, 1 << 22):  # one row at a time, a few rows, all at once
        twin_overlap = kr_ops.torch_jaccard_overlap(twin_queries, twin_targets, max_pairs)
        assert twin_overlap.dtype == torch.float32 and twin_overlap.shape == overlap.shape
        np.testing.assert_allclose(twin_overlap.numpy(), overlap, atol=1e-6)


def test_torch_twins_in_small_chunks(split_features, monkeypatch):
    """The row chunking of the twins (a few rows per step) changes nothing."""
    torch, knn = torch_ops()
    features = nodes_with_duplicates(split_features)
    twin = knn.torch_neighbour_lists(torch.from_numpy(features), 21)
    rows, members = kr_ops.torch_k_reciprocal_expansion(twin.indices, 20)
    squared = kr_ops.torch_pair_squared_distances(torch.from_numpy(features), rows, members, twin)
    encoding = kr_ops.torch_k_reciprocal_encoding(rows, members, squared, twin.row_max,
                                               len(features), len(features))
    expanded = kr_ops.torch_local_query_expansion(encoding, twin.indices, 6)
    monkeypatch.setattr(knn, "TORCH_CHUNK_ELEMENTS", 2000)
    small_rows, small_members = kr_ops.torch_k_reciprocal_expansion(twin.indices, 20)
    assert torch.equal(small_rows, rows) and torch.equal(small_members, members)
    assert torch.equal(kr_ops.torch_pair_squared_distances(torch.from_numpy(features), rows,
                                                        members, twin), squared)
    assert torch.equal(knn.torch_reciprocal_mask(twin.indices, 21),
                       torch.from_numpy(reciprocal_mask(twin.indices.numpy(), 21)))
    small = kr_ops.torch_local_query_expansion(encoding, twin.indices, 6)
    assert torch.equal(small.crow_indices(), expanded.crow_indices())
    assert torch.equal(small.col_indices(), expanded.col_indices())
    np.testing.assert_allclose(small.values().numpy(), expanded.values().numpy(), atol=1e-7)


def assert_same_batch(reranker, query_features, k, monkeypatch=None, cells=None):
    """The torch pipeline (on the CPU) gives the numpy path's ranking up to float ties: its
    overlaps sum in float32 where the numpy path sums in float64, each within
    k_reciprocal_atol of the exact distances; exact ties (duplicates) in ascending index."""
    torch, _ = torch_ops()
    from engine.rerank import k_reciprocal

    size = reranker.gallery.size
    leave_one_out = query_features is None
    expected_distances, expected_indices, expected_details = reranker._rerank_batch(
        query_features, size - leave_one_out)  # the full ranking: every item's distance
    if cells is not None:
        monkeypatch.setattr(k_reciprocal, "GPU_CELLS_PER_CHUNK", cells)
    distances, indices, details = reranker._rerank_batch_torch(query_features, k,
                                                               torch.device("cpu"))
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    reference = np.full((len(expected_indices), size), np.inf)  # leave-one-out: self at inf
    np.put_along_axis(reference, expected_indices, expected_distances, axis=1)
    n_nodes = size + (0 if leave_one_out else len(query_features))
    atol = 2 * k_reciprocal_atol(n_nodes, details["k2"], reranker.params.lambda_value)
    assert_order_matches(indices, reference, atol=atol, values=distances, ties_by_index=True)
    assert details == expected_details


@pytest.mark.parametrize(("k1", "k2", "lambda_value"),
                         [(20, 6, 0.3), (10, 1, 0.0), (7, 8, 1.0), (25, 3, 0.5)])
def test_torch_batch_matches_cpu_path(split_features, monkeypatch, k1, k2, lambda_value):
    queries, gallery = split_features
    gallery = np.vstack([gallery, gallery[:6]])  # exact duplicates inside the gallery
    queries = np.vstack([queries, gallery[:3]])  # and queries equal to gallery items
    reranker = create_reranker("k_reciprocal", device="cpu", k1=k1, k2=k2,
                               lambda_value=lambda_value).fit(gallery)
    assert reranker.device.type == "cpu"
    assert_same_batch(reranker, None, 40)
    assert_same_batch(reranker, queries, 40)
    assert_same_batch(reranker, queries, len(gallery))  # the full ranking
    # several query chunks of the (chunk x G) block
    assert_same_batch(reranker, None, len(gallery) - 1, monkeypatch, cells=7 * len(gallery))


def test_torch_batch_matches_cpu_path_on_a_small_graph(split_features):
    queries, gallery = split_features
    gallery = np.vstack([gallery[:10], gallery[:2]])
    reranker = create_reranker("k_reciprocal", device="cpu", k1=20, k2=6).fit(gallery)
    assert_same_batch(reranker, queries[:3], 12)  # 15 nodes: k1 clamped to 14
    assert_same_batch(reranker, None, 11)         # 12 nodes: k1 clamped to 11
    assert "clamped" in reranker._rerank_batch_torch(None, 5, reranker.device)[2]


def test_k_reciprocal_declares_gpu_and_reports_its_device(split_features):
    queries, gallery = split_features
    reranker = create_reranker("k_reciprocal", device="cpu").fit(gallery)
    assert type(reranker).runs_on_gpu
    assert reranker.rerank(queries[:2], 5).details["device"] == "cpu"
    assert reranker.rerank(queries[:1], 5, mode="online").details["device"] == "cpu"


# -- the CPU batch's top k from candidates ------------------------------------------------------
# `_rerank_batch` computes final distances only for each query's candidates and proves the top
# k with a bound (`_sparse_top_k`); rows it cannot prove, and full rankings, take every item's
# distance (`_dense_top_k`). Both must give the full ranking's head exactly.


@pytest.fixture(scope="module")
def clustered_items() -> np.ndarray:
    from engine.bench.measure import synthetic_collection

    features, _ = synthetic_collection(560, 48, spread=1.5, seed=3)
    return features


def count_rows(monkeypatch) -> dict[str, int]:
    """Rows ranked by each of the batch's two ways, counted as the batch runs."""
    from engine.rerank.k_reciprocal import KReciprocalReranker

    counts = {"sparse": 0, "dense": 0}
    sparse, dense = KReciprocalReranker._sparse_top_k, KReciprocalReranker._dense_top_k

    def counted_sparse(self, overlap, rows, *args):
        result = sparse(self, overlap, rows, *args)
        counts["sparse"] += int(result[2].sum())
        return result

    def counted_dense(self, overlap, rows, *args):
        counts["dense"] += len(rows)
        return dense(self, overlap, rows, *args)

    monkeypatch.setattr(KReciprocalReranker, "_sparse_top_k", counted_sparse)
    monkeypatch.setattr(KReciprocalReranker, "_dense_top_k", counted_dense)
    return counts


@pytest.mark.parametrize(("graph_depth", "margin", "lambda_value"),
                         [(None, 16, 0.3), (8, 16, 0.3), (64, 16, 0.3), (41, 0, 0.3),
                          (41, 0, 1.0), (41, 0, 0.0), (64, 16, 0.0)])
@pytest.mark.parametrize("with_queries", [False, True])
def test_top_k_from_candidates_is_the_full_rankings_head(clustered_items, monkeypatch,
                                                          graph_depth, margin, lambda_value,
                                                          with_queries):
    """Leave-one-out and query batches, with the gallery's graph deep enough, too shallow or
    absent, and with no list margin past k: exactly the first k of the full ranking (every
    item's final distance), distances included. Only leave-one-out with a graph deep enough
    takes candidates; with lambda = 1 and no margin the k-th item is the list's last, so no row
    is proven and all take the dense way; lambda = 0 ties every item without overlap at 1."""
    from engine.core.knn import knn_graph
    from engine.core.types import GalleryContext
    from engine.rerank import k_reciprocal

    gallery = clustered_items[:500]
    queries = clustered_items[500:] if with_queries else None
    graph = None if graph_depth is None else knn_graph(gallery, graph_depth)
    reranker = create_reranker("k_reciprocal", device="cpu", lambda_value=lambda_value).fit(
        GalleryContext(gallery, knn=graph))
    full = reranker.rerank(queries, 500 - (queries is None))
    monkeypatch.setattr(k_reciprocal, "RANKING_MARGIN", margin)
    counts = count_rows(monkeypatch)
    k = 40
    head = reranker.rerank(queries, k)
    assert counts["sparse"] + counts["dense"] == len(head.indices)
    deep_enough = graph_depth is not None and graph_depth >= k + 1 + margin
    if with_queries or not deep_enough or (margin, lambda_value) == (0, 1.0):
        assert counts["dense"] == len(head.indices)
    else:
        assert counts["sparse"] > 0
    np.testing.assert_array_equal(head.indices, full.indices[:, :k])
    np.testing.assert_array_equal(head.distances, full.distances[:, :k])


def test_top_k_from_candidates_with_duplicates(split_features, monkeypatch):
    """Exact duplicates tie at distance 0 and at the bound: still the full ranking's head."""
    _, gallery = split_features
    gallery = np.vstack([gallery, gallery[:40], gallery[:10]])
    from engine.core.knn import knn_graph
    from engine.core.types import GalleryContext

    context = GalleryContext(gallery, knn=knn_graph(gallery, 64))
    reranker = create_reranker("k_reciprocal", device="cpu").fit(context)
    full = reranker.rerank(None, len(gallery) - 1)
    counts = count_rows(monkeypatch)
    for k in (1, 5, 25):
        head = reranker.rerank(None, k)
        np.testing.assert_array_equal(head.indices, full.indices[:, :k])
        np.testing.assert_array_equal(head.distances, full.distances[:, :k])
    assert counts["sparse"] > 0


def test_batch_top_100_equals_the_authors_code_on_2000_clustered_items():
    """Leave-one-out top 100 of 2,000 clustered items equals the authors' released dense code
    (engine/bench/k_reciprocal.py) up to float ties, with the gallery's graph as the app's
    cache gives it (64 deep: the batch searches deeper itself)."""
    from engine.bench.k_reciprocal import authors_re_ranking, euclidean_distances
    from engine.bench.measure import synthetic_collection
    from engine.core.knn import knn_graph
    from engine.core.types import GalleryContext

    features, _ = synthetic_collection(2000, 96, seed=1)
    context = GalleryContext(features, knn=knn_graph(features, 64))
    result = create_reranker("k_reciprocal", device="cpu").fit(context).rerank(None, 100)
    final = authors_re_ranking(euclidean_distances(features), len(features))
    np.fill_diagonal(final, np.inf)
    pinned = assert_order_matches(result.indices, final, atol=k_reciprocal_atol(2000, 6, 0.3),
                                  values=result.distances)
    assert pinned > 10_000  # most positions of the clusters


# -- the online patch at scale: exactly the full recomputation, without whole-gallery copies ------
# `_rerank_online` patches only the rows a query touches, ranks the gallery by one float32
# product and takes canonical similarities only where a decision is that close. Each test
# below compares it with a path that recomputes everything: the batch with that single query
# (its own exact search), or the online mode's full re-encoding of every row (`_patchable`
# False), which reads the same fitted lists.


def online_items(n: int = 900, dim: int = 48, spread: float = 1.5) -> np.ndarray:
    """Clustered items with exact duplicates (rows n..n+29 copy rows 0..29, and row 0 once
    more): a kNN graph full of exact ties."""
    from engine.bench.measure import synthetic_collection

    features, _ = synthetic_collection(n, dim, spread=spread, seed=11)
    return np.vstack([features, features[:30], features[:1]])


def online_queries(gallery: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Queries equal to gallery items (a duplicated one, a triplicated one, a single one),
    near-duplicates a few ulps away, and new items near gallery items."""
    from tie_aware import perturb_ulps

    near = gallery[rng.choice(len(gallery), 4, replace=False)]
    near = unit(near + 0.3 * rng.standard_normal(near.shape).astype(np.float32)
                / np.sqrt(gallery.shape[1]))
    return np.vstack([gallery[[5, 0, 700]], perturb_ulps(gallery[[5, 0]], seed=4), near])


def full_recomputation(reranker, query: np.ndarray, k: int):
    """The online result with every row re-encoded from the query's lists (the small-graph
    way), over the same fitted lists as the patch."""
    patchable = reranker._patchable
    reranker._patchable = False
    try:
        return reranker.rerank_online(query, k)
    finally:
        reranker._patchable = patchable


@pytest.mark.parametrize(("k1", "k2", "lambda_value"),
                         [(20, 6, 0.3), (12, 1, 0.0), (8, 9, 1.0), (40, 10, 0.0), (5, 3, 0.7)])
def test_online_patch_equals_the_full_recomputation_and_the_batch(k1, k2, lambda_value):
    gallery = online_items()
    reranker = create_reranker("k_reciprocal", device="cpu", k1=k1, k2=k2,
                               lambda_value=lambda_value).fit(gallery)
    assert reranker._patchable
    pinned = 0
    for query in online_queries(gallery, np.random.default_rng(k1)):
        for k in (1, 17, len(gallery)):
            online = reranker.rerank_online(query, k)
            full = full_recomputation(reranker, query, k)
            np.testing.assert_array_equal(online.indices, full.indices)
            np.testing.assert_allclose(online.distances, full.distances, rtol=0, atol=4 * U32)
            assert 0 < online.details["rows_reencoded"] < len(gallery)  # patched
            assert full.details["rows_reencoded"] == len(gallery) + 1
        batch = reranker.rerank(query[None, :])
        reference = np.empty((1, len(gallery)))
        reference[0, batch.indices[0]] = batch.distances[0]
        pinned += assert_order_matches(online.indices, reference, values=online.distances,
                                       atol=16 * U32, ties_by_index=True)
    assert pinned > 100  # lambda = 0 ties every item without overlap at 1


def test_online_patch_matches_the_reference_with_duplicates_and_ties(split_features):
    """Against the plain-loop oracle: a gallery of real features with exact duplicates and
    queries equal to gallery items, large enough that the query changes only part of it."""
    queries, gallery = split_features
    gallery = np.vstack([gallery, gallery[:12]])  # a query equal to item 0 makes 3 equal nodes
    queries = np.vstack([gallery[[0, 2, 40]], queries[:2]])
    reranker = create_reranker("k_reciprocal", device="cpu", k1=8, k2=3).fit(gallery)
    assert reranker._patchable
    for query in queries:
        result = reranker.rerank_online(query)
        assert result.details["rows_reencoded"] < len(gallery)
        assert_matches_reference(result, reference(query[None, :], gallery, 8, 3, 0.3), 3, 0.3)


def approximate_graph(features: np.ndarray, depth: int, seed: int):
    """An approximate kNN graph as an index gives one: each row misses one of its true
    neighbours (a random entry after the first), so later ones move up; canonical=False."""
    from engine.core.knn import knn_graph
    from engine.core.types import KnnGraph

    exact = knn_graph(features, depth + 1)
    rng = np.random.default_rng(seed)
    dropped = rng.integers(1, depth + 1, len(features))
    keep = np.arange(depth + 1)[None, :] != dropped[:, None]
    indices = exact.indices[keep].reshape(len(features), depth)
    similarities = exact.similarities[keep].reshape(len(features), depth)
    return KnnGraph(indices, similarities, exact.farthest, canonical=False, recall=0.95)


def test_fit_uses_an_approximate_graph_without_searching(monkeypatch):
    """A deep enough approximate graph is used as it is (no search over the gallery), and the
    online patch over it still equals the full recomputation over the same lists."""
    from engine.core.types import GalleryContext
    from engine.rerank import k_reciprocal

    gallery = online_items()
    graph = approximate_graph(gallery, 30, seed=2)

    def no_search(*args, **kwargs):
        raise AssertionError("fit searched the gallery although the context's graph serves")

    monkeypatch.setattr(k_reciprocal, "neighbour_lists", no_search)
    reranker = create_reranker("k_reciprocal", device="cpu").fit(GalleryContext(gallery,
                                                                                 knn=graph))
    np.testing.assert_array_equal(reranker._gallery_lists.indices, graph.indices[:, :21])
    compared = 0
    for query in online_queries(gallery, np.random.default_rng(5)):
        online = reranker.rerank_online(query, 50)
        full = full_recomputation(reranker, query, 50)
        np.testing.assert_array_equal(online.indices, full.indices)
        np.testing.assert_allclose(online.distances, full.distances, rtol=0, atol=4 * U32)
        compared += online.indices.size
    assert compared == 9 * 50


def test_an_exact_graph_flagged_approximate_gives_the_same_results(clustered_items):
    """The graph is used whether canonical or not: the same lists give the same rankings."""
    import dataclasses

    from engine.core.knn import knn_graph
    from engine.core.types import GalleryContext

    gallery = clustered_items[:500]
    exact = knn_graph(gallery, 32)
    rankings = []
    for graph in (exact, dataclasses.replace(exact, canonical=False)):
        reranker = create_reranker("k_reciprocal", device="cpu").fit(
            GalleryContext(gallery, knn=graph))
        rankings.append(reranker.rerank(clustered_items[500:], 40, mode="online"))
    np.testing.assert_array_equal(rankings[0].indices, rankings[1].indices)
    np.testing.assert_array_equal(rankings[0].distances, rankings[1].distances)
    assert rankings[0].indices.size == 60 * 40


def test_a_graph_without_row_maxima_gets_them_computed(clustered_items):
    """An index's graph may come without each row's farthest similarity: fit computes those
    (not the lists), and the rankings are those of the graph that has them."""
    import dataclasses

    from engine.core.knn import knn_graph
    from engine.core.types import GalleryContext

    gallery, queries = clustered_items[:500], clustered_items[500:]
    graph = knn_graph(gallery, 32)
    rankings = [create_reranker("k_reciprocal", device="cpu").fit(
        GalleryContext(gallery, knn=g)).rerank(queries, 40, mode="online")
        for g in (graph, dataclasses.replace(graph, farthest=None, canonical=False))]
    np.testing.assert_array_equal(rankings[0].indices, rankings[1].indices)
    np.testing.assert_array_equal(rankings[0].distances, rankings[1].distances)
    assert rankings[0].indices.size == 60 * 40


def test_fit_keeps_no_float64_copy_of_the_gallery():
    gallery = online_items()
    reranker = create_reranker("k_reciprocal", device="cpu").fit(gallery)
    arrays = [value for value in vars(reranker).values() if isinstance(value, np.ndarray)]
    assert arrays  # the fitted state holds arrays, none of them the gallery in float64
    assert not [a for a in arrays if a.dtype == np.float64 and a.size >= gallery.size]


def test_float32_similarities_decide_only_far_from_a_boundary():
    """`_QuerySimilarities`: the float32 product is within its slack of the canonical one,
    and `exact` gives the canonical similarities (knn.canonical_similarity)."""
    from engine.core.knn import canonical_similarity
    from engine.rerank.k_reciprocal import _QuerySimilarities

    rng = np.random.default_rng(0)
    gallery = unit(rng.standard_normal((3000, 1280)))
    query = unit(gallery[:1] + 0.5 * rng.standard_normal((1, 1280)) / np.sqrt(1280))[0]
    similarities = _QuerySimilarities(gallery, query)
    canonical = canonical_similarity(gallery, query[None])[:, 0]
    assert np.abs(similarities.approximate - canonical).max() < similarities.slack
    picked = rng.choice(3000, 200, replace=False)
    np.testing.assert_array_equal(similarities.exact(picked), canonical[picked])
    np.testing.assert_array_equal(similarities.exact(picked[:5]), canonical[picked[:5]])


# -- batch_refusal ---------------------------------------------------------------------------------
def test_batch_refusal_states_the_memory_it_would_need(monkeypatch):
    from engine.errors import TooLargeError
    from engine.rerank import _scale

    gallery = online_items()
    size = len(gallery)
    reranker = create_reranker("k_reciprocal", device="cpu").fit(gallery)
    small = reranker._batch_bytes(size, 5)
    assert small < reranker._batch_bytes(10 * size, 5)
    assert small < reranker._batch_bytes(size, 5000)
    assert reranker._batch_bytes(size, size) < reranker._batch_bytes(size, size + 1)  # no search
    monkeypatch.setattr(_scale, "memory_budget", lambda: 2 * small)
    assert reranker.batch_refusal(size, 5) is None
    assert reranker.rerank(gallery[:5], 10).indices.shape == (5, 10)
    monkeypatch.setattr(_scale, "memory_budget", lambda: small // 2)
    reason = reranker.batch_refusal(size, 5)
    assert reason is not None and f"{small / 2**30:.1f} GiB" in reason
    with pytest.raises(TooLargeError, match="GiB"):
        reranker.rerank(gallery[:5], 10)
    with pytest.raises(TooLargeError):
        reranker.rerank(None, 10)
    assert reranker.rerank(gallery[:2], 10, mode="online").indices.shape == (2, 10)
    monkeypatch.setattr(_scale, "memory_budget", lambda: None)
    assert reranker.batch_refusal(size, 5) is None  # unknown: let it run


def test_batch_refusal_at_a_million_items_on_this_machine():
    """A million items of d = 1,280 need more than half of any machine this runs on (the
    whole gallery in float64 alone is 10 GB); a few thousand fit."""
    from engine.rerank import _scale

    reranker = create_reranker("k_reciprocal", device="cpu").fit(
        unit(np.random.default_rng(0).standard_normal((50, 1280))))
    budget = _scale.memory_budget()
    assert reranker._batch_bytes(1_000_000, 1) > 16 * 2**30
    if budget is not None and budget < 16 * 2**30:
        assert "GiB" in reranker.batch_refusal(1_000_000, 1)
    assert reranker.batch_refusal(2000, 10) is None
