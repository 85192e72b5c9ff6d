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
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, ImageOps

from engine import Gallery, atomic_write_bytes, load_image, make_thumbnail
from engine.errors import InvalidImageError

logger = logging.getLogger(__name__)

Mark = Literal["hit", "miss"] | None
FRAME_COLOURS = {"hit": (22, 163, 74), "miss": (220, 38, 38)}
FRAME_WIDTH = 6
RESULT_SIDE = 192
PREVIEW_SIDE = 448
HOVER_SIDE = 128
"""Side of the thumbnails the plots show on hover (one per gallery image)."""


class ThumbnailCache:
    """Thumbnails of image files under `root`, by source file, size, mark and side."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._hover: dict[tuple[Path, int, str], list[Path]] = {}
        self._hover_made: set[tuple[Path, int, str]] = set()
        """The galleries (keys of `_hover`) whose hover thumbnails are all made."""
        self._hover_ready: dict[tuple[Path, int, str], set[Path]] = {}
        """Per gallery being made: the hover thumbnails made so far (no disk look-up per call:
        a large gallery's map asks for 20,000 of them on every update)."""
        self._lock = threading.Lock()

    def path_for(self, source: Path, mark: Mark = None, side: int = RESULT_SIDE) -> Path:
        """Where the thumbnail of `source` is (or will be) kept; makes nothing."""
        digest = self._digest(Path(source).absolute())  # gallery paths are already resolved
        return self.root / digest[:2] / f"{digest}-{side}-{mark or 'plain'}.jpg"

    def get(self, source: Path, mark: Mark = None, side: int = RESULT_SIDE) -> Path:
        """The thumbnail of `source` (made now if missing); a placeholder if it cannot be read."""
        path = self.path_for(source, mark, side)
        if not path.is_file():
            atomic_write_bytes(path, self._render(Path(source).absolute(), mark, side))
        return path

    def hover_thumbnails(self, gallery: Gallery, rows: Sequence[int] | None = None
                         ) -> list[Path | None]:
        """The hover thumbnail of every gallery row (or of `rows`, the points a large
        gallery's map draws), in that order; None for one not made yet. The missing ones are
        made by one background thread per gallery, started on the first call; once it has made
        them all, a call returns the kept list without looking at the disk. A gallery is asked
        for the same rows every time (the map's fixed sample)."""
        key = (gallery.root, gallery.size, gallery.fingerprint)
        with self._lock:
            paths = self._hover.get(key)
            if paths is None:
                chosen = range(gallery.size) if rows is None else rows
                sources = [gallery.path_of(int(row)) for row in chosen]
                paths = [self.path_for(source, None, HOVER_SIDE) for source in sources]
                self._hover[key] = paths
                ready = {path for path in paths if path.is_file()}
                missing = [source for source, path in zip(sources, paths, strict=True)
                           if path not in ready]
                if missing:
                    self._hover_ready[key] = ready
                    threading.Thread(target=self._make_all, args=(key, missing, HOVER_SIDE),
                                     name="hover-thumbnails", daemon=True).start()
                else:
                    self._hover_made.add(key)
            if key in self._hover_made:
                return list(paths)
            ready = set(self._hover_ready.get(key, ()))
        return [path if path in ready else None for path in paths]

    def _make_all(self, key: tuple[Path, int, str], sources: list[Path], side: int) -> None:
        for source in sources:
            try:
                made = self.get(source, side=side)
            except OSError as error:  # a full disk or a vanished cache: the plot shows none
                logger.warning("hover thumbnails stopped: %s", error)
                return
            with self._lock:
                self._hover_ready[key].add(made)
        with self._lock:
            self._hover_made.add(key)
            self._hover_ready.pop(key, None)

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
        if source.parent.is_file():
            # an item of a gallery opened from a features file without images
            # (`Gallery.path_of`): a tile with its name
            image = _name_tile(source.name, side)
        else:
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


def _name_tile(name: str, side: int) -> Image.Image:
    """A grey tile with `name` written on it, wrapped to the tile's width."""
    image = Image.new("RGB", (side, side), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, side // 12))
    lines = textwrap.wrap(name, width=18, break_long_words=True)[:6]
    draw.multiline_text((side // 2, side // 2), "\n".join(lines), fill=(40, 40, 40), font=font,
                        anchor="mm", align="center")
    return image
