"""Safe image decoding: the one way the engine turns files, uploads and arrays into RGB images.

Every image the project reads (gallery indexing, uploaded queries, the demo gallery script) goes
through `load_image`, so the same limits and the same colour handling apply everywhere:

* files larger than `MAX_FILE_BYTES` are refused before they are read, and images with more than
  `MAX_IMAGE_PIXELS` pixels are refused after the header is parsed, before any pixel is decoded;
* only the formats of `IMAGE_EXTENSIONS` are opened (no EPS/Ghostscript, no exotic plugins);
* the pixels are decoded eagerly, so a truncated or corrupt file fails here with an
  `InvalidImageError` naming the file, not later inside a model;
* the result is always an RGB image, upright (EXIF orientation applied), first frame only, with
  transparency composited on white and 16-bit data scaled down rather than clipped.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from engine.errors import InvalidImageError, InvalidInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""Lower-case file suffixes that `list_image_files` picks up."""

MAX_IMAGE_PIXELS: int = 64_000_000
"""Images with more pixels (width * height) than this are refused before decoding."""

MAX_FILE_BYTES: int = 50 * 1024 * 1024
"""Files (or byte strings, or streams) larger than this are refused before they are read."""

ImageSource = (
    str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | np.ndarray | Image.Image
)
"""Anything `load_image` accepts."""

# The PIL plugins that may open a file: the formats of IMAGE_EXTENSIONS and nothing else.
_ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

