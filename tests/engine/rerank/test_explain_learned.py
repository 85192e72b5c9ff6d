"""Evidence of the learned methods, SGRR and SSR (`Reranker.explain`): hand-worked small cases,
oracles of what the evidence claims, and the online computation reproduced (the explained final
distance is the one `rerank_online` returns for that item).

SSR's split of a refined similarity over its references is checked exact in float64 (the
shares add up to the refined cosine) and against a loop oracle that forms each reference's
feature updates one view at a time and integrates torch's gradient of the cosine; SGRR's
groups against brute-force neighbour lists and the dense link formula. Fits use each method's
`quick_params` (SGRR with K = 8, as test_sgrr).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tie_aware import U32, assert_order_matches

from engine.core.knn import knn_graph
from engine.core.types import Evidence, GalleryContext
from engine.rerank import create_reranker
from engine.rerank import sgrr as sgrr_module
from engine.rerank.sgrr import SGRR
from engine.rerank.ssr import (
    SSR,
    SubgraphRefiner,
    decimals_apart,
    explain_refinement,
    subgraph_order,
    subgraph_views,
)

SGRR_PARAMS = {**SGRR.quick_params, "K": 8}
RANKS = (0, 3, 9, 10, 24)
"""Places of the online top 30 explained: SSR's quick k is 10, so the first three are refined
and the last two keep their initial place."""
SPLIT_ATOL = 1e-5
"""The float64 split against the module's float32 run: its updates (lr_dni times gradients of
size ~1) and the final cosine are rounded to float32, a few 1e-7 on a similarity."""


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def degrees(angles) -> np.ndarray:
    """Unit 2-D rows at these angles (degrees)."""
    radians = np.radians(np.asarray(angles, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


@pytest.fixture(scope="module")
def split(demo_features):
    """(gallery features, labels, held-out queries): every 10th of the 289 items a query."""
    features, labels = demo_features.features, demo_features.labels
    queries = np.arange(len(features)) % 10 == 0
    return features[~queries], labels[~queries], features[queries]


def explained_places(reranker, queries: np.ndarray, ranks=RANKS):
    """(query, online result, item, evidence) for the items at `ranks` of each query's online
    top 30 and the last item of its whole online ranking."""
    for query in queries:
        whole = reranker.rerank_online(query)
        for rank in (*ranks, reranker.gallery.size - 1):
            item = int(whole.indices[0, rank])
            evidence = reranker.explain(query, item)
            assert isinstance(evidence, Evidence) and evidence.item == item
            yield query, whole, rank, evidence


# -- SGRR ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sgrr(split):
    gallery, labels, _ = split
    return create_reranker("sgrr", device="cpu", **SGRR_PARAMS).fit(
        GalleryContext(gallery, labels=labels))


def test_sgrr_evidence_reproduces_the_online_distance(sgrr, split):
    explained = 0
    for _, whole, rank, evidence in explained_places(sgrr, split[2][:4]):
        numbers = evidence.numbers
        np.testing.assert_allclose(numbers["final distance"], whole.distances[0, rank],
                                   rtol=0, atol=2 * U32)
        np.testing.assert_allclose(numbers["GCN-space similarity"],
                                   1.0 - numbers["final distance"], rtol=0, atol=2 * U32)
        assert evidence.summary and "\n" not in evidence.summary
        explained += 1
    assert explained == 4 * (len(RANKS) + 1)


def test_sgrr_evidence_against_brute_force(sgrr, split):
    gallery = sgrr.gallery.features
    k, n = sgrr.k_used, sgrr_module.EXPLAIN_NEIGHBOURS
    threshold = knn_graph(gallery, k + 2).similarities[:, k + 1]
    fitted_degree = sgrr._degree.numpy().astype(np.float64)
    embeddings = sgrr.gallery_embeddings().astype(np.float64)
    cosine = gallery.astype(np.float64) @ gallery.T.astype(np.float64)
    for query in split[2][:3]:
        whole = sgrr.rerank_online(query)
        query_embedding = sgrr.query_embeddings(query[None, :])[0].astype(np.float64)
        to_query = gallery.astype(np.float64) @ query.astype(np.float64)
        # the query's links by the dense formula of test_sgrr: its K + 1 nearest that it
        # would enter the K + 1 nearest of, the nearest always; A[q, v] = 1 / sqrt(d_q d_v)
        nearest = np.argsort(-to_query, kind="stable")[:k + 1]
        linked = np.union1d(nearest[to_query[nearest] >= threshold[nearest]], nearest[:1])
        weights = 1.0 / np.sqrt((len(linked) + 1) * fitted_degree[linked])
        for rank in (0, 5, 20):
            item = int(whole.indices[0, rank])
            evidence = sgrr.explain(query, item)
            links = evidence.group("query's graph links")
            order = np.argsort(links.rows)
            np.testing.assert_array_equal(links.rows[order], linked)
            np.testing.assert_allclose(links.values[order], weights, rtol=1e-12)
            # the result's nearest others in either space, against float64 references
            gcn_reference = 1.0 - embeddings @ embeddings[item]
            gcn_reference[item] = np.inf
            gcn = evidence.group("nearest in the GCN space")
            assert len(gcn.rows) == n and item not in gcn.rows
            assert_order_matches(gcn.rows[None, :], gcn_reference[None, :],
                                 values=1.0 - gcn.values[None, :], atol=40 * U32,
                                 min_pinned=0, label="the result's GCN-space neighbours")
            original_reference = 1.0 - cosine[item]
            original_reference[item] = np.inf
            original = evidence.group("nearest in the original space")
            assert_order_matches(original.rows[None, :], original_reference[None, :],
                                 values=1.0 - original.values[None, :], atol=4 * U32,
                                 label="the result's original-space neighbours")
            # the counts are of the groups against the query's own lists (the item left out)
            query_gcn = [row for row in whole.indices[0] if row != item][:n]
            query_original = [row for row in np.argsort(-to_query, kind="stable")
                              if row != item][:n]
            shared = evidence.group("shared with the query's GCN-space neighbours")
            np.testing.assert_array_equal(shared.rows, np.intersect1d(gcn.rows, query_gcn))
            numbers = evidence.numbers
            assert numbers["GCN-space neighbours shared with the query"] == len(shared.rows)
            assert numbers["original-space neighbours shared with the query"] == len(
                np.intersect1d(original.rows, query_original))
            assert numbers["query's graph links"] == len(linked)
            assert numbers["query's cluster"] == np.argmax(query_embedding)
            assert numbers["result's cluster"] == np.argmax(embeddings[item])
            assert numbers["result's pseudo-label (-1: none)"] == sgrr.pseudo_labels[item]
            np.testing.assert_allclose(numbers["original cosine similarity"], to_query[item],
                                       rtol=0, atol=2 * U32)
            assert f"{len(shared.rows)} of its {n} GCN-space neighbours" in evidence.summary


def test_sgrr_evidence_of_a_hand_worked_case(monkeypatch):
    """Eight 2-D items with GCN embeddings set by hand: the lists, counts and clusters follow
    from the angles alone. Original angles 0, 10, 20, 90, 100, 110, 200, 210 degrees (query at
    4); embedding angles 0, 90, 5, 10, 95, 180, 185, 270 (query at 2). Item 3 (90 / 10
    degrees): its two GCN neighbours are items 2 and 0 (5 and 10 degrees away), the query's
    two others than item 3 are 0 and 2 (2 and 3 degrees): 2 of 2 shared. In the original space
    its two nearest are 4 and 5, the query's 0 and 1: none shared. Its embedding and the
    query's are nearest the first axis: both in cluster 0, its pseudo-label."""
    gallery = degrees([0, 10, 20, 90, 100, 110, 200, 210]).astype(np.float32)
    reranker = create_reranker("sgrr", device="cpu", K=2, clusters=2, nll_epochs=5,
                               triplet_epochs=5).fit(gallery)
    monkeypatch.setattr(sgrr_module, "EXPLAIN_NEIGHBOURS", 2)
    embeddings = torch.from_numpy(degrees([0, 90, 5, 10, 95, 180, 185, 270]).astype(np.float32))
    monkeypatch.setattr(reranker, "_unit_embeddings", embeddings)
    monkeypatch.setattr(reranker, "pseudo_labels", np.array([0, 1, 0, 0, 1, 1, -1, -1]))
    query_embedding = torch.from_numpy(degrees([2]).astype(np.float32))
    monkeypatch.setattr(reranker, "_embed_queries", lambda queries, links=None: query_embedding)
    query = degrees([4])[0].astype(np.float32)
    evidence = reranker.explain(query, 3)
    assert evidence.summary == ("it carries the query's cluster 0 as its pseudo-label, and 2 "
                                "of its 2 GCN-space neighbours are among the query's 2 (0 of 2 "
                                "in the original space)")
    np.testing.assert_array_equal(evidence.group("nearest in the GCN space").rows, [2, 0])
    np.testing.assert_allclose(evidence.group("nearest in the GCN space").values,
                               np.cos(np.radians([5, 10])), atol=4 * U32)
    np.testing.assert_array_equal(evidence.group("nearest in the original space").rows, [4, 5])
    np.testing.assert_allclose(evidence.group("nearest in the original space").values,
                               np.cos(np.radians([10, 20])), atol=4 * U32)
    np.testing.assert_array_equal(
        evidence.group("shared with the query's GCN-space neighbours").rows, [0, 2])
    numbers = evidence.numbers
    np.testing.assert_allclose(numbers["final distance"], 1 - np.cos(np.radians(8)),
                               atol=4 * U32)
    np.testing.assert_allclose(numbers["original cosine similarity"], np.cos(np.radians(86)),
                               atol=4 * U32)
    assert (numbers["query's cluster"], numbers["result's cluster"]) == (0, 0)
    assert numbers["GCN-space neighbours shared with the query"] == 2
    assert numbers["original-space neighbours shared with the query"] == 0
    # item 6 (200 / 185 degrees), no pseudo-label: of its embedding (-0.996, -0.087) the
    # larger entry is the second, cluster 1; the query's is cluster 0
    other = reranker.explain(query, 6)
    assert other.summary.startswith("the GCN puts it in cluster 1, the query in 0, and ")
    # the gallery's kNN graph, when deep enough, gives the same original-space neighbours
    with_graph = create_reranker("sgrr", device="cpu", K=2, clusters=2, nll_epochs=5,
                                 triplet_epochs=5).fit(
        GalleryContext(gallery, knn=knn_graph(gallery, 8)))
    for name in ("_unit_embeddings", "pseudo_labels", "_embed_queries"):
        monkeypatch.setattr(with_graph, name, getattr(reranker, name))
    np.testing.assert_array_equal(
        with_graph.explain(query, 3).group("nearest in the original space").rows, [4, 5])


