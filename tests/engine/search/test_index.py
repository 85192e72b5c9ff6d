"""SearchIndex against numpy brute force (tolerant of ties), errors, persistence, ANN recall,
the torch exact backend on the CPU and the backend choice (the GPU itself: test_gpu.py)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from tie_aware import U32, assert_order_matches

import engine.search.index as index_module
from engine.errors import CacheError, EmptyGalleryError, InvalidInputError
from engine.search.index import (
    INDEX_KINDS,
    FaissGpuProbe,
    SearchIndex,
    TorchExactSearch,
    exact_knn,
    faiss_gpu_probe,
)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, n_clusters: int,
              spread: float = 0.3) -> np.ndarray:
    centres = unit_rows(rng, n_clusters, d)
    points = centres[rng.integers(0, n_clusters, n)] + spread / np.sqrt(d) * (
        rng.standard_normal((n, d)).astype(np.float32))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def search_atol(dim: int) -> float:
    """Largest error of a float32 distance 1 - <q, x> of unit rows: the dot product sums dim
    products (sum of |terms| <= 1), dim U32, and 1 - s rounds once more (<= 2 U32)."""
    return (dim + 2) * U32


def assert_matches_brute_force(distances, indices, gallery, queries, k, atol=None,
                               min_pinned=1):
    """The returned items are the k nearest by float64 brute force, best first, up to float
    ties (`tie_aware`), and their distances the true ones (within `search_atol` by default).
    min_pinned: positions the truth must pin to one item (0 where every item ties)."""
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert distances.shape == indices.shape == (queries.shape[0], k)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    atol = search_atol(gallery.shape[1]) if atol is None else atol
    assert_order_matches(indices, true, atol=atol, values=distances, min_pinned=min_pinned)
    assert (np.diff(distances, axis=1) >= -atol).all()


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


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_exact_search_matches_brute_force_on_real_features(oracle_split_features, backend):
    """Real lite0 features (d = 1280), and the same moved by a few ulps (other near-ties)."""
    queries, gallery = oracle_split_features
    index = SearchIndex(gallery, device="cpu", backend=backend)
    assert_matches_brute_force(*index.search(queries, 50), gallery, queries, 50)


def test_flat_with_exact_ties(rng):
    base = unit_rows(rng, 40, 8)
    gallery = np.vstack([base, base[:10]])  # items 40..49 duplicate items 0..9
    queries = base[:10]
    distances, indices = SearchIndex(gallery, device="cpu").search(queries, 5)
    assert_matches_brute_force(distances, indices, gallery, queries, 5)
    # each query's first two hits are itself and its duplicate, in either order
    for q in range(10):
        assert set(indices[q, :2].tolist()) == {q, q + 40}
        np.testing.assert_allclose(distances[q, :2], 0.0, atol=search_atol(8))


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
    loaded = SearchIndex.load(path, device="cpu", features=gallery)
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


def test_ivfpq_builds_searches_saves_and_loads(rng, tmp_path):
    """IVF-PQ: d / 8 bytes of codes per item; a search rescores k x refine code candidates from
    the features, so its distances are the true ones and its top 10 nearly the exact one."""
    data = clustered(rng, 4100, 32, 40)
    gallery, queries = data[:4000], data[4000:]
    index = SearchIndex(gallery, kind="ivfpq", device="cpu")
    assert index.kind == "ivfpq" and index._cpu_index.pq.M == 4  # 32 / 8 dimensions each
    assert index._cpu_index.pq.nbits == 6  # 4000 items train 64 centroids (39 points each)
    distances, found = index.search(queries, 10)
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    np.testing.assert_allclose(distances, np.take_along_axis(true, found, 1), atol=1e-6)
    _, exact = SearchIndex(gallery, device="cpu").search(queries, 10)
    assert recall(found, exact) >= 0.9
    path = tmp_path / "ivfpq.faiss"
    index.save(path)
    loaded = SearchIndex.load(path, device="cpu", features=gallery, recall=index.recall)
    assert (loaded.kind, loaded.size, loaded.recall) == ("ivfpq", 4000, index.recall)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], found)
    raw = SearchIndex.load(path, device="cpu")  # without features: code scores, no rescoring
    assert raw.search(queries, 10)[1].shape == (100, 10)
    with pytest.raises(CacheError, match="holds 4000 vectors"):
        SearchIndex.load(path, device="cpu", features=gallery[:100])


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_recall_is_measured_at_build_against_exact_search(rng, kind):
    """`recall` holds recall@10 and @100 of `search` on 200 seeded gallery rows, which an
    independent count over the same rows reproduces."""
    gallery = clustered(rng, 3000, 32, 30)
    index = SearchIndex(gallery, kind=kind, nlist=60, nprobe=2, device="cpu")
    assert set(index.recall) == {"recall@10", "recall@100", "queries"}
    assert index.recall["queries"] == 200
    rows = np.sort(np.random.default_rng(0).choice(3000, 200, replace=False))
    true = gallery[rows].astype(np.float64) @ gallery.astype(np.float64).T
    for k in (10, 100):
        _, found = index._rescored(gallery[rows], k)  # search's answer, -1 where it has none
        kth = np.sort(true, axis=1)[:, -k][:, None]
        held = ((np.take_along_axis(true, found, 1) >= kth - 1e-5)
                & (found >= 0)).sum(axis=1) / k
        assert index.recall[f"recall@{k}"] == pytest.approx(held.mean(), abs=0.01)
    assert 0.0 < index.recall["recall@100"] <= 1.0
    if kind != "hnsw":  # 2 of 60 cells: deep lists miss items, and it says so
        assert index.recall["recall@100"] < 0.99
    flat = SearchIndex(gallery, device="cpu")
    assert flat.recall == {"recall@10": 1.0, "recall@100": 1.0, "queries": 0}


def test_the_flat_index_searches_the_features_in_place(rng, tmp_path):
    """No second copy of the gallery: the faiss index is empty and the features, float16 and
    memory-mapped included, are searched where they are; its file holds no vectors."""
    gallery = unit_rows(rng, 500, 16)
    np.save(tmp_path / "store.npy", gallery.astype(np.float16))
    store = np.load(tmp_path / "store.npy", mmap_mode="r")
    index = SearchIndex(store, device="cpu")
    assert index._cpu_index.ntotal == 0 and index._features is store
    queries = unit_rows(rng, 7, 16)
    distances, indices = index.search(queries, 9)
    assert_matches_brute_force(distances, indices, np.asarray(store, np.float32), queries, 9)
    index.save(tmp_path / "flat.faiss")
    assert (tmp_path / "flat.faiss").stat().st_size < 200
    with pytest.raises(InvalidInputError, match="features="):
        SearchIndex.load(tmp_path / "flat.faiss", device="cpu")
    loaded = SearchIndex.load(tmp_path / "flat.faiss", device="cpu", features=store)
    np.testing.assert_array_equal(loaded.search(queries, 9)[1], indices)


def test_a_flat_index_file_with_vectors_still_loads(rng, tmp_path):
    """An index file written before the in-place search (vectors inside) loads alone, and with
    the features drops its vectors."""
    import faiss

    gallery, queries = unit_rows(rng, 300, 16), unit_rows(rng, 4, 16)
    old = faiss.IndexFlatIP(16)
    old.add(gallery)
    faiss.write_index(old, str(tmp_path / "old.faiss"))
    alone = SearchIndex.load(tmp_path / "old.faiss", device="cpu")
    with_features = SearchIndex.load(tmp_path / "old.faiss", device="cpu", features=gallery)
    assert with_features._cpu_index.ntotal == 0 and alone.size == 300
    expected = SearchIndex(gallery, device="cpu").search(queries, 5)[1]
    np.testing.assert_array_equal(alone.search(queries, 5)[1], expected)
    np.testing.assert_array_equal(with_features.search(queries, 5)[1], expected)


def test_the_automatic_kind_by_size_and_memory(rng, monkeypatch):
    from engine.search.index import EXACT_SEARCH_MAX, choose_index_kind

    assert choose_index_kind(EXACT_SEARCH_MAX, 768, 2**40)[0] == "flat"
    assert choose_index_kind(EXACT_SEARCH_MAX + 1, 768, 2**40)[0] == "ivf"
    kind, reason = choose_index_kind(1_000_000, 768, 8 * 2**30)  # a 2.9 GiB copy of 8 GiB
    assert kind == "ivfpq" and "2.9 GiB" in reason
    monkeypatch.setattr(index_module, "EXACT_SEARCH_MAX", 100)
    monkeypatch.setattr(index_module.choose_index_kind, "__defaults__", (None, 100))
    index = SearchIndex(clustered(rng, 400, 16, 8), kind="auto", device="cpu")
    assert index.kind == "ivf" and "400 items > 100" in index.kind_reason
    assert index.recall["queries"] == 200


# -- kNN graph -----------------------------------------------------------------------------------
def test_knn_graph_has_self_first(rng):
    from engine.core.knn import knn_graph

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
    np.fill_diagonal(true, 1.0)  # the item itself at 1 (its float32 row is unit only to ~U32)
    # canonical similarities: float64 products rounded once to float32 (U32)
    assert_order_matches(graph.indices, true, atol=U32, values=graph.similarities,
                         larger_is_better=True)


# -- the torch exact backend (on the CPU here; on CUDA in test_gpu.py) ---------------------------
def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact top-k list that `found` recovers."""
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1]
                          for f, e in zip(found, exact, strict=True)]))


