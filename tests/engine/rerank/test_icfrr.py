"""ICFRR against the plain-loop references of the notes, a hand-worked case and invariants."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
import torch
from oracles import (
    assert_icfrr_steps,
    checked_gallery_lists,
    icfrr_atol,
    icfrr_paper_literal_reference,
    icfrr_reference,
    icfrr_step_reference,
    lists_without_item,
)
from tie_aware import U32, assert_order_matches

from engine.core.knn import canonical_similarity, knn_graph
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError, TooLargeError
from engine.evaluation.metrics import mean_average_precision
from engine.evaluation.protocols import every_tenth_split
from engine.rerank import GalleryContext, create_reranker, icfrr
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


@pytest.fixture
def oracle_distances(oracle_split_features) -> tuple[np.ndarray, np.ndarray]:
    """`distances` of the original features, then of the features perturbed by a few ulps."""
    queries, gallery = oracle_split_features
    return (euclidean_from_similarity(canonical_similarity(queries, gallery)),
            euclidean_from_similarity(canonical_similarity(gallery, gallery)))


def by_item(order: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Scores listed in `order` (as the oracles return them) as scores by gallery item."""
    result = np.empty(scores.shape)
    np.put_along_axis(result, order, scores, axis=1)
    return result


def same_path(orders: list[np.ndarray], history: list[np.ndarray]) -> np.ndarray:
    """(Q,) bool: the queries whose orders equal the oracle's own before the last iteration."""
    return np.all([(a == b).all(axis=1) for a, b in zip(orders[:-1], history[:-1], strict=True)],
                  axis=0) if len(orders) > 1 else np.ones(len(orders[0]), bool)


def assert_history(history: np.ndarray, orders: list[np.ndarray]) -> None:
    """The details' history holds the first positions of each iteration's order (the runs with
    fewer iterations do the same arithmetic, so exactly)."""
    assert history.shape[1] == len(orders)
    for t, order in enumerate(orders):
        np.testing.assert_array_equal(history[:, t], order[:, :history.shape[2]])


def variants(cases: list[tuple], perturbed: list[tuple]) -> list[tuple]:
    """Parameters of an oracle test: every case on the original features, and the cases listed
    on the perturbed ones (indirect values of `oracle_split_features`), to keep time down."""
    return [("original", *case) for case in cases] + [("perturbed", *case) for case in perturbed]


@pytest.mark.parametrize(("KG", "KQ"), SETTINGS)
@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize(("oracle_split_features", "n_times"),
                         variants([(0,), (1,), (5,)], [(5,)]), indirect=["oracle_split_features"])
def test_from_distances_equals_reference(oracle_distances, KG, KQ, beta, n_times):
    qg, gg = oracle_distances
    kg, kq = used(KG, KQ, len(gg))
    results = [icfrr_from_distances(qg, gg, KG=KG, KQ=KQ, beta=beta, n_times=t)
               for t in range(n_times + 1)]
    orders = assert_icfrr_steps(lambda t: (results[t].indices, -results[t].distances), qg, gg,
                                kg, kq, beta, n_times)
    steps = results[-1].details["history"]
    assert steps.shape == (len(qg), n_times + 1, icfrr.HISTORY_DEPTH)
    assert_history(steps, orders)
    # the oracle's own run: queries that took its path through the earlier iterations (all
    # but near-ties) end in its final ranking, up to ties
    order, scores, history = icfrr_reference(qg, gg, kg, kq, beta, n_times)
    path = same_path(orders, history)
    assert path.any()
    assert_order_matches(results[-1].indices[path], by_item(order, scores)[path],
                         values=-results[-1].distances[path], larger_is_better=True,
                         atol=icfrr_atol(beta, kq))


def test_step_reference_follows_the_reference(distances):
    """The step oracle, fed the reference's own orders, gives the reference's scores."""
    qg, gg = distances
    for paper_literal, oracle in ((False, icfrr_reference),
                                  (True, icfrr_paper_literal_reference)):
        order, scores, history = oracle(qg, gg, 10, 15, 2.0, 3)
        stepped = icfrr_step_reference(qg, gg, 10, 15, 2.0, history[:3], paper_literal)
        np.testing.assert_allclose(stepped, by_item(order, scores), rtol=0, atol=1e-12)


