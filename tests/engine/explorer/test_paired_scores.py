"""The Compare table's statistics on the tiny gallery: each query's AP kept with the scores, the
paired difference from the baseline, and what the failure browser reads (`query_changes`,
`class_changes`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.evaluation.paired import paired_comparison
from engine.evaluation.scores import SCORES_FILE
from engine.explorer import BASELINE, Explorer, GallerySession

METHOD = "k_reciprocal"


@pytest.fixture(scope="module")
def session(explorer: Explorer) -> GallerySession:
    return explorer.session(None)


def test_each_query_ap_is_the_ap_of_its_pick(session: GallerySession) -> None:
    """The kept AP of a query is what the page shows for that pick (`rank` then `score`, as
    `Explorer.query` does), for the baseline and a method, and they average to the table's
    mAP."""
    labels = session.gallery.labels
    for method in (BASELINE, METHOD):
        aps = session.query_aps(method)
        np.testing.assert_array_equal(aps.rows, np.arange(session.gallery.size))
        assert np.nanmean(aps.ap) == pytest.approx(session.scores(method).map, abs=1e-12)
        for row in (0, 7, session.gallery.size - 1):
            ranking = session.rank(method, session.gallery.features[row], row, True)
            positives = int((labels == labels[row]).sum()) - 1
            shown = session.score(ranking, int(labels[row]), positives, 5)
            assert aps.ap[row] == pytest.approx(shown.ap, abs=1e-12)


def test_a_method_row_carries_its_paired_difference_from_the_baseline(
        session: GallerySession) -> None:
    scores, baseline = session.scores(METHOD), session.scores(BASELINE)
    expected = paired_comparison(session.query_aps(METHOD).ap, session.query_aps(BASELINE).ap)
    assert scores.delta == pytest.approx(scores.map - baseline.map, abs=1e-12)
    assert (scores.delta, scores.delta_low, scores.delta_high, scores.p_value,
            scores.permutations) == (expected.difference, expected.low, expected.high,
                                     expected.p_value, expected.permutations)
    assert scores.delta_low <= scores.delta <= scores.delta_high
    assert baseline.delta is None and baseline.p_value is None


def test_paired_between_any_two_methods(session: GallerySession) -> None:
    forward, backward = session.paired(METHOD, BASELINE), session.paired(BASELINE, METHOD)
    assert forward.difference == pytest.approx(-backward.difference, abs=1e-12)
    assert forward.p_value == backward.p_value
    same = session.paired(METHOD, METHOD)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_query_changes_sorts_losses_first_and_filters_by_class(
        session: GallerySession) -> None:
    changes = session.query_changes(METHOD)
    before, after = session.query_aps(BASELINE), session.query_aps(METHOD)
    assert len(changes.rows) == session.gallery.size  # every tiny-gallery query has positives
    np.testing.assert_array_equal(changes.before, before.ap[changes.rows])
    np.testing.assert_array_equal(changes.after, after.ap[changes.rows])
    assert np.all(np.diff(changes.change) >= 0)
    losses, gains = changes.losses(3), changes.gains(3)
    assert np.all(changes.change[losses] < 0) and np.all(changes.change[gains] > 0)
    assert len(gains) == min(3, int((changes.change > 0).sum()))
    if len(gains) > 1:
        assert changes.change[gains[0]] >= changes.change[gains[-1]]
    name = session.gallery.class_names[1]
    of_class = session.query_changes(METHOD, class_name=name)
    assert len(of_class.rows) and np.all(session.gallery.labels[of_class.rows] == 1)
    assert set(of_class.rows.tolist()) == set(np.flatnonzero(session.gallery.labels == 1))


def test_class_changes_are_the_classes_mean_aps(session: GallerySession) -> None:
    rows = session.class_changes(METHOD)
    assert sorted(name for name, *_ in rows) == sorted(session.gallery.class_names)
    before, after = session.query_aps(BASELINE).ap, session.query_aps(METHOD).ap
    for name, count, mean_before, mean_after in rows:
        members = session.gallery.labels == session.gallery.class_names.index(name)
        assert count == members.sum()
        assert mean_before == pytest.approx(before[members].mean(), abs=1e-12)
        assert mean_after == pytest.approx(after[members].mean(), abs=1e-12)
    deltas = [after_ - before_ for _, _, before_, after_ in rows]
    assert deltas == sorted(deltas)


def test_scores_cached_without_per_query_aps_are_recomputed(
        explorer: Explorer, session: GallerySession) -> None:
    """Scores cached by an earlier version (no per-query APs, no difference) still show, and
    computing replaces them with complete ones."""
    complete = session.scores(METHOD)
    key = session._scores.key(METHOD, complete.params)
    (session._scores.per_query_folder / f"{key}.npz").unlink()
    old = dataclasses.replace(complete, delta=None, delta_low=None, delta_high=None,
                              p_value=None, permutations=0)
    session._scores.put(old)
    assert session.scores(METHOD, cached_only=True) == old
    assert session.query_aps(METHOD, cached_only=True) is None
    again = session.scores(METHOD)
    assert again.p_value == complete.p_value and again.delta == complete.delta
    assert session.query_aps(METHOD, cached_only=True) is not None
    assert (session.gallery.cache_dir / SCORES_FILE).is_file()


def test_changes_before_scoring_are_refused(session: GallerySession) -> None:
    unscored = {"k1": 5, "k2": 2}  # a setting no test scores
    with pytest.raises(InvalidInputError, match="per-query scores"):
        session.query_changes(METHOD, unscored)
    with pytest.raises(InvalidInputError, match="per-query scores"):
        session.paired(METHOD, params={METHOD: unscored})
