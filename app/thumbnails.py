"""Small JPEG copies of gallery images, the only image files the page serves.

The browser never gets a path inside a gallery folder: every result, pick and preview is a
thumbnail in the cache (one folder the server is allowed to serve), made on first use and
written atomically. A result's correct/incorrect mark is baked into its thumbnail as a coloured
frame, so it is visible at a glance in any gallery widget.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

from engine import atomic_write_bytes, load_image, make_thumbnail
from engine.errors import InvalidImageError

logger = logging.getLogger(__name__)

Mark = Literal["hit", "miss"] | None
FRAME_COLOURS = {"hit": (22, 163, 74), "miss": (220, 38, 38)}
FRAME_WIDTH = 6
RESULT_SIDE = 192
PREVIEW_SIDE = 448


class ThumbnailCache:
    """Thumbnails of image files under `root`, by source file, size, mark and side."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def get(self, source: Path, mark: Mark = None, side: int = RESULT_SIDE) -> Path:
        """The thumbnail of `source` (made now if missing); a placeholder if it cannot be read."""
        source = Path(source).absolute()  # gallery paths are already resolved
        digest = self._digest(source)
        path = self.root / digest[:2] / f"{digest}-{side}-{mark or 'plain'}.jpg"
        if not path.is_file():
            atomic_write_bytes(path, self._render(source, mark, side))
        return path

    def forget(self, source: Path) -> int:
        """Delete every thumbnail of `source` (all sides and marks); returns how many.

        Call it before the source itself is deleted: its size and time name its thumbnails.
        """
        digest = self._digest(Path(source).absolute())
        removed = 0
        for path in (self.root / digest[:2]).glob(f"{digest}-*.jpg"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    @staticmethod
    def _digest(source: Path) -> str:
        """Names the thumbnails of one version of a file (path, size, modification time)."""
        try:
            stat = source.stat()
            identity = f"{source}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            identity = f"{source}|missing"
        return hashlib.sha256(identity.encode()).hexdigest()[:24]

    @staticmethod
    def _render(source: Path, mark: Mark, side: int) -> bytes:
        try:
            image = make_thumbnail(load_image(source), side)
        except InvalidImageError as error:
            logger.warning("no thumbnail for %s (%s)", source, error)
            image = Image.new("RGB", (side, side), (200, 200, 200))
        if mark is not None:
            image = ImageOps.expand(image, border=FRAME_WIDTH, fill=FRAME_COLOURS[mark])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()