def test_from_distances_top_k(distances):
    qg, gg = distances
    full = icfrr_from_distances(qg, gg, KG=10, KQ=15)
    top = icfrr_from_distances(qg, gg, 7, KG=10, KQ=15)
    np.testing.assert_array_equal(top.indices, full.indices[:, :7])
    np.testing.assert_array_equal(top.distances, full.distances[:, :7])


@pytest.mark.parametrize(("oracle_split_features", "KG", "KQ"),
                         variants(SETTINGS, [(256, 250), (5, 3)]),
                         indirect=["oracle_split_features"])
def test_reranker_equals_reference(oracle_split_features, KG, KQ):
    queries, gallery = oracle_split_features
    qg = euclidean_from_similarity(canonical_similarity(queries, gallery))
    gg = euclidean_from_similarity(canonical_similarity(gallery, gallery))
    kg, kq = used(KG, KQ, len(gallery))
    context = GalleryContext(gallery, knn=knn_graph(gallery, len(gallery)))  # built once
    rerankers = [create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ, n_times=t).fit(context)
                 for t in range(6)]
    batches = [reranker.rerank(queries) for reranker in rerankers]
    lists = checked_gallery_lists(rerankers[-1]._lists, gallery)
    orders = assert_icfrr_steps(lambda t: (batches[t].indices, -batches[t].distances), qg, gg,
                                kg, kq, 0.5, 5, lists=lists, label="batch")
    batch = batches[-1]
    assert (np.diff(batch.distances, axis=1) >= 0).all()  # distance = -score
    assert_history(batch.details["history"], orders)
    top = rerankers[-1].rerank(queries, 12)
    np.testing.assert_array_equal(top.indices, batch.indices[:, :12])
    # online, one query at a time: the consensus is a matrix-vector product whose float32
    # sums round unlike the batch's, so near-ties may part; checked against the oracle too
    onlines = [reranker.rerank(queries[:5], mode="online") for reranker in rerankers]
    online_orders = assert_icfrr_steps(lambda t: (onlines[t].indices, -onlines[t].distances),
                                       qg[:5], gg, kg, kq, 0.5, 5, lists=lists, label="online")
    for q, details in enumerate(onlines[-1].details["per_query"]):
        assert_history(details["history"][None], [order[q:q + 1] for order in online_orders])


@pytest.mark.parametrize(("oracle_split_features", "KG", "KQ"),
                         variants([(256, 250), (10, 15), (5, 3)], [(10, 15)]),
                         indirect=["oracle_split_features"])
def test_leave_one_out_equals_reference_without_the_item(oracle_split_features, KG, KQ):
    _, gallery = oracle_split_features
    gg = euclidean_from_similarity(canonical_similarity(gallery, gallery))
    size = len(gallery)
    reranker = create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ, beta=2.0).fit(gallery)
    result = reranker.rerank(None)
    assert result.indices.shape == (size, size - 1)
    rows = np.array([0, 7, 93, size - 1])
    # the re-ranker's leave-one-out core for these rows alone (each row is computed on its own)
    gallery64 = gallery.astype(np.float64)

    def leave_one_out(t: int) -> icfrr.ICFRROutput:
        params = ICFRRParams(KG=KG, KQ=KQ, beta=2.0, n_times=t)
        return run(query_distances(gallery64[rows], gallery64), reranker._lists_t, params,
                   rows)[0]

    outputs = [leave_one_out(t) for t in range(6)]
    lists = checked_gallery_lists(reranker._lists, gallery)
    np.testing.assert_array_equal(result.indices[rows], outputs[-1].order)
    np.testing.assert_array_equal(-result.distances[rows], outputs[-1].score)
    for row, i in enumerate(rows):
        kept = np.delete(np.arange(size), i)

        def step(t: int, row: int = row, i: int = i) -> tuple[np.ndarray, np.ndarray]:
            order = outputs[t].order[row:row + 1]
            return order - (order > i), outputs[t].score[row:row + 1]  # ids without item i

        assert_icfrr_steps(step, np.delete(gg[i], i)[None], gg[np.ix_(kept, kept)],
                           *used(KG, KQ, size - 1), 2.0, 5, lists=lists_without_item(lists, i),
                           label=f"item {i} left out")


