"""AQE, alpha-QE and alpha-DBA (`engine/rerank/aqe.py`, `alpha_qe.py`, `dba.py`, `_expansion.py`):
hand-worked 2-D cases, plain-loop oracles compared tie-aware, the reductions between the three
(alpha = 0 is AQE, n = 0 is the cosine ranking, DBA's qe_n is alpha-QE over the augmented
gallery), leave-one-out, the shared graph, and the evidence adding up to the final similarity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tie_aware import U32, assert_order_matches, perturb_ulps

from engine.core.knn import canonical_similarity, knn_graph
from engine.core.types import GalleryContext, KnnGraph
from engine.errors import TooLargeError
from engine.rerank import create_reranker
from engine.rerank._expansion import expansion_weights
from engine.rerank.dba import augment, torch_augment

QE_METHODS = ("aqe", "alpha_qe")


def make(name: str, **params):
    return create_reranker(name, device="cpu", **params)


def unit(*rows: tuple[float, ...]) -> np.ndarray:
    array = np.array(rows, np.float64)
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


# -- the oracles: a plain loop over queries, as the papers state the methods ---------------------
def _best(similarities: np.ndarray, count: int, skip: int | None = None) -> list[int]:
    """The `count` items of highest similarity (ties: smaller index), `skip` left out."""
    order = sorted((j for j in range(len(similarities)) if j != skip),
                   key=lambda j: (-similarities[j], j))
    return order[:count]


def _weight(similarity: float, alpha: float) -> float:
    return max(float(similarity), 0.0) ** alpha


def expanded_query(query: np.ndarray, searched: np.ndarray, n: int, alpha: float,
                   skip: int | None = None) -> np.ndarray:
    """q + sum of the n nearest searched rows (by canonical similarity), each weighted
    s^alpha, normalised; float64."""
    similarities = canonical_similarity(query[None], searched)[0]
    total = np.asarray(query, np.float64).copy()
    for j in _best(similarities, n, skip):
        total += _weight(similarities[j], alpha) * np.asarray(searched[j], np.float64)
    return total / np.linalg.norm(total)


def qe_reference(queries: np.ndarray | None, gallery: np.ndarray, n: int, alpha: float,
                 searched: np.ndarray | None = None) -> np.ndarray:
    """(Q, G) reference distances 1 - <expanded query, searched row>; queries None: each
    gallery item against the rest (its own column +inf, never its own neighbour)."""
    searched = gallery if searched is None else searched
    leave_one_out = queries is None
    rows = gallery if leave_one_out else queries
    reference = np.empty((len(rows), len(searched)))
    for i, query in enumerate(rows):
        skip = i if leave_one_out else None
        expanded = expanded_query(query, searched, n, alpha, skip)
        reference[i] = [1.0 - float(expanded @ np.asarray(row, np.float64)) for row in searched]
        if leave_one_out:
            reference[i, i] = np.inf
    return reference


def augmented_reference(gallery: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """Every item replaced by the normalised sum of itself and its n nearest, weighted s^alpha,
    stored as float32 (the rows the method searches)."""
    similarities = canonical_similarity(gallery, gallery)
    out = np.empty(gallery.shape, np.float32)
    for i in range(len(gallery)):
        total = np.asarray(gallery[i], np.float64).copy()   # itself: similarity 1, weight 1
        for j in _best(similarities[i], n, skip=i):
            total += _weight(similarities[i, j], alpha) * np.asarray(gallery[j], np.float64)
        out[i] = total / np.linalg.norm(total)
    return out


def atol_for(dim: int, augmented: bool = False) -> float:
    """Largest error of a returned distance against the float64 reference: the expanded query
    rounded to float32 (at most one rounding per component: dim * U32 over the dot product), a
    float32 dot product of dim terms (dim * U32), 1 - s rounded (a few U32); DBA's float32
    augmented rows are the reference's too, so they add nothing."""
    return (2 * dim + 8) * U32


# -- hand-worked cases in 2-D -------------------------------------------------------------------
#   q = (1, 0); a = (0.8, 0.6), b = (0.6, -0.8), c = (-0.6, 0.8), d = (0.28, 0.96)
#   cosines to q: a 0.8, b 0.6, c -0.6, d 0.28, so the cosine order is a, b, d, c.
HAND = unit((0.8, 0.6), (0.6, -0.8), (-0.6, 0.8), (0.28, 0.96))
Q = unit((1.0, 0.0))


