"""Bad input on a gallery folder, an uploaded zip and an uploaded query (issue 7, section 3).

Each bad input gets a typed error with a message a user can act on, or is skipped with its
reason; the rest keeps working (the gallery opens, search runs) and nothing is lost (the cache of
a gallery already open keeps its bytes and mtimes). Odd but valid images (CMYK, 16-bit, alpha,
palette, animation, EXIF rotation) are checked by their pixels and by the features they embed to.

Every case records (input, where, outcome) as the `bad_input` user property; the summary hook
of tests/conftest.py prints them as one Markdown table at the end of the run.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from app.thumbnails import ThumbnailCache
from engine.errors import (
    EmptyGalleryError,
    InvalidImageError,
    InvalidInputError,
    UnsafePathError,
)
from engine.evaluation.tuning import PRESETS_FILE
from engine.explorer import BASELINE, Explorer, GallerySession
from engine.features import images
from engine.features.images import load_image
from engine.rerank import create_reranker
from engine.search.archive import MAX_EXTRACTED_BYTES, extract_zip
from tests.galleries import demo_file, make_gallery

METHOD = "k_reciprocal"
"""The one re-ranker the explorer here runs (fast to fit; the contract is the same for all)."""
RED = (255, 0, 0)
PHOTO = demo_file(2, 0)
"""The photo the colour-mode variants are made from (256 x 171)."""
DUPLICATE = demo_file(1, 5)
"""Copied twice into the mixed gallery, as dup_a.jpg and dup_b.jpg."""
UPLOAD = demo_file(0, 20)
"""A good query image that is in no gallery here."""

Record = Callable[[str, str, "str | BaseException"], None]


# -- the table ---------------------------------------------------------------------------------
def short(message: str) -> str:
    """The message on one line, with folders dropped from absolute paths (tmp paths say
    nothing) and long runs of one letter cut."""
    message = re.sub(r"(?<![\w.'\"])/(?:[^\s/'\"]+/)+", "", message)
    message = re.sub(r"(\w)\1{9,}", r"\1\1\1…", message)  # 'xxxxxxxx…' of a long name
    return " ".join(message.split())


@pytest.fixture
def record(record_property) -> Record:
    """Add a row (input, where, outcome) to the table printed at the end of the run."""

    def add(what: str, where: str, outcome: str | BaseException) -> None:
        if isinstance(outcome, BaseException):
            outcome = f"refused, {type(outcome).__name__}: {outcome}"
        record_property("bad_input", (what, where, short(outcome)))

    return add


# -- files -------------------------------------------------------------------------------------
def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, depth: int, colour: int, rows: Iterator[bytes]) -> bytes:
    """A PNG written by hand (for what PIL cannot save): `rows` are unfiltered scanlines."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def bomb_png(side: int = 20_000) -> bytes:
    """A real, valid side x side 1-bit PNG of zeros: 400 M pixels in about 50 KB."""
    return png(side, side, 1, 0, (bytes((side + 7) // 8) for _ in range(side)))


def bad_files() -> dict[str, tuple[str, bytes, str]]:
    """Input -> (file name, bytes, what the refusal says)."""
    jpeg = UPLOAD.read_bytes()
    return {
        "zero-byte file": ("empty.jpg", b"", r"empty\.jpg: the file is empty \(0 bytes\)"),
        "truncated JPEG": ("truncated.jpg", jpeg[: len(jpeg) // 3],
                           r"truncated\.jpg: the image data is truncated or corrupt"),
        "text file named .jpg": ("notes.jpg", b"shopping list: eggs, flour\n" * 20,
                                 r"notes\.jpg: not a recognised image"),
        "decompression bomb (20000x20000 PNG, 49 KB)": (
            "bomb.png", bomb_png(),
            r"bomb\.png: refused before decoding, the image is too large: 400,000,000 pixels "
            r"is more than the limit of 64,000,000"),
    }


def photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def exif_photo() -> tuple[bytes, np.ndarray, np.ndarray]:
    """The photo with a red square at its upright top left, stored turned a quarter to the
    left with EXIF orientation 6 ("turn right to display"). Returns the JPEG, the upright
    pixels (the stored JPEG decoded as is and turned by hand) and the stored pixels."""
    upright = photo().copy()
    upright[:40, :40] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90), "JPEG",
                  quality=95, exif=exif)
    with Image.open(io.BytesIO(data)) as stored:
        as_stored = np.asarray(stored.convert("RGB"))
    return data, np.asarray(Image.fromarray(as_stored).transpose(Image.Transpose.ROTATE_270)), \
        as_stored


def variants() -> dict[str, tuple[str, bytes, np.ndarray, int]]:
    """Input -> (file name, bytes, the RGB pixels it must load as, tolerance per channel)."""
    rgb = photo()
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    height, width = gray.shape
    rgba = np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])
    rgba[:30, :, 3] = 0  # a transparent band on top: white once composited
    on_white = rgb.copy()
    on_white[:30] = 255
    palette = Image.fromarray(rgb).quantize(colors=64)
    with_hole = palette.copy()
    with_hole.info["transparency"] = 0
    assert (np.asarray(palette) == 0).any()  # the transparent colour is used
    palette_rgb = np.asarray(palette.convert("RGB")).copy()
    palette_rgb[np.asarray(palette) == 0] = 255
    other = Image.fromarray(255 - rgb)
    exif, upright, _ = exif_photo()
    return {
        "CMYK TIFF": ("cmyk.tif", encode(Image.fromarray(rgb).convert("CMYK"), "TIFF"), rgb, 0),
        "CMYK JPEG": ("cmyk.jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG",
                                         quality=95), rgb, 8),
        "16-bit gray PNG": ("gray16.png", encode(Image.fromarray(gray.astype(np.uint16) * 257),
                                                 "PNG"), np.dstack([gray] * 3), 0),
        "16-bit RGB PNG": ("rgb16.png", png(width, height, 16, 2, (
            (row.astype(np.uint16) * 257).astype(">u2").tobytes() for row in rgb)), rgb, 0),
        "RGBA PNG (transparent band)": ("rgba.png", encode(Image.fromarray(rgba), "PNG"),
                                        on_white, 0),
        "palette PNG with a transparent colour": ("palette.png", encode(
            with_hole, "PNG", transparency=0), palette_rgb, 0),
        "animated GIF (3 frames)": ("animated.gif", encode(
            palette, "GIF", save_all=True, append_images=[other.quantize(colors=64), palette],
            duration=40, loop=0), np.asarray(palette.convert("RGB")), 0),
        "animated PNG (2 frames)": ("animated.png", encode(
            Image.fromarray(rgb), "PNG", save_all=True, append_images=[other]), rgb, 0),
        "EXIF-rotated JPEG (orientation 6)": ("exif.jpg", exif, upright, 0),
    }


