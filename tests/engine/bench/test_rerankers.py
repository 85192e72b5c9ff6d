"""The benchmark's pieces on tiny inputs (the real runs are not tests: see README)."""

from __future__ import annotations

import math

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


# -- the revisited protocol on constructed features -----------------------------------------------
# Gallery items a..f (stored in the file as f, e, d, c, b, a: matched to `imlist` by name) and
# queries q0, q1 (stored as q1, q0). Query q0 is e0 and q1 is e1; item j is
# s0[j] e0 + s1[j] e1 + (the rest of a unit norm) e_{2+j}, so its cosine with q0 is s0[j] and
# with q1 s1[j]: q0 ranks a, b, c, d, e, f and q1 ranks e, f, d, c, b, a.
IMLIST = ["a", "b", "c", "d", "e", "f"]
QIMLIST = ["q0", "q1"]
SIMILARITY_Q0 = [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
SIMILARITY_Q1 = [0.1, 0.2, 0.3, 0.4, 0.6, 0.5]
# Chosen so that those rankings are perfect in every setting: easy, then hard, then junk.
PERFECT_GND = [{"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [0, 0, 10, 10]},
               {"easy": [4], "hard": [5, 3], "junk": []}]
# q0 ranks a (easy), b (negative), c (junk), d (hard): a positive below a negative, junk between.
HAND_GND = [{"easy": [0], "hard": [3], "junk": [2]},
            {"easy": [4], "hard": [5], "junk": []}]


def write_revisited_case(folder, gnd: list[dict]) -> dict[str, str]:
    """The gallery and query .npz files and the ground-truth pickle (plain dicts, lists and
    ints, as revisitop writes them) of the constructed case; returns the bench's arguments."""
    import pickle

    dim = 2 + len(IMLIST)
    gallery = np.zeros((len(IMLIST), dim), np.float32)
    for j, (s0, s1) in enumerate(zip(SIMILARITY_Q0, SIMILARITY_Q1, strict=True)):
        gallery[j, :2] = s0, s1
        gallery[j, 2 + j] = np.sqrt(1 - s0 ** 2 - s1 ** 2)
    queries = np.eye(2, dim, dtype=np.float32)
    np.savez(folder / "db.npz", features=gallery[::-1], names=np.array(IMLIST[::-1]))
    np.savez(folder / "q.npz", features=queries[::-1], names=np.array(QIMLIST[::-1]))
    with open(folder / "gnd_tiny.pkl", "wb") as file:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": gnd}, file)
    return {"--features": str(folder / "db.npz"), "--queries": str(folder / "q.npz"),
            "--gnd": str(folder / "gnd_tiny.pkl"), "--cache-dir": str(folder / "cache")}


def revisited_rows(tmp_path, gnd: list[dict], methods: list[str]) -> list[bench.RevisitedRow]:
    """The bench's revisited rows of the constructed case, read the way `main` reads it."""
    from engine.evaluation.revisited import align_revisitop_gnd, load_revisitop_gnd
    from engine.search.features_file import load_features_file

    paths = write_revisited_case(tmp_path, gnd)
    gallery, queries = (load_features_file(paths[flag]) for flag in ("--features", "--queries"))
    aligned = align_revisitop_gnd(load_revisitop_gnd(paths["--gnd"]), gallery.names,
                                  queries.names)
    return bench.run_revisited(gallery.features, queries.features, aligned, methods, None, "cpu")


def test_revisited_perfect_ranking_scores_100_in_every_setting(tmp_path):
    baseline = revisited_rows(tmp_path, PERFECT_GND, [])[0]
    for protocol in ("easy", "medium", "hard"):
        assert baseline.scores.map[protocol] == pytest.approx(100.0)
        assert dict(baseline.scores.mp_at[protocol]) == {1: pytest.approx(100.0),
                                                         5: pytest.approx(100.0),
                                                         10: pytest.approx(100.0)}
    assert dict(baseline.scores.n_excluded) == {"easy": 0, "medium": 0, "hard": 0}


def test_revisited_hand_worked(tmp_path):
    """q0 ranks a, b, c, d, e, f with a easy, d hard, c junk (b, e, f negatives); revisitop's
    trapezoid AP: a positive at 0-based place r with j positives before it adds
    (j/r + (j+1)/(r+1)) / 2 / n_positives (j/r read as 1 at r = 0).

    Easy:   positives {a}, junk {c, d} -> a b e f: a at 0 -> AP 100; mP@k: last positive at
            place 1, so kappa is clipped to 1 -> 100 for k = 1, 5, 10.
    Medium: positives {a, d}, junk {c} -> a b d e f: a at 0 adds (1 + 1)/2/2 = 1/2, d at 2 adds
            (1/2 + 2/3)/2/2 = 7/24 -> AP 19/24 = 79.1667 (without junk removal d would sit at 3).
            mP@1 = 100; mP@5 = mP@10: last positive at place 3, kappa clipped to 3 -> 2/3.
    Hard:   positives {d}, junk {c, a} -> b d e f: d at 1 adds (0/1 + 1/2)/2 = 1/4 -> AP 25;
            mP@1 = 0; mP@5 = mP@10: kappa clipped to 2 -> 1/2.
    q1 ranks e (easy), f (hard), ...: 100 everywhere. Means over the two queries:
    mAP E 100, M (79.1667 + 100)/2 = 89.5833, H (25 + 100)/2 = 62.5; mP@1 E 100, M 100, H 50;
    mP@5 = mP@10: E 100, M (66.667 + 100)/2 = 83.333, H (50 + 100)/2 = 75.
    """
    scores = revisited_rows(tmp_path, HAND_GND, [])[0].scores
    # per-query rows follow the queries file's order: q1, then q0
    np.testing.assert_allclose(scores.per_query_ap["easy"], [100.0, 100.0])
    np.testing.assert_allclose(scores.per_query_ap["medium"], [100.0, 100 * 19 / 24])
    np.testing.assert_allclose(scores.per_query_ap["hard"], [100.0, 25.0])
    assert dict(scores.map) == pytest.approx({"easy": 100.0, "medium": 50 * (19 / 24 + 1),
                                              "hard": 62.5})
    assert dict(scores.mp_at["easy"]) == pytest.approx({1: 100.0, 5: 100.0, 10: 100.0})
    assert dict(scores.mp_at["medium"]) == pytest.approx({1: 100.0, 5: 250 / 3, 10: 250 / 3})
    assert dict(scores.mp_at["hard"]) == pytest.approx({1: 50.0, 5: 75.0, 10: 75.0})


def test_revisited_bench_prints_the_table_for_the_baseline_and_a_method(tmp_path, capsys):
    """`python -m engine.bench --features --queries --gnd`: the whole path, from the files to
    the printed table (the baseline row is the hand-worked case above)."""
    from engine.bench.rerankers import main

    paths = write_revisited_case(tmp_path, HAND_GND)
    argv = [item for pair in paths.items() for item in pair]
    assert main([*argv, "--methods", "gnn:k1=3,k2=2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("revisited gnd_tiny.pkl: 2 queries (q.npz) against 6 items "
                               "(db.npz, d=8)")
    assert lines[2].split(" | ")[1:5] == ["E mAP", "E mP@1", "E mP@5", "E mP@10"]
    baseline = [cell.strip() for cell in lines[4].strip("|").split("|")]
    assert baseline == ["baseline (cosine)", "100.00", "100.00", "100.00", "100.00",
                        "89.58", "100.00", "83.33", "83.33", "62.50", "50.00", "75.00", "75.00",
                        "-", "-"]
    method = [cell.strip() for cell in lines[5].strip("|").split("|")]
    assert method[0] == "gnn:k1=3,k2=2" and len(method) == len(baseline)
    assert all(0.0 <= float(value) <= 100.0 for value in method[1:13])


def test_revisited_bench_refuses_mismatched_names_and_lone_flags(tmp_path):
    from engine.bench.rerankers import main
    from engine.errors import InvalidInputError

    paths = write_revisited_case(tmp_path, HAND_GND)
    np.savez(tmp_path / "q.npz", features=np.eye(2, 8, dtype=np.float32),
             names=np.array(["q0", "q9"]))
    argv = [item for pair in paths.items() for item in pair]
    with pytest.raises(InvalidInputError, match=r"missing from the queries: 'q1'.*'q9'"):
        main([*argv, "--methods", "gnn", "--device", "cpu"])
    with pytest.raises(SystemExit):
        main(["--features", paths["--features"], "--gnd", paths["--gnd"]])


def test_a_method_whose_batch_cannot_run_says_why_in_its_row(monkeypatch) -> None:
    """A batch refused at the collection's size (`Reranker.batch_refusal`) is a row with the
    method's reason and no scores, and the other methods still run."""
    from engine.bench import rerankers as bench
    from engine.bench.measure import synthetic_collection
    from engine.rerank import get_reranker_class

    features, labels = synthetic_collection(60, 16, n_classes=6)
    cls = get_reranker_class("k_reciprocal")
    monkeypatch.setattr(cls, "batch_refusal",
                        lambda self, size, queries: f"about 9 GiB for {size} items")
    rows = bench.run(features, labels, "leave-one-out", ["k_reciprocal", "gnn"], 10, "cpu", 2)
    refused, gnn = rows[1], rows[2]
    assert refused.method.startswith("k_reciprocal: ")
    assert refused.method.endswith("batch mode: about 9 GiB for 60 items")
    assert math.isnan(refused.map) and refused.fit_seconds is not None
    assert gnn.method == "gnn" and 0 < gnn.map <= 1
    assert "about 9 GiB" in bench.format_table(rows, "t")
