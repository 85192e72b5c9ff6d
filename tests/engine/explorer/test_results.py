"""Numbers a user can read, on hand-made galleries: cosine similarities of the shown results,
what each method's distance means, and how familiar a query is to the gallery."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.core.knn import knn_graph
from engine.errors import InvalidInputError, UnknownNameError
from engine.explorer import BASELINE, Familiarity, GallerySession, QueryResult, distance_note
from engine.explorer.results import (
    BASELINE_DISTANCE_NOTE,
    nearest_other_similarities,
    query_similarities,
    unit_query,
)
from engine.search.gallery import Gallery
from engine.search.index import SearchIndex

# Five unit vectors in the plane at these angles. Each one's nearest other item:
# 0 -> 10, 10 -> 0 (both 10 degrees), 30 -> 10 (20), 60 -> 30 (30), 100 -> 60 (40).
ANGLES = np.array([0.0, 10.0, 30.0, 60.0, 100.0])
USUAL_ANGLES = np.array([10.0, 10.0, 20.0, 30.0, 40.0])


def plane(degrees: float | np.ndarray) -> np.ndarray:
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=-1).astype(np.float32)


def cos(degrees: float | np.ndarray) -> np.ndarray:
    return np.cos(np.radians(degrees))


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> GallerySession:
    """A session over the five plane vectors (no backbone, no re-rankers)."""
    root: Path = tmp_path_factory.mktemp("plane")
    features = plane(ANGLES)
    gallery = Gallery(root=root, files=[f"{int(a)}.jpg" for a in ANGLES], features=features,
                      meta=None, fingerprint="plane", cache_dir=root / "cache",
                      index=SearchIndex(features, device="cpu"),
                      knn=knn_graph(features, len(features)))
    return GallerySession("plane", gallery, device="cpu", methods=[])


def test_usual_nearest_reads_each_items_nearest_other_from_the_knn_graph(
        session: GallerySession) -> None:
    np.testing.assert_allclose(session.usual_nearest, cos(USUAL_ANGLES), atol=1e-6)
    assert session.usual_nearest is session.usual_nearest  # computed once per session


def test_nearest_other_skips_self_wherever_a_duplicate_puts_it() -> None:
    features = plane(np.array([0.0, 0.0, 50.0]))  # rows 0 and 1 are exact duplicates
    np.testing.assert_allclose(nearest_other_similarities(knn_graph(features, 3)),
                               [1.0, 1.0, cos(50.0)], atol=1e-6)
    assert nearest_other_similarities(knn_graph(features[:1], 1)).size == 0


@pytest.mark.parametrize(("degrees", "nearest_row", "nearest", "percentile", "unusual"), [
    (200.0, 4, cos(100.0), 0.0, True),     # far from everything
    (44.0, 2, cos(14.0), 60.0, False),     # 14 degrees: closer than 3 of the 5 usual nearest
    (5.0, 0, cos(5.0), 100.0, False),      # closer than every item's nearest
    (140.0, 4, cos(40.0), 10.0, False),    # exactly the loosest item's nearest: a tie, not below
    (141.0, 4, cos(41.0), 0.0, True),      # just below it
])
def test_familiarity_of_new_queries(session: GallerySession, degrees: float, nearest_row: int,
                                    nearest: float, percentile: float, unusual: bool) -> None:
    found = session.familiarity(plane(degrees), None, False)
    assert found.nearest_row == nearest_row
    assert found.nearest == pytest.approx(nearest, abs=1e-6)
    assert found.typical == pytest.approx(cos(20.0), abs=1e-6)  # the median of the five
    assert found.threshold == pytest.approx(cos(40.0), abs=1e-6)  # under 101 items: the least
    assert found.percentile == pytest.approx(percentile)
    assert found.unusual is unusual


@pytest.mark.parametrize("row", range(len(ANGLES)))
def test_a_gallery_pick_left_out_is_not_unusual(session: GallerySession, row: int) -> None:
    found = session.familiarity(session.gallery.features[row], row, True)
    assert found.nearest_row != row
    assert found.nearest == pytest.approx(session.usual_nearest[row], abs=1e-6)
    assert not found.unusual
    kept = session.familiarity(session.gallery.features[row], row, False)
    assert (kept.nearest_row, kept.percentile) == (row, 100.0)  # kept in, it finds itself


def test_familiarity_rule_in_a_larger_gallery() -> None:
    """Over 100 items the bar is the 1st percentile: the loosest 1 % are below it."""
    usual = np.linspace(0.5, 0.99, 201)  # threshold: the 3rd smallest (index 2 of 0..200)
    assert Familiarity.of(usual[2], 0, usual).unusual is False
    assert Familiarity.of(usual[1], 0, usual).unusual is True
    assert Familiarity.of(usual[1], 0, usual).percentile == pytest.approx(100 * 1.5 / 201)
    with pytest.raises(InvalidInputError, match="at least 2 images"):
        Familiarity.of(0.5, 0, np.empty(0))


def test_a_one_image_gallery_has_no_familiarity(tmp_path: Path) -> None:
    features = plane(np.array([0.0]))
    gallery = Gallery(root=tmp_path, files=["0.jpg"], features=features, meta=None,
                      fingerprint="one", cache_dir=tmp_path / "cache",
                      index=SearchIndex(features, device="cpu"), knn=knn_graph(features, 1))
    assert GallerySession("one", gallery, device="cpu", methods=[]).familiarity(
        features[0], None, False) is None


def test_query_similarities_equal_a_loop_of_dot_products() -> None:
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(30, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = 3.0 * rng.normal(size=16).astype(np.float32)  # not unit: normalised defensively
    rows = rng.permutation(30)[:10]
    expected = [float(np.dot(query.astype(np.float64), gallery[row].astype(np.float64)))
                / float(np.linalg.norm(query.astype(np.float64))) for row in rows]
    found = query_similarities(query, gallery, rows)
    assert found.shape == (10,) and found.dtype == np.float32
    np.testing.assert_allclose(found, expected, atol=1e-6)


@pytest.mark.parametrize("feature", [np.zeros(4), np.array([1.0, np.nan, 0.0, 0.0])])
def test_a_query_without_a_direction_is_refused(feature: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match="zero or not finite"):
        unit_query(feature)


def test_score_fills_similarities_of_the_shown_results(session: GallerySession) -> None:
    query = plane(45.0) * 2.0
    ranking = session.rank(BASELINE, plane(45.0), None, False)
    scored = session.score(ranking, None, None, 3, query)
    assert scored.ap is None  # no class: no per-query scores, still the similarities
    np.testing.assert_allclose(scored.similarities, cos(np.abs(ANGLES[ranking.indices[:3]] - 45)),
                               atol=1e-6)
    # The baseline's distance is 1 - cosine.
    np.testing.assert_allclose(scored.similarities, 1 - ranking.distances[:3], atol=1e-5)
    assert session.score(ranking, None, None, 3).similarities is None  # no feature, none


def test_as_dict_carries_similarities_notes_and_familiarity(session: GallerySession) -> None:
    feature = plane(44.0)
    ranking = session.score(session.rank(BASELINE, feature, None, False), None, None, 2, feature)
    result = QueryResult("plane", None, None, None, None, None, feature, [], {BASELINE: ranking},
                         {BASELINE: ranking.seconds}, 2, False,
                         familiarity=session.familiarity(feature, None, False))
    summary = result.as_dict(session.gallery)
    method = summary["methods"][BASELINE]
    assert method["files"] == ["30.jpg", "60.jpg"]
    assert method["similarities"] == pytest.approx([cos(14.0), cos(16.0)], abs=1e-6)
    assert method["distance_note"] == BASELINE_DISTANCE_NOTE
    assert summary["familiarity"] == dataclasses.asdict(result.familiarity)
    assert summary["familiarity"]["unusual"] is False
    bare = dataclasses.replace(result, familiarity=None,
                               rankings={BASELINE: dataclasses.replace(ranking,
                                                                       similarities=None)})
    assert bare.as_dict(session.gallery)["familiarity"] is None
    assert bare.as_dict(session.gallery)["methods"][BASELINE]["similarities"] is None


def test_distance_note_of_the_baseline_and_unknown_names() -> None:
    assert distance_note(BASELINE) == BASELINE_DISTANCE_NOTE
    with pytest.raises(UnknownNameError):
        distance_note("no_such_method")
