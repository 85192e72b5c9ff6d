"""Evidence (`Reranker.explain`) of k-reciprocal, GNN and ICFRR: hand-worked small graphs, and
on real and synthetic features the evidence reproduces the online computation (its final
distance is the one online mode returns for the item; its sets and weights give back the
method's intermediate numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.bench.measure import synthetic_collection
from engine.core.knn import neighbour_lists
from engine.core.types import Evidence, GalleryContext, KnnGraph
from engine.rerank import create_reranker
from engine.rerank.gnn import GNNReranker
from engine.rerank.k_reciprocal import _encode

ATOL = 1e-5  # sums of float32 weights recomputed in another order


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def two_clusters() -> np.ndarray:
    """Six unit vectors (test_k_reciprocal's tiny case): q, then the gallery a1, a2 | b0, b1,
    b2. cos(q, a1) = .9, cos(q, a2) = .8, cos(a1, a2) = .85; cos(b0, b1) = .95, cos(b0, b2)
    = .7, cos(b1, b2) = .75; 0 across the clusters."""
    gram = np.zeros((6, 6))
    gram[:3, :3] = [[1, 0.9, 0.8], [0.9, 1, 0.85], [0.8, 0.85, 1]]
    gram[3:, 3:] = [[1, 0.95, 0.7], [0.95, 1, 0.75], [0.7, 0.75, 1]]
    return unit(np.linalg.cholesky(gram))


def items_to_explain(order: np.ndarray) -> list[int]:
    """The online ranking's head, middle and tail."""
    n = len(order)
    return sorted({int(order[i]) for i in (0, 1, 2, 5, n // 3, n // 2, n - 2, n - 1)})


def online_distances(reranker, query: np.ndarray) -> np.ndarray:
    """(G,) every item's online distance (k = the gallery), by gallery row."""
    result = reranker.rerank_online(query)
    distances = np.empty(reranker.gallery.size)
    distances[result.indices[0]] = result.distances[0]
    return distances


def assert_evidence(evidence: Evidence, name: str, item: int) -> None:
    assert evidence.method == name and evidence.item == item
    assert evidence.summary and "\n" not in evidence.summary
    json.dumps(evidence.as_dict())


# -- k-reciprocal ----------------------------------------------------------------------------------
# Hand-worked in test_k_reciprocal (k1 = 2, k2 = 1, so V_qe = V): R*(q) = R*(a1) = R*(a2) =
# {q, a1, a2}, V[q] = [.367165, .332225, .300610], V[a1] = [.327182, .361592, .311225] over
# (q, a1, a2): the minima .327182 (at q), .332225 (a1), .300610 (a2) sum to m = .960017, so
# d_J = 1 - m / (2 - m) = .076892, and d' = 1 - cos = .1. Cluster B shares nothing: d_J = 1.
def test_k_reciprocal_hand_worked():
    nodes = two_clusters()
    reranker = create_reranker("k_reciprocal", k1=2, k2=1, lambda_value=0.3).fit(nodes[1:])
    evidence = reranker.explain(nodes[0], 0)
    assert_evidence(evidence, "k_reciprocal", 0)
    numbers = evidence.numbers
    assert numbers["shared weight"] == pytest.approx(0.960017, abs=1e-5)
    assert numbers["shared weight at the query"] == pytest.approx(0.327182, abs=1e-5)
    assert numbers["Jaccard distance"] == pytest.approx(0.076892, abs=1e-5)
    assert numbers["original distance"] == pytest.approx(0.1, abs=1e-6)
    assert numbers["largest squared distance"] == pytest.approx(2.0, abs=1e-6)
    assert numbers["final distance"] == pytest.approx(0.7 * 0.076892 + 0.3 * 0.1, abs=1e-5)
    shared = evidence.group("shared neighbours")
    np.testing.assert_array_equal(shared.rows, [0, 1])
    np.testing.assert_allclose(shared.values, [0.332225, 0.300610], atol=1e-5)
    np.testing.assert_array_equal(evidence.group("query's k-reciprocal set").rows, [0, 1])
    mine = evidence.group("its k-reciprocal set")
    np.testing.assert_array_equal(mine.rows, [0, 1])  # a1 itself and a2 (and q, not a row)
    np.testing.assert_allclose(mine.values, [0.361592, 0.311225], atol=1e-5)
    assert evidence.summary == "2 of its 2 k-reciprocal neighbours are also the query's"
    assert set(evidence.highlighted_rows().tolist()) == {0, 1}
    far = reranker.explain(nodes[0], 2)  # b0
    assert far.numbers["Jaccard distance"] == 1.0 and far.numbers["shared weight"] == 0.0
    assert far.numbers["final distance"] == pytest.approx(1.0, abs=1e-6)
    assert far.group("shared neighbours").rows.size == 0
    np.testing.assert_array_equal(far.group("its k-reciprocal set").rows, [2, 3, 4])
    assert far.summary == "0 of its 2 k-reciprocal neighbours are also the query's"


def batch_encodings(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int):
    """V and V_qe of (query + gallery) as batch mode encodes them (exact lists)."""
    nodes = np.vstack([query[None, :], gallery])
    k1, k2 = min(k1, len(nodes) - 1), min(k2, min(k1, len(nodes) - 1) + 1)
    lists = neighbour_lists(nodes, max(k1 + 1, k2))
    return _encode(nodes, lists, k1, k2, np.arange(len(nodes)))


def row_of(matrix, row: int) -> dict[int, float]:
    entries = matrix[row].tocoo()
    return dict(zip(entries.col.tolist(), entries.data.tolist(), strict=True))


def assert_k_reciprocal_reproduces_online(reranker, query: np.ndarray) -> None:
    gallery = reranker.gallery.features
    lam = reranker.params.lambda_value
    distances = online_distances(reranker, query)
    encoding, expanded = batch_encodings(query, gallery, reranker.params.k1, reranker.params.k2)
    order = np.argsort(distances, kind="stable")
    for item in items_to_explain(order):
        evidence = reranker.explain(query, item)
        assert_evidence(evidence, "k_reciprocal", item)
        n = evidence.numbers
        assert n["final distance"] == pytest.approx(distances[item], abs=1e-6)
        m = evidence.group("shared neighbours").values.sum() + n["shared weight at the query"]
        assert m == pytest.approx(n["shared weight"], abs=ATOL)
        assert 1 - m / (2 - m) == pytest.approx(n["Jaccard distance"], abs=ATOL)
        assert n["original distance"] == pytest.approx(
            n["squared distance"] / n["largest squared distance"], rel=1e-6)
        assert (1 - lam) * n["Jaccard distance"] + lam * n["original distance"] == (
            pytest.approx(n["final distance"], abs=ATOL))
        # the sets and weights are batch mode's encodings of (query + gallery)
        for group, node in (("query's k-reciprocal set", 0), ("its k-reciprocal set", item + 1)):
            expected = {key - 1: value for key, value in row_of(encoding, node).items() if key}
            shown = evidence.group(group)
            assert set(shown.rows.tolist()) == set(expected)
            np.testing.assert_allclose(shown.values, [expected[r] for r in shown.rows],
                                       atol=1e-6)
        query_qe, item_qe = row_of(expanded, 0), row_of(expanded, item + 1)
        shared = evidence.group("shared neighbours")
        assert set(shared.rows.tolist()) == {key - 1 for key in query_qe.keys() & item_qe.keys()
                                             if key}
        np.testing.assert_allclose(
            shared.values, [min(query_qe[r + 1], item_qe[r + 1]) for r in shared.rows],
            atol=1e-6)


@pytest.mark.parametrize("params", [{}, {"k1": 40, "k2": 10, "lambda_value": 0.0}],
                         ids=["defaults", "preset"])
def test_k_reciprocal_reproduces_online_on_real_features(split_features, params):
    queries, gallery = split_features
    reranker = create_reranker("k_reciprocal", **params).fit(gallery)
    for query in queries[:3]:
        assert_k_reciprocal_reproduces_online(reranker, query)


def test_k_reciprocal_reproduces_online_on_a_patched_2k_graph():
    features, _ = synthetic_collection(2002, 48, spread=1.5, seed=5)
    reranker = create_reranker("k_reciprocal").fit(features[2:])
    assert reranker._patchable
    for query in features[:2]:
        assert_k_reciprocal_reproduces_online(reranker, query)


def test_k_reciprocal_reproduces_online_on_a_graph_smaller_than_k1(split_features):
    queries, gallery = split_features
    reranker = create_reranker("k_reciprocal", k1=30).fit(gallery[:20])
    assert not reranker._patchable
    assert_k_reciprocal_reproduces_online(reranker, queries[0])


# -- GNN -------------------------------------------------------------------------------------------
# k2 = 1 keeps the binary kNN rows (no propagation): with k1 = 3 (self + 2 nearest) the rows of
# q and a1 are both {q, a1, a2}, so the graph score is 3, each shared node contributing
# (1 - lambda) x 1 x 1; b0's row {b0, b1, b2} shares nothing.
def test_gnn_hand_worked_binary_rows():
    nodes = two_clusters()
    reranker = create_reranker("gnn", device="cpu", k1=3, k2=1, lambda_value=0.3)
    reranker.fit(nodes[1:])
    evidence = reranker.explain(nodes[0], 0)
    assert_evidence(evidence, "gnn", 0)
    n = evidence.numbers
    assert n["graph score"] == pytest.approx(3.0)
    assert n["contribution of the query node"] == pytest.approx(0.7)
    assert n["cosine similarity"] == pytest.approx(0.9, abs=1e-6)
    assert n["final similarity"] == pytest.approx(0.7 * 3 + 0.3 * 0.9, abs=1e-6)
    assert n["final distance"] == pytest.approx(1 - (0.7 * 3 + 0.3 * 0.9), abs=1e-6)
    assert n["query lists it"] == n["it lists the query"] == 1.0
    strongest = evidence.group("strongest neighbours")
    assert sorted(strongest.rows.tolist()) == [0, 1]
    np.testing.assert_allclose(strongest.values, [0.7, 0.7])
    assert evidence.group("other shared neighbours").rows.size == 0
    assert evidence.summary == ("2 shared neighbours give 67% of its graph score; a mutual kNN "
                                "edge with the query")
    far = reranker.explain(nodes[0], 2)
    assert far.numbers["graph score"] == 0.0
    assert far.numbers["final similarity"] == pytest.approx(0.0, abs=1e-6)
    assert far.numbers["query lists it"] == far.numbers["it lists the query"] == 0.0
    assert far.summary == "no shared propagated neighbours; no kNN edge with the query"


def dense_gnn_rows(nodes: np.ndarray, k1: int, k2: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper's two propagation layers, dense, over (query + gallery): the (n, n) last
    layer and the (n, k1) kNN lists (self first, ties to the smaller index)."""
    similarity = nodes.astype(np.float64) @ nodes.T.astype(np.float64)
    n = len(nodes)
    lists = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -similarity))[:, :k1]
    adjacency = np.zeros((n, n))
    adjacency[np.arange(n)[:, None], lists] = 1.0
    weights = np.zeros((n, n))
    rows = np.arange(n)[:, None]
    weights[rows, lists[:, :k2]] = np.take_along_axis(similarity, lists[:, :k2], 1) ** 2
    for _ in range(2):
        adjacency = weights @ (adjacency + adjacency.T)
        adjacency /= np.linalg.norm(adjacency, axis=1, keepdims=True)
    return adjacency, lists


@pytest.mark.parametrize("path", ["small graph", "gallery propagation", "whole"])
def test_gnn_reproduces_online_and_the_dense_propagation(split_features, monkeypatch, path):
    queries, gallery = split_features
    if path == "gallery propagation":
        monkeypatch.setattr(GNNReranker, "patch_min_nodes", 16)
    params = {"k1": 12, "k2": 4, "lambda_value": 0.3}
    if path == "whole":  # a gallery smaller than k1: the graph is propagated whole
        gallery, params = gallery[:10], {"k1": 14, "k2": 4, "lambda_value": 0.3}
    reranker = create_reranker("gnn", device="cpu", **params).fit(gallery)
    expected_kind = {"small graph": "SmallGraphPropagation",
                     "gallery propagation": "GalleryPropagation", "whole": "NoneType"}[path]
    assert type(reranker._propagation).__name__ == expected_kind
    lam = params["lambda_value"]
    for query in queries[:3]:
        distances = online_distances(reranker, query)
        nodes = np.vstack([query[None, :], gallery])
        k1 = min(params["k1"], len(nodes))
        dense, lists = dense_gnn_rows(nodes, k1, min(params["k2"], k1))
        for item in items_to_explain(np.argsort(distances, kind="stable")):
            evidence = reranker.explain(query, item)
            assert_evidence(evidence, "gnn", item)
            n = evidence.numbers
            assert n["final distance"] == pytest.approx(distances[item], abs=1e-6)
            assert n["final similarity"] == pytest.approx(1 - distances[item], abs=1e-6)
            contributions = np.concatenate([g.values for g in evidence.groups])
            assert contributions.sum() + n["contribution of the query node"] + n[
                "cosine contribution"] == pytest.approx(n["final similarity"], abs=ATOL)
            assert n["cosine contribution"] == pytest.approx(lam * n["cosine similarity"])
            # each contribution is (1 - lambda) A2[q, m] A2[item, m] of the dense propagation
            rows = np.concatenate([g.rows for g in evidence.groups])
            expected = (1 - lam) * dense[0, rows + 1] * dense[item + 1, rows + 1]
            np.testing.assert_allclose(contributions, expected, atol=1e-5)
            shared = np.flatnonzero(dense[0] * dense[item + 1])
            assert set(rows.tolist()) == set((shared[shared > 0] - 1).tolist())
            assert n["graph score"] == pytest.approx(dense[0] @ dense[item + 1], abs=ATOL)
            strongest = evidence.group("strongest neighbours").values
            assert (np.diff(strongest) <= 0).all()
            assert strongest.size == min(10, rows.size)
            assert n["query lists it"] == float(item + 1 in lists[0])
            assert n["it lists the query"] == float(0 in lists[item + 1])


# -- ICFRR -----------------------------------------------------------------------------------------
# test_icfrr's hand-worked case, with lists given by the gallery's graph: G = 4, KG = KQ = 2,
# beta = 0.5, lists 0: 0 2 1 3, 1: 1 2 0 3, 2: 2 0 1 3, 3: 3 2 1 0. The gallery is orthonormal
# and the query has cosines [.6, .5, .45, .3] with it, so distances d = sqrt(2 - 2 cos) =
# [.894, 1, 1.049, 1.183] keep the original order [0, 1, 2, 3].
#   t = 1: voters [0, 1]; item 1 is 0's place 2 (vote 1 - 1/3 = 2/3) and 1 itself (no vote):
#          its vote 1/3; item 2 climbs: order [2, 0, 1, 3].
#   t = 2: voters [2, 0]; item 1 is place 2 of both: vote 2/3; it was scored at position 2
#          (third), whose prior is -d[2]: final score -1.049 + 0.5 x 2/3; order [2, 1, 0, 3].
HAND_LISTS = np.array([[0, 2, 1, 3], [1, 2, 0, 3], [2, 0, 1, 3], [3, 2, 1, 0]])


def hand_icfrr(**params):
    gallery = np.eye(4, 8, dtype=np.float32)
    cosines = np.array([0.6, 0.5, 0.45, 0.3])
    query = np.concatenate([cosines, [np.sqrt(1 - (cosines ** 2).sum())], np.zeros(3)])
    graph = KnnGraph(HAND_LISTS, np.ones((4, 4), np.float32), canonical=False)
    reranker = create_reranker("icfrr", device="cpu", KG=2, KQ=2, beta=0.5, n_times=2,
                               **params)
    return reranker.fit(GalleryContext(gallery, knn=graph)), query.astype(np.float32), (
        np.sqrt(2 - 2 * cosines))


def test_icfrr_hand_worked():
    reranker, query, d = hand_icfrr()
    result = reranker.rerank_online(query)
    np.testing.assert_array_equal(result.indices[0], [2, 1, 0, 3])
    evidence = reranker.explain(query, 1)
    assert_evidence(evidence, "icfrr", 1)
    n = evidence.numbers
    assert n["original distance"] == pytest.approx(d[1], abs=1e-6)
    assert n["original place"] == 2
    assert n["vote, iteration 1"] == pytest.approx(1 / 3, abs=1e-6)
    assert n["vote, iteration 2"] == pytest.approx(2 / 3, abs=1e-6)
    assert n["place it was scored at"] == 3
    assert n["prior"] == pytest.approx(-d[2], abs=1e-6)
    assert n["final score"] == pytest.approx(-d[2] + 0.5 * 2 / 3, abs=1e-6)
    assert n["final distance"] == pytest.approx(result.distances[0, 1], abs=1e-7)
    first, second = evidence.group("voters, iteration 1"), evidence.group("voters, iteration 2")
    np.testing.assert_array_equal(first.rows, [0, 1])
    np.testing.assert_array_equal(first.values, [2, np.nan])
    np.testing.assert_array_equal(second.rows, [2, 0])
    np.testing.assert_array_equal(second.values, [2, 2])
    ranking = evidence.group("voters that rank it")
    np.testing.assert_array_equal(ranking.rows, [2, 0])
    np.testing.assert_allclose(ranking.values, [2 / 3, 2 / 3])
    np.testing.assert_array_equal(evidence.highlighted_rows(), [0, 2])
    assert evidence.summary == ("2 of the query's 2 nearest rank it in their own first 2 (a "
                                "vote of 0.67)")


def test_icfrr_hand_worked_paper_literal():
    """Per-item scores: item 0 keeps its own -d[0] and adds 0.5 x (1/3 + 1/2)."""
    reranker, query, d = hand_icfrr(paper_literal=True)
    evidence = reranker.explain(query, 0)
    n = evidence.numbers
    assert n["vote, iteration 1"] == pytest.approx(1 / 3, abs=1e-6)
    assert n["vote, iteration 2"] == pytest.approx(1 / 2, abs=1e-6)
    assert n["final score"] == pytest.approx(-d[0] + 0.5 * (1 / 3 + 1 / 2), abs=1e-6)
    assert "place it was scored at" not in n
    assert n["prior"] == pytest.approx(-d[0] + 0.5 / 3, abs=1e-6)


@pytest.mark.parametrize("params", [
    {}, {"KG": 16, "KQ": 16, "beta": 0.25}, {"KQ": 12, "paper_literal": True},
    {"n_times": 0}], ids=["defaults", "preset", "paper-literal", "no-iterations"])
def test_icfrr_reproduces_online(params):
    features, _ = synthetic_collection(1502, 48, spread=1.5, seed=7)
    reranker = create_reranker("icfrr", device="cpu", **params).fit(features[2:])
    size = reranker.gallery.size
    p = reranker.params
    for query in features[:2]:
        result = reranker.rerank_online(query)
        distances = np.empty(size)
        distances[result.indices[0]] = result.distances[0]
        history = result.details["history"]
        for item in items_to_explain(result.indices[0]):
            evidence = reranker.explain(query, item)
            assert_evidence(evidence, "icfrr", item)
            n = evidence.numbers
            assert n["final distance"] == pytest.approx(distances[item], abs=1e-7)
            voters = [g for g in evidence.groups if g.name.startswith("voters, iteration")]
            assert len(voters) == p.n_times
            votes = []
            for t, group in enumerate(voters, start=1):
                assert group.rows.size == p.KQ
                if history.shape[1] >= p.KQ:  # the voters are the first KQ of each order
                    np.testing.assert_array_equal(group.rows, history[t - 1, :p.KQ])
                placed = group.values[np.isfinite(group.values)]
                assert ((placed >= 1) & (placed <= p.KG)).all()
                vote = (1 - (placed - 1) / (size - 1)).sum() / p.KQ
                assert vote == pytest.approx(n[f"vote, iteration {t}"], abs=1e-6)
                votes.append(vote)
            original = -n["original distance"]
            if not p.n_times:
                assert n["final score"] == pytest.approx(original, abs=1e-7)
            elif p.paper_literal:
                assert n["final score"] == pytest.approx(original + p.beta * sum(votes),
                                                         abs=1e-5)
            else:
                assert n["final score"] == pytest.approx(n["prior"] + p.beta * votes[-1],
                                                         abs=1e-6)
                # the prior is the original distance at the place it was scored at
                cosines = reranker.gallery.features.astype(np.float64) @ query
                original = np.sort(np.sqrt(np.maximum(2 - 2 * cosines, 0)))
                place = int(n["place it was scored at"]) - 1
                assert -n["prior"] == pytest.approx(original[place], abs=1e-5)