def _hand_check(result, order, scores):
    np.testing.assert_array_equal(result.indices, [order])
    np.testing.assert_allclose(result.distances, [1.0 - np.asarray(scores)], atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_aqe_by_hand(mode):
    # n = 1: q + a = (1.8, 0.6), norm sqrt(3.6); dot products with a, d, b, c: 1.8, 1.08, 0.6,
    # -0.6: d (0.569) overtakes b (0.316)
    result = make("aqe", n=1).fit(HAND).rerank(Q, mode=mode)
    _hand_check(result, [0, 3, 1, 2], np.array([1.8, 1.08, 0.6, -0.6]) / math.sqrt(3.6))
    # n = 2: q + a + b = (2.4, -0.2), norm sqrt(5.8); a 1.8, b 1.6, d 0.48, c -1.6
    result = make("aqe", n=2).fit(HAND).rerank(Q, mode=mode)
    _hand_check(result, [0, 1, 3, 2], np.array([1.8, 1.6, 0.48, -1.6]) / math.sqrt(5.8))
    np.testing.assert_array_equal(result.details["expansion"], [[0, 1]] if mode == "batch"
                                  else [0, 1])


@pytest.mark.parametrize("mode", ["batch", "online"])
def test_alpha_qe_by_hand(mode):
    # n = 1, alpha = 3: q + 0.8^3 a = (1.4096, 0.3072), norm sqrt(2.081344);
    # a 1.312, d 0.6896, b 0.6, c -0.6
    result = make("alpha_qe", n=1, alpha=3).fit(HAND).rerank(Q, mode=mode)
    _hand_check(result, [0, 3, 1, 2],
                np.array([1.312, 0.6896, 0.6, -0.6]) / math.sqrt(2.081344))
    # n = 2, alpha = 3: q + 0.512 a + 0.216 b = (1.5392, 0.1344), norm sqrt(2.3872);
    # a 1.312, b 0.816, d 0.56, c -0.816: b's small weight keeps d behind it
    result = make("alpha_qe", n=2, alpha=3).fit(HAND).rerank(Q, mode=mode)
    _hand_check(result, [0, 1, 3, 2], np.array([1.312, 0.816, 0.56, -0.816]) / math.sqrt(2.3872))
    weights = result.details["weights"]
    np.testing.assert_allclose(np.ravel(weights), [0.512, 0.216], atol=1e-6)


def test_leave_one_out_by_hand():
    """Item 0 (= q) as the query: expanded by a (its nearest other item), never by itself, and
    not returned: the ranking of test_aqe_by_hand over items 1..4."""
    gallery = np.vstack([Q, HAND])
    result = make("aqe", n=1).fit(gallery).rerank(None)
    np.testing.assert_array_equal(result.indices[0], [1, 4, 2, 3])
    np.testing.assert_allclose(result.distances[0],
                               1.0 - np.array([1.8, 1.08, 0.6, -0.6]) / math.sqrt(3.6),
                               atol=1e-6)
    np.testing.assert_array_equal(result.details["expansion"][0], [1])


#   DBA gallery: a = (1, 0), b = (0.8, 0.6), c = (0, 1); nearest other item: a -> b (0.8),
#   b -> a (0.8, c is 0.6), c -> b (0.6). Query (0, 1): cosine order c, b, a.
DBA_HAND = unit((1.0, 0.0), (0.8, 0.6), (0.0, 1.0))
DBA_QUERY = unit((0.0, 1.0))


def test_dba_by_hand():
    # alpha = 3: a + 0.512 b = (1.4096, 0.3072); b + 0.512 a = (1.312, 0.6);
    # c + 0.216 b = (0.1728, 1.1296)
    sums = np.array([[1.4096, 0.3072], [1.312, 0.6], [0.1728, 1.1296]])
    augmented = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    reranker = make("dba", n=1, alpha=3).fit(DBA_HAND)
    np.testing.assert_allclose(reranker.augmented_features(), augmented, atol=1e-7)
    for mode in ("batch", "online"):
        result = reranker.rerank(DBA_QUERY, mode=mode)
        _hand_check(result, [2, 1, 0], augmented[[2, 1, 0], 1])
    # alpha = 0 (plain DBA): a and b both become (1.8, 0.6) / sqrt(3.6), an exact tie that goes
    # to the smaller index; c becomes (0.8, 1.6) / sqrt(3.2)
    result = make("dba", n=1, alpha=0).fit(DBA_HAND).rerank(DBA_QUERY)
    _hand_check(result, [2, 0, 1], [1.6 / math.sqrt(3.2), 0.6 / math.sqrt(3.6),
                                    0.6 / math.sqrt(3.6)])
    assert result.distances[0, 1] == result.distances[0, 2]


def test_dba_with_query_expansion_by_hand():
    # plain DBA as above; qe_n = 1, qe_alpha = 0: the query plus its nearest augmented row,
    # c' = (0.8, 1.6) / sqrt(3.2) = (0.4472, 0.8944): q + c' = (0.4472, 1.8944)
    c_aug = np.array([0.8, 1.6]) / math.sqrt(3.2)
    ab_aug = np.array([1.8, 0.6]) / math.sqrt(3.6)
    expanded = np.array([0.0, 1.0]) + c_aug
    expanded /= np.linalg.norm(expanded)
    result = make("dba", n=1, alpha=0, qe_n=1, qe_alpha=0).fit(DBA_HAND).rerank(DBA_QUERY)
    _hand_check(result, [2, 0, 1], [expanded @ c_aug, expanded @ ab_aug, expanded @ ab_aug])
    np.testing.assert_array_equal(result.details["expansion"], [[2]])


# -- oracles on real features ------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["features", "perturbed"])
def real(request, split_features) -> tuple[np.ndarray, np.ndarray]:
    """(queries, gallery) of real features, and the same moved by a few ulps (other pairs of
    items near-tied, as on another CPU)."""
    queries, gallery = split_features
    if request.param:
        return perturb_ulps(queries, seed=1), perturb_ulps(gallery, seed=2)
    return queries, gallery


QE_SETTINGS = [("aqe", {"n": 10}), ("aqe", {"n": 3}), ("alpha_qe", {"n": 50, "alpha": 3.0}),
               ("alpha_qe", {"n": 7, "alpha": 1.5})]


@pytest.mark.parametrize(("name", "params"), QE_SETTINGS)
def test_query_expansion_matches_the_loop(name, params, real):
    queries, gallery = real
    n, alpha = params["n"], params.get("alpha", 0.0)
    reranker = make(name, **params).fit(gallery)
    atol = atol_for(gallery.shape[1])
    batch = reranker.rerank(queries)
    assert_order_matches(batch.indices, qe_reference(queries, gallery, n, alpha), atol=atol,
                         values=batch.distances, min_pinned=len(queries) * 20, label=name)
    online = reranker.rerank(queries[:4], 30, mode="online")
    assert_order_matches(online.indices, qe_reference(queries[:4], gallery, n, alpha),
                         atol=atol, values=online.distances, label=f"{name} online")
    loo = reranker.rerank(None, 25)
    assert_order_matches(loo.indices, qe_reference(None, gallery, n, alpha), atol=atol,
                         values=loo.distances, min_pinned=len(gallery) * 5,
                         label=f"{name} leave-one-out")


DBA_SETTINGS = [{"n": 10, "alpha": 3.0}, {"n": 5, "alpha": 0.0},
                {"n": 10, "alpha": 3.0, "qe_n": 5, "qe_alpha": 3.0},
                {"n": 3, "alpha": 0.0, "qe_n": 2, "qe_alpha": 0.0}]


@pytest.mark.parametrize("params", DBA_SETTINGS, ids=lambda p: ",".join(f"{k}={v}" for k, v in
                                                                          p.items()))
def test_dba_matches_the_loop(params, real):
    queries, gallery = real
    reranker = make("dba", **params).fit(gallery)
    augmented = augmented_reference(gallery, params["n"], params["alpha"])
    # the augmented rows: float64 sums of the same items, each rounded once to float32
    np.testing.assert_allclose(reranker.augmented_features(), augmented, atol=4 * U32)
    qe_n, qe_alpha = params.get("qe_n", 0), params.get("qe_alpha", 3.0)
    atol = atol_for(gallery.shape[1], augmented=True)
    batch = reranker.rerank(queries)
    assert_order_matches(batch.indices, qe_reference(queries, gallery, qe_n, qe_alpha, augmented),
                         atol=atol, values=batch.distances, min_pinned=len(queries) * 20)
    # leave-one-out: item i's original feature against the augmented gallery (computed once
    # from every item, i included), i neither a neighbour of its expansion nor returned
    loo = reranker.rerank(None, 25)
    reference = np.empty((len(gallery), len(gallery)))
    for i, query in enumerate(gallery):
        expanded = expanded_query(query, augmented, qe_n, qe_alpha, skip=i)
        reference[i] = 1.0 - augmented.astype(np.float64) @ expanded
        reference[i, i] = np.inf
    assert_order_matches(loo.indices, reference, atol=atol, values=loo.distances,
                         min_pinned=len(gallery) * 5, label="dba leave-one-out")


# -- the torch twins (the GPU's batch path), run on torch's CPU device ------------------------
CPU = torch.device("cpu")


@pytest.mark.parametrize(("name", "params"), [*QE_SETTINGS, ("dba", DBA_SETTINGS[2]),
                                              ("dba", DBA_SETTINGS[3])])
def test_torch_batch_matches_the_loop(name, params, real):
    """`_rerank_batch_torch` (what batch mode runs on a GPU) against the same oracles as the
    numpy path, new queries and leave-one-out, with and without the gallery graph; the
    expansion neighbours are the numpy path's up to ties of their canonical similarities."""
    queries, gallery = real
    reranker = make(name, **params).fit(gallery)
    if name == "dba":
        searched = augmented_reference(gallery, params["n"], params["alpha"])
        n, alpha = params["qe_n"], params["qe_alpha"]
    else:
        searched, n, alpha = gallery, params["n"], params.get("alpha", 0.0)
    atol = atol_for(gallery.shape[1])
    distances, indices, details = reranker._rerank_batch_torch(queries, 40, CPU)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    assert_order_matches(indices, qe_reference(queries, gallery, n, alpha, searched), atol=atol,
                         values=distances, min_pinned=len(queries) * 20, label=name)
    numpy_details = reranker.rerank(queries, 40).details
    assert details["expansion"].shape == numpy_details["expansion"].shape
    np.testing.assert_allclose(np.sort(details["weights"], axis=1),
                               np.sort(numpy_details["weights"], axis=1), rtol=1e-6)
    contexts = [gallery] if name == "dba" else [gallery, GalleryContext(
        gallery, knn=knn_graph(gallery, n + 1))]
    for context in contexts:
        reranker = make(name, **params).fit(context)
        distances, indices, _ = reranker._rerank_batch_torch(None, 25, CPU)
        reference = np.empty((len(gallery), len(searched)))
        for i, query in enumerate(gallery):
            expanded = expanded_query(query, searched, n, alpha, skip=i)
            reference[i] = 1.0 - searched.astype(np.float64) @ expanded
            reference[i, i] = np.inf
        assert_order_matches(indices, reference, atol=atol, values=distances,
                             min_pinned=len(gallery) * 5, label=f"{name} leave-one-out")


def test_torch_augmentation_matches_numpy(split_features):
    """DBA's augmentation with the torch twins (its fit on a GPU) gives the numpy rows: the
    same float64 sums, each rounded once to float32."""
    _, gallery = split_features
    graph = knn_graph(gallery, 9)
    weights = expansion_weights(graph.similarities, 3.0)
    expected, expected_norms = augment(gallery, graph.indices, weights)
    augmented, norms = torch_augment(gallery, graph.indices, weights, CPU)
    assert augmented.dtype == np.float32 and augmented.shape == gallery.shape
    np.testing.assert_allclose(augmented, expected, atol=2 * U32)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-12)
    # a sum that cancels keeps the item's own row and reports norm 0, as in numpy
    opposite = np.stack([gallery[0], -gallery[0]])
    units, lengths = torch_augment(opposite, np.array([[0, 1], [1, 0]]), np.ones((2, 2)), CPU)
    np.testing.assert_array_equal(units, opposite)
    np.testing.assert_array_equal(lengths, [0.0, 0.0])


