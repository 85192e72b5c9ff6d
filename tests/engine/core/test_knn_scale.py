"""The kNN graph through an index at scale (`approximate_knn_graph`) and its pieces, against
float64 brute force (a small gallery, so the oracle may be N x N) and the exact `knn_graph`."""

from __future__ import annotations

import numpy as np
import pytest
from tie_aware import U32, assert_order_matches

from engine.core import knn as knn_module
from engine.core.knn import (
    approximate_knn_graph,
    canonical_similarity,
    exact_candidates,
    graph_recall,
    knn_graph,
    merge_top_k,
)
from engine.search.index import SearchIndex

DIM = 24


def clustered(n: int, d: int = DIM, clusters: int = 12, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    points = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return clustered(600)


def truth(features: np.ndarray) -> np.ndarray:
    """float64 similarities of every pair (the oracle; 600 x 600 is small)."""
    x = features.astype(np.float64)
    return x @ x.T


def test_merge_top_k_orders_by_similarity_then_index_and_puts_missing_last():
    similarities = np.array([[0.5, 0.9, 0.5, 0.7, 0.95]], np.float32)
    indices = np.array([[7, 3, 2, -1, 4]])
    values, order = merge_top_k(similarities, indices, 4)
    np.testing.assert_array_equal(order, [[4, 3, 2, 7]])  # -1 last whatever its score
    np.testing.assert_array_equal(values, np.float32([[0.95, 0.9, 0.5, 0.5]]))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_candidates_over_chunks_equal_brute_force(features, dtype, tmp_path):
    store = features.astype(dtype)
    if dtype == np.float16:  # a memory-mapped float16 store, searched in place
        np.save(tmp_path / "store.npy", store)
        store = np.load(tmp_path / "store.npy", mmap_mode="r")
    queries = features[::37]
    values, indices = exact_candidates(store, queries, 15, chunk=97)
    reference = queries.astype(np.float64) @ np.asarray(store, np.float64).T
    # float32 products of (rounded) unit rows: off by <= DIM * U32
    assert_order_matches(indices, reference, atol=(DIM + 2) * U32, values=values,
                         larger_is_better=True)


def test_through_a_flat_index_the_graph_is_the_exact_one(features):
    """A flat index proposes the exact candidates, so the lists, canonical similarities and
    farthest similarities equal `knn_graph`'s (tie-aware on the order), recall 1."""
    exact = knn_graph(features, 20)
    index = SearchIndex(features, kind="flat", device="cpu")
    graph = approximate_knn_graph(features, 20, index, batch=128, recall_rows=100)
    assert graph.canonical is False and graph.recall == 1.0 and graph.depth == 20
    np.testing.assert_array_equal(graph.indices[:, 0], np.arange(len(features)))  # self first
    np.testing.assert_array_equal(graph.similarities[:, 0], 1.0)
    reference = truth(features)
    np.fill_diagonal(reference, -np.inf)
    pinned = assert_order_matches(graph.indices[:, 1:], reference, atol=4 * U32,
                                  larger_is_better=True, min_pinned=1000)
    assert pinned >= 1000
    same = graph.indices == exact.indices
    assert same.mean() > 0.99  # the rest are float ties, accepted above
    np.testing.assert_allclose(graph.similarities, exact.similarities, atol=1e-6)
    # canonical: float64-accumulated similarities of the listed pairs
    rows = np.arange(len(features))[:, None]
    listed = np.minimum(np.einsum("rd,rkd->rk", features.astype(np.float64),
                                  features[graph.indices].astype(np.float64)), 1.0)
    listed[rows[:, 0], 0] = 1.0
    np.testing.assert_allclose(graph.similarities, listed.astype(np.float32), atol=1e-7)


def test_farthest_through_the_negated_search_of_a_flat_index_is_the_exact_farthest(features):
    exact = knn_graph(features, 5)
    graph = approximate_knn_graph(features, 5, SearchIndex(features, kind="flat", device="cpu"))
    np.testing.assert_allclose(graph.farthest, exact.farthest, atol=1e-6)
    np.testing.assert_allclose(graph.farthest, truth(features).min(axis=1), atol=1e-6)


def test_batches_do_not_change_the_graph(features):
    index = SearchIndex(features, kind="ivf", nlist=16, nprobe=4, device="cpu")
    one = approximate_knn_graph(features, 12, index, batch=4096)
    many = approximate_knn_graph(features, 12, index, batch=50)
    np.testing.assert_array_equal(one.indices, many.indices)
    np.testing.assert_array_equal(one.similarities, many.similarities)
    np.testing.assert_array_equal(one.farthest, many.farthest)


def test_a_coarse_ivf_reports_its_recall_below_one_honestly(features, monkeypatch):
    """IVF probing 1 of 40 cells misses neighbours: the graph says so, and its recall is the
    fraction of the exact lists it holds, counted independently here on every row."""
    index = SearchIndex(features, kind="ivf", nlist=40, nprobe=1, device="cpu")
    graph = approximate_knn_graph(features, 20, index, recall_rows=len(features))
    reference = truth(features)
    exact = np.argsort(-reference, axis=1, kind="stable")[:, :20]
    kth = np.take_along_axis(reference, exact[:, -1:], 1)
    held = np.take_along_axis(reference, graph.indices, 1) >= kth - 1e-6
    assert 0.3 < graph.recall < 0.99
    assert graph.recall == pytest.approx(held.sum(axis=1).mean() / 20, abs=1e-9)
    # whatever it missed, what it lists is valid: unique rows, self first, canonical values
    assert (np.diff(np.sort(graph.indices, axis=1), axis=1) > 0).all()
    np.testing.assert_array_equal(graph.indices[:, 0], np.arange(len(features)))
    rows = np.arange(len(features))
    np.testing.assert_array_equal(
        graph.similarities[rows, 5],
        np.minimum(canonical_similarity(features[rows], features)[rows, graph.indices[:, 5]],
                   1.0))
    assert (np.diff(graph.similarities, axis=1) <= 0).all()
    # farthest from a negated approximate search: an upper bound of the true farthest
    assert (graph.farthest >= reference.min(axis=1) - 1e-6).all()


def test_rows_the_index_cannot_fill_are_searched_exactly(features):
    """IVF of tiny cells probing one returns fewer items than the depth: those rows fall back
    to exact search, so no list holds a missing (-1) entry."""
    index = SearchIndex(features, kind="ivf", nlist=200, nprobe=1, device="cpu")
    _, raw = index.neighbours(features[:50], 40)
    assert (raw < 0).any()  # the premise: the index alone cannot fill 40 slots
    graph = approximate_knn_graph(features, 40, index)
    assert (graph.indices >= 0).all()
    exact = knn_graph(features, 40)
    short = np.flatnonzero((index.neighbours(features, 48)[1] < 0).any(axis=1))
    np.testing.assert_allclose(graph.similarities[short], exact.similarities[short], atol=1e-6)


def test_graph_recall_counts_ties_as_found(features):
    """Row 600 duplicates row 0: a list naming 600 where the exact one names 0 found it (a
    tie); a list naming the farthest item did not."""
    duplicated = np.concatenate([features, features[:1]])
    exact = knn_graph(duplicated, 4)
    row = int(np.flatnonzero((exact.indices[:, 1:] == 0).any(axis=1) & (
        np.arange(601) != 600))[0])
    tied = exact.indices.copy()
    tied[row][tied[row] == 0] = 600 if 600 not in tied[row] else 0
    assert 600 in tied[row] and graph_recall(duplicated, tied, np.array([row])) == 1.0
    wrong = exact.indices.copy()
    wrong[row, 3] = np.argmin(truth(duplicated)[row])
    assert graph_recall(duplicated, wrong, np.array([row])) == pytest.approx(3 / 4)


def test_the_gathered_blocks_are_bounded(features, monkeypatch):
    """Work is done in blocks of GATHER_ELEMENTS: a tiny bound gives the same graph."""
    index = SearchIndex(features, kind="flat", device="cpu")
    expected = approximate_knn_graph(features, 10, index)
    monkeypatch.setattr(knn_module, "GATHER_ELEMENTS", 1)
    small = approximate_knn_graph(features, 10, index)
    np.testing.assert_array_equal(small.indices, expected.indices)
    np.testing.assert_array_equal(small.similarities, expected.similarities)
