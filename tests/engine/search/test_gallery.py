"""Gallery.open on small real folders: bad files, labels, the incremental atomic cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.core import storage
from engine.core.storage import load_checked_npz, load_json, load_npz
from engine.core.types import GalleryContext
from engine.errors import EmptyGalleryError, InvalidInputError
from engine.search.gallery import (
    CHECKPOINT_BATCHES,
    SPOT_CHECK_COSINE,
    SPOT_CHECKS,
    Gallery,
    read_labels,
    save_shipped_features,
    scan_gallery,
    shipped_features_path,
)

# Oxford-17 numbering: image n has label (n - 1) // 80; three classes, four images each.
FOLDERS = {"daffodil": [1, 2, 3, 4], "snowdrop": [81, 82, 83, 84], "lilyvalley": [161, 162, 163,
                                                                                 164]}
BAD_FILES = ["daffodil/empty.jpg", "notes.jpg", "snowdrop/truncated.jpg"]
DEMO_IMAGES = Path(__file__).resolve().parents[3] / "assets" / "demo_gallery" / "images"


def demo_image(number: int) -> Path:
    return DEMO_IMAGES / f"image_{number:04d}.jpg"


def write_bad_files(root: Path) -> None:
    (root / "daffodil").mkdir(parents=True, exist_ok=True)
    (root / "snowdrop").mkdir(parents=True, exist_ok=True)
    (root / "daffodil" / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("a text file that only looks like a JPEG by its name\n")
    jpeg = demo_image(5).read_bytes()
    (root / "snowdrop" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])


def make_folder_gallery(root: Path) -> Path:
    for folder, numbers in FOLDERS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for number in numbers:
            shutil.copy(demo_image(number), root / folder / demo_image(number).name)
    write_bad_files(root)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder_gallery(tmp_path / "flowers")


@pytest.fixture
def cache_root(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def embedded(extractor, monkeypatch) -> list[list[str]]:
    """Spy on the shared extractor: the file names of every embed_files call."""
    calls: list[list[str]] = []
    original = extractor.embed_files

    def spy(paths, progress=None):
        calls.append([Path(path).name for path in paths])
        return original(paths, progress)

    monkeypatch.setattr(extractor, "embed_files", spy)
    return calls


def count(calls: list[list[str]]) -> int:
    return sum(len(call) for call in calls)


def open_gallery(folder: Path, extractor, cache_root: Path, **kwargs) -> Gallery:
    return Gallery.open(folder, extractor=extractor, cache_root=cache_root, device="cpu",
                        **kwargs)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.suffix == ".tmp" or p.name.startswith(".")]


def test_open_skips_bad_files_and_labels_from_subfolders(folder, cache_root, extractor, embedded,
                                                         caplog):
    caplog.set_level(logging.WARNING)
    progress = []
    gallery = open_gallery(folder, extractor, cache_root,
                           progress=lambda fraction, message: progress.append((fraction, message)))
    good = sorted(f"{name}/{demo_image(n).name}" for name, numbers in FOLDERS.items()
                  for n in numbers)
    assert gallery.files == good
    assert gallery.size == 12
    assert sorted(gallery.skipped) == BAD_FILES
    assert all(reason for reason in gallery.skipped.values())
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in BAD_FILES:
        assert name in warnings
    assert count(embedded) == 15
    assert progress and progress[-1][0] == pytest.approx(1.0)
    # labels from sub-folder names, numbered in sorted order
    assert gallery.class_names == ["daffodil", "lilyvalley", "snowdrop"]
    expected = [gallery.class_names.index(name.split("/")[0]) for name in gallery.files]
    np.testing.assert_array_equal(gallery.labels, expected)
    assert gallery.labels.dtype == np.int64
    assert gallery.class_of(0) == gallery.files[0].split("/")[0]
    assert gallery.path_of(0) == folder.resolve() / gallery.files[0]
    # features are the extractor's, row-aligned with files
    assert gallery.features.shape == (12, 1280) and gallery.features.dtype == np.float32
    np.testing.assert_allclose(gallery.features,
                               extractor.embed([gallery.path_of(i) for i in range(12)]),
                               atol=1e-5)
    # index and kNN graph (depth clamped to the gallery size, self first)
    assert gallery.index.size == 12 and gallery.knn.depth == 12
    np.testing.assert_array_equal(gallery.knn.indices[:, 0], np.arange(12))
    indices = gallery.search(gallery.features[:2], 3).indices
    np.testing.assert_array_equal(indices[:, 0], [0, 1])
    context = gallery.context()
    assert isinstance(context, GalleryContext)
    assert context.fingerprint == gallery.fingerprint and context.size == 12
    assert context.state_dir == gallery.cache_dir / "state"


def test_cache_files_are_written(folder, cache_root, extractor):
    gallery = open_gallery(folder, extractor, cache_root)
    cache_dir = gallery.cache_dir
    assert cache_dir.parent == cache_root / "galleries"
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == ["features.npz", "index.faiss", "knn.npz", "manifest.json"]
    assert no_temp_files(cache_dir)
    manifest = load_json(cache_dir / "manifest.json")
    assert manifest["n_images"] == 12 and manifest["n_skipped"] == 3
    assert manifest["fingerprint"] == gallery.fingerprint
    assert manifest["meta"]["backbone"] == extractor.meta.backbone
    stored = load_npz(cache_dir / "features.npz")
    assert sorted(stored["skipped_files"].tolist()) == BAD_FILES
    assert str(stored["meta_fingerprint"]) == extractor.meta.fingerprint


def test_reopen_uses_the_cache_and_embeds_only_new_files(folder, cache_root, extractor,
                                                         embedded, caplog):
    first = open_gallery(folder, extractor, cache_root)
    assert count(embedded) == 15
    embedded.clear()
    second = open_gallery(folder, extractor, cache_root)
    assert count(embedded) == 0
    assert second.files == first.files and second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.features, first.features)
    assert sorted(second.skipped) == BAD_FILES  # remembered, not retried
    # two new images: exactly those two are embedded, the index rebuilt without a warning
    for number in (241, 242):
        shutil.copy(demo_image(number), folder / "daffodil" / f"new_{number}.jpg")
    caplog.set_level(logging.INFO)
    third = open_gallery(folder, extractor, cache_root)
    assert not warnings_of(caplog)
    assert any("built for other files" in r.getMessage() for r in caplog.records)
    assert sorted(name for call in embedded for name in call) == ["new_241.jpg", "new_242.jpg"]
    assert third.size == 14 and third.fingerprint != first.fingerprint
    rows = [third.files.index(f) for f in first.files]
    np.testing.assert_array_equal(third.features[rows], first.features)
    assert third.index.size == 14 and third.knn.indices.shape == (14, 14)
    assert no_temp_files(third.cache_dir)


def test_a_changed_file_is_re_embedded(folder, cache_root, extractor, embedded):
    first = open_gallery(folder, extractor, cache_root)
    embedded.clear()
    target = folder / "snowdrop" / "image_0081.jpg"
    shutil.copy(demo_image(300), target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = open_gallery(folder, extractor, cache_root)
    assert embedded == [["image_0081.jpg"]]
    row = second.files.index("snowdrop/image_0081.jpg")
    np.testing.assert_allclose(second.features[row], extractor.embed([demo_image(300)])[0],
                               atol=1e-5)
    assert not np.allclose(second.features[row], first.features[row])


def test_a_removed_file_leaves_the_gallery_without_embedding(folder, cache_root, extractor,
                                                             embedded):
    first = open_gallery(folder, extractor, cache_root)
    embedded.clear()
    (folder / "lilyvalley" / "image_0161.jpg").unlink()
    second = open_gallery(folder, extractor, cache_root)
    assert count(embedded) == 0
    assert second.size == 11 and "lilyvalley/image_0161.jpg" not in second.files
    rows = [first.files.index(f) for f in second.files]
    np.testing.assert_array_equal(second.features, first.features[rows])
    assert second.index.size == 11 and second.knn.indices.shape == (11, 11)


def test_corrupt_feature_cache_is_ignored_and_rebuilt(folder, cache_root, extractor, embedded,
                                                      caplog):
    first = open_gallery(folder, extractor, cache_root)
    features_path = first.cache_dir / "features.npz"
    features_path.write_bytes(b"PK\x03\x04 definitely not a complete zip archive")
    embedded.clear()
    caplog.set_level(logging.WARNING)
    second = open_gallery(folder, extractor, cache_root)
    assert any("ignoring the feature cache" in r.getMessage() for r in caplog.records)
    assert count(embedded) == 15
    np.testing.assert_allclose(second.features, first.features, atol=1e-6)
    assert load_npz(features_path)["features"].shape == (12, 1280)  # rewritten, readable


def test_feature_cache_of_another_backbone_is_ignored(folder, cache_root, extractor, embedded,
                                                      caplog):
    first = open_gallery(folder, extractor, cache_root)
    features_path = first.cache_dir / "features.npz"
    stored = load_checked_npz(features_path)
    stored["meta_fingerprint"] = np.array("0123456789abcdef")
    storage.atomic_save_checked_npz(features_path, **stored)  # a consistent file, re-signed
    embedded.clear()
    caplog.set_level(logging.WARNING)
    open_gallery(folder, extractor, cache_root)
    assert any("another backbone" in r.getMessage() for r in caplog.records)
    assert count(embedded) == 15


@pytest.mark.parametrize("damaged", ["manifest.json", "index.faiss"])
def test_damaged_index_cache_is_rebuilt(folder, cache_root, extractor, embedded, damaged):
    first = open_gallery(folder, extractor, cache_root)
    (first.cache_dir / damaged).write_bytes(b"\x00garbage")
    embedded.clear()
    second = open_gallery(folder, extractor, cache_root)
    assert count(embedded) == 0
    queries = first.features[:4]
    np.testing.assert_array_equal(second.search(queries, 5).indices,
                                  first.search(queries, 5).indices)
    assert load_json(first.cache_dir / "manifest.json")["fingerprint"] == first.fingerprint


def test_a_crash_while_writing_keeps_the_previous_cache(folder, cache_root, extractor, embedded,
                                                        monkeypatch):
    first = open_gallery(folder, extractor, cache_root)
    features_path = first.cache_dir / "features.npz"
    before = features_path.read_bytes()
    shutil.copy(demo_image(241), folder / "daffodil" / "new.jpg")

    def crash(source, destination):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        open_gallery(folder, extractor, cache_root)
    monkeypatch.undo()
    assert features_path.read_bytes() == before
    assert no_temp_files(first.cache_dir)
    # the next open embeds the new image again and succeeds
    extractor_calls = []
    original = extractor.embed_files
    monkeypatch.setattr(extractor, "embed_files",
                        lambda paths, progress=None: extractor_calls.append(len(paths))
                        or original(paths, progress))
    third = open_gallery(folder, extractor, cache_root)
    assert extractor_calls == [1] and third.size == 13


def test_labels_from_csv(tmp_path, cache_root, extractor):
    root = tmp_path / "csv_gallery"
    (root / "images").mkdir(parents=True)
    numbers = [1, 2, 81, 82, 161, 1000]
    for number in numbers:
        shutil.copy(demo_image(number), root / "images")
    # the demo gallery's layout: file names relative to images/; image_1000 is not listed
    (root / "labels.csv").write_text(
        "file,label,class_name\n"
        "image_0001.jpg,0,daffodil\nimage_0002.jpg,0,daffodil\n"
        "image_0081.jpg,1,snowdrop\nimages/image_0082.jpg,1,snowdrop\n"
        "image_0161.jpg,2,lilyvalley\nimage_9999.jpg,3,missing\n")
    gallery = open_gallery(root, extractor, cache_root)
    assert gallery.files == [f"images/{demo_image(n).name}" for n in numbers]
    np.testing.assert_array_equal(gallery.labels, [0, 0, 1, 1, 2, -1])
    assert gallery.class_names[:3] == ["daffodil", "snowdrop", "lilyvalley"]
    assert gallery.class_of(2) == "snowdrop"
    assert gallery.class_of(5) is None


def test_csv_without_required_columns(tmp_path):
    (tmp_path / "labels.csv").write_text("name,klass\na.jpg,1\n")
    with pytest.raises(InvalidInputError, match="'file' and 'label'"):
        read_labels(tmp_path, ["a.jpg"])


def test_no_labels(tmp_path, cache_root, extractor):
    root = tmp_path / "flat"
    root.mkdir()
    for number in (1, 81, 161):
        shutil.copy(demo_image(number), root)
    gallery = open_gallery(root, extractor, cache_root)
    assert gallery.labels is None and gallery.class_names == []
    assert gallery.class_of(0) is None


def test_only_bad_files_is_an_empty_gallery(tmp_path, cache_root, extractor):
    root = tmp_path / "bad_only"
    write_bad_files(root)
    with pytest.raises(EmptyGalleryError, match="no decodable images"):
        open_gallery(root, extractor, cache_root)


def test_empty_folder_is_an_empty_gallery(tmp_path, cache_root, extractor):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "readme.txt").write_text("no images here")
    with pytest.raises(EmptyGalleryError):
        open_gallery(root, extractor, cache_root)


def test_missing_folder(tmp_path, cache_root, extractor):
    with pytest.raises(InvalidInputError, match="does not exist"):
        open_gallery(tmp_path / "nope", extractor, cache_root)
    file = tmp_path / "file.jpg"
    shutil.copy(demo_image(1), file)
    with pytest.raises(InvalidInputError, match="not a folder"):
        open_gallery(file, extractor, cache_root)


def test_csv_labels_are_numbered_densely():
    """Large numeric ids, strings, negatives (unlabelled), BOM header, blank lines."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "labels.csv").write_text(
            "\ufefffile,label\na.jpg,100000000\nb.jpg,7\n\nc.jpg,-1\nd.jpg,7\n", encoding="utf-8")
        labels = read_labels(root, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
        assert labels.by_file == {"a.jpg": 1, "b.jpg": 0, "d.jpg": 0}
        assert labels.class_names == ["7", "100000000"]
        (root / "labels.csv").write_text("file,label\na.jpg\n")
        with pytest.raises(InvalidInputError, match="no label"):
            read_labels(root, ["a.jpg"])
        (root / "labels.csv").write_text("file,label\na.jpg,-2\n")
        with pytest.raises(InvalidInputError, match="labelled"):
            read_labels(root, ["a.jpg"])


def test_manifest_that_is_not_an_object_is_rebuilt(folder, cache_root, extractor, caplog):
    first = Gallery.open(folder, extractor=extractor, cache_root=cache_root)
    (first.cache_dir / "manifest.json").write_text("[]")
    with caplog.at_level(logging.WARNING):
        second = Gallery.open(folder, extractor=extractor, cache_root=cache_root)
    assert "not a JSON object" in caplog.text
    np.testing.assert_array_equal(second.knn.indices, first.knn.indices)


# -- verification of every cache file on load ------------------------------------------------

@pytest.fixture(scope="module")
def clean(extractor, tmp_path_factory) -> Gallery:
    """The folder gallery built once from nothing: what every rebuild must equal."""
    root = make_folder_gallery(tmp_path_factory.mktemp("clean") / "flowers")
    return open_gallery(root, extractor, tmp_path_factory.mktemp("clean_cache"))


def flip_byte_inside(path: Path, needle: bytes) -> None:
    """Flip one bit in the middle of the first occurrence of `needle` in the file."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, f"{needle[:8]!r}... not found in {path.name}"
    data[at + len(needle) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resign(cache_dir: Path, name: str, **arrays: np.ndarray) -> None:
    """Rewrite a checked .npz with changed arrays and a valid checksum, and record it in the
    manifest: a consistent-looking file, so that only the content checks can refuse it."""
    stored = {**load_checked_npz(cache_dir / name), **arrays}
    storage.atomic_save_checked_npz(cache_dir / name, **stored)
    record_in_manifest(cache_dir, name)


def record_in_manifest(cache_dir: Path, name: str) -> None:
    edit_manifest(cache_dir, lambda manifest: manifest["files"].update({name: {
        "bytes": (cache_dir / name).stat().st_size,
        "sha256": storage.sha256_file(cache_dir / name)}}), resign=True)


def edit_manifest(cache_dir: Path, change, resign: bool = False) -> None:
    """Change the manifest's fields; with `resign`, update its checksum too (as the gallery
    would write it), so that only the content checks can refuse it."""
    manifest = load_json(cache_dir / "manifest.json")
    change(manifest)
    if resign:
        manifest.pop("checksum")
        manifest["checksum"] = storage.fingerprint(manifest)
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))


def nan_features(cache_dir: Path) -> None:
    features = load_checked_npz(cache_dir / "features.npz")["features"].copy()
    features[3, 7] = np.nan
    resign(cache_dir, "features.npz", features=features)


def narrow_features(cache_dir: Path) -> None:
    features = load_checked_npz(cache_dir / "features.npz")["features"][:, :640]
    resign(cache_dir, "features.npz",
           features=features / np.linalg.norm(features, axis=1, keepdims=True))


def unnormalised_features(cache_dir: Path) -> None:
    features = load_checked_npz(cache_dir / "features.npz")["features"]
    resign(cache_dir, "features.npz", features=features * 2)


def misaligned_features(cache_dir: Path) -> None:
    files = load_checked_npz(cache_dir / "features.npz")["files"]
    resign(cache_dir, "features.npz", files=files[:-1])


def features_edited_checksum_kept(cache_dir: Path) -> None:
    """Zip CRCs valid (numpy writes them) but the arrays no longer match the checksum."""
    stored = load_npz(cache_dir / "features.npz")
    stored["features"] = stored["features"][::-1].copy()
    storage.atomic_save_npz(cache_dir / "features.npz", **stored)


def features_of_an_older_format(cache_dir: Path) -> None:
    stored = load_checked_npz(cache_dir / "features.npz")
    storage.atomic_save_npz(cache_dir / "features.npz", **stored)  # no checksum


def flipped_features(cache_dir: Path) -> None:
    features = load_checked_npz(cache_dir / "features.npz")["features"]
    flip_byte_inside(cache_dir / "features.npz", features[5].tobytes())


def flipped_index(cache_dir: Path) -> None:
    """A flipped bit in the stored index (a flat index stores only its header: the gallery's
    features are searched in place): only the manifest's sha256 can tell."""
    path = cache_dir / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def flipped_knn(cache_dir: Path) -> None:
    indices = load_checked_npz(cache_dir / "knn.npz")["indices"]
    flip_byte_inside(cache_dir / "knn.npz", indices[2].tobytes())


