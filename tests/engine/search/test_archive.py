"""Tests of engine.search.archive: real zips built in tmp_path, each refusal, reuse, folders."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import EmptyGalleryError, InvalidInputError, UnsafePathError
from engine.features.images import list_image_files, load_image
from engine.search import archive
from engine.search.archive import MARKER_FILE, ExtractedArchive, extract_zip, resolve_allowed_folder

LABELS = b"file,label\nroses/1.jpg,0\ntulips/2.jpg,1\n"


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def make_zip(
    path: Path,
    entries: list[tuple[str | zipfile.ZipInfo, bytes]],
    compression: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """Write `entries` (name or ZipInfo, data) in order; names are stored exactly as given."""
    with zipfile.ZipFile(path, "w", compression) as handle:
        for name, data in entries:
            handle.writestr(name, data)
    return path


def content_folder(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def assert_nothing_left(destination_root: Path) -> None:
    """No extraction and no temporary folder remain after a refusal."""
    assert not destination_root.exists() or list(destination_root.iterdir()) == []


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    return tmp_path / "uploads" / "extracted"


# --- what is extracted ------------------------------------------------------------------------


def test_extracts_images_and_gallery_files_and_lists_skips(tmp_path, destination):
    red, blue = jpeg((255, 0, 0)), jpeg((0, 0, 255))
    path = make_zip(
        tmp_path / "gallery.zip",
        [
            ("labels.csv", LABELS),
            ("examples.txt", b"roses/1.jpg\n"),
            ("presets.json", b"{}"),
            ("roses/", b""),
            ("roses/1.jpg", red),
            ("tulips/2.JPG", blue),
            ("notes.txt", b"hello"),
            ("model.pt", b"\x80\x02"),
            ("__MACOSX/roses/._1.jpg", b"\x00\x05\x16\x07"),
            (".DS_Store", b"\x00"),
            ("roses/.hidden.jpg", red),
            (".git/objects/x.png", red),
        ],
    )
    result = extract_zip(path, destination)

    assert isinstance(result, ExtractedArchive)
    assert result.reused is False
    assert result.root == destination.resolve() / content_folder(path)
    assert (result.root / "roses" / "1.jpg").read_bytes() == red
    assert (result.root / "tulips" / "2.JPG").read_bytes() == blue
    assert (result.root / "labels.csv").read_bytes() == LABELS
    assert (result.root / "examples.txt").is_file()
    assert (result.root / "presets.json").is_file()
    assert load_image(result.root / "roses" / "1.jpg").getpixel((8, 6))[0] > 200
    assert [p.relative_to(result.root).as_posix() for p in list_image_files(result.root)] == [
        "roses/1.jpg",
        "tulips/2.JPG",
    ]
    assert set(result.skipped) == {
        "roses/",
        "notes.txt",
        "model.pt",
        "__MACOSX/roses/._1.jpg",
        ".DS_Store",
        "roses/.hidden.jpg",
        ".git/objects/x.png",
    }
    assert result.skipped["roses/"] == "folder entry"
    assert "not an image" in result.skipped["notes.txt"]
    assert "__MACOSX" in result.skipped["__MACOSX/roses/._1.jpg"]
    assert result.skipped[".DS_Store"] == "hidden file"
    assert result.skipped["roses/.hidden.jpg"] == "hidden file"
    for name in ("notes.txt", "model.pt", "__MACOSX", ".DS_Store", ".git"):
        assert not (result.root / name).exists()
    assert not (result.root / "roses" / ".hidden.jpg").exists()
    # the marker is the only extra file; no temporary folder is left beside the extraction
    assert (result.root / MARKER_FILE).is_file()
    assert [p.name for p in destination.iterdir()] == [result.root.name]


def test_single_top_folder_becomes_the_root(tmp_path, destination):
    path = make_zip(
        tmp_path / "flowers.zip",
        [
            ("flowers/", b""),
            ("flowers/labels.csv", LABELS),
            ("flowers/roses/1.jpg", jpeg()),
            ("flowers/tulips/2.jpg", jpeg((0, 255, 0))),
            ("__MACOSX/flowers/roses/._1.jpg", b"\x00"),
            ("flowers/readme.md", b"# flowers"),
        ],
    )
    result = extract_zip(path, destination)

    assert result.root.name == "flowers"
    assert result.root.parent == destination.resolve() / content_folder(path)
    assert (result.root / "labels.csv").read_bytes() == LABELS
    assert (result.root / "roses" / "1.jpg").is_file()
    assert (result.root.parent / MARKER_FILE).is_file()
    assert "flowers/readme.md" in result.skipped


def test_single_top_folder_is_found_through_backslashes_and_dot_components(tmp_path, destination):
    path = make_zip(
        tmp_path / "windows.zip", [("flowers\\roses\\1.jpg", jpeg()), ("./flowers/2.jpg", jpeg())]
    )
    result = extract_zip(path, destination)

    assert result.root.name == "flowers"
    assert (result.root / "roses" / "1.jpg").is_file()
    assert (result.root / "2.jpg").is_file()


@pytest.mark.parametrize(
    "names",
    [
        ["flowers/roses/1.jpg", "birds/owl/2.jpg"],  # two top folders
        ["flowers/roses/1.jpg", "3.jpg"],  # a file beside the folder
        ["flowers/roses/1.jpg", "labels.csv"],  # labels.csv beside the folder
    ],
)
def test_several_top_level_entries_keep_the_extraction_folder_as_root(tmp_path, destination, names):
    path = make_zip(tmp_path / "mixed.zip", [(name, jpeg()) for name in names])
    result = extract_zip(path, destination)

    assert result.root == destination.resolve() / content_folder(path)
    for name in names:
        assert (result.root / name).is_file()


def test_duplicate_names_keep_the_first_entry(tmp_path, destination):
    first, second = jpeg((255, 0, 0)), jpeg((0, 0, 255))
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = make_zip(tmp_path / "twice.zip", [("a.jpg", first), ("a.jpg", second)])
    result = extract_zip(path, destination)

    assert (result.root / "a.jpg").read_bytes() == first
    assert "duplicate" in result.skipped["a.jpg"]


def test_stored_and_bzip2_members_are_extracted(tmp_path, destination):
    for compression in (zipfile.ZIP_STORED, zipfile.ZIP_BZIP2):
        path = make_zip(tmp_path / f"{compression}.zip", [("a.jpg", jpeg())], compression)
        assert (extract_zip(path, destination).root / "a.jpg").read_bytes() == jpeg()


def test_archive_without_images_is_an_empty_gallery(tmp_path, destination):
    path = make_zip(tmp_path / "docs.zip", [("labels.csv", LABELS), ("notes.txt", b"x")])
    with pytest.raises(EmptyGalleryError, match="no image files"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


# --- reuse --------------------------------------------------------------------------------------


def test_same_bytes_are_reused_without_extracting_again(tmp_path, destination, monkeypatch):
    entries = [("flowers/labels.csv", LABELS), ("flowers/1.jpg", jpeg()), ("x.txt", b"x")]
    path = make_zip(tmp_path / "a.zip", entries)
    first = extract_zip(path, destination)
    marker = first.root.parent / MARKER_FILE
    before = marker.stat().st_mtime_ns

    def must_not_extract(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(archive, "_extract_new", must_not_extract)
    copy = tmp_path / "renamed copy.zip"
    copy.write_bytes(path.read_bytes())
    for again in (extract_zip(path, destination), extract_zip(copy, destination)):
        assert again.reused is True
        assert again.root == first.root
        assert again.skipped == first.skipped == {"x.txt": again.skipped["x.txt"]}
    assert marker.stat().st_mtime_ns == before
    assert len(list(destination.iterdir())) == 1


def test_different_bytes_get_a_different_folder(tmp_path, destination):
    one = extract_zip(make_zip(tmp_path / "one.zip", [("a.jpg", jpeg((1, 2, 3)))]), destination)
    two = extract_zip(make_zip(tmp_path / "two.zip", [("a.jpg", jpeg((9, 9, 9)))]), destination)

    assert one.root != two.root
    assert not one.reused and not two.reused


def test_incomplete_folder_without_marker_is_replaced(tmp_path, destination):
    path = make_zip(tmp_path / "a.zip", [("a.jpg", jpeg())])
    stale = destination / content_folder(path)
    stale.mkdir(parents=True)
    (stale / "half-written.jpg").write_bytes(b"\xff\xd8")

    result = extract_zip(path, destination)

    assert result.reused is False
    assert (result.root / "a.jpg").is_file()
    assert not (result.root / "half-written.jpg").exists()
    assert [p.name for p in destination.iterdir()] == [stale.name]


def test_losing_a_race_keeps_the_winners_folder(tmp_path, destination, monkeypatch):
    path = make_zip(tmp_path / "a.zip", [("a.jpg", jpeg())])
    winner = extract_zip(path, destination)
    marker = winner.root / MARKER_FILE
    before = marker.stat().st_mtime_ns
    real_read_complete = archive._read_complete
    calls = []

    def not_yet_done(target):  # the first look happens before the other process finished
        calls.append(target)
        return None if len(calls) == 1 else real_read_complete(target)

    monkeypatch.setattr(archive, "_read_complete", not_yet_done)
    loser = extract_zip(path, destination)

    assert loser.root == winner.root
    assert loser.reused is False
    assert marker.stat().st_mtime_ns == before
    assert [p.name for p in destination.iterdir()] == [winner.root.name]


# --- unsafe entries -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "evil",
    [
        "../evil.jpg",
        "/abs/evil.jpg",
        "a/../../evil.jpg",
        "..\\evil.jpg",
        "a\\..\\..\\evil.jpg",
        "C:/evil.jpg",
        "C:\\evil.jpg",
        "c:evil.jpg",
        "\\\\server\\share\\evil.jpg",
        "ok/../evil.jpg",  # stays inside, but '..' is refused outright
        "../notes.txt",  # refused although it would be skipped as a non-image
    ],
)
def test_unsafe_names_are_refused_and_nothing_is_written(tmp_path, destination, evil):
    path = make_zip(tmp_path / "evil.zip", [("good.jpg", jpeg()), (evil, jpeg())])
    with zipfile.ZipFile(path) as check:  # the name really is stored as given
        assert check.namelist()[1] == evil

    with pytest.raises(UnsafePathError, match="nothing was extracted"):
        extract_zip(path, destination)

    assert_nothing_left(destination)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["evil.zip"]


def test_symlink_entry_is_refused(tmp_path, destination):
    link = zipfile.ZipInfo("roses/link.jpg")
    link.create_system = 3  # Unix
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = make_zip(tmp_path / "link.zip", [("roses/1.jpg", jpeg()), (link, b"/etc/passwd")])

    with pytest.raises(UnsafePathError, match="symbolic link"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


def test_unix_regular_file_mode_is_accepted(tmp_path, destination):
    regular = zipfile.ZipInfo("a.jpg")
    regular.create_system = 3
    regular.external_attr = (stat.S_IFREG | 0o644) << 16
    path = make_zip(tmp_path / "regular.zip", [(regular, jpeg())])

    assert (extract_zip(path, destination).root / "a.jpg").is_file()


def test_file_that_is_also_a_folder_is_refused(tmp_path, destination):
    path = make_zip(tmp_path / "clash.zip", [("a.jpg", jpeg()), ("a.jpg/b.jpg", jpeg())])
    with pytest.raises(InvalidInputError, match="both a file and a folder"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


# --- limits -------------------------------------------------------------------------------------


def test_too_many_entries_are_refused(tmp_path, destination):
    entries = [(f"{i}.jpg", jpeg()) for i in range(4)]
    path = make_zip(tmp_path / "many.zip", entries)

    with pytest.raises(InvalidInputError, match="4 entries; the limit is 3"):
        extract_zip(path, destination, max_entries=3)
    assert_nothing_left(destination)
    assert extract_zip(path, destination, max_entries=4).reused is False


def test_skipped_entries_count_towards_the_entry_limit(tmp_path, destination):
    path = make_zip(
        tmp_path / "junk.zip", [("a.jpg", jpeg())] + [(f"{i}.txt", b"") for i in range(3)]
    )
    with pytest.raises(InvalidInputError, match="entries"):
        extract_zip(path, destination, max_entries=3)


def test_declared_size_over_the_limit_is_refused(tmp_path, destination):
    big = jpeg(size=(64, 64))
    path = make_zip(tmp_path / "big.zip", [("a.jpg", big), ("b.jpg", big), ("c.txt", b"x" * 999)])
    images_bytes = 2 * len(big)  # skipped entries do not count

    with pytest.raises(InvalidInputError, match=r"expands to .*; the limit is"):
        extract_zip(path, destination, max_extracted_bytes=images_bytes - 1)
    assert_nothing_left(destination)
    assert extract_zip(path, destination, max_extracted_bytes=images_bytes).reused is False


def test_streamed_bytes_are_counted_even_when_headers_pass(tmp_path, destination, monkeypatch):
    payload = jpeg(size=(64, 64))
    path = make_zip(tmp_path / "big.zip", [("a.jpg", payload), ("b.jpg", payload)])
    declared_checks = []
    # Stand in for headers that understate the sizes: the declared-size check lets it through,
    # so only the byte counter of the copy loop can stop the extraction.
    monkeypatch.setattr(archive, "_check_declared_size", lambda *args: declared_checks.append(1))

    with pytest.raises(InvalidInputError, match="headers claim less"):
        extract_zip(path, destination, max_extracted_bytes=len(payload) + 10)

    assert declared_checks == [1]
    assert_nothing_left(destination)


def test_forged_small_header_size_cannot_smuggle_bytes(tmp_path, destination):
    payload = jpeg(size=(64, 64))
    data = bytearray(make_zip(tmp_path / "honest.zip", [("a.jpg", payload)]).read_bytes())
    # uncompressed size: offset 22 of the local header, offset 24 of the central directory entry
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 100)
    struct.pack_into("<I", data, central + 24, 100)
    path = tmp_path / "forged.zip"
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as check:
        assert check.getinfo("a.jpg").file_size == 100

    with pytest.raises(InvalidInputError, match="damaged or truncated"):
        extract_zip(path, destination, max_extracted_bytes=1000)
    assert_nothing_left(destination)


def test_archive_over_the_size_limit_is_refused(tmp_path, destination):
    path = make_zip(tmp_path / "a.zip", [("a.jpg", jpeg())])
    size = path.stat().st_size

    with pytest.raises(InvalidInputError, match="the limit is"):
        extract_zip(path, destination, max_archive_bytes=size - 1)
    assert_nothing_left(destination)
    assert extract_zip(path, destination, max_archive_bytes=size).reused is False


def test_encrypted_entry_is_refused(tmp_path, destination):
    data = bytearray(make_zip(tmp_path / "plain.zip", [("a.jpg", jpeg())]).read_bytes())
    # set the "encrypted" bit of the flags: offset 6 of the local header, 8 of the central entry
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    path = tmp_path / "locked.zip"
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as check:
        assert check.getinfo("a.jpg").flag_bits & 0x1

    with pytest.raises(InvalidInputError, match="encrypted"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


# --- files that are not zips --------------------------------------------------------------------


def test_text_file_named_zip_is_refused(tmp_path, destination):
    path = tmp_path / "notes.zip"
    path.write_text("this is not a zip\n" * 10)
    with pytest.raises(InvalidInputError, match="not a readable zip"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


def test_empty_file_is_refused(tmp_path, destination):
    path = tmp_path / "empty.zip"
    path.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="not a readable zip"):
        extract_zip(path, destination)


def test_missing_archive_is_refused(tmp_path, destination):
    with pytest.raises(InvalidInputError, match="not a file"):
        extract_zip(tmp_path / "missing.zip", destination)
    with pytest.raises(InvalidInputError, match="not a file"):
        extract_zip(tmp_path, destination)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9, 0.99])
def test_truncated_zip_is_refused(tmp_path, destination, keep):
    whole = make_zip(tmp_path / "whole.zip", [(f"{i}.jpg", jpeg((i, i, i))) for i in range(5)])
    data = whole.read_bytes()
    path = tmp_path / "cut.zip"
    path.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(InvalidInputError):
        extract_zip(path, destination)
    assert_nothing_left(destination)


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_corrupt_member_data_is_refused_and_cleaned_up(tmp_path, destination, compression):
    good = jpeg((10, 200, 10), size=(64, 64))
    data = bytearray(
        make_zip(tmp_path / "ok.zip", [("a.jpg", good), ("b.jpg", good)], compression).read_bytes()
    )
    # damage the middle of the second member's data; the central directory stays intact
    second = data.find(b"PK\x03\x04", 1)
    name_length, extra_length = struct.unpack_from("<HH", data, second + 26)
    start = second + 30 + name_length + extra_length
    for offset in range(start + 20, start + 60):
        data[offset] ^= 0x5A
    path = tmp_path / "damaged.zip"
    path.write_bytes(bytes(data))

    with pytest.raises(InvalidInputError, match="damaged or truncated"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


def test_unsupported_zip_version_is_refused(tmp_path, destination):
    data = bytearray(make_zip(tmp_path / "plain.zip", [("a.jpg", jpeg())]).read_bytes())
    central = data.find(b"PK\x01\x02")
    data[central + 6] = 255  # "version needed to extract" 25.5, newer than zipfile supports
    path = tmp_path / "future.zip"
    path.write_bytes(bytes(data))

    with pytest.raises(InvalidInputError, match="not a readable zip"):
        extract_zip(path, destination)
    assert_nothing_left(destination)


def test_error_messages_use_readable_sizes():
    assert archive._human_bytes(512) == "512 B"
    assert archive._human_bytes(1536) == "1.5 KiB"
    assert archive._human_bytes(int(3.1 * (1 << 30))) == "3.1 GiB"
    assert archive._human_bytes(archive.MAX_EXTRACTED_BYTES) == "2.0 GiB"


# --- resolve_allowed_folder ---------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root with a gallery inside it, and a folder outside every root."""
    allowed = tmp_path / "data"
    (allowed / "gallery" / "roses").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    return allowed, outside


