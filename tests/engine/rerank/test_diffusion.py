"""Diffusion against a dense-solve oracle with a plain-loop graph, a hand-worked graph,
textbook CG, and invariants (symmetry, alpha -> 0, leave-one-out, online = batch, evidence)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tie_aware import U32, assert_order_matches

from engine.core.knn import canonical_similarity, knn_graph
from engine.core.types import GalleryContext, KnnGraph
from engine.rerank import create_reranker
from engine.rerank._diffusion import (
    conjugate_gradient,
    inverse_sqrt_degree,
    left_out_operator,
    left_out_scaling,
    mutual_affinity,
    normalised,
    rank_scores,
    replay,
    seed_vectors,
    shared_operator,
    sparse_tensor,
    torch_rank_scores,
)

CPU = torch.device("cpu")
CONVERGED = {"iterations": 1000, "tolerance": 1e-11}
"""CG run to a relative residual of 1e-11 (well inside 1000 steps here), to compare with the
dense solve."""


# -- the oracle: the paper's definitions, plain loops and a dense solve --------------------------
def loop_lists(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each item's k most similar items (itself included) by canonical similarity, ties to the
    smaller index, one row at a time."""
    similarity = canonical_similarity(features, features)
    lists = np.array([sorted(range(len(features)), key=lambda j: (-similarity[i, j], j))[:k]
                      for i in range(len(features))])
    return lists, similarity


def loop_affinity(lists: np.ndarray, similarity: np.ndarray, gamma: float) -> np.ndarray:
    """Dense W: w_ij = max(0, s_ij)^gamma when i != j and each is in the other's list."""
    size = len(lists)
    affinity = np.zeros((size, size))
    for i in range(size):
        for j in lists[i]:
            if j != i and i in lists[j]:
                affinity[i, j] = max(0.0, float(similarity[i, j])) ** gamma
    return affinity


def dense_diffusion(affinity: np.ndarray, seeds: np.ndarray, alpha: float) -> np.ndarray:
    """f solving (I - alpha D^-1/2 W D^-1/2) f = y with numpy.linalg.solve (degree-0 rows of S
    empty)."""
    degree = affinity.sum(axis=1)
    inverse = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    transition = inverse[:, None] * affinity * inverse[None, :]
    return np.linalg.solve(np.eye(len(affinity)) - alpha * transition, seeds)


def within_hops(affinity: np.ndarray, seeds: np.ndarray, hops: int) -> np.ndarray:
    """Items at most `hops` edges from a seed (y != 0): where CG's n-th iterate, in the span of
    y, A y, ..., A^(n-1) y, can be non-zero (breadth-first, one hop at a time)."""
    reached = seeds != 0
    for _ in range(hops):
        reached = reached | (affinity[:, reached] > 0).any(axis=1)
    return reached


def reference_distances(f: np.ndarray, reached: np.ndarray, similarity: np.ndarray,
                        excluded: int | None = None) -> np.ndarray:
    """The ranking's distances from the oracle's f: -f where reached, then the largest reached
    distance (at least 0) + 1 - s; +inf for the excluded item (leave-one-out)."""
    distances = np.where(reached, -f, np.nan)
    base = max(float(np.nanmax(distances, initial=0.0)), 0.0)
    distances = np.where(reached, distances, base + 1.0 - similarity.astype(np.float64))
    if excluded is not None:
        distances[excluded] = np.inf
    return distances


def diffusion_atol(seeds: np.ndarray, f: np.ndarray, alpha: float, tolerance: float) -> float:
    """Error of a returned distance against the oracle's: CG stops at |r| <= tol |y| and the
    eigenvalues of A = I - alpha S lie in [1 - alpha, 1 + alpha], so |f - f*| <= |A^-1| |r| <=
    tol |y| / (1 - alpha); the dense solve adds its own kappa * eps |f| (kappa = (1 + alpha) /
    (1 - alpha)); the float32 distance one rounding of |f| (and of 1 + |f| for the tail)."""
    scale = float(np.abs(f).max(initial=0.0)) + 1.0
    kappa = (1 + alpha) / (1 - alpha)
    return (tolerance * float(np.linalg.norm(seeds)) / (1 - alpha)
            + 8 * kappa * np.finfo(np.float64).eps * scale + 2 * U32 * scale)


@pytest.fixture(scope="module")
def gallery(split_features) -> tuple[np.ndarray, np.ndarray]:
    """(queries, gallery) of real features: 20 queries, 180 gallery items."""
    return split_features