@pytest.fixture(scope="module")
def bad() -> dict[str, tuple[str, bytes, str]]:
    return bad_files()


@pytest.fixture(scope="module")
def odd() -> dict[str, tuple[str, bytes, np.ndarray, int]]:
    return variants()


@pytest.fixture(scope="module", autouse=True)
def no_bomb_decoding() -> Iterator[None]:
    """Fail any test in which PIL starts decoding the pixels of an image over the limit."""
    original = ImageFile.ImageFile.load

    def guarded(self):
        width, height = self.size
        if width * height > images.MAX_IMAGE_PIXELS:
            raise AssertionError(f"the pixels of a {width}x{height} image were decoded")
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", guarded)
        yield


# -- galleries ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The explorer's only allowed folder: the galleries live here, the cache beside it."""
    return tmp_path_factory.mktemp("bad_input") / "allowed"


@pytest.fixture(scope="module")
def explorer(extractor, root: Path) -> Explorer:
    return Explorer(extractor, device="cpu", cache_root=root.parent / "cache",
                    allowed_roots=[root], methods=[METHOD])


@pytest.fixture(scope="module")
def good(explorer: Explorer, root: Path) -> GallerySession:
    """A clean labelled gallery (3 classes x 3), opened before any bad input."""
    return explorer.open_folder(make_gallery(root / "good", per_class=3))


GOOD_FILES = [demo_file(label, offset) for label in (0, 1) for offset in range(3)]


