"""SGRR: the pure pieces against dense formulas worked by hand, the GCN and its training against
the authors' own code (torch_geometric's SGConv, their losses and schedule), the online embedding
against a dense (G + 1)-node propagation, and the re-ranker (state, clusters, rankings) on real
features.

Training is kept small (tens to a couple of hundred epochs, K = 8) so the file runs in seconds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tie_aware import U32, assert_order_matches

from engine.core.knn import knn_graph
from engine.core.storage import load_json
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError, TooLargeError
from engine.evaluation.metrics import mean_average_precision
from engine.rerank import GalleryContext, create_reranker
from engine.rerank import sgrr as sgrr_module
from engine.rerank._hypergraph import default_clusters, lhrr_from_features, reciprocal_edges, sgcc
from engine.rerank.sgrr import (
    SGCNet,
    SGRRParams,
    TrainingGraph,
    cluster_triplets,
    epoch_loss,
    normalised_adjacency,
    rank_by_distance,
    train,
)

with warnings.catch_warnings():  # torch_geometric 2.8.1 calls the deprecated torch.jit.script
    warnings.simplefilter("ignore", FutureWarning)
    from torch_geometric.nn import SGConv  # the authors' layer: the oracle (requirements-dev)

CPU = torch.device("cpu")
FAST = {"K": 8, "nll_epochs": 30, "triplet_epochs": 30}
ATOL = 1e-5
FLOAT32_RTOL = 1e-5
"""Two float32 computations of one quantity in another summation order (sparse products over
~10 neighbours, 1280-term dot products): a few u = 6e-8 per operation, well under 1e-5 of the
largest magnitude."""
GRADIENT_RTOL = 1e-4
"""See test_one_training_step_equals_the_authors_network."""
TRAJECTORY_RTOL = 1e-4
"""40 Adam steps from the same start: the float32 rounding of the two implementations' sums
is carried and amplified along the way (steps of lr = 1e-3 each); a different loss, mask or
sampling moves the embeddings by 0.1 and more."""


def make(**params):
    return create_reranker("sgrr", device="cpu", **{**FAST, **params})


def context(features, labels=None, *, state_dir=None, fingerprint="demo"):
    return GalleryContext(features, knn=None, fingerprint=fingerprint, state_dir=state_dir,
                          labels=labels)


def dense_adjacency(edges: np.ndarray, n: int) -> np.ndarray:
    """D^-1/2 (A + I) D^-1/2 by hand, in float64: edge (s, t) is A[t, s] (s's row flows to t),
    D the row sums (edges listed once)."""
    a = np.eye(n)
    a[edges[1], edges[0]] = 1.0
    degree = a.sum(axis=1)
    return a / np.sqrt(np.outer(degree, degree))


@pytest.fixture(scope="module")
def demo(demo_features):
    return demo_features.features, demo_features.labels


@pytest.fixture(scope="module")
def fitted(demo):
    """All 289 items, labels known (17 clusters), K = 8, P = 0.5, 100 + 100 epochs."""
    features, labels = demo
    started = time.perf_counter()
    reranker = make(P=0.5, nll_epochs=100, triplet_epochs=100).fit(context(features, labels))
    print(f"SGRR fit on {len(features)} items: {time.perf_counter() - started:.2f} s")
    return reranker


@pytest.fixture(scope="module")
def split(demo):
    """(reranker fitted on 14 of each class's 17 items, held-out queries)."""
    features, labels = demo
    held_out = np.arange(len(features)) % 17 >= 14
    reranker = make().fit(context(features[~held_out], labels[~held_out]))
    return reranker, features[held_out]


# -- pure functions ----------------------------------------------------------------------------
def test_normalised_adjacency_by_hand():
    # 0 - 1 - 2 a path, 3 isolated: degrees with the self loop [2, 3, 2, 1]
    edges = np.array([[0, 1, 1, 2], [1, 0, 2, 1]])
    adjacency, degree = normalised_adjacency(edges, 4, CPU)
    np.testing.assert_array_equal(degree.numpy(), [2, 3, 2, 1])
    dense = adjacency.to_dense().numpy()
    np.testing.assert_allclose(dense, dense_adjacency(edges, 4), atol=1e-7)
    assert dense[0, 1] == pytest.approx(1 / np.sqrt(6))
    assert dense[1, 1] == pytest.approx(1 / 3)
    assert dense[3, 3] == pytest.approx(1.0)
    assert dense[0, 2] == 0.0
    np.testing.assert_allclose(dense, dense.T)


def test_normalised_adjacency_of_a_directed_edge_by_hand():
    # 0 -> 1 only: 1 receives from 0 (degree 1 + 1), 0 receives nothing (degree 1)
    adjacency, degree = normalised_adjacency(np.array([[0], [1]]), 2, CPU)
    np.testing.assert_array_equal(degree.numpy(), [1, 2])
    np.testing.assert_allclose(adjacency.to_dense().numpy(), [[1, 0], [1 / np.sqrt(2), 0.5]],
                               rtol=1e-7)


def test_normalised_adjacency_without_edges_is_the_identity():
    adjacency, degree = normalised_adjacency(np.zeros((2, 0), np.int64), 3, CPU)
    np.testing.assert_array_equal(adjacency.to_dense().numpy(), np.eye(3))
    np.testing.assert_array_equal(degree.numpy(), [1, 1, 1])


def test_cluster_triplets():
    labels = np.array([0, 0, 0, 1, 1, -1, 2, -1])  # cluster 2 is a singleton: no pairs
    triplets = cluster_triplets(labels, np.random.default_rng(5))
    assert triplets.shape == (3, 3 * 2 + 2 * 1)
    pairs = sorted(zip(triplets[0].tolist(), triplets[1].tolist(), strict=True))
    expected = sorted((a, p) for cluster in (0, 1) for a in np.flatnonzero(labels == cluster)
                      for p in np.flatnonzero(labels == cluster) if a != p)
    assert pairs == expected  # every ordered in-cluster pair, exactly once
    anchors, negatives = triplets[0], triplets[2]
    assert (labels[anchors] >= 0).all()  # unlabelled items never anchor
    assert (labels[negatives] != labels[anchors]).all()
    np.testing.assert_array_equal(triplets, cluster_triplets(labels,
                                                             np.random.default_rng(5)))


def test_cluster_triplets_negatives_cover_everything_outside():
    labels = np.array([0, 0, 1, -1, 2])
    negatives = cluster_triplets(labels, np.random.default_rng(0))
    draws = np.concatenate([cluster_triplets(labels, np.random.default_rng(s))[2]
                            for s in range(200)])
    assert set(draws.tolist()) == {2, 3, 4}  # unlabelled and other clusters alike
    assert negatives.dtype.kind == "i"


def test_cluster_triplets_degenerate():
    assert cluster_triplets(np.full(4, -1), np.random.default_rng(0)).shape == (3, 0)
    assert cluster_triplets(np.zeros(4, np.int64), np.random.default_rng(0)).shape == (3, 0)


def test_sgcnet_forward_equals_the_dense_formula():
    torch.manual_seed(0)
    edges = np.array([[0, 1, 1, 2, 2, 3, 0, 4], [1, 0, 2, 1, 3, 2, 4, 0]])
    adjacency, _ = normalised_adjacency(edges, 5, CPU)
    a = adjacency.to_dense().double().numpy()  # its float32 values, exactly
    np.testing.assert_allclose(a, dense_adjacency(edges, 5), atol=1e-7)
    x = np.random.default_rng(1).standard_normal((5, 6))
    model = SGCNet(6, 3).double().eval()
    propagated = a @ a @ x
    w1, b1 = model.first.weight.detach().numpy(), model.first.bias.detach().numpy()
    w2, b2 = model.second.weight.detach().numpy(), model.second.bias.detach().numpy()
    expected = a @ (a @ np.maximum(propagated @ w1.T + b1, 0.0)) @ w2.T + b2
    with torch.no_grad():
        out = model(torch.from_numpy(propagated), adjacency.double()).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-10)
    model.train()  # dropout is active only in training
    with torch.no_grad():
        assert not np.allclose(model(torch.from_numpy(propagated), adjacency.double()).numpy(),
                               expected)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_rank_by_distance_breaks_ties_as_lexsort(k):
    """Distance first, then the higher original similarity, then the smaller index: the
    order of numpy's lexsort((-original, distances)), on rows full of ties in both keys."""
    rng = np.random.default_rng(2)
    distances = rng.integers(0, 5, (6, 40)).astype(np.float32) / 4
    original = rng.integers(0, 3, (6, 40)).astype(np.float32) / 2
    original[0] = 0.5  # a row whose ties fall through to the index
    distances[1, :] = 0.25  # a row ordered by the original alone
    values, indices = rank_by_distance(torch.from_numpy(distances), torch.from_numpy(original), k)
    expected = np.lexsort((-original, distances), axis=1)[:, :k]
    np.testing.assert_array_equal(indices.numpy(), expected)
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(distances, expected, 1))


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph(demo):
    features, _ = demo
    hypergraph = lhrr_from_features(features, 8, 2)
    clustering = sgcc(hypergraph, 17, 0.5)
    return features, reciprocal_edges(hypergraph.ranked_lists, hypergraph.k), clustering.labels