def test_folder_inside_a_root_is_allowed(roots):
    allowed, _ = roots
    resolved = resolve_allowed_folder(allowed / "gallery" / "roses", [allowed])
    assert resolved == (allowed / "gallery" / "roses").resolve()
    assert resolve_allowed_folder(str(allowed / "gallery"), [str(allowed)]).name == "gallery"


def test_root_itself_is_allowed(roots):
    allowed, _ = roots
    assert resolve_allowed_folder(allowed, [allowed]) == allowed.resolve()


def test_single_root_may_be_given_without_a_list(roots):
    allowed, outside = roots
    assert resolve_allowed_folder(allowed / "gallery", allowed) == (allowed / "gallery").resolve()
    with pytest.raises(UnsafePathError):
        resolve_allowed_folder(outside, str(allowed))


def test_any_of_several_roots_is_allowed(roots):
    allowed, outside = roots
    assert resolve_allowed_folder(outside, [allowed, outside]) == outside.resolve()


def test_folder_outside_the_roots_is_refused_and_the_message_names_them(roots):
    allowed, outside = roots
    with pytest.raises(UnsafePathError, match="outside the allowed folders") as refused:
        resolve_allowed_folder(outside, [allowed])
    assert str(allowed.resolve()) in str(refused.value)


def test_sibling_with_a_common_prefix_is_refused(tmp_path, roots):
    allowed, _ = roots
    sibling = tmp_path / "data2"
    sibling.mkdir()
    with pytest.raises(UnsafePathError):
        resolve_allowed_folder(sibling, [allowed])