@pytest.fixture(scope="module")
def mixed(explorer: Explorer, root: Path, bad, odd) -> GallerySession:
    """Six good photos, one photo twice, every odd-mode variant and every bad file."""
    folder = root / "mixed"
    folder.mkdir(parents=True)
    for source in GOOD_FILES:
        shutil.copy(source, folder / source.name)
    shutil.copy(DUPLICATE, folder / "dup_a.jpg")
    shutil.copy(DUPLICATE, folder / "dup_b.jpg")
    for name, data, *_ in [*bad.values(), *odd.values()]:
        (folder / name).write_bytes(data)
    return explorer.open_folder(folder)


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `folder`."""
    return {path.relative_to(folder).as_posix(): (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                  path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def nothing_lost(explorer: Explorer, good: GallerySession
                 ) -> Callable[..., AbstractContextManager[None]]:
    """Check around a bad input that the galleries open before are still open and searchable,
    that opening the good gallery again reuses it, and that its cache files keep their bytes
    and mtimes; with `refused`, that no gallery was added and no upload folder was written."""

    @contextmanager
    def check(refused: bool = True) -> Iterator[None]:
        cache = snapshot(good.gallery.cache_dir)
        sessions = dict(explorer.galleries)
        explorer.upload_root.mkdir(parents=True, exist_ok=True)
        uploads = sorted(explorer.upload_root.iterdir())
        yield
        assert not list(explorer.upload_root.glob(".extracting-*"))  # no half-written zip
        if refused:
            assert explorer.galleries == sessions
            assert sorted(explorer.upload_root.iterdir()) == uploads
        assert explorer.open_folder(good.gallery.root) is good
        assert snapshot(good.gallery.cache_dir) == cache
        result = explorer.query(good.key, source_file=good.gallery.files[0])
        assert list(result.rankings) == [BASELINE, METHOD]
        assert all(len(r.indices) == good.gallery.size - 1 for r in result.rankings.values())

    return check


def zip_of(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        for name, data in entries:
            handle.writestr(name, data)
    return path


def feature_of(extractor, pixels: np.ndarray) -> np.ndarray:
    return extractor.embed([Image.fromarray(pixels)])[0]


# -- bad files: skipped in a folder and a zip, refused as a query --------------------------------
def test_a_folder_with_bad_files_opens_skips_them_with_reasons_and_searches(
        mixed: GallerySession, bad, odd, record: Record) -> None:
    gallery = mixed.gallery
    expected = sorted([source.name for source in GOOD_FILES] + ["dup_a.jpg", "dup_b.jpg"]
                      + [name for name, *_ in odd.values()])
    assert gallery.files == expected
    assert sorted(gallery.skipped) == sorted(name for name, *_ in bad.values())
    for what, (name, _, reason) in bad.items():
        message = gallery.skipped[name]
        assert re.search(reason, short(message)), message
        record(what, "gallery folder", f"skipped: {message}")
    record(f"folder with the {len(bad)} bad files among {gallery.size} good images",
           "gallery folder",
           f"opened: {gallery.size} images, {len(gallery.skipped)} skipped with their reasons")


def test_search_works_in_the_folder_with_bad_files(explorer: Explorer, mixed: GallerySession,
                                                   record: Record) -> None:
    result = explorer.query(mixed.key, UPLOAD)
    assert list(result.rankings) == [BASELINE, METHOD]
    for ranking in result.rankings.values():
        assert len(ranking.indices) == mixed.gallery.size
        assert len(set(ranking.indices.tolist())) == mixed.gallery.size
        assert np.isfinite(ranking.distances).all()
    pick = explorer.query(mixed.key, source_file=GOOD_FILES[0].name)
    assert all(len(r.indices) == mixed.gallery.size - 1 for r in pick.rankings.values())
    record("upload and pick on the folder with bad files", "query",
           f"ranked by {', '.join(result.rankings)} over all {mixed.gallery.size} images")


@pytest.mark.parametrize("what", list(bad_files()), ids=lambda what: what.split(" (")[0])
def test_a_bad_upload_is_refused_and_the_gallery_is_untouched(
        explorer: Explorer, good: GallerySession, bad, nothing_lost, tmp_path: Path,
        what: str, record: Record) -> None:
    name, data, reason = bad[what]
    path = tmp_path / name
    path.write_bytes(data)
    with nothing_lost():
        with pytest.raises(InvalidImageError, match=reason) as refused:
            explorer.query(good.key, path)
        # as the page does: the upload decoded first under its own name
        with pytest.raises(InvalidImageError, match=reason):
            load_image(path, name=name)
    record(what, "uploaded query", refused.value)


def test_a_zip_with_bad_files_opens_skips_them_and_searches(
        explorer: Explorer, bad, nothing_lost, tmp_path: Path, record: Record) -> None:
    good_images = [demo_file(label, 10 + offset) for label in (0, 1) for offset in range(2)]
    archive = zip_of(tmp_path / "holiday.zip",
                     [(f"holiday/{path.name}", path.read_bytes()) for path in good_images]
                     + [(f"holiday/{name}", data) for name, data, _ in bad.values()])
    with nothing_lost(refused=False):
        opened = explorer.open_zip(archive)
    assert opened.gallery.root.is_relative_to(explorer.upload_root.resolve())
    assert opened.gallery.files == sorted(path.name for path in good_images)
    assert sorted(opened.gallery.skipped) == sorted(name for name, *_ in bad.values())
    for what, (name, _, reason) in bad.items():
        assert re.search(reason, short(opened.gallery.skipped[name]))
        record(what, "uploaded zip", f"skipped: {opened.gallery.skipped[name]}")
    result = explorer.query(opened.key, source_file=opened.gallery.files[0])
    assert all(len(r.indices) == len(good_images) - 1 for r in result.rankings.values())
    assert explorer.open_zip(archive) is opened  # the same upload again: reused
    record("zip with the 4 bad files among 4 good images", "uploaded zip",
           f"opened: {opened.gallery.size} images, {len(opened.gallery.skipped)} skipped; "
           "uploading it again reuses it")


def test_the_bomb_is_refused_from_its_header_alone(bad, record: Record) -> None:
    name, data, reason = bad["decompression bomb (20000x20000 PNG, 49 KB)"]
    assert len(data) < 60_000
    # PIL's own threshold is not what protects: the project's limit refuses it even when
    # PIL's is switched off (and the module's guard fails any pixel decode of it).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(io.BytesIO(data)) as header_only:  # a real, valid PNG of that size
            assert header_only.size == (20_000, 20_000)
            assert header_only.mode == "1"
        with pytest.raises(InvalidImageError, match=r"bomb\.png: refused before decoding, "
                                                    r"20000x20000 = 400,000,000 pixels"):
            load_image(data, name=name)
    with pytest.raises(InvalidImageError, match=reason) as refused:
        load_image(data, name=name)
    record("decompression bomb with PIL's own limit off", "engine (load_image)",
           "refused, InvalidImageError: bomb.png: refused before decoding, 20000x20000 = "
           "400,000,000 pixels is more than the limit of 64,000,000")
    assert "178956970" not in str(refused.value)  # one limit in the message, the project's


# -- odd but valid images: RGB, first frame, upright -------------------------------------------
@pytest.mark.parametrize("what", list(variants()))
def test_odd_images_load_as_the_right_rgb_pixels_in_folder_and_query(
        explorer: Explorer, mixed: GallerySession, extractor, odd, tmp_path: Path, what: str,
        record: Record) -> None:
    name, data, expected, tolerance = odd[what]
    loaded = np.asarray(load_image(data, name=name))
    assert loaded.shape == expected.shape
    difference = np.abs(loaded.astype(int) - expected.astype(int))
    assert difference.max() <= tolerance, (what, difference.max())
    assert name in mixed.gallery.files and name not in mixed.gallery.skipped
    row = mixed.gallery.features[mixed.position_of(name)]
    path = tmp_path / name
    path.write_bytes(data)
    query = explorer.query(mixed.key, path).feature
    if tolerance == 0:  # the same pixels: the same features
        reference = feature_of(extractor, expected)
        np.testing.assert_allclose(row, reference, atol=1e-5)
        np.testing.assert_allclose(query, reference, atol=1e-5)
    else:  # lossy: nearly the same
        reference = feature_of(extractor, loaded)
        np.testing.assert_allclose(query, reference, atol=1e-5)
        assert float(row @ feature_of(extractor, expected)) > 0.99
    exact = "equal to" if tolerance == 0 else f"within {tolerance} of"
    record(what, "gallery folder, uploaded query",
           f"RGB {loaded.shape[1]}x{loaded.shape[0]}, pixels {exact} the expected ones; "
           "embedded like them")


def test_an_exif_rotated_photo_is_shown_and_embedded_upright(
        mixed: GallerySession, extractor, odd, tmp_path: Path, record: Record) -> None:
    _, upright, stored = exif_photo()
    assert stored.shape[:2] == upright.shape[1::-1]  # stored on its side
    thumbnail = ThumbnailCache(tmp_path / "thumbs").get(mixed.gallery.root / "exif.jpg",
                                                        side=128)
    shown = np.asarray(Image.open(thumbnail).convert("RGB")).astype(int)
    height, width = shown.shape[:2]
    assert height < width == 128  # upright: landscape like the photo (stored as portrait)
    red = np.array(RED)
    assert np.abs(shown[5, 5] - red).max() < 60  # the red square at the top left
    for corner in (shown[5, width - 6], shown[height - 6, 5], shown[height - 6, width - 6]):
        assert np.abs(corner - red).max() > 60
    row = mixed.gallery.features[mixed.position_of("exif.jpg")]
    np.testing.assert_allclose(row, feature_of(extractor, upright), atol=1e-5)
    assert float(row @ feature_of(extractor, stored)) < 0.999  # not embedded as stored
    record("EXIF-rotated JPEG (orientation 6)", "thumbnail, gallery folder",
           f"thumbnail {width}x{height} with the red corner top left; embedded as the upright "
           "pixels, not as stored")


# -- zips --------------------------------------------------------------------------------------
def symlink_entry() -> zipfile.ZipInfo:
    link = zipfile.ZipInfo("gallery/link.jpg")
    link.create_system = 3  # Unix
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return link


def zip_bomb(path: Path, entries: int = 3, each: int = 768 << 20) -> Path:
    """A real zip of `entries` PNG-named members of `each` zero bytes (honest headers: 2.25
    GiB in all, about 2.4 MB on disk), written by hand from one deflated MiB repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    block = compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == compressor.compress(mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    deflated = block * (each >> 20) + compressor.flush()
    crc = 0
    for _ in range(each >> 20):
        crc = zlib.crc32(mib, crc)
    local, central = bytearray(), bytearray()
    for number in range(entries):
        name = f"bomb/{number}.png".encode()
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 33, crc, len(deflated),
                             each, len(name), 0) + name + deflated
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 33, crc,
                               len(deflated), each, len(name), 0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, len(central),
                      len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def truncated_zip(path: Path) -> Path:
    whole = zip_of(path.with_name("whole.zip"), [("gallery/a.jpg", PHOTO.read_bytes()),
                                                 ("gallery/b.jpg", UPLOAD.read_bytes())])
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def with_fine_image(path: Path, entry: str | zipfile.ZipInfo, data: bytes) -> Path:
    """A zip of one good image and `entry`."""
    return zip_of(path, [("gallery/fine.jpg", PHOTO.read_bytes()), (entry, data)])


