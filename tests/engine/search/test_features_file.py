"""Galleries opened from a features file: formats, checks with their messages, the cache keyed
on the file's content, float16 memory-mapped, pickles refused unread."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidInputError, UnsafePathError
from engine.search import features_file
from engine.search.features_file import PICKLE_REFUSAL, load_features_file
from engine.search.gallery import Gallery

CLUSTERS, PER_CLUSTER, DIM = 3, 10, 16


def clustered(dtype: type = np.float32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(30, 16) unit rows in 3 tight clusters (rows 0-9, 10-19, 20-29) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, DIM))
    rows = np.concatenate([centre + 0.05 * rng.normal(size=(PER_CLUSTER, DIM))
                           for centre in centres])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(dtype), np.repeat(np.arange(CLUSTERS), PER_CLUSTER)


def open_gallery(path: Path, tmp_path: Path, **options) -> Gallery:
    return Gallery.open_features(path, cache_root=tmp_path / "cache", device="cpu", **options)


def cache_snapshot(tmp_path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted((tmp_path / "cache").rglob("*"))
            if p.is_file()}


def check_clusters(gallery: Gallery) -> None:
    """Every item's 10 nearest (itself first) are its own cluster."""
    queries = np.asarray(gallery.features, np.float32)
    result = gallery.search(queries, PER_CLUSTER)
    assert (result.indices[:, 0] == np.arange(gallery.size)).all()
    assert (result.indices // PER_CLUSTER == np.arange(gallery.size)[:, None] // PER_CLUSTER
            ).all()
    assert (np.diff(result.distances, axis=1) >= -1e-6).all()


def test_npz_with_names_labels_and_classes_opens_and_ranks(tmp_path: Path) -> None:
    features, labels = clustered()
    names = [f"img_{row}.jpg" for row in range(len(features))]
    path = tmp_path / "feats.npz"
    np.savez(path, features=features, labels=labels, names=np.array(names),
             class_names=np.array(["a", "b", "c"]))
    gallery = open_gallery(path, tmp_path)
    assert gallery.files == names and gallery.class_names == ["a", "b", "c"]
    assert gallery.class_of(12) == "b" and gallery.meta.backbone == "features file feats.npz"
    assert gallery.meta.dim == DIM and gallery.source == path.resolve()
    assert not gallery.has_images and not gallery.path_of(0).exists()
    check_clusters(gallery)
    assert gallery.knn.indices[5, 0] == 5


def test_npy_float16_round_trip_is_memory_mapped(tmp_path: Path) -> None:
    features, _ = clustered(np.float16)
    path = tmp_path / "half.npy"
    np.save(path, features)
    loaded = load_features_file(path)
    assert loaded.memory_mapped and isinstance(loaded.features, np.memmap)
    assert loaded.features.dtype == np.float16
    np.testing.assert_array_equal(np.asarray(loaded.features), features)
    assert loaded.names[0] == "item-00" and loaded.labels is None
    gallery = open_gallery(path, tmp_path)
    assert gallery.features.dtype == np.float16
    check_clusters(gallery)


def test_a_float16_store_gives_every_method_one_float32_copy(tmp_path: Path) -> None:
    """The re-rankers of a float16 gallery share one float32 conversion of it (each would
    otherwise convert its own), equal to the stored values; the store stays float16."""
    from engine.rerank import create_reranker

    features, _ = clustered(np.float16)
    path = tmp_path / "half.npy"
    np.save(path, features)
    gallery = open_gallery(path, tmp_path)
    first, second = (create_reranker(name, device="cpu").fit(gallery.context())
                     for name in ("k_reciprocal", "icfrr"))
    assert first.gallery.features.dtype == np.float32
    assert np.shares_memory(first.gallery.features, second.gallery.features)
    assert gallery.context().features is gallery.method_features
    np.testing.assert_array_equal(gallery.method_features, features.astype(np.float32))
    assert gallery.features.dtype == np.float16


def test_compressed_npz_float16_is_read_into_memory(tmp_path: Path) -> None:
    features, labels = clustered(np.float16)
    path = tmp_path / "half.npz"
    np.savez_compressed(path, features=features, labels=labels)
    loaded = load_features_file(path)
    assert not loaded.memory_mapped and loaded.features.dtype == np.float16
    np.testing.assert_array_equal(loaded.features, features)
    assert loaded.class_names == ["0", "1", "2"]
    check_clusters(open_gallery(path, tmp_path))