def knn_outside_the_gallery(cache_dir: Path) -> None:
    indices = load_checked_npz(cache_dir / "knn.npz")["indices"].copy()
    indices[0, 1] = 999
    resign(cache_dir, "knn.npz", indices=indices)


def knn_with_nan(cache_dir: Path) -> None:
    similarities = load_checked_npz(cache_dir / "knn.npz")["similarities"].copy()
    similarities[1, 2] = np.nan
    resign(cache_dir, "knn.npz", similarities=similarities)


def index_of_another_gallery(cache_dir: Path) -> None:
    from engine.search.index import SearchIndex

    features = load_checked_npz(cache_dir / "features.npz")["features"]
    SearchIndex(features[:5], kind="hnsw", device="cpu").save(cache_dir / "index.faiss")
    record_in_manifest(cache_dir, "index.faiss")


def manifest_sha_edited(cache_dir: Path) -> None:
    edit_manifest(cache_dir, lambda m: m["files"]["index.faiss"].update(sha256="0" * 64))


def manifest_sha_edited_and_resigned(cache_dir: Path) -> None:
    edit_manifest(cache_dir, lambda m: m["files"]["index.faiss"].update(sha256="0" * 64),
                  resign=True)


def manifest_fingerprint_edited(cache_dir: Path) -> None:
    edit_manifest(cache_dir, lambda m: m.update(fingerprint="0123456789abcdef"))