NOTHING = "nothing was extracted"
REFUSED_ZIPS: dict[str, tuple[Callable[[Path], Path], type[Exception], str]] = {
    "zip entry with ../": (
        lambda d: with_fine_image(d / "dotdot.zip", "../evil.jpg", PHOTO.read_bytes()),
        UnsafePathError, rf"'\.\./evil\.jpg' points outside .*{NOTHING}"),
    "zip entry with an absolute path": (
        lambda d: with_fine_image(d / "absolute.zip", "/tmp/evil.jpg", PHOTO.read_bytes()),
        UnsafePathError, rf"absolute path; {NOTHING}"),
    "zip entry that is a symlink": (
        lambda d: with_fine_image(d / "link.zip", symlink_entry(), b"/etc/passwd"),
        UnsafePathError, rf"symbolic link; {NOTHING}"),
    "zip bomb (2.25 GiB of zeros in 2.4 MB)": (
        lambda d: zip_bomb(d / "bomb.zip"), InvalidInputError,
        r"bomb\.zip expands to 2\.2 GiB; the limit is 2\.0 GiB"),
    "zip with a name too long for the file system": (
        lambda d: with_fine_image(d / "long.zip", "gallery/" + "x" * 300 + ".jpg",
                                  PHOTO.read_bytes()),
        InvalidInputError, rf"cannot be written \(File name too long\); {NOTHING}"),
    "zero-byte .zip": (lambda d: written(d / "empty.zip", b""), InvalidInputError,
                       r"empty\.zip is not a readable zip"),
    "text file named .zip": (lambda d: written(d / "notes.zip", b"not a zip\n" * 10),
                             InvalidInputError, r"notes\.zip is not a readable zip"),
    "truncated .zip": (lambda d: truncated_zip(d / "cut.zip"), InvalidInputError,
                       r"cut\.zip is not a readable zip"),
    "zip without images": (lambda d: zip_of(d / "docs.zip", [("readme.md", b"# hi")]),
                           EmptyGalleryError, r"docs\.zip holds no image files"),
}
"""Input -> (how to write the zip into a folder, the error, what it says)."""


