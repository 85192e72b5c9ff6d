"""CUDA paths, checked against the CPU. Skipped (never passed) on machines without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import (
    assert_icfrr_steps,
    checked_gallery_lists,
    gnn_atol,
    k_reciprocal_atol,
    lists_without_item,
)
from tie_aware import U32, assert_order_matches

from engine.rerank import create_reranker, get_reranker_class, list_rerankers
from engine.search.gallery import DEMO_GALLERY

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


GPU_METHODS = [name for name in list_rerankers() if get_reranker_class(name).runs_on_gpu]
"""Every registered method that declares `runs_on_gpu`."""


def by_item(result) -> np.ndarray:
    """A full ranking's distances by gallery item (the reference of `tie_aware`)."""
    distances = np.empty(result.distances.shape, np.float64)
    np.put_along_axis(distances, result.indices, result.distances, axis=1)
    return distances


@pytest.mark.parametrize("name", GPU_METHODS)
def test_method_computes_on_cuda(name, split_features):
    """Each method that declares `runs_on_gpu`, with its `quick_params`: it resolves "cuda" and
    "auto" to the device, allocates GPU memory while fitting and re-ranking, and honours the
    contract in batch, online and leave-one-out mode (the base class checks every result).
    A method that does not learn finds nearly the CPU's top 10 (float ties and, for
    iterative methods, their consequences may differ; the tests below compare exactly)."""
    cls = get_reranker_class(name)
    queries, gallery = split_features
    assert create_reranker(name, device="auto", **cls.quick_params).device.type == "cuda"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    gpu = create_reranker(name, device="cuda", **cls.quick_params).fit(gallery)
    assert gpu.device.type == "cuda"
    batch = gpu.rerank(queries, 10)
    online = gpu.rerank(queries[:3], 10, mode="online")
    leave_one_out = gpu.rerank(None, 10)
    assert torch.cuda.max_memory_allocated() > 0, f"{name} never used the GPU"
    assert batch.indices.shape == (len(queries), 10)
    assert online.indices.shape == (3, 10)
    assert leave_one_out.indices.shape == (len(gallery), 10)
    if not cls.learns:
        cpu = create_reranker(name, device="cpu", **cls.quick_params).fit(gallery)
        expected = cpu.rerank(queries, 10).indices
        overlap = np.mean([len(set(a) & set(b)) / 10
                           for a, b in zip(batch.indices, expected, strict=True)])
        assert overlap >= 0.9, f"{name}: CUDA and CPU top 10 share {overlap:.0%}"


def test_gnn_cuda_matches_cpu(split_features):
    """The CPU's ranking up to float ties: two float32 runs, each within gnn_atol of exact."""
    queries, gallery = split_features
    on_cpu = create_reranker("gnn", device="cpu").fit(gallery).rerank(queries)
    on_gpu = create_reranker("gnn", device="cuda").fit(gallery).rerank(queries, 20)
    atol = 2 * gnn_atol(len(queries) + len(gallery), 26, 7, 0.3, gallery.shape[1])
    assert_order_matches(on_gpu.indices, by_item(on_cpu), atol=atol, values=on_gpu.distances)
    assert on_gpu.details["device"].startswith("cuda")


def test_gnn_cuda_online_matches_batch(split_features):
    queries, gallery = split_features
    reranker = create_reranker("gnn", device="cuda").fit(gallery)
    online = reranker.rerank(queries[:3], 10, mode="online")
    for q, query in enumerate(queries[:3]):
        batch = reranker.rerank(query[None, :])
        atol = 2 * gnn_atol(len(gallery) + 1, 26, 7, 0.3, gallery.shape[1])
        assert_order_matches(online.indices[q], by_item(batch), atol=atol,
                             values=online.distances[q])


def test_extractor_cuda_matches_cpu():
    from engine.features.backbone import FeatureExtractor

    paths = [DEMO_GALLERY / "images" / f"image_{n:04d}.jpg" for n in range(1, 1360, 170)]
    cpu = FeatureExtractor(device="cpu").embed(paths)
    gpu = FeatureExtractor(device="cuda").embed(paths)  # bf16 autocast: close, not equal
    assert (np.sum(cpu * gpu, axis=1) > 0.99).all()


# -- search --------------------------------------------------------------------------------------
def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def search_atol(dim: int) -> float:
    """Largest error of a float32 distance 1 - <q, x> of unit rows (cuBLAS or faiss in fp32):
    a dot product of dim terms, dim U32, and 1 - s rounds once more (as test_index.py)."""
    return (dim + 2) * U32


def assert_exact(distances, indices, gallery, queries, k):
    """The returned items are the k nearest by float64 brute force, best first, up to float
    ties (`tie_aware`), with their true distances."""
    true = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert distances.shape == indices.shape == (queries.shape[0], k)
    assert_order_matches(indices, true, atol=search_atol(gallery.shape[1]), values=distances)


