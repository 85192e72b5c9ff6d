"""The data behind the explorer's kNN-graph plot: a 2-D layout of the query and its results and
the gallery kNN edges among them.

The layout is computed once for the union of every method's results, so the page can show any
subset (the baseline's list, a re-ranker's list) and each image stays where it was: toggling
between methods changes which nodes are drawn, never where they are. Edges come from the
gallery's kNN graph, so they show the neighbourhood structure the re-rankers work on; an edge is
mutual when each endpoint is among the other's `edge_k` nearest (the k-reciprocal relation).
Nodes that MDS puts (nearly) on top of each other are pushed apart to a minimum spacing, in
the layout itself, so every method's plot shows the same legible, overlap-free positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.knn import canonical_similarity
from engine.core.types import KnnGraph
from engine.errors import InvalidInputError

EIGENVALUE_FLOOR = 1e-10
"""MDS eigenvalues below this are rounding noise of float32 similarities (a coordinate spread
of 1e-5), not structure; they are set to 0 so coincident points do not get a blown-up layout."""
NODE_SPACING = 0.22
"""Least distance between node centres in the final layout (the wider axis spans [-1, 1]).
The explorer's largest node marker is 28 px; its kNN plot is drawn with equal axis scales,
about 2.6 layout units (the layout plus a margin) over the plot's shorter side, about 360 px
high: a 28-px marker is about 0.2 units wide."""
SPREAD_ITERATIONS = 500
"""At most this many rounds of pushing overlapping nodes apart (a few dozen suffice for 30
nodes at NODE_SPACING; the cap only bounds a pathological input)."""


@dataclass(frozen=True)
class NeighbourhoodGraph:
    """Nodes, their 2-D positions and kNN edges; node 0 is the query, nodes 1..n gallery rows.

    rows: (n,) int64 gallery rows of nodes 1..n.
    positions: (n + 1, 2) float64 node positions inside [-1, 1], node 0 = the query.
    edges: (m, 2) int64 node numbers, each pair once, smaller first, sorted.
    mutual: (m,) bool, each endpoint is among the other's edge_k nearest.
    similarity: (m,) float32 cosine similarity of the endpoints.
    """

    rows: np.ndarray
    positions: np.ndarray
    edges: np.ndarray
    mutual: np.ndarray
    similarity: np.ndarray

    def node_of(self, row: int) -> int:
        """The node number (1..n) of gallery row `row`."""
        return int(self.nodes_of(np.array([row]))[0])

    def nodes_of(self, rows: Any) -> np.ndarray:
        """Node numbers (1..n) of several gallery rows, in their order, as (len(rows),) int64."""
        wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
        hits = wanted[:, None] == self.rows[None, :]
        missing = ~hits.any(axis=1)
        if missing.any():
            raise InvalidInputError(
                f"gallery rows {wanted[missing][:10].tolist()} are not nodes of this "
                "neighbourhood graph; build it from the union of every ranking shown")
        return hits.argmax(axis=1).astype(np.int64) + 1


def neighbourhood_graph(query_feature: Any, gallery_features: np.ndarray, rows: Any,
                        knn: KnnGraph, edge_k: int = 10, query_row: int | None = None,
                        spacing: float = NODE_SPACING) -> NeighbourhoodGraph:
    """Lay out the query and gallery `rows` in 2-D and join them by gallery kNN edges.

    Two gallery nodes are joined when one is among the other's first `edge_k` neighbours in
    `knn` (itself excluded); the edge is mutual when both are. The query is joined to the
    nodes among its `edge_k` most similar drawn nodes (for a gallery pick, the first `edge_k`
    of its own kNN row instead); such an edge is mutual when the query would also be among the
    node's `edge_k` nearest: for a gallery pick, query_row is in the node's list; otherwise the
    query's similarity reaches the node's edge_k-th neighbour similarity. `edge_k` is clamped
    to the graph depth - 1.

    Args:
        query_feature: (d,) or (1, d) L2-normalised query feature.
        gallery_features: (G, d) L2-normalised gallery features (only the drawn rows are read).
        rows: gallery rows to draw, e.g. several methods' top-K lists one after another;
            repeats are dropped (first kept) and so is query_row.
        knn: the gallery's kNN graph (each row's own index first).
        query_row: the gallery row the query is, for a gallery pick; None for an upload.
        spacing: least distance between node centres in the final [-1, 1] layout (0: no
            spreading).
    Returns:
        The NeighbourhoodGraph; its positions are the classical MDS of the cosine distances,
        spread by `spread_apart` so no two nodes lie closer than `spacing`.
    """
    query, gallery = _check_features(query_feature, gallery_features)
    size = gallery.shape[0]
    if knn.indices.shape[0] != size or knn.similarities.shape != knn.indices.shape:
        raise InvalidInputError(
            f"the kNN graph has {knn.indices.shape[0]} rows but the gallery has {size}; "
            "rebuild it for this gallery")
    if isinstance(edge_k, bool) or not isinstance(edge_k, (int, np.integer)) or edge_k < 1:
        raise InvalidInputError(f"edge_k must be a positive integer, got {edge_k!r}")
    if not 0.0 <= float(spacing) <= 0.5:
        raise InvalidInputError(f"spacing must lie in [0, 0.5], got {spacing!r}")
    if query_row is not None:
        query_row = int(_check_rows([query_row], size, "query_row")[0])
    rows = _check_rows(rows, size, "rows")
    _, first = np.unique(rows, return_index=True)
    rows = rows[np.sort(first)]
    rows = rows[rows != query_row] if query_row is not None else rows
    points = np.concatenate([query, gallery[rows]])
    if not np.isfinite(points).all():
        raise InvalidInputError("the query or drawn gallery features contain NaN or infinite "
                                "values; re-extract them")
    similarity = canonical_similarity(points, points)
    depth_k = min(int(edge_k), knn.depth - 1)

    forward = np.zeros((len(points), len(points)), bool)           # forward[i, j]: j in N_k(i)
    node_rows, node_nodes = _first_neighbours(knn, rows, rows, depth_k)
    forward[node_rows + 1, node_nodes] = True
    if query_row is not None:
        _, query_nodes = _first_neighbours(knn, np.array([query_row]), rows, depth_k)
        forward[0, query_nodes] = True
        reverse = (_knn_heads(knn, rows, depth_k) == query_row).any(axis=1)
    else:
        order = np.argsort(-similarity[0, 1:], kind="stable")[:depth_k]
        forward[0, order + 1] = True
        reverse = similarity[0, 1:] >= knn.similarities[rows, depth_k]
    forward[1:, 0] = reverse & forward[0, 1:]                       # query edges: query's side

    joined = np.triu(forward | forward.T, k=1)
    both = forward & forward.T
    first_node, second_node = np.nonzero(joined)
    distances = 1.0 - similarity.astype(np.float64)
    np.fill_diagonal(distances, 0.0)                                # float32 self-products < 1
    return NeighbourhoodGraph(
        rows=rows,
        positions=fit_to_unit_box(spread_apart(classical_mds(distances), spacing,
                                               np.concatenate([[-1], rows]))),
        edges=np.stack([first_node, second_node], axis=1).astype(np.int64),
        mutual=both[first_node, second_node],
        similarity=similarity[first_node, second_node].astype(np.float32))


def classical_mds(distances: np.ndarray) -> np.ndarray:
    """Classical (Torgerson) MDS to 2-D with a fixed orientation.

    B = -1/2 J D^2 J (J the centring matrix); coordinates are the top two eigenvectors scaled
    by the square roots of their eigenvalues (negative ones clipped to 0). Each axis is flipped
    so that its largest-magnitude coordinate is positive, so the same input gives the same
    picture (eigenvectors have no sign of their own).

    Args:
        distances: (n, n) symmetric distances.
    Returns:
        (n, 2) float64 coordinates, centred on the mean (zeros where there is no spread).
    """
    distances = np.asarray(distances, dtype=np.float64)
    n = distances.shape[0]
    if n < 2:
        return np.zeros((n, 2))
    squared = distances ** 2
    centred = squared - squared.mean(axis=0) - squared.mean(axis=1)[:, None] + squared.mean()
    gram = -0.5 * (centred + centred.T) / 2                         # symmetric against rounding
    values, vectors = np.linalg.eigh(gram)
    top = np.argsort(values)[::-1][:2]
    scale = np.sqrt(np.where(values[top] > EIGENVALUE_FLOOR, values[top], 0.0))
    coordinates = vectors[:, top] * scale
    largest = coordinates[np.abs(coordinates).argmax(axis=0), [0, 1]]
    return coordinates * np.where(largest < 0, -1.0, 1.0)


def fit_to_unit_box(coordinates: np.ndarray) -> np.ndarray:
    """Centre the bounding box of (n, 2) coordinates on 0 and scale both axes by one factor so
    the wider axis spans [-1, 1] (the aspect ratio, hence relative distances, is kept)."""
    if len(coordinates) == 0:
        return np.zeros((0, 2))
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    half_span = float((high - low).max()) / 2
    centred = coordinates - (low + high) / 2
    return centred / half_span if half_span > 0 else np.zeros_like(centred)


def spread_apart(coordinates: np.ndarray, spacing: float, ids: np.ndarray | None = None
                 ) -> np.ndarray:
    """Push (n, 2) points apart until no two are closer than `spacing` times the half-width of
    their bounding box (so `fit_to_unit_box` of the result keeps them `spacing` apart).

    Each round moves both points of every too-close pair away from each other along the line
    between them, half the shortfall each (plus 1 %, so the rounds end), all pairs at once:
    the result depends on the set of points, not on their order. Points at one spot move
    apart along a direction made from their `ids` (distinct integers, e.g. gallery rows; by
    default 0..n-1), so coincident points spread the same way whatever their order. A layout
    without spread (every point at one spot) gets a unit scale first.

    Returns:
        (n, 2) float64 coordinates; the input unchanged where nothing is too close.
    """
    points = np.array(coordinates, dtype=np.float64)
    count = len(points)
    if count < 2 or spacing <= 0:
        return points
    ids = np.arange(count) if ids is None else np.asarray(ids, dtype=np.int64)
    low, high = np.minimum(ids[:, None], ids[None, :]), np.maximum(ids[:, None], ids[None, :])
    angle = (low * 0.618034 + high * 0.414214) % 1.0 * 2 * np.pi   # per pair, order-free
    fallback = np.stack([np.cos(angle), np.sin(angle)], axis=2)
    fallback *= np.where(ids[:, None] < ids[None, :], -1.0, 1.0)[..., None]  # i moves away
    upper = np.triu(np.ones((count, count), bool), k=1)
    for _ in range(SPREAD_ITERATIONS):
        half_span = float((points.max(axis=0) - points.min(axis=0)).max()) / 2
        target = spacing * (half_span if half_span > 0 else 1.0)
        offsets = points[:, None, :] - points[None, :, :]            # offsets[i, j] = p_i - p_j
        distances = np.linalg.norm(offsets, axis=2)
        close = (distances < target) & ~np.eye(count, dtype=bool)
        if not close[upper].any():
            break
        together = distances < target * 1e-6
        directions = np.where(together[..., None], fallback,
                              offsets / np.where(together, 1.0, distances)[..., None])
        shortfall = np.where(close, (target * 1.01 - distances) / 2, 0.0)
        points = points + (directions * shortfall[..., None]).sum(axis=1)
    return points


def _knn_heads(knn: KnnGraph, rows: np.ndarray, k: int) -> np.ndarray:
    """The first k neighbours of each of `rows` with the row itself left out, (len(rows), k)
    int64, -1 padded where the graph is too shallow (robust to a row not listed first)."""
    lists = knn.indices[rows]
    keep = lists != rows[:, None]
    keep &= np.cumsum(keep, axis=1) <= k
    heads = np.full((len(rows), k), -1, np.int64)
    slot = np.cumsum(keep, axis=1) - 1
    line, column = np.nonzero(keep)
    heads[line, slot[line, column]] = lists[line, column]
    return heads


def _first_neighbours(knn: KnnGraph, sources: np.ndarray, drawn: np.ndarray, k: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(i, node) pairs: among the first k neighbours of sources[i] is drawn[node - 1]."""
    heads = _knn_heads(knn, sources, k)
    if len(drawn) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(drawn, kind="stable")
    position = np.minimum(np.searchsorted(drawn[order], heads), len(drawn) - 1)
    line, column = np.nonzero(drawn[order][position] == heads)
    return line, order[position[line, column]] + 1


