"""engine.features.images: bad inputs are refused with InvalidImageError, odd modes become RGB."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from engine.errors import InvalidImageError, InvalidInputError
from engine.features import images
from engine.features.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    list_image_files,
    load_image,
    make_thumbnail,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def assert_close(pixel, expected, tolerance: int = 12) -> None:
    assert len(pixel) == len(expected)
    assert all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True)), (
        pixel,
        expected,
    )


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR is patched to claim width x height (CRC fixed): no pixels allocated."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- limits and bad files ---------------------------------------------------------------------


def test_invalid_image_error_is_an_invalid_input_error():
    assert issubclass(InvalidImageError, InvalidInputError)
    assert issubclass(InvalidImageError, ValueError)


def test_truncated_images_are_not_loaded_silently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS is not None


def test_extensions():
    expected = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert set(IMAGE_EXTENSIONS) == expected


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"empty\.jpg.*empty \(0 bytes\)"):
        load_image(path)


def test_zero_bytes_and_empty_stream():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")
    with pytest.raises(InvalidImageError, match=r"upload\.png.*empty"):
        load_image(io.BytesIO(b""), name="upload.png")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(InvalidImageError, match=r"notes\.jpg.*not a recognised image"):
        load_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidImageError, match="not a regular file"):
        load_image(tmp_path)


def test_truncated_jpeg(tmp_path):
    data = encode(noise((128, 96)), "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(InvalidImageError, match=r"^\S*cut\.jpg: the image data is truncated"):
        load_image(path)


def test_truncated_png(tmp_path):
    data = encode(noise((128, 96)), "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match=r"cut\.png"):
        load_image(path)


def test_png_with_corrupt_header_crc(tmp_path):
    data = bytearray(encode(Image.new("RGB", (4, 4)), "PNG"))
    data[29] ^= 0xFF
    with pytest.raises(InvalidImageError, match=r"bad\.png"):
        load_image(bytes(data), name="bad.png")


@pytest.fixture
def no_png_decoding(monkeypatch):
    """Make any attempt to decode PNG pixels fail the test."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", refuse)


@pytest.mark.usefixtures("no_png_decoding")
def test_huge_png_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(20_000, 20_000))
    assert path.stat().st_size < 100
    with pytest.raises(InvalidImageError, match=r"bomb\.png.*too large"):
        load_image(path)


@pytest.mark.usefixtures("no_png_decoding")
def test_huge_png_refused_even_when_pils_own_limit_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(
        InvalidImageError, match=r"^bomb\.png: refused before decoding, 20000x20000"
    ):
        load_image(png_claiming_size(20_000, 20_000), name="bomb.png")


@pytest.mark.usefixtures("no_png_decoding")
def test_project_pixel_limit_is_below_pils_and_checked_explicitly(tmp_path):
    # 8500 x 8500 = 72.25 M pixels: above the project's limit, below PIL's own warning threshold.
    assert MAX_IMAGE_PIXELS < 8500 * 8500 < Image.MAX_IMAGE_PIXELS
    path = tmp_path / "large.png"
    path.write_bytes(png_claiming_size(8500, 8500))
    expected = r"^\S*large\.png: refused before decoding, 8500x8500 = 72,250,000 pixels"
    with pytest.raises(InvalidImageError, match=expected):
        load_image(path)


def test_pixel_limit_applies_to_arrays_and_pil_images(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InvalidImageError, match="11x10"):
        load_image(np.zeros((10, 11), np.uint8))
    with pytest.raises(InvalidImageError, match="11x10"):
        load_image(Image.new("RGB", (11, 10)))
    assert load_image(np.zeros((10, 10), np.uint8)).size == (10, 10)


def test_file_size_limit(tmp_path, monkeypatch):
    data = encode(noise(), "PNG")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", len(data) - 1)

    def refuse_open(*args, **kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(Image, "open", refuse_open)
    with pytest.raises(InvalidImageError, match=r"big\.png.*larger than the limit"):
        load_image(path)
    with pytest.raises(InvalidImageError, match="larger than the limit"):
        load_image(data)
    with pytest.raises(InvalidImageError, match="larger than the limit"):
        load_image(io.BytesIO(data))


def test_disallowed_format_is_refused():
    data = encode(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        load_image(data, name="x.ppm")


def test_unsupported_source_types():
    with pytest.raises(InvalidImageError, match="cannot read an image from int"):
        load_image(42)
    with pytest.raises(InvalidImageError, match="mode 'rb'"):
        load_image(io.StringIO("text"))


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros((4, 4, 3), np.float32), "dtype uint8"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "no pixels"),
    ],
)
def test_bad_arrays(array, reason):
    with pytest.raises(InvalidImageError, match=reason):
        load_image(array)