def test_dot_dot_out_of_a_root_is_refused(roots):
    allowed, outside = roots
    with pytest.raises(UnsafePathError):
        resolve_allowed_folder(f"{allowed}/../{outside.name}", [allowed])
    with pytest.raises(UnsafePathError):
        resolve_allowed_folder(allowed / "gallery" / ".." / "..", [allowed])
    inside = resolve_allowed_folder(allowed / "gallery" / "roses" / "..", [allowed])
    assert inside == (allowed / "gallery").resolve()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links on this system")
def test_symlink_inside_a_root_pointing_outside_is_refused(roots):
    allowed, outside = roots
    link = allowed / "shortcut"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="secret"):
        resolve_allowed_folder(link, [allowed])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links on this system")
def test_symlinks_are_judged_by_their_target(tmp_path, roots):
    allowed, _ = roots
    inner_link = allowed / "roses-link"
    inner_link.symlink_to(allowed / "gallery" / "roses", target_is_directory=True)
    assert (
        resolve_allowed_folder(inner_link, [allowed]) == (allowed / "gallery" / "roses").resolve()
    )
    root_link = tmp_path / "data-link"  # a root given through a link covers its target
    root_link.symlink_to(allowed, target_is_directory=True)
    assert resolve_allowed_folder(allowed / "gallery", [root_link]).name == "gallery"