def manifest_without_file_checksums(cache_dir: Path) -> None:
    edit_manifest(cache_dir, lambda m: m.pop("files"), resign=True)


# (damage, what the warning says, whether the features must be embedded again)
DAMAGE = {
    "features flipped byte": (flipped_features, "ignoring the feature cache", True),
    "features truncated": (lambda d: truncate(d / "features.npz"), "ignoring the feature cache",
                           True),
    "features missing": (lambda d: (d / "features.npz").unlink(), "missing", True),
    "features with NaN": (nan_features, "NaN", True),
    "features of the wrong width": (narrow_features, "640 dimensions", True),
    "features not unit-norm": (unnormalised_features, "L2-normalised", True),
    "features and files misaligned": (misaligned_features, "ignoring the feature cache", True),
    "features edited, checksum kept": (features_edited_checksum_kept, "checksum", True),
    "features without a checksum": (features_of_an_older_format, "no checksum", True),
    "index flipped byte": (flipped_index, "index.faiss does not match", False),
    "index truncated": (lambda d: truncate(d / "index.faiss"), "index.faiss does not match",
                        False),
    "index missing": (lambda d: (d / "index.faiss").unlink(), "index.faiss is missing", False),
    "index of another gallery": (index_of_another_gallery, "holds 5 vectors", False),
    "knn flipped byte": (flipped_knn, "knn.npz does not match", False),
    "knn truncated": (lambda d: truncate(d / "knn.npz"), "knn.npz does not match", False),
    "knn missing": (lambda d: (d / "knn.npz").unlink(), "knn.npz is missing", False),
    "knn outside the gallery": (knn_outside_the_gallery, "outside the gallery", False),
    "knn with NaN": (knn_with_nan, "NaN", False),
    "manifest sha256 edited": (manifest_sha_edited, "manifest.json does not match", False),
    "manifest sha256 edited, re-signed": (manifest_sha_edited_and_resigned,
                                          "index.faiss does not match", False),
    "manifest fingerprint edited": (manifest_fingerprint_edited, "manifest.json does not match",
                                    False),
    "manifest without file checksums": (manifest_without_file_checksums, "no checksums",
                                        False),
    "manifest of an older format": (lambda d: edit_manifest(d, lambda m: m.pop("format")),
                                    "format None", False),
    "manifest garbage": (lambda d: (d / "manifest.json").write_bytes(b"\x00{garbage"),
                         "unreadable", False),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing",
                         False),
}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and not r.getMessage().startswith("skipped ")]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_cache_is_rebuilt_with_a_warning_never_used(kind, folder, cache_root,
                                                              extractor, embedded, caplog,
                                                              clean):
    damage, says, re_embeds = DAMAGE[kind]
    first = open_gallery(folder, extractor, cache_root)
    damage(first.cache_dir)
    embedded.clear()
    caplog.set_level(logging.WARNING)
    second = open_gallery(folder, extractor, cache_root)
    warnings = warnings_of(caplog)
    assert any(says in message for message in warnings), warnings
    assert count(embedded) == (15 if re_embeds else 0)
    # equal to a clean build: features, kNN graph, search
    assert second.files == clean.files and second.fingerprint == first.fingerprint
    np.testing.assert_allclose(second.features, clean.features, atol=1e-6)
    np.testing.assert_array_equal(second.knn.indices, clean.knn.indices)
    np.testing.assert_allclose(second.knn.similarities, clean.knn.similarities, atol=1e-6)
    np.testing.assert_allclose(second.knn.farthest, clean.knn.farthest, atol=1e-6)
    queries = clean.features[:6]
    np.testing.assert_array_equal(second.search(queries, 8).indices,
                                  clean.search(queries, 8).indices)
    assert (storage.sha256_file(first.cache_dir / "index.faiss")
            == storage.sha256_file(clean.cache_dir / "index.faiss"))  # the very same vectors
    # the damaged file was replaced: the next open verifies everything and rebuilds nothing
    caplog.clear()
    embedded.clear()
    third = open_gallery(folder, extractor, cache_root)
    assert warnings_of(caplog) == [] and count(embedded) == 0
    np.testing.assert_array_equal(third.features, second.features)
    assert no_temp_files(first.cache_dir)