def test_train_is_deterministic(graph):
    features, edges, labels = graph
    params = SGRRParams(K=8, nll_epochs=20, triplet_epochs=20, seed=3)
    first = train(features, edges, labels, 17, params, CPU)[1]
    second = train(features, edges, labels, 17, params, CPU)[1]
    for name in first:
        np.testing.assert_array_equal(first[name].numpy(), second[name].numpy(), err_msg=name)
    other = train(features, edges, labels, 17, SGRRParams(K=8, nll_epochs=20,
                                                          triplet_epochs=20, seed=4), CPU)[1]
    assert not np.array_equal(first["embeddings"].numpy(), other["embeddings"].numpy())


def test_nll_stage_fits_the_pseudo_labels(graph):
    features, edges, labels = graph
    params = SGRRParams(K=8, nll_epochs=200, triplet_epochs=0)
    model, fitted = train(features, edges, labels, 17, params, CPU)
    assert not model.training
    labelled = labels >= 0
    accuracy = (fitted["embeddings"].numpy()[labelled].argmax(axis=1) == labels[labelled]).mean()
    majority = np.bincount(labels[labelled]).max() / labelled.sum()
    print(f"pseudo-label accuracy after NLL only: {accuracy:.3f} (chance 1/17, "
          f"majority {majority:.3f})")
    assert accuracy > max(0.6, 2 * majority)


def test_fitted_tensors_are_the_propagation(graph):
    """degree, once = A x, hidden, hidden_once = A hidden, embeddings as the dense formula."""
    features, edges, labels = graph
    model, fitted = train(features, edges, labels, 17, SGRRParams(K=8, nll_epochs=5,
                                                                  triplet_epochs=5), CPU)
    n = len(features)
    a = dense_adjacency(edges, n)
    np.testing.assert_array_equal(fitted["degree"].numpy(),
                                  1 + np.bincount(edges[0], minlength=n))
    once = a @ features.astype(np.float64)
    np.testing.assert_allclose(fitted["once"].numpy(), once, atol=ATOL)
    w1, b1 = model.first.weight.detach().double().numpy(), model.first.bias.detach().numpy()
    w2, b2 = model.second.weight.detach().double().numpy(), model.second.bias.detach().numpy()
    hidden = np.maximum((a @ once) @ w1.T + b1, 0.0)
    np.testing.assert_allclose(fitted["hidden"].numpy(), hidden, atol=ATOL)
    np.testing.assert_allclose(fitted["hidden_once"].numpy(), a @ hidden, atol=ATOL)
    np.testing.assert_allclose(fitted["embeddings"].numpy(), a @ (a @ hidden) @ w2.T + b2,
                               atol=ATOL)


# -- against the authors' code: torch_geometric layers, their losses, their schedule ----------
# The oracle is the authors' own library: `AuthorsNet` is built as their `sgrr/network.py`
# builds it and `authors_loss` / `authors_training` compute what their `sgrr/reranking.py`
# does (`_nll_loss`, `_triplet_loss`, `_train_model`, `_train_gcn`), on the same graph, from
# the same initial weights and with dropout drawing from the same seeded stream.