# -- reductions ----------------------------------------------------------------------------------
def test_alpha_zero_is_aqe_exactly(split_features):
    queries, gallery = split_features
    aqe = make("aqe", n=12).fit(gallery)
    alpha_qe = make("alpha_qe", n=12, alpha=0).fit(gallery)
    for run in (lambda r: r.rerank(queries), lambda r: r.rerank(None, 40),
                lambda r: r.rerank(queries[:3], 40, mode="online")):
        a, b = run(aqe), run(alpha_qe)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.distances, b.distances)


def test_no_expansion_is_the_cosine_ranking(split_features):
    """n = 0 (and DBA with n = 0, qe_n = 0) ranks by the plain cosine similarity."""
    queries, gallery = split_features
    cosine = 1.0 - queries.astype(np.float64) @ gallery.astype(np.float64).T
    loo = 1.0 - gallery.astype(np.float64) @ gallery.astype(np.float64).T
    np.fill_diagonal(loo, np.inf)
    atol = (gallery.shape[1] + 4) * U32      # one float32 dot product of dim terms, 1 - s
    for name, params in (("aqe", {"n": 0}), ("alpha_qe", {"n": 0}),
                         ("dba", {"n": 0, "qe_n": 0})):
        reranker = make(name, **params).fit(gallery)
        for mode in ("batch", "online"):
            result = reranker.rerank(queries, 50, mode=mode)
            assert_order_matches(result.indices, cosine, atol=atol, values=result.distances,
                                 label=f"{name} {mode}")
        result = reranker.rerank(None, 50)
        assert_order_matches(result.indices, loo, atol=atol, values=result.distances,
                             label=f"{name} leave-one-out")
        assert result.details["expansion"].shape == (len(gallery), 0)


