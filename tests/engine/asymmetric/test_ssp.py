"""SSP: the loss against a hand-written KL, the PQ anchors, the network's split forward, both
training paths (cached activations; full images under bf16 autocast on the CPU), saved state
(round trip, fingerprints, damage), bad inputs, and the asymmetric benchmark's two sides.

Images are tiny generated pictures; models are lite0/lite2 with their packaged weights or random
ones, and trained for a handful of steps, so the file runs in well under a minute.
"""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tie_aware import U32, assert_order_matches

from engine.asymmetric.ssp import (
    QueryModel,
    QueryNetwork,
    SSPConfig,
    anchor_log_probs,
    apply_ridge,
    cache_activations,
    fit_or_load,
    fit_procrustes,
    fit_ridge,
    lr_factor,
    ssp_loss,
    train_anchors,
    train_cached,
    train_full,
)
from engine.errors import CacheError, InvalidInputError
from engine.features.backbone import FeatureMeta, get_extractor

CPU = torch.device("cpu")
DIM = 1280
TINY = {"subspaces": 8, "centroids": 8, "views": 1, "epochs": 2, "warmup_epochs": 1,
        "batch_size": 8, "trainable_stages": 1}


def unit_anchors(m: int, k: int, sub: int, seed: int = 0) -> torch.Tensor:
    anchors = torch.randn(m, k, sub, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(anchors, dim=-1)


def tiny_images(n: int, seed: int = 0, size: int = 40) -> list[Image.Image]:
    """Pictures with a per-image colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        base = rng.integers(0, 256, 3)
        pixels = np.tile(base, (size, size, 1)).astype(np.float64)
        pixels[:, (i % 7)::7] *= 0.3
        pixels += rng.normal(0, 20, pixels.shape)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def unit_rows(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fake_gallery_meta(backbone: str = "fake-gallery", dim: int = DIM) -> FeatureMeta:
    return FeatureMeta(backbone=backbone, weights="test", input_size=(3, 32, 32),
                       interpolation="bilinear", crop_pct=1.0, crop_mode="center",
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pooling="avg", dim=dim)


# -- the loss ------------------------------------------------------------------------------------
def hand_kl(query: np.ndarray, target: np.ndarray, anchors: np.ndarray,
            temperature: float) -> float:
    """The paper's loss with plain loops in float64."""
    m, k, sub = anchors.shape
    total = 0.0
    for b in range(query.shape[0]):
        for s in range(m):
            q = query[b, s * sub:(s + 1) * sub].astype(np.float64)
            g = target[b, s * sub:(s + 1) * sub].astype(np.float64)
            q, g = q / np.linalg.norm(q), g / np.linalg.norm(g)
            lq = np.array([q @ anchors[s, n] for n in range(k)]) / temperature
            lg = np.array([g @ anchors[s, n] for n in range(k)]) / temperature
            p = np.exp(lg - lg.max())
            p /= p.sum()
            r = np.exp(lq - lq.max())
            r /= r.sum()
            total += sum(p[n] * (np.log(p[n]) - np.log(r[n])) for n in range(k))
    return total / (query.shape[0] * m)


def test_loss_is_zero_for_equal_features_and_positive_otherwise():
    anchors = unit_anchors(4, 8, 5)
    features = torch.randn(6, 20)
    assert ssp_loss(features, features.clone(), anchors).item() == 0.0
    # a feature and its rescaled sub-vectors give the same structure: still zero
    rescaled = features.reshape(6, 4, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None]
    assert ssp_loss(rescaled.reshape(6, 20), features, anchors).item() == pytest.approx(
        0.0, abs=1e-6)
    other = torch.randn(6, 20)
    assert ssp_loss(other, features, anchors).item() > 1e-3


def test_loss_matches_a_hand_written_kl_and_flows_only_into_the_query():
    anchors = unit_anchors(3, 5, 4, seed=1)
    query = torch.randn(2, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.randn(2, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss = ssp_loss(query, target, anchors, temperature=0.1)
    expected = hand_kl(query.detach().numpy(), target.detach().numpy(), anchors.numpy(), 0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    assert target.grad is None


def test_loss_is_float32_under_bf16_autocast():
    anchors = unit_anchors(4, 16, 8)
    query, target = torch.randn(3, 32), torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssp_loss(query.bfloat16(), target, anchors)
    outside = ssp_loss(query.bfloat16().float(), target, anchors)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(outside.item(), rel=1e-6)


def test_anchor_log_probs_refuses_a_width_that_does_not_fit():
    with pytest.raises(InvalidInputError, match="do not fit"):
        anchor_log_probs(torch.randn(2, 30), unit_anchors(4, 8, 5), 0.1)


# -- anchors, ridge, schedule ----------------------------------------------------------------------
def test_pq_anchors_have_the_configured_shape_and_unit_sub_vectors():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 64)).astype(np.float32)
    features = centres[rng.integers(0, 20, 600)] + 0.05 * rng.standard_normal((600, 64))
    anchors = train_anchors(features.astype(np.float32), subspaces=8, centroids=256)
    assert anchors.shape == (8, 256, 8)
    assert anchors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(anchors, axis=-1), 1.0, atol=1e-5)
    # the anchors come from the data: its sub-vectors lie closer to them than to random ones
    parts = features.reshape(600, 8, 8)
    parts = parts / np.linalg.norm(parts, axis=-1, keepdims=True)
    fitted = np.einsum("nms,mks->nmk", parts, anchors).max(axis=-1).mean()
    random = unit_anchors(8, 256, 8, seed=5).numpy()
    chance = np.einsum("nms,mks->nmk", parts, random).max(axis=-1).mean()
    assert fitted > 0.99 > chance


def test_ridge_recovers_a_linear_map_in_both_forms():
    rng = np.random.default_rng(0)
    for n, d in ((200, 10), (10, 40)):  # primal (n >= d) and dual (n < d)
        x = rng.standard_normal((n, d))
        weights = rng.standard_normal((d, 3))
        y = x @ weights + 0.5
        fitted, bias, alpha = fit_ridge(x, y, alpha=1e-8)
        np.testing.assert_allclose(x @ fitted + bias, y, atol=1e-3)
        assert alpha == pytest.approx(1e-8)
    mapped = apply_ridge(x, fitted, bias)
    np.testing.assert_allclose(np.linalg.norm(mapped, axis=1), 1.0, atol=1e-5)
    _, _, chosen = fit_ridge(x, y)  # cross-validated choice from the grid
    assert chosen > 0


def test_procrustes_recovers_a_rotation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    fitted = fit_procrustes(x, x @ rotation + 0.001 * rng.standard_normal((50, 6)))
    np.testing.assert_allclose(fitted, rotation, atol=1e-3)
    np.testing.assert_allclose(fitted.T @ fitted, np.eye(6), atol=1e-5)
    with pytest.raises(InvalidInputError, match="same n"):
        fit_procrustes(x, x[:10])


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[10] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(factors[:11]))
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