def test_the_manifest_records_the_index_files_checksums(folder, cache_root, extractor):
    gallery = open_gallery(folder, extractor, cache_root)
    manifest = load_json(gallery.cache_dir / "manifest.json")
    assert sorted(manifest["files"]) == ["index.faiss", "knn.npz"]
    for name, record in manifest["files"].items():
        path = gallery.cache_dir / name
        assert record == {"bytes": path.stat().st_size, "sha256": storage.sha256_file(path)}
    assert (manifest["index_kind"], manifest["index_built"]) == ("auto", "flat")
    assert manifest["knn_depth"] == 12
    # features.npz vouches for itself (its checksum is verified by load_checked_npz)
    assert load_checked_npz(gallery.cache_dir / "features.npz")["features"].shape == (12, 1280)


def test_every_cache_file_arrives_by_an_atomic_rename(folder, cache_root, extractor,
                                                     monkeypatch):
    renamed: list[tuple[str, str]] = []
    original = os.replace

    def spy(source, destination):
        renamed.append((Path(source).name, Path(destination).name))
        return original(source, destination)

    monkeypatch.setattr(storage.os, "replace", spy)
    gallery = open_gallery(folder, extractor, cache_root)
    written = sorted(p.name for p in gallery.cache_dir.iterdir())
    assert written == ["features.npz", "index.faiss", "knn.npz", "manifest.json"]
    assert sorted({destination for _, destination in renamed}) == written
    assert all(source.startswith(f".{destination}.") and source.endswith(".tmp")
               for source, destination in renamed)