@pytest.mark.parametrize(("query_chunk", "gallery_chunk"),
                         [(1024, 65536), (7, 13), (1, 300), (64, 1)])
def test_torch_exact_matches_faiss_flat(rng, query_chunk, gallery_chunk):
    gallery, queries = unit_rows(rng, 300, 24), unit_rows(rng, 20, 24)
    expected_distances, expected_indices = SearchIndex(gallery, device="cpu").search(queries, 10)
    searcher = TorchExactSearch(gallery, "cpu", "fp32", query_chunk, gallery_chunk)
    similarities, indices = searcher.search(queries, 10)
    # each against brute force, up to float ties: their float32 sums differ (faiss's BLAS)
    assert_matches_brute_force(1.0 - similarities, indices, gallery, queries, 10)
    assert_matches_brute_force(expected_distances, expected_indices, gallery, queries, 10)
    np.testing.assert_allclose(1.0 - similarities, expected_distances, atol=2 * search_atol(24))


@pytest.mark.parametrize("gallery_chunk", [65536, 16, 5, 1])
@pytest.mark.parametrize("k", [1, 4, 17, 48])
def test_torch_exact_ties_go_to_the_smaller_index(gallery_chunk, k):
    """Rows of (+-0.5)^4, each three times: products are exact multiples of 0.25, so every
    row has exact ties, and the answer is fixed: similarity descending, then index ascending,
    whatever the gallery chunks."""
    signs = np.array(np.meshgrid(*[[-0.5, 0.5]] * 4)).reshape(4, -1).T.astype(np.float32)
    gallery = np.vstack([signs, signs[::-1], signs])  # 48 rows
    queries = signs[[0, 5, 10, 15]]
    similarities, indices = TorchExactSearch(gallery, "cpu", gallery_chunk=gallery_chunk
                                             ).search(queries, k)
    true = queries @ gallery.T
    expected = np.lexsort((np.broadcast_to(np.arange(48), true.shape), -true), axis=1)[:, :k]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(similarities, np.take_along_axis(true, expected, 1))
    distances, faiss_indices = SearchIndex(gallery, device="cpu").search(queries, k)
    # faiss: any order among ties (here every item ties with its copies: nothing is pinned)
    assert_matches_brute_force(distances, faiss_indices, gallery, queries, k, min_pinned=0)