def test_dba_query_expansion_is_alpha_qe_over_the_augmented_gallery(split_features):
    """The papers' "alpha-QE + alpha-DBA": DBA's qe_n / qe_alpha give exactly alpha-QE with
    n / alpha fitted on the augmented gallery (new queries; leave-one-out differs: there the
    query is the item's original feature, not its augmented row)."""
    queries, gallery = split_features
    dba = make("dba", n=8, alpha=3, qe_n=6, qe_alpha=2).fit(gallery)
    alpha_qe = make("alpha_qe", n=6, alpha=2).fit(dba.augmented_features())
    for mode in ("batch", "online"):
        a, b = dba.rerank(queries, 60, mode=mode), alpha_qe.rerank(queries, 60, mode=mode)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.distances, b.distances)
        if mode == "batch":
            np.testing.assert_array_equal(a.details["expansion"], b.details["expansion"])
        else:
            for x, y in zip(a.details["per_query"], b.details["per_query"], strict=True):
                np.testing.assert_array_equal(x["expansion"], y["expansion"])


def test_aqe_leave_one_out_is_the_item_searched_against_the_rest(split_features):
    """Leave-one-out of a QE method = the item's feature as a new query against the gallery
    without it (the expansion never uses the item itself)."""
    _, gallery = split_features
    loo = make("alpha_qe", n=9).fit(gallery).rerank(None)
    for i in (0, 17, len(gallery) - 1):
        rest = np.delete(np.arange(len(gallery)), i)
        alone = make("alpha_qe", n=9).fit(gallery[rest]).rerank_online(gallery[i])
        np.testing.assert_array_equal(rest[alone.indices[0]], loo.indices[i])
        np.testing.assert_allclose(alone.distances[0], loo.distances[i],
                                   atol=2 * atol_for(gallery.shape[1]))


