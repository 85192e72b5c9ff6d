"""The scale benchmark at a tiny size: every column filled, methods fitted on the graph it
built, refusals reported instead of run, float16 memory-mapped stores."""

from __future__ import annotations

import numpy as np
import pytest

from engine.bench import scale
from engine.bench.measure import synthetic_collection
from engine.search import gallery as gallery_module


def test_synthetic_store_is_synthetic_collection_in_memory_and_chunked_alike(tmp_path,
                                                                           monkeypatch):
    features, labels = scale.synthetic_store(300, 16)
    expected, expected_labels = synthetic_collection(300, 16)
    np.testing.assert_array_equal(features, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    monkeypatch.setattr(scale, "GENERATION_CHUNK", 64)
    mapped, mapped_labels = scale.synthetic_store(300, 16, "float16", tmp_path)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    np.testing.assert_array_equal(mapped_labels, expected_labels)  # same centres and labels
    np.testing.assert_allclose(np.linalg.norm(mapped.astype(np.float64), axis=1), 1, atol=1e-3)
    same_class = mapped_labels[:, None] == mapped_labels[None, :]
    similarities = mapped.astype(np.float32) @ mapped.astype(np.float32).T
    assert similarities[same_class].mean() > similarities[~same_class].mean() + 0.3


def test_run_size_fills_every_column_and_fits_methods_on_its_graph():
    result = scale.run_size(300, 32, n_queries=6, methods=["k_reciprocal", "gnn"], k=50,
                            depth=20)
    assert (result.size, result.index_kind, result.graph) == (300, "flat", "exact")
    assert result.recall["recall@10"] == 1.0 and result.graph_recall == 1.0
    assert result.farthest_error < 1e-5
    assert [row.method for row in result.methods] == ["k_reciprocal", "gnn"]
    for row in result.methods:
        assert row.fit_seconds >= 0 and 0 < row.online_ms <= row.online_p95_ms
        assert row.online_cpu_ms > 0 and row.peak_mib is not None
        assert float(row.batch) >= 0


def test_an_approximate_graph_and_a_refusal_are_reported(monkeypatch):
    """Above EXACT_GRAPH_MAX the graph goes through an index and states its recall; a method
    whose batch cannot run says why in the batch column."""
    from engine.rerank import get_reranker_class

    monkeypatch.setattr(gallery_module, "EXACT_GRAPH_MAX", 100)
    monkeypatch.setattr(get_reranker_class("k_reciprocal"), "batch_refusal",
                        lambda self, size, queries: f"needs {size} x {size} floats")
    result = scale.run_size(300, 32, n_queries=5, methods=["k_reciprocal"], k=20, depth=16)
    assert result.graph == "approximate" and 0 < result.graph_recall <= 1
    assert result.methods[0].batch == "refused: needs 295 x 295 floats"
    assert result.methods[0].online_ms > 0


@pytest.mark.parametrize("extra", [[], ["--store", "float16", "--index", "ivfpq"]])
def test_main_prints_the_tables(capsys, extra):
    assert scale.main(["--sizes", "300", "--dim", "32", "--queries", "4", "--depth", "16",
                       "--methods", "icfrr", *extra]) == 0
    out = capsys.readouterr().out
    assert "| 300 | 32 |" in out and "| icfrr |" in out and "recall@100" in out
    if extra:
        assert "float16, memory-mapped | ivfpq" in out