def test_an_interrupted_embedding_resumes_from_its_checkpoint(folder, cache_root, extractor,
                                                              monkeypatch, clean):
    """Chunks of 4 files, a checkpoint after each: a crash in the third chunk keeps the first
    eight files, and the next open embeds only the other seven."""
    from engine.search import gallery as gallery_module

    monkeypatch.setattr(extractor, "batch_size", 2)
    monkeypatch.setattr(gallery_module, "CHECKPOINT_BATCHES", 2)
    calls: list[int] = []
    original = extractor.embed_files

    def crashing(paths, progress=None):
        calls.append(len(paths))
        if len(calls) == 3:
            raise OSError("simulated crash in the third chunk")
        return original(paths, progress)

    monkeypatch.setattr(extractor, "embed_files", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        open_gallery(folder, extractor, cache_root, checkpoint_seconds=0)
    assert calls == [4, 4, 4]
    cache_dir = next((cache_root / "galleries").iterdir())
    saved = load_checked_npz(cache_dir / "features.npz")
    assert len(saved["files"]) + len(saved["skipped_files"]) == 8
    assert not (cache_dir / "manifest.json").exists() and no_temp_files(cache_dir)
    calls.clear()
    monkeypatch.setattr(extractor, "embed_files",
                        lambda paths, progress=None: calls.append(len(paths))
                        or original(paths, progress))
    resumed = open_gallery(folder, extractor, cache_root, checkpoint_seconds=0)
    assert calls == [4, 3]
    assert resumed.files == clean.files
    np.testing.assert_allclose(resumed.features, clean.features, atol=1e-5)
    np.testing.assert_array_equal(resumed.knn.indices, clean.knn.indices)


def test_without_checkpoint_time_elapsed_the_features_are_saved_once(folder, cache_root,
                                                                     extractor, monkeypatch):
    from engine.search import gallery as gallery_module

    monkeypatch.setattr(extractor, "batch_size", 2)
    monkeypatch.setattr(gallery_module, "CHECKPOINT_BATCHES", 2)
    saves: list[int] = []
    original = storage.atomic_save_checked_npz

    def spy(destination, **arrays):
        if Path(destination).name == "features.npz":
            saves.append(len(arrays["files"]))
        return original(destination, **arrays)

    monkeypatch.setattr(gallery_module, "atomic_save_checked_npz", spy)
    open_gallery(folder, extractor, cache_root, checkpoint_seconds=3600)
    assert saves == [12]


def test_stale_temporaries_of_a_killed_write_are_removed(folder, cache_root, extractor):
    first = open_gallery(folder, extractor, cache_root)
    stale = first.cache_dir / ".features.npz.k1ll3d.tmp"
    fresh = first.cache_dir / ".knn.npz.wr1t1ng.tmp"
    stale.write_bytes(b"half of a file")
    fresh.write_bytes(b"being written by another process")
    hours_ago = stale.stat().st_mtime - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    second = open_gallery(folder, extractor, cache_root)
    assert not stale.exists() and fresh.exists()
    np.testing.assert_array_equal(second.features, first.features)


# -- features shipped with a gallery -----------------------------------------------------------
def ship(folder: Path, extractor, tmp_path: Path) -> tuple[Gallery, Path]:
    """Embed the folder once (its own cache) and ship its features into it."""
    gallery = open_gallery(folder, extractor, tmp_path / "shipping-cache")
    return gallery, save_shipped_features(gallery)


def test_shipped_features_seed_a_fresh_cache_after_a_spot_check(folder, cache_root, extractor,
                                                                 embedded, tmp_path, caplog):
    shipped_gallery, path = ship(folder, extractor, tmp_path)
    assert path == shipped_features_path(folder.resolve(), extractor.meta.backbone)
    embedded.clear()
    for image in folder.rglob("*.jpg"):  # a fresh clone: same bytes, new modification times
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="engine.search.gallery"):
        gallery = open_gallery(folder, extractor, cache_root)
    good = len(shipped_gallery.files)
    # the spot check re-embeds SPOT_CHECKS good images; the bad files are tried as usual
    assert count(embedded) == SPOT_CHECKS + len(BAD_FILES)
    assert "took 12 features from" in caplog.text
    assert gallery.files == shipped_gallery.files and gallery.size == good == 12
    np.testing.assert_array_equal(gallery.features, shipped_gallery.features)


