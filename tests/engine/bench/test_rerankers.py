"""The benchmark's pieces on tiny inputs (the real runs are not tests: see README)."""

from __future__ import annotations

import numpy as np
import pytest
from tie_aware import U32

from engine.bench import rerankers as bench
from engine.bench.measure import synthetic_collection
from engine.evaluation.metrics import evaluate
from engine.evaluation.protocols import make_split


def tie_resolved_orders(similarity: np.ndarray, relevant: np.ndarray, atol: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The float64 ranking (descending) with each run of items whose neighbouring similarities
    lie within 2 * atol (items a float32 search may order either way) put irrelevant-first,
    then relevant-first: the orders of the lowest and the highest average precision."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    ordered = np.take_along_axis(similarity, order, axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf: the left-out item itself, last
        apart = -np.diff(ordered, axis=1) > 2 * atol
    group = np.concatenate([np.zeros((len(order), 1), int), np.cumsum(apart, axis=1)], axis=1)
    hit = np.take_along_axis(relevant, order, axis=1)
    return tuple(np.stack([row[np.lexsort((key, g))] for row, key, g in
                           zip(order, hit if worst else ~hit, group, strict=True)])
                 for worst in (True, False))


def test_synthetic_collection_is_clustered_unit_features():
    features, labels = synthetic_collection(200, 32, n_classes=10, seed=1)
    assert features.shape == (200, 32) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    assert set(labels.tolist()) <= set(range(10))
    within = features[labels == labels[0]] @ features[0]
    assert np.median(within) > np.median(features @ features[0])


@pytest.mark.parametrize("protocol", ["leave-one-out", "oxford17-split"])
def test_run_gives_a_row_per_method_with_the_baseline_first(protocol):
    features, labels = synthetic_collection(120, 16, n_classes=6, spread=1.0, seed=2)
    rows = bench.run(features, labels, protocol, ["k_reciprocal", "gnn:lambda_value=0"], None,
                     "cpu", online_queries=3)
    assert [row.method for row in rows] == ["baseline (cosine)", "k_reciprocal",
                                            "gnn:lambda_value=0"]
    assert rows[0].batch_seconds is None
    for row in rows[1:]:
        assert 0.0 <= row.p1 <= 1.0 and row.batch_seconds > 0 and row.online_ms > 0
        assert row.peak_mib is not None
    # the baseline row is the plain cosine ranking's mAP, whichever way its float32 search
    # (faiss: d + 2 U32 per similarity) orders near-tied items of different relevance
    split = make_split(protocol, labels)
    gallery = features[split.gallery_rows]
    queries = gallery if split.leave_one_out else features[split.query_rows]
    query_labels, gallery_labels = split.query_labels(labels), labels[split.gallery_rows]
    similarity = queries.astype(np.float64) @ gallery.astype(np.float64).T
    if split.leave_one_out:
        np.fill_diagonal(similarity, -np.inf)
    relevant = gallery_labels[None, :] == query_labels[:, None]
    lowest, highest = (
        evaluate(order[:, :similarity.shape[1] - split.leave_one_out], query_labels,
                 gallery_labels, ks=(1, 5), n_positives=split.n_positives).map
        for order in tie_resolved_orders(similarity, relevant, (features.shape[1] + 2) * U32))
    assert lowest - 1e-9 <= rows[0].map <= highest + 1e-9
    table = bench.format_table(rows, "title")
    assert table.splitlines()[0] == "title" and table.count("\n| ") == len(rows) + 1


def test_parse_method():
    assert bench.parse_method("gnn") == ("gnn", {})
    assert bench.parse_method("gnn:lambda_value=0,k1=20") == ("gnn", {"lambda_value": 0,
                                                                      "k1": 20})
    assert bench.parse_method("gnn:lambda_value=0.5") == ("gnn", {"lambda_value": 0.5})
    assert bench.parse_method("ssr:after_k_reciprocal=true,k=50") == (
        "ssr", {"after_k_reciprocal": True, "k": 50})
    assert bench.parse_method("ssr:after_k_reciprocal=False") == (
        "ssr", {"after_k_reciprocal": False})


def test_held_out_rows_spread_queries_and_leave_the_rest_as_gallery():
    queries, gallery = bench.held_out_rows(100, 10)
    assert len(queries) == 10 and len(gallery) == 90
    assert np.intersect1d(queries, gallery).size == 0
    assert queries[0] == 0 and queries[-1] == 99


def test_online_specs_add_each_methods_preset():
    specs = bench.online_specs(["gnn", "icfrr", "k_reciprocal:k1=5"],
                               {"gnn": {"k1": 32, "lambda_value": 0.0, "flag": True}})
    assert specs == [("gnn", "authors' defaults"),
                     ("gnn:k1=32,lambda_value=0.0,flag=true", "demo preset"),
                     ("icfrr", "authors' defaults"), ("k_reciprocal:k1=5", "given")]
    assert "sgrr" not in bench.training_free_methods()
    assert {"gnn", "icfrr", "k_reciprocal"} <= set(bench.training_free_methods())


def test_run_online_times_quiet_and_busy_passes():
    features, _ = synthetic_collection(80, 16, n_classes=4, seed=5)
    rows, note = bench.run_online(features, [("gnn", "authors' defaults"),
                                             ("k_reciprocal:k1=5", "given")],
                                  None, "cpu", online_queries=4, busy=True)
    assert [(row.method, row.parameters) for row in rows] == [
        ("gnn", "authors' defaults"), ("k_reciprocal", "k1=5")]
    for row in rows:
        assert row.quiet_ms > 0 and row.quiet_cpu_ms > 0 and row.busy_ms > 0
    assert "76 gallery items, 4 held-out queries, top 76" in note and "busy" in note
    table = bench.format_online_table(rows, "title")
    assert "busy / quiet" in table and table.count("\n| ") == len(rows) + 1


def test_the_bench_runs_on_a_features_file(tmp_path, capsys):
    """`python -m engine.bench --features PATH` scores a labelled features file."""
    from engine.bench.rerankers import main

    features, labels = synthetic_collection(60, 16, spread=0.3)
    path = tmp_path / "clusters.npz"
    np.savez(path, features=features.astype(np.float32), labels=labels)
    assert main(["--features", str(path), "--methods", "k_reciprocal", "--device", "cpu",
                 "--online-queries", "2", "--cache-dir", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out
    assert "clusters.npz (60 items, d=16)" in table
    assert "k_reciprocal" in table or "k-reciprocal" in table
