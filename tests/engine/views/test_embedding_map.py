"""The embedding map on real demo features: layout quality, the cache, damage, threads, edges.

These tests import umap (numba compiles for ~15 s once per pytest process); one full fit on the
289 demo features is shared, the cache tests fit ~60 points.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from engine.errors import CacheError, InvalidInputError, MissingDependencyError
from engine.views.embedding_map import EmbeddingMap

umap = pytest.importorskip("umap")

REPO_ROOT = Path(__file__).resolve().parents[3]


def same_class_fraction(points: np.ndarray, labels: np.ndarray, reference: np.ndarray,
                        reference_labels: np.ndarray, k: int, exclude_self: bool) -> float:
    """Mean fraction of the k nearest 2-D reference points that share each point's class."""
    distances = ((points[:, None, :] - reference[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :k]
    return float((reference_labels[nearest] == labels[:, None]).mean())


@pytest.fixture
def fit_calls(monkeypatch) -> list[int]:
    """Spy on umap.UMAP.fit: the number of points of every fit."""
    calls: list[int] = []
    original = umap.UMAP.fit

    def spy(self, X, *args, **kwargs):
        calls.append(len(X))
        return original(self, X, *args, **kwargs)

    monkeypatch.setattr(umap.UMAP, "fit", spy)
    return calls


@pytest.fixture(scope="module")
def full_map(demo_features, tmp_path_factory) -> tuple[EmbeddingMap, Path]:
    """One map of all 289 demo features and its cache folder (do not damage: copy it)."""
    cache_dir = tmp_path_factory.mktemp("full_map")
    return EmbeddingMap.load_or_fit(demo_features.features, cache_dir, key="demo"), cache_dir


@pytest.fixture(scope="module")
def small_features(demo_features) -> np.ndarray:
    """Every 5th demo feature (58 rows over all classes): cheap fits for the cache tests."""
    return demo_features.features[::5]


def test_coordinates_are_finite_float32_rows(full_map, demo_features):
    embedding_map, _ = full_map
    assert embedding_map.name == "backbone" and embedding_map.key == "demo"
    assert embedding_map.coordinates.shape == (len(demo_features.labels), 2)
    assert embedding_map.coordinates.dtype == np.float32
    assert np.isfinite(embedding_map.coordinates).all()
    assert embedding_map.coordinates.std(axis=0).min() > 0.1  # not collapsed to a point


def test_layout_keeps_classes_together(full_map, demo_features):
    """Measured 0.86 (5 nearest 2-D neighbours of the same class; chance is 1/17 = 0.06)."""
    coordinates, labels = full_map[0].coordinates, demo_features.labels
    agreement = same_class_fraction(coordinates, labels, coordinates, labels, k=5,
                                    exclude_self=True)
    assert agreement > 0.75


def test_reload_from_cache_does_not_refit(full_map, demo_features, monkeypatch):
    embedding_map, cache_dir = full_map

    def refuse(*args, **kwargs):
        raise AssertionError("the cached map was refitted")

    monkeypatch.setattr(umap.UMAP, "fit", refuse)
    monkeypatch.setattr(umap.UMAP, "fit_transform", refuse)
    reloaded = EmbeddingMap.load_or_fit(demo_features.features, cache_dir, key="demo")
    np.testing.assert_array_equal(reloaded.coordinates, embedding_map.coordinates)
    loaded = EmbeddingMap.load(cache_dir, "backbone", "demo")
    assert loaded is not None
    np.testing.assert_array_equal(loaded.coordinates, embedding_map.coordinates)
    # the model file serves transform of a reloaded map without a fit
    np.testing.assert_array_equal(loaded.transform(demo_features.features[:3]),
                                  embedding_map.transform(demo_features.features[:3]))


def test_load_returns_none_for_missing_or_other_key(full_map, tmp_path):
    _, cache_dir = full_map
    assert EmbeddingMap.load(tmp_path, "backbone", "demo") is None
    assert EmbeddingMap.load(cache_dir, "sgrr", "demo") is None
    assert EmbeddingMap.load(cache_dir, "backbone", "another gallery") is None


def test_other_key_or_parameters_refit(small_features, tmp_path, fit_calls):
    first = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    assert len(fit_calls) == 1
    EmbeddingMap.load_or_fit(small_features, tmp_path, key="b")
    assert len(fit_calls) == 2
    assert EmbeddingMap.load(tmp_path, "backbone", "a") is None  # overwritten by key "b"
    EmbeddingMap.load_or_fit(small_features, tmp_path, key="b", n_neighbors=5)
    assert len(fit_calls) == 3
    same_seed = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    np.testing.assert_array_equal(same_seed.coordinates, first.coordinates)  # deterministic


def test_damaged_npz_refits_with_a_warning(small_features, tmp_path, fit_calls, caplog):
    EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    (tmp_path / "maps" / "backbone.npz").write_bytes(b"\x00garbage, not a zip archive" * 10)
    with caplog.at_level(logging.WARNING, logger="engine.views.embedding_map"):
        assert EmbeddingMap.load(tmp_path, "backbone", "a") is None
        refitted = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    assert len(fit_calls) == 2
    assert "ignoring the embedding map" in caplog.text
    assert refitted.coordinates.shape == (len(small_features), 2)
    assert EmbeddingMap.load(tmp_path, "backbone", "a") is not None  # repaired


@pytest.mark.parametrize("damage", ["garbage", "other model"])
def test_damaged_model_refits_on_transform(small_features, tmp_path, fit_calls, caplog, damage):
    fitted = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    expected = fitted.transform(small_features[:4])
    model_path = tmp_path / "maps" / "backbone.umap.pkl"
    if damage == "garbage":
        model_path.write_bytes(b"\x80\x05not a pickle at all")
    else:  # a readable model of other points: it must not serve these coordinates
        other = EmbeddingMap.load_or_fit(small_features[:20], tmp_path / "other", key="a")
        shutil.copy(tmp_path / "other" / "maps" / "backbone.umap.pkl", model_path)
        assert other.coordinates.shape == (20, 2)
    reloaded = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    fits_before = len(fit_calls)
    with caplog.at_level(logging.WARNING, logger="engine.views.embedding_map"):
        projected = reloaded.transform(small_features[:4])
    assert len(fit_calls) == fits_before + 1 and "refitting the embedding map" in caplog.text
    np.testing.assert_allclose(projected, expected, atol=1e-4)  # same seed, same layout
    np.testing.assert_array_equal(reloaded.coordinates, fitted.coordinates)


def test_damaged_model_without_features_raises_cache_error(small_features, tmp_path):
    EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    (tmp_path / "maps" / "backbone.umap.pkl").write_bytes(b"")
    loaded = EmbeddingMap.load(tmp_path, "backbone", "a")
    assert loaded is not None  # the coordinates are still fine
    with pytest.raises(CacheError, match="load_or_fit"):
        loaded.transform(small_features[0])


def test_held_out_points_land_near_their_class(demo_features, tmp_path):
    """Measured 0.70 (0.68-0.75 over seeds 0-3): the fraction of the 5 nearest 2-D gallery
    points of a held-out point that share its class; chance is 1/17 = 0.06."""
    features, labels = demo_features.features, demo_features.labels
    held_out = np.arange(len(labels)) % 4 == 0
    fitted = EmbeddingMap.load_or_fit(features[~held_out], tmp_path, key="three quarters")
    projected = fitted.transform(features[held_out])
    assert projected.shape == (held_out.sum(), 2) and projected.dtype == np.float32
    agreement = same_class_fraction(projected, labels[held_out], fitted.coordinates,
                                    labels[~held_out], k=5, exclude_self=False)
    assert agreement > 0.55


def test_max_points_fits_a_sample_and_transforms_the_rest(small_features, tmp_path, fit_calls):
    progress: list[tuple[float, str]] = []
    fitted = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a", max_points=40,
                                      progress=lambda fraction, text: progress.append(
                                          (fraction, text)))
    assert fit_calls == [40]
    assert fitted.coordinates.shape == (len(small_features), 2)
    assert np.isfinite(fitted.coordinates).all()
    rest = np.setdiff1d(np.arange(len(small_features)), fitted.sample_rows)
    assert fitted.sample_rows.size == 40 and rest.size == len(small_features) - 40
    np.testing.assert_allclose(fitted.coordinates[rest], fitted.transform(small_features[rest]),
                               atol=1e-4)
    assert progress[0] == (0.0, "fitting the embedding map (UMAP) ...")
    assert progress[-1][0] == 1.0
    assert all(0.0 <= fraction <= 1.0 for fraction, _ in progress)


def test_concurrent_transforms_equal_sequential(full_map, demo_features):
    embedding_map, cache_dir = full_map
    fresh = EmbeddingMap.load(cache_dir, "backbone", "demo")  # model loads lazily, in a thread
    batches = [demo_features.features[i::4][:10] for i in range(4)]
    expected = [embedding_map.transform(batch) for batch in batches]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(position: int) -> None:
        try:
            results[position] = fresh.transform(batches[position])
        except BaseException as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 4
    for position in range(4):
        np.testing.assert_array_equal(results[position], expected[position])


def test_warm_up_then_transform_single_vector(full_map, demo_features):
    _, cache_dir = full_map
    loaded = EmbeddingMap.load(cache_dir, "backbone", "demo")
    loaded.warm_up()
    single = loaded.transform(demo_features.features[7])
    assert single.shape == (1, 2) and single.dtype == np.float32
    np.testing.assert_array_equal(single, loaded.transform(demo_features.features[7:8]))


def test_tiny_gallery_of_eight(demo_features, tmp_path):
    features = demo_features.features[::36][:8]
    fitted = EmbeddingMap.load_or_fit(features, tmp_path, key="tiny")
    assert fitted.coordinates.shape == (8, 2) and np.isfinite(fitted.coordinates).all()
    assert fitted.parameters["n_neighbors"] == 7 and fitted.parameters["init"] == "random"
    assert np.isfinite(fitted.transform(demo_features.features[1])).all()


def test_three_points_is_the_minimum(demo_features, tmp_path):
    fitted = EmbeddingMap.load_or_fit(demo_features.features[:3], tmp_path, key="three")
    assert fitted.coordinates.shape == (3, 2) and np.isfinite(fitted.coordinates).all()
    with pytest.raises(InvalidInputError, match="at least 3 images"):
        EmbeddingMap.load_or_fit(demo_features.features[:2], tmp_path, key="two")


@pytest.mark.parametrize("features, message", [
    (np.zeros((4, 3, 2), np.float32), "2-D"),
    (np.array([[0.0, 1.0]] * 4 + [[np.nan, 0.0]], np.float32), "NaN"),
    (np.array([["a", "b"]] * 4), "numeric"),
])
def test_invalid_features_raise(features, message, tmp_path):
    with pytest.raises(InvalidInputError, match=message):
        EmbeddingMap.load_or_fit(features, tmp_path)


@pytest.mark.parametrize("options", [{"name": "../escape"}, {"n_neighbors": 1},
                                     {"min_dist": -1.0}, {"max_points": 2}])
def test_invalid_options_raise(options, small_features, tmp_path):
    with pytest.raises(InvalidInputError):
        EmbeddingMap.load_or_fit(small_features, tmp_path, **options)


def test_transform_checks_width_and_values(full_map, demo_features):
    embedding_map, _ = full_map
    with pytest.raises(InvalidInputError, match="1280"):
        embedding_map.transform(np.ones((2, 64), np.float32))
    bad = demo_features.features[:2].copy()
    bad[1, 5] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        embedding_map.transform(bad)


def test_missing_umap_says_what_to_install(small_features, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    with pytest.raises(MissingDependencyError, match="pip install umap-learn"):
        EmbeddingMap.load_or_fit(small_features, tmp_path)


def test_import_does_not_import_umap():
    code = "import engine.views.embedding_map, sys; assert 'umap' not in sys.modules"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


def test_a_tampered_model_is_refused_before_it_is_unpickled(small_features, tmp_path,
                                                            fit_calls, monkeypatch, caplog):
    """The pickle's sha256 is recorded in its manifest when written; a file that does not match
    is never unpickled (unpickling runs code): a map from `load` raises CacheError, one from
    `load_or_fit` refits."""
    import pickle

    import engine.views.embedding_map as embedding_map_module

    fitted = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    expected = fitted.transform(small_features[:4])
    manifest = tmp_path / "maps" / "backbone.umap.json"
    assert manifest.is_file()
    (tmp_path / "maps" / "backbone.umap.pkl").write_bytes(pickle.dumps({"not": "the model"}))
    unpickled: list[object] = []
    original = pickle.loads
    monkeypatch.setattr(embedding_map_module.pickle, "loads",
                        lambda data: unpickled.append(data) or original(data))
    loaded = EmbeddingMap.load(tmp_path, "backbone", "a")
    assert loaded is not None
    with pytest.raises(CacheError, match="does not match the size and sha256"):
        loaded.transform(small_features[0])
    reloaded = EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    fits_before = len(fit_calls)
    with caplog.at_level(logging.WARNING, logger="engine.views.embedding_map"):
        projected = reloaded.transform(small_features[:4])
    assert unpickled == []
    assert len(fit_calls) == fits_before + 1 and "refitting the embedding map" in caplog.text
    np.testing.assert_allclose(projected, expected, atol=1e-4)
    # the refit wrote a model its manifest vouches for: a fresh map unpickles it, no refit
    again = EmbeddingMap.load(tmp_path, "backbone", "a")
    again.transform(small_features[:2])
    assert len(unpickled) == 1 and len(fit_calls) == fits_before + 1


def test_a_model_without_its_manifest_is_not_unpickled(small_features, tmp_path):
    EmbeddingMap.load_or_fit(small_features, tmp_path, key="a")
    (tmp_path / "maps" / "backbone.umap.json").unlink()
    loaded = EmbeddingMap.load(tmp_path, "backbone", "a")
    with pytest.raises(CacheError, match="no saved"):
        loaded.transform(small_features[0])
