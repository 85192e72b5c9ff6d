"""One query's float32 product with a gallery, kept for the next method ranking that query
(`engine.core.knn.float32_scores`), and the baseline's single-query search that reads it."""

import numpy as np
import pytest

from engine.core.knn import _memory_key, _recent_scores, exact_candidates, float32_scores
from engine.search.index import StoreSearch


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return unit_rows(457, 64, 0)


def test_float32_scores_are_shared_between_views_of_one_gallery(gallery):
    """Two methods' views of the same gallery memory get one product (read-only); another
    gallery, or the same query against other memory, gets its own."""
    query = unit_rows(1, gallery.shape[1], 7)[0]
    first = float32_scores(gallery, query)
    np.testing.assert_array_equal(first, gallery @ query)
    assert not first.flags.writeable
    view = gallery[:]
    assert view is not gallery
    assert float32_scores(view, query) is first
    copy = gallery.copy()
    assert float32_scores(copy, query) is not first
    other = unit_rows(1, gallery.shape[1], 8)[0]
    assert float32_scores(gallery, other) is not first


def test_float32_scores_forget_a_gallery_that_is_gone():
    """A product is not given for new memory that happens to reuse a freed gallery's
    address: the kept product dies with the array it was computed from."""
    rows = unit_rows(64, 32, 9)
    query = rows[0].copy()
    kept = float32_scores(rows, query)
    assert float32_scores(rows, query) is kept
    key = _memory_key(rows, query)
    del rows
    assert _recent_scores[key][0]() is None
    other = unit_rows(64, 32, 10)
    np.testing.assert_array_equal(float32_scores(other, query), other @ query)



def test_one_query_baseline_search_reads_the_kept_product(gallery):
    """The exact store search of one query gives the top-k of its kept float32 product (ties
    to the smaller index), the same items as faiss's brute force where scores do not tie."""
    query = unit_rows(1, gallery.shape[1], 11)
    kept = float32_scores(gallery, query[0])
    similarities, indices = StoreSearch(gallery).search(query, 20)
    order = np.lexsort((np.arange(len(kept)), -kept))[:20]
    np.testing.assert_array_equal(indices[0], order)
    np.testing.assert_array_equal(similarities[0], kept[order])
    faiss_values, faiss_indices = exact_candidates(gallery, query, 20)
    gaps = np.diff(faiss_values[0])
    assert (np.abs(gaps) > 1e-5).all()  # no near-ties among these random rows: one order
    np.testing.assert_array_equal(faiss_indices[0], indices[0])
    np.testing.assert_allclose(faiss_values[0], similarities[0], atol=1e-5)


def test_device_tensor_reads_a_memory_mapped_gallery_in_place(tmp_path):
    """A read-only (memory-mapped) float32 gallery becomes a CPU tensor on its own memory,
    without torch's not-writable warning; another dtype is a converted copy."""
    import warnings

    import torch

    from engine.core.knn import device_tensor

    path = tmp_path / "gallery.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(3, 4))
    mapped = np.load(path, mmap_mode="r")
    assert not mapped.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = device_tensor(mapped, torch.device("cpu"))
    assert tensor.dtype == torch.float32 and tensor.data_ptr() == mapped.ctypes.data
    converted = device_tensor(mapped, torch.device("cpu"), np.float64)
    assert converted.dtype == torch.float64
    np.testing.assert_array_equal(converted.numpy(), mapped)