# -- bad inputs ----------------------------------------------------------------------------------
def test_bad_inputs_raise_invalid_input_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="divide"):
        train_anchors(unit_rows(300, 100), subspaces=32)
    with pytest.raises(InvalidInputError, match="at least 256"):
        train_anchors(unit_rows(100, 64), subspaces=8)
    nan_rows = unit_rows(300, 64)
    nan_rows[3, 5] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        train_anchors(nan_rows, subspaces=8)
    meta = fake_gallery_meta()
    with pytest.raises(InvalidInputError, match="training images"):
        fit_or_load([], tmp_path, gallery_features=np.zeros((0, DIM), np.float32),
                    gallery_meta=meta)
    images = tiny_images(10)
    with pytest.raises(InvalidInputError, match="must divide"):
        fit_or_load(images, tmp_path, gallery_features=unit_rows(10), gallery_meta=meta,
                    config=SSPConfig(**{**TINY, "subspaces": 7}))
    bad = unit_rows(10)
    bad[2] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        fit_or_load(images, tmp_path, gallery_features=bad, gallery_meta=meta,
                    config=SSPConfig(**TINY))
    with pytest.raises(InvalidInputError, match="rows of gallery features"):
        fit_or_load(images, tmp_path, gallery_features=unit_rows(9), gallery_meta=meta,
                    config=SSPConfig(**TINY))
    with pytest.raises(InvalidInputError, match="gallery_extractor or gallery_meta"):
        fit_or_load(images, tmp_path, gallery_features=unit_rows(10))
    for field, value in (("subspaces", 0), ("centroids", 100), ("training", "gpu"),
                         ("learning_rate", float("nan")), ("head_init", "zeros")):
        with pytest.raises(InvalidInputError, match=field):
            SSPConfig(**{field: value})
    assert not list(tmp_path.iterdir())  # nothing was written