# --- modes and formats --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_allowed_format_loads_as_rgb(fmt):
    source = Image.new("RGB", (20, 10), RED)
    loaded = load_image(encode(source, fmt))
    assert loaded.mode == "RGB"
    assert loaded.size == (20, 10)
    assert_close(loaded.getpixel((10, 5)), RED)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(fmt):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    data = encode(cmyk, fmt)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    loaded = load_image(data)
    assert loaded.mode == "RGB"
    assert_close(loaded.getpixel((4, 4)), RED)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_is_scaled_not_clipped(fmt):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), fmt)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    loaded = np.asarray(load_image(data))
    assert loaded.shape == (1, 4, 3)
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 1])


def test_thirty_two_bit_modes():
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 255]
    small = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert np.asarray(load_image(small))[0, :, 0].tolist() == [0, 200]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_is_composited_on_white():
    pixels = np.array(
        [[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8
    )  # transparent red, opaque blue, half-transparent black
    for source in (Image.fromarray(pixels), encode(Image.fromarray(pixels), "PNG"), pixels):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        assert loaded.getpixel((0, 0)) == WHITE
        assert loaded.getpixel((1, 0)) == BLUE
        assert_close(loaded.getpixel((2, 0)), (127, 127, 127), tolerance=1)


def test_gray_with_alpha():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), mode="LA")
    loaded = load_image(encode(la, "PNG"))
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    palette_image.paste(1, (2, 0, 4, 2))  # right half: green, index 1
    data = encode(palette_image, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    loaded = load_image(data)
    assert loaded.getpixel((0, 0)) == WHITE  # transparent black
    assert loaded.getpixel((3, 1)) == (0, 255, 0)


def test_palette_without_transparency_gray_and_bilevel():
    palette_image = Image.new("RGB", (4, 4), BLUE).convert("P", palette=Image.Palette.ADAPTIVE)
    assert load_image(palette_image).getpixel((1, 1)) == BLUE
    gray = load_image(encode(Image.new("L", (3, 3), 77), "PNG"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    bilevel = Image.new("1", (3, 3), 1)
    bilevel.putpixel((0, 0), 0)
    loaded = load_image(encode(bilevel, "PNG"))
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((2, 2)) == WHITE


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (6, 6), color) for color in (RED, (0, 255, 0), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    opened = Image.open(io.BytesIO(data))
    assert opened.n_frames == 3
    opened.seek(2)  # a caller left the animation on its last frame
    for source in (data, opened):
        loaded = load_image(source)
        assert loaded.mode == "RGB"
        assert_close(loaded.getpixel((3, 3)), RED, tolerance=0)


def test_exif_orientation_six_is_made_upright(tmp_path):
    # Stored 40 wide x 20 high, red block at the stored top-left corner. Orientation 6 means
    # "rotate 90 degrees clockwise to display": upright it is 20 x 40 with red at the top right.
    stored = Image.new("RGB", (40, 20), WHITE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as stored_file:
        assert stored_file.size == (40, 20)

    loaded = load_image(path)
    assert loaded.size == (20, 40)
    assert_close(loaded.getpixel((16, 3)), RED, tolerance=30)  # top right
    assert_close(loaded.getpixel((3, 3)), WHITE, tolerance=30)  # top left
    assert_close(loaded.getpixel((16, 36)), WHITE, tolerance=30)  # bottom right


# --- sources ----------------------------------------------------------------------------------


def test_numpy_inputs():
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    loaded = load_image(rgb)
    assert loaded.mode == "RGB" and loaded.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(loaded), rgb)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(
        np.asarray(load_image(gray[:, :, None])), np.stack([gray] * 3, axis=-1)
    )
    # a non-contiguous view (every other column) works too
    np.testing.assert_array_equal(np.asarray(load_image(rgb[:, ::2])), rgb[:, ::2])


def test_bytes_file_like_and_path_inputs_agree(tmp_path):
    source = noise((9, 6))
    data = encode(source, "PNG")
    path = tmp_path / "same.png"
    path.write_bytes(data)
    expected = np.asarray(source)
    with open(path, "rb") as handle:
        from_handle = load_image(handle)
    for loaded in (
        load_image(data),
        load_image(bytearray(data)),
        load_image(memoryview(data)),
        load_image(io.BytesIO(data)),
        from_handle,
        load_image(path),
        load_image(str(path)),
    ):
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_error_names_file_like_source(tmp_path):
    path = tmp_path / "stream.jpg"
    path.write_text("plain text")
    with open(path, "rb") as handle, pytest.raises(InvalidImageError, match=r"stream\.jpg"):
        load_image(handle)
    with pytest.raises(InvalidImageError, match=r"^holiday\.jpg: "):
        load_image(b"plain text", name="holiday.jpg")


def test_result_is_a_new_loaded_image_and_the_input_is_untouched(tmp_path):
    source = Image.new("RGB", (4, 4), RED)
    loaded = load_image(source)
    assert loaded is not source
    loaded.putpixel((0, 0), BLUE)
    assert source.getpixel((0, 0)) == RED

    path = tmp_path / "gone.png"
    path.write_bytes(encode(source, "PNG"))
    loaded = load_image(path)
    path.unlink()  # the pixels are in memory, the file is closed
    assert loaded.getpixel((1, 1)) == RED


# --- thumbnails ---------------------------------------------------------------------------------


def test_make_thumbnail_keeps_aspect_ratio_and_never_enlarges():
    wide = Image.new("RGB", (1000, 500), RED)
    thumbnail = make_thumbnail(wide, max_side=256)
    assert thumbnail.size == (256, 128)
    assert wide.size == (1000, 500)
    assert make_thumbnail(Image.new("RGB", (300, 900)), max_side=90).size == (30, 90)
    assert make_thumbnail(Image.new("RGB", (100, 50)), max_side=256).size == (100, 50)
    assert make_thumbnail(Image.new("RGB", (2000, 2)), max_side=100).size == (100, 1)


@pytest.mark.parametrize("max_side", [0, -5, 2.5, True])
def test_make_thumbnail_rejects_bad_sizes(max_side):
    with pytest.raises(InvalidInputError, match="max_side"):
        make_thumbnail(Image.new("RGB", (10, 10)), max_side=max_side)


def test_make_thumbnail_rejects_non_images():
    with pytest.raises(InvalidInputError, match="PIL image"):
        make_thumbnail(np.zeros((4, 4, 3), np.uint8))


# --- listing ----------------------------------------------------------------------------------


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_list_image_files_order_extensions_and_hidden(tmp_path):
    root = tmp_path / "gallery"
    for relative in [
        "b.jpg",
        "a/B.PNG",
        "a/c.txt",
        "a/z.Jpeg",
        "a-b.webp",
        "Z.TIFF",
        "deep/er/x.gif",
        "noext",
        ".hidden.jpg",
        ".cache/x.jpg",
        "a/.thumbs/y.png",
        "image.jpg.txt",
    ]:
        touch(root / relative)
    (root / "folder.jpg").mkdir()

    found = list_image_files(root)
    relative = [path.relative_to(root).as_posix() for path in found]
    # plain string order of the posix paths ("-" sorts before "/", upper case before lower)
    assert relative == ["Z.TIFF", "a-b.webp", "a/B.PNG", "a/z.Jpeg", "b.jpg", "deep/er/x.gif"]
    assert relative == sorted(relative)
    assert found == [root / name for name in relative]


def test_list_image_files_works_from_a_hidden_parent(tmp_path):
    root = tmp_path / ".cache" / "gallery"
    touch(root / "a.png")
    assert list_image_files(root) == [root / "a.png"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_list_image_files_symlinks(tmp_path):
    root = tmp_path / "gallery"
    outside = tmp_path / "outside"
    touch(root / "real" / "inside.jpg")
    touch(outside / "secret.jpg")
    (root / "link_inside.jpg").symlink_to(root / "real" / "inside.jpg")
    (root / "link_relative.png").symlink_to(Path("real") / "inside.jpg")
    (root / "link_outside.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape.jpg").symlink_to(Path("..") / "outside" / "secret.jpg")
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)

    relative = [path.relative_to(root).as_posix() for path in list_image_files(root)]
    assert relative == ["link_inside.jpg", "link_relative.png", "real/inside.jpg"]


def test_list_image_files_needs_a_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="not a folder"):
        list_image_files(tmp_path / "missing")
    touch(tmp_path / "file.jpg")
    with pytest.raises(InvalidInputError, match="not a folder"):
        list_image_files(tmp_path / "file.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert list_image_files(empty) == []
