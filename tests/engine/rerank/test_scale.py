"""The large-gallery primitives of engine/rerank/_scale.py against the canonical definition."""

import numpy as np
import pytest

from engine.core.knn import canonical_similarity
from engine.rerank._scale import _block_rows, canonical_block, canonical_rows, query_top


def unit_rows(count: int, dim: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    # 1280 dimensions: 102 rows per conversion block, so 457 rows end on a partial block
    return unit_rows(457, 1280, 0)


@pytest.mark.parametrize("n_queries", [1, 3])
def test_canonical_block_equals_the_definition(gallery, n_queries):
    """One query goes through cache-sized blocks, several through large ones: both are the
    float64 products rounded to float32 (one ulp allowed for a float64 sum that ends on a
    float32 rounding boundary in another order)."""
    assert _block_rows(gallery.shape[1]) < len(gallery)
    queries = unit_rows(n_queries, gallery.shape[1], 1)
    got = canonical_block(queries, gallery)
    want = canonical_similarity(queries, gallery)
    assert got.shape == want.shape == (n_queries, len(gallery))
    np.testing.assert_array_max_ulp(got, want, maxulp=1)


def test_canonical_block_reads_a_float16_gallery(gallery):
    half = gallery.astype(np.float16)
    query = unit_rows(1, gallery.shape[1], 2)
    np.testing.assert_array_max_ulp(canonical_block(query, half),
                                    canonical_similarity(query, half.astype(np.float32)),
                                    maxulp=1)


def test_canonical_rows_takes_any_ids(gallery):
    """Unsorted and repeated ids, more than one block of them, and none at all."""
    query = unit_rows(1, gallery.shape[1], 3)[0]
    ids = np.random.default_rng(4).integers(0, len(gallery), 300)
    want = canonical_similarity(query[None, :], gallery)[0]
    got = canonical_rows(gallery, ids, query)
    assert got.shape == (300,)
    np.testing.assert_array_max_ulp(got, want[ids], maxulp=1)
    assert canonical_rows(gallery, np.array([], np.int64), query).shape == (0,)


def test_query_top_is_the_sorted_canonical_row():
    """On a gallery of near-duplicates (ties within the float32 error), the top items are
    those of sorting the whole canonical row, ties to the smaller id."""
    base = unit_rows(40, 64, 5)
    gallery = np.concatenate([base, base + 1e-7 * unit_rows(40, 64, 6)])
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = base[7]
    row = canonical_similarity(query[None, :], gallery)[0]
    want = np.lexsort((np.arange(len(row)), -row))[:25]
    values, ids = query_top(gallery, query, 25)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(values, row[want])