def test_empty_roots_allow_nothing(roots):
    allowed, _ = roots
    with pytest.raises(UnsafePathError, match="none are configured"):
        resolve_allowed_folder(allowed, [])


def test_missing_folder_inside_a_root_is_invalid_input_not_unsafe(roots):
    allowed, _ = roots
    with pytest.raises(InvalidInputError, match="does not exist") as refused:
        resolve_allowed_folder(allowed / "nope", [allowed])
    assert not isinstance(refused.value, UnsafePathError)


def test_missing_folder_outside_the_roots_does_not_reveal_existence(tmp_path, roots):
    allowed, _ = roots
    with pytest.raises(UnsafePathError):
        resolve_allowed_folder(tmp_path / "nope", [allowed])


def test_file_is_not_a_folder(roots):
    allowed, _ = roots
    image = allowed / "gallery" / "a.jpg"
    image.write_bytes(jpeg())
    with pytest.raises(InvalidInputError, match="not a folder") as refused:
        resolve_allowed_folder(image, [allowed])
    assert not isinstance(refused.value, UnsafePathError)


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_empty_path_is_refused(roots, empty):
    allowed, _ = roots
    with pytest.raises(InvalidInputError, match="give a folder"):
        resolve_allowed_folder(empty, [allowed])


def test_null_byte_is_refused(roots):
    allowed, _ = roots
    with pytest.raises(InvalidInputError):
        resolve_allowed_folder(f"{allowed}/gal\x00lery", [allowed])