def test_a_changed_image_is_embedded_not_taken_from_the_shipped_file(folder, cache_root,
                                                                      extractor, embedded,
                                                                      tmp_path):
    ship(folder, extractor, tmp_path)
    changed = folder / "daffodil" / demo_image(1).name
    shutil.copy(demo_image(5), changed)  # same name, other picture
    embedded.clear()
    gallery = open_gallery(folder, extractor, cache_root)
    assert sum(call.count(changed.name) for call in embedded) == 1
    fresh = gallery.features[gallery.files.index(f"daffodil/{changed.name}")]
    np.testing.assert_allclose(fresh, extractor.embed([demo_image(5)])[0], atol=1e-5)


@pytest.mark.parametrize("damage", ["swapped rows", "another backbone", "edited bytes"])
def test_shipped_features_that_fail_a_check_are_not_used(folder, cache_root, extractor,
                                                         embedded, tmp_path, caplog, damage):
    gallery, path = ship(folder, extractor, tmp_path)
    stored = load_checked_npz(path)
    if damage == "swapped rows":  # checksummed, but not what the backbone computes now
        stored["features"] = np.roll(stored["features"], 1, axis=0)
        storage.atomic_save_checked_npz(path, **stored)
    elif damage == "another backbone":
        stored["meta_fingerprint"] = np.array("another backbone")
        storage.atomic_save_checked_npz(path, **stored)
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    embedded.clear()
    with caplog.at_level(logging.WARNING, logger="engine.search.gallery"):
        reopened = open_gallery(folder, extractor, cache_root)
    assert "not using the shipped features" in caplog.text
    assert count(embedded) >= gallery.size + len(BAD_FILES)
    np.testing.assert_allclose(reopened.features, gallery.features, atol=1e-5)


