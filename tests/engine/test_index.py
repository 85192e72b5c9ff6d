"""SearchIndex against numpy brute force (tolerant of ties), errors, persistence, ANN recall."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import CacheError, EmptyGalleryError, InvalidInputError
from engine.index import INDEX_KINDS, SearchIndex, exact_knn


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, n_clusters: int,
              spread: float = 0.3) -> np.ndarray:
    centres = unit_rows(rng, n_clusters, d)
    points = centres[rng.integers(0, n_clusters, n)] + spread / np.sqrt(d) * (
        rng.standard_normal((n, d)).astype(np.float32))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def assert_matches_brute_force(distances, indices, gallery, queries, k, atol=1e-5):
    """Sorted true distances equal the returned ones; each index's true distance matches."""
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert distances.shape == indices.shape == (queries.shape[0], k)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    np.testing.assert_allclose(distances, np.sort(true, axis=1)[:, :k], atol=atol)
    np.testing.assert_allclose(np.take_along_axis(true, indices, 1), distances, atol=atol)
    assert (np.diff(distances, axis=1) >= -atol).all()
    for row in indices:
        assert len(set(row.tolist())) == k


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_flat_matches_brute_force(rng, k):
    gallery, queries = unit_rows(rng, 300, 24), unit_rows(rng, 20, 24)
    index = SearchIndex(gallery, device="cpu")
    assert (index.kind, index.size, index.dim, index.on_gpu) == ("flat", 300, 24, False)
    distances, indices = index.search(queries, k)
    assert_matches_brute_force(distances, indices, gallery, queries, k)


def test_flat_with_exact_ties(rng):
    base = unit_rows(rng, 40, 8)
    gallery = np.vstack([base, base[:10]])  # items 40..49 duplicate items 0..9
    queries = base[:10]
    distances, indices = SearchIndex(gallery, device="cpu").search(queries, 5)
    assert_matches_brute_force(distances, indices, gallery, queries, 5)
    # each query's first two hits are itself and its duplicate, in either order
    for q in range(10):
        assert set(indices[q, :2].tolist()) == {q, q + 40}
        np.testing.assert_allclose(distances[q, :2], 0.0, atol=1e-5)


def test_full_gallery_k_and_single_vector_query(rng):
    gallery = unit_rows(rng, 30, 16)
    index = SearchIndex(gallery, device="cpu")
    _, indices = index.search(gallery[3], 30)  # a (d,) query is one row
    assert indices.shape == (1, 30)
    assert sorted(indices[0].tolist()) == list(range(30))
    assert indices[0, 0] == 3


def test_exact_knn_matches_brute_force(rng):
    features, queries = unit_rows(rng, 120, 12), unit_rows(rng, 9, 12)
    similarities, indices = exact_knn(features, 6, queries)
    assert_matches_brute_force(1.0 - similarities, indices, features, queries, 6)
    self_similarities, self_indices = exact_knn(features, 1)
    np.testing.assert_array_equal(self_indices[:, 0], np.arange(120))
    np.testing.assert_allclose(self_similarities[:, 0], 1.0, atol=1e-5)


# -- errors --------------------------------------------------------------------------------------
def test_k_larger_than_gallery(rng):
    index = SearchIndex(unit_rows(rng, 10, 8), device="cpu")
    with pytest.raises(InvalidInputError, match="larger than the gallery"):
        index.search(unit_rows(rng, 2, 8), 11)


@pytest.mark.parametrize("k", [0, -3, True, 2.0, "5"])
def test_k_must_be_a_positive_integer(rng, k):
    index = SearchIndex(unit_rows(rng, 10, 8), device="cpu")
    with pytest.raises(InvalidInputError, match="positive integer"):
        index.search(unit_rows(rng, 2, 8), k)


@pytest.mark.parametrize("empty", [None, np.zeros((0, 8), np.float32), []])
def test_empty_gallery(empty):
    with pytest.raises(EmptyGalleryError):
        SearchIndex(empty, device="cpu")