# What PIL raises on a file it cannot identify or decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# The pixel count in PIL's DecompressionBombError message ("Image size (N pixels) exceeds ...").
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def load_image(source: ImageSource, *, name: str | None = None) -> Image.Image:
    """Decode `source` into a fully loaded, upright RGB image.

    Args:
        source: a path (str or PathLike), the encoded bytes of a file, a binary file-like object,
            a numpy array of dtype uint8 and shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)
            (RGBA is composited on white), or a PIL image (its pixels are not modified and a new
            image is returned; an animation is rewound to its first frame).
        name: how error messages refer to the image (an upload's original file name, say).
            Defaults to the path, the stream's `name`, or a description of the source.

    Returns:
        A new PIL image of mode "RGB" with its pixels in memory: EXIF orientation applied, the
        first frame of an animation, CMYK/palette/gray/1-bit converted, alpha and palette
        transparency composited on white, 16-bit gray scaled to 8 bits.

    Raises:
        InvalidImageError: the source is empty, too large (`MAX_FILE_BYTES`, `MAX_IMAGE_PIXELS`),
            not an image of an allowed format, truncated or otherwise undecodable. The message
            names the file and the reason.
    """
    if isinstance(source, Image.Image):
        label = name or getattr(source, "filename", "") or "<PIL image>"
        return _normalise(source, label)
    if isinstance(source, np.ndarray):
        return _from_array(source, name or "<numpy array>")
    if isinstance(source, (str, os.PathLike)):
        return _from_path(Path(source), name or str(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(source), name or "<bytes>")
    if hasattr(source, "read"):
        label = name or str(getattr(source, "name", "") or "<file-like object>")
        try:
            data = source.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise InvalidImageError(f"{label}: cannot be read ({error})") from error
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidImageError(f"{label}: the stream is not binary; open it with mode 'rb'")
        return _from_bytes(bytes(data), label)
    raise InvalidImageError(
        f"{name or 'image'}: cannot read an image from {type(source).__name__}; pass a path, "
        "bytes, a binary file object, a uint8 numpy array or a PIL image"
    )


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under `folder`, recursively, sorted by their relative posix path.

    A file counts as an image by its suffix (`IMAGE_EXTENSIONS`, case-insensitive); contents are
    not checked here, `load_image` does that. Hidden files and folders (name starting with ".")
    are skipped. Symbolic links to files are kept only when their target lies inside `folder`;
    symbolic links to folders are never followed (a target inside `folder` is listed anyway
    through its real path, and following links could loop or escape the folder).

    Args:
        folder: the gallery folder.

    Returns:
        Paths of the form `Path(folder) / relative_path`, sorted by `relative_path.as_posix()`.

    Raises:
        InvalidInputError: `folder` does not exist or is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder; give the folder that holds the images")
    resolved_root = root.resolve()

    def log_walk_error(error: OSError) -> None:
        logger.warning("skipping %s: %s", error.filename, error.strerror or error)

    found: list[tuple[str, Path]] = []
    for directory, subdirectories, files in os.walk(root, onerror=log_walk_error):
        base = Path(directory)
        subdirectories[:] = [
            sub
            for sub in subdirectories
            if not sub.startswith(".") and not (base / sub).is_symlink()
        ]
        for file_name in files:
            if file_name.startswith(".") or Path(file_name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            path = base / file_name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(resolved_root) or not target.is_file():
                    logger.debug("skipping %s: link target %s is outside %s", path, target, root)
                    continue
            elif not path.is_file():
                continue
            relative = path.relative_to(root)
            found.append((relative.as_posix(), root / relative))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def make_thumbnail(image: Image.Image, max_side: int = 256) -> Image.Image:
    """A copy of `image` shrunk so that its longer side is at most `max_side` pixels.

    The aspect ratio is kept (each side at least 1 pixel); images already small enough are copied
    unchanged, never enlarged. The input is not modified.
    """
    if not isinstance(image, Image.Image):
        raise InvalidInputError(
            f"make_thumbnail needs a PIL image, got {type(image).__name__}; use load_image first"
        )
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise InvalidInputError(f"max_side must be a positive integer, got {max_side!r}")
    thumbnail = image.copy()
    thumbnail.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return thumbnail


def _from_path(path: Path, label: str) -> Image.Image:
    if not path.exists():
        raise InvalidImageError(f"{label}: no such file")
    if not path.is_file():
        raise InvalidImageError(f"{label}: not a regular file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise InvalidImageError(f"{label}: cannot be read ({error.strerror or error})") from error
    _check_byte_count(size, label)
    return _decode(path, label)


def _from_bytes(data: bytes, label: str) -> Image.Image:
    _check_byte_count(len(data), label)
    return _decode(io.BytesIO(data), label)


def _check_byte_count(size: int, label: str) -> None:
    if size == 0:
        raise InvalidImageError(f"{label}: the file is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise InvalidImageError(
            f"{label}: the file is larger than the limit of {MAX_FILE_BYTES:,} bytes; "
            "downscale or recompress it first"
        )


def _decode(fp: Path | IO[bytes], label: str) -> Image.Image:
    """Open with the allowed plugins only, check the size from the header, then decode."""
    Image.init()
    formats = [name for name in _ALLOWED_FORMATS if name in Image.OPEN]
    try:
        with Image.open(fp, formats=formats) as opened:
            return _normalise(opened, label)
    except InvalidImageError:  # already names the file and the reason (and is a ValueError)
        raise
    except Image.UnidentifiedImageError as error:
        raise InvalidImageError(
            f"{label}: not a recognised image (allowed formats: {', '.join(formats)})"
        ) from error
    except Image.DecompressionBombError as error:
        # PIL refuses at its own, higher threshold while parsing the header; say it with the
        # project's limit only, as _check_pixel_count does.
        found = _PIL_BOMB_PIXELS.search(str(error))
        size = f"{int(found.group(1)):,} pixels" if found else "the image's size"
        raise InvalidImageError(
            f"{label}: refused before decoding, the image is too large: {size} is more than "
            f"the limit of {MAX_IMAGE_PIXELS:,}; downscale it first"
        ) from error
    except _DECODE_ERRORS as error:
        raise InvalidImageError(f"{label}: cannot be opened as an image ({error})") from error


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise InvalidImageError(
            f"{label}: arrays must have dtype uint8 (0-255), got {array.dtype}; "
            "convert with (array * 255).round().astype(np.uint8) or similar"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidImageError(
            f"{label}: arrays must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {array.shape}"
        )
    height, width = array.shape[:2]
    _check_pixel_count(width, height, label)
    # fromarray infers "L", "RGB" or "RGBA" from the shape of a uint8 array.
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)), label)


def _normalise(image: Image.Image, label: str) -> Image.Image:
    """Size check, eager decode of the first frame, EXIF orientation, conversion to RGB."""
    width, height = image.size
    _check_pixel_count(width, height, label)
    if image.tell() != 0:  # (n_frames would scan every frame of a GIF)
        try:
            image.seek(0)
        except _DECODE_ERRORS as error:
            raise InvalidImageError(f"{label}: cannot read the first frame ({error})") from error
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise InvalidImageError(
            f"{label}: the image data is truncated or corrupt ({error})"
        ) from error
    try:
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        logger.warning(
            "%s: unreadable EXIF orientation (%s); using the image as stored", label, error
        )
        upright = image.copy()
    return _to_rgb(upright, label)


def _check_pixel_count(width: int, height: int, label: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{label}: the image has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(
            f"{label}: refused before decoding, {width}x{height} = {width * height:,} pixels is "
            f"more than the limit of {MAX_IMAGE_PIXELS:,}; downscale it first"
        )


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Convert any PIL mode to RGB; transparency goes on white, high bit depths are rescaled."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _high_bit_depth_to_gray(image)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if image.mode == "RGB":
            return image
        return image.convert("RGB")
    except ValueError as error:  # PIL has no conversion for this mode
        raise InvalidImageError(
            f"{label}: colour mode {image.mode!r} cannot be converted to RGB ({error})"
        ) from error


def _high_bit_depth_to_gray(image: Image.Image) -> Image.Image:
    """Scale 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") gray to 8-bit "L".

    PIL's own conversion clips at 255, which turns most 16-bit photographs white. Here 16-bit
    data keeps its top 8 bits; "I" data is taken as 8-bit when it fits in 0..255, as 16-bit when
    it fits in 0..65535 (16-bit PNGs decode to "I" in some PIL versions), and is stretched from
    its minimum to its maximum otherwise; "F" data in [0, 1] is scaled by 255.
    """
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = (values.astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray)
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif image.mode == "I" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