@pytest.mark.parametrize(("oracle_split_features", "KG", "KQ"),
                         variants([(256, 250), (10, 15)], [(10, 15)]),
                         indirect=["oracle_split_features"])
def test_paper_literal_equals_its_reference(oracle_split_features, KG, KQ):
    queries, gallery = oracle_split_features
    qg = euclidean_from_similarity(canonical_similarity(queries, gallery))
    gg = euclidean_from_similarity(canonical_similarity(gallery, gallery))
    kg, kq = used(KG, KQ, len(gg))
    results = [icfrr_from_distances(qg, gg, KG=KG, KQ=KQ, n_times=t, paper_literal=True)
               for t in range(6)]
    orders = assert_icfrr_steps(lambda t: (results[t].indices, -results[t].distances), qg, gg,
                                kg, kq, 0.5, 5, paper_literal=True)
    result = results[-1]
    assert_history(result.details["history"], orders)
    order, scores, history = icfrr_paper_literal_reference(qg, gg, kg, kq, 0.5, 5)
    path = same_path(orders, history)
    assert path.any()
    assert_order_matches(result.indices[path], by_item(order, scores)[path],
                         values=-result.distances[path], larger_is_better=True,
                         atol=icfrr_atol(0.5, kq, 5))
    context = GalleryContext(gallery, knn=knn_graph(gallery, len(gallery)))  # built once
    rerankers = [create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ, n_times=t,
                                 paper_literal=True).fit(context) for t in range(6)]
    batches = [reranker.rerank(queries) for reranker in rerankers]
    lists = checked_gallery_lists(rerankers[-1]._lists, gallery)
    assert_icfrr_steps(lambda t: (batches[t].indices, -batches[t].distances), qg, gg, kg, kq,
                       0.5, 5, paper_literal=True, lists=lists, label="re-ranker")
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
    kq = min(KQ, size)
    voters = torch.from_numpy(np.argsort(qg, axis=1, kind="stable")[:, :kq])
    atol = 2 * (kq + 3) * U32  # two float32 sums of kq terms <= 1/kq each (see icfrr_atol)
    np.testing.assert_allclose(consensus_from_votes(sparse, voters).numpy(),
                               consensus_from_votes(dense, voters).numpy(), atol=atol)
    np.testing.assert_allclose(consensus(lists_t, voters, size, kg).numpy(),
                               consensus_from_votes(dense, voters).numpy(), atol=atol)

    def runs() -> list[icfrr.ICFRROutput]:
        return [run(qg, lists, ICFRRParams(KG=KG, KQ=KQ, beta=2.0, n_times=t))[0]
                for t in range(6)]

    dense_runs = runs()
    # run() calls vote_matrix with its default limit: force the sparse layout
    monkeypatch.setattr(icfrr, "vote_matrix",
                        functools.partial(icfrr.vote_matrix, dense_limit=0))
    sparse_runs = runs()
    # the layouts sum in other orders, so near-ties may part: each against the oracle
    for label, outputs in (("dense", dense_runs), ("sparse", sparse_runs)):
        orders = assert_icfrr_steps(lambda t, outputs=outputs: (outputs[t].order,
                                                                outputs[t].score),
                                    qg, gg, kg, kq, 2.0, 5, label=label)
        assert_history(outputs[-1].history, orders)


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
    values, order = ascending_candidates(distances, exclude)
    values_t, order_t = ascending_candidates(
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
    numpy path's rankings: batch and leave-one-out (online reads the numpy gallery either
    way)."""
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
    monkeypatch.setattr(reranker, "_gallery_source", torch.from_numpy(gallery))
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


# -- online from the query's nearest items only --------------------------------------------------
def synthetic(size: int, dim: int = 48, n_queries: int = 12, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit features and queries near gallery items (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((size // 20, dim))
    gallery = centres[rng.integers(0, len(centres), size)] + 1.2 * rng.standard_normal(
        (size, dim))
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
    queries = gallery[rng.integers(0, size, n_queries)] + 0.1 * rng.standard_normal(
        (n_queries, dim))
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32), gallery


def recorded_heads(monkeypatch) -> list[tuple[int, int, bool]]:
    """Record (items given, gallery size, proven) of every `online_head` call."""
    calls = []
    original = icfrr.online_head

    def recording(distances, ids, size, *args, **kwargs):
        output = original(distances, ids, size, *args, **kwargs)
        calls.append((len(ids), size, output is not None))
        return output

    monkeypatch.setattr(icfrr, "online_head", recording)
    return calls


def full_online(reranker, query: np.ndarray, k: int) -> icfrr.ICFRROutput:
    """`online_head` over the whole gallery: the run the head must reproduce."""
    gallery = reranker.gallery.features
    size = len(gallery)
    kg, kq, _ = icfrr.clamped(reranker.params, size)
    distances = euclidean_from_similarity(canonical_similarity(query[None], gallery))[0]
    ids = np.argsort(distances, kind="stable")
    return icfrr.online_head(distances[ids], ids, size, reranker._lists, reranker.params, kg, kq,
                             k)


@pytest.mark.parametrize("params", [{}, {"KG": 32, "KQ": 32}, {"paper_literal": True},
                                    {"KG": 10, "KQ": 15, "beta": 2.0, "n_times": 2}])
def test_online_head_equals_the_full_run(monkeypatch, params):
    """Online ranks from the query's nearest items (grown until they prove the result) and
    gives, bit for bit, the run over the whole gallery with the same votes; the head was
    smaller than the gallery for some queries, so the proof was used."""
    queries, gallery = synthetic(3000)
    monkeypatch.setattr(icfrr, "HEAD_GROWTH", 4)  # heads between the first and the gallery
    monkeypatch.setattr(icfrr, "HEAD_LIMIT", 1.0)
    reranker = create_reranker("icfrr", device="cpu", **params).fit(
        GalleryContext(gallery, knn=knn_graph(gallery, 300)))
    calls = recorded_heads(monkeypatch)
    result = reranker.rerank(queries, 40, mode="online")
    calls = list(calls)
    for q, query in enumerate(queries):
        full = full_online(reranker, query, 40)
        np.testing.assert_array_equal(result.indices[q], full.order[0])
        np.testing.assert_array_equal(-result.distances[q], full.score[0])
        np.testing.assert_array_equal(result.details["per_query"][q]["history"], full.history[0])
    proven = [given for given, size, ok in calls if ok]
    assert len(proven) == len(queries)
    assert min(proven) < len(gallery)
    assert any(not ok for _, _, ok in calls)  # a head too short to prove was refused


def test_a_head_grown_past_the_limit_is_the_whole_gallery(monkeypatch):
    """Where the first head fails and the next would pass `HEAD_LIMIT` of the gallery, the
    next run is the whole gallery, with the same result as growing step by step."""
    queries, gallery = synthetic(3000)
    reranker = create_reranker("icfrr", device="cpu").fit(
        GalleryContext(gallery, knn=knn_graph(gallery, 300)))
    calls = recorded_heads(monkeypatch)
    result = reranker.rerank(queries, 40, mode="online")
    sizes = [given for given, _, _ in calls]
    failed = [given for given, _, ok in calls if not ok]
    assert failed and all(given * icfrr.HEAD_GROWTH > icfrr.HEAD_LIMIT * len(gallery)
                          for given in failed)
    assert sizes.count(len(gallery)) == len(failed)  # each failure went straight to the whole
    for q, query in enumerate(queries):
        np.testing.assert_array_equal(result.indices[q], full_online(reranker, query, 40).order[0])


@pytest.mark.parametrize(("KG", "KQ", "beta"), [(10, 15, 2.0), (5, 3, 0.5), (32, 32, 0.5)])
def test_online_head_against_the_batch_and_the_oracle(oracle_split_features, monkeypatch, KG,
                                                      KQ, beta):
    """On the demo features, with a head margin small enough to be tried: online's top 12
    after one iteration is the oracle's step from the original order (up to float ties) and
    the batch's (today's online) ranking up to those ties."""
    queries, gallery = oracle_split_features
    monkeypatch.setattr(icfrr, "HEAD_MARGIN", 4)
    qg = euclidean_from_similarity(canonical_similarity(queries, gallery))
    gg = euclidean_from_similarity(canonical_similarity(gallery, gallery))
    kg, kq = used(KG, KQ, len(gallery))
    reranker = create_reranker("icfrr", device="cpu", KG=KG, KQ=KQ, beta=beta,
                               n_times=1).fit(gallery)
    calls = recorded_heads(monkeypatch)
    online = reranker.rerank(queries, 12, mode="online")
    assert any(ok and given < len(gallery) for given, _, ok in calls)
    lists = checked_gallery_lists(reranker._lists, gallery)
    order0 = np.argsort(qg, axis=1, kind="stable")
    expected = icfrr_step_reference(qg, gg, kg, kq, beta, [order0], lists=lists)
    atol = icfrr_atol(beta, kq)
    assert_order_matches(online.indices, expected, values=-online.distances,
                         larger_is_better=True, atol=atol, label="online")
    batch = reranker.rerank(queries, 12)
    assert_order_matches(batch.indices, expected, values=-batch.distances,
                         larger_is_better=True, atol=atol, label="batch")
    np.testing.assert_allclose(online.distances, batch.distances, atol=2 * atol)


def test_fit_reads_an_approximate_graph(monkeypatch):
    """A deep enough graph of the context is used as it is, exact or not (no search)."""
    _, gallery = synthetic(400)
    graph = knn_graph(gallery, 40)
    approximate = KnnGraph(graph.indices[:, ::-1].copy(), graph.similarities,
                                 graph.farthest, canonical=False, recall=0.5)

    def no_search(*args, **kwargs):
        raise AssertionError("searched the gallery")

    monkeypatch.setattr(icfrr, "knn_graph", no_search)
    reranker = create_reranker("icfrr", device="cpu", KG=20, KQ=20).fit(
        GalleryContext(gallery, knn=approximate))
    np.testing.assert_array_equal(reranker._lists, approximate.indices[:, :22])
    assert reranker.rerank(gallery[:2], 5, mode="online").indices.shape == (2, 5)


# -- batch memory ----------------------------------------------------------------------------------
def test_batch_refusal_and_chunks(monkeypatch):
    """Batches run in query chunks sized by the memory budget; a gallery whose vote matrix and
    one query's rows do not fit is refused with the numbers, before any work."""
    queries, gallery = synthetic(400)
    reranker = create_reranker("icfrr", device="cpu", KG=10, KQ=10).fit(gallery)
    assert reranker.batch_refusal(400, 12) is None
    assert reranker.batch_refusal(100_000, 100_000) is None  # CSR votes, chunked rows
    expected = reranker.rerank(queries, 10)
    need = reranker._fixed_bytes(400) + 400 * icfrr.BYTES_PER_PAIR
    monkeypatch.setattr(icfrr, "memory_budget", lambda: need + 2 * 400 * icfrr.BYTES_PER_PAIR)
    assert reranker._chunk_rows(400, 12) == 3
    chunked = reranker.rerank(queries, 10)
    np.testing.assert_array_equal(chunked.indices, expected.indices)
    np.testing.assert_array_equal(chunked.distances, expected.distances)
    monkeypatch.setattr(icfrr, "memory_budget", lambda: need - 1)
    reason = reranker.batch_refusal(400, 12)
    assert reason is not None and "GiB" in reason and "(1, 400)" in reason
    with pytest.raises(TooLargeError, match="ICFRR"):
        reranker.rerank(queries, 10)
    assert reranker.rerank(queries[:1], 10, mode="online").indices.shape == (1, 10)
    monkeypatch.setattr(icfrr, "memory_budget", lambda: None)  # unknown: no refusal
    assert reranker.batch_refusal(10**7, 1) is None