def test_nan_queries(rng):
    index = SearchIndex(unit_rows(rng, 10, 8), device="cpu")
    queries = unit_rows(rng, 3, 8)
    queries[1, 2] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        index.search(queries, 2)
    queries[1, 2] = np.inf
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        index.search(queries, 2)


def test_nan_gallery(rng):
    gallery = unit_rows(rng, 10, 8)
    gallery[4] = np.nan
    with pytest.raises(InvalidInputError, match=r"rows \[4\]"):
        SearchIndex(gallery, device="cpu")


def test_wrong_query_dimension(rng):
    index = SearchIndex(unit_rows(rng, 10, 8), device="cpu")
    with pytest.raises(InvalidInputError, match="dimensions"):
        index.search(unit_rows(rng, 2, 9), 2)
    with pytest.raises(InvalidInputError, match="2-D"):
        index.search(np.zeros((2, 2, 8), np.float32), 2)


def test_unknown_kind(rng):
    with pytest.raises(InvalidInputError, match="index kind"):
        SearchIndex(unit_rows(rng, 10, 8), kind="lsh", device="cpu")


# -- persistence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_save_load_round_trip(rng, tmp_path, kind):
    gallery, queries = clustered(rng, 400, 16, 8), unit_rows(rng, 15, 16)
    index = SearchIndex(gallery, kind=kind, device="cpu")
    path = tmp_path / "sub" / "index.faiss"
    index.save(path)
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.faiss"]  # no temp file left
    loaded = SearchIndex.load(path, device="cpu")
    assert (loaded.kind, loaded.size, loaded.dim) == (kind, 400, 16)
    before, after = index.search(queries, 10), loaded.search(queries, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])


def test_load_corrupt_index(tmp_path):
    path = tmp_path / "index.faiss"
    path.write_bytes(b"not a faiss index")
    with pytest.raises(CacheError, match="unreadable"):
        SearchIndex.load(path, device="cpu")


# -- approximate indexes -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(kind):
    rng = np.random.default_rng(7)
    data = clustered(rng, 4100, 32, 40)
    gallery, queries = data[:4000], data[4000:]
    _, exact = SearchIndex(gallery, device="cpu").search(queries, 10)
    _, approximate = SearchIndex(gallery, kind=kind, device="cpu").search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate, exact,
                                                                 strict=True)])
    assert recall >= 0.9, recall


def test_ivf_with_more_cells_than_items(rng):
    gallery = unit_rows(rng, 20, 8)
    index = SearchIndex(gallery, kind="ivf", nlist=500, device="cpu")  # clamped to 20 cells
    _, indices = index.search(gallery[:3], 1)
    np.testing.assert_array_equal(indices[:, 0], [0, 1, 2])


# -- kNN graph -----------------------------------------------------------------------------------
def test_knn_graph_has_self_first(rng):
    from engine.rerank.ops import knn_graph

    gallery = unit_rows(rng, 200, 16)
    graph = knn_graph(gallery, 12)
    assert graph.canonical
    np.testing.assert_allclose(graph.farthest, (gallery @ gallery.T).min(axis=1), atol=1e-5)
    assert graph.depth == 12
    assert graph.indices.shape == graph.similarities.shape == (200, 12)
    assert graph.indices.dtype == np.int64 and graph.similarities.dtype == np.float32
    np.testing.assert_array_equal(graph.indices[:, 0], np.arange(200))
    np.testing.assert_allclose(graph.similarities[:, 0], 1.0, atol=1e-5)
    assert (np.diff(graph.similarities, axis=1) <= 1e-6).all()
    true = gallery.astype(np.float64) @ gallery.T.astype(np.float64)
    np.testing.assert_allclose(np.take_along_axis(true, graph.indices, 1), graph.similarities,
                               atol=1e-5)