class AuthorsNet(torch.nn.Module):
    """Two `SGConv(K=2)`, ReLU and dropout between them; keeps the logits as `embedding` and
    returns their log-softmax, as the authors' SGCNet does."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.conv1 = SGConv(dim, sgrr_module.HIDDEN, K=2)
        self.conv2 = SGConv(sgrr_module.HIDDEN, classes, K=2)
        self.embedding = None

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.conv1(x, edge_index)), training=self.training)
        self.embedding = self.conv2(hidden, edge_index)
        return F.log_softmax(self.embedding, dim=1)


def with_weights_of(net: AuthorsNet, model: SGCNet) -> AuthorsNet:
    """`net` holding `model`'s weights (build `net` before drawing `model`, so that its own
    initial draws do not move the seeded stream that dropout reads next)."""
    with torch.no_grad():
        net.conv1.lin.weight.copy_(model.first.weight)
        net.conv1.lin.bias.copy_(model.first.bias)
        net.conv2.lin.weight.copy_(model.second.weight)
        net.conv2.lin.bias.copy_(model.second.bias)
    return net


def authors_loss(output: torch.Tensor, stage: str, labels: torch.Tensor,
                 triplets: np.ndarray) -> torch.Tensor:
    """Their `_nll_loss` (train mask = labels != -1) and `_triplet_loss` (margin 1), both on
    the network's output, the log-softmax; `triplets` in their layout, a float (T, 3) array."""
    if stage == "nll":
        mask = labels != -1
        return F.nll_loss(output[mask], labels[mask])
    return F.triplet_margin_loss(output[triplets[:, 0]], output[triplets[:, 1]],
                                 output[triplets[:, 2]], margin=1)


def authors_layout(triplets: np.ndarray) -> np.ndarray:
    """(3, T) int -> the authors' (T, 3) float64 array (np.append onto np.empty((0, 3)))."""
    return triplets.T.astype(np.float64)


def parameters_of(net: AuthorsNet) -> dict[str, torch.Tensor]:
    """The AuthorsNet's tensors under SGCNet's names."""
    return {"first.weight": net.conv1.lin.weight, "first.bias": net.conv1.lin.bias,
            "second.weight": net.conv2.lin.weight, "second.bias": net.conv2.lin.bias}


def close(ours: torch.Tensor, theirs: torch.Tensor, what: str, rtol: float = FLOAT32_RTOL
          ) -> None:
    """Equal up to float32 summation order: within rtol of the largest magnitude."""
    scale = float(theirs.detach().abs().max()) or 1.0
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), rtol=0,
                               atol=rtol * scale, err_msg=what)


def directed_graph() -> tuple[np.ndarray, int]:
    """Edges in one direction only (0 -> 1 -> 2 -> 0, 3 -> 0), one listed twice (1 -> 2), a
    listed self loop (4 -> 4) and an isolated node 5."""
    return np.array([[0, 1, 2, 3, 1, 4], [1, 2, 0, 0, 2, 4]]), 6


@pytest.mark.parametrize("which", ["reciprocal LHRR graph", "directed, repeated, self loop"])
def test_propagation_equals_sgconv(graph, which):
    """M^2 x (two hops of `normalised_adjacency`) and the layer on it equal torch_geometric's
    SGConv(K=2): its normalisation, self loops, edge direction and unit edge weights.

    Computed in float64; the only difference left is that M's coefficients 1/sqrt(d_s d_t) are
    rounded to float32 (a sqrt and a division, each within u = 2^-24 relative), so a path of
    two hops is off by at most (1 + 2u)^2 - 1 < 5u of its weight: the bound is
    5u (|M|^2 |x|) + float64 rounding."""
    if which == "reciprocal LHRR graph":
        features, edges, _ = graph
        n = len(features)
        x = torch.from_numpy(features.astype(np.float64))
    else:
        edges, n = directed_graph()
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((n, 5)))
    adjacency, degree = normalised_adjacency(edges, n, CPU)
    m = adjacency.to_dense().double()
    propagated = m @ (m @ x)
    hops = SGConv(x.shape[1], x.shape[1], K=2, bias=False).double()
    with torch.no_grad():
        hops.lin.weight.copy_(torch.eye(x.shape[1], dtype=torch.float64))
        theirs = hops(x, torch.from_numpy(edges))
    bound = 5 * U32 * (m.abs() @ (m.abs() @ x.abs())) + 1e-12
    assert ((propagated - theirs).abs() <= bound).all(), float((propagated - theirs).abs().max())
    # the layer: SGConv's linear map comes after the hops, as SGCNet.first does
    torch.manual_seed(0)
    model = SGCNet(x.shape[1], 3).double()
    layer = SGConv(x.shape[1], sgrr_module.HIDDEN, K=2).double()
    with torch.no_grad():
        layer.lin.weight.copy_(model.first.weight)
        layer.lin.bias.copy_(model.first.bias)
        ours, theirs = model.first(propagated), layer(x, torch.from_numpy(edges))
    assert (ours - theirs).abs().max() <= 5 * U32 * float(
        (m.abs() @ (m.abs() @ x.abs())).max()) * model.first.weight.abs().sum(dim=1).max() + 1e-9
    if which != "reciprocal LHRR graph":
        # in-degrees plus the loop: 0 <- 2, 3; 1 <- 0; 2 <- 1 twice; 4's listed loop replaced
        np.testing.assert_array_equal(degree.numpy(), [3, 2, 3, 1, 1, 1])


@pytest.fixture(scope="module")
def training_graph(graph):
    """The pieces one epoch reads, as `train` builds them (seed 0), in float64."""
    features, edges, labels = graph
    adjacency, _ = normalised_adjacency(edges, len(features), CPU)
    adjacency = adjacency.double()
    x = torch.from_numpy(features.astype(np.float64))
    triplets = cluster_triplets(labels, np.random.default_rng(0))
    return TrainingGraph(
        propagated=torch.sparse.mm(adjacency, torch.sparse.mm(adjacency, x)),
        adjacency=adjacency, labels=torch.from_numpy(np.array(labels, np.int64)),
        triplets=torch.from_numpy(triplets))