# -- a hand-worked graph ---------------------------------------------------------------------------
# Five items, lists of k = 3 (the item first) with these similarities:
#   0: [0, 1, 2]  (1, .9, .2)     mutual: 0-1 (both list each other)
#   1: [1, 0, 2]  (1, .9, .9)             1-2
#   2: [2, 1, 3]  (1, .9, .5)             3-4; 0-2, 2-3, 3-1, 4-0 are one-sided
#   3: [3, 4, 1]  (1, .8, .1)
#   4: [4, 3, 0]  (1, .8, .05)
# gamma = 3: w01 = w12 = .9^3 = .729, w34 = .8^3 = .512.
# degrees (.729, 1.458, .729, .512, .512): S01 = S12 = .729 / sqrt(.729 * 1.458) = 1/sqrt(2),
# S34 = .512 / .512 = 1.
# y = e_0, alpha = 1/2, c = alpha / sqrt(2):  f0 = 1 + c f1, f2 = c f1, f1 = c (f0 + f2)
#   -> f1 = c / (1 - 2c^2) = (sqrt(2)/4) / (3/4) = sqrt(2)/3, f0 = 1 + c^2/(1 - 2c^2) = 7/6,
#      f2 = 1/6, f3 = f4 = 0 (another component: never reached).
HAND_LISTS = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 3], [3, 4, 1], [4, 3, 0]])
HAND_SIMILARITIES = np.array([[1, .9, .2], [1, .9, .9], [1, .9, .5], [1, .8, .1],
                              [1, .8, .05]], np.float32)


def test_hand_worked_graph_transition_and_scores():
    affinity = mutual_affinity(HAND_LISTS, HAND_SIMILARITIES, 3.0)
    w = float(np.float32(0.9)) ** 3
    expected = np.zeros((5, 5))
    expected[0, 1] = expected[1, 0] = expected[1, 2] = expected[2, 1] = w
    expected[3, 4] = expected[4, 3] = float(np.float32(0.8)) ** 3
    np.testing.assert_allclose(affinity.toarray(), expected, rtol=1e-15)
    degree, inverse = inverse_sqrt_degree(affinity)
    transition = normalised(affinity, inverse).toarray()
    half = np.sqrt(0.5)
    np.testing.assert_allclose(transition, [[0, half, 0, 0, 0], [half, 0, half, 0, 0],
                                            [0, half, 0, 0, 0], [0, 0, 0, 0, 1],
                                            [0, 0, 0, 1, 0]], atol=1e-15)
    seeds = np.zeros((5, 1))
    seeds[0] = 1.0
    solution = conjugate_gradient(
        shared_operator(sparse_tensor(normalised(affinity, inverse), CPU), 0.5),
        torch.from_numpy(seeds), 1e-12, 50)
    f = solution.f.numpy()
    np.testing.assert_allclose(f[:, 0], [7 / 6, np.sqrt(2) / 3, 1 / 6, 0, 0], atol=1e-12)
    assert (f[3:] == 0).all()  # never touched, exactly 0
    # the ranking: reached 0, 1, 2 by f; then 4, 3 by their similarity to the query
    similarity = np.array([[0.9, 0.7, 0.5, 0.1, 0.3]], np.float32)
    distances, indices, reached = rank_scores(f, lambda rows: similarity[rows], 5)
    assert indices[0].tolist() == [0, 1, 2, 4, 3] and reached.tolist() == [3]
    np.testing.assert_allclose(distances[0], [-7 / 6, -np.sqrt(2) / 3, -1 / 6, 0.7, 0.9],
                               atol=1e-6)
    # leaving item 1 out cuts 0 from 2: its scale is 0 and so are 0's and 2's (no other edge)
    scaling = left_out_scaling(affinity, degree, inverse, np.array([1]))
    assert scaling[:3, 0].tolist() == [0.0, 0.0, 0.0]
    left = conjugate_gradient(left_out_operator(sparse_tensor(affinity, CPU),
                                                torch.from_numpy(scaling), 0.5),
                              torch.from_numpy(seeds), 1e-12, 50)
    np.testing.assert_allclose(left.f[:, 0].numpy(), [1, 0, 0, 0, 0], atol=1e-15)


def test_mutual_graph_equals_the_plain_loop_and_is_symmetric(gallery):
    _, features = gallery
    for k in (5, 20, 50):
        lists, similarity = loop_lists(features, k)
        built = mutual_affinity(knn_graph(features, k).indices, knn_graph(features, k)
                                .similarities, 3.0)
        dense = built.toarray()
        np.testing.assert_allclose(dense, loop_affinity(lists, similarity, 3.0), rtol=1e-15)
        assert (dense == dense.T).all() and (np.diag(dense) == 0).all()
        assert built.nnz > 0 and (built.data > 0).all()


