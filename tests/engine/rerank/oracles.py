"""Slow, literal implementations of the methods' definitions, used as test oracles.

Written from the methods as docs/methods/ describes them (dense matrices, plain loops);
deliberately unoptimised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tie_aware import U32, assert_order_matches


def k_reciprocal_reference(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray,
                           k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    """Final (Q, G) distances of k-reciprocal re-ranking, step by step as the notes describe."""
    n_queries = q_g_dist.shape[0]
    joint = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                            np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    joint = np.power(joint, 2).astype(np.float32)
    joint = np.transpose(joint / np.max(joint, axis=0))  # column max, then transpose
    n = joint.shape[0]
    ranks = np.argsort(joint, axis=1, kind="stable")
    half = int(np.around(k1 / 2.0))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = ranks[i, :k + 1]
        return np.array([j for j in forward if i in ranks[j, :k + 1]], dtype=np.int64)

    encoding = np.zeros((n, n), np.float32)
    for i in range(n):
        members = reciprocal(i, k1)
        expanded = list(members)
        for candidate in members:
            candidate_set = reciprocal(candidate, half)
            overlap = len(np.intersect1d(candidate_set, members))
            if overlap > 2.0 / 3.0 * len(candidate_set):
                expanded.extend(candidate_set)
        expanded = np.unique(expanded)
        weights = np.exp(-joint[i, expanded])
        encoding[i, expanded] = weights / weights.sum()
    if k2 != 1:
        expanded_encoding = np.zeros_like(encoding)
        for i in range(n):
            expanded_encoding[i] = encoding[ranks[i, :k2]].mean(axis=0)
        encoding = expanded_encoding
    jaccard = np.zeros((n_queries, n), np.float32)
    for i in range(n_queries):
        minimum_sum = np.zeros(n, np.float32)
        for column in np.flatnonzero(encoding[i]):
            rows = np.flatnonzero(encoding[:, column])
            minimum_sum[rows] += np.minimum(encoding[i, column], encoding[rows, column])
        jaccard[i] = 1.0 - minimum_sum / (2.0 - minimum_sum)
    final = (1.0 - lambda_value) * jaccard + lambda_value * joint[:n_queries]
    return final[:, n_queries:]


def euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain Euclidean distances between rows (float64 then float32)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    squared = (a64 ** 2).sum(1)[:, None] + (b64 ** 2).sum(1)[None, :] - 2 * a64 @ b64.T
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)


def _icfrr_ranks_and_weights(gg: np.ndarray, KG: int, lists: np.ndarray | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
    """ICFRR's dense R (b's position in a's ascending gg list, minus one: self -1) and the
    position weights alpha = linspace(1, 0, G) with alpha[KG:] = 0 (alpha[-1] is the last).

    lists: (G, D) the first D entries of each ascending list, when given (beyond them R = G - 1,
    weight 0; D > KG keeps every weighted position); None sorts the rows of gg stably.
    """
    size = gg.shape[0]
    ranks = np.zeros((size, size), np.int64)
    for a in range(size):
        if lists is None:
            ranks[a] = np.argsort(np.argsort(gg[a], kind="stable"), kind="stable") - 1
        else:
            ranks[a] = size - 1
            ranks[a, lists[a]] = np.arange(lists.shape[1]) - 1
    alpha = np.linspace(1.0, 0.0, size)
    alpha[KG:] = 0.0
    return ranks, alpha


def _icfrr_delta(ranks: np.ndarray, alpha: np.ndarray, voters: np.ndarray) -> np.ndarray:
    """delta[b] = mean over the voters a of alpha[R[a, b]]."""
    delta = np.zeros(ranks.shape[0])
    for a in voters:
        delta += alpha[ranks[a]]  # a row at a time; R = -1 (self) reads alpha[-1]
    return delta / len(voters)


def icfrr_reference(qg: np.ndarray, gg: np.ndarray, KG: int, KQ: int, beta: float,
                    n_times: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """ICFRR as the authors' src/rerank.py does it (per-position prior), in float64 loops.

    qg: (Q, G) query->gallery distances; gg: (G, G) gallery->gallery distances.
    Returns the final orders (Q, G), their scores (Q, G, descending) and the orders after
    each iteration [order_0, ..., order_n_times], each (Q, G). Sorts are stable.
    """
    qg, gg = np.asarray(qg, np.float64), np.asarray(gg, np.float64)
    ranks, alpha = _icfrr_ranks_and_weights(gg, KG)
    n_queries, size = qg.shape
    history = [np.zeros((n_queries, size), np.int64) for _ in range(n_times + 1)]
    scores = np.zeros((n_queries, size))
    for q in range(n_queries):
        order = np.argsort(qg[q], kind="stable")
        base = -qg[q][order]  # base[p]: the p-th largest of -qg[q], fixed for the run
        score = base.copy()
        history[0][q] = order
        for t in range(1, n_times + 1):
            delta = _icfrr_delta(ranks, alpha, order[:KQ])
            score = np.array([base[p] + beta * delta[order[p]] for p in range(size)])
            permutation = np.argsort(-score, kind="stable")
            order, score = order[permutation], score[permutation]
            history[t][q] = order
        scores[q] = score
    return history[-1], scores, history


def icfrr_paper_literal_reference(qg: np.ndarray, gg: np.ndarray, KG: int, KQ: int,
                                  beta: float, n_times: int
                                  ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """ICFRR with the paper's update read as a per-item accumulating score:
    s = -qg[q]; each iteration the top-KQ items by s vote and s += beta * delta.

    Returns like `icfrr_reference` (scores are s at the final order).
    """
    qg, gg = np.asarray(qg, np.float64), np.asarray(gg, np.float64)
    ranks, alpha = _icfrr_ranks_and_weights(gg, KG)
    n_queries, size = qg.shape
    history = [np.zeros((n_queries, size), np.int64) for _ in range(n_times + 1)]
    scores = np.zeros((n_queries, size))
    for q in range(n_queries):
        s = -qg[q]
        order = np.argsort(-s, kind="stable")
        history[0][q] = order
        for t in range(1, n_times + 1):
            s = s + beta * _icfrr_delta(ranks, alpha, order[:KQ])
            order = order[np.argsort(-s[order], kind="stable")]
            history[t][q] = order
        scores[q] = s[order]
    return history[-1], scores, history


def icfrr_step_reference(qg: np.ndarray, gg: np.ndarray, KG: int, KQ: int, beta: float,
                         orders: list[np.ndarray], paper_literal: bool = False,
                         lists: np.ndarray | None = None) -> np.ndarray:
    """The scores, by gallery item, of the ICFRR iteration that follows the given orders.

    An implementation in float32 may order items whose exact scores tie within its rounding
    either way, and with the per-position prior such a swap changes every later iteration; so
    an iterative method is checked a step at a time, each step from the implementation's own
    previous orders.

    orders: the orders (Q, G) after iterations 0 .. t - 1 (orders[0] sorts qg ascending).
    Returns (Q, G) float64: the scores of iteration t, larger is better. The per-position
    prior: item orders[-1][q, p] scores base[p] + beta * delta(item), the voters
    orders[-1][q, :KQ]. Paper-literal: s = -qg + beta * (sum over the given orders of their
    voters' delta). lists: the gallery lists R is taken from (an implementation's own, checked
    to sort gg up to ties: items at equal distance may come in either order), else gg's stable
    sort; see `_icfrr_ranks_and_weights`.
    """
    qg, gg = np.asarray(qg, np.float64), np.asarray(gg, np.float64)
    ranks, alpha = _icfrr_ranks_and_weights(gg, KG, lists)
    n_queries, size = qg.shape
    scores = np.zeros((n_queries, size))
    for q in range(n_queries):
        if paper_literal:
            s = -qg[q]
            for order in orders:
                s = s + beta * _icfrr_delta(ranks, alpha, order[q, :KQ])
            scores[q] = s
            continue
        order = orders[-1][q]
        base = -np.sort(qg[q], kind="stable")
        delta = _icfrr_delta(ranks, alpha, order[:KQ])
        scores[q, order] = base + beta * delta[order]
    return scores


# ---------------------------------------------------------------------------------------------
# LHRR and SGCC (SGRR's hypergraph steps): the authors' sgrr/sgcc/lhrr/source.cpp and
# sgrr/sgcc/clustering.py in plain loops over dicts, with _hypergraph.py's numbers (float32
# rounding where the C++ stores a float, ties by the smaller id in the sorts the C++ leaves
# unspecified; see that module's docstring).


def _to_float32(value: float) -> float:
    return float(np.float32(value))


def _sort_after_first(row: list[int], value: dict[int, float]) -> list[int]:
    """The C++ insertion sort: entries after the first by value descending, ties kept in order."""
    return [row[0], *sorted(row[1:], key=lambda v: -value[v])]


def merge_candidates_reference(tail: list[int], tail_values: list[float],
                               incoming: list[int], incoming_values: list[float]) -> list[int]:
    """The C++ joinRks on one list: walk the positions, insert the next candidate where it
    beats the value that position held before any insertion (the value array is never
    shifted); the list keeps its length."""
    merged = list(tail)
    j = 0
    for position in range(len(tail)):
        if j < len(incoming) and incoming_values[j] > tail_values[position]:
            merged.insert(position, incoming[j])
            merged.pop()
            j += 1
    return merged


def lhrr_reference(initial_lists: np.ndarray, k: int, iterations: int = 2
                   ) -> tuple[np.ndarray, list[dict[int, float]], list[float]]:
    """LHRR step by step. Returns the final lists (n, 4k), the last iteration's hyperedges
    ({member: membership}, memberships rounded to float32) and confidences."""
    import math

    depth = 4 * k
    lists = [[int(v) for v in row[:depth]] for row in initial_lists]
    n = len(lists)
    weight = [1.0] if k == 1 else [1.0 - math.log(p) / math.log(k) for p in range(1, k + 1)]
    for i in range(n):
        if i not in lists[i]:
            lists[i] = [i, *lists[i][:depth - 1]]
    similarity: list[dict[int, float]] = [{} for _ in range(n)]
    for i in range(n):
        for position, v in enumerate(lists[i]):
            similarity[i][v] = similarity[i].get(v, 0.0) + (depth - position)
            similarity[v][i] = similarity[v].get(i, 0.0) + (depth - position)
    for i in range(n):
        lists[i] = _sort_after_first(lists[i], similarity[i])
        where = lists[i].index(i)
        lists[i][0], lists[i][where] = lists[i][where], lists[i][0]

    edges: list[dict[int, float]] = []
    confidence: list[float] = []
    for _ in range(iterations):
        edges, confidence = [], []
        for i in range(n):
            edge = {i: 1.0}
            for o in range(k):
                neighbour = lists[i][o]
                for j in range(k):
                    v = lists[neighbour][j]
                    edge[v] = edge.get(v, 0.0) + weight[o] * weight[j]
            edge = {v: _to_float32(h) for v, h in edge.items()}
            edges.append(edge)
            total = 0.0
            for h in sorted(edge.values(), reverse=True)[:k]:
                total += h
            confidence.append(total)

        w: list[dict[int, float]] = [dict.fromkeys(lists[i], 1.0) for i in range(n)]
        candidates: list[list[int]] = [[] for _ in range(n)]
        for e in range(n):
            for a, h_a in edges[e].items():
                for b, h_b in edges[e].items():
                    if b not in w[a]:
                        w[a][b] = 1.0
                        candidates[a].append(b)
                    w[a][b] += confidence[e] * h_a * h_b
        w = [{v: _to_float32(x) for v, x in row.items()} for row in w]

        for q in range(n):
            for v in lists[q][1:]:
                overlap = sum(edges[q].get(e, 0.0) * h for e, h in edges[v].items())
                w[q][v] = _to_float32(w[q][v] * overlap)
        for q in range(n):
            holders = {e: edges[e][q] for e in range(n) if q in edges[e]}
            for v in lists[q][1:]:
                overlap = sum(holders.get(e, 0.0) * h for e, h in edges[v].items())
                w[q][v] = _to_float32(w[q][v] * overlap)

        for q in range(n):
            lists[q] = _sort_after_first(lists[q], w[q])
            incoming = sorted(candidates[q], key=lambda v, row=w[q]: (-row[v], v))
            lists[q] = [lists[q][0], *merge_candidates_reference(
                lists[q][1:], [w[q][v] for v in lists[q][1:]], incoming,
                [w[q][v] for v in incoming])]
    return np.array(lists, dtype=np.int64), edges, confidence


def sgcc_reference(edges: list[dict[int, float]], confidence: list[float], n_clusters: int,
                   labelled_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SGCC leader clustering on dense H. Returns labels (n,), leaders (c,) and scores (n,)."""
    n = len(edges)
    dense = np.zeros((n, n))
    for i, edge in enumerate(edges):
        for v, h in edge.items():
            dense[i, v] = h
    score = [confidence[i] * edges[i][i] for i in range(n)]
    # the authors sort ascending (stable) and reverse: equal scores, larger id first
    by_score = sorted(range(n), key=lambda i: (_to_float32(score[i]), i), reverse=True)
    leaders = [by_score[0]]
    overlap = [0.0] * n
    while len(leaders) < n_clusters:
        last = leaders[-1]
        for j in range(n):
            overlap[j] += float(np.dot(dense[last], dense[j]))
        best, best_value = -1, -np.inf
        for j in range(n):
            if j in leaders:
                continue
            value = _to_float32(score[j] / (1.0 + overlap[j]))
            if value >= best_value:  # ties: the larger id
                best, best_value = j, value
        leaders.append(best)
    labels = [-1] * n
    clusters: list[list[int]] = []
    for c, leader in enumerate(leaders):
        labels[leader] = c
        clusters.append([leader])
    for item in by_score[:int(n * labelled_fraction)]:
        if item in leaders:
            continue
        best, best_value = -1, -np.inf
        for c, members in enumerate(clusters):
            value = _to_float32(sum(dense[m, item] for m in members) / len(members))
            if value >= best_value:  # ties: the later cluster
                best, best_value = c, value
        clusters[best].append(item)
        labels[item] = best
    return (np.array(labels, dtype=np.int64), np.array(leaders, dtype=np.int64),
            np.array(score))


