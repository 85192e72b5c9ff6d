"""SSP's saved state: fit_or_load saves the trained modules and the anchors and reloads the same
model; a state made from another gallery model, other images or another query backbone, or a
damaged one, is refused and retrained; random-init trunks save the whole network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.asymmetric.config import SSPConfig
from engine.asymmetric.model import QueryModel, fit_or_load
from engine.core.storage import fingerprint
from engine.errors import CacheError
from engine.features.backbone import get_extractor
from tests.engine.asymmetric.ssp_data import (
    DIM,
    TINY,
    fake_gallery_meta,
    tiny_images,
    unit_rows,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A query model (packaged lite0 weights, last stage trained) saved by fit_or_load."""
    state_dir = tmp_path_factory.mktemp("ssp-state")
    images = tiny_images(12, seed=3)
    features = unit_rows(12, seed=4)
    meta = fake_gallery_meta()
    config = SSPConfig(**TINY)
    model = fit_or_load(images, state_dir, gallery_features=features, gallery_meta=meta,
                        config=config, device="cpu")
    return {"model": model, "images": images, "features": features, "meta": meta,
            "config": config, "state_dir": state_dir}


def saved_paths(state_dir: Path) -> tuple[Path, Path]:
    (manifest,) = (state_dir / "ssp").glob("*.json")
    return manifest.with_suffix(".safetensors"), manifest


def test_fit_saves_trained_modules_and_anchors_and_reloads_identically(trained):
    model = trained["model"]
    assert not model.loaded
    assert model.anchors.shape == (8, 8, DIM // 8)
    _, manifest_path = saved_paths(trained["state_dir"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest["gallery_fingerprint"] == trained["meta"].fingerprint
    assert manifest["query_fingerprint"] == get_extractor(device="cpu").meta.fingerprint
    assert manifest["pq"]["subspaces"] == 8 and manifest["pq"]["centroids"] == 8
    assert manifest["config"] == trained["config"].as_dict()
    # only the trained part is stored: the last stage, conv_head, bn2 and the head
    assert manifest["saved_prefixes"] == ["projection", "trunk.blocks.6", "trunk.bn2",
                                          "trunk.conv_head"]
    again = fit_or_load(trained["images"], trained["state_dir"],
                        gallery_features=trained["features"], gallery_meta=trained["meta"],
                        config=trained["config"], device="cpu")
    assert again.loaded
    probe = tiny_images(3, seed=9)
    first, second = model.embed(probe), again.embed(probe)
    assert first.shape == (3, DIM) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(model.anchors, again.anchors)


def test_mismatched_or_damaged_state_is_refused_and_retrained(trained, tmp_path, monkeypatch):
    import shutil

    state_dir = tmp_path / "state"
    shutil.copytree(trained["state_dir"], state_dir)
    weights, manifest_path = saved_paths(state_dir)
    path = manifest_path.with_suffix("")
    with pytest.raises(CacheError, match="targets gallery features"):
        QueryModel.load(path, gallery_meta=fake_gallery_meta("another-gallery"))
    with pytest.raises(CacheError, match="other images"):
        QueryModel.load(path, training_fingerprint="0" * 16)

    calls = []

    def counting_fit(*args, **kwargs):  # stands in for training: we only count retrains
        calls.append(1)
        return trained["model"]

    monkeypatch.setattr(QueryModel, "fit", counting_fit)
    arguments = {"gallery_features": trained["features"], "gallery_meta": trained["meta"],
                 "config": trained["config"], "device": "cpu"}
    # the query backbone's weights changed since the state was written
    manifest = json.loads(manifest_path.read_text())
    manifest["query_fingerprint"] = "not-the-current-lite0"
    manifest.pop("checksum")  # an intact state, written when lite0 had other weights
    manifest_path.write_text(json.dumps({**manifest, "checksum": fingerprint(manifest)}))
    with pytest.raises(CacheError, match="other weights"):
        QueryModel.load(path)
    model = fit_or_load(trained["images"], state_dir, **arguments)
    assert not model.loaded and len(calls) == 1
    assert QueryModel.load(path).loaded  # the retrained state replaced the stale one
    # a damaged weights file
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CacheError):
        QueryModel.load(path)
    model = fit_or_load(trained["images"], state_dir, **arguments)
    assert not model.loaded and len(calls) == 2
    # other training images: another key, a new model
    model = fit_or_load(tiny_images(12, seed=5), state_dir,
                        **{**arguments, "gallery_features": unit_rows(12, seed=6)})
    assert not model.loaded and len(calls) == 3
    assert len(list((state_dir / "ssp").glob("*.json"))) == 2


def test_random_init_trunks_save_the_whole_network(tmp_path):
    config = SSPConfig(**{**TINY, "query_weights": "none", "epochs": 1, "warmup_epochs": 0})
    images, meta = tiny_images(8, seed=6), fake_gallery_meta()
    model = fit_or_load(images, tmp_path, gallery_features=unit_rows(8), gallery_meta=meta,
                        config=config, device="cpu")
    _, manifest_path = saved_paths(tmp_path)
    assert "trunk.conv_stem" in json.loads(manifest_path.read_text())["saved_prefixes"]
    loaded = QueryModel.load(manifest_path.with_suffix(""), gallery_meta=meta)
    np.testing.assert_array_equal(model.embed(images[:2]), loaded.embed(images[:2]))


def test_a_state_in_the_first_layout_is_refused_not_misread(trained, tmp_path):
    """States written before the engine's one layout (format 1: `version`, `weights_sha256`)
    raise CacheError, so fit_or_load retrains."""
    import shutil

    state_dir = tmp_path / "state"
    shutil.copytree(trained["state_dir"], state_dir)
    _, manifest_path = saved_paths(state_dir)
    manifest = json.loads(manifest_path.read_text())
    for field in ("format", "kind", "fingerprint", "files", "tensors", "checksum"):
        manifest.pop(field, None)
    manifest_path.write_text(json.dumps({**manifest, "version": 1, "method": "ssp",
                                         "weights_sha256": "0" * 64}))
    with pytest.raises(CacheError):
        QueryModel.load(manifest_path.with_suffix(""))