def test_default_cg_equals_textbook_cg(gallery):
    """The defaults (20 steps, tolerance 1e-6: stopped before converging) take the same steps
    as one textbook CG loop per query on the dense matrix."""
    queries, features = gallery
    reranker = create_reranker("diffusion", device="cpu").fit(features)
    transition = reranker._transition.toarray()
    matrix = np.eye(len(features)) - 0.99 * transition
    result = reranker.rerank(queries[:5], len(features))
    for row, query in enumerate(queries[:5]):
        similarity = canonical_similarity(query[None], features)[0]
        seeds_ids = np.lexsort((np.arange(len(features)), -similarity))[:10]
        y = np.zeros(len(features))
        y[seeds_ids] = np.maximum(similarity[seeds_ids].astype(np.float64), 0) ** 3
        x, r = np.zeros_like(y), y.copy()
        p, rr = r.copy(), r @ r
        for _ in range(20):
            product = matrix @ p
            step = rr / (p @ product)
            x, r = x + step * p, r - step * product
            if np.sqrt(r @ r) <= 1e-6 * np.linalg.norm(y):
                break
            p, rr = r + (r @ r) / rr * p, r @ r
        assert result.details["cg_iterations"][row] == 20
        reached = x != 0
        reference = reference_distances(x, reached, similarity)
        assert_order_matches(result.indices[row], reference, atol=1e-9 * np.abs(x).max()
                             + 2 * U32 * (np.abs(x).max() + 1), values=result.distances[row],
                             min_pinned=50, label=f"query {row}")


@pytest.mark.parametrize(("k", "kq", "alpha", "gamma"),
                         [(50, 10, 0.99, 3.0), (10, 5, 0.9, 1.0), (30, 1, 0.5, 3.0)])
def test_batch_and_online_match_the_dense_solve(gallery, k, kq, alpha, gamma):
    queries, features = gallery
    reranker = create_reranker("diffusion", device="cpu", k=k, kq=kq, alpha=alpha, gamma=gamma,
                               **CONVERGED).fit(features)
    lists, similarity = loop_lists(features, k)
    affinity = loop_affinity(lists, similarity, gamma)
    batch = reranker.rerank(queries, len(features))
    online = reranker.rerank(queries, len(features), mode="online")
    compared = 0
    for row, query in enumerate(queries):
        to_query = canonical_similarity(query[None], features)[0]
        seed_ids = np.lexsort((np.arange(len(features)), -to_query))[:kq]
        seeds = np.zeros(len(features))
        seeds[seed_ids] = np.maximum(to_query[seed_ids].astype(np.float64), 0) ** gamma
        f = dense_diffusion(affinity, seeds, alpha)
        reached = within_hops(affinity, seeds, int(batch.details["cg_iterations"][row]) - 1)
        reference = reference_distances(np.where(reached, f, 0.0), reached, to_query)
        atol = diffusion_atol(seeds, f, alpha, CONVERGED["tolerance"])
        for result in (batch, online):
            compared += assert_order_matches(result.indices[row], reference, atol=atol,
                                             values=result.distances[row],
                                             label=f"query {row}")
    assert compared > len(queries) * 20


def test_leave_one_out_matches_the_dense_solve_without_the_item(gallery):
    """Each item against the graph without it: its row and column of W removed (its
    neighbours' degrees lowered), seeds its kq nearest but itself; it is never returned."""
    _, features = gallery
    k, kq, alpha = 20, 10, 0.99
    reranker = create_reranker("diffusion", device="cpu", k=k, kq=kq, alpha=alpha,
                               **CONVERGED).fit(features)
    result = reranker.rerank(None)
    assert not (result.indices == np.arange(len(features))[:, None]).any()
    lists, similarity = loop_lists(features, k)
    affinity = loop_affinity(lists, similarity, 3.0)
    for item in range(0, len(features), 9):
        rest = affinity.copy()
        rest[item, :] = rest[:, item] = 0
        order = [j for j in np.lexsort((np.arange(len(features)), -similarity[item]))
                 if j != item][:kq]
        seeds = np.zeros(len(features))
        seeds[order] = np.maximum(similarity[item, order].astype(np.float64), 0) ** 3
        assert seeds[item] == 0  # it does not seed itself
        f = dense_diffusion(rest, seeds, alpha)
        reached = within_hops(rest, seeds, int(result.details["cg_iterations"][item]) - 1)
        reference = reference_distances(np.where(reached, f, 0.0), reached, similarity[item],
                                        excluded=item)
        assert_order_matches(result.indices[item], reference,
                             atol=diffusion_atol(seeds, f, alpha, CONVERGED["tolerance"]),
                             values=result.distances[item], min_pinned=20,
                             label=f"item {item}")