@pytest.mark.parametrize("gallery_chunk", [65536, 7])
def test_torch_exact_k_equals_gallery_size(rng, gallery_chunk):
    gallery = unit_rows(rng, 30, 16)
    index = SearchIndex(gallery, backend="torch", device="cpu")
    index._index = TorchExactSearch(gallery, "cpu", gallery_chunk=gallery_chunk)
    distances, indices = index.search(gallery[:4], 30)
    assert_matches_brute_force(distances, indices, gallery, gallery[:4], 30)
    assert [sorted(row.tolist()) for row in indices] == [list(range(30))] * 4
    np.testing.assert_array_equal(indices[:, 0], np.arange(4))


def test_torch_exact_errors(rng):
    gallery = unit_rows(rng, 10, 8)
    index = SearchIndex(gallery, backend="torch", device="cpu")
    with pytest.raises(InvalidInputError, match="larger than the gallery"):
        index.search(unit_rows(rng, 2, 8), 11)
    with pytest.raises(InvalidInputError, match=r"in \[1, 10\]"):
        index._index.search(unit_rows(rng, 2, 8), 11)
    queries = unit_rows(rng, 3, 8)
    queries[2, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        index.search(queries, 2)
    with pytest.raises(InvalidInputError, match="NaN"):
        index._index.search(queries, 2)
    with pytest.raises(InvalidInputError, match="gallery_chunk"):
        TorchExactSearch(gallery, "cpu", gallery_chunk=0)
    with pytest.raises(InvalidInputError, match="precision"):
        TorchExactSearch(gallery, "cpu", precision="int8")


@pytest.mark.parametrize(("precision", "bound", "minimum"),
                         [("bf16", 2.0**-8, 0.98), ("fp16", 2.0**-10, 0.99)])
def test_reduced_precision_recall_at_10(precision, bound, minimum):
    """Rounding both inputs to bf16 (8-bit mantissa: relative error <= 2**-9 per element)
    moves a product of unit rows by at most 2**-8 (Cauchy-Schwarz), fp16 by at most 2**-10;
    only neighbours that close to the 10th can swap.

    On the benchmark's clustered features (d = 1280, 10th neighbour at cosine 0.74) bf16
    recovers 0.997 of the exact top 10 (1.0 for seeds 1, 2), fp16 1.0; on real lite0 features
    of the demo gallery bf16 gives 0.998; on much more crowded neighbourhoods (100 items per
    cluster at cosine 0.95) 0.975. Products *rounded* to bf16 (the mistake of a plain bf16
    matmul) give 0.937 here, below the 0.98 asked for bf16; fp16 must reach 0.99.
    """
    from engine.bench.measure import synthetic_collection

    data, _ = synthetic_collection(4100, 1280, spread=0.6, seed=0)
    gallery, queries = data[:4000], data[4000:]
    exact_distances, exact = SearchIndex(gallery, device="cpu").search(queries, 10)
    index = SearchIndex(gallery, device="cpu", precision=precision)
    assert index.backend == f"torch-cpu exact ({precision})"
    distances, indices = index.search(queries, 10)
    assert recall(indices, exact) >= minimum
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert np.abs(np.take_along_axis(true, indices, 1) - distances).max() <= bound + 1e-5
    assert np.abs(distances - exact_distances).max() <= bound + 1e-5


# -- the backend choice --------------------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    """torch sees no CUDA, whatever the machine (the choice must not depend on it here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fresh_probe():
    """Forget the process-wide faiss GPU probe result before and after the test."""
    faiss_gpu_probe.cache_clear()
    yield
    faiss_gpu_probe.cache_clear()


def test_backend_names(rng, no_cuda, fresh_probe):
    gallery = clustered(rng, 400, 16, 8)
    assert SearchIndex(gallery, device="cpu").backend == "faiss-cpu flat"
    assert SearchIndex(gallery, kind="ivf", device="cpu").backend == "faiss-cpu ivf"
    assert SearchIndex(gallery, kind="hnsw").backend == "faiss-cpu hnsw"
    auto = SearchIndex(gallery)
    assert (auto.backend, auto.on_gpu) == ("faiss-cpu flat", False)
    assert auto.backend_reason == faiss_gpu_probe("flat").reason
    forced = SearchIndex(gallery, backend="torch", device="cpu")
    assert (forced.backend, forced.on_gpu, forced.precision) == (
        "torch-cpu exact (fp32)", False, "fp32")
    assert SearchIndex(gallery, precision="bf16").backend == "torch-cpu exact (bf16)"
    assert SearchIndex(gallery, device="cpu", precision="fp16").backend == (
        "torch-cpu exact (fp16)")


def test_device_cpu_never_probes_the_gpu(rng, monkeypatch, fresh_probe):
    monkeypatch.setattr(index_module, "_faiss_gpu_build", lambda: True)
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 1)

    def must_not_run(*args):
        raise AssertionError("device='cpu' must not probe the GPU")

    monkeypatch.setattr(index_module, "_probe_in_child", must_not_run)
    monkeypatch.setattr(index_module, "_faiss_to_gpu", must_not_run)
    index = SearchIndex(unit_rows(rng, 50, 8), device="cpu")
    assert (index.backend, index.on_gpu, index.backend_reason) == (
        "faiss-cpu flat", False, "device='cpu'")


