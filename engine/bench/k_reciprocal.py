"""Benchmark: k-reciprocal batch re-ranking (leave-one-out) against the authors' dense code.

    python -m engine.bench.k_reciprocal                       # N = 2,000, 5,000, 10,000
    python -m engine.bench.k_reciprocal --sizes 2000 --dim 1280 --k 100

For each N, clustered synthetic unit features (`synthetic_collection`), every item a query
against the rest: the seconds of the authors' dense numpy code (`authors_re_ranking`, their
released `re_ranking` on the gallery's own graph) and of `KReciprocalReranker.rerank(None)` on a
context with the gallery's kNN graph (as the app's gallery cache provides), in the same run, and
whether both give the same top-k up to float ties (`same_top_k`). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from engine.bench.measure import synthetic_collection
from engine.bench.tables import markdown_table
from engine.core.knn import knn_graph
from engine.core.threads import configure_threads
from engine.core.types import GalleryContext
from engine.search.gallery import DEFAULT_KNN_DEPTH


def authors_re_ranking(original_dist: np.ndarray, query_num: int, k1: int = 20, k2: int = 6,
                       lambda_value: float = 0.3) -> np.ndarray:
    """The authors' `re_ranking` (zhunzhong07/person-re-ranking, python version), as released,
    from the point where it has the joint (query + gallery) Euclidean distance matrix.

    Args:
        original_dist: (n, n) Euclidean distances between all nodes, the queries first.
        query_num: how many of the first nodes are queries.
    Returns:
        (query_num, n - query_num) float32 final distances. For leave-one-out pass the gallery
        alone with query_num = n: the final (n, n) distances, the diagonal to be ignored.
    """
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1. * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    all_num = gallery_num = original_dist.shape[0]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate,
                                                           :int(np.around(k1 / 2.)) + 1]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                                            :int(np.around(k1 / 2.)) + 1]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if (len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index))
                    > 2. / 3 * len(candidate_k_reciprocal_index)):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                         candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1. * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
                V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2. - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:] if query_num < all_num else final_dist


def euclidean_distances(features: np.ndarray) -> np.ndarray:
    """(n, n) float32 Euclidean distances between rows, from float64 products (as the tests'
    oracle): float32 products would reorder near-ties of the neighbour lists, and with them
    whole reciprocal sets, so the comparison would measure the input's rounding."""
    features64 = features.astype(np.float64)
    norms = (features64 ** 2).sum(1)
    squared = norms[:, None] + norms[None, :] - 2 * features64 @ features64.T
    return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)


def same_top_k(indices: np.ndarray, final: np.ndarray, atol: float) -> tuple[bool, int]:
    """Whether each row of `indices` is the top-k of the dense `final` up to ties within atol.

    Row by row: the values of `final` at `indices` ascend (within atol), none is more than atol
    above the k-th smallest value, and every item strictly better than the returned k-th (by
    more than atol) is returned. Returns (all rows agree, rows whose index lists differ at all).
    """
    k = indices.shape[1]
    values = np.take_along_axis(final, indices, axis=1)
    kth = np.partition(final, k - 1, axis=1)[:, k - 1]
    ascending = (np.diff(values, axis=1) >= -atol).all(axis=1)
    not_worse = values[:, -1] <= kth + atol
    must = (final < (kth - atol)[:, None]).sum(axis=1)
    returned = (values < (kth - atol)[:, None]).sum(axis=1)
    ok = ascending & not_worse & (must == returned)
    exact = np.argsort(final, axis=1, kind="stable")[:, :k]
    return bool(ok.all()), int((exact != indices).any(axis=1).sum())


def run(sizes: Sequence[int], dim: int, k: int, authors: bool = True) -> list[list[str]]:
    """One row per N: authors' seconds, ours with the gallery's graph deep enough for the
    ranking (as a gallery cache built at that depth gives it), the ratio, ours with the app's
    default graph depth (which then searches the neighbours again), the graph's own build
    seconds, and whether the top-k agree with the authors' (`same_top_k`)."""
    from engine.rerank import create_reranker, get_reranker_class

    rows = []
    for n in sizes:
        features, _ = synthetic_collection(n, dim)
        started = time.perf_counter()
        graph = knn_graph(features, get_reranker_class("k_reciprocal").batch_graph_depth(k))
        graph_seconds = time.perf_counter() - started
        timings, results = [], []
        for context in (GalleryContext(features, knn=graph),
                         GalleryContext(features, knn=knn_graph(features, DEFAULT_KNN_DEPTH))):
            reranker = create_reranker("k_reciprocal", device="cpu").fit(context)
            started = time.perf_counter()
            results.append(reranker.rerank(None, k))
            timings.append(time.perf_counter() - started)
        same_as_shallow = bool((results[0].indices == results[1].indices).all())
        row = [str(n), "-", f"{timings[0]:.2f}", "-", f"{timings[1]:.2f}", f"{graph_seconds:.2f}"]
        if authors:
            distances = euclidean_distances(features)  # their input, computed outside
            started = time.perf_counter()
            final = authors_re_ranking(distances, n)
            theirs = time.perf_counter() - started
            np.fill_diagonal(final, np.inf)  # leave-one-out
            same, differing = same_top_k(results[0].indices, final, atol=1e-5)
            row[1], row[3] = f"{theirs:.2f}", f"{theirs / timings[0]:.1f}x"
            row.append(f"{'yes' if same and same_as_shallow else 'NO'} "
                       f"({differing} rows order tied items differently)")
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--no-authors", action="store_true", help="time ours only")
    args = parser.parse_args(argv)
    configure_threads()
    rows = run(args.sizes, args.dim, args.k, not args.no_authors)
    title = (f"k-reciprocal batch (leave-one-out, k1=20, k2=6, lambda=0.3), synthetic clustered "
             f"d={args.dim}, top-{args.k}")
    headers = ["N", "authors s", "ours s", "ratio", f"ours s, {DEFAULT_KNN_DEPTH}-deep graph",
               "graph build s", f"top-{args.k} identical"]
    print(markdown_table(title, headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