def test_the_demo_gallery_ships_checked_features_of_every_image(extractor):
    """The shipped demo features load, cover every demo image by name, size and sha256, and
    agree with the installed backbone on a few images."""
    demo = DEMO_IMAGES.parent
    stored = load_checked_npz(shipped_features_path(demo, extractor.meta.backbone))
    assert str(stored["meta_fingerprint"]) == extractor.meta.fingerprint
    files = stored["files"].tolist()
    assert files == sorted(p.relative_to(demo).as_posix() for p in DEMO_IMAGES.glob("*.jpg"))
    for row in (0, 700, len(files) - 1):
        image = demo / files[row]
        assert int(stored["sizes"][row]) == image.stat().st_size
        assert str(stored["sha256"][row]) == storage.sha256_file(image)
        fresh = extractor.embed([image])[0]
        assert float(fresh @ stored["features"][row]) >= SPOT_CHECK_COSINE


def test_a_knn_graph_cached_before_items_came_first_is_rebuilt(folder, cache_root, extractor,
                                                                embedded, caplog):
    """Graphs cached before every list began with its own item (ties went to the smaller
    index, so an exact duplicate could come first) are rebuilt, not used."""
    first = open_gallery(folder, extractor, cache_root)
    indices = load_checked_npz(first.cache_dir / "knn.npz")["indices"].copy()
    indices[3, [0, 1]] = indices[3, [1, 0]]
    resign(first.cache_dir, "knn.npz", indices=indices)
    embedded.clear()
    with caplog.at_level(logging.INFO, logger="engine.search.gallery"):
        second = open_gallery(folder, extractor, cache_root)
    assert "does not list every item first" in caplog.text
    assert count(embedded) == 0
    np.testing.assert_array_equal(second.knn.indices[:, 0], np.arange(second.size))


def test_a_scan_counts_what_opening_would_embed(folder, cache_root, extractor, embedded):
    before = scan_gallery(folder, extractor.meta, cache_root)
    assert (before.files, before.to_embed, before.features) == (15, 15, None)
    assert len(before.samples) == 3 and all(path.is_file() for path in before.samples)
    assert count(embedded) == 0  # a scan embeds nothing
    gallery = open_gallery(folder, extractor, cache_root)
    after = scan_gallery(folder, extractor.meta, cache_root)
    assert (after.files, after.to_embed, after.samples) == (15, 0, ())
    np.testing.assert_array_equal(after.features, gallery.features)
    shutil.copy(demo_image(241), folder / "daffodil" / "new.jpg")
    grown = scan_gallery(folder, extractor.meta, cache_root)
    assert (grown.files, grown.to_embed, grown.features) == (16, 1, None)


def test_a_cancelled_indexing_job_keeps_the_caches_and_a_retry_finishes(
        folder, cache_root, extractor, embedded, monkeypatch):
    """Cancelled between two checkpoints, an indexing job stops at its next progress report:
    the cache of the earlier open stays whole, the checkpoint keeps what was embedded before,
    and opening again embeds only the rest."""
    import contextlib

    from engine.core.jobs import CANCELLED, JobQueue

    first = open_gallery(folder, extractor, cache_root)
    cache_dir = first.cache_dir
    kept = {name: (cache_dir / name).read_bytes() for name in ("manifest.json", "index.faiss",
                                                               "knn.npz")}
    batch = 4
    monkeypatch.setattr(extractor, "batch_size", batch)
    (folder / "tulip").mkdir()
    for number in range(241, 265):  # 24 new images: 6 batches, a checkpoint after 4
        shutil.copy(demo_image(number), folder / "tulip" / demo_image(number).name)
    jobs, reports = JobQueue(budget=contextlib.nullcontext), []

    def index(progress):
        def report(fraction, message):
            reports.append(message)
            if len(reports) == CHECKPOINT_BATCHES + 1:  # a batch after the checkpoint
                jobs.cancel("index")
            progress(fraction, message)

        return open_gallery(folder, extractor, cache_root, progress=report,
                            checkpoint_seconds=0)

    job = jobs.submit("index", "Indexing flowers", index)
    embedded.clear()
    jobs.run_pending()
    assert job.state == CANCELLED and job.describe() == "Indexing flowers: cancelled"
    assert len(reports) == CHECKPOINT_BATCHES + 1 and count(embedded) == 24
    assert {name: (cache_dir / name).read_bytes() for name in kept} == kept
    checkpoint = load_checked_npz(cache_dir / "features.npz")
    assert len(checkpoint["files"]) == 12 + CHECKPOINT_BATCHES * batch
    assert no_temp_files(cache_dir)
    assert scan_gallery(folder, extractor.meta, cache_root).to_embed == 24 - 16
    embedded.clear()
    again = jobs.submit("index", "Indexing flowers", lambda progress: open_gallery(
        folder, extractor, cache_root, progress=progress))
    jobs.run_pending()
    assert again.state == "done" and again.result.size == 36 and count(embedded) == 8
    np.testing.assert_array_equal(again.result.features[:12], first.features)