# -- SSR: the split of a refined similarity --------------------------------------------------
def constant_network(network, bias) -> None:
    """Make a synthetic-gradient network output `bias` for every view."""
    with torch.no_grad():
        network.output.weight.zero_()
        network.output.bias.copy_(torch.as_tensor(bias, dtype=network.output.bias.dtype))


def test_ssr_split_of_a_hand_worked_case():
    """k = 2 in 2-D, q = (1, 0), d1 = (0.6, 0.8), d2 = (0.8, 0.6), lr_dni = 0.1. The query
    network gives every view the gradient e_0 (its first entry, S(r, q)), the database
    network 0: the query moves by -0.1 sum_r dS(r, q)/dq = -0.1 sum_i (d_i - S_i q), reference
    1's term (0, -0.08) and reference 2's (0, -0.06) (its own view, S(q, q) = 1, gives
    nothing), to q' = (1, -0.14); the database stays. For d1 the cosine goes from 0.6 to
    (0.6 - 0.112) / sqrt(1.0196); the two terms are parallel, so the path's gradient splits
    the change 8 : 6. For d2, from 0.8 to (0.8 - 0.084) / sqrt(1.0196), split alike."""
    model = SubgraphRefiner(2, 1, 0.1, 8).double().eval()
    constant_network(model.query_gradient, [1, 0, 0, 0, 0])
    constant_network(model.database_gradient, [0, 0, 0, 0, 0])
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    database = torch.tensor([[[0.6, 0.8], [0.8, 0.6]]], dtype=torch.float64)
    length = np.sqrt(1.0196)
    for position, (cosine, inner) in enumerate([(0.6, 0.488), (0.8, 0.716)]):
        split = explain_refinement(model, query, database, position)
        change = inner / length - cosine
        np.testing.assert_allclose(split.refined[position], inner / length, rtol=1e-12)
        np.testing.assert_allclose(split.cosine, cosine, rtol=1e-12)
        np.testing.assert_allclose(split.own_view, 0.0, atol=1e-15)
        np.testing.assert_allclose(split.references, [change * 8 / 14, change * 6 / 14],
                                   rtol=1e-12)


