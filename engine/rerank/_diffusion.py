"""Diffusion's math (Iscen et al., CVPR 2017): the mutual kNN affinity, its symmetric
normalisation, the query's seed vector, conjugate gradient over a block of right-hand sides,
and the ranking of the solved scores. Pure functions: the graph is built with numpy and
scipy.sparse, and solved with torch on the fitted graph's device (CPU or GPU: a sparse CSR
tensor, `sparse_tensor`, times dense blocks); the class in `engine.rerank.diffusion` holds the
parameters and the fitted graph.

Every gallery-by-gallery matrix here is scipy.sparse CSR with at most k - 1 entries a row; the
dense blocks are (G, B) for B right-hand sides at a time, never (G, G).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from engine.core.knn import top_k_smallest, torch_topk_largest

DEGREE_CANCELLATION = 1e-12
"""Leave-one-out: a neighbour of the left-out item whose degree, less its edge to that item,
is below this share of its full degree has no other edge (the subtraction leaves a rounding
residue of about 1e-16 of the degree, a real edge is larger by many orders)."""


def mutual_affinity(indices: np.ndarray, similarities: np.ndarray, gamma: float) -> sp.csr_matrix:
    """The affinity W of the mutual kNN graph: w_ij = max(0, s_ij)^gamma when j is in i's list
    and i in j's, 0 otherwise and on the diagonal.

    Args:
        indices: (G, k) each item's k nearest gallery rows, itself normally among them (the
            authors' lists include the item; it is dropped wherever it stands).
        similarities: (G, k) their similarities (canonical float32).
        gamma: the similarity exponent.
    Returns:
        (G, G) float64 CSR, symmetric, zero diagonal, no explicit zeros. An approximate graph
        may list a pair with two float32 values that differ in the last bits; their mean is
        taken, so W stays symmetric (for a canonical graph both are the same number).
    """
    size, depth = indices.shape
    rows = np.repeat(np.arange(size, dtype=np.int64), depth)
    columns = np.asarray(indices, np.int64).ravel()
    values = np.asarray(similarities, np.float64).ravel()
    off_diagonal = rows != columns
    listed = sp.csr_matrix((values[off_diagonal], (rows[off_diagonal], columns[off_diagonal])),
                           shape=(size, size))
    listed.sum_duplicates()
    pattern = listed.copy()
    pattern.data = np.ones_like(pattern.data)
    mutual = pattern.multiply(pattern.T).tocsr()          # 1 where both list each other
    similarity = ((listed + listed.T) * 0.5).multiply(mutual).tocsr()
    similarity.data = np.maximum(similarity.data, 0.0) ** gamma
    similarity.eliminate_zeros()
    similarity.sort_indices()
    return similarity


def inverse_sqrt_degree(affinity: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Each item's degree d_i = sum_j w_ij and d_i^-1/2, 0 for an item without edges (its row
    of S is empty, as in the authors' sparse product). Returns ((G,), (G,)) float64."""
    degree = np.asarray(affinity.sum(axis=1), np.float64).ravel()
    inverse = np.zeros_like(degree)
    positive = degree > 0
    inverse[positive] = degree[positive] ** -0.5
    return degree, inverse


def normalised(affinity: sp.csr_matrix, inverse: np.ndarray) -> sp.csr_matrix:
    """S = D^-1/2 W D^-1/2, (G, G) float64 CSR, symmetric."""
    scaling = sp.diags(inverse)
    transition = (scaling @ affinity @ scaling).tocsr()
    transition.sort_indices()
    return transition


def left_out_scaling(affinity: sp.csr_matrix, degree: np.ndarray, inverse: np.ndarray,
                     left_out: np.ndarray) -> np.ndarray:
    """D_b^-1/2 of the graph without item left_out[b], one column per left-out item.

    Removing an item removes its edges: its own scale is 0 (it is isolated), and each of its
    neighbours j loses w_jq from its degree. Its neighbours' lists are not refilled with their
    next neighbour (that would need each list one deeper and a new mutual test per query).

    Args:
        affinity: (G, G) W; degree, inverse: its degrees and d^-1/2 (`inverse_sqrt_degree`).
        left_out: (B,) gallery rows.
    Returns:
        (G, B) float64.
    """
    scaling = np.repeat(inverse[:, None], len(left_out), axis=1)
    for column, item in enumerate(left_out):
        start, stop = affinity.indptr[item], affinity.indptr[item + 1]
        neighbours = affinity.indices[start:stop]
        rest = degree[neighbours] - affinity.data[start:stop]
        alone = rest <= DEGREE_CANCELLATION * degree[neighbours]
        scaling[neighbours, column] = np.where(alone, 0.0, np.where(alone, 1.0, rest) ** -0.5)
        scaling[item, column] = 0.0
    return scaling


