"""ICFRR against the plain-loop references of the notes, a hand-worked case and invariants."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
import torch
from oracles import icfrr_paper_literal_reference, icfrr_reference

from engine.errors import InvalidInputError
from engine.metrics import mean_average_precision
from engine.protocols import every_tenth_split
from engine.rerank import create_reranker, icfrr
from engine.rerank.icfrr import (
    ICFRRParams,
    ascending_candidates,
    consensus,
    consensus_from_votes,
    euclidean_from_similarity,
    icfrr_from_distances,
    query_distances,
    run,
    sorted_lists,
    vote_matrix,
)
from engine.rerank.ops import canonical_similarity

ATOL = 1e-5

# -- a hand-worked case ----------------------------------------------------------------------------
# G = 4 gallery items, one query, KG = KQ = 2, beta = 0.5.
#
# gg (symmetric):        ascending lists        R = position - 1 (self -1)
#      0    1    2    3
# 0 [0.0, 0.5, 0.2, 0.9]  0: 0 2 1 3            R[0] = [-1,  1,  0,  2]
# 1 [0.5, 0.0, 0.3, 0.8]  1: 1 2 0 3            R[1] = [ 1, -1,  0,  2]
# 2 [0.2, 0.3, 0.0, 0.7]  2: 2 0 1 3            R[2] = [ 0,  1, -1,  2]
# 3 [0.9, 0.8, 0.7, 0.0]  3: 3 2 1 0            R[3] = [ 2,  1,  0, -1]
#
# alpha = linspace(1, 0, 4) = [1, 2/3, 1/3, 0], alpha[KG:] = 0 -> [1, 2/3, 0, 0]; alpha[-1] = 0.
# W[a, b] = alpha[R[a, b]]:
#   W[0] = [0, 2/3, 1, 0]   W[1] = [2/3, 0, 1, 0]   W[2] = [1, 2/3, 0, 0]   W[3] = [0, 2/3, 1, 0]
#
# qg = [0.10, 0.20, 0.25, 0.40] -> order_0 = [0, 1, 2, 3], base = [-0.10, -0.20, -0.25, -0.40].
#
# t = 1: voters [0, 1]; delta = (W[0] + W[1]) / 2 = [1/3, 1/3, 1, 0]
#   position 0, item 0: -0.10 + 0.5 * 1/3 =  0.0666..
#   position 1, item 1: -0.20 + 0.5 * 1/3 = -0.0333..
#   position 2, item 2: -0.25 + 0.5 * 1   =  0.25      <- item 2 climbs to the top
#   position 3, item 3: -0.40 + 0         = -0.40
#   order_1 = [2, 0, 1, 3], scores [0.25, 0.0666.., -0.0333.., -0.40]
# t = 2: voters [2, 0]; delta = (W[2] + W[0]) / 2 = [1/2, 2/3, 1/2, 0]
#   position 0, item 2: -0.10 + 0.5 * 1/2 = 0.15
#   position 1, item 0: -0.20 + 0.5 * 1/2 = 0.05
#   position 2, item 1: -0.25 + 0.5 * 2/3 = 0.0833..  <- item 1 passes item 0
#   position 3, item 3: -0.40
#   order_2 = [2, 1, 0, 3], scores [0.15, 0.0833.., 0.05, -0.40]
#
# Paper-literal (per-item accumulating s, starting at -qg): t = 1 is the same ([2, 0, 1, 3],
# s = [0.0666.., -0.0333.., 0.25, -0.40] by item); at t = 2 voters [2, 0] add 0.5 * delta:
#   s = [0.3166.., 0.30, 0.50, -0.40] -> order [2, 0, 1, 3]: item 1 does not pass item 0,
#   because item 0 keeps its own score instead of taking position 2's.
HAND_GG = np.array([[0.0, 0.5, 0.2, 0.9],
                    [0.5, 0.0, 0.3, 0.8],
                    [0.2, 0.3, 0.0, 0.7],
                    [0.9, 0.8, 0.7, 0.0]], np.float32)
HAND_QG = np.array([[0.10, 0.20, 0.25, 0.40]], np.float32)
HAND = {"KG": 2, "KQ": 2, "beta": 0.5}
HAND_W = np.array([[0, 2 / 3, 1, 0], [2 / 3, 0, 1, 0], [1, 2 / 3, 0, 0], [0, 2 / 3, 1, 0]])


def test_hand_worked_structures():
    lists = sorted_lists(HAND_GG, 3)
    np.testing.assert_array_equal(lists, [[0, 2, 1], [1, 2, 0], [2, 0, 1], [3, 2, 1]])
    lists_t = torch.from_numpy(lists)
    np.testing.assert_allclose(vote_matrix(lists_t, 4, 2).numpy(), HAND_W, atol=1e-7)
    # KG = G - 1: every other item votes, alpha[2] = 1/3 reaches the farthest
    full = vote_matrix(torch.from_numpy(sorted_lists(HAND_GG, 4)), 4, 3).numpy()
    np.testing.assert_allclose(full[0], [0, 2 / 3, 1, 1 / 3], atol=1e-7)
    np.testing.assert_allclose(full[3], [1 / 3, 2 / 3, 1, 0], atol=1e-7)
    voters = torch.tensor([[0, 1], [2, 0]])
    expected = np.array([[1 / 3, 1 / 3, 1, 0], [1 / 2, 2 / 3, 1 / 2, 0]])
    np.testing.assert_allclose(consensus(lists_t, voters, 4, 2).numpy(), expected, atol=1e-7)
    np.testing.assert_allclose(consensus_from_votes(vote_matrix(lists_t, 4, 2), voters).numpy(),
                               expected, atol=1e-7)


@pytest.mark.parametrize(("n_times", "order", "scores"), [
    (0, [0, 1, 2, 3], [-0.10, -0.20, -0.25, -0.40]),
    (1, [2, 0, 1, 3], [0.25, 0.2 / 3, -0.1 / 3, -0.40]),
    (2, [2, 1, 0, 3], [0.15, 0.25 / 3, 0.05, -0.40]),
])
def test_hand_worked_case(n_times, order, scores):
    result = icfrr_from_distances(HAND_QG, HAND_GG, n_times=n_times, **HAND)
    np.testing.assert_array_equal(result.indices, [order])
    np.testing.assert_allclose(result.distances, -np.array([scores]), atol=1e-6)
    history = [[0, 1, 2, 3], [2, 0, 1, 3], [2, 1, 0, 3]][:n_times + 1]
    np.testing.assert_array_equal(result.details["history"], [history])
    reference, reference_scores, _ = icfrr_reference(HAND_QG, HAND_GG, n_times=n_times, **HAND)
    np.testing.assert_array_equal(reference, [order])
    np.testing.assert_allclose(reference_scores, [scores], atol=1e-6)


def test_hand_worked_paper_literal():
    result = icfrr_from_distances(HAND_QG, HAND_GG, n_times=2, paper_literal=True, **HAND)
    np.testing.assert_array_equal(result.indices, [[2, 0, 1, 3]])
    np.testing.assert_allclose(result.distances, -np.array([[0.50, 0.95 / 3, 0.30, -0.40]]),
                               atol=1e-6)
    reference, reference_scores, _ = icfrr_paper_literal_reference(HAND_QG, HAND_GG, n_times=2,
                                                                   **HAND)
    np.testing.assert_array_equal(reference, [[2, 0, 1, 3]])
    np.testing.assert_allclose(reference_scores, [[0.50, 0.95 / 3, 0.30, -0.40]], atol=1e-6)


# -- real features against the oracles -------------------------------------------------------------
@pytest.fixture(scope="module")
def distances(split_features) -> tuple[np.ndarray, np.ndarray]:
    """(query->gallery, gallery->gallery) Euclidean distances from canonical similarities."""
    queries, gallery = split_features
    return (euclidean_from_similarity(canonical_similarity(queries, gallery)),
            euclidean_from_similarity(canonical_similarity(gallery, gallery)))


def used(KG: int, KQ: int, size: int) -> tuple[int, int]:
    """KG and KQ as clamped for `size` gallery items (what the oracle is given)."""
    return min(KG, size - 1), min(KQ, size)


SETTINGS = [(256, 250), (32, 32), (10, 15), (5, 3)]


@pytest.mark.parametrize(("KG", "KQ"), SETTINGS)
@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("n_times", [0, 1, 5])
def test_from_distances_equals_reference(distances, KG, KQ, beta, n_times):
    qg, gg = distances
    result = icfrr_from_distances(qg, gg, KG=KG, KQ=KQ, beta=beta, n_times=n_times)
    order, scores, history = icfrr_reference(qg, gg, *used(KG, KQ, len(gg)), beta, n_times)
    np.testing.assert_array_equal(result.indices, order)
    np.testing.assert_allclose(-result.distances, scores, atol=ATOL)
    steps = result.details["history"]
    assert steps.shape == (len(qg), n_times + 1, icfrr.HISTORY_DEPTH)
    for t in range(n_times + 1):
        np.testing.assert_array_equal(steps[:, t], history[t][:, :steps.shape[2]])


def test_from_distances_top_k(distances):
    qg, gg = distances
    full = icfrr_from_distances(qg, gg, KG=10, KQ=15)
    top = icfrr_from_distances(qg, gg, 7, KG=10, KQ=15)
    np.testing.assert_array_equal(top.indices, full.indices[:, :7])
    np.testing.assert_array_equal(top.distances, full.distances[:, :7])


@pytest.mark.parametrize(("KG", "KQ"), SETTINGS)
def test_reranker_equals_reference(split_features, distances, KG, KQ):
    queries, gallery = split_features
    qg, gg = distances
    reranker = create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ).fit(gallery)
    order, scores, history = icfrr_reference(qg, gg, *used(KG, KQ, len(gallery)), 0.5, 5)
    batch = reranker.rerank(queries)
    np.testing.assert_array_equal(batch.indices, order)
    np.testing.assert_allclose(-batch.distances, scores, atol=ATOL)  # distance = -score
    assert (np.diff(batch.distances, axis=1) >= 0).all()
    for t in range(6):
        np.testing.assert_array_equal(batch.details["history"][:, t], history[t][:, :20])
    top = reranker.rerank(queries, 12)
    np.testing.assert_array_equal(top.indices, order[:, :12])
    # online, one query at a time, equals batch (distances to float32 rounding: the consensus
    # is one matrix product whose summation order depends on the batch size)
    online = reranker.rerank(queries, mode="online")
    np.testing.assert_array_equal(online.indices, batch.indices)
    np.testing.assert_allclose(online.distances, batch.distances, atol=1e-6)
    for q, details in enumerate(online.details["per_query"]):
        np.testing.assert_array_equal(details["history"], batch.details["history"][q])


@pytest.mark.parametrize(("KG", "KQ"), [(256, 250), (10, 15), (5, 3)])
def test_leave_one_out_equals_reference_without_the_item(split_features, distances, KG, KQ):
    _, gallery = split_features
    _, gg = distances
    size = len(gallery)
    result = create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ, beta=2.0).fit(gallery).rerank(
        None)
    assert result.indices.shape == (size, size - 1)
    for i in (0, 7, 93, size - 1):
        kept = np.delete(np.arange(size), i)
        order, scores, _ = icfrr_reference(np.delete(gg[i], i)[None], gg[np.ix_(kept, kept)],
                                           *used(KG, KQ, size - 1), 2.0, 5)
        np.testing.assert_array_equal(result.indices[i], kept[order[0]])
        np.testing.assert_allclose(-result.distances[i], scores[0], atol=ATOL)


@pytest.mark.parametrize(("KG", "KQ"), [(256, 250), (10, 15)])
def test_paper_literal_equals_its_reference(split_features, distances, KG, KQ):
    queries, gallery = split_features
    qg, gg = distances
    kg, kq = used(KG, KQ, len(gg))
    order, scores, history = icfrr_paper_literal_reference(qg, gg, kg, kq, 0.5, 5)
    result = icfrr_from_distances(qg, gg, KG=KG, KQ=KQ, n_times=5, paper_literal=True)
    np.testing.assert_array_equal(result.indices, order)
    np.testing.assert_allclose(-result.distances, scores, atol=ATOL)
    for t in range(6):
        np.testing.assert_array_equal(result.details["history"][:, t], history[t][:, :20])
    reranker = create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ, paper_literal=True)
    np.testing.assert_array_equal(reranker.fit(gallery).rerank(queries).indices, order)
    # not the authors' per-position semantics
    default = icfrr_from_distances(qg, gg, KG=KG, KQ=KQ, beta=0.5, n_times=5)
    assert (default.indices != result.indices).any(axis=1).any()


# -- clamping, iterations, the two vote-matrix layouts ---------------------------------------------
def test_large_parameters_are_clamped_and_reported(split_features, distances):
    queries, gallery = split_features
    qg, gg = distances
    size = len(gallery)
    result = icfrr_from_distances(qg, gg, KG=256, KQ=250)
    assert result.details["clamped"] == {"KG": {"asked": 256, "used": size - 1},
                                         "KQ": {"asked": 250, "used": size}}
    reranker = create_reranker("icfrr", device="cpu", KG=256, KQ=250).fit(gallery)
    assert reranker.rerank(queries, 5).details["clamped"] == result.details["clamped"]
    assert reranker.rerank(None, 5).details["clamped"] == {
        "KG": {"asked": 256, "used": size - 2}, "KQ": {"asked": 250, "used": size - 1}}
    assert "clamped" not in icfrr_from_distances(qg, gg, KG=10, KQ=15).details
    # clamping changes nothing: KG = G - 1 already gives every other item its weight
    exact = icfrr_from_distances(qg, gg, KG=size - 1, KQ=size)
    np.testing.assert_array_equal(result.indices, exact.indices)
    np.testing.assert_array_equal(result.distances, exact.distances)


def test_no_iterations_is_the_original_ranking(split_features, distances):
    queries, gallery = split_features
    qg, gg = distances
    order = np.argsort(qg, axis=1, kind="stable")
    result = icfrr_from_distances(qg, gg, n_times=0)
    np.testing.assert_array_equal(result.indices, order)
    np.testing.assert_array_equal(result.distances, np.take_along_axis(qg, order, axis=1))
    reranked = create_reranker("icfrr", device="cpu", n_times=0).fit(gallery).rerank(queries)
    np.testing.assert_array_equal(reranked.indices, order)
    np.testing.assert_array_equal(reranked.distances, result.distances)
    assert reranked.details["history"].shape == (len(queries), 1, icfrr.HISTORY_DEPTH)


def test_zero_beta_keeps_the_original_ranking(distances):
    qg, gg = distances
    result = icfrr_from_distances(qg, gg, beta=0.0, n_times=3)
    np.testing.assert_array_equal(result.indices, np.argsort(qg, axis=1, kind="stable"))


@pytest.mark.parametrize(("KG", "KQ"), [(256, 250), (10, 15), (5, 3)])
def test_sparse_vote_matrix_equals_dense(distances, monkeypatch, KG, KQ):
    qg, gg = distances
    size = len(gg)
    kg, _ = used(KG, KQ, size)
    lists = sorted_lists(gg, kg + 1)
    lists_t = torch.from_numpy(lists)
    dense = vote_matrix(lists_t, size, kg)
    sparse = vote_matrix(lists_t, size, kg, dense_limit=0)
    assert dense.layout == torch.strided and isinstance(sparse, scipy.sparse.csr_matrix)
    np.testing.assert_array_equal(sparse.toarray(), dense.numpy())
    voters = torch.from_numpy(np.argsort(qg, axis=1, kind="stable")[:, :min(KQ, size)])
    np.testing.assert_allclose(consensus_from_votes(sparse, voters).numpy(),
                               consensus_from_votes(dense, voters).numpy(), atol=1e-6)
    np.testing.assert_allclose(consensus(lists_t, voters, size, kg).numpy(),
                               consensus_from_votes(dense, voters).numpy(), atol=1e-6)
    params = ICFRRParams(KG=KG, KQ=KQ, beta=2.0, n_times=5)
    expected, _ = run(qg, lists, params)
    # run() calls vote_matrix with its default limit: force the sparse layout
    monkeypatch.setattr(icfrr, "vote_matrix",
                        functools.partial(icfrr.vote_matrix, dense_limit=0))
    got, _ = run(qg, lists, params)
    np.testing.assert_array_equal(got.order, expected.order)
    np.testing.assert_allclose(got.score, expected.score, atol=1e-6)
    np.testing.assert_array_equal(got.history, expected.history)


# -- the torch path (what runs on a GPU), here on the CPU, against the numpy path -----------------
def test_torch_query_distances_equal_numpy(split_features):
    queries, gallery = split_features
    gallery64 = gallery.astype(np.float64)
    expected = query_distances(queries, gallery64)
    got = query_distances(queries, torch.from_numpy(gallery64))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    leave_one_out = query_distances(torch.from_numpy(gallery64[:5]), torch.from_numpy(gallery64))
    np.testing.assert_allclose(leave_one_out.numpy(), query_distances(gallery64[:5], gallery64),
                               atol=1e-7)


@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("decimals", [None, 2])
def test_torch_sort_equals_numpy_sort(split_features, leave_one_out, decimals):
    """Same order, ties (many when rounded to `decimals`) included, with and without self."""
    queries, gallery = split_features
    distances = query_distances(gallery if leave_one_out else queries, gallery.astype(np.float64))
    if decimals is not None:
        distances = np.round(distances, decimals)
    exclude = np.arange(len(gallery)) if leave_one_out else None
    order, values = ascending_candidates(distances, exclude)
    order_t, values_t = ascending_candidates(
        torch.from_numpy(distances), None if exclude is None else torch.from_numpy(exclude))
    assert order.shape == (len(distances), len(gallery) - leave_one_out)
    np.testing.assert_array_equal(order_t.numpy(), order)
    np.testing.assert_array_equal(values_t.numpy(), values)


@pytest.mark.parametrize(("KG", "KQ"), [(256, 250), (10, 15)])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_run_torch_distances_equal_numpy(split_features, distances, KG, KQ, leave_one_out):
    queries, gallery = split_features
    _, gg = distances
    gallery64 = gallery.astype(np.float64)
    rows = gallery64 if leave_one_out else queries
    exclude = np.arange(len(gallery)) if leave_one_out else None
    lists = sorted_lists(gg, KG + 2)
    params = ICFRRParams(KG=KG, KQ=KQ, beta=2.0, n_times=5)
    expected, _ = run(query_distances(rows, gallery64), lists, params, exclude)
    got, _ = run(query_distances(rows, torch.from_numpy(gallery64)), lists, params, exclude)
    np.testing.assert_array_equal(got.order, expected.order)
    np.testing.assert_allclose(got.score, expected.score, atol=1e-6)
    np.testing.assert_array_equal(got.history, expected.history)


@pytest.mark.parametrize(("KG", "KQ"), [(256, 250), (10, 15)])
def test_reranker_torch_path_equals_numpy_path(split_features, monkeypatch, KG, KQ):
    """The re-ranker with its gallery as a tensor (as on a GPU) sorts with torch and gives the
    numpy path's rankings: batch, leave-one-out and online."""
    queries, gallery = split_features
    reranker = create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ).fit(gallery)

    def rankings():
        return [reranker.rerank(queries), reranker.rerank(None, 30),
                reranker.rerank(queries[:4], mode="online")]

    expected = rankings()
    sorted_kinds = []

    def recording(distances, exclude=None):
        sorted_kinds.append(type(distances))
        return ascending_candidates(distances, exclude)

    monkeypatch.setattr(icfrr, "ascending_candidates", recording)
    monkeypatch.setattr(reranker, "_gallery64", torch.from_numpy(reranker._gallery64))
    for got, want in zip(rankings(), expected, strict=True):
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_allclose(got.distances, want.distances, atol=1e-6)
    assert set(sorted_kinds) == {torch.Tensor}


