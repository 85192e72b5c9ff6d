"""CUDA paths, checked against the CPU. Skipped (never passed) on machines without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.gallery import DEMO_GALLERY
from engine.rerank import create_reranker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gnn_cuda_matches_cpu(split_features):
    queries, gallery = split_features
    on_cpu = create_reranker("gnn", device="cpu").fit(gallery).rerank(queries, 20)
    on_gpu = create_reranker("gnn", device="cuda").fit(gallery).rerank(queries, 20)
    np.testing.assert_allclose(on_gpu.distances, on_cpu.distances, atol=1e-4)
    assert on_gpu.details["device"].startswith("cuda")


def test_gnn_cuda_online_matches_batch(split_features):
    queries, gallery = split_features
    reranker = create_reranker("gnn", device="cuda").fit(gallery)
    online = reranker.rerank(queries[:3], 10, mode="online")
    batch = np.stack([reranker.rerank(q[None, :], 10).distances[0] for q in queries[:3]])
    np.testing.assert_allclose(online.distances, batch, atol=1e-5)


def test_extractor_cuda_matches_cpu():
    from engine.backbone import FeatureExtractor

    paths = [DEMO_GALLERY / "images" / f"image_{n:04d}.jpg" for n in range(1, 1360, 170)]
    cpu = FeatureExtractor(device="cpu").embed(paths)
    gpu = FeatureExtractor(device="cuda").embed(paths)  # bf16 autocast: close, not equal
    assert (np.sum(cpu * gpu, axis=1) > 0.99).all()


# -- search --------------------------------------------------------------------------------------
def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def assert_exact(distances, indices, gallery, queries, k, atol=1e-5):
    """The returned distances are the k smallest true ones and belong to the returned items
    (any order among ties)."""
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert distances.shape == indices.shape == (queries.shape[0], k)
    np.testing.assert_allclose(distances, np.sort(true, axis=1)[:, :k], atol=atol)
    np.testing.assert_allclose(np.take_along_axis(true, indices, 1), distances, atol=atol)
    assert all(len(set(row.tolist())) == k for row in indices)


@pytest.mark.parametrize("gallery_chunk", [65536, 3000])
def test_search_torch_cuda_matches_faiss_cpu(gallery_chunk):
    from engine.index import SearchIndex, TorchExactSearch

    rng = np.random.default_rng(5)
    gallery, queries = unit_rows(rng, 20000, 256), unit_rows(rng, 300, 256)
    expected_distances, expected_indices = SearchIndex(gallery, device="cpu").search(queries, 20)
    similarities, indices = TorchExactSearch(gallery, "cuda", "fp32",
                                             gallery_chunk=gallery_chunk).search(queries, 20)
    assert_exact(1.0 - similarities, indices, gallery, queries, 20)
    np.testing.assert_allclose(1.0 - similarities, expected_distances, atol=1e-5)
    assert (indices == expected_indices).mean() > 0.99  # the rest: near-ties within 1e-5
    index = SearchIndex(gallery, device="cuda", backend="torch")
    assert (index.backend, index.on_gpu) == ("torch-cuda exact (fp32)", True)
    assert_exact(*index.search(queries, 20), gallery, queries, 20)


def test_search_faiss_gpu_probe_is_consistent():
    """Whatever faiss build is installed, the probe's verdict and the index agree with it."""
    import engine.index as index_module
    from engine.index import SearchIndex, faiss_gpu_probe

    rng = np.random.default_rng(6)
    gallery, queries = unit_rows(rng, 5000, 64), unit_rows(rng, 50, 64)
    probe = faiss_gpu_probe("flat")
    index = SearchIndex(gallery, device="cuda", backend="faiss")
    if not index_module._faiss_gpu_build():
        assert not probe.usable and "CPU-only" in probe.reason
    if probe.usable:
        assert index.backend.startswith("faiss-gpu flat (") and index.on_gpu
        assert_exact(*index.search(queries, 10), gallery, queries, 10, atol=1e-4)
    else:
        assert probe.reason
        assert (index.backend, index.on_gpu) == ("faiss-cpu flat", False)
        assert index.backend_reason == probe.reason


@pytest.mark.parametrize(("precision", "bound", "minimum"),
                         [("bf16", 2.0**-8, 0.98), ("fp16", 2.0**-10, 0.99)])
def test_search_reduced_precision_on_cuda(precision, bound, minimum):
    """As test_index.py's CPU test (same data, bounds and thresholds), and the CUDA products
    (cuBLAS, float32 out) equal the CPU's float32 products of the same rounded inputs."""
    from engine.bench import synthetic_collection
    from engine.index import SearchIndex

    data, _ = synthetic_collection(4100, 1280, spread=0.6, seed=0)
    gallery, queries = data[:4000], data[4000:]
    _, exact = SearchIndex(gallery, device="cpu").search(queries, 10)
    index = SearchIndex(gallery, device="cuda", precision=precision)
    assert index.backend == f"torch-cuda exact ({precision})"
    distances, indices = index.search(queries, 10)
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(indices, exact, strict=True)]
                   ) >= minimum
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert np.abs(np.take_along_axis(true, indices, 1) - distances).max() <= bound + 1e-5
    on_cpu, _ = SearchIndex(gallery, device="cpu", precision=precision).search(queries, 10)
    np.testing.assert_allclose(distances, on_cpu, atol=2e-5)