@pytest.mark.parametrize("name", QE_METHODS)
def test_leave_one_out_reads_the_graph_and_agrees_without_it(name, split_features):
    """With the gallery's graph deep enough, leave-one-out takes the neighbours from it; the
    rankings agree with those computed by canonical similarity (same lists, ties by index)."""
    _, gallery = split_features
    reranker = make(name, n=10)
    assert reranker.graph_depth() == 11
    with_graph = reranker.fit(GalleryContext(gallery, knn=knn_graph(gallery, 11)))
    assert with_graph._lists is not None
    result = with_graph.rerank(None)
    reference = make(name, n=10).fit(gallery).rerank(None)
    by_item = np.full((len(gallery), len(gallery)), np.inf)
    np.put_along_axis(by_item, reference.indices, reference.distances, axis=1)
    assert_order_matches(result.indices, by_item, atol=2 * atol_for(gallery.shape[1]),
                         values=result.distances)
    assert not (result.indices == np.arange(len(gallery))[:, None]).any()


def test_dba_fit_augments_with_the_graph_it_is_given(split_features):
    """An approximate graph (here: lists deliberately other than the exact ones) is what DBA
    augments with, not a search of its own."""
    _, gallery = split_features
    exact = knn_graph(gallery, 6)
    size = len(gallery)
    indices = np.arange(size)[:, None] + 7 * np.arange(6)[None, :]   # i, i + 7, ..., i + 35
    indices %= size
    similarities = np.einsum("nd,nkd->nk", gallery.astype(np.float64),
                             gallery[indices].astype(np.float64)).astype(np.float32)
    similarities[:, 0] = 1.0
    graph = KnnGraph(indices, similarities, exact.farthest, canonical=False, recall=0.1)
    reranker = make("dba", n=5, alpha=3).fit(GalleryContext(gallery, knn=graph))
    weights = np.maximum(similarities.astype(np.float64), 0) ** 3
    sums = np.einsum("nk,nkd->nd", weights, gallery[indices].astype(np.float64))
    expected = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    np.testing.assert_allclose(reranker.augmented_features(), expected, atol=4 * U32)