# -- input checks ----------------------------------------------------------------------------------
def test_invalid_distance_matrices():
    gg = np.ones((4, 4), np.float32) - np.eye(4, dtype=np.float32)
    qg = np.ones((2, 4), np.float32)
    with pytest.raises(InvalidInputError, match="square"):
        icfrr_from_distances(qg, gg[:3])
    with pytest.raises(InvalidInputError, match="square"):
        icfrr_from_distances(qg, gg[0])
    with pytest.raises(InvalidInputError, match="do not match"):
        icfrr_from_distances(qg[:, :3], gg)
    with pytest.raises(InvalidInputError, match="do not match"):
        icfrr_from_distances(qg[0], gg)
    qg_nan, gg_nan = qg.copy(), gg.copy()
    qg_nan[1, 2] = gg_nan[1, 2] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        icfrr_from_distances(qg_nan, gg)
    with pytest.raises(InvalidInputError, match="NaN"):
        icfrr_from_distances(qg, gg_nan)
    gg_inf = gg.copy()
    gg_inf[0, 3] = np.inf
    with pytest.raises(InvalidInputError, match="infinite"):
        icfrr_from_distances(qg, gg_inf)


@pytest.mark.parametrize("bad", [{"KG": 0}, {"KQ": 0}, {"beta": -1.0}, {"n_times": -1},
                                 {"KG": 2.5}, {"paper_literal": "yes"}, {"paper_literal": 1}])
