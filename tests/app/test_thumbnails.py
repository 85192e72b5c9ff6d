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


def test_hover_thumbnails_are_made_in_the_background_then_kept(tmp_path: Path) -> None:
    """The first call starts one thread making the missing ones (None until made); once it
    has made them all, the list is returned without looking at the disk."""
    import threading
    from types import SimpleNamespace

    from tests.galleries import make_gallery

    root = make_gallery(tmp_path / "gallery", per_class=2)
    files = sorted(path.name for path in root.iterdir() if path.suffix == ".jpg")
    gallery = SimpleNamespace(root=root, size=len(files), fingerprint="f",
                              path_of=lambda row: root / files[row])
    cache = ThumbnailCache(tmp_path / "thumbs")
    first = cache.hover_thumbnails(gallery)
    assert len(first) == len(files)
    for worker in [thread for thread in threading.enumerate()
                   if thread.name == "hover-thumbnails"]:  # gone already if it was quick
        worker.join(60)
    made = cache.hover_thumbnails(gallery)
    assert all(path is not None and path.is_file() for path in made)
    for path in made:
        path.unlink()  # now known to be made: the disk is no longer looked at
    assert cache.hover_thumbnails(gallery) == made
    assert not [thread for thread in threading.enumerate()
                if thread.name == "hover-thumbnails" and thread.is_alive()]