# ---------------------------------------------------------------------------------------------
# Bounds on an implementation's float32 error against the oracles (the `atol` of `tie_aware`)


def gnn_atol(n_nodes: int, k1: int, k2: int, lambda_value: float, dim: int) -> float:
    """Largest error of GNN's float32 distance 1 - score against the float64 reference
    (test_gnn.py's dense one).

    The graph term: with k2 = 1, counts of shared neighbours, exact in float32 (one rounding of
    (1 - lambda) * count <= k1). Otherwise two layers, each a k2-term weighted sum of A + A^T
    ((k2 + 2) U32 relative) and a norm over <= n entries (n / 2 + 2), then a score summing <= n
    products of unit rows (n U32 plus twice the rows' relative error), so at most
    (4 k2 + 3 n + 16) U32. The cosine term: a float32 dot product of unit vectors, dim U32.
    """
    graph = (k1 + 2) * U32 if k2 == 1 else (4 * k2 + 3 * n_nodes + 16) * U32
    return (1 - lambda_value) * graph + lambda_value * (dim + 2) * U32 + 2 * U32


def k_reciprocal_atol(n_nodes: int, k2: int, lambda_value: float) -> float:
    """Largest error of k-reciprocal's distance against `k_reciprocal_reference` (both float32).

    The reference's encoding: d' from float32 squares and a division (4 U32), float32 exp
    (<= 2 ulps) and a row sum of <= n terms, (n + 10) U32 relative; the query expansion's mean
    of k2 rows adds (k2 + 1) U32; the overlap sums <= n minima (m <= 1) in float32: m is off by
    (2 n + k2 + 11) U32, and the engine's (float64 sums, fewer roundings) by no more. d_J =
    1 - m / (2 - m) has slope <= 2 in m, so d_J is off by 4 (2 n + k2 + 11) + 3 U32; d' by
    8 U32 (both sides' roundings); the final sum rounds once more.
    """
    jaccard = (4 * (2 * n_nodes + k2 + 11) + 3) * U32
    return (1 - lambda_value) * jaccard + (8 * lambda_value + 2) * U32