def test_invalid_parameters(bad):
    gg = np.ones((4, 4), np.float32) - np.eye(4, dtype=np.float32)
    with pytest.raises(InvalidInputError):
        icfrr_from_distances(np.ones((1, 4), np.float32), gg, **bad)
    with pytest.raises(InvalidInputError):
        create_reranker("icfrr", device="cpu", **bad)


def test_paper_literal_accepts_numpy_bool():
    assert ICFRRParams(paper_literal=np.bool_(True)).paper_literal is True


# -- on the labelled demo collection ---------------------------------------------------------------
def test_every_tenth_split_map_changes(demo_features):
    split = every_tenth_split(demo_features.labels)
    queries = demo_features.features[split.query_rows]
    gallery = demo_features.features[split.gallery_rows]
    query_labels, gallery_labels = split.query_labels(demo_features.labels), \
        demo_features.labels[split.gallery_rows]
    baseline = np.argsort(euclidean_from_similarity(canonical_similarity(queries, gallery)),
                          axis=1, kind="stable")
    reranked = create_reranker("icfrr", device="cpu", KG=8, KQ=8).fit(gallery).rerank(queries)
    before = mean_average_precision(baseline, query_labels, gallery_labels).value
    after = mean_average_precision(reranked.indices, query_labels, gallery_labels).value
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert after != before
