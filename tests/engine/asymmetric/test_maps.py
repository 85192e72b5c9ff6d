"""SSP's closed-form baselines as query models (`engine.asymmetric.maps`): the maps against
independent oracles (scipy's orthogonal Procrustes; ridge as least squares on an augmented
system, its penalty picked by the same cross-validation), saving and loading, and a damaged
state refitted without touching the other states beside it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from engine.asymmetric.heads import RIDGE_ALPHAS, RIDGE_FOLDS
from engine.asymmetric.maps import (
    MappedQueryModel,
    estimate_fit_seconds,
    fit_or_load_map,
    saved_map_path,
)
from engine.core.state import MissingStateError
from engine.errors import CacheError, InvalidInputError
from tests.engine.asymmetric.ssp_data import fake_gallery_meta, tiny_images, unit_rows

D_IN, D_OUT = 24, 16


def pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit query rows and unit targets that are a noisy linear image of them."""
    queries = unit_rows(n, D_IN, seed)
    mixing = np.random.default_rng(seed + 1).standard_normal((D_IN, D_OUT))
    targets = queries @ mixing + 0.3 * np.random.default_rng(seed + 2).standard_normal(
        (n, D_OUT))
    return queries, (targets / np.linalg.norm(targets, axis=1, keepdims=True)).astype(
        np.float32)


def metas(d_in: int = D_IN, d_out: int = D_OUT):
    return fake_gallery_meta("fake-query", d_in), fake_gallery_meta("fake-gallery", d_out)