def icfrr_atol(beta: float, kq: int, steps: int = 1) -> float:
    """Largest error of a float32 ICFRR score against the float64 oracle's.

    delta sums kq terms 1/kq * alpha (each off by 3 U32: float32 1/kq, 1 - r/(n - 1) and their
    product) in float32: off by (kq + 3) U32 at most, as delta <= 1; beta * delta and the sum
    with the (exact) base round once each, the score staying within 2 + steps * beta. The
    per-position prior adds one update to the base (steps = 1); paper-literal accumulates one
    per iteration (steps = t).
    """
    return steps * (beta * (kq + 4) + 2 + steps * beta) * U32


def assert_icfrr_steps(run: Callable[[int], tuple[np.ndarray, np.ndarray]], qg: np.ndarray,
                       gg: np.ndarray, KG: int, KQ: int, beta: float, n_times: int,
                       paper_literal: bool = False, lists: np.ndarray | None = None,
                       label: str = "") -> list[np.ndarray]:
    """Check an ICFRR implementation an iteration at a time against the oracle.

    run(t) gives the implementation's full result after t iterations, (order (Q, G), scores
    (Q, G), larger is better). Iteration 0 must sort qg ascending, stably, exactly (the same
    float32 distances); iteration t must be the oracle's step from the implementation's own
    orders 0 .. t - 1 (`icfrr_step_reference`), up to float ties (`tie_aware`, `icfrr_atol`).
    KG and KQ are the values used (clamped); lists: the implementation's gallery lists, when
    not gg's stable sort (see `icfrr_step_reference`). Returns the orders of iterations
    0 .. n_times.
    """
    orders = [run(0)[0]]
    np.testing.assert_array_equal(orders[0], np.argsort(qg, axis=1, kind="stable"),
                                  err_msg=f"{label}: iteration 0")
    for t in range(1, n_times + 1):
        order, score = run(t)
        expected = icfrr_step_reference(qg, gg, KG, KQ, beta, orders, paper_literal, lists)
        assert_order_matches(order, expected, values=score, larger_is_better=True,
                             atol=icfrr_atol(beta, KQ, t if paper_literal else 1),
                             label=f"{label} iteration {t}")
        orders.append(order)
    return orders


def checked_gallery_lists(lists: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """An implementation's gallery lists (from the kNN graph: sorted by similarity, where the
    oracles sort float32 distances, which can tie where the similarities do not), checked to
    sort the gallery up to float ties (canonical similarities are rounded once: U32), so an
    oracle may take R from them (`icfrr_step_reference`)."""
    lists = np.asarray(lists)
    gallery64 = np.asarray(gallery, np.float64)
    assert_order_matches(lists, gallery64 @ gallery64.T, atol=U32, larger_is_better=True)
    return lists


def lists_without_item(lists: np.ndarray, i: int) -> np.ndarray:
    """Gallery lists of the gallery without item i (renumbered), as leave-one-out sees them."""
    kept = np.stack([row[row != i][:lists.shape[1] - 1]
                     for a, row in enumerate(lists) if a != i])
    return kept - (kept > i)