@pytest.mark.parametrize("stage", ["nll", "triplet"])
def test_one_training_step_equals_the_authors_network(graph, training_graph, stage):
    """From the same weights and the same dropout draw, one epoch gives the authors' loss and
    gradients (so the triplet loss reads log-softmax rows, as theirs does).

    Both in float64: what differs is M's coefficients, rounded to float32 in ours (within 2 u
    relative, u = 2^-24), so every value is within ~1e-6 of the terms it sums; a bias gradient
    is a sum over 289 rows that cancels to ~1e-3 of its terms, hence 1e-4 of its largest
    entry. A different loss, mask or graph changes them entirely."""
    features, edges, labels = graph
    net = AuthorsNet(features.shape[1], 17).double()
    torch.manual_seed(1)
    model = SGCNet(features.shape[1], 17).double()
    net = with_weights_of(net, model)
    model.train()
    net.train()
    torch.manual_seed(2)
    ours = epoch_loss(model, training_graph, stage)
    torch.manual_seed(2)
    theirs = authors_loss(net(torch.tensor(features, dtype=torch.float64),
                              torch.from_numpy(edges)),
                          stage, torch.tensor(labels),
                          authors_layout(training_graph.triplets.numpy()))
    print(f"{stage}: loss ours {ours.item():.9f}, theirs {theirs.item():.9f}")
    assert ours.item() > 0.01
    close(ours, theirs, "loss", rtol=GRADIENT_RTOL)
    ours.backward()
    theirs.backward()
    for name, parameter in model.named_parameters():
        expected = parameters_of(net)[name].grad
        assert expected.abs().max() > 0, name
        relative = float((parameter.grad - expected).abs().max() / expected.abs().max())
        print(f"  gradient of {name}: largest difference {relative:.1e} of its largest entry")
        close(parameter.grad, expected, f"gradient of {name}", rtol=GRADIENT_RTOL)


def test_optimiser_is_the_authors():
    """Adam, lr as given, weight decay 5e-4 on every parameter, torch's other defaults: the
    settings of their `torch.optim.Adam(model.parameters(), lr=..., weight_decay=5e-4)`."""
    model = SGCNet(6, 3)
    ours = sgrr_module.optimiser_for(model, 1e-3)
    theirs = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    assert type(ours) is torch.optim.Adam
    assert len(ours.param_groups) == len(theirs.param_groups) == 1
    ours_group, theirs_group = ours.param_groups[0], theirs.param_groups[0]
    assert [id(p) for p in ours_group["params"]] == [id(p) for p in model.parameters()]
    assert {key: value for key, value in ours_group.items() if key != "params"} == {
        key: value for key, value in theirs_group.items() if key != "params"}


def test_the_triplet_loss_reads_log_probabilities_not_logits(graph, training_graph):
    """The detail that differed: the triplet distances are between log-softmax rows (the
    authors' forward output), not logits. On logits a shift shared by all rows cancels in every
    distance, so the output bias gets no gradient; on log-probabilities it does."""
    features, _, _ = graph

    def bias_gradient(loss_of) -> torch.Tensor:
        torch.manual_seed(1)
        model = SGCNet(features.shape[1], 17).double().eval()  # no dropout: same outputs
        loss = loss_of(model)
        loss.backward()
        return loss.detach(), model.second.bias.grad

    def on_logits(model):
        logits = model(training_graph.propagated, training_graph.adjacency)
        anchors, positives, negatives = training_graph.triplets
        return F.triplet_margin_loss(logits[anchors], logits[positives], logits[negatives],
                                     margin=1)

    def on_log_probabilities(model):
        rows = F.log_softmax(model(training_graph.propagated, training_graph.adjacency), dim=1)
        anchors, positives, negatives = training_graph.triplets
        return F.triplet_margin_loss(rows[anchors], rows[positives], rows[negatives], margin=1)

    ours, ours_gradient = bias_gradient(lambda model: epoch_loss(model, training_graph,
                                                                 "triplet"))
    expected, expected_gradient = bias_gradient(on_log_probabilities)
    _, logits_gradient = bias_gradient(on_logits)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(ours_gradient.numpy(), expected_gradient.numpy(), rtol=1e-9)
    print(f"output-bias gradient: log-probabilities {ours_gradient.abs().max():.2e}, "
          f"logits {logits_gradient.abs().max():.2e}")
    assert ours_gradient.abs().max() > 1e-7
    assert logits_gradient.abs().max() < 1e-12
    with pytest.raises(ValueError, match="stage"):
        epoch_loss(SGCNet(features.shape[1], 17).double(), training_graph, "both")


def authors_clusters(labels: np.ndarray) -> list[list[int]]:
    return [np.flatnonzero(labels == c).tolist() for c in range(labels.max() + 1)]


def test_triplets_are_the_authors_pairs(graph):
    """Every ordered pair (itertools.permutations) of every cluster, once, with one negative
    from outside that cluster (unlabelled items included), as their `_make_triplets`."""
    _, _, labels = graph
    triplets = cluster_triplets(labels, np.random.default_rng(0))
    expected = sorted(pair for members in authors_clusters(labels)
                      for pair in itertools.permutations(members, 2))
    assert sorted(zip(triplets[0].tolist(), triplets[1].tolist(), strict=True)) == expected
    assert len(expected) > 1000
    assert (labels[triplets[2]] != labels[triplets[0]]).all()
    assert (labels[triplets[2]] == -1).any() and (labels[triplets[2]] >= 0).any()


def test_training_runs_the_authors_schedule(graph, monkeypatch):
    """nll_epochs of NLL then triplet_epochs of triplet loss, one loss per epoch (never a sum),
    in training mode, on the pseudo-labelled nodes and one fixed set of triplets."""
    features, edges, labels = graph
    seen = []

    def recording(model, graph_, stage):
        seen.append((stage, model.training, graph_.triplets, graph_.labels))
        return epoch_loss(model, graph_, stage)

    monkeypatch.setattr(sgrr_module, "epoch_loss", recording)
    model, _ = train(features, edges, labels, 17, SGRRParams(K=8, nll_epochs=4,
                                                             triplet_epochs=3), CPU)
    assert [stage for stage, *_ in seen] == ["nll"] * 4 + ["triplet"] * 3
    assert all(training for _, training, _, _ in seen) and not model.training
    first = seen[0][2]
    assert all(triplets is first for _, _, triplets, _ in seen)  # drawn once
    np.testing.assert_array_equal(first.numpy(), cluster_triplets(labels,
                                                                  np.random.default_rng(0)))
    np.testing.assert_array_equal(seen[0][3].numpy(), labels)