@pytest.mark.parametrize("gallery_chunk", [65536, 3000])
def test_search_torch_cuda_matches_faiss_cpu(gallery_chunk):
    from engine.search.index import SearchIndex, TorchExactSearch

    rng = np.random.default_rng(5)
    gallery, queries = unit_rows(rng, 20000, 256), unit_rows(rng, 300, 256)
    expected_distances, expected_indices = SearchIndex(gallery, device="cpu").search(queries, 20)
    similarities, indices = TorchExactSearch(gallery, "cuda", "fp32",
                                             gallery_chunk=gallery_chunk).search(queries, 20)
    # each against brute force, up to float ties (their float32 sums differ)
    assert_exact(1.0 - similarities, indices, gallery, queries, 20)
    assert_exact(expected_distances, expected_indices, gallery, queries, 20)
    np.testing.assert_allclose(1.0 - similarities, expected_distances, atol=2 * search_atol(256))
    index = SearchIndex(gallery, device="cuda", backend="torch")
    assert (index.backend, index.on_gpu) == ("torch-cuda exact (fp32)", True)
    assert_exact(*index.search(queries, 20), gallery, queries, 20)


def test_search_faiss_gpu_probe_is_consistent():
    """Whatever faiss build is installed, the probe's verdict and the index agree with it."""
    import engine.search.index as index_module
    from engine.search.index import SearchIndex, faiss_gpu_probe

    rng = np.random.default_rng(6)
    gallery, queries = unit_rows(rng, 5000, 64), unit_rows(rng, 50, 64)
    probe = faiss_gpu_probe("flat")
    index = SearchIndex(gallery, device="cuda", backend="faiss")
    if not index_module._faiss_gpu_build():
        assert not probe.usable and "CPU-only" in probe.reason
    if probe.usable:
        assert index.backend.startswith("faiss-gpu flat (") and index.on_gpu
        assert_exact(*index.search(queries, 10), gallery, queries, 10)
    else:
        assert probe.reason
        assert (index.backend, index.on_gpu) == ("faiss-cpu flat", False)
        assert index.backend_reason == probe.reason


@pytest.mark.parametrize(("precision", "bound", "minimum"),
                         [("bf16", 2.0**-8, 0.98), ("fp16", 2.0**-10, 0.99)])
def test_search_reduced_precision_on_cuda(precision, bound, minimum):
    """As test_index.py's CPU test (same data, bounds and thresholds), and the CUDA products
    (cuBLAS, float32 out) equal the CPU's float32 products of the same rounded inputs."""
    from engine.bench.measure import synthetic_collection
    from engine.search.index import SearchIndex

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
    from engine.search.index import SearchIndex

    rng = np.random.default_rng(7)
    gallery, queries = unit_rows(rng, 3000, 128), unit_rows(rng, 40, 128)
    index = SearchIndex(gallery)
    assert index.backend.startswith(("faiss-gpu flat", "torch-cuda exact (fp32)")), index.backend
    assert index.on_gpu
    assert_exact(*index.search(queries, 10), gallery, queries, 10)
    index.save(tmp_path / "index.faiss")
    loaded = SearchIndex.load(tmp_path / "index.faiss")
    assert loaded.backend == index.backend
    assert_exact(*loaded.search(queries, 10), gallery, queries, 10)
    approximate = SearchIndex(gallery, kind="ivf")  # approximate kinds stay faiss
    assert approximate.backend.startswith(("faiss-gpu ivf", "faiss-cpu ivf"))