def test_alpha_zero_gives_the_seed_order_then_the_cosine_order(gallery):
    """alpha = 0: f = y, so the kq seeds come first by similarity and everything else follows
    by similarity: the original cosine ranking."""
    queries, features = gallery
    reranker = create_reranker("diffusion", device="cpu", alpha=0.0).fit(features)
    for mode in ("batch", "online"):
        result = reranker.rerank(queries, len(features), mode=mode)
        if mode == "batch":
            assert (result.details["cg_iterations"] == 1).all()  # A = I: one step
        similarity = canonical_similarity(queries, features)
        assert_order_matches(result.indices, similarity, atol=4 * U32, larger_is_better=True,
                             min_pinned=100, label=mode)
        assert (result.indices[:, :10] == np.lexsort(
            (np.tile(np.arange(len(features)), (len(queries), 1)), -similarity), axis=1)[:, :10]
                ).all()


def test_online_equals_batch_and_a_shared_graph_changes_nothing(gallery):
    queries, features = gallery
    bare = create_reranker("diffusion", device="cpu").fit(features)
    shared = create_reranker("diffusion", device="cpu").fit(
        GalleryContext(features, knn=knn_graph(features, 64)))
    batch = bare.rerank(queries, 40)
    for row, query in enumerate(queries):
        online = bare.rerank_online(query, 40)
        np.testing.assert_array_equal(online.indices[0], batch.indices[row])
        np.testing.assert_allclose(online.distances[0], batch.distances[row], rtol=1e-6)
    np.testing.assert_array_equal(shared.rerank(queries, 40).indices, batch.indices)


# -- the torch twins (what a batch runs on a GPU), on torch's CPU device -------------------------
def test_torch_rank_scores_equals_rank_scores():
    """Reached items by f (exact ties to the smaller row), the excluded item never, columns
    reaching fewer than k items completed by similarity: the same arrays as numpy's."""
    rng = np.random.default_rng(3)
    size, width = 60, 9
    f = rng.random((size, width))
    f[rng.random((size, width)) < 0.5] = 0.0           # unreached items
    f[:, 2] = 0.0                                       # a column that reaches nothing
    f[[4, 9, 30], 3] = f[1, 3]                          # exact ties in f
    f[:55, 5] = 0.0                                     # a column reaching 5 items or fewer
    similarity = rng.random((width, size)).astype(np.float32)
    similarity[6, [7, 8]] = similarity[6, 3]            # tied similarities of unreached items
    exclude = rng.integers(0, size, width)
    for k, left_out in ((5, None), (20, None), (size - 1, exclude), (12, exclude)):
        expected = rank_scores(f, lambda rows: similarity[rows], k, left_out)
        got = torch_rank_scores(torch.from_numpy(f), lambda rows: similarity[rows], k,
                                left_out)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert (got[2] < 12).any() and (got[2] >= 12).any()   # both branches ran


@pytest.mark.parametrize("params", [{}, {"k": 5, "kq": 2, "alpha": 0.9}])
def test_torch_twins_rank_as_numpy(gallery, params):
    """Batch mode with the torch twins (its GPU path: seeds and top k with torch) gives the
    numpy path's rankings: the same seeds (canonical similarities) and the same CG, new queries
    and leave-one-out, top 40 and whole rankings (where unreached items are completed)."""
    queries, features = gallery
    reranker = create_reranker("diffusion", device="cpu", **params).fit(features)
    for query_features, k in ((queries, 40), (queries, len(features)), (None, 40),
                              (None, len(features) - 1)):
        expected = reranker._walk_batch(query_features, k, torch_twins=False)
        got = reranker._walk_batch(query_features, k, torch_twins=True)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        for key in ("cg_iterations", "reached"):
            np.testing.assert_array_equal(got[2][key], expected[2][key])
    assert (expected[2]["reached"] < len(features) - 1).any()   # unreached items completed


def test_an_approximate_graph_is_read_and_kept_symmetric(gallery):
    """A non-canonical graph whose two directions of a pair differ in the last bit still gives
    a symmetric W (their mean), and fit reads it instead of searching."""
    _, features = gallery
    exact = knn_graph(features, 50)
    nudged = exact.similarities.copy()
    nudged[:, 1:] = np.nextafter(nudged[:, 1:], np.float32(0))
    nudged[::2, 1:] = exact.similarities[::2, 1:]
    graph = KnnGraph(exact.indices, nudged, exact.farthest, canonical=False)
    reranker = create_reranker("diffusion", device="cpu").fit(GalleryContext(features, knn=graph))
    dense = reranker._affinity.toarray()
    assert (dense == dense.T).all()