def test_cuda_without_cuda_is_an_error(rng, no_cuda):
    with pytest.raises(InvalidInputError, match="no CUDA device"):
        SearchIndex(unit_rows(rng, 10, 8), device="cuda")


@pytest.mark.parametrize(("options", "message"), [
    ({"kind": "ivf", "backend": "torch"}, "exact search only"),
    ({"kind": "hnsw", "precision": "bf16"}, "exact search only"),
    ({"backend": "faiss", "precision": "fp16"}, "search in fp32"),
    ({"precision": "int8"}, "precision must be one of"),
    ({"backend": "annoy"}, "backend must be one of"),
])
def test_backend_option_errors(rng, options, message):
    with pytest.raises(InvalidInputError, match=message):
        SearchIndex(unit_rows(rng, 10, 8), device="cpu", **options)


def faiss_cpu_clone(index, gpus):
    """Stands in for the GPU copy in the selection tests: a faithful CPU clone."""
    return index_module.faiss_module().clone_index(index)


def test_faiss_gpu_chosen_when_the_probe_passes(rng, monkeypatch, no_cuda, fresh_probe):
    """The selection logic alone (a CPU clone stands in for the GPU copy; test_gpu.py runs the
    real one)."""
    monkeypatch.setattr(index_module, "_faiss_gpu_build", lambda: True)
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(index_module, "_probe_in_child", lambda kind, gpus: None)
    monkeypatch.setattr(index_module, "_faiss_to_gpu", faiss_cpu_clone)
    gallery, queries = unit_rows(rng, 200, 16), unit_rows(rng, 5, 16)
    index = SearchIndex(gallery)
    assert (index.backend, index.on_gpu) == ("faiss-gpu flat (1 GPU)", True)
    assert index.backend_reason == "the probe search on 1 GPU(s) matched the CPU"
    assert_matches_brute_force(*index.search(queries, 7), gallery, queries, 7)
    # deeper than faiss GPU selects: the CPU copy answers
    monkeypatch.setattr(index_module, "FAISS_GPU_MAX_K", 6)
    shallow = index._index.search
    monkeypatch.setattr(index._index, "search", lambda x, k: (
        shallow(x, k) if k <= 6 else pytest.fail("k > FAISS_GPU_MAX_K reached the GPU copy")))
    assert_matches_brute_force(*index.search(queries, 7), gallery, queries, 7)
    assert_matches_brute_force(*index.search(queries, 6), gallery, queries, 6)
    # reduced precision and approximate HNSW do not go to faiss-gpu
    assert SearchIndex(gallery, precision="bf16").backend == "torch-cpu exact (bf16)"
    assert SearchIndex(gallery, kind="hnsw").backend == "faiss-cpu hnsw"