# -- ICFRR and SGRR ------------------------------------------------------------------------------
@pytest.mark.parametrize("dense_limit", [8192, 0])
def test_icfrr_cuda_matches_the_oracle(split_features, monkeypatch, dense_limit):
    """Batch, leave-one-out and online on CUDA, each iteration against the oracle from its own
    previous orders, up to float ties (a float32 near-tie may part from the CPU's, and with it
    every later iteration: test_icfrr.py); the consensus by the dense vote matrix or, for a
    gallery above `dense_limit`, by gathering the voters' lists on the device."""
    import functools

    from engine.rerank import icfrr
    from engine.rerank.icfrr import query_distances

    queries, gallery = split_features
    size = len(gallery)
    monkeypatch.setattr(icfrr, "vote_matrix",
                        functools.partial(icfrr.vote_matrix, dense_limit=dense_limit))
    gpus = [create_reranker("icfrr", device="cuda", KG=20, KQ=20, n_times=t).fit(gallery)
            for t in range(6)]
    gpu = gpus[-1]
    assert gpu._gallery64.is_cuda and gpu._lists_t.is_cuda
    assert gpu._votes is None if dense_limit == 0 else gpu._votes.is_cuda
    sorted_on = []
    sort = icfrr.ascending_candidates

    def recording(distances, exclude=None):
        sorted_on.append(distances.device.type)
        return sort(distances, exclude)

    monkeypatch.setattr(icfrr, "ascending_candidates", recording)
    gallery64 = gallery.astype(np.float64)
    qg, gg = query_distances(queries, gallery64), query_distances(gallery64, gallery64)
    lists = checked_gallery_lists(gpu._lists, gallery)
    for name, run in (("batch", lambda r: r.rerank(queries)),
                      ("online", lambda r: r.rerank(queries[:5], mode="online"))):
        results = [run(reranker) for reranker in gpus]
        assert_icfrr_steps(lambda t, results=results: (results[t].indices,
                                                       -results[t].distances),
                           qg[:len(results[0].indices)], gg, 20, 20, 0.5, 5, lists=lists,
                           label=f"cuda {name}")
    leave_one_out = [reranker.rerank(None) for reranker in gpus]
    np.testing.assert_array_equal(gpu.rerank(None, 50).indices, leave_one_out[-1].indices[:, :50])
    for i in (0, 93, size - 1):
        kept = np.delete(np.arange(size), i)

        def step(t: int, i: int = i) -> tuple[np.ndarray, np.ndarray]:
            order = leave_one_out[t].indices[i:i + 1]
            return order - (order > i), -leave_one_out[t].distances[i:i + 1]

        assert_icfrr_steps(step, np.delete(gg[i], i)[None], gg[np.ix_(kept, kept)], 20, 20,
                           0.5, 5, lists=lists_without_item(lists, i),
                           label=f"cuda, item {i} left out")
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
    # the CPU's rankings up to float ties: the CUDA embeddings are the CPU's within the
    # tolerances above, element by element, so a dot product of unit rows of D terms moves by
    # at most (1e-6 + 1e-5) ||.||_1 <= 1.1e-5 sqrt(D); then float32 products, (D + 2) U32
    gallery_embeddings = cpu.gallery_embeddings().astype(np.float64)
    dim = gallery_embeddings.shape[1]
    atol = 1.1e-5 * np.sqrt(dim) + (dim + 2) * U32
    leave_one_out = 1.0 - gallery_embeddings @ gallery_embeddings.T
    np.fill_diagonal(leave_one_out, np.inf)  # never the item itself
    online = 1.0 - cpu.query_embeddings(queries).astype(np.float64) @ gallery_embeddings.T
    for on_gpu, true in ((gpu.rerank(None, 20), leave_one_out),
                         (gpu.rerank(queries, 20, mode="online"), online)):
        assert_order_matches(on_gpu.indices, true, atol=atol, values=on_gpu.distances)
    transductive = gpu.rerank(queries[:4], 10)  # trains on the queries too, on CUDA
    assert transductive.indices.shape == (4, 10)


# -- k-reciprocal --------------------------------------------------------------------------------
def assert_k_reciprocal_agrees(on_gpu, on_cpu, n_nodes: int, k2: int, lambda_value: float,
                               leave_one_out: bool = False):
    """The CPU's full ranking `on_cpu` up to float ties (`tie_aware`: float64 products and
    float32 exp round differently on CUDA; each run is within k_reciprocal_atol of the
    reference); exact ties in ascending gallery index, as on the CPU."""
    if leave_one_out:  # (G, G - 1): the item itself at +inf, never returned
        reference = np.full((len(on_cpu.indices), len(on_cpu.indices)), np.inf)
        np.put_along_axis(reference, on_cpu.indices, on_cpu.distances, axis=1)
    else:
        reference = by_item(on_cpu)
    assert_order_matches(on_gpu.indices, reference, values=on_gpu.distances,
                         atol=2 * k_reciprocal_atol(n_nodes, k2, lambda_value),
                         ties_by_index=True)


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
    full_on_cpu = {"queries": cpu.rerank(queries), "leave one out": cpu.rerank(None)}
    for name, query_features, k in (("queries", queries, 40), ("leave one out", None, 40),
                                    ("queries", queries, len(gallery)),
                                    ("leave one out", None, len(gallery) - 1)):
        on_gpu = gpu.rerank(query_features, k)
        assert on_gpu.details["device"].startswith("cuda")
        n_nodes = len(gallery) + (0 if query_features is None else len(queries))
        assert_k_reciprocal_agrees(on_gpu, full_on_cpu[name], n_nodes, k2, lambda_value,
                                   leave_one_out=query_features is None)
    assert set(overlap_on) == {"cuda"}


