"""The asymmetric benchmark's rows: each side embedded by the right model (symmetric lite0 and
lite2, lite0 queries against lite2, the ridge and Procrustes maps, SSP)."""

from __future__ import annotations

import numpy as np
import pytest
from tie_aware import U32, assert_order_matches

from engine.asymmetric.config import SSPConfig
from engine.asymmetric.model import fit_or_load
from engine.features.backbone import get_extractor
from tests.engine.asymmetric.ssp_data import TINY, tiny_images


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
