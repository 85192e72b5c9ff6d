"""The numbers a query shows on the tiny gallery: every method's cosine similarities of its
shown results, the query's familiarity, and Compare timings with when and how they were made."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.evaluation.scores import SCORES_FILE
from engine.explorer import BASELINE, Explorer, GallerySession
from engine.rerank import list_rerankers
from tests.galleries import PER_CLASS, demo_file

METHODS = [BASELINE, *list_rerankers()]
UPLOAD = demo_file(1, PER_CLASS)  # a snowdrop that is not in the tiny gallery


@pytest.fixture(scope="module")
def session(explorer: Explorer) -> GallerySession:
    return explorer.session(None)


def loop_similarities(feature: np.ndarray, gallery: np.ndarray, rows: np.ndarray) -> list[float]:
    """The oracle: one dot product per shown result, the query normalised."""
    query = np.asarray(feature, np.float64)
    query = query / np.sqrt(sum(value * value for value in query))
    return [float(np.dot(query, gallery[row].astype(np.float64))) for row in rows]


@pytest.mark.parametrize("pick", [None, 5])
def test_every_shown_result_has_its_cosine_similarity(explorer: Explorer,
                                                      session: GallerySession,
                                                      pick: int | None) -> None:
    gallery = session.gallery
    if pick is None:
        result = explorer.query(None, UPLOAD, top_n=6)
    else:
        result = explorer.query(None, source_file=gallery.files[pick], top_n=6)
    assert list(result.rankings) == METHODS
    for method, ranking in result.rankings.items():
        shown = ranking.indices[:result.top_n]
        assert ranking.similarities.shape == (result.top_n,), method
        np.testing.assert_allclose(ranking.similarities,
                                   loop_similarities(result.feature, gallery.features, shown),
                                   atol=1e-6, err_msg=method)
    # The baseline searches by cosine: its distance is 1 - cosine, so the two scales agree.
    baseline = result.rankings[BASELINE]
    np.testing.assert_allclose(baseline.similarities, 1.0 - baseline.distances[:result.top_n],
                               atol=1e-5)
    method_view = result.as_dict(gallery)["methods"]
    for method in METHODS:
        assert len(method_view[method]["similarities"]) == result.top_n
        assert method_view[method]["distance_note"]


def test_rerank_keeps_the_similarities_right(explorer: Explorer,
                                             session: GallerySession) -> None:
    result = explorer.query(None, UPLOAD, top_n=5)
    again = explorer.rerank(result, "k_reciprocal", {"k1": 5, "k2": 2, "lambda_value": 0.9})
    ranking = again.rankings["k_reciprocal"]
    np.testing.assert_allclose(
        ranking.similarities,
        loop_similarities(result.feature, session.gallery.features, ranking.indices[:5]),
        atol=1e-6)
    assert again.familiarity == result.familiarity


def test_a_pick_is_familiar_and_a_query_far_from_everything_is_not(
        explorer: Explorer, session: GallerySession) -> None:
    gallery = session.gallery
    for row in (0, 11, 23):
        result = explorer.query(None, source_file=gallery.files[row], top_n=3)
        found = result.familiarity
        assert found.nearest_row != row
        assert found.nearest == pytest.approx(session.usual_nearest[row], abs=1e-6)
        assert not found.unusual  # 24 items: the bar is the loosest item's nearest
        assert found.nearest == pytest.approx(result.rankings[BASELINE].similarities[0],
                                              abs=1e-6)
    assert result.as_dict(gallery)["familiarity"]["unusual"] is False
    assert session.usual_nearest.shape == (gallery.size,)
    assert np.median(session.usual_nearest) == pytest.approx(found.typical)
    # A direction no image's features point to (backbone features are non-negative).
    far = np.where(np.arange(gallery.features.shape[1]) % 2 == 0, 1.0, -1.0)
    far -= (far @ gallery.features.mean(axis=0)) * gallery.features.mean(axis=0) / (
        gallery.features.mean(axis=0) @ gallery.features.mean(axis=0))
    odd = session.familiarity(far.astype(np.float32), None, False)
    assert odd.unusual and odd.percentile == 0.0
    assert odd.nearest < session.usual_nearest.min()


def test_compare_scores_record_when_and_under_what_load(session: GallerySession) -> None:
    for method in METHODS:
        scores = session.scores(method, cached_only=True)
        assert scores.measured_at and scores.cpus and scores.cpus >= 1
        assert scores.online.describe().startswith(scores.measured_at[:10])


@pytest.mark.parametrize("method", METHODS)
def test_measure_online_times_now_and_stores_nothing(session: GallerySession,
                                                     method: str) -> None:
    path = session.gallery.cache_dir / SCORES_FILE
    before = path.read_bytes()
    ms = session.measure_online(method)
    assert isinstance(ms, float) and 0.0 < ms < 60_000
    assert path.read_bytes() == before


def test_measure_online_refuses_invalid_parameters(session: GallerySession) -> None:
    with pytest.raises(InvalidInputError):
        session.measure_online("k_reciprocal", {"k1": -3})
