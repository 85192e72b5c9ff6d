"""Thumbnails of the items of a gallery opened from a features file without images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from app.thumbnails import ThumbnailCache


def test_an_item_without_an_image_gets_a_tile_with_its_name(tmp_path: Path) -> None:
    features = tmp_path / "vectors.npy"
    np.save(features, np.eye(2, dtype=np.float32))
    cache = ThumbnailCache(tmp_path / "thumbs")
    tile = np.asarray(Image.open(cache.get(features / "item-0", side=128)).convert("RGB"))
    assert tile.shape == (128, 128, 3)
    assert (tile.max(axis=2) < 120).any()  # dark text on the grey tile
    assert (np.abs(tile[2, 2].astype(int) - 200) < 8).all()  # grey around it
    other = np.asarray(Image.open(cache.get(features / "item-1", side=128)).convert("RGB"))
    assert not np.array_equal(tile, other)  # each tile names its item