def seed_vectors(ids: np.ndarray, similarities: np.ndarray, size: int, gamma: float
                 ) -> np.ndarray:
    """y: each query's top-kq gallery items hold max(0, s)^gamma, every other item 0.

    Args:
        ids: (B, kq) gallery rows; similarities: (B, kq) their similarities to the query.
    Returns:
        (G, B) float64, one column per query.
    """
    seeds = np.zeros((size, ids.shape[0]), np.float64)
    weights = np.maximum(np.asarray(similarities, np.float64), 0.0) ** gamma
    seeds[ids.T, np.arange(ids.shape[0])[None, :]] = weights.T
    return seeds


Operator = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""A x for the (G, c) columns x of the right-hand sides `columns` ((c,) ints, None: all)."""


def sparse_tensor(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """A (G, G) scipy CSR matrix as a float64 torch CSR tensor on `device`, for its products
    with dense (G, c) blocks there (on the CPU, on the 20k-item synthetic gallery, 840k
    entries by 838 columns: 1.4 s against scipy's 2.6 s, under load; it also uses the thread
    budget's torch threads). The sums of a row run over its entries in order, so one column
    gives what it gives in a block."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": products only
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)),
            torch.from_numpy(matrix.indices.astype(np.int64)),
            torch.from_numpy(np.ascontiguousarray(matrix.data, np.float64)),
            size=matrix.shape, check_invariants=False).to(device)