def authors_training(features: np.ndarray, edges: np.ndarray, labels: np.ndarray,
                     classes: int, params: SGRRParams) -> torch.Tensor:
    """The authors' `_train_gcn` on AuthorsNet: one Adam for both stages, `_train_model` per
    stage (train mode, zero_grad, forward, loss, backward, step), then an eval forward whose
    logits are the embeddings. Initial weights and triplets are those `train` draws for
    params.seed; dropout draws from the same stream, so the two runs see the same masks."""
    net = AuthorsNet(features.shape[1], classes)
    torch.manual_seed(params.seed)  # what `train` draws next: SGCNet's weights, then dropout
    net = with_weights_of(net, SGCNet(features.shape[1], classes))
    triplets = authors_layout(cluster_triplets(labels, np.random.default_rng(params.seed)))
    x, edge_index = torch.from_numpy(features), torch.from_numpy(edges)
    target = torch.tensor(labels)
    optimiser = torch.optim.Adam(net.parameters(), lr=params.learning_rate, weight_decay=5e-4)
    for stage, epochs in (("nll", params.nll_epochs), ("triplet", params.triplet_epochs)):
        net.train()
        for _ in range(epochs):
            optimiser.zero_grad()
            loss = authors_loss(net(x, edge_index), stage, target, triplets)
            loss.backward()
            optimiser.step()
    net.eval()
    with torch.no_grad():
        net(x, edge_index)
    return net.embedding


def test_training_equals_the_authors_loop(graph):
    """`train`'s embeddings are the authors' after both stages, from the same start."""
    features, edges, labels = graph
    params = SGRRParams(K=8, nll_epochs=20, triplet_epochs=20, seed=5)
    _, fitted = train(features, edges, labels, 17, params, CPU)
    theirs = authors_training(features, edges, labels, 17, params)
    started = authors_training(features, edges, labels, 17, SGRRParams(
        K=8, nll_epochs=0, triplet_epochs=0, seed=5))
    moved = float((theirs - started).abs().max())
    difference = float((fitted["embeddings"] - theirs).abs().max())
    print(f"embeddings after 20 + 20 epochs: moved {moved:.4f} from the start, "
          f"ours - theirs {difference:.2e}")
    assert moved > 0.1
    close(fitted["embeddings"], theirs, "embeddings", rtol=TRAJECTORY_RTOL)


def test_engine_never_imports_torch_geometric():
    """torch_geometric is the tests' oracle (requirements-dev.txt), not a dependency."""
    code = ("import engine.rerank.sgrr, engine.rerank._hypergraph, sys; "
            "assert 'torch_geometric' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    engine_dir = Path(sgrr_module.__file__).resolve().parents[1]
    importing = re.compile(r"^\s*(from|import)\s+torch_geometric\b", re.MULTILINE)
    assert not [path for path in engine_dir.rglob("*.py") if importing.search(path.read_text())]


# -- online embedding against a dense (G + 1)-node propagation -----------------------------------
def test_online_embedding_equals_the_dense_propagation(split):
    reranker, queries = split
    gallery = reranker.gallery.features
    g, k = len(gallery), reranker.k_used
    hypergraph = lhrr_from_features(gallery, reranker.params.K, reranker.params.T)
    edges = reciprocal_edges(hypergraph.ranked_lists, hypergraph.k)
    a_gallery = dense_adjacency(edges, g)
    fitted_degree = reranker._degree.numpy()
    np.testing.assert_array_equal(fitted_degree, np.bincount(edges[0], minlength=g) + 1)
    # the query's edges: its K + 1 most similar items that it would also enter the K + 1
    # nearest of (against their (K + 1)-th nearest other item), the nearest one always
    threshold = knn_graph(gallery, k + 2).similarities[:, k + 1]
    model = reranker._model
    w1 = model.first.weight.detach().double().numpy()
    b1 = model.first.bias.detach().double().numpy()
    w2 = model.second.weight.detach().double().numpy()
    b2 = model.second.bias.detach().double().numpy()
    online = reranker.query_embeddings(queries)
    linked_counts = []
    for query, embedding in zip(queries, online, strict=True):
        similarity = gallery.astype(np.float64) @ query.astype(np.float64)
        nearest = np.argsort(-similarity, kind="stable")[:k + 1]
        linked = nearest[similarity[nearest] >= threshold[nearest]]
        linked = np.union1d(linked, nearest[:1])
        linked_counts.append(len(linked))
        # gallery rows keep their fitted normalisation and do not see the query; only the
        # query row uses the query's degree
        m = np.zeros((g + 1, g + 1))
        m[:g, :g] = a_gallery
        degree = len(linked) + 1
        m[g, g] = 1.0 / degree
        m[g, linked] = 1.0 / np.sqrt(degree * fitted_degree[linked])
        x = np.vstack([gallery, query[None, :]]).astype(np.float64)
        hidden = np.maximum((m @ m @ x) @ w1.T + b1, 0.0)
        z = m @ (m @ hidden) @ w2.T + b2
        unit = z / np.linalg.norm(z, axis=1, keepdims=True)
        np.testing.assert_allclose(embedding, unit[g], atol=ATOL)
        np.testing.assert_allclose(unit[:g], reranker.gallery_embeddings(), atol=ATOL)
    print(f"online queries linked to {min(linked_counts)}..{max(linked_counts)} items "
          f"(K + 1 = {k + 1})")
    assert max(linked_counts) > 1


def test_online_embedding_of_an_item_with_its_own_edges_is_its_embedding(split, monkeypatch):
    """A query equal to gallery item i, linked to exactly i's fitted neighbours (so with i's
    degree), is propagated exactly as i was: its embedding is i's."""
    reranker, _ = split
    gallery = reranker.gallery.features
    k = reranker.k_used
    hypergraph = lhrr_from_features(gallery, reranker.params.K, reranker.params.T)
    edges = reciprocal_edges(hypergraph.ranked_lists, hypergraph.k)
    for item in (0, 37, 100, len(gallery) - 1):
        own = edges[1, edges[0] == item]
        assert 1 <= len(own) <= k
        # K + 1 candidates: i's neighbours, padded with i itself, which the thresholds refuse
        candidates = torch.from_numpy(np.concatenate([own, np.full(k + 1 - len(own), item)]))
        thresholds = torch.full((len(gallery),), torch.inf)
        thresholds[own] = -torch.inf
        monkeypatch.setattr(reranker, "_thresholds", thresholds)
        monkeypatch.setattr(reranker, "_query_neighbours",
                            lambda queries, rows=candidates[None, :]: (
                                torch.zeros(rows.shape), rows))
        embedding = reranker.query_embeddings(gallery[item][None, :])
        np.testing.assert_allclose(embedding[0], reranker.gallery_embeddings()[item], atol=ATOL)


# -- the re-ranker -------------------------------------------------------------------------------
def test_leave_one_out_ranks_by_embedding_cosine_and_beats_cosine(fitted, demo):
    features, labels = demo
    g = len(features)
    result = fitted.rerank(None)
    assert result.indices.shape == (g, g - 1)
    assert not (result.indices == np.arange(g)[:, None]).any()
    # The authors rank by the cosine distance of the logits (`compute_ranked_lists`), here in
    # float64 from the raw logits. Ours: unit rows in float32 (a 17-term norm, a sqrt and a
    # division: under 11 u per component), a 17-term float32 dot product of unit rows (inputs
    # 22 u, sums 17 u, of a total <= 1) and 1 - s (u): within 40 u of the reference.
    logits = fitted._embeddings.numpy().astype(np.float64)
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    reference = 1.0 - unit @ unit.T
    np.fill_diagonal(reference, np.inf)  # leave-one-out: never the query itself
    pinned = assert_order_matches(result.indices, reference, atol=40 * U32,
                                  values=result.distances, min_pinned=g * (g - 1) // 2,
                                  label="leave-one-out against the authors' cosine")
    print(f"leave-one-out order: {pinned} of {g * (g - 1)} positions pinned by the reference")
    top = fitted.rerank(None, 5)
    np.testing.assert_allclose(top.distances, result.distances[:, :5], atol=ATOL)

    positives = np.bincount(labels)[labels] - 1
    cosine = features.astype(np.float64) @ features.T.astype(np.float64)
    np.fill_diagonal(cosine, -np.inf)
    baseline = np.argsort(-cosine, axis=1, kind="stable")[:, :g - 1]
    before = mean_average_precision(baseline, labels, labels, n_positives=positives).value
    after = mean_average_precision(result.indices, labels, labels, n_positives=positives).value
    print(f"leave-one-out mAP on demo_features: cosine {before:.4f}, SGRR {after:.4f}")
    assert after > before
    assert result.details["clusters"] == 17 and result.details["K"] == 8


def test_embeddings(fitted, demo):
    features, labels = demo
    embeddings = fitted.gallery_embeddings()
    assert embeddings.shape == (len(features), 17) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    queries = fitted.query_embeddings(features)
    assert queries.shape == embeddings.shape
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    similarity = queries @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)  # the nearest other item
    same_class = (labels[similarity.argmax(axis=1)] == labels).mean()
    print(f"query embedding of a gallery feature: nearest other item same class {same_class:.3f}")
    assert same_class > 0.7