def test_k_reciprocal_cuda_online_still_works(split_features):
    """A reranker on CUDA fits (also from a shared kNN graph) and answers online on the CPU:
    exactly the CPU reranker's online result (the same CPU code) and, up to float ties, its
    own CUDA batch."""
    from engine.core.knn import knn_graph
    from engine.rerank import GalleryContext

    queries, gallery = split_features
    cpu = create_reranker("k_reciprocal", device="cpu").fit(gallery)
    for context in (GalleryContext(gallery), GalleryContext(gallery, knn=knn_graph(gallery, 30))):
        gpu = create_reranker("k_reciprocal", device="cuda").fit(context)
        online = gpu.rerank(queries[:4], 20, mode="online")
        expected = cpu.rerank(queries[:4], 20, mode="online")
        np.testing.assert_array_equal(online.indices, expected.indices)
        np.testing.assert_array_equal(online.distances, expected.distances)
        for query in queries[:4]:
            batch = gpu.rerank(query[None, :], 20)
            assert batch.details["device"].startswith("cuda")
            assert_k_reciprocal_agrees(batch, cpu.rerank_online(query), len(gallery) + 1, 6,
                                       0.3)


# -- query expansion, augmentation and diffusion ------------------------------------------------
def full_reference(result, size: int) -> np.ndarray:
    """A (Q, G) reference from a full ranking (G, or G - 1 for leave-one-out: the item itself
    at +inf, never returned)."""
    reference = np.full((len(result.indices), size), np.inf)
    np.put_along_axis(reference, result.indices, result.distances.astype(np.float64), axis=1)
    return reference


@pytest.mark.parametrize(("name", "params"), [("aqe", {"n": 10}), ("alpha_qe", {}),
                                              ("dba", {}), ("dba", {"qe_n": 5})])
def test_expansion_cuda_matches_cpu(name, params, split_features):
    """Batch mode on CUDA (neighbours, float64 sums and the final product on the device) ranks
    as the CPU does, new queries and leave-one-out, up to float ties: each run is within one
    float32 rounding of the expanded query and one float32 product of the exact distances
    ((2 d + 8) U32, test_expansion.py), so two runs within twice that; DBA's augmented rows
    are the CPU's to two roundings."""
    queries, gallery = split_features
    size, dim = gallery.shape
    cpu = create_reranker(name, device="cpu", **params).fit(gallery)
    gpu = create_reranker(name, device="cuda", **params).fit(gallery)
    if name == "dba":
        np.testing.assert_allclose(gpu.augmented_features(), cpu.augmented_features(),
                                   atol=4 * U32)
    atol = 2 * (2 * dim + 8) * U32
    for query_features, k in ((queries, 40), (None, 40), (queries, size), (None, size - 1)):
        reference = full_reference(cpu.rerank(query_features), size)
        on_gpu = gpu.rerank(query_features, k)
        assert_order_matches(on_gpu.indices, reference, atol=atol, values=on_gpu.distances,
                             min_pinned=len(on_gpu.indices) * 5, label=f"{name} k={k}")
        assert on_gpu.details["expansion"].shape[0] == len(on_gpu.indices)


@pytest.mark.parametrize("params", [{}, {"k": 5, "kq": 2, "alpha": 0.9}])
def test_diffusion_cuda_matches_cpu(params, split_features):
    """The walk on CUDA (cuSPARSE products, CG, seeds and top k on the device): the CPU's
    rankings up to float ties (the same CG on sums taken in another order: f agrees to about
    1e-12 of its size, the float32 distances to two roundings), new queries, leave-one-out
    and online, with the same CG steps; whole rankings complete the unreached items alike."""
    queries, gallery = split_features
    size = len(gallery)
    cpu = create_reranker("diffusion", device="cpu", **params).fit(gallery)
    gpu = create_reranker("diffusion", device="cuda", **params).fit(gallery)
    assert gpu._transition_product.is_cuda
    for query_features, k, mode in ((queries, 40, "batch"), (None, 40, "batch"),
                                    (queries, size, "batch"), (None, size - 1, "batch"),
                                    (queries[:4], size, "online")):
        expected = cpu.rerank(query_features, None if mode == "batch" else size, mode=mode)
        scale = float(np.abs(expected.distances).max()) + 1.0
        on_gpu = gpu.rerank(query_features, k, mode=mode)
        assert_order_matches(on_gpu.indices, full_reference(expected, size),
                             atol=4 * U32 * scale, values=on_gpu.distances,
                             min_pinned=len(on_gpu.indices) * 5, label=f"diffusion {mode} k={k}")
        if mode == "batch":
            np.testing.assert_array_equal(on_gpu.details["reached"], expected.details["reached"])
    query = queries[0]
    evidence = gpu.explain(query, int(gpu.rerank_online(query, 1).indices[0, 0]))
    f = evidence.numbers["diffusion score f"]
    assert abs(evidence.numbers["sum of the seeds' contributions"] - f) <= 1e-9 * max(abs(f), 1)