@pytest.mark.parametrize("what", REFUSED_ZIPS)
def test_a_bad_zip_is_refused_leaves_nothing_and_keeps_the_gallery(
        explorer: Explorer, nothing_lost, tmp_path: Path, what: str, record: Record) -> None:
    build, error, reason = REFUSED_ZIPS[what]
    archive = build(tmp_path)
    outside = sorted(explorer.upload_root.parent.parent.iterdir())
    with nothing_lost(), pytest.raises(error, match=reason) as refused:
        explorer.open_zip(archive)
    assert sorted(explorer.upload_root.parent.parent.iterdir()) == outside
    assert not (explorer.upload_root.parent / "evil.jpg").exists()
    record(what, "uploaded zip", refused.value)


def test_a_zip_of_only_bad_images_is_an_empty_gallery(
        explorer: Explorer, bad, nothing_lost, tmp_path: Path, record: Record) -> None:
    archive = zip_of(tmp_path / "broken.zip",
                     [(f"broken/{name}", data) for name, data, _ in bad.values()])
    sessions = dict(explorer.galleries)
    with nothing_lost(refused=False), pytest.raises(
            EmptyGalleryError, match=r"broken has no decodable images \(4 skipped\)") as refused:
        explorer.open_zip(archive)
    assert explorer.galleries == sessions
    record("zip of only bad images", "uploaded zip", refused.value)


