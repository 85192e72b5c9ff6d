"""Small inputs shared by SSP's tests: tiny generated pictures, random unit rows and anchors, a
fake gallery-model meta, and a config that trains in a handful of steps."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from engine.features.backbone import FeatureMeta

CPU = torch.device("cpu")
DIM = 1280
TINY = {"subspaces": 8, "centroids": 8, "views": 1, "epochs": 2, "warmup_epochs": 1,
        "batch_size": 8, "trainable_stages": 1}


def unit_anchors(m: int, k: int, sub: int, seed: int = 0) -> torch.Tensor:
    anchors = torch.randn(m, k, sub, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(anchors, dim=-1)


def tiny_images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    """Pictures with a per-image colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        base = rng.integers(0, 256, 3)
        pixels = np.tile(base, (size, size, 1)).astype(np.float64)
        pixels[:, (i % 7)::7] *= 0.3
        pixels += rng.normal(0, 20, pixels.shape)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def unit_rows(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fake_gallery_meta(backbone: str = "fake-gallery", dim: int = DIM) -> FeatureMeta:
    return FeatureMeta(backbone=backbone, weights="test", input_size=(3, 32, 32),
                       interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pooling="avg", dim=dim)
