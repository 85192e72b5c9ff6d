"""Nearest-neighbour search over gallery features with faiss (inner product = cosine).

One result convention everywhere: `(distances, indices)` of shape (n_queries, k), best first,
with distance = 1 - cosine similarity (smaller is closer).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from engine.errors import EmptyGalleryError, InvalidInputError
from engine.rerank.base import check_features
from engine.storage import atomic_path

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")


def _faiss():
    import faiss

    return faiss


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for the faiss-cpu build)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class SearchIndex:
    """A faiss index over L2-normalised gallery features.

    kind: "flat" (exact inner product, the default), "ivf" (IndexIVFFlat, `nlist` cells,
    `nprobe` probed) or "hnsw" (IndexHNSWFlat, `hnsw_m` links) for large galleries.
    device: "auto" moves the index to the GPUs faiss reports, "cpu" keeps it on the CPU.
    """

    def __init__(self, features: np.ndarray, kind: str = "flat", device: str = "auto",
                 nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32) -> None:
        if kind not in INDEX_KINDS:
            raise InvalidInputError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if features is None or len(features) == 0:
            raise EmptyGalleryError("cannot build an index over an empty gallery: add images")
        features = check_features(features, "gallery features")
        faiss = _faiss()
        dim = features.shape[1]
        self.kind, self.size, self.dim = kind, features.shape[0], dim
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(4096, int(4 * np.sqrt(self.size))))
            nlist = min(nlist, self.size)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
            index.train(features)
            index.nprobe = min(nprobe, nlist)
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(64, 2 * hnsw_m)
        index.add(features)
        self._cpu_index = index
        self._index = self._to_device(index, device)

    @staticmethod
    def _to_device(index, device: str):
        if device == "cpu" or faiss_gpu_count() == 0:
            if device not in ("auto", "cpu"):
                logger.info("faiss has no GPU support here; the index stays on the CPU")
            return index
        faiss = _faiss()
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError) as error:
            logger.warning("faiss GPU index failed (%s); using the CPU index", error)
            return index
        logger.info("faiss index on %d GPU(s)", faiss_gpu_count())
        return gpu_index

    @property
    def on_gpu(self) -> bool:
        return self._index is not self._cpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery items per query.

        Args:
            queries: (Q, d) float32 L2-normalised.
            k: 1 <= k <= gallery size.
        Returns:
            distances (Q, k) float32 = 1 - cosine, ascending; indices (Q, k) int64.
        """
        queries = check_features(queries, "query features", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        if k > self.size:
            raise InvalidInputError(
                f"k={k} is larger than the gallery ({self.size} items); use k <= {self.size}")
        similarities, indices = self._index.search(queries, int(k))
        if (indices < 0).any():  # approximate indexes can return fewer than k hits
            raise InvalidInputError(
                f"the {self.kind} index returned fewer than {k} neighbours; raise nprobe/efSearch "
                "or use kind='flat'")
        return (1.0 - similarities).astype(np.float32), indices.astype(np.int64)

    def save(self, path: str | os.PathLike) -> None:
        """Write the (CPU copy of the) index atomically."""
        faiss = _faiss()
        with atomic_path(path) as temporary:
            faiss.write_index(self._cpu_index, str(temporary))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> SearchIndex:
        faiss = _faiss()
        path = Path(path)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            from engine.errors import CacheError

            raise CacheError(f"index file {path} is unreadable ({error})") from error
        self = cls.__new__(cls)
        self.size, self.dim = int(index.ntotal), int(index.d)
        self.kind = ("ivf" if "IVF" in type(index).__name__
                     else "hnsw" if "HNSW" in type(index).__name__ else "flat")
        self._cpu_index = index
        self._index = cls._to_device(index, device)
        return self


def exact_knn(features: np.ndarray, k: int, queries: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of `queries` (default: `features` themselves).

    Returns (similarities (n, k) float32 descending, indices (n, k) int64). Uses a faiss flat
    index on the CPU (BLAS, multi-threaded); the torch path of the re-rankers covers CUDA.
    """
    faiss = _faiss()
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(np.ascontiguousarray(features, dtype=np.float32))
    similarities, indices = index.search(
        np.ascontiguousarray(features if queries is None else queries, dtype=np.float32), int(k))
    return similarities, indices.astype(np.int64)