def reference_terms_by_loop(model: SubgraphRefiner, query: torch.Tensor,
                            database: torch.Tensor, position: int
                            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """The oracle: `refine` rerun step by step, each update formed one view at a time (the
    vector-Jacobian product of view r alone), summed per reference over the steps. Returns
    A (k + 1, d) the query's terms, B (k + 1, d) the item's, and the refined query and item."""
    k = database.shape[1]
    terms_query = torch.zeros(k + 1, query.shape[1], dtype=torch.float64)
    terms_item = torch.zeros(k + 1, query.shape[1], dtype=torch.float64)
    for _ in range(model.q_steps):
        for moved in ("query", "database"):
            order = subgraph_order(query, database)
            if moved == "database":
                order = subgraph_order(query, database, order[:, 1:])
            q = query.detach().requires_grad_(True)
            d = database.detach().requires_grad_(True)
            views = subgraph_views(torch.cat([q[:, None, :], d], dim=1), order)
            network = model.query_gradient if moved == "query" else model.database_gradient
            synthetic = network(views).detach()
            total = 0
            for r in range(k + 1):
                only = torch.zeros_like(synthetic)
                only[:, r] = synthetic[:, r]
                gradient = torch.autograd.grad(views, q if moved == "query" else d,
                                               grad_outputs=only, retain_graph=True)[0]
                term = -model.lr_dni * gradient
                total = total + term
                if moved == "query":
                    terms_query[r] += term[0]
                else:
                    terms_item[r] += term[0, position]
            if moved == "query":
                query = (query + total).detach()
            else:
                database = (database + total).detach()
    return terms_query, terms_item, query[0], database[0, position]


def path_gradient_by_autograd(q0, d0, q1, d1, nodes: int = 64):
    """The oracle's integrated gradient of the cosine along the line (q0, d0) -> (q1, d1):
    torch's gradient of the cosine at 64 Gauss-Legendre nodes (the engine: a formula at 16)."""
    points, weights = np.polynomial.legendre.leggauss(nodes)
    total_q, total_d = torch.zeros_like(q0), torch.zeros_like(d0)
    for point, weight in zip(points, weights, strict=True):
        t = (point + 1.0) / 2.0
        q = (q0 + t * (q1 - q0)).requires_grad_(True)
        d = (d0 + t * (d1 - d0)).requires_grad_(True)
        grad_q, grad_d = torch.autograd.grad(F.cosine_similarity(q, d, dim=0), (q, d))
        total_q += weight / 2.0 * grad_q
        total_d += weight / 2.0 * grad_d
    return total_q, total_d


@pytest.mark.parametrize("q_steps", [1, 2])
def test_ssr_split_is_exact_and_equals_the_loop_oracle(q_steps):
    torch.manual_seed(q_steps)
    model = SubgraphRefiner(5, q_steps, 0.05, 16).double().eval()
    query = F.normalize(torch.randn(1, 12, dtype=torch.float64), dim=-1)
    database = F.normalize(torch.randn(1, 5, 12, dtype=torch.float64), dim=-1)
    refined = model(query, database)[0].detach().numpy()
    for position in range(5):
        split = explain_refinement(model, query, database, position)
        np.testing.assert_allclose(split.refined, refined, rtol=1e-12)
        total = split.cosine + split.own_view + split.references.sum()
        np.testing.assert_allclose(total, refined[position], rtol=0, atol=1e-12)
        terms_query, terms_item, q1, d1 = reference_terms_by_loop(model, query, database,
                                                                  position)
        q0, d0 = query[0], database[0, position]
        torch.testing.assert_close(q0 + terms_query.sum(0), q1, rtol=0, atol=1e-12)
        torch.testing.assert_close(d0 + terms_item.sum(0), d1, rtol=0, atol=1e-12)
        along_q, along_d = path_gradient_by_autograd(q0, d0, q1, d1)
        shares = (terms_query @ along_q + terms_item @ along_d).numpy()
        np.testing.assert_allclose(split.own_view, shares[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(split.references, shares[1:], rtol=0, atol=1e-12)
        assert np.abs(split.references).max() > 1e-4  # the references did move it


def test_decimals_apart():
    assert decimals_apart(0.6121, 0.8302) == 3
    assert decimals_apart(0.80281, 0.80302) == 4
    assert decimals_apart(0.5, 0.5) == 6


# -- SSR: the re-ranker ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=[{}, {"after_k_reciprocal": True, "q_steps": 2}],
                ids=["cosine", "k_reciprocal_two_steps"])
def ssr(request, split):
    gallery, _, _ = split
    return create_reranker("ssr", device="cpu", **{**SSR.quick_params, **request.param}
                           ).fit(gallery)


def test_ssr_evidence_reproduces_the_online_distance(ssr, split):
    top = ssr.k_used
    initial = "k-reciprocal" if ssr.params.after_k_reciprocal else "cosine"
    refined = tail = 0
    for query, whole, rank, evidence in explained_places(ssr, split[2][:4]):
        numbers = evidence.numbers
        np.testing.assert_allclose(numbers["final distance"], whole.distances[0, rank],
                                   rtol=0, atol=2 * U32)
        assert "\n" not in evidence.summary
        if rank < top:
            refined += 1
            total = (numbers["cosine similarity"] + numbers["query's own view"]
                     + numbers["references' views"])
            np.testing.assert_allclose(total, numbers["refined similarity"], atol=SPLIT_ATOL)
            np.testing.assert_allclose(numbers["final distance"],
                                       1.0 - numbers["refined similarity"], atol=2 * U32)
            np.testing.assert_allclose(numbers["cosine similarity"],
                                       float(query.astype(np.float64)
                                             @ ssr.gallery.features[evidence.item]),
                                       atol=1e-6)
            references = evidence.group(f"references (initial top {top})")
            initial_top = ssr._initial(query[None, :], top, "online")[1][0]
            np.testing.assert_array_equal(references.rows, initial_top)
            np.testing.assert_allclose(references.values.sum(), numbers["references' views"],
                                       rtol=1e-12)
            strongest = evidence.group("strongest references")
            assert set(strongest.rows) <= set(initial_top) and strongest.highlight
            assert np.abs(strongest.values).min() >= np.sort(np.abs(references.values))[-5]
            raised = numbers["refined similarity"] >= numbers["cosine similarity"]
            assert evidence.summary.startswith(
                f"refinement {'raised' if raised else 'lowered'} its similarity from ")
        else:
            tail += 1
            assert numbers[f"initial distance ({initial})"] <= numbers["final distance"]
            assert evidence.summary.startswith(f"it is past the top {top} that SSR refines")
    assert refined == 4 * 3 and tail == 4 * 3