def test_probe_failure_falls_back_with_the_reason(rng, monkeypatch, caplog, no_cuda,
                                                   fresh_probe):
    """The child process runs the real faiss (no GPU here): it is taken as passed, so the
    in-process conversion is what fails, as a wheel without sm_90 kernels does."""
    monkeypatch.setattr(index_module, "_faiss_gpu_build", lambda: True)
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(index_module, "_probe_in_child", lambda kind, gpus: None)

    def no_kernels(index, gpus):
        raise RuntimeError("CUDA error 209 no kernel image is available for execution")

    monkeypatch.setattr(index_module, "_faiss_to_gpu", no_kernels)
    gallery, queries = unit_rows(rng, 100, 8), unit_rows(rng, 4, 8)
    with caplog.at_level(logging.INFO, logger="engine.search.index"):
        index = SearchIndex(gallery)
    assert (index.backend, index.on_gpu) == ("faiss-cpu flat", False)
    assert "RuntimeError: CUDA error 209 no kernel image" in index.backend_reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not usable" in m and "no kernel image" in m for m in warnings), warnings
    assert any("search backend: faiss-cpu flat" in r.getMessage() for r in caplog.records)
    assert_matches_brute_force(*index.search(queries, 5), gallery, queries, 5)


def test_probe_mismatch_falls_back(rng, monkeypatch, no_cuda, fresh_probe):
    monkeypatch.setattr(index_module, "_faiss_gpu_build", lambda: True)
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(index_module, "_probe_in_child", lambda kind, gpus: None)

    def wrong_rows(index, gpus):  # answers with every item's neighbour in storage order
        faiss = index_module.faiss_module()
        shifted = faiss.IndexFlatIP(index.d)
        shifted.add(np.roll(index.reconstruct_n(0, index.ntotal), 1, axis=0))
        return shifted

    monkeypatch.setattr(index_module, "_faiss_to_gpu", wrong_rows)
    index = SearchIndex(unit_rows(rng, 100, 8))
    assert index.backend == "faiss-cpu flat"
    assert "disagreed with the CPU" in index.backend_reason