def shared_operator(transition: torch.Tensor, alpha: float) -> Operator:
    """A = I - alpha S, the same for every column (S a `sparse_tensor`)."""
    def apply(block: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        product = transition @ block
        product *= -alpha
        product += block
        return product
    return apply


def left_out_operator(affinity: torch.Tensor, scaling: torch.Tensor, alpha: float) -> Operator:
    """A_b = I - alpha D_b^-1/2 W D_b^-1/2 for column b (`left_out_scaling`, on the device of
    W, a `sparse_tensor`). The rows and columns of W at the left-out item need no removing:
    its scale is 0 on both sides."""
    def apply(block: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        scale = scaling if columns is None else scaling[:, columns]
        product = affinity @ (scale * block)
        product *= scale
        product *= -alpha
        product += block
        return product
    return apply


@dataclass(frozen=True)
class Solution:
    """Conjugate gradient's answer for B right-hand sides.

    f: (G, B) float64 iterates, a tensor on the right-hand sides' device. iterations: (B,)
    steps taken. residual: (B,) final relative residual |y - A f| / |y| (from CG's
    recurrence; 0 for y = 0). steps, directions: (n, B) the step lengths and direction
    updates of each column's iterations (0 after it stopped): replaying them (`replay`)
    applies the very same polynomial in A to other vectors. All but f are numpy arrays.
    """

    f: torch.Tensor
    iterations: np.ndarray
    residual: np.ndarray
    steps: np.ndarray
    directions: np.ndarray


def _column_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) the dot products of the columns of two (G, B) float64 tensors. On the CPU numpy's
    einsum: 2.5 times torch's fastest column reduction and 30 times torch's einsum (8000 x
    2000 blocks), the largest cost of a CG step with the latter."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.einsum("ij,ij->j", a.numpy(), b.numpy()))
    return torch.linalg.vecdot(a, b, dim=0)


def conjugate_gradient(apply: Operator, right: torch.Tensor, tolerance: float, iterations: int
                       ) -> Solution:
    """Solve A f = y for every column of y by conjugate gradient from f = 0, each column on its
    own: it stops when |r| <= tolerance |y| (MATLAB pcg's test, the authors' solver) or after
    `iterations` steps, returning its last iterate. Every step runs on y's device.

    Args:
        apply: the operator (`shared_operator`, `left_out_operator`), symmetric positive
            definite for alpha < 1.
        right: (G, B) float64 right-hand sides.
    """
    width = right.shape[1]
    device = right.device
    f = torch.zeros_like(right)
    residual_vectors = right.clone()
    direction = right.clone()
    squared = _column_dot(right, right)
    norm = squared.sqrt()
    active = norm > 0
    taken = torch.zeros(width, dtype=torch.int64, device=device)
    relative = torch.zeros(width, dtype=torch.float64, device=device)
    steps = torch.zeros((iterations, width), dtype=torch.float64, device=device)
    updates = torch.zeros((iterations, width), dtype=torch.float64, device=device)
    for step in range(iterations):
        columns = torch.nonzero(active).flatten()
        if columns.numel() == 0:
            break
        every = columns.numel() == width
        p = direction if every else direction[:, columns]
        product = apply(p, None if every else columns)
        curvature = _column_dot(p, product)
        positive = curvature > 0
        length = torch.where(positive, squared[columns] / torch.where(positive, curvature, 1.0),
                             0.0)
        if every:
            f += length * p
            residual_vectors -= length * product
            r = residual_vectors
        else:
            f[:, columns] += length * p
            residual_vectors[:, columns] -= length * product
            r = residual_vectors[:, columns]
        new_squared = _column_dot(r, r)
        taken[columns] = step + 1
        relative[columns] = new_squared.sqrt() / norm[columns]
        steps[step, columns] = length
        done = (relative[columns] <= tolerance) | ~positive
        previous = squared[columns]
        update = torch.where(done, 0.0, new_squared / torch.where(previous > 0, previous, 1.0))
        updates[step, columns] = update
        if every:
            direction *= update
            direction += r
        else:
            direction[:, columns] = r + update * p
        squared[columns] = new_squared
        active[columns[done]] = False
    used = int(taken.max()) if width else 0
    return Solution(f, taken.cpu().numpy(), relative.cpu().numpy(),
                    steps[:used].cpu().numpy(), updates[:used].cpu().numpy())


def replay(apply: Operator, seeds: torch.Tensor, steps: np.ndarray, directions: np.ndarray
           ) -> torch.Tensor:
    """CG's recurrence on other right-hand sides with one column's step lengths and direction
    updates ((n,) each): x_n = p(A) e for the same polynomial p CG built for y, so that for
    y = sum_j y_j e_j the iterate is f = sum_j y_j x_n(e_j) (to rounding), whether CG
    converged or stopped after its last step. Returns (G, m) for seeds (G, m)."""
    x = torch.zeros_like(seeds)
    r = seeds.clone()
    p = seeds.clone()
    for length, update in zip(steps.tolist(), directions.tolist(), strict=True):
        product = apply(p, None)
        x += length * p
        r -= length * product
        p = r + update * p
    return x


def rank_scores(f: np.ndarray, similarity: Callable[[np.ndarray], np.ndarray], k: int,
                exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top k of each column's diffusion scores, best first: items the walk reaches (f != 0)
    by f descending, then the others by their original similarity descending (ties: the
    smaller row).

    Distances are -f for reached items; an unreached item's is the column's largest reached
    distance (at least 0) plus 1 - s, so they stay ascending.

    Args:
        f: (G, B) scores. similarity: rows (c,) of B's columns -> (c, G) their original
            (canonical) similarities, called only for columns whose reached items are
            fewer than k. k: at most G (G - 1 with `exclude`).
        exclude: (B,) a row each column must not return (leave-one-out's item), or None.
    Returns:
        distances (B, k) float32, indices (B, k) int64, reached (B,) int64 items with f != 0.
    """
    size, width = f.shape
    scores = np.ascontiguousarray(f.T)                          # (B, G)
    reached = scores != 0
    if exclude is not None:
        reached[np.arange(width), exclude] = False
    key = np.where(reached, -scores, np.inf)
    distances, indices = top_k_smallest(key, k)
    distances = distances.astype(np.float32)
    counts = reached.sum(axis=1)
    short = np.flatnonzero(counts < k)
    if short.size:
        similar = np.asarray(similarity(short), np.float32)     # (c, G)
        # one sort of the short rows: reached first (by -f), then the rest (by -s), then the
        # excluded item; ties by the smaller row
        group = np.where(reached[short], 0, 1)
        if exclude is not None:
            group[np.arange(short.size), exclude[short]] = 2
        value = np.where(reached[short], key[short], -similar.astype(np.float64))
        rows = np.broadcast_to(np.arange(size), value.shape)
        order = np.lexsort((rows, value, group), axis=-1)[:, :k]
        picked = np.take_along_axis(reached[short], order, 1)
        ahead = np.where(reached[short], key[short], -np.inf).max(axis=1).astype(np.float32)
        base = np.maximum(ahead, np.float32(0.0))[:, None]
        tail = base + (np.float32(1.0) - np.take_along_axis(similar, order, 1))
        indices[short] = order
        listed = np.take_along_axis(key[short], order, 1).astype(np.float32)
        distances[short] = np.where(picked, listed, tail)
    return distances, indices, counts.astype(np.int64)


def torch_rank_scores(f: torch.Tensor, similarity: Callable[[np.ndarray], np.ndarray], k: int,
                      exclude: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`rank_scores` with the top k taken on f's device (a GPU's batch: only (B, k) comes
    back); the columns that reach fewer than k items, whose unreached items need their
    original similarities, go through `rank_scores` on the CPU."""
    width = f.shape[1]
    scores = f.T
    reached = scores != 0
    if exclude is not None:
        reached[torch.arange(width, device=f.device),
                torch.from_numpy(np.asarray(exclude, np.int64)).to(f.device)] = False
    values, order = torch_topk_largest(torch.where(reached, scores, -torch.inf), k)
    distances = (-values).float().cpu().numpy()
    indices = order.cpu().numpy().astype(np.int64)
    counts = reached.sum(dim=1).cpu().numpy().astype(np.int64)
    short = np.flatnonzero(counts < k)
    if short.size:
        distances[short], indices[short], _ = rank_scores(
            f[:, torch.from_numpy(short).to(f.device)].cpu().numpy(),
            lambda columns: similarity(short[columns]), k,
            None if exclude is None else np.asarray(exclude)[short])
    return distances, indices, counts
