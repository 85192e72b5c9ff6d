"""A gallery opened from a features file in the explorer: a session titled by the file, queried
by its items or a query feature, never by an image of another feature space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import InvalidInputError, UnsafePathError
from engine.explorer import BASELINE, Explorer
from tests.engine.search.test_features_file import PER_CLUSTER, clustered
from tests.galleries import demo_file


@pytest.fixture()
def features_explorer(tmp_path: Path) -> tuple[Explorer, Path]:
    """An explorer (no backbone: nothing is embedded) and a labelled .npz in its allowed root."""
    features, labels = clustered()
    path = tmp_path / "allowed" / "vectors.npz"
    path.parent.mkdir()
    np.savez(path, features=features, labels=labels, class_names=np.array(["a", "b", "c"]),
             names=np.array([f"n{row}" for row in range(len(features))]))
    explorer = Explorer(None, device="cpu", cache_root=tmp_path / "cache",
                        allowed_roots=[tmp_path / "allowed"], methods=["sgrr"])
    return explorer, path


def test_a_features_file_opens_as_a_session_and_ranks_its_items(features_explorer) -> None:
    explorer, path = features_explorer
    session = explorer.open_features(path)
    assert session.title == "vectors.npz (30 images)"
    assert explorer.choices() == [(session.title, session.key)]
    result = explorer.query(session.key, source_file="n12", top_n=5)
    assert result.query_label == 1 and result.query_class == "b"
    baseline = result.rankings[BASELINE]
    assert 12 not in baseline.indices[:5]  # left out
    assert (np.asarray(baseline.indices[:5]) // PER_CLUSTER == 1).all()
    assert "sgrr" in result.rankings
    assert explorer.open_features(path) is session  # reopening an unchanged file


def test_a_query_feature_ranks_without_an_image(features_explorer) -> None:
    explorer, path = features_explorer
    session = explorer.open_features(path)
    query = np.asarray(session.gallery.features[25], np.float32) * 4
    result = explorer.query(session.key, query_feature=query, top_n=3)
    assert result.source_row is None and int(result.rankings[BASELINE].indices[0]) == 25
    np.testing.assert_allclose(np.linalg.norm(result.feature), 1.0, rtol=1e-6)
    with pytest.raises(InvalidInputError, match=r"\(16,\) vector"):
        explorer.query(session.key, query_feature=np.ones(3))
    with pytest.raises(InvalidInputError, match="give one query"):
        explorer.query(session.key, source_file="n1", query_feature=query)


def test_an_image_query_or_an_image_query_model_is_refused(features_explorer) -> None:
    explorer, path = features_explorer
    session = explorer.open_features(path)
    with pytest.raises(InvalidInputError, match="opened from features of another model; query "
                                                "with one of its items"):
        explorer.query(session.key, demo_file(0, 0))
    with pytest.raises(InvalidInputError, match="opened from features of another model"):
        explorer.with_query_model(session.key, "lite2")
    with pytest.raises(InvalidInputError, match="opened from features of another model"):
        explorer.plan_query_model(session.key, "lite2")


def test_a_file_outside_the_allowed_roots_is_refused(features_explorer, tmp_path: Path) -> None:
    explorer, path = features_explorer
    outside = tmp_path / "outside.npy"
    np.save(outside, clustered()[0])
    with pytest.raises(UnsafePathError):
        explorer.open_features(outside)
    with pytest.raises(UnsafePathError):
        explorer.open_features(path, images=tmp_path)
    assert explorer.open_features(outside, check_allowed=False).gallery.size == 30


def test_load_starts_on_the_features_gallery(features_explorer, tmp_path: Path) -> None:
    _, path = features_explorer
    explorer = Explorer.load(None, features=path, device="cpu", cache_root=tmp_path / "cache",
                             methods=["sgrr"])
    assert explorer.session(None).title == "vectors.npz (30 images)"
    assert len(explorer.galleries) == 1
    with pytest.raises(InvalidInputError, match="give a gallery folder or a features file"):
        Explorer.load(None, device="cpu", cache_root=tmp_path / "cache")


def test_a_large_gallery_is_scored_on_a_fixed_sample_its_picks_reproduce(
        features_explorer, monkeypatch) -> None:
    """Above FULL_RANKING_LIMIT the Compare table scores SCORE_SAMPLE fixed items, each ranked
    online against the rest; the AP a pick of each shows averages to that mAP, and no whole
    leave-one-out run is made."""
    from engine.explorer import session as session_module

    monkeypatch.setattr(session_module, "FULL_RANKING_LIMIT", 20)
    monkeypatch.setattr(session_module, "SCORE_SAMPLE", 12)
    explorer, path = features_explorer
    session = explorer.open_features(path)
    assert not session.full_rankings
    rows = session.score_sample
    assert len(rows) == 12 and len(set(rows.tolist())) == 12
    for method in (BASELINE, "sgrr"):
        scores = session.scores(method)
        assert (scores.n_queries, scores.sampled_from) == (12, 30)
        assert scores.queries_text == "12 sampled of 30"
        assert scores.map_low <= scores.map <= scores.map_high
        picked = [explorer.query(session.key, source_file=session.gallery.files[row],
                                 top_n=5).rankings[method].ap for row in rows]
        assert np.mean(picked) == pytest.approx(scores.map, abs=1e-9)
    assert session._leave_one_out.peek((BASELINE,)) is None


def test_the_shared_graph_is_as_deep_as_the_methods_read(tmp_path: Path) -> None:
    from engine.rerank import get_reranker_class, shared_graph_depth
    from engine.search.gallery import DEFAULT_KNN_DEPTH

    every = Explorer(None, device="cpu", cache_root=tmp_path / "cache")
    icfrr = get_reranker_class("icfrr").Params()
    assert every.knn_depth == shared_graph_depth(["icfrr"]) == icfrr.KG + 2 > DEFAULT_KNN_DEPTH
    few = Explorer(None, device="cpu", cache_root=tmp_path / "cache", methods=["gnn"])
    assert few.knn_depth == DEFAULT_KNN_DEPTH  # GNN reads 26: the usual depth serves