def test_expansion_is_clamped_to_a_small_gallery(split_features):
    _, gallery = split_features
    reranker = make("aqe", n=10).fit(gallery[:5])
    online = reranker.rerank_online(gallery[7], 3)
    assert len(online.details["expansion"]) == 5 and "n=10 lowered to 5" in \
        online.details["clamped"]
    loo = reranker.rerank(None)
    assert loo.details["expansion"].shape == (5, 4)
    assert not (loo.indices == np.arange(5)[:, None]).any()
    dba = make("dba", n=10, qe_n=10).fit(gallery[:5])
    assert dba.rerank(None).details["augmented_with"] == 4


def test_dba_refuses_a_gallery_whose_augmented_copy_does_not_fit(split_features, monkeypatch):
    import engine.rerank.dba as dba_module

    monkeypatch.setattr(dba_module, "memory_budget", lambda: 1000)
    with pytest.raises(TooLargeError, match="augmented copy"):
        make("dba").fit(split_features[1])


# -- evidence ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "params"), [("aqe", {"n": 10}), ("alpha_qe", {})])
def test_qe_evidence_adds_up_to_the_final_similarity(name, params, split_features):
    queries, gallery = split_features
    reranker = make(name, **params).fit(gallery)
    alpha = reranker.params.as_dict().get("alpha", 0.0)
    query = queries[2]
    online = reranker.rerank_online(query)
    final = dict(zip(online.indices[0].tolist(), (1.0 - online.distances[0]).tolist(),
                     strict=True))
    similarities = canonical_similarity(query[None], gallery)[0]
    for item in [*online.indices[0, :3].tolist(), int(online.indices[0, -1]), 5]:
        evidence = reranker.explain(query, item)
        terms = evidence.group("expansion neighbours")
        weights = evidence.group("expansion weights")
        np.testing.assert_array_equal(terms.rows, online.details["expansion"])
        np.testing.assert_array_equal(weights.rows, terms.rows)
        np.testing.assert_allclose(weights.values,
                                   np.maximum(similarities[terms.rows], 0) ** alpha, rtol=1e-6)
        total = evidence.numbers["query's own term"] + terms.values.sum()
        assert total == pytest.approx(evidence.numbers["expanded similarity"], abs=1e-12)
        # what online mode computed for that item (float32 product): within its rounding
        assert evidence.numbers["expanded similarity"] == pytest.approx(final[item], abs=1e-5)
        assert evidence.numbers["cosine similarity"] == pytest.approx(
            float(similarities[item]), abs=1e-6)
        assert set(evidence.highlighted_rows().tolist()) == set(terms.rows.tolist())


@pytest.mark.parametrize("params", [{}, {"qe_n": 4, "qe_alpha": 3.0}])
def test_dba_evidence_adds_up_to_the_final_similarity(params, split_features):
    queries, gallery = split_features
    reranker = make("dba", **params).fit(gallery)
    graph = knn_graph(gallery, reranker.params.n + 1)
    query = queries[5]
    online = reranker.rerank_online(query)
    final = dict(zip(online.indices[0].tolist(), (1.0 - online.distances[0]).tolist(),
                     strict=True))
    for item in [*online.indices[0, :3].tolist(), 11]:
        evidence = reranker.explain(query, item)
        augmenting = evidence.group("augmenting neighbours")
        np.testing.assert_array_equal(augmenting.rows, graph.indices[item])
        np.testing.assert_allclose(evidence.group("augmentation weights").values,
                                   np.maximum(graph.similarities[item], 0) ** 3, rtol=1e-6)
        assert augmenting.values.sum() == pytest.approx(
            evidence.numbers["similarity to the augmented item"], abs=1e-12)
        assert evidence.numbers["similarity to the augmented item"] == pytest.approx(
            final[item], abs=1e-5)
        if params:
            expansion = evidence.group("query expansion neighbours")
            np.testing.assert_array_equal(expansion.rows, online.details["expansion"])
            total = evidence.numbers["query's own term"] + expansion.values.sum()
            assert total == pytest.approx(final[item], abs=1e-5)