def test_no_gpu_seen_by_a_gpu_build_falls_back(rng, monkeypatch, no_cuda, fresh_probe):
    monkeypatch.setattr(index_module, "_faiss_gpu_build", lambda: True)
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 0)
    monkeypatch.setattr(index_module, "_probe_in_child", lambda kind, gpus: None)
    index = SearchIndex(unit_rows(rng, 100, 8))
    assert (index.backend, index.backend_reason) == ("faiss-cpu flat", "faiss reports no GPU")


def test_gpu_copy_failure_after_the_probe_falls_back(rng, monkeypatch, no_cuda, fresh_probe):
    monkeypatch.setattr(index_module, "faiss_gpu_probe",
                        lambda kind, gpus: FaissGpuProbe(True, "passed"))

    def out_of_memory(index, gpus):
        raise MemoryError("cudaMalloc failed")

    monkeypatch.setattr(index_module, "_faiss_to_gpu", out_of_memory)
    index = SearchIndex(unit_rows(rng, 100, 8))
    assert index.backend == "faiss-cpu flat"
    assert "moving the index to the GPU failed (MemoryError: cudaMalloc failed)" in (
        index.backend_reason)


def test_probe_child_crash_is_a_reason_not_a_crash(monkeypatch):
    """faiss aborts the process on a CUDA error: the probe's child may die, this process not."""
    script = ("import os, sys; sys.stderr.write('Faiss assertion err__ == cudaSuccess failed: "
              "CUDA error 209\\n'); sys.stderr.flush(); os.abort()")
    monkeypatch.setattr(index_module, "_probe_command",
                        lambda kind, gpus: [sys.executable, "-c", script])
    reason = index_module._probe_in_child("flat", None)
    assert reason.startswith("the faiss GPU probe process crashed (signal 6)")
    assert reason.endswith("CUDA error 209")
    monkeypatch.setattr(index_module, "_probe_command",
                        lambda kind, gpus: [sys.executable, "-c", "print('hello')"])
    assert "gave no answer" in index_module._probe_in_child("flat", None)


@pytest.mark.skipif(index_module._faiss_gpu_build(), reason="faiss is a GPU build here")
def test_probe_child_runs_the_real_probe():
    """The real child process (python -m engine.search.index --probe-faiss-gpu) on a machine where
    faiss has no GPU."""
    assert index_module._probe_in_child("flat", None) == (
        "faiss reports no GPU in a fresh process")


def test_probe_search_itself_on_the_cpu(monkeypatch):
    """`_probe_search` compares a copy against the CPU: an exact copy passes, for both kinds."""
    monkeypatch.setattr(index_module, "_faiss_to_gpu", faiss_cpu_clone)
    assert index_module._probe_search("flat", None) is None
    assert index_module._probe_search("ivf", None) is None


def test_torch_backend_save_load(rng, tmp_path):
    gallery, queries = unit_rows(rng, 120, 16), unit_rows(rng, 6, 16)
    index = SearchIndex(gallery, backend="torch", device="cpu")
    path = tmp_path / "index.faiss"
    index.save(path)
    loaded = SearchIndex.load(path, device="cpu", backend="torch", features=gallery)
    assert (loaded.backend, loaded.kind, loaded.size) == ("torch-cpu exact (fp32)", "flat", 120)
    np.testing.assert_array_equal(index.search(queries, 9)[1], loaded.search(queries, 9)[1])
    np.testing.assert_array_equal(index.search(queries, 9)[0], loaded.search(queries, 9)[0])
    assert SearchIndex.load(path, device="cpu", features=gallery).backend == "faiss-cpu flat"
    SearchIndex(gallery, kind="hnsw", device="cpu").save(tmp_path / "hnsw.faiss")
    with pytest.raises(InvalidInputError, match="exact search only"):
        SearchIndex.load(tmp_path / "hnsw.faiss", device="cpu", backend="torch")