# -- above the exact-graph size: the approximate graph and the index recall --------------------
def test_above_the_exact_graph_size_the_gallery_builds_and_reloads_an_approximate_graph(
        tmp_path, monkeypatch, caplog):
    """Above EXACT_GRAPH_MAX the graph is built through an index (never N x N): not canonical,
    with its recall measured, recorded in the manifest with the index's recall, and reloaded
    as it was without a rebuild."""
    from engine.core.knn import knn_graph
    from engine.search import gallery as gallery_module

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((12, 32))
    points = centres[rng.integers(0, 12, 900)] + 0.7 * rng.standard_normal((900, 32))
    features = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    np.savez(tmp_path / "items.npz", features=features)
    monkeypatch.setattr(gallery_module, "EXACT_GRAPH_MAX", 500)
    built = Gallery.open_features(tmp_path / "items.npz", cache_root=tmp_path / "cache",
                                  device="cpu", knn_depth=16, index_kind="ivf")
    assert built.knn.canonical is False and 0.5 < built.knn.recall <= 1.0
    assert built.index.kind == "ivf" and 0 < built.index.recall["recall@10"] <= 1.0
    manifest = load_json(built.cache_dir / "manifest.json")
    assert manifest["knn_canonical"] is False and manifest["knn_recall"] == built.knn.recall
    assert manifest["index_recall"] == built.index.recall and manifest["index_built"] == "ivf"
    exact = knn_graph(features, 16)
    np.testing.assert_array_equal(built.knn.indices[:, 0], np.arange(900))
    held = (built.knn.indices[:, :, None] == exact.indices[:, None, :]).any(axis=2).mean()
    assert held == pytest.approx(built.knn.recall, abs=0.05)  # the sample speaks for all rows
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(gallery_module, "approximate_knn_graph",
                        lambda *args, **kwargs: pytest.fail("rebuilt a cached graph"))
    again = Gallery.open_features(tmp_path / "items.npz", cache_root=tmp_path / "cache",
                                  device="cpu", knn_depth=16, index_kind="ivf")
    assert not any("building the index" in record.message for record in caplog.records)
    assert (again.knn.canonical, again.knn.recall) == (False, built.knn.recall)
    assert again.index.recall == built.index.recall
    np.testing.assert_array_equal(again.knn.indices, built.knn.indices)
    np.testing.assert_array_equal(again.knn.farthest, built.knn.farthest)


def test_a_flat_gallery_holds_its_features_once(tmp_path):
    """The flat index searches the gallery's feature array in place: its faiss index is
    empty, and the cached index file holds no vectors."""
    rng = np.random.default_rng(6)
    features = rng.standard_normal((400, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    np.save(tmp_path / "items.npy", features.astype(np.float16))
    gallery = Gallery.open_features(tmp_path / "items.npy", cache_root=tmp_path / "cache",
                                    device="cpu", knn_depth=8)
    assert gallery.knn.canonical and gallery.knn.recall is None
    assert gallery.index._cpu_index.ntotal == 0 and gallery.index._features is gallery.features
    assert (gallery.cache_dir / "index.faiss").stat().st_size < 200
    assert gallery.index.recall["recall@10"] == 1.0
    reopened = Gallery.open_features(tmp_path / "items.npy", cache_root=tmp_path / "cache",
                                     device="cpu", knn_depth=8)
    np.testing.assert_array_equal(reopened.search(features[:3], 5).indices,
                                  gallery.search(features[:3], 5).indices)


def test_a_shallower_request_keeps_the_cached_deeper_graph(tmp_path):
    """Opening with a shallower graph than the cache holds reads the cached one whole and
    leaves the manifest's depth alone: the next deep request rebuilds nothing."""
    rng = np.random.default_rng(7)
    features = rng.standard_normal((60, 8)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    np.save(tmp_path / "items.npy", features)

    def open_at(depth: int) -> Gallery:
        return Gallery.open_features(tmp_path / "items.npy", cache_root=tmp_path / "cache",
                                     device="cpu", knn_depth=depth)

    deep = open_at(20)
    written = (deep.cache_dir / "knn.npz").stat().st_mtime_ns
    shallow = open_at(6)
    assert shallow.knn.depth == 20
    np.testing.assert_array_equal(shallow.knn.indices, deep.knn.indices)
    assert json.loads((deep.cache_dir / "manifest.json").read_text())["knn_depth"] == 20
    assert open_at(20).knn.depth == 20
    assert (deep.cache_dir / "knn.npz").stat().st_mtime_ns == written  # nothing rebuilt