def _check_features(query_feature: Any, gallery_features: Any) -> tuple[np.ndarray, np.ndarray]:
    """The query as (1, d) and the gallery as (G, d), both numeric and of one width."""
    query = np.asarray(query_feature)
    gallery = np.asarray(gallery_features)
    if query.ndim == 1:
        query = query[None, :]
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise InvalidInputError(f"gallery features must be a non-empty 2-D (G, d) array, got "
                                f"shape {gallery.shape}")
    if query.shape != (1, gallery.shape[1]):
        raise InvalidInputError(f"the query feature must have shape ({gallery.shape[1]},) like a "
                                f"gallery row, got {np.asarray(query_feature).shape}")
    if not (np.issubdtype(query.dtype, np.number) and np.issubdtype(gallery.dtype, np.number)):
        raise InvalidInputError("features must be numeric arrays")
    return query, gallery


def _check_rows(rows: Any, size: int, name: str) -> np.ndarray:
    """`rows` as a 1-D int64 array of gallery rows inside [0, size)."""
    array = np.asarray(rows)
    if array.size == 0:
        return np.zeros(0, np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"{name} must be a 1-D list of integer gallery rows, got "
                                f"{array.dtype} of shape {array.shape}")
    outside = array[(array < 0) | (array >= size)]
    if outside.size:
        raise InvalidInputError(f"{name} {outside[:10].tolist()} are outside the gallery of "
                                f"{size} images")
    return array.astype(np.int64)