def test_search_auto_on_cuda_is_a_gpu_backend(tmp_path):
    from engine.index import SearchIndex

    rng = np.random.default_rng(7)
    gallery, queries = unit_rows(rng, 3000, 128), unit_rows(rng, 40, 128)
    index = SearchIndex(gallery)
    assert index.backend.startswith(("faiss-gpu flat", "torch-cuda exact (fp32)")), index.backend
    assert index.on_gpu
    assert_exact(*index.search(queries, 10), gallery, queries, 10, atol=1e-4)
    index.save(tmp_path / "index.faiss")
    loaded = SearchIndex.load(tmp_path / "index.faiss")
    assert loaded.backend == index.backend
    assert_exact(*loaded.search(queries, 10), gallery, queries, 10, atol=1e-4)
    approximate = SearchIndex(gallery, kind="ivf")  # approximate kinds stay faiss
    assert approximate.backend.startswith(("faiss-gpu ivf", "faiss-cpu ivf"))


# -- ICFRR and SGRR ------------------------------------------------------------------------------
def assert_same_ranking(on_gpu, on_cpu, atol=1e-5):
    """The same distances position by position and the same items, but for a rare swap of
    near-ties (float32 sums round differently on CUDA)."""
    np.testing.assert_allclose(on_gpu.distances, on_cpu.distances, atol=atol)
    assert (on_gpu.indices == on_cpu.indices).mean() > 0.99


@pytest.mark.parametrize("dense_limit", [8192, 0])
def test_icfrr_cuda_matches_cpu(split_features, monkeypatch, dense_limit):
    """Batch, leave-one-out and online; the consensus by the dense vote matrix or, for a
    gallery above `dense_limit`, by gathering the voters' lists on the device."""
    import functools

    from engine.rerank import icfrr

    queries, gallery = split_features
    monkeypatch.setattr(icfrr, "vote_matrix",
                        functools.partial(icfrr.vote_matrix, dense_limit=dense_limit))
    runs = (lambda r: r.rerank(queries), lambda r: r.rerank(None, 50),
            lambda r: r.rerank(queries[:5], mode="online"))
    cpu = create_reranker("icfrr", device="cpu", KG=20, KQ=20).fit(gallery)
    expected = [run(cpu) for run in runs]
    gpu = create_reranker("icfrr", device="cuda", KG=20, KQ=20).fit(gallery)
    assert gpu._gallery64.is_cuda and gpu._lists_t.is_cuda
    assert gpu._votes is None if dense_limit == 0 else gpu._votes.is_cuda
    sorted_on = []
    sort = icfrr.ascending_candidates

    def recording(distances, exclude=None):
        sorted_on.append(distances.device.type)
        return sort(distances, exclude)

    monkeypatch.setattr(icfrr, "ascending_candidates", recording)
    for run, on_cpu in zip(runs, expected, strict=True):
        assert_same_ranking(run(gpu), on_cpu)
    assert set(sorted_on) == {"cuda"}


def test_icfrr_cuda_original_order_is_the_cpus(split_features):
    """Without iterations the result is the sorted canonical distances: exactly the CPU's."""
    queries, gallery = split_features
    for queries_or_none in (queries, None):
        on_cpu = create_reranker("icfrr", device="cpu", n_times=0).fit(gallery).rerank(
            queries_or_none)
        on_gpu = create_reranker("icfrr", device="cuda", n_times=0).fit(gallery).rerank(
            queries_or_none)
        np.testing.assert_array_equal(on_gpu.indices, on_cpu.indices)
        np.testing.assert_array_equal(on_gpu.distances, on_cpu.distances)


