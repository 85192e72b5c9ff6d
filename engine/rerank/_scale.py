"""What ICFRR, SSR and SGRR share to work on large galleries: canonical similarities without a
float64 copy of the gallery, one new query's exact top items from a float32 pass, and the memory
a batch may take.

Canonical similarities (`engine.core.knn.canonical_similarity`: float64 products of the float32
rows, rounded to float32, capped at 1) decide every ranking. Converting a 100k x 1280 gallery to
float64 costs a gigabyte and most of a query's time, so:

- `canonical_block` computes the (Q, G) canonical similarities a batch needs from float32
  gallery rows converted a block at a time;
- `query_top` finds one query's best items from a float32 matrix-vector product over the
  gallery: the float32 values propose candidates, only those are recomputed canonically, and
  the float32 error bound (`FLOAT32_SLACK`) proves that no other item can reach the returned
  ones (else the candidates widen). The result equals sorting the whole gallery's canonical
  similarities, ties to the smaller index;
- `float32_scores` (`engine.core.knn`) is one query's float32 product with the gallery, kept
  for the next method that ranks the same query;
- `memory_budget` is the share of the memory available now that a batch may plan to use
  (`Reranker.batch_refusal`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from engine.core.knn import FLOAT32_SLACK, float32_scores, torch_canonical_similarity

CONVERT_BYTES = 1 << 20
"""Size of the float64 buffer gallery rows are converted into for one query (102 rows at
d = 1280): small enough to stay in the CPU's cache between the conversion and the product that
reads it. Blocks of 80 MiB went through main memory twice and took 2.5 times as long (237
against 92 CPU ms for one query against 100k x 1280)."""
GALLERY_BLOCK = 8192
"""Gallery rows converted at a time for several queries, and on a torch device (80 MiB at
d = 1280): there the product dominates, and larger blocks let it reuse the queries (8 to 512
queries: 10 to 30 % faster than cache-sized blocks)."""
CANDIDATE_MARGIN = 64
"""Candidates proposed beyond the depth asked for; each failed proof widens them four-fold."""
MEMORY_FRACTION = 0.5
"""Share of the memory available when a batch starts that it may plan to use: the rest is
left to the page, the gallery and other jobs."""


def memory_budget() -> int | None:
    """Bytes a batch may plan to use (`MEMORY_FRACTION` of the memory available now), or None
    where the system does not say."""
    try:
        available = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
    return int(available * MEMORY_FRACTION)


def device_memory_budget(device: torch.device) -> int | None:
    """Bytes a batch computing on `device` may plan to use: `memory_budget`, or on a CUDA
    device `MEMORY_FRACTION` of its free memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * MEMORY_FRACTION)
    return memory_budget()


def gib(size: float) -> str:
    """Bytes as GiB for a message."""
    return f"{size / 2**30:.1f} GiB"


def _block_rows(dim: int) -> int:
    """Gallery rows per conversion block (`CONVERT_BYTES`), at least 16."""
    return max(16, CONVERT_BYTES // (8 * max(int(dim), 1)))


def canonical_rows(gallery: np.ndarray, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(len(ids),) canonical similarities of one query (d,) to the gallery rows `ids`,
    gathered and converted to float64 a cache-sized block at a time."""
    query64 = np.asarray(query, np.float64)
    ids = np.asarray(ids, np.int64)
    out = np.empty(len(ids), np.float32)
    rows = _block_rows(gallery.shape[1])
    gathered = np.empty((rows, gallery.shape[1]), gallery.dtype)
    converted = np.empty((rows, gallery.shape[1]), np.float64)
    for start in range(0, len(ids), rows):
        part = ids[start:start + rows]
        source, target = gathered[:len(part)], converted[:len(part)]
        np.take(gallery, part, axis=0, out=source)
        np.copyto(target, source)
        out[start:start + len(part)] = np.minimum(target @ query64, 1.0)
    return out


def canonical_block(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, G) canonical similarities of queries (Q, d) to every gallery row, the gallery
    converted to float64 a block at a time into one buffer (equal to
    `canonical_similarity`)."""
    queries64 = np.asarray(queries, np.float64)
    out = np.empty((len(queries64), len(gallery)), np.float32)
    rows = _block_rows(gallery.shape[1]) if len(queries64) == 1 else GALLERY_BLOCK
    converted = np.empty((rows, gallery.shape[1]), np.float64)
    for start in range(0, len(gallery), rows):
        block = converted[:min(rows, len(gallery) - start)]
        np.copyto(block, gallery[start:start + len(block)])
        out[:, start:start + len(block)] = np.minimum(queries64 @ block.T, 1.0)
    return out


def torch_canonical_block(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Torch twin of `canonical_block`: (Q, G) float32 on the gallery's device."""
    out = torch.empty((queries.shape[0], gallery.shape[0]), dtype=torch.float32,
                      device=gallery.device)
    for start in range(0, gallery.shape[0], GALLERY_BLOCK):
        out[:, start:start + GALLERY_BLOCK] = torch_canonical_similarity(
            queries, gallery[start:start + GALLERY_BLOCK])
    return out


def query_top(gallery: np.ndarray, query: np.ndarray, depth: int, *,
              scores: np.ndarray | None = None,
              key: Callable[[np.ndarray], np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """The `depth` best gallery items for one query, exactly as sorting the canonical
    similarities of the whole gallery would give them.

    Args:
        gallery: (G, d) float32 unit rows; query: (d,) float32.
        depth: items wanted (at most G).
        scores: the query's `float32_scores`, when already computed (reused across calls).
        key: float32 sort key from canonical similarities, non-increasing in the similarity
            (e.g. Euclidean distance), smaller first; None sorts by similarity, larger first.
    Returns:
        (values, ids): (depth,) canonical similarities (key None) or keys, best first, ties to
        the smaller id, and their ids int64 (faiss's order).
    """
    size = len(gallery)
    depth = min(int(depth), size)
    if scores is None:
        scores = float32_scores(gallery, query)
    rank_key = (lambda similarity: -similarity) if key is None else key
    width = depth + CANDIDATE_MARGIN
    while True:
        if width >= size:
            ids, ceiling = np.arange(size), None
        else:
            kth = np.partition(scores, size - width)[size - width]
            ids = np.flatnonzero(scores >= kth)
            # any other item: float32 score < kth, so canonical <= kth + slack (rounded up)
            ceiling = np.float32(min(float(kth) + FLOAT32_SLACK, 1.0))
        values = rank_key(canonical_rows(gallery, ids, query))
        order = np.lexsort((ids, values))[:depth]
        if ceiling is None or values[order[-1]] < rank_key(np.array([ceiling]))[0]:
            chosen = values[order]
            return (-chosen if key is None else chosen), ids[order].astype(np.int64)
        width *= 4