def test_the_zip_bomb_is_real_and_refused_before_a_byte_is_inflated(
        tmp_path: Path, monkeypatch) -> None:
    archive = zip_bomb(tmp_path / "bomb.zip")
    assert archive.stat().st_size < 3_000_000
    with zipfile.ZipFile(archive) as check:
        assert sum(info.file_size for info in check.infolist()) > MAX_EXTRACTED_BYTES
        with check.open("bomb/0.png") as member:
            assert member.read(1 << 20) == bytes(1 << 20)
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *args, **kwargs: pytest.fail(
        "a member was opened"))
    with pytest.raises(InvalidInputError, match="expands to"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_zip_whose_headers_understate_its_size_is_refused(tmp_path: Path,
                                                           record: Record) -> None:
    payload = bytes(8 << 20)  # 8 MiB of zeros, declared as 1 KiB
    data = bytearray(zip_of(tmp_path / "honest.zip", [("a.png", payload)]).read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 1024)
    struct.pack_into("<I", data, central + 24, 1024)
    forged = tmp_path / "forged.zip"
    forged.write_bytes(bytes(data))
    with pytest.raises(InvalidInputError, match="damaged or truncated") as refused:
        extract_zip(forged, tmp_path / "out", max_extracted_bytes=1 << 20)
    assert not list((tmp_path / "out").iterdir())
    record("zip bomb whose headers claim 1 KiB for 8 MiB", "engine (extract_zip)",
           refused.value)


@pytest.mark.parametrize("forged_count", [False, True], ids=["honest count", "forged count"])
def test_too_many_zip_entries_are_refused_before_zipfile_reads_them(
        tmp_path: Path, monkeypatch, forged_count: bool, record: Record) -> None:
    data = bytearray(zip_of(tmp_path / "many.zip",
                            [(f"{i}.jpg", b"x") for i in range(12)]).read_bytes())
    if forged_count:  # the end record claims 3 entries; the directory holds 12
        end = data.rfind(b"PK\x05\x06")
        struct.pack_into("<HH", data, end + 8, 3, 3)
    archive = tmp_path / "many_forged.zip" if forged_count else tmp_path / "many.zip"
    archive.write_bytes(bytes(data))
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: pytest.fail(
        "zipfile parsed the central directory"))
    expected = ("more than 10 entries \\(its end record claims 3\\)" if forged_count
                else "12 entries")
    with pytest.raises(InvalidInputError, match=f"has {expected}; the limit is 10") as refused:
        extract_zip(archive, tmp_path / "out", max_entries=10)
    record(f"zip of 12 entries, limit 10 ({'forged' if forged_count else 'honest'} count)",
           "engine (extract_zip)", refused.value)


def test_duplicates_in_a_zip(explorer: Explorer, nothing_lost, tmp_path: Path,
                             record: Record) -> None:
    same = DUPLICATE.read_bytes()
    with pytest.warns(UserWarning, match="Duplicate name"):  # zipfile's, while writing it
        archive = zip_of(tmp_path / "twice.zip", [
            ("twice/a.jpg", same), ("twice/b.jpg", same), ("twice/c.jpg", PHOTO.read_bytes()),
            ("twice/c.jpg", UPLOAD.read_bytes())])
    with nothing_lost(refused=False):
        opened = explorer.open_zip(archive)
    assert opened.gallery.files == ["a.jpg", "b.jpg", "c.jpg"]
    extracted = extract_zip(archive, explorer.upload_root)
    assert extracted.reused
    assert extracted.skipped == {"twice/c.jpg": "duplicate of an earlier entry with the same "
                                                "name"}
    assert (opened.gallery.root / "c.jpg").read_bytes() == PHOTO.read_bytes()  # the first
    record("same bytes under two names in a zip", "uploaded zip", "both extracted and listed")
    record("two entries with the same name in a zip", "uploaded zip",
           "the first extracted, the second skipped: duplicate of an earlier entry with the "
           "same name")