def ridge_oracle(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised intercept as plain least squares: centre both sides, stack
    sqrt(alpha) I under x (zeros under y), solve with lstsq; the intercept restores the means."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    x_mean, y_mean = x64.mean(axis=0), y64.mean(axis=0)
    augmented_x = np.vstack([x64 - x_mean, np.sqrt(alpha) * np.eye(x.shape[1])])
    augmented_y = np.vstack([y64 - y_mean, np.zeros((x.shape[1], y.shape[1]))])
    weights = np.linalg.lstsq(augmented_x, augmented_y, rcond=None)[0]
    return weights, y_mean - x_mean @ weights


def cross_validated_alpha(x: np.ndarray, y: np.ndarray) -> float:
    """The grid's penalty with the least held-out squared error over the same folds as the
    engine's (a seeded permutation split in RIDGE_FOLDS), each fold's map from the oracle."""
    order = np.random.default_rng(0).permutation(len(x))
    errors = []
    for alpha in RIDGE_ALPHAS:
        total = 0.0
        for fold in np.array_split(order, RIDGE_FOLDS):
            keep = np.setdiff1d(order, fold)
            weights, bias = ridge_oracle(x[keep], y[keep], alpha)
            total += float(((x[fold] @ weights + bias - y[fold]) ** 2).sum())
        errors.append(total)
    return RIDGE_ALPHAS[int(np.argmin(errors))]


def test_procrustes_is_scipys_orthogonal_map():
    """Square (lite0 and lite2 are both 1280-d): an orthogonal matrix, scipy's solution."""
    queries, targets = pairs(200)
    targets_square = np.hstack([targets, unit_rows(200, D_IN - D_OUT, 9)])
    model = MappedQueryModel.fit("procrustes", queries, targets_square, *metas(D_IN, D_IN))
    oracle, _ = orthogonal_procrustes(queries.astype(np.float64), targets_square)
    np.testing.assert_allclose(model.weights, oracle, atol=1e-5)
    np.testing.assert_allclose(model.weights.T @ model.weights, np.eye(D_IN), atol=1e-5)
    np.testing.assert_allclose(model.weights @ model.weights.T, np.eye(D_IN), atol=1e-5)
    assert not model.bias.any() and model.alpha is None and model.n_training == 200
    # a rotation keeps every inner product among the queries
    mapped = model.map(queries[:5])
    np.testing.assert_allclose(mapped @ mapped.T, queries[:5] @ queries[:5].T, atol=1e-5)


def test_procrustes_into_a_smaller_space_has_orthonormal_columns():
    queries, targets = pairs(60)
    model = MappedQueryModel.fit("procrustes", queries, targets, *metas())
    # targets padded with zero columns: the first columns of that orthogonal solution
    padded = np.hstack([targets, np.zeros((60, D_IN - D_OUT), np.float32)])
    oracle = orthogonal_procrustes(queries.astype(np.float64), padded)[0][:, :D_OUT]
    np.testing.assert_allclose(model.weights, oracle, atol=1e-5)
    np.testing.assert_allclose(model.weights.T @ model.weights, np.eye(D_OUT), atol=1e-5)


@pytest.mark.parametrize("n", [200, 12])  # the primal and the dual (n < d) form
def test_ridge_is_least_squares_on_the_augmented_system_at_the_cross_validated_penalty(n):
    queries, targets = pairs(n, seed=n)
    model = MappedQueryModel.fit("ridge", queries, targets, *metas())
    assert model.alpha == cross_validated_alpha(queries, targets)
    weights, bias = ridge_oracle(queries, targets, model.alpha)
    np.testing.assert_allclose(model.weights, weights, atol=1e-4)
    np.testing.assert_allclose(model.bias, bias, atol=1e-4)
    mapped = model.map(queries)
    expected = queries @ weights + bias
    np.testing.assert_allclose(mapped, expected / np.linalg.norm(expected, axis=1,
                                                                 keepdims=True), atol=1e-4)
    assert model.shown_params == {"map": "ridge", "alpha": model.alpha}


def test_the_pairs_are_checked():
    queries, targets = pairs(20)
    with pytest.raises(InvalidInputError, match="same images on both sides"):
        MappedQueryModel.fit("ridge", queries, targets[:10], *metas())
    with pytest.raises(InvalidInputError, match="dimensions"):
        MappedQueryModel.fit("ridge", queries[:, :5], targets, *metas())
    with pytest.raises(InvalidInputError, match="no closed-form query map 'lasso'"):
        MappedQueryModel.fit("lasso", queries, targets, *metas())
    with pytest.raises(InvalidInputError, match="no query backbone"):
        MappedQueryModel.fit("ridge", queries, targets, *metas()).embed(tiny_images(1))


def test_a_saved_map_is_loaded_instead_of_refitted(tmp_path):
    queries, targets = pairs(50)
    query_meta, gallery_meta = metas()
    fitted = fit_or_load_map("ridge", queries, targets, tmp_path, query_meta=query_meta,
                             gallery_meta=gallery_meta)
    assert not fitted.loaded
    path = saved_map_path("ridge", queries, targets, tmp_path, query_meta, gallery_meta)
    assert path.parent == tmp_path / "query-maps" and path.name.startswith("ridge-")
    loaded = fit_or_load_map("ridge", queries, targets, tmp_path, query_meta=query_meta,
                             gallery_meta=gallery_meta)
    assert loaded.loaded and loaded.fingerprint == fitted.fingerprint
    assert loaded.alpha == fitted.alpha and loaded.n_training == 50
    np.testing.assert_array_equal(loaded.weights, fitted.weights)
    np.testing.assert_array_equal(loaded.map(queries), fitted.map(queries))
    # other training pairs, another kind: other files, each fitted
    other = fit_or_load_map("ridge", queries[:40], targets[:40], tmp_path,
                            query_meta=query_meta, gallery_meta=gallery_meta)
    rotation = fit_or_load_map("procrustes", queries, targets, tmp_path, query_meta=query_meta,
                               gallery_meta=gallery_meta)
    assert not other.loaded and not rotation.loaded
    assert len(list((tmp_path / "query-maps").glob("*.json"))) == 3
    with pytest.raises(MissingStateError):
        MappedQueryModel.load(tmp_path / "query-maps" / "ridge-none", kind="ridge",
                              query_meta=query_meta, gallery_meta=gallery_meta,
                              training_fingerprint="none")


def test_a_loaded_map_embeds_images_as_the_fitted_one(tmp_path, extractor):
    """Real lite0 queries: the saved map gives the same features after loading."""
    images = tiny_images(6)
    features = extractor.embed(images)
    targets = unit_rows(6, 32, seed=4)
    gallery_meta = fake_gallery_meta("fake-gallery", 32)
    fitted = fit_or_load_map("procrustes", features, targets, tmp_path,
                             query_meta=extractor.meta, gallery_meta=gallery_meta,
                             extractor=extractor)
    loaded = fit_or_load_map("procrustes", features, targets, tmp_path,
                             query_meta=extractor.meta, gallery_meta=gallery_meta,
                             extractor=extractor)
    assert loaded.loaded
    embedded = loaded.embed(images[:3])
    np.testing.assert_allclose(embedded, fitted.embed(images[:3]), atol=1e-6)
    np.testing.assert_allclose(embedded, fitted.map(features[:3]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("damage", ["weights", "manifest", "shape"])
def test_a_damaged_map_says_why_and_is_refitted_leaving_other_states(tmp_path, caplog, damage):
    queries, targets = pairs(40)
    query_meta, gallery_meta = metas()
    fit_or_load_map("procrustes", queries, targets, tmp_path, query_meta=query_meta,
                    gallery_meta=gallery_meta)
    fitted = fit_or_load_map("ridge", queries, targets, tmp_path, query_meta=query_meta,
                             gallery_meta=gallery_meta)
    neighbour = tmp_path / "ssp" / "model.json"  # SSP's state lives in the same folder
    neighbour.parent.mkdir()
    neighbour.write_text('{"kind": "ssp"}')
    others = {path: path.read_bytes() for path in tmp_path.rglob("*")
              if path.is_file() and "ridge-" not in path.name}
    path = saved_map_path("ridge", queries, targets, tmp_path, query_meta, gallery_meta)
    if damage == "weights":
        path.with_name(path.name + ".safetensors").write_bytes(b"not a tensor file")
        reason = "does not match its checksum"
    elif damage == "manifest":
        path.with_name(path.name + ".json").write_text("{")
        reason = "is unreadable"
    else:  # a consistent state of the wrong shape (written by hand)
        MappedQueryModel("ridge", np.zeros((D_IN, 3), np.float32), np.zeros(3, np.float32),
                         query_meta, gallery_meta, fitted.training_fingerprint).save(path)
        reason = r"shape \(24, 3\)"
    with pytest.raises(CacheError, match=f"saved ridge query map {path.name} is unusable"
                                         f" .*{reason}"):
        MappedQueryModel.load(path, kind="ridge", query_meta=query_meta,
                              gallery_meta=gallery_meta,
                              training_fingerprint=fitted.training_fingerprint)
    with caplog.at_level(logging.WARNING, logger="engine.asymmetric.maps"):
        refitted = fit_or_load_map("ridge", queries, targets, tmp_path, query_meta=query_meta,
                                   gallery_meta=gallery_meta)
    assert not refitted.loaded and "refitting" in caplog.text
    np.testing.assert_array_equal(refitted.weights, fitted.weights)
    assert fit_or_load_map("ridge", queries, targets, tmp_path, query_meta=query_meta,
                           gallery_meta=gallery_meta).loaded
    assert {path: path.read_bytes() for path in others} == others


def test_the_fit_estimate_is_short_and_positive():
    seconds = estimate_fit_seconds("ridge", 500, 64, 64)
    assert 0 < seconds < 30
    assert 0 < estimate_fit_seconds("procrustes", 10, 64, 64) < 30
