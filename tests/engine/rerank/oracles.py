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