def test_evidence_contributions_sum_to_the_online_score(gallery):
    """f_item = sum_j y_j g_j(item) over the seeds, for the truncated default CG too (the
    same polynomial replayed), and the explained f is the online distance's."""
    queries, features = gallery
    for params in ({}, CONVERGED):
        reranker = create_reranker("diffusion", device="cpu", **params).fit(features)
        online = reranker.rerank_online(queries[0])
        for position in (0, 3, 30, len(features) - 1):
            item = int(online.indices[0, position])
            evidence = reranker.explain(queries[0], item)
            f = evidence.numbers["diffusion score f"]
            seeds = evidence.group("seeds")
            assert len(seeds.rows) == 10
            assert abs(seeds.values.sum() - f) <= 1e-9 * max(abs(f), 1.0)
            if f != 0:
                assert np.float32(-f) == online.distances[0, position]
            assert evidence.numbers["alpha"] == 0.99 and evidence.numbers["gamma"] == 3.0
            assert (reranker._affinity[item, evidence.group("mutual neighbours").rows]
                    .toarray() > 0).all()


def test_evidence_seed_walks_equal_the_dense_green_function(gallery):
    """Converged, a seed's walk g_j is column j of (I - alpha S)^-1 (the dense inverse)."""
    queries, features = gallery
    reranker = create_reranker("diffusion", device="cpu", **CONVERGED).fit(features)
    inverse = np.linalg.inv(np.eye(len(features)) - 0.99 * reranker._transition.toarray())
    item = 7
    evidence = reranker.explain(queries[1], item)
    seeds = evidence.group("seeds")
    weights = np.maximum(canonical_similarity(queries[1:2], features)[0, seeds.rows]
                         .astype(np.float64), 0) ** 3
    np.testing.assert_allclose(seeds.values, weights * inverse[item, seeds.rows],
                               atol=1e-9 * np.abs(inverse).max())


def test_replay_is_linear_in_the_seeds():
    rng = np.random.default_rng(0)
    raw = rng.random((30, 30))
    affinity = np.where(raw > 0.8, raw, 0)
    affinity = np.triu(affinity, 1) + np.triu(affinity, 1).T
    w = sp.csr_matrix(affinity)
    _, inverse = inverse_sqrt_degree(w)
    apply = shared_operator(sparse_tensor(normalised(w, inverse), CPU), 0.9)
    ids = np.array([[2, 5, 11]])
    y = seed_vectors(ids, np.array([[0.9, 0.5, 0.7]]), 30, 3.0)
    solution = conjugate_gradient(apply, torch.from_numpy(y), 0.0, 4)  # stopped early
    units = np.zeros((30, 3))
    units[ids[0], np.arange(3)] = 1
    walks = replay(apply, torch.from_numpy(units), solution.steps[:, 0],
                   solution.directions[:, 0]).numpy()
    np.testing.assert_allclose(walks @ y[ids[0], 0], solution.f[:, 0].numpy(), atol=1e-12)


def test_blocks_of_right_hand_sides_change_nothing(gallery, monkeypatch):
    """A batch cut into blocks of 7 columns (a small memory budget) ranks as one block."""
    from engine.rerank import diffusion

    queries, features = gallery
    reranker = create_reranker("diffusion", device="cpu").fit(features)
    whole_loo, whole = reranker.rerank(None, 30), reranker.rerank(queries, 30)
    monkeypatch.setattr(diffusion, "BLOCK_BYTES", 7 * 8 * len(features))
    assert reranker._block_columns(len(features), len(features)) == 7
    for blocked, one in ((reranker.rerank(None, 30), whole_loo),
                         (reranker.rerank(queries, 30), whole)):
        np.testing.assert_array_equal(blocked.indices, one.indices)
        np.testing.assert_allclose(blocked.distances, one.distances, rtol=1e-6)


def test_batch_refusal_names_the_memory(monkeypatch):
    from engine.errors import TooLargeError
    from engine.rerank import _scale

    monkeypatch.setattr(_scale, "memory_budget", lambda: 10 * 2**20)
    reranker = create_reranker("diffusion", device="cpu")
    message = reranker.batch_refusal(1_000_000, 1_000_000)
    assert message is not None and "GiB" in message and "1000000" in message
    assert reranker.batch_refusal(100, 100) is None
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 8)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    reranker.fit(features)
    monkeypatch.setattr(_scale, "memory_budget", lambda: 1000)
    with pytest.raises(TooLargeError, match="GiB"):
        reranker.rerank(None, 5)