def test_sgrr_cuda_matches_cpu(demo_features, tmp_path, monkeypatch):
    """The state trained on the CPU, loaded on CUDA (checksum verified, no retraining): the
    embeddings, leave-one-out and online rankings agree with the CPU's. (Training itself is
    not compared: CUDA draws other dropout masks from the same seed.)"""
    from engine.rerank import GalleryContext, sgrr

    features, labels = demo_features.features, demo_features.labels
    held_out = np.arange(len(features)) % 17 >= 14
    gallery, queries = features[~held_out], features[held_out]

    def fitted(device):
        return create_reranker("sgrr", device=device, K=8, nll_epochs=30, triplet_epochs=30
                               ).fit(GalleryContext(gallery, fingerprint="demo",
                                                    state_dir=tmp_path,
                                                    labels=labels[~held_out]))

    def refuse(*args, **kwargs):
        raise AssertionError("SGRR retrained on CUDA instead of loading the saved state")

    cpu = fitted("cpu")
    with monkeypatch.context() as patch:
        patch.setattr(sgrr, "train", refuse)
        gpu = fitted("cuda")
    assert all(getattr(gpu, name).is_cuda for name in (
        "_features", "_thresholds", "_degree", "_once", "_hidden", "_hidden_once",
        "_embeddings", "_unit_embeddings"))
    np.testing.assert_allclose(gpu.gallery_embeddings(), cpu.gallery_embeddings(), atol=1e-6)
    np.testing.assert_allclose(gpu.query_embeddings(queries), cpu.query_embeddings(queries),
                               atol=1e-5)
    for on_gpu, on_cpu, query_embeddings in (
            (gpu.rerank(None, 20), cpu.rerank(None, 20), cpu.gallery_embeddings()),
            (gpu.rerank(queries, 20, mode="online"), cpu.rerank(queries, 20, mode="online"),
             cpu.query_embeddings(queries))):
        np.testing.assert_allclose(on_gpu.distances, on_cpu.distances, atol=1e-5)
        # items swapped between near-ties are as close on the CPU's numbers
        true = 1.0 - query_embeddings @ cpu.gallery_embeddings().T
        np.testing.assert_allclose(np.take_along_axis(true, on_gpu.indices, 1),
                                   on_gpu.distances, atol=1e-5)
    transductive = gpu.rerank(queries[:4], 10)  # trains on the queries too, on CUDA
    assert transductive.indices.shape == (4, 10)


# -- k-reciprocal --------------------------------------------------------------------------------
def assert_k_reciprocal_agrees(on_gpu, on_cpu):
    """The CPU's distances position by position and its items, but for a rare swap of
    near-ties (float64 products and float32 exp round differently on CUDA); exact ties in
    ascending gallery index, as on the CPU."""
    np.testing.assert_allclose(on_gpu.distances, on_cpu.distances, atol=1e-5)
    assert (on_gpu.indices == on_cpu.indices).mean() > 0.99
    same = np.diff(on_gpu.distances, axis=1) == 0
    assert (np.diff(on_gpu.indices, axis=1)[same] > 0).all()


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (10, 1, 0.0)])
def test_k_reciprocal_cuda_batch_matches_cpu(split_features, monkeypatch, k1, k2,
                                             lambda_value):
    """New queries and leave-one-out, top-k and full rankings; the overlap is computed on the
    device, and the same (duplicate-laden) data gives the CPU's rankings."""
    from engine.rerank import k_reciprocal

    queries, gallery = split_features
    gallery = np.vstack([gallery, gallery[:6]])  # exact duplicates: exact ties
    queries = np.vstack([queries, gallery[:3]])
    params = {"k1": k1, "k2": k2, "lambda_value": lambda_value}
    cpu = create_reranker("k_reciprocal", device="cpu", **params).fit(gallery)
    gpu = create_reranker("k_reciprocal", device="cuda", **params).fit(gallery)
    assert gpu.device.type == "cuda"
    overlap_on = []
    overlap = k_reciprocal.torch_jaccard_overlap

    def recording(query_rows, target_columns, *args):
        overlap_on.append(query_rows.device.type)
        return overlap(query_rows, target_columns, *args)

    monkeypatch.setattr(k_reciprocal, "torch_jaccard_overlap", recording)
    for query_features, k in ((queries, 40), (None, 40), (queries, len(gallery)),
                              (None, len(gallery) - 1)):
        on_gpu = gpu.rerank(query_features, k)
        assert on_gpu.details["device"].startswith("cuda")
        assert_k_reciprocal_agrees(on_gpu, cpu.rerank(query_features, k))
    assert set(overlap_on) == {"cuda"}


def test_k_reciprocal_cuda_online_still_works(split_features):
    """A reranker on CUDA fits (also from a shared kNN graph) and answers online on the CPU:
    exactly the CPU reranker's online result and, up to near-ties, its own CUDA batch."""
    from engine.rerank import GalleryContext
    from engine.rerank.ops import knn_graph

    queries, gallery = split_features
    cpu = create_reranker("k_reciprocal", device="cpu").fit(gallery)
    for context in (GalleryContext(gallery), GalleryContext(gallery, knn=knn_graph(gallery, 30))):
        gpu = create_reranker("k_reciprocal", device="cuda").fit(context)
        online = gpu.rerank(queries[:4], 20, mode="online")
        expected = cpu.rerank(queries[:4], 20, mode="online")
        np.testing.assert_array_equal(online.indices, expected.indices)
        np.testing.assert_array_equal(online.distances, expected.distances)
        for query, indices, distances in zip(queries[:4], online.indices, online.distances,
                                             strict=True):
            batch = gpu.rerank(query[None, :], 20)
            assert batch.details["device"].startswith("cuda")
            np.testing.assert_allclose(batch.distances[0], distances, atol=1e-5)
            assert (batch.indices[0] == indices).mean() >= 0.95