# -- folders -----------------------------------------------------------------------------------
def refused_folders(root: Path, tmp_path: Path, bad: dict[str, tuple[str, bytes, str]]
                    ) -> dict[str, tuple[Path, type[Exception], str]]:
    """Input -> (the folder, the error, what it says)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(PHOTO, outside / PHOTO.name)
    link = root / "link_out"
    if not link.is_symlink():
        link.symlink_to(outside, target_is_directory=True)
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    only_bad = root / "only_bad"
    only_bad.mkdir(exist_ok=True)
    for name, data, _ in bad.values():
        (only_bad / name).write_bytes(data)
    (root / "a_file.jpg").write_bytes(PHOTO.read_bytes())
    return {
        "folder outside the allowed roots": (outside, UnsafePathError,
                                             r"outside \(resolved to .*outside\) is outside "
                                             r"the allowed folders"),
        "link inside the root to a folder outside": (link, UnsafePathError,
                                                     r"link_out \(resolved to .*outside\) is "
                                                     r"outside the allowed folders"),
        "../ out of the root": (root / "good" / ".." / "..", UnsafePathError,
                                r"outside the allowed folders"),
        "a file, not a folder": (root / "a_file.jpg", InvalidInputError, r"is not a folder"),
        "missing folder": (root / "missing", InvalidInputError, r"does not exist"),
        "empty folder (an empty gallery)": (empty, EmptyGalleryError,
                                            r"empty has no decodable images \(0 skipped\)"),
        "folder of only bad files": (only_bad, EmptyGalleryError,
                                     r"only_bad has no decodable images \(4 skipped\)"),
    }


REFUSED_FOLDERS = ["folder outside the allowed roots", "link inside the root to a folder outside",
                   "../ out of the root", "a file, not a folder", "missing folder",
                   "empty folder (an empty gallery)", "folder of only bad files"]


@pytest.mark.parametrize("what", REFUSED_FOLDERS)
def test_a_bad_folder_is_refused_and_the_gallery_is_untouched(
        explorer: Explorer, root: Path, bad, nothing_lost, tmp_path: Path, what: str,
        record: Record) -> None:
    folder, error, reason = refused_folders(root, tmp_path, bad)[what]
    with nothing_lost(), pytest.raises(error, match=reason) as refused:
        explorer.open_folder(folder)
    record(what, "gallery folder", refused.value)


def test_duplicate_files_in_a_folder_are_both_listed_and_find_each_other(
        explorer: Explorer, mixed: GallerySession, record: Record) -> None:
    gallery = mixed.gallery
    a, b = mixed.position_of("dup_a.jpg"), mixed.position_of("dup_b.jpg")
    np.testing.assert_array_equal(gallery.features[a], gallery.features[b])
    pick = explorer.query(mixed.key, source_file="dup_a.jpg")
    for ranking in pick.rankings.values():
        assert ranking.indices[0] == b and ranking.distances[0] < 1e-5
        assert a not in ranking.indices  # left out
    upload = explorer.query(mixed.key, DUPLICATE)
    for ranking in upload.rankings.values():
        assert sorted(ranking.indices[:2].tolist()) == sorted([a, b])
        assert ranking.distances[1] < 1e-5
    record("the same bytes twice in a folder", "gallery folder",
           "both listed (not deduplicated); a pick of one finds the other first at distance 0, "
           "an upload of them finds both first")


# -- sizes, k and parameters --------------------------------------------------------------------
def test_a_one_image_gallery_opens_without_re_rankers_and_answers_uploads(
        explorer: Explorer, root: Path, nothing_lost, record: Record) -> None:
    folder = root / "single"
    folder.mkdir()
    shutil.copy(PHOTO, folder / PHOTO.name)
    with nothing_lost(refused=False):
        single = explorer.open_folder(folder)
    assert single.gallery.size == 1
    assert "needs a gallery of at least 2 items, got 1" in single.unavailable[METHOD]
    assert [name for name, _ in single.methods()] == [BASELINE]
    result = explorer.query(single.key, UPLOAD)
    assert result.rankings[BASELINE].indices.tolist() == [0]
    with pytest.raises(InvalidInputError, match="the gallery has no other image") as refused:
        explorer.query(single.key, source_file=PHOTO.name)
    record("gallery of one image", "gallery folder",
           f"opened; {METHOD} unavailable ({single.unavailable[METHOD]}); an upload is ranked "
           "by the baseline")
    record("gallery of one image, its image picked (left out)", "query", refused.value)


def test_k_larger_than_the_gallery(explorer: Explorer, good: GallerySession,
                                   record: Record) -> None:
    size = good.gallery.size
    result = explorer.query(good.key, UPLOAD, top_n=10_000)
    assert result.top_n == size
    assert all(len(ranking.indices) == size for ranking in result.rankings.values())
    record("top_n=10000 on a gallery of 9", "query", f"capped: the {size} images, once each")
    with pytest.raises(InvalidInputError, match=f"k={size + 1} is larger than the gallery "
                                                f"\\({size} items\\)") as refused:
        good.gallery.search(good.gallery.features[:1], size + 1)
    record(f"k={size + 1} on a gallery of {size}", "engine (Gallery.search)", refused.value)
    with pytest.raises(InvalidInputError, match=f"k={size + 1} is larger than the {size} "
                                                "gallery items") as refused:
        good.reranker(METHOD).rerank(good.gallery.features[:1], size + 1, mode="online")
    record(f"k={size + 1} on a gallery of {size}", "engine (Reranker.rerank)", refused.value)
    widest = create_reranker(METHOD, device="cpu", k1=500, k2=100).fit(good.gallery.context())
    ranked = widest.rerank(good.gallery.features[:1], size, mode="online")
    assert sorted(ranked.indices[0].tolist()) == list(range(size))
    record(f"k1=500, k2=100 (their maxima) on a gallery of {size}", "engine (create_reranker)",
           "accepted; ranks the whole gallery")


def test_a_parameter_out_of_range_is_a_typed_error_and_the_page_keeps_working(
        explorer: Explorer, good: GallerySession, nothing_lost, record: Record) -> None:
    message = r"KReciprocalParams\.k1=-3 is below its minimum 1"
    with pytest.raises(InvalidInputError, match=message) as refused:
        create_reranker(METHOD, k1=-3)
    record("k1=-3", "engine (create_reranker)", refused.value)
    pick = good.gallery.files[0]
    with nothing_lost():
        with pytest.raises(InvalidInputError, match=message) as refused:
            explorer.query(good.key, source_file=pick, params={METHOD: {"k1": -3}})
        record("k1=-3", "query params", refused.value)
        result = explorer.query(good.key, source_file=pick)
        with pytest.raises(InvalidInputError, match=r"lambda_value=1\.5 is above its maximum"):
            explorer.rerank(result, METHOD, {"lambda_value": 1.5})
        record("lambda_value=1.5", "re-rank one method",
               "refused, InvalidInputError: KReciprocalParams.lambda_value=1.5 is above its "
               "maximum 1.0")
        with pytest.raises(InvalidInputError, match="params names no method") as refused:
            explorer.query(good.key, source_file=pick, params={"k_reciprocl": {"k1": 5}})
        record("params for a misspelt method", "query params", refused.value)
        with pytest.raises(InvalidInputError, match="must be a mapping") as refused:
            explorer.query(good.key, source_file=pick, params={METHOD: 5})
        record("params that are not a mapping", "query params", refused.value)
        presets = good.gallery.state_dir / PRESETS_FILE
        for bad_params in ({"k1": -3}, {"bogus": 1}):
            with pytest.raises(InvalidInputError) as refused:
                good.save_preset(METHOD, bad_params)
            record(f"preset {bad_params}", "save preset", refused.value)
        assert not presets.exists()
        assert good.params_for(METHOD)[1] == "authors' defaults"


def test_a_fresh_explorer_reopens_both_galleries_from_their_caches(
        extractor, root: Path, good: GallerySession, mixed: GallerySession, monkeypatch,
        record: Record) -> None:
    before = {session.key: snapshot(session.gallery.cache_dir) for session in (good, mixed)}
    embedded: list[int] = []
    original = extractor.embed_files

    def spy(paths, progress=None):
        embedded.append(len(paths))
        return original(paths, progress)

    monkeypatch.setattr(extractor, "embed_files", spy)
    fresh = Explorer(extractor, device="cpu", cache_root=root.parent / "cache",
                     allowed_roots=[root], methods=[METHOD])
    for session in (good, mixed):
        again = fresh.open_folder(session.gallery.root)
        assert again.gallery.files == session.gallery.files
        assert again.gallery.skipped == session.gallery.skipped
        np.testing.assert_array_equal(again.gallery.features, session.gallery.features)
        after = snapshot(session.gallery.cache_dir)
        assert after.keys() == before[session.key].keys()
        for name, (digest, mtime) in after.items():
            assert digest == before[session.key][name][0], name
            if name != "manifest.json":  # rewritten on every open, with the same bytes
                assert mtime == before[session.key][name][1], name
    assert embedded == []
    record("reopening the folder with bad files (new process)", "gallery folder",
           "nothing embedded or decoded again: the skips are remembered with their reasons; "
           "cache bytes unchanged")