def test_online_mode_results(split):
    reranker, queries = split
    g = reranker.gallery.size
    for k in (1, 10, g):
        result = reranker.rerank(queries[:6], k, mode="online")
        assert result.indices.shape == result.distances.shape == (6, k)
        assert ((result.indices >= 0) & (result.indices < g)).all()
        assert all(len(set(row)) == k for row in result.indices.tolist())
        assert np.isfinite(result.distances).all()
        assert (np.diff(result.distances, axis=1) >= -1e-6).all()
    single = reranker.rerank_online(queries[0], 10)
    # the query's unit embedding against the gallery's, float64 (the returned distances are
    # their float32 dot products: 17 terms of unit rows, within 18 u)
    embedding = reranker.query_embeddings(queries[:1]).astype(np.float64)
    reference = 1.0 - embedding @ reranker.gallery_embeddings().T.astype(np.float64)
    assert_order_matches(single.indices, reference, atol=18 * U32, values=single.distances,
                         min_pinned=5, label="online top 10")


# -- saved state ---------------------------------------------------------------------------------
class Counting:
    """Wraps `train` and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return train(*args, **kwargs)


def refuse(*args, **kwargs):
    raise AssertionError("SGRR retrained instead of loading its saved state")


@pytest.fixture(scope="module")
def small(demo):
    """A 102-item gallery (6 of each class) and its labels, for the state tests."""
    features, labels = demo
    rows = np.flatnonzero(np.arange(len(features)) % 17 < 6)
    return features[rows], labels[rows]


def test_state_is_saved_and_loaded(small, tmp_path, monkeypatch):
    features, labels = small
    first = make().fit(context(features, labels, state_dir=tmp_path))
    saved = sorted(p.name for p in (tmp_path / "sgrr").iterdir())
    assert len(saved) == 2 and {p.rsplit(".", 1)[1] for p in saved} == {"json", "safetensors"}
    monkeypatch.setattr(sgrr_module, "train", refuse)
    second = make().fit(context(features, labels, state_dir=tmp_path))
    np.testing.assert_array_equal(second.gallery_embeddings(), first.gallery_embeddings())
    np.testing.assert_array_equal(second.pseudo_labels, first.pseudo_labels)
    assert second.classes == first.classes and second.k_used == first.k_used
    queries = features[:5] * 0.9 + features[5:10] * 0.1
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(second.query_embeddings(queries), first.query_embeddings(queries),
                               atol=1e-6)
    for a, b in ((first.rerank(None, 10), second.rerank(None, 10)),
                 (first.rerank(queries, 10, mode="online"),
                  second.rerank(queries, 10, mode="online"))):
        np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("change", [{"seed": 1}, {"P": 0.4}, {"fingerprint": "other"}])
def test_other_parameters_or_gallery_retrain(small, tmp_path, monkeypatch, change):
    features, labels = small
    make().fit(context(features, labels, state_dir=tmp_path))
    counting = Counting()
    monkeypatch.setattr(sgrr_module, "train", counting)
    params = {key: value for key, value in change.items() if key != "fingerprint"}
    make(**params).fit(context(features, labels, state_dir=tmp_path,
                               fingerprint=change.get("fingerprint", "demo")))
    assert counting.calls == 1
    assert len(list((tmp_path / "sgrr").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["safetensors", "json", "truncate", "one byte",
                                    "no checksum"])
def test_corrupt_state_retrains_with_a_warning(small, tmp_path, monkeypatch, caplog, damage):
    """A damaged state, one whose weights differ from their manifest's sha256 (one flipped
    byte still parses as safetensors) or an older one without the checksum is retrained and
    rewritten, never used."""
    features, labels = small
    first = make().fit(context(features, labels, state_dir=tmp_path))
    weights = next((tmp_path / "sgrr").glob("*.safetensors"))
    manifest = weights.with_suffix(".json")
    saved = weights.read_bytes()
    assert load_json(manifest)["weights_sha256"] == hashlib.sha256(saved).hexdigest()
    if damage == "safetensors":
        weights.write_bytes(b"this is not a safetensors file at all")
    elif damage == "truncate":
        weights.write_bytes(saved[:100])
    elif damage == "one byte":
        weights.write_bytes(saved[:-1] + bytes([saved[-1] ^ 0x01]))
    elif damage == "no checksum":
        manifest.write_text(json.dumps({key: value for key, value in load_json(manifest).items()
                                        if key != "weights_sha256"}))
    else:
        manifest.write_text("{not json")
    counting = Counting()
    monkeypatch.setattr(sgrr_module, "train", counting)
    with caplog.at_level(logging.WARNING, logger="engine.rerank.sgrr"):
        second = make().fit(context(features, labels, state_dir=tmp_path))
    assert counting.calls == 1
    assert "retraining SGRR" in caplog.text
    if damage in ("one byte", "no checksum"):
        assert "checksum" in caplog.text
    np.testing.assert_array_equal(second.gallery_embeddings(), first.gallery_embeddings())
    assert weights.read_bytes() == saved
    assert load_json(manifest)["weights_sha256"] == hashlib.sha256(saved).hexdigest()
    # the state was written again and loads
    monkeypatch.setattr(sgrr_module, "train", refuse)
    third = make().fit(context(features, labels, state_dir=tmp_path))
    np.testing.assert_array_equal(third.gallery_embeddings(), first.gallery_embeddings())


def test_state_of_another_gallery_size_retrains(small, tmp_path, monkeypatch, caplog):
    features, _ = small
    counting = Counting()
    monkeypatch.setattr(sgrr_module, "train", counting)
    with caplog.at_level(logging.WARNING, logger="engine.rerank.sgrr"):
        # same fingerprint and parameters, fewer items: the key matches, the sizes do not
        make(clusters=17).fit(context(features[:-17], state_dir=tmp_path))
        assert "retraining" not in caplog.text
        make(clusters=17).fit(context(features, state_dir=tmp_path))
    assert counting.calls == 2
    assert "another gallery size" in caplog.text


def test_no_state_dir_trains_without_writing(small, tmp_path, monkeypatch):
    features, labels = small
    counting = Counting()
    monkeypatch.setattr(sgrr_module, "train", counting)
    monkeypatch.chdir(tmp_path)
    make().fit(context(features, labels, state_dir=None))
    make().fit(context(features, labels, state_dir=None))
    assert counting.calls == 2
    assert list(tmp_path.iterdir()) == []


# -- clusters and invalid galleries --------------------------------------------------------------
def test_clusters_default_to_the_classes_or_an_estimate(small):
    features, labels = small
    with_labels = make(nll_epochs=1, triplet_epochs=1).fit(context(features, labels))
    assert with_labels.classes == 17
    assert with_labels.gallery_embeddings().shape == (len(features), 17)
    partly = labels.copy()
    partly[partly >= 5] = -1
    assert make(nll_epochs=1, triplet_epochs=1).fit(context(features, partly)).classes == 5
    without = make(nll_epochs=1, triplet_epochs=1).fit(context(features))
    assert without.classes == default_clusters(len(features))
    assert without.gallery_embeddings().shape == (len(features), without.classes)
    unlabelled = make(nll_epochs=1, triplet_epochs=1).fit(context(features, np.full(
        len(features), -1)))
    assert unlabelled.classes == default_clusters(len(features))
    chosen = make(clusters=9, nll_epochs=1, triplet_epochs=1).fit(context(features, labels))
    assert chosen.classes == 9 and chosen.gallery_embeddings().shape[1] == 9


def test_invalid_galleries(small):
    features, labels = small
    with pytest.raises(InvalidInputError, match="clusters"):
        make(clusters=len(features) + 1).fit(context(features, labels))
    with pytest.raises(InvalidInputError, match="at least 4"):
        make().fit(context(features[:3]))


def test_the_fit_estimate_is_measured_and_knows_a_saved_state(demo_features, tmp_path):
    from engine.rerank import GalleryContext, create_reranker

    context = GalleryContext(demo_features.features[:120], labels=demo_features.labels[:120],
                             state_dir=tmp_path)
    reranker = create_reranker("sgrr", device="cpu", nll_epochs=40, triplet_epochs=40)
    estimate = reranker.estimate_fit_seconds(context)
    assert estimate is not None and estimate > 0 and not (tmp_path / "sgrr").exists()
    reranker.fit(context)
    again = create_reranker("sgrr", device="cpu", nll_epochs=40, triplet_epochs=40)
    assert again.estimate_fit_seconds(context) == 0.0
    assert create_reranker("k_reciprocal").estimate_fit_seconds(context) is None


# -- scale: online from the query's top only, bounded triplets, the context's graph, memory -----
def whole_gallery_rank(reranker, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Today's online ranking: the whole-gallery canonical neighbours and `_rank`'s full
    sorts (`rank_by_distance` over every gallery item)."""
    tensor = torch.from_numpy(query[None, :])
    similarity = torch.from_numpy(
        np.minimum(query.astype(np.float64) @ reranker.gallery.features.T.astype(np.float64),
                   1.0).astype(np.float32))[None]
    values, neighbours = sgrr_module.torch_topk_largest(similarity, reranker.k_used + 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reranker, "_query_neighbours", lambda queries: (values, neighbours))
        embedding = reranker._embed_queries(tensor)
    distances, indices = reranker._rank(embedding, reranker._unit_embeddings, k, False, tensor)
    return distances[0], indices[0]


