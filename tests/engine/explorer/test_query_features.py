"""Query features beside a features gallery (a query/gallery split): checked like the gallery,
kept on the session, ranked by `Explorer.query_from_set`, scored per query by revisited ground
truth (Medium, junk removed) or by labels, and the revisited Compare table, on constructed
features whose answers are worked out by hand."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from engine.bench.rerankers import run_revisited
from engine.errors import InvalidInputError
from engine.evaluation.revisited import (
    REVISITED_TABLE_COLUMNS,
    RevisitedRun,
    revisited_map,
    score_query,
)
from engine.explorer import BASELINE, Explorer
from engine.explorer.explorer import load_query_set
from engine.search.features_file import load_query_features, map_query_labels

DIM = 96
GALLERY = 40
METHODS = ["k_reciprocal"]
# Query A (along axis 0): its baseline order begins a(easy), j(junk), n(negative), h(hard).
A_EASY, A_JUNK, A_NEG, A_HARD = 0, 1, 2, 3
# Query B (along axis 1): easy 4 and 5, hard 6, junk 7, ranked in that order.
B_EASY, B_HARD, B_JUNK = [4, 5], [6], [7]
# Hand-worked (trapezoid AP, junk removed; revisitop's clipped mP@k), in percent:
# A, Medium: [a, n, h, ...] -> (1 + (1/2 + 2/3) / 2) / 2; Easy: [a, ...] -> 100;
# Hard: [n, h, ...] (a is junk) -> (0 + 1/2) / 2.
A_MEDIUM_AP = 100 * (1 + (1 / 2 + 2 / 3) / 2) / 2
A_AP = {"easy": 100.0, "medium": A_MEDIUM_AP, "hard": 25.0}
A_MP = {"easy": {1: 100.0, 5: 100.0, 10: 100.0},
        "medium": {1: 100.0, 5: 200 / 3, 10: 200 / 3},
        "hard": {1: 0.0, 5: 50.0, 10: 50.0}}


def _item(cosine: float, axis: int, residual: int) -> np.ndarray:
    """A unit vector at exactly `cosine` to the unit vector of `axis`."""
    row = np.zeros(DIM)
    row[axis], row[residual] = cosine, np.sqrt(1.0 - cosine ** 2)
    return row


def constructed(tmp_path: Path, *, permute_truth: bool = True) -> tuple[Path, Path, Path]:
    """A gallery of GALLERY items, two queries and their revisited ground truth (its imlist in
    another order than the gallery file, as a real one would be)."""
    rows = [_item(c, 0, 2 + row) for row, c in enumerate((0.95, 0.9, 0.85, 0.8))]
    rows += [_item(c, 1, 6 + row) for row, c in enumerate((0.97, 0.96, 0.9, 0.88))]
    rows += [_item(0.3 - 0.005 * row, 0, 10 + row) for row in range(GALLERY - 8)]
    gallery = np.array(rows, np.float32)
    names = [f"g{row:02d}" for row in range(GALLERY)]
    queries = np.zeros((2, DIM), np.float32)
    queries[0, 0] = queries[1, 1] = 2.0  # not unit: normalised like the gallery's rows
    folder = tmp_path / "allowed"
    folder.mkdir(exist_ok=True)
    np.savez(folder / "db.npz", features=gallery, names=np.array(names))
    np.savez(folder / "queries.npz", features=queries, names=np.array(["qa", "qb"]))
    imlist = names[::-1] if permute_truth else names
    index = {name: position for position, name in enumerate(imlist)}

    def listed(items: list[int]) -> list[int]:
        return [index[names[item]] for item in items]

    truth = {"imlist": imlist, "qimlist": ["qb", "qa"], "gnd": [
        {"easy": listed(B_EASY), "hard": listed(B_HARD), "junk": listed(B_JUNK),
         "bbx": [0.0, 0.0, 1.0, 1.0]},
        {"easy": listed([A_EASY]), "hard": listed([A_HARD]), "junk": listed([A_JUNK]),
         "bbx": [0.0, 0.0, 1.0, 1.0]}]}
    (folder / "gnd_constructed.pkl").write_bytes(pickle.dumps(truth))
    return folder / "db.npz", folder / "queries.npz", folder / "gnd_constructed.pkl"


@pytest.fixture()
def explorer(tmp_path: Path) -> Explorer:
    return Explorer(None, device="cpu", cache_root=tmp_path / "cache",
                    allowed_roots=[tmp_path / "allowed"], methods=METHODS)


# -- the protocol on known rankings -------------------------------------------------------------
def test_a_perfect_ranking_scores_100_in_every_setting() -> None:
    gnd = [{"easy": [3, 1], "hard": [4], "junk": [0]}, {"easy": [], "hard": [2], "junk": [5]}]
    # easy first, then hard, then junk, then the rest: perfect for Easy, Medium and Hard
    indices = np.array([[1, 3, 4, 0, 2, 5], [2, 5, 0, 1, 3, 4]])
    scores = revisited_map(indices, gnd)
    for protocol in ("easy", "medium", "hard"):
        assert scores.map[protocol] == pytest.approx(100.0)
        assert all(value == pytest.approx(100.0) for value in scores.mp_at[protocol].values())
    assert scores.n_excluded["easy"] == 1  # the second query has no easy positive


def test_one_query_with_junk_scores_as_worked_by_hand() -> None:
    entry = {"easy": [A_EASY], "hard": [A_HARD], "junk": [A_JUNK]}
    ranking = np.array([A_EASY, A_JUNK, A_NEG, A_HARD, 9, 8])
    medium = score_query(ranking, entry, "medium", top_n=3)
    assert medium.ap == pytest.approx(A_MEDIUM_AP / 100)
    assert medium.precision == pytest.approx(2 / 3)  # a, n, h once the junk is removed
    assert medium.n_positives == 2
    assert medium.hits.tolist() == [True, False, False, True, False, False]
    assert medium.junk.tolist() == [False, True, False, False, False, False]
    scores = revisited_map(ranking[None, :], [entry])
    for protocol, expected in A_AP.items():
        assert scores.map[protocol] == pytest.approx(expected)
        assert score_query(ranking, entry, protocol).ap == pytest.approx(expected / 100)
        for kappa, value in A_MP[protocol].items():
            assert scores.mp_at[protocol][kappa] == pytest.approx(value)
    with pytest.raises(InvalidInputError, match="protocol"):
        score_query(ranking, entry, "extreme")


def test_a_run_survives_its_json_form() -> None:
    entry = {"easy": [A_EASY], "hard": [A_HARD], "junk": [A_JUNK]}
    scores = revisited_map(np.array([[A_EASY, A_JUNK, A_NEG, A_HARD]]), [entry])
    run = RevisitedRun("k_reciprocal", {"k1": 20}, scores, 0.5)
    back = RevisitedRun.from_dict(run.to_dict())
    assert back.method == run.method and back.params == run.params
    for protocol in A_AP:
        assert back.scores.map[protocol] == pytest.approx(scores.map[protocol])
        assert dict(back.scores.mp_at[protocol]) == pytest.approx(dict(scores.mp_at[protocol]))


# -- the explorer --------------------------------------------------------------------------------
def test_queries_and_ground_truth_open_with_the_gallery_and_score_a_pick(
        explorer: Explorer, tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, queries=queries, ground_truth=truth)
    query_set = session.query_set
    assert query_set is not None and query_set.names == ["qa", "qb"]
    assert query_set.source == "queries.npz" and query_set.ground_truth == truth.name
    np.testing.assert_allclose(np.linalg.norm(query_set.features, axis=1), 1.0, rtol=1e-6)
    # the gnd lists are gallery rows in the queries' order, whatever the file's order
    assert query_set.gnd[0] == {"easy": [A_EASY], "hard": [A_HARD], "junk": [A_JUNK]}
    result = explorer.query_from_set(session.key, "qa", top_n=3)
    baseline = result.rankings[BASELINE]
    assert baseline.indices[:4].tolist() == [A_EASY, A_JUNK, A_NEG, A_HARD]
    assert baseline.ap == pytest.approx(A_MEDIUM_AP / 100)
    assert baseline.precision == pytest.approx(2 / 3)
    assert result.n_positives == 2 and result.source_row is None
    assert set(result.rankings) == {BASELINE, *METHODS}
    assert all(0 <= ranking.ap <= 1 for ranking in result.rankings.values())
    perfect = explorer.query_from_set(session.key, "qb").rankings[BASELINE]
    assert perfect.ap == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match=r"'qz' is not a query of queries\.npz"):
        explorer.query_from_set(session.key, "qz")


def test_the_compare_rows_are_the_revisited_protocol_of_the_bench(explorer: Explorer,
                                                                 tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, queries=queries, ground_truth=truth)
    assert session.revisited(BASELINE, cached_only=True) is None
    headers, rows = session.revisited_rows(compute=True)
    assert headers == list(REVISITED_TABLE_COLUMNS) and len(rows) == 1 + len(METHODS)
    baseline = dict(zip(headers, rows[0], strict=True))
    assert baseline["method"].startswith("Baseline")
    # query A as worked by hand, query B perfect: the means of the two
    assert baseline["E mAP"] == pytest.approx(100.0)
    assert baseline["M mAP"] == pytest.approx(round((A_MEDIUM_AP + 100) / 2, 2))
    assert baseline["H mAP"] == pytest.approx(62.5)
    assert baseline["M mP@5"] == pytest.approx(round((200 / 3 + 100) / 2, 2))
    assert baseline["H mP@1"] == pytest.approx(50.0)
    # each method's paired difference from the baseline (two queries: every flip enumerated)
    assert baseline["M mAP - baseline"] is None and baseline["H p (Holm)"] is None
    for row in rows[1:]:
        named = dict(zip(headers, row, strict=True))
        for setting in ("M", "H"):
            assert named[f"{setting} mAP - baseline"] == pytest.approx(
                named[f"{setting} mAP"] - baseline[f"{setting} mAP"], abs=0.011)
            assert 0 < named[f"{setting} p (Holm)"] <= 1
    # the very numbers `python -m engine.bench --queries --gnd` prints
    params = session.params_for("k_reciprocal")[0]
    spec = "k_reciprocal:" + ",".join(f"{name}={value}" for name, value in params.items())
    bench = run_revisited(session.gallery.features, session.query_set.features,
                          session.query_set.gnd, [spec], None, "cpu")
    for method, row in zip([BASELINE, "k_reciprocal"], bench, strict=True):
        mine = session.revisited(method, cached_only=True)
        assert mine is not None
        for protocol in ("easy", "medium", "hard"):
            assert mine.scores.map[protocol] == pytest.approx(row.scores.map[protocol])
            assert dict(mine.scores.mp_at[protocol]) == pytest.approx(
                dict(row.scores.mp_at[protocol]))
    # cached on disk: a new session of the same files reads them without ranking again
    again = Explorer(None, device="cpu", cache_root=explorer.cache_root,
                     allowed_roots=explorer.allowed_roots, methods=METHODS)
    reopened = again.open_features(db, queries=queries, ground_truth=truth)
    assert reopened.revisited_rows()[1] == rows


def test_queued_revisited_runs_fill_the_table_in_the_background(tmp_path: Path) -> None:
    from engine.core.jobs import JobQueue

    db, queries, truth = constructed(tmp_path)
    queued = Explorer(None, device="cpu", cache_root=tmp_path / "cache",
                      allowed_roots=[tmp_path / "allowed"], methods=METHODS, jobs=JobQueue())
    session = queued.open_features(db, queries=queries, ground_truth=truth)
    assert session.revisited_rows()[1] == []
    titles = [job.title for job in queued.jobs.jobs()]
    assert "Baseline (faiss, cosine) revisited scores" in titles
    queued.jobs.run_pending()
    assert [job.error for job in queued.jobs.jobs() if job.state == "failed"] == []
    assert len(session.revisited_rows()[1]) == 1 + len(METHODS)


def test_labelled_queries_are_scored_by_class(explorer: Explorer, tmp_path: Path) -> None:
    folder = tmp_path / "allowed"
    folder.mkdir()
    gallery = np.array([_item(0.99 - 0.01 * row, row // 5, 10 + row) for row in range(15)],
                       np.float32)
    np.savez(folder / "db.npz", features=gallery, labels=np.repeat(np.arange(3), 5),
             class_names=np.array(["a", "b", "c"]))
    query = np.zeros((2, DIM), np.float32)
    query[0, 1] = query[1, 2] = 1.0
    # the query file names its classes in another order: labels are matched by name
    np.savez(folder / "q.npz", features=query, labels=np.array([0, 1]),
             class_names=np.array(["b", "zebra"]), names=np.array(["near-b", "odd"]))
    session = explorer.open_features(folder / "db.npz", queries=folder / "q.npz")
    assert session.query_set.labels.tolist() == [1, -1] and session.query_set.gnd is None
    result = explorer.query_from_set(session.key, "near-b", top_n=5)
    assert result.query_class == "b" and result.n_positives == 5
    assert result.rankings[BASELINE].ap == pytest.approx(1.0)
    unscored = explorer.query_from_set(session.key, "odd")
    assert unscored.rankings[BASELINE].ap is None
    with pytest.raises(InvalidInputError, match="revisited ground truth"):
        session.revisited_rows()


def test_query_labels_map_by_name_or_by_number() -> None:
    labels = np.array([0, 1, -1, 2])
    assert map_query_labels(labels, ["x", "y", "z"], ["z", "y", "x"], "q").tolist() == [
        2, 1, -1, 0]
    assert map_query_labels(labels, ["0", "1", "2"], ["a", "b", "c"], "q").tolist() == [
        0, 1, -1, 2]
    assert map_query_labels(labels, ["0", "1", "2"], ["a"], "q").tolist() == [0, -1, -1, -1]
    assert map_query_labels(labels, ["0", "1", "2"], [], "q") is None
    assert map_query_labels(None, [], ["a"], "q") is None


# -- bad input: clear errors, nothing built lost ----------------------------------------------
def test_a_query_file_of_another_dimension_is_refused_and_the_gallery_kept(
        explorer: Explorer, tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db, queries=queries, ground_truth=truth)
    kept = session.query_set
    wrong = tmp_path / "allowed" / "wide.npy"
    np.save(wrong, np.eye(2, DIM + 4, dtype=np.float32))
    with pytest.raises(InvalidInputError, match=rf"wide.npy have {DIM + 4} dimensions but "
                                                rf"the gallery db.npz has {DIM}"):
        explorer.open_features(db, queries=wrong)
    assert explorer.session(session.key) is session and session.query_set is kept
    nan = tmp_path / "allowed" / "nan.npy"
    rows = np.eye(3, DIM, dtype=np.float32)
    rows[1, 0] = np.nan
    np.save(nan, rows)
    with pytest.raises(InvalidInputError, match=r"1 row with NaN or infinite values .*row 1"):
        explorer.open_features(db, queries=nan)
    assert session.query_set is kept
    with pytest.raises(InvalidInputError, match="not unit-norm"):
        load_query_features(queries, dim=DIM, class_names=[], normalize="refuse")
    with pytest.raises(InvalidInputError, match="Euclidean"):
        load_query_features(queries, dim=DIM, class_names=[], metric="euclidean")


def test_ground_truth_for_another_query_set_is_refused_and_the_gallery_kept(
        explorer: Explorer, tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db)
    three = tmp_path / "allowed" / "three.npz"
    np.savez(three, features=np.eye(3, DIM, dtype=np.float32),
             names=np.array(["qa", "qb", "qc"]))
    with pytest.raises(InvalidInputError, match=r"gnd_constructed.pkl has 2 queries "
                                                r"\('qimlist'\) but 3 were given"):
        explorer.open_features(db, queries=three, ground_truth=truth)
    assert explorer.session(session.key) is session and session.query_set is None
    renamed = tmp_path / "allowed" / "renamed.npz"
    np.savez(renamed, features=np.eye(2, DIM, dtype=np.float32), names=np.array(["qa", "qx"]))
    with pytest.raises(InvalidInputError, match="1 item missing from the queries: 'qb'"):
        explorer.open_features(db, queries=renamed, ground_truth=truth)
    with pytest.raises(InvalidInputError, match="needs query features"):
        explorer.open_features(db, ground_truth=truth)
    # a fresh explorer: the refused query set leaves the gallery's cache ready to reuse
    other = Explorer(None, device="cpu", cache_root=explorer.cache_root,
                     allowed_roots=explorer.allowed_roots, methods=METHODS)
    with pytest.raises(InvalidInputError, match="has 2 queries"):
        other.open_features(db, queries=three, ground_truth=truth)
    assert other.galleries == {}
    assert other.open_features(db, queries=queries, ground_truth=truth).query_set is not None


def test_a_folder_gallery_takes_no_query_features(tmp_path: Path) -> None:
    from types import SimpleNamespace

    with pytest.raises(InvalidInputError, match="gallery opened from a features file"):
        load_query_set(SimpleNamespace(source=None), tmp_path / "q.npz")


# -- query features attached to a gallery already open ------------------------------------------
def test_queries_attach_to_an_open_gallery_and_junk_is_flagged(explorer: Explorer,
                                                               tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.open_features(db)
    assert session.query_set is None
    with pytest.raises(InvalidInputError, match="has no query features; attach"):
        explorer.query_from_set(session.key, "qa")
    assert explorer.attach_queries(session.key, queries, truth) is session
    assert session.query_set.names == ["qa", "qb"] and session.revisited_ready
    result = explorer.query_from_set(session.key, "qa", top_n=3)
    assert result.query_set_name == "qa"
    baseline = result.rankings[BASELINE]
    # [a, j, n, h, ...]: the junk is flagged apart from the misses, and left out of the AP
    assert baseline.indices[:4].tolist() == [A_EASY, A_JUNK, A_NEG, A_HARD]
    assert baseline.relevant[:4].tolist() == [True, False, False, True]
    assert baseline.junk[:4].tolist() == [False, True, False, False]
    assert int(baseline.junk.sum()) == 1
    assert baseline.ap == pytest.approx(A_MEDIUM_AP / 100)
    assert baseline.precision == pytest.approx(2 / 3)
    for ranking in result.rankings.values():
        assert ranking.junk is not None and ranking.junk.shape == ranking.relevant.shape
        assert not (ranking.junk & ranking.relevant).any()
    # re-ranking one method keeps it scored by the ground truth, junk flagged
    reranked = explorer.rerank(result, "k_reciprocal", {"k1": 5, "k2": 2})
    assert reranked.rankings["k_reciprocal"].junk is not None
    assert reranked.query_set_name == "qa"
    # a query by class (no ground truth) has no junk
    plain = explorer.open_features(db, queries=queries)
    assert explorer.query_from_set(plain.key, "qa").rankings[BASELINE].junk is None


def test_a_bad_attachment_is_refused_and_the_query_set_kept(explorer: Explorer,
                                                            tmp_path: Path) -> None:
    db, queries, truth = constructed(tmp_path)
    session = explorer.attach_queries(explorer.open_features(db).key, queries, truth)
    kept, cache = session.query_set, session._revisited_cache
    wrong = tmp_path / "allowed" / "wide.npy"
    np.save(wrong, np.eye(2, DIM + 4, dtype=np.float32))
    with pytest.raises(InvalidInputError, match=rf"wide.npy have {DIM + 4} dimensions"):
        explorer.attach_queries(session.key, wrong)
    three = tmp_path / "allowed" / "three.npz"
    np.savez(three, features=np.eye(3, DIM, dtype=np.float32),
             names=np.array(["qa", "qb", "qc"]))
    with pytest.raises(InvalidInputError, match=r"has 2 queries \('qimlist'\) but 3"):
        explorer.attach_queries(session.key, three, truth)
    assert session.query_set is kept and session._revisited_cache is cache
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    np.savez(outside / "q.npz", features=np.eye(2, DIM, dtype=np.float32))
    with pytest.raises(InvalidInputError):
        explorer.attach_queries(session.key, outside / "q.npz")
    assert session.query_set is kept
    # the page's uploads are kept copies: opened without the allowed-folder check
    attached = explorer.attach_queries(session.key, outside / "q.npz", check_allowed=False)
    assert len(attached.query_set.names) == 2 and attached.query_set.source == "q.npz"
    assert not attached.revisited_ready


def test_an_image_gallery_takes_no_attached_queries(explorer: Explorer, tmp_path: Path) -> None:
    from types import SimpleNamespace

    _, queries, _ = constructed(tmp_path)
    explorer.galleries["photos"] = SimpleNamespace(  # type: ignore[assignment]
        gallery=SimpleNamespace(source=None), title="Photos")
    with pytest.raises(InvalidInputError, match="Photos was opened from images"):
        explorer.attach_queries("photos", queries)


def test_uploads_are_kept_by_kind_and_suffix(explorer: Explorer, tmp_path: Path) -> None:
    _, queries, truth = constructed(tmp_path)
    kept_queries, kept_truth = explorer.keep_queries_upload(queries, truth)
    assert kept_queries.parent.parent == explorer.upload_root / "queries"
    assert kept_truth is not None and kept_truth.parent.parent == (
        explorer.upload_root / "ground-truth")
    assert kept_truth.name == truth.name and kept_truth.read_bytes() == truth.read_bytes()
    assert explorer.keep_queries_upload(queries) == (kept_queries, None)  # reused, no truth
    with pytest.raises(InvalidInputError, match=r"ground-truth file notes\.txt is gone"):
        explorer.keep_queries_upload(queries, tmp_path / "allowed" / "notes.txt")
    (tmp_path / "allowed" / "notes.txt").write_text("not a pickle")
    with pytest.raises(InvalidInputError, match=r"notes.txt: a ground-truth file must be one "
                                                r"of \.pkl"):
        explorer.keep_queries_upload(queries, tmp_path / "allowed" / "notes.txt")
    with pytest.raises(InvalidInputError, match="query features file must be one of"):
        explorer.keep_queries_upload(truth)


def test_another_query_set_attached_is_scored_in_the_background(tmp_path: Path) -> None:
    from engine.core.jobs import JobQueue

    db, queries, truth = constructed(tmp_path)
    queued = Explorer(None, device="cpu", cache_root=tmp_path / "cache",
                      allowed_roots=[tmp_path / "allowed"], methods=METHODS, jobs=JobQueue())
    session = queued.open_features(db, queries=queries, ground_truth=truth)
    queued.jobs.run_pending()
    first = session.revisited_rows()[1]
    assert len(first) == 1 + len(METHODS)
    # the same queries with a ground truth file listing the gallery in its own order: another
    # query set (its fingerprint), so its runs are queued again rather than found done
    other = tmp_path / "other"
    other.mkdir()
    _, _, reordered = constructed(other, permute_truth=False)
    queued.attach_queries(session.key, queries, reordered, check_allowed=False)
    assert session.revisited_rows()[1] == []
    queued.jobs.run_pending()
    headers, again = session.revisited_rows()
    timed = headers.index("batch s")  # how long each run took differs between runs
    assert [row[:timed] + row[timed + 1:] for row in again] == [
        row[:timed] + row[timed + 1:] for row in first]  # the same answers, scored anew
    assert all(row[timed] >= 0 for row in again)
