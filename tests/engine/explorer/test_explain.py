"""`GallerySession.explain`: a shown result's evidence from the fitted method at the setting
that ranked it, for the query's feature as ranked, with where the item sits in the method's and
the baseline's rankings; refused for the baseline, for another gallery's result and, without
waiting, for a method whose fit is not done."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from engine.core.jobs import JobQueue
from engine.errors import InvalidInputError
from engine.explorer import BASELINE, Explanation, Explorer, GallerySession, QueryResult
from engine.rerank import list_rerankers

PICK = 3  # a daffodil (as the page tests pick)


@pytest.fixture(scope="module")
def session(explorer: Explorer) -> GallerySession:
    return explorer.session(None)


@pytest.fixture(scope="module")
def picked(explorer: Explorer, session: GallerySession) -> QueryResult:
    return explorer.query(session.key, source_file=session.gallery.files[PICK])


def moved_most(result: QueryResult, method: str) -> int:
    """The gallery row of the method's top N that the baseline ranked farthest from it."""
    baseline = result.rankings[BASELINE].indices.tolist()
    rows = result.top(method)[1].tolist()
    return max(rows, key=lambda row: baseline.index(row) - rows.index(row))


@pytest.mark.parametrize("method", list_rerankers())
def test_a_shown_result_is_explained_with_its_two_places(session: GallerySession,
                                                         picked: QueryResult,
                                                         method: str) -> None:
    item = moved_most(picked, method)
    explained = session.explain(picked, method, item)
    assert isinstance(explained, Explanation)
    assert explained.evidence.method == method and explained.evidence.item == item
    assert explained.evidence.summary
    ranking, baseline = picked.rankings[method], picked.rankings[BASELINE]
    assert explained.method_rank == ranking.indices.tolist().index(item) + 1
    assert explained.baseline_rank == baseline.indices.tolist().index(item) + 1
    assert explained.method_rank <= picked.top_n
    assert explained.depth == len(ranking.indices)
    # the fitted re-ranker at the shown setting, explaining the query's feature as ranked
    direct = session.reranker(method, ranking.params).explain(picked.feature, item)
    assert direct.summary == explained.evidence.summary
    assert [group.name for group in direct.groups] == [
        group.name for group in explained.evidence.groups]
    for mine, theirs in zip(direct.groups, explained.evidence.groups, strict=True):
        assert np.array_equal(mine.rows, theirs.rows)
        np.testing.assert_allclose(mine.values, theirs.values, rtol=1e-6, equal_nan=True)
    assert direct.numbers.keys() == explained.evidence.numbers.keys()


def test_an_item_no_ranking_holds_has_no_place(session: GallerySession,
                                               picked: QueryResult) -> None:
    """The pick itself is left out of every ranking: both places are None ("beyond")."""
    explained = session.explain(picked, "k_reciprocal", PICK)
    assert explained.method_rank is None and explained.baseline_rank is None
    assert explained.evidence.item == PICK


def test_explain_refuses_the_baseline_a_bad_row_and_another_gallery(
        session: GallerySession, picked: QueryResult) -> None:
    with pytest.raises(InvalidInputError, match="re-ranks nothing"):
        session.explain(picked, BASELINE, 0)
    with pytest.raises(InvalidInputError, match="gallery row"):
        session.explain(picked, "k_reciprocal", session.gallery.size)
    elsewhere = dataclasses.replace(picked, gallery_key="another")
    with pytest.raises(InvalidInputError, match="another"):
        session.explain(elsewhere, "k_reciprocal", 0)


def test_a_method_not_fitted_yet_is_refused_with_its_state(explorer: Explorer,
                                                           tiny_gallery: Path,
                                                           app_root: Path) -> None:
    """A queue that never runs: every method's fit waits; explain says so and fits nothing."""
    queued = Explorer(explorer.extractor, device="cpu", cache_root=app_root / "cache",
                      allowed_roots=[app_root], jobs=JobQueue(budget=contextlib.nullcontext))
    session = queued.open_folder(tiny_gallery)
    result = queued.query(session.key, source_file=session.gallery.files[PICK])
    assert "k_reciprocal" in result.not_ready
    with pytest.raises(InvalidInputError, match=r"not ready to explain.*waiting"):
        session.explain(result, "k_reciprocal", int(result.top(BASELINE)[1][0]))
    assert session.fitted("k_reciprocal") is None