def test_safetensors_with_sidecar(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    features, labels = clustered()
    path = tmp_path / "feats.safetensors"
    save_file({"features": features, "labels": labels.astype(np.int64)}, str(path))
    names = [f"x{row}" for row in range(len(features))]
    path.with_suffix(".json").write_text(json.dumps({"names": names,
                                                     "class_names": ["p", "q", "r"]}))
    loaded = load_features_file(path)
    assert loaded.memory_mapped and loaded.names == names
    assert loaded.class_names == ["p", "q", "r"]
    np.testing.assert_array_equal(np.asarray(loaded.features), features)
    np.testing.assert_array_equal(loaded.labels, labels)
    check_clusters(open_gallery(path, tmp_path))


def test_names_labels_and_images_given_by_the_caller(tmp_path: Path) -> None:
    features, labels = clustered()
    path = tmp_path / "feats.npy"
    np.save(path, features)
    images = tmp_path / "images"
    images.mkdir()
    names = [f"{row}.jpg" for row in range(len(features))]
    gallery = open_gallery(path, tmp_path, names=names, labels=labels, images=images)
    assert gallery.root == images.resolve() and gallery.path_of(3) == images.resolve() / "3.jpg"
    assert gallery.has_images and gallery.class_names == ["0", "1", "2"]
    with pytest.raises(UnsafePathError, match="relative to the image folder"):
        open_gallery(path, tmp_path, names=["../x", *names[1:]], images=images)


def test_cosine_rows_are_normalised_with_a_warning_or_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    features, _ = clustered()
    path = tmp_path / "scaled.npy"
    np.save(path, features * 3)
    with pytest.raises(InvalidInputError, match=r"30 rows .* not unit-norm .*row 0, norm 3"):
        load_features_file(path, normalize="refuse")
    with caplog.at_level(logging.WARNING, logger="engine.search.features_file"):
        loaded = load_features_file(path)
    assert "normalised them" in caplog.text and loaded.normalised == 30
    np.testing.assert_allclose(loaded.features, features, atol=1e-6)
    check_clusters(open_gallery(path, tmp_path))


def test_euclidean_is_accepted_only_on_unit_rows(tmp_path: Path) -> None:
    features, _ = clustered()
    np.save(tmp_path / "unit.npy", features)
    np.save(tmp_path / "scaled.npy", features * 2)
    assert load_features_file(tmp_path / "unit.npy", metric="euclidean").metric == "euclidean"
    with pytest.raises(InvalidInputError, match=r"Euclidean distances .* not supported yet"):
        load_features_file(tmp_path / "scaled.npy", metric="euclidean")
    with pytest.raises(InvalidInputError, match="metric must be one of"):
        load_features_file(tmp_path / "unit.npy", metric="manhattan")


def test_a_changed_file_rebuilds_the_index(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    features, _ = clustered()
    path = tmp_path / "feats.npy"
    np.save(path, features)
    first = open_gallery(path, tmp_path)
    with caplog.at_level(logging.INFO, logger="engine.search.gallery"):
        again = open_gallery(path, tmp_path)
    assert again.fingerprint == first.fingerprint and "building the index" not in caplog.text
    np.save(path, clustered(seed=1)[0])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.search.gallery"):
        changed = open_gallery(path, tmp_path)
    assert changed.fingerprint != first.fingerprint and "building the index" in caplog.text
    assert changed.meta.fingerprint != first.meta.fingerprint
    assert changed.cache_dir == first.cache_dir
    check_clusters(changed)


def _bad_nan(path: Path) -> None:
    features, _ = clustered()
    features[[4, 7]] = np.nan
    features[9, 2] = np.inf
    np.save(path.with_suffix(".npy"), features)


BAD_INPUTS = {
    "three rows of NaN or inf": (
        _bad_nan, {}, r"3 rows with NaN or infinite values \(the first is row 4\)"),
    "a 1-D array": (lambda p: np.save(p.with_suffix(".npy"), np.ones(5, np.float32)), {},
                    r"2-D \(N, d\) array, got shape \(5,\)"),
    "no rows": (lambda p: np.save(p.with_suffix(".npy"), np.ones((0, 4), np.float32)), {},
                "is empty"),
    "no dimension": (lambda p: np.save(p.with_suffix(".npy"), np.ones((3, 0), np.float32)), {},
                     "is empty"),
    "float64": (lambda p: np.save(p.with_suffix(".npy"), clustered()[0].astype(np.float64)),
                {}, "must be float16 or float32"),
    "too few names": (lambda p: np.savez(p.with_suffix(".npz"), features=clustered()[0],
                                         names=np.array(["a", "b"])), {}, "2 names for 30 rows"),
    "duplicate names": (lambda p: np.save(p.with_suffix(".npy"), clustered()[0]),
                        {"names": ["same"] * 30}, "given to two items"),
    "labels out of range": (
        lambda p: np.savez(p.with_suffix(".npz"), features=clustered()[0],
                           labels=np.full(30, 3), class_names=np.array(["a", "b", "c"])), {},
        r"labels must be in \[-1, 3\).*row 0 has 3"),
    "float labels": (lambda p: np.savez(p.with_suffix(".npz"), features=clustered()[0],
                                        labels=np.zeros(30)), {}, "labels must be integers"),
    "too few labels": (lambda p: np.save(p.with_suffix(".npy"), clustered()[0]),
                       {"labels": [0, 1]}, "one int per row"),
    "no features array": (lambda p: np.savez(p.with_suffix(".npz"), feats=clustered()[0]), {},
                          "no array named 'features'"),
    "a zero row": (lambda p: np.save(p.with_suffix(".npy"),
                                     np.concatenate([clustered()[0] * 2,
                                                     np.zeros((1, DIM), np.float32)])),
                   {}, "row 30 is all zeros"),
    "not a numpy file": (lambda p: p.with_suffix(".npy").write_bytes(b"hello"), {},
                         "not a readable .npy file"),
    "an unknown format": (lambda p: p.with_suffix(".txt").write_text("1 2 3"), {},
                          "must be one of .npy, .npz, .safetensors"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_and_leaves_the_cache_intact(case: str, tmp_path: Path) -> None:
    make, options, message = BAD_INPUTS[case]
    good = tmp_path / "good.npy"
    np.save(good, clustered()[0])
    open_gallery(good, tmp_path)
    before = cache_snapshot(tmp_path)
    make(tmp_path / "bad")
    bad = next(p for p in tmp_path.iterdir() if p.stem == "bad")
    with pytest.raises(InvalidInputError, match=message):
        open_gallery(bad, tmp_path, **options)
    if bad.suffix == good.suffix:  # the cached gallery's file, now bad: its cache is kept
        bad.replace(good)
        with pytest.raises(InvalidInputError, match=message):
            open_gallery(good, tmp_path, **options)
    assert cache_snapshot(tmp_path) == before


class Exploding:
    """Unpickling it would raise: proof that a refused file was never unpickled."""

    def __reduce__(self):
        return (_explode, ())


def _explode() -> None:
    raise AssertionError("the file was unpickled")


def test_pickle_bearing_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    objects = np.empty((2, 2), dtype=object)
    objects[:] = Exploding()
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "objects.npz", features=clustered()[0],
             names=np.array([Exploding()] * 30, dtype=object))
    (tmp_path / "raw.npz").write_bytes(pickle.dumps(Exploding()))
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(Exploding()))
    for name in ("objects.npy", "objects.npz", "raw.npz", "raw.npy"):
        with pytest.raises(InvalidInputError, match=r"Python objects \(a pickle\), which is "
                                                    "never loaded"):
            load_features_file(tmp_path / name)
    assert PICKLE_REFUSAL in "holds Python objects (a pickle), which is never loaded"


def test_too_big_for_memory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "feats.npz"
    np.savez(path, features=clustered()[0])
    monkeypatch.setattr(features_file, "available_memory", lambda: 1000)
    with pytest.raises(InvalidInputError, match=r"cannot be memory-mapped: save them .* \.npy"):
        load_features_file(path)
    np.save(tmp_path / "feats.npy", clustered()[0])
    with pytest.raises(InvalidInputError, match="memory-mapped, but its search index needs"):
        load_features_file(tmp_path / "feats.npy")
