"""engine.evaluation.metrics and .revisited: hand-worked cases, plain-loop oracles and the real
revisitop ground truth."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.evaluation.metrics import (
    average_precision,
    cmc,
    evaluate,
    mean_average_precision,
    precision_at_k,
    recall_at_k,
    relevance_from_labels,
    relevance_from_lists,
)
from engine.evaluation.revisited import REVISITED_PROTOCOLS, load_revisitop_gnd, revisited_map

# In CI the datasets sit beside the checkout: <repo>/../shared/datasets/revisitop.
REVISITOP_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "datasets" / "revisitop"
GND_FILES = ("gnd_roxford5k.pkl", "gnd_rparis6k.pkl")


# -- plain-loop oracles (the papers' formulas, one query and one position at a time) -------------
def loop_step_ap(relevant: list[bool], n_positives: int) -> float:
    if n_positives == 0:
        return float("nan")
    found, total = 0, 0.0
    for position, hit in enumerate(relevant):
        if hit:
            found += 1
            total += found / (position + 1)
    return total / n_positives


def loop_trapezoid_ap(ranks: list[int], n_positives: int) -> float:
    """cirtorch/revisitop compute_ap: ranks are the sorted 0-based positions of the positives."""
    if n_positives == 0:
        return float("nan")
    ap, recall_step = 0.0, 1.0 / n_positives
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def loop_compute_map(ranking: np.ndarray, ok: list[list[int]], junk: list[list[int]],
                     kappas: tuple[int, ...]) -> tuple[float, np.ndarray, np.ndarray]:
    """revisitop compute_map, one query at a time, on a (Q, n) ranking (revisitop's is (n, Q))."""
    aps = np.full(len(ok), np.nan)
    prs = np.full((len(ok), len(kappas)), np.nan)
    for i, (positives, ignored) in enumerate(zip(ok, junk, strict=True)):
        if not positives:
            continue
        row, positive_set, junk_set = ranking[i].tolist(), set(positives), set(ignored)
        pos = [p for p, item in enumerate(row) if item in positive_set]
        junk_pos = [p for p, item in enumerate(row) if item in junk_set]
        shifted, n_junk_before = [], 0
        for p in pos:  # decrease each position by the number of junk items before it
            while n_junk_before < len(junk_pos) and junk_pos[n_junk_before] < p:
                n_junk_before += 1
            shifted.append(p - n_junk_before)
        aps[i] = loop_trapezoid_ap(shifted, len(positives))
        one_based = [p + 1 for p in shifted]
        for j, kappa in enumerate(kappas):
            kq = min(max(one_based), kappa)
            prs[i, j] = sum(1 for p in one_based if p <= kq) / kq
    return float(np.nanmean(aps)), aps, np.nanmean(prs, axis=0)


def protocol_lists(gnd: list[dict], protocol: str) -> tuple[list[list[int]], list[list[int]]]:
    if protocol == "easy":
        return [g["easy"] for g in gnd], [g["junk"] + g["hard"] for g in gnd]
    if protocol == "medium":
        return [g["easy"] + g["hard"] for g in gnd], [g["junk"] for g in gnd]
    return [g["hard"] for g in gnd], [g["junk"] + g["easy"] for g in gnd]


# -- average precision, hand-worked ----------------------------------------------------------
def test_step_ap_hand_worked():
    # Positives at ranks 1 and 3: precisions 1/1 and 2/3.
    # Both positives ranked: AP = (1 + 2/3) / 2 = 5/6.
    assert average_precision([True, False, True, False], 2) == pytest.approx(5 / 6)
    # A third positive never retrieved counts as zero: AP = (1 + 2/3) / 3 = 5/9.
    assert average_precision([True, False, True, False], 3) == pytest.approx(5 / 9)
    # Single positive at rank 2: AP = (1/2) / 1 = 0.5.
    assert average_precision([False, True], 1) == pytest.approx(0.5)


def test_trapezoid_ap_hand_worked():
    # Positives at 0-based ranks 0 and 2, n = 2, recall step 1/2.
    #   j=0, rank=0: p0 = 1,   p1 = 1/1 = 1   -> (1 + 1)     * 1/2 / 2 = 1/2
    #   j=1, rank=2: p0 = 1/2, p1 = 2/3       -> (1/2 + 2/3) * 1/2 / 2 = 7/24
    # AP = 12/24 + 7/24 = 19/24.
    assert average_precision([True, False, True], 2, mode="trapezoid") == pytest.approx(19 / 24)
    # Single positive at rank 1: p0 = 0/1 = 0, p1 = 1/2 -> (0 + 1/2) * 1 / 2 = 1/4
    # (the step form gives 1/2).
    assert average_precision([False, True], 1, mode="trapezoid") == pytest.approx(0.25)
    # A perfect ranking scores 1 in both forms.
    assert average_precision([True, True, False], 2, mode="trapezoid") == pytest.approx(1.0)


def test_ap_batched_rows_and_nan_for_no_positives():
    relevant = np.array([[True, False, True], [False, False, False], [False, True, False]])
    scores = average_precision(relevant, [2, 0, 1])
    # Row 0: (1 + 2/3)/2 = 5/6; row 1: no positives -> NaN; row 2: (1/2)/1 = 1/2.
    np.testing.assert_allclose(scores, [5 / 6, np.nan, 0.5])
    assert scores.shape == (3,) and scores.dtype == np.float64


@pytest.mark.parametrize("bad", [
    {"ranked_relevant": [True, True], "n_positives": 1},          # fewer than already ranked
    {"ranked_relevant": [True], "n_positives": -1},
    {"ranked_relevant": [True], "n_positives": 1.5},
    {"ranked_relevant": [True], "n_positives": 1, "mode": "11-point"},
    {"ranked_relevant": [0.5, 1.0], "n_positives": 2},
    {"ranked_relevant": [[True]], "n_positives": [1, 1]},
])
def test_average_precision_rejects_bad_input(bad):
    with pytest.raises(InvalidInputError):
        average_precision(**bad)


# -- precision, recall, CMC, hand-worked -------------------------------------------------------
RELEVANT = np.array([[True, False, True, False],
                     [False, False, False, True]])


def test_precision_at_k_hand_worked():
    np.testing.assert_allclose(precision_at_k(RELEVANT, 1), [1.0, 0.0])
    np.testing.assert_allclose(precision_at_k(RELEVANT, 2), [0.5, 0.0])    # 1/2, 0/2
    np.testing.assert_allclose(precision_at_k(RELEVANT, 4), [0.5, 0.25])   # 2/4, 1/4


def test_recall_at_k_hand_worked():
    # Query 0 has 3 positives (one unranked), query 1 has 1, query 2 none.
    relevant = np.vstack([RELEVANT, np.zeros((1, 4), dtype=bool)])
    np.testing.assert_allclose(recall_at_k(relevant, 2, [3, 1, 0]), [1 / 3, 0.0, np.nan])
    np.testing.assert_allclose(recall_at_k(relevant, 4, [3, 1, 0]), [2 / 3, 1.0, np.nan])


def test_cmc_hand_worked():
    # First positives at rank 1 and rank 4 -> the curve is 1/2 until rank 4, then 2/2.
    np.testing.assert_allclose(cmc(RELEVANT), [0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(cmc(RELEVANT, k=2), [0.5, 0.5])
    # A query without positives is left out when n_positives says so.
    relevant = np.vstack([RELEVANT, np.zeros((1, 4), dtype=bool)])
    np.testing.assert_allclose(cmc(relevant), [1 / 3, 1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(cmc(relevant, n_positives=[2, 1, 0]), [0.5, 0.5, 0.5, 1.0])
    assert np.isnan(cmc(relevant[2:], n_positives=[0])).all()


def test_k_beyond_ranking_is_an_error():
    with pytest.raises(InvalidInputError, match="exceeds the ranking length"):
        precision_at_k(RELEVANT, 5)
    with pytest.raises(InvalidInputError):
        recall_at_k(RELEVANT, 0, [1, 1])


# -- label-based evaluation --------------------------------------------------------------------
GALLERY_LABELS = np.array([0, 0, 1, 1, 2])
QUERY_LABELS = np.array([0, 1, 3])
INDICES = np.array([[0, 2, 1],
                    [4, 2, 0],
                    [0, 1, 2]])


def test_evaluate_hand_worked_with_excluded_query():
    scores = evaluate(INDICES, QUERY_LABELS, GALLERY_LABELS, ks=(1, 3))
    # q0 (label 0, 2 positives): relevant [1, 0, 1] -> AP = (1 + 2/3)/2 = 5/6.
    # q1 (label 1, 2 positives): relevant [0, 1, 0] -> AP = (1/2)/2 = 1/4.
    # q2 (label 3, none in the gallery): NaN, excluded.
    np.testing.assert_allclose(scores.per_query_ap, [5 / 6, 1 / 4, np.nan])
    assert scores.map == pytest.approx((5 / 6 + 1 / 4) / 2)  # 13/24
    assert scores.n_queries == 3 and scores.n_excluded == 1
    # P@1 = (1 + 0)/2, P@3 = (2/3 + 1/3)/2; R@1 = (1/2 + 0)/2, R@3 = (2/2 + 1/2)/2.
    assert scores.precision_at == {1: pytest.approx(0.5), 3: pytest.approx(0.5)}
    assert scores.recall_at == {1: pytest.approx(0.25), 3: pytest.approx(0.75)}
    np.testing.assert_allclose(scores.cmc, [0.5, 1.0, 1.0])
    assert not scores.per_query_ap.flags.writeable


def test_mean_average_precision_matches_evaluate_and_counts_exclusions():
    result = mean_average_precision(INDICES, QUERY_LABELS, GALLERY_LABELS)
    assert result.value == pytest.approx(13 / 24)
    assert result.n_excluded == 1
    np.testing.assert_allclose(result.per_query, [5 / 6, 1 / 4, np.nan])


def test_n_positives_override_for_truncated_or_leave_one_out_rankings():
    # Say q0 has 3 relevant items (e.g. a class of 4 scored leave-one-out, one not returned):
    # AP = (1 + 2/3)/3 = 5/9; q1 keeps 2; q2 declared as 0 stays excluded.
    result = mean_average_precision(INDICES, QUERY_LABELS, GALLERY_LABELS,
                                    n_positives=[3, 2, 0])
    np.testing.assert_allclose(result.per_query, [5 / 9, 1 / 4, np.nan])
    with pytest.raises(InvalidInputError, match="smaller than"):
        mean_average_precision(INDICES, QUERY_LABELS, GALLERY_LABELS, n_positives=[1, 2, 0])


def test_all_queries_without_positives_give_nan():
    scores = evaluate(INDICES[2:], QUERY_LABELS[2:], GALLERY_LABELS, ks=(1,))
    assert np.isnan(scores.map) and np.isnan(scores.precision_at[1])
    assert scores.n_excluded == 1


def test_string_labels():
    gallery = np.array(["a", "a", "b", "b", "c"])
    scores = evaluate(INDICES[:2], ["a", "b"], gallery, ks=(1,))
    assert scores.map == pytest.approx(13 / 24)


@pytest.mark.parametrize("indices, query_labels, gallery_labels, match", [
    (np.array([[0, 5, 1]]), [0], GALLERY_LABELS, "only 5 items"),
    (np.array([[0, -1, 1]]), [0], GALLERY_LABELS, "-1"),
    (np.array([[0, 0, 1]]), [0], GALLERY_LABELS, "repeat"),
    (np.array([[0.0, 1.0]]), [0], GALLERY_LABELS, "integers"),
    (np.array([0, 1]), [0], GALLERY_LABELS, "2-D"),
    (INDICES, [0, 1], GALLERY_LABELS, "rows"),
    (INDICES[:1], ["a"], GALLERY_LABELS, "different kinds"),
])
def test_evaluate_rejects_bad_input(indices, query_labels, gallery_labels, match):
    with pytest.raises(InvalidInputError, match=match):
        evaluate(indices, query_labels, gallery_labels, ks=(1,))


def test_evaluate_rejects_ks_beyond_ranking():
    with pytest.raises(InvalidInputError, match="retrieve at least 5"):
        evaluate(INDICES, QUERY_LABELS, GALLERY_LABELS)


# -- vectorised against plain loops --------------------------------------------------------------
@pytest.mark.parametrize("truncate", [False, True])
def test_vectorised_matches_plain_loops_on_random_rankings(truncate):
    rng = np.random.default_rng(7)
    n_queries, n_gallery = 60, 40
    k = 15 if truncate else n_gallery
    gallery_labels = rng.integers(0, 6, n_gallery)
    query_labels = rng.integers(0, 7, n_queries)  # label 6 has no gallery items
    indices = np.stack([rng.permutation(n_gallery)[:k] for _ in range(n_queries)])
    ks = (1, 5, 10)

    scores = evaluate(indices, query_labels, gallery_labels, ks=ks)
    trapezoid = mean_average_precision(indices, query_labels, gallery_labels, mode="trapezoid")

    step_aps, trap_aps, precision, recall, first_hit = [], [], {k: [] for k in ks}, \
        {k: [] for k in ks}, []
    for q in range(n_queries):
        relevant = [bool(gallery_labels[j] == query_labels[q]) for j in indices[q]]
        n_pos = int(sum(gallery_labels == query_labels[q]))
        step_aps.append(loop_step_ap(relevant, n_pos))
        trap_aps.append(loop_trapezoid_ap([r for r, hit in enumerate(relevant) if hit], n_pos))
        if n_pos == 0:
            continue
        for cut in ks:
            precision[cut].append(sum(relevant[:cut]) / cut)
            recall[cut].append(sum(relevant[:cut]) / n_pos)
        first_hit.append(relevant.index(True) + 1 if any(relevant) else None)

    np.testing.assert_allclose(scores.per_query_ap, step_aps, rtol=1e-12)
    np.testing.assert_allclose(trapezoid.per_query, trap_aps, rtol=1e-12)
    assert scores.map == pytest.approx(np.nanmean(step_aps), rel=1e-12)
    assert scores.n_excluded == int(np.isnan(step_aps).sum()) > 0
    for cut in ks:
        assert scores.precision_at[cut] == pytest.approx(np.mean(precision[cut]), rel=1e-12)
        assert scores.recall_at[cut] == pytest.approx(np.mean(recall[cut]), rel=1e-12)
    curve = [np.mean([h is not None and h <= r for h in first_hit]) for r in range(1, k + 1)]
    np.testing.assert_allclose(scores.cmc, curve, rtol=1e-12)


# -- explicit positives and junk -----------------------------------------------------------------
def test_relevance_from_lists_removes_junk_and_shifts_up():
    indices = np.array([[5, 1, 2, 3], [0, 1, 2, 3]])
    relevant = relevance_from_lists(indices, positives=[[2], [3, 0]], junk=[[5], [1, 2]])
    # Row 0: drop 5 -> [1, 2, 3] + padding -> positive 2 now at place 1.
    # Row 1: drop 1, 2 -> [0, 3] + padding -> both positives at places 0, 1.
    np.testing.assert_array_equal(relevant, [[False, True, False, False],
                                             [True, True, False, False]])
    labels_like = relevance_from_lists(indices, positives=[[2], [3, 0]])
    np.testing.assert_array_equal(labels_like, [[False, False, True, False],
                                                [True, False, False, True]])
    with pytest.raises(InvalidInputError, match="positive and as junk"):
        relevance_from_lists(indices, positives=[[2], [3]], junk=[[2], []])


def test_relevance_from_labels_shape_and_dtype():
    relevant = relevance_from_labels(INDICES, QUERY_LABELS, GALLERY_LABELS)
    assert relevant.shape == INDICES.shape and relevant.dtype == np.bool_


# -- revisited protocol on a tiny hand-worked ground truth -----------------------------------------
TINY_GND = [
    {"easy": [0], "hard": [1], "junk": [2]},
    {"easy": [3], "hard": [], "junk": []},   # no hard positives: excluded from H
]
TINY_INDICES = np.array([[2, 1, 3, 0, 4, 5],
                         [3, 0, 1, 2, 4, 5]])


def test_revisited_map_hand_worked():
    scores = revisited_map(TINY_INDICES, TINY_GND, kappas=(1, 5))
    # Query 0, ranking [2, 1, 3, 0, 4, 5]:
    #   E: positives {0}, junk {2, 1} -> [3, 0, 4, 5]: positive at rank 1 (0-based)
    #      AP = (0/1 + 1/2)/2 = 1/4. mP@1: last positive at 2 (1-based), kq = min(2, 1) = 1,
    #      0 hits -> 0. mP@5: kq = min(2, 5) = 2 -> 1/2.
    #   M: positives {0, 1}, junk {2} -> [1, 3, 0, 4, 5]: positives at ranks 0, 2
    #      AP = 19/24 (as in test_trapezoid_ap_hand_worked). mP@1 = 1/1. mP@5: kq = 3 -> 2/3.
    #   H: positives {1}, junk {2, 0} -> [1, 3, 4, 5]: rank 0 -> AP = 1, mP@1 = mP@5 = 1.
    # Query 1, ranking [3, 0, ...]: E and M positives {3} at rank 0 -> 1; H has no positives.
    np.testing.assert_allclose(scores.per_query_ap["easy"], [25.0, 100.0])
    np.testing.assert_allclose(scores.per_query_ap["medium"], [100 * 19 / 24, 100.0])
    np.testing.assert_allclose(scores.per_query_ap["hard"], [100.0, np.nan])
    assert scores.map["easy"] == pytest.approx((25 + 100) / 2)
    assert scores.map["medium"] == pytest.approx((100 * 19 / 24 + 100) / 2)
    assert scores.map["hard"] == pytest.approx(100.0)
    assert scores.mp_at["easy"] == {1: pytest.approx(50.0), 5: pytest.approx(75.0)}
    assert scores.mp_at["medium"] == {1: pytest.approx(100.0), 5: pytest.approx(100 * 5 / 6)}
    assert scores.mp_at["hard"] == {1: pytest.approx(100.0), 5: pytest.approx(100.0)}
    assert dict(scores.n_excluded) == {"easy": 0, "medium": 0, "hard": 1}
    assert scores.n_queries == 2


def test_revisited_map_rejects_bad_gnd():
    with pytest.raises(InvalidInputError, match="queries"):
        revisited_map(TINY_INDICES, TINY_GND[:1])
    with pytest.raises(InvalidInputError, match="keys"):
        revisited_map(TINY_INDICES[:1], [{"easy": [0], "junk": []}])
    with pytest.raises(InvalidInputError, match="kappas"):
        revisited_map(TINY_INDICES, TINY_GND, kappas=(0,))


# -- revisited protocol on the real Oxford/Paris ground truth ------------------------------------
@pytest.fixture(scope="module", params=GND_FILES)
def revisitop(request):
    path = REVISITOP_DIR / request.param
    if not path.is_file():
        pytest.skip(f"revisitop ground truth not found at {path.resolve()} "
                    "(expected <repo>/../shared/datasets/revisitop)")
    return request.param, load_revisitop_gnd(path)


def perfect_ranking(gnd: list[dict], n_gallery: int) -> np.ndarray:
    """Easy, then hard, then junk, then the rest: perfect under all three protocols at once."""
    rows = []
    for entry in gnd:
        head = entry["easy"] + entry["hard"] + entry["junk"]
        rest = np.setdiff1d(np.arange(n_gallery), head)
        rows.append(np.concatenate([np.array(head, dtype=np.int64), rest]))
    return np.stack(rows)


def test_real_ground_truth_loads_with_expected_shape(revisitop):
    name, data = revisitop
    assert len(data["qimlist"]) == len(data["gnd"]) == 70
    assert len(data["imlist"]) == {"gnd_roxford5k.pkl": 4993, "gnd_rparis6k.pkl": 6322}[name]


def test_real_perfect_ranking_scores_100(revisitop):
    name, data = revisitop
    scores = revisited_map(perfect_ranking(data["gnd"], len(data["imlist"])), data["gnd"])
    for protocol in REVISITED_PROTOCOLS:
        assert scores.map[protocol] == pytest.approx(100.0)
        for kappa in (1, 5, 10):
            assert scores.mp_at[protocol][kappa] == pytest.approx(100.0)
    # rOxford5k has two queries (11 and 66) with no easy positives; they drop out of E only.
    expected = {"gnd_roxford5k.pkl": 2, "gnd_rparis6k.pkl": 0}[name]
    assert dict(scores.n_excluded) == {"easy": expected, "medium": 0, "hard": 0}
    assert int(np.isnan(scores.per_query_ap["easy"]).sum()) == expected


def test_real_moved_positive_hand_worked():
    path = REVISITOP_DIR / "gnd_roxford5k.pkl"
    if not path.is_file():
        pytest.skip(f"revisitop ground truth not found at {path.resolve()}")
    data = load_revisitop_gnd(path)
    gnd, n_gallery = data["gnd"], len(data["imlist"])
    ranking = perfect_ranking(gnd, n_gallery)
    first_easy = gnd[0]["easy"][0]
    row = ranking[0].tolist()
    row.remove(first_easy)
    ranking[0] = [*row, first_easy]  # first easy positive of query 0 moved to the very end
    scores = revisited_map(ranking, gnd)

    # Query 0 of rOxford5k: 65 easy, 38 hard, 33 junk, 4993 database images.
    assert (len(gnd[0]["easy"]), len(gnd[0]["hard"]), len(gnd[0]["junk"])) == (65, 38, 33)
    # Medium: n = 65 + 38 = 103 positives; the 33 junk are removed, leaving L = 4960 places.
    # The first 102 positives sit at ranks 0..101, each adding (1 + 1)/2 * 1/103 -> 102/103.
    # The moved one is last, rank L - 1 = 4959, with j = 102 before it:
    #   p0 = 102/4959, p1 = 103/4960, adding (p0 + p1)/2 * 1/103.
    # AP_M = 102/103 + (102/4959 + 103/4960)/206
    #      = 0.990291262 + (0.020568663 + 0.020766129)/206 = 0.990491916.
    ap_medium = 102 / 103 + (102 / 4959 + 103 / 4960) / 206
    assert ap_medium == pytest.approx(0.9904919165, abs=1e-9)
    # Easy: n = 65; junk = 33 junk + 38 hard, leaving L = 4993 - 71 = 4922 places; the moved
    # positive is last (rank 4921) with 64 before it:
    # AP_E = 64/65 + (64/4921 + 65/4922)/130 = 0.984615385 + 0.026211501/130 = 0.984817012.
    ap_easy = 64 / 65 + (64 / 4921 + 65 / 4922) / 130
    assert ap_easy == pytest.approx(0.9848170115, abs=1e-9)

    assert scores.per_query_ap["medium"][0] / 100 == pytest.approx(ap_medium, abs=1e-6)
    assert scores.per_query_ap["easy"][0] / 100 == pytest.approx(ap_easy, abs=1e-6)
    assert scores.per_query_ap["hard"][0] == pytest.approx(100.0)  # an easy item is junk in H
    # The other queries stay perfect: 70 queries in M, 68 in E (two have no easy positives).
    assert scores.map["medium"] == pytest.approx((69 * 100 + 100 * ap_medium) / 70, abs=1e-6)
    assert scores.map["easy"] == pytest.approx((67 * 100 + 100 * ap_easy) / 68, abs=1e-6)
    assert scores.map["hard"] == pytest.approx(100.0)
    # mP@10 in M is still 100: the first 10 places after junk removal are all positives.
    assert scores.mp_at["medium"][10] == pytest.approx(100.0)


def test_real_junk_is_ignored(revisitop):
    _, data = revisitop
    gnd, n_gallery = data["gnd"], len(data["imlist"])
    rng = np.random.default_rng(0)
    ranking = np.stack([rng.permutation(n_gallery) for _ in gnd])
    moved = ranking.copy()
    for i, entry in enumerate(gnd):
        junk = np.array(entry["junk"], dtype=np.int64)
        kept = ranking[i][~np.isin(ranking[i], junk)]
        slots = np.sort(rng.choice(n_gallery, junk.size, replace=False))
        row = np.empty(n_gallery, dtype=np.int64)
        mask = np.zeros(n_gallery, dtype=bool)
        mask[slots] = True
        row[mask], row[~mask] = rng.permutation(junk), kept
        moved[i] = row
    assert not np.array_equal(moved, ranking)
    before, after = revisited_map(ranking, gnd), revisited_map(moved, gnd)
    for protocol in REVISITED_PROTOCOLS:
        np.testing.assert_allclose(after.per_query_ap[protocol], before.per_query_ap[protocol],
                                   rtol=1e-12)
        assert after.map[protocol] == pytest.approx(before.map[protocol], rel=1e-12)
        assert dict(after.mp_at[protocol]) == pytest.approx(dict(before.mp_at[protocol]))


def test_real_matches_revisitop_loop(revisitop):
    _, data = revisitop
    gnd, n_gallery = data["gnd"], len(data["imlist"])
    rng = np.random.default_rng(1)
    # Random rankings with the positives pulled towards the top, so scores are not all ~0.
    scores_matrix = rng.random((len(gnd), n_gallery))
    for i, entry in enumerate(gnd):
        scores_matrix[i, entry["easy"] + entry["hard"]] -= 0.9
    ranking = np.argsort(scores_matrix, axis=1)
    kappas = (1, 5, 10)
    scores = revisited_map(ranking, gnd, kappas=kappas)
    for protocol in REVISITED_PROTOCOLS:
        ok, junk = protocol_lists(gnd, protocol)
        expected_map, expected_aps, expected_pr = loop_compute_map(ranking, ok, junk, kappas)
        np.testing.assert_allclose(scores.per_query_ap[protocol] / 100, expected_aps, rtol=1e-10)
        assert scores.map[protocol] / 100 == pytest.approx(expected_map, rel=1e-10)
        np.testing.assert_allclose([scores.mp_at[protocol][k] / 100 for k in kappas],
                                   expected_pr, rtol=1e-10)


# -- restricted loader -----------------------------------------------------------------------
class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_loader_refuses_code_and_unknown_classes(tmp_path):
    marker = tmp_path / "created-by-pickle"
    payloads = {
        "exploit.pkl": {"imlist": [], "qimlist": [], "gnd": [], "x": _Exploit(str(marker))},
        "array.pkl": {"imlist": [], "qimlist": [], "gnd": [], "x": np.arange(3)},
        "eval.pkl": b"cbuiltins\neval\n(V1+1\ntR.",
    }
    for name, payload in payloads.items():
        path = tmp_path / name
        path.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload))
        with pytest.raises(InvalidInputError, match="refusing to unpickle"):
            load_revisitop_gnd(path)
    assert not marker.exists()


def test_loader_rejects_broken_or_malformed_files(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    with pytest.raises(InvalidInputError, match="not a readable"):
        load_revisitop_gnd(garbage)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_revisitop_gnd(tmp_path / "missing.pkl")
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"],
                                    "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(InvalidInputError, match="indices into imlist"):
        load_revisitop_gnd(wrong)
    valid = tmp_path / "valid.pkl"
    valid.write_bytes(pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q"],
                                    "gnd": [{"easy": [1], "hard": [0], "junk": [],
                                             "bbx": [0.0, 0.0, 1.0, 1.0]}]}))
    assert load_revisitop_gnd(valid)["gnd"][0]["easy"] == [1]