# -- the network and the two training paths --------------------------------------------------------
@pytest.fixture(scope="module")
def random_network() -> QueryNetwork:
    model = copy.deepcopy(get_extractor("tf_efficientnet_lite0", "none", "cpu").model)
    torch.manual_seed(0)
    return QueryNetwork(model, DIM, 3.0).eval()


def test_split_forward_equals_the_whole_trunk(random_network):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = random_network.trunk.forward_features(images)
        for split in (0, 3, random_network.n_stages):
            parts = random_network.trained_part(random_network.frozen_part(images, split), split)
            torch.testing.assert_close(parts, whole)
        features = random_network(images)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2))


def small_transform(augment: bool, size: int = 64):
    from engine.asymmetric.ssp import _train_transform

    return _train_transform({"input_size": (3, size, size), "mean": (0.5,) * 3,
                             "std": (0.5,) * 3}, augment)


def tiny_trunk() -> torch.nn.Module:
    """A timm EfficientNet of two small blocks without grouped convolutions (bf16 grouped
    convolutions have no fast CPU kernel, so a bf16 lite0 step takes minutes on a CPU)."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    return EfficientNet(decode_arch_def([["cn_r1_k3_s1_c8"], ["er_r1_k3_s2_e2_c16"]]),
                        num_features=32, stem_size=8)


def test_training_on_cached_activations_lowers_the_loss(random_network):
    torch.manual_seed(0)  # the new head's initialisation, whatever ran before
    network = copy.deepcopy(random_network)
    network.projection = torch.nn.Linear(network.projection.in_features, 64)  # a small head
    images = tiny_images(16)
    split = network.n_stages - 1
    cache = cache_activations(network, images, split, 2, small_transform(False),
                              small_transform(True), CPU)
    assert cache.activations.shape[:2] == (32, 192) and cache.activations.dtype == torch.float16
    frozen_before = network.trunk.blocks[0][0].conv_dw.weight.clone()
    trained_before = network.trunk.blocks[split][0].conv_pw.weight.clone()
    config = SSPConfig(**{**TINY, "epochs": 40, "warmup_epochs": 0, "batch_size": 16,
                          "learning_rate": 0.01})
    targets = torch.from_numpy(unit_rows(16, 64, seed=1))
    losses = train_cached(network, cache, targets, unit_anchors(8, 8, 8), config, CPU,
                          max_steps=40)
    assert len(losses) == 40
    assert max(losses[-3:]) < 0.6 * losses[0]
    torch.testing.assert_close(network.trunk.blocks[0][0].conv_dw.weight, frozen_before)
    assert not torch.equal(network.trunk.blocks[split][0].conv_pw.weight, trained_before)


def test_full_path_trains_every_layer_under_bf16_autocast_on_the_cpu():
    network = QueryNetwork(tiny_trunk(), 32, 3.0)
    dtypes = []
    hook = network.trunk.conv_head.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype))
    stem_before = network.trunk.conv_stem.weight.clone()
    head_before = network.projection.weight.clone()
    config = SSPConfig(**{**TINY, "batch_size": 4, "warmup_epochs": 0, "training": "full"})
    losses = train_full(network, tiny_images(8), torch.from_numpy(unit_rows(8, 32)),
                        unit_anchors(4, 8, 8), small_transform(True, 32), config, CPU,
                        autocast=True, max_steps=2, workers=1)
    hook.remove()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len(dtypes) == 2 and all(dtype == torch.bfloat16 for dtype in dtypes)
    assert not torch.equal(network.trunk.conv_stem.weight, stem_before)
    assert not torch.equal(network.projection.weight, head_before)
    assert not network.training and not any(p.requires_grad for p in network.parameters())


# -- saved state ---------------------------------------------------------------------------------
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
    manifest_path.write_text(json.dumps(manifest))
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


# -- the asymmetric benchmark ----------------------------------------------------------------------
def assert_ranks_by(indices: np.ndarray, queries: np.ndarray, gallery: np.ndarray) -> None:
    """`indices` is a full ranking of `gallery` by inner product with `queries`, up to float
    ties (`tie_aware`): float32 products of unit rows of d terms are off by (d + 2) U32."""
    assert indices.shape == (len(queries), len(gallery))
    assert (np.sort(indices, axis=1) == np.arange(len(gallery))).all()
    similarity = queries.astype(np.float64) @ gallery.astype(np.float64).T
    assert_order_matches(indices, similarity, atol=(queries.shape[1] + 2) * U32,
                         larger_is_better=True)


def test_asymmetric_rows_embed_queries_and_gallery_with_the_right_models(tmp_path):
    from engine.bench.asymmetric import asymmetric_rows, format_asymmetric_table
    from engine.search.gallery import Gallery

    folder = tmp_path / "photos"
    folder.mkdir()
    lines = ["file,label"]
    for i, image in enumerate(tiny_images(12, seed=7)):
        image.save(folder / f"image_{i:02d}.png")
        lines.append(f"image_{i:02d}.png,{i // 6}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    config = SSPConfig(**TINY)
    rows = asymmetric_rows(folder, "oxford17-split", config=config, device="cpu",
                           cache_root=tmp_path / "cache", state_dir=tmp_path / "state",
                           timing_images=0)
    assert [row.method.split(",")[-1].split(" ")[-1] for row in rows[2:5]] == [
        "untrained", "map", "Procrustes"]
    assert rows[0].method.startswith("symmetric") and rows[-1].method.startswith("SSP")
    paths = sorted(folder.glob("*.png"))
    queries, gallery = [paths[0], paths[10]], [p for i, p in enumerate(paths) if i % 10]
    small = get_extractor("tf_efficientnet_lite0", device="cpu")
    large = get_extractor("tf_efficientnet_lite2", device="cpu")
    # the features the rows ranked (each side's gallery cache, every image in sorted order):
    # embedded again in other batches their bits may differ, which no tolerance derives from
    query_rows, gallery_rows = [0, 10], [i for i in range(12) if i % 10]
    small_features, large_features = (
        Gallery.open(folder, extractor=extractor, cache_root=tmp_path / "cache",
                     device="cpu").features for extractor in (small, large))
    small_queries, large_queries = small_features[query_rows], large_features[query_rows]
    small_gallery, large_gallery = small_features[gallery_rows], large_features[gallery_rows]
    assert_ranks_by(rows[0].indices, small_queries, small_gallery)
    assert_ranks_by(rows[1].indices, large_queries, large_gallery)
    assert_ranks_by(rows[2].indices, small_queries, large_gallery)
    with pytest.raises(AssertionError):  # the check tells the two gallery spaces apart
        assert_ranks_by(rows[2].indices, small_queries, small_gallery)
    # SSP: the query model (trained on the 10 gallery images' lite2 features) embeds the query
    # images; the gallery side is lite2
    model = fit_or_load(gallery, tmp_path / "state", gallery_features=large_gallery,
                        gallery_meta=large.meta, config=config, device="cpu")
    assert model.loaded
    assert_ranks_by(rows[5].indices, model.embed(queries), large_gallery)
    assert rows[5].query_parameters == model.parameter_count
    table = format_asymmetric_table(rows, "tiny")
    assert table.count("\n| ") == 7 and "SSP" in table


def test_importing_the_modules_does_not_import_timm_or_faiss():
    code = ("import sys, engine.asymmetric.ssp, engine.bench.asymmetric; "
            "print(sorted({'timm', 'faiss', 'gradio'} & set(sys.modules)))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[3]).stdout
    assert output.strip() == "[]"
