"""SSP's anchors: product-quantiser codebooks of the gallery model's features, trained with faiss
(M subspaces x K centroids), each centroid sub-vector L2-normalised and then frozen."""

from __future__ import annotations

import math

import numpy as np

from engine.core.types import check_features
from engine.errors import InvalidInputError

PQ_ITERATIONS = 10          # faiss k-means per subspace, as the authors
PQ_RESTARTS = 2
PQ_MAX_POINTS_PER_CENTROID = 1000


def train_anchors(features: np.ndarray, subspaces: int, centroids: int = 256, seed: int = 0
                  ) -> np.ndarray:
    """Product-quantiser codebooks of gallery-model features, as anchors.

    Args:
        features: (n, d) float32 gallery-model features, n >= centroids, finite.
        subspaces: M, must divide d.
        centroids: K per subspace, a power of two.
    Returns:
        (M, K, d / M) float32, every sub-vector of unit L2 norm.
    """
    from engine.search.index import faiss_module

    array = check_features(features, "anchor training features", unit_norm=False)
    n, dim = array.shape
    if subspaces < 1 or dim % subspaces:
        raise InvalidInputError(f"the PQ's {subspaces} subspaces must divide the feature "
                                f"dimension {dim} (e.g. 16, 32 or 64 for 1280)")
    if centroids < 2 or centroids & (centroids - 1):
        raise InvalidInputError(f"centroids per subspace must be a power of two, got {centroids}")
    if n < centroids:
        raise InvalidInputError(f"training the PQ anchors needs at least {centroids} images (one "
                                f"per centroid), got {n}: add images or lower `centroids`")
    faiss = faiss_module()
    quantiser = faiss.ProductQuantizer(dim, subspaces, int(math.log2(centroids)))
    quantiser.cp.niter = PQ_ITERATIONS
    quantiser.cp.nredo = PQ_RESTARTS
    quantiser.cp.seed = int(seed)
    quantiser.cp.max_points_per_centroid = PQ_MAX_POINTS_PER_CENTROID
    quantiser.cp.min_points_per_centroid = 1  # few images per centroid is expected here
    quantiser.train(array)
    codebooks = faiss.vector_to_array(quantiser.centroids).reshape(
        subspaces, centroids, dim // subspaces)
    norms = np.linalg.norm(codebooks, axis=-1, keepdims=True)
    return (codebooks / np.maximum(norms, 1e-12)).astype(np.float32)
