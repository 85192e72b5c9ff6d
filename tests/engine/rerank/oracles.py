"""Slow, literal implementations of the methods' definitions, used as test oracles.

Written from the method notes (dense matrices, plain loops); deliberately unoptimised.
"""

from __future__ import annotations

import numpy as np


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


def _icfrr_ranks_and_weights(gg: np.ndarray, KG: int) -> tuple[np.ndarray, np.ndarray]:
    """ICFRR's dense R (b's position in a's ascending gg list, minus one: self -1) and the
    position weights alpha = linspace(1, 0, G) with alpha[KG:] = 0 (alpha[-1] is the last)."""
    size = gg.shape[0]
    ranks = np.zeros((size, size), np.int64)
    for a in range(size):
        ranks[a] = np.argsort(np.argsort(gg[a], kind="stable"), kind="stable") - 1
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