def test_online_equals_the_whole_gallery_ranking(split):
    """Online reads the query's K + 1 neighbours from a float32 product and canonical
    cosines of candidates only, and breaks exact distance ties with the original cosines of
    the items that can reach the top k only: the same as today's whole-gallery path."""
    reranker, queries = split
    g = reranker.gallery.size
    compared = 0
    for k in (1, 10, g):
        result = reranker.rerank(queries, k, mode="online")
        for q, query in enumerate(queries):
            distances, indices = whole_gallery_rank(reranker, query, k)
            np.testing.assert_array_equal(result.indices[q], indices)
            np.testing.assert_array_equal(result.distances[q], distances)
            compared += 1
    assert compared == 3 * len(queries) > 0


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_rank_top_breaks_ties_as_rank_by_distance(k):
    """Distances with many exact ties (as a collapsed class gives): the top k of `rank_top`
    is `rank_by_distance`'s, ties to the higher original cosine, then the smaller index."""
    rng = np.random.default_rng(k)
    gallery = rng.standard_normal((60, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery[10] = gallery[3]  # an exact duplicate: equal distance and cosine
    query = gallery[5] + np.float32(0.1)
    query = (query / np.linalg.norm(query)).astype(np.float32)
    distances = np.round(rng.random(60), 1).astype(np.float32)
    distances[10] = distances[3]
    original = np.minimum(gallery.astype(np.float64) @ query.astype(np.float64), 1.0)
    expected_distances, expected = sgrr_module.rank_by_distance(
        torch.from_numpy(distances[None]), torch.from_numpy(original.astype(np.float32)[None]),
        k)
    got_distances, got = sgrr_module.rank_top(distances, gallery, query, k)
    np.testing.assert_array_equal(got, expected[0].numpy())
    np.testing.assert_array_equal(got_distances, expected_distances[0].numpy())
    assert len(np.unique(distances[got])) < k or k == 1  # ties were broken


def test_triplets_are_bounded():
    """Below the bound every triplet is kept (the authors' set, the same draws); above it, a
    seeded sample of the same pairs in the same order, negatives outside their cluster,
    without listing every pair."""
    labels = np.repeat(np.arange(5), 30)
    everything = cluster_triplets(labels, np.random.default_rng(3))
    assert everything.shape[1] == 5 * 30 * 29
    np.testing.assert_array_equal(
        cluster_triplets(labels, np.random.default_rng(3), everything.shape[1]), everything)
    kept = cluster_triplets(labels, np.random.default_rng(3), 1000)
    assert kept.shape == (3, 1000)
    keys = everything[0] * 1000 + everything[1]  # the pairs, ascending in the full list
    where = np.searchsorted(keys, kept[0] * 1000 + kept[1])
    assert (np.diff(where) > 0).all() and (keys[where] == kept[0] * 1000 + kept[1]).all()
    assert (labels[kept[2]] != labels[kept[0]]).all()
    huge = np.zeros(200_000, np.int64)  # one cluster of 40 billion pairs
    huge[::2] = 1
    sample = cluster_triplets(huge, np.random.default_rng(0), 500)
    assert sample.shape == (3, 500) and (sample[0] != sample[1]).all()
    assert (huge[sample[0]] == huge[sample[1]]).all() and (huge[sample[2]] != huge[sample[0]]).all()
    assert sgrr_module.triplet_limit(17) * 17 <= sgrr_module.TRIPLET_ELEMENTS
    assert sgrr_module.triplet_limit(17) > 1360 ** 2  # every demo-sized training keeps all


def test_fit_reads_an_approximate_graph(demo, monkeypatch):
    """A context graph deep enough for LHRR (4K) and the thresholds (K + 2), exact or not, is
    read instead of searching; an exact one gives the searched fit."""
    features, labels = demo
    rows = np.flatnonzero(np.arange(len(features)) % 17 < 8)
    gallery, gallery_labels = features[rows], labels[rows]
    searched = make(nll_epochs=5, triplet_epochs=5).fit(context(gallery, gallery_labels))
    graph = knn_graph(gallery, 40)
    approximate = KnnGraph(graph.indices, graph.similarities, graph.farthest, canonical=False,
                           recall=1.0)

    def no_search(*args, **kwargs):
        raise AssertionError("searched the gallery")

    import engine.rerank._hypergraph as hypergraph

    monkeypatch.setattr(hypergraph, "knn_graph", no_search)
    monkeypatch.setattr(sgrr_module, "knn_graph", no_search)
    given = make(nll_epochs=5, triplet_epochs=5).fit(
        GalleryContext(gallery, knn=approximate, labels=gallery_labels, fingerprint="demo"))
    np.testing.assert_array_equal(given.pseudo_labels, searched.pseudo_labels)
    np.testing.assert_array_equal(given.gallery_embeddings(), searched.gallery_embeddings())
    np.testing.assert_array_equal(given._thresholds.numpy(), searched._thresholds.numpy())


def test_batch_refusal(small, monkeypatch):
    """Leave-one-out ranks G x G at once and a batch of new queries retrains on them: refused
    with the numbers when that does not fit the memory budget, online still answers."""
    features, labels = small
    reranker = make(nll_epochs=5, triplet_epochs=5).fit(context(features, labels))
    g = len(features)
    assert reranker.batch_refusal(g, g) is None
    monkeypatch.setattr(sgrr_module, "memory_budget", lambda: 16 * 2**30)
    reason = reranker.batch_refusal(100_000, 100_000)  # leave-one-out at 100k: 373 GiB
    assert reason is not None and "372.5 GiB" in reason
    assert reranker.batch_refusal(100_000, 10) is None
    budget = g * g * sgrr_module.BYTES_PER_PAIR - 1
    monkeypatch.setattr(sgrr_module, "memory_budget", lambda: budget)
    reason = reranker.batch_refusal(g, g)
    assert reason is not None and "GiB" in reason and f"{g} queries" in reason
    with pytest.raises(TooLargeError, match="SGRR"):
        reranker.rerank(None, 5)
    assert reranker.rerank(features[:1], 5, mode="online").indices.shape == (1, 5)
