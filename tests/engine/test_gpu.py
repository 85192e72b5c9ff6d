"""CUDA paths, checked against the CPU. Skipped (never passed) on machines without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.gallery import DEMO_GALLERY
from engine.rerank import create_reranker

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gnn_cuda_matches_cpu(split_features):
    queries, gallery = split_features
    on_cpu = create_reranker("gnn", device="cpu").fit(gallery).rerank(queries, 20)
    on_gpu = create_reranker("gnn", device="cuda").fit(gallery).rerank(queries, 20)
    np.testing.assert_allclose(on_gpu.distances, on_cpu.distances, atol=1e-4)
    assert on_gpu.details["device"].startswith("cuda")


def test_gnn_cuda_online_matches_batch(split_features):
    queries, gallery = split_features
    reranker = create_reranker("gnn", device="cuda").fit(gallery)
    online = reranker.rerank(queries[:3], 10, mode="online")
    batch = np.stack([reranker.rerank(q[None, :], 10).distances[0] for q in queries[:3]])
    np.testing.assert_allclose(online.distances, batch, atol=1e-5)


def test_extractor_cuda_matches_cpu():
    from engine.backbone import FeatureExtractor

    paths = [DEMO_GALLERY / "images" / f"image_{n:04d}.jpg" for n in range(1, 1360, 170)]
    cpu = FeatureExtractor(device="cpu").embed(paths)
    gpu = FeatureExtractor(device="cuda").embed(paths)  # bf16 autocast: close, not equal
    assert (np.sum(cpu * gpu, axis=1) > 0.99).all()