def test_tilde_is_expanded(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "pictures" / "gallery").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))

    resolved = resolve_allowed_folder("~/pictures/gallery", ["~/pictures"])
    assert resolved == (home / "pictures" / "gallery").resolve()
    with pytest.raises(UnsafePathError):
        resolve_allowed_folder("~", ["~/pictures"])


# --- the name an upload keeps -----------------------------------------------------------------
def test_an_upload_keeps_its_name_beside_the_extraction(tmp_path, destination):
    extracted = extract_zip(make_zip(tmp_path / "x.zip", [("a.jpg", jpeg())]), destination)
    assert archive.read_upload_name(extracted.root) is None
    assert archive.write_upload_name(extracted.root, "C:\\Users\\me\\flowers.zip") == (
        "flowers.zip")
    assert archive.read_upload_name(extracted.root) == "flowers.zip"
    assert [path.name for path in list_image_files(extracted.root)] == ["a.jpg"]  # hidden
    (extracted.root / archive.UPLOAD_NAME_FILE).write_text("[")
    assert archive.read_upload_name(extracted.root) is None
    assert archive.clean_upload_name("a/b\x00c.zip" + "x" * 300) == ("bc.zip" + "x" * 300)[
        :archive.MAX_NAME_LENGTH]
    assert archive.clean_upload_name("  ") == "upload.zip"
