"""The explorer with a background job queue: a query never waits for a fit, a training or a
leave-one-out run; it gets every method that is ready and the state of the others."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from app.handlers import PageHandlers
from app.page import build_app
from app.text import background_text
from engine.core.jobs import FAILED, JobQueue
from engine.explorer import BASELINE, Explorer
from engine.rerank import get_reranker_class, list_rerankers
from tests.galleries import PER_CLASS, demo_file

UPLOAD = demo_file(1, PER_CLASS)  # a snowdrop that is not in the tiny gallery


@pytest.fixture()
def queued(explorer: Explorer, tiny_gallery: Path, app_root: Path) -> Explorer:
    """A second explorer on the tiny gallery (the same cache, so features and index load),
    whose job queue is filled but not started."""
    jobs = JobQueue(budget=contextlib.nullcontext)
    return Explorer.load(tiny_gallery, device="cpu", cache_root=app_root / "cache",
                         allowed_roots=[app_root], jobs=jobs)


def test_opening_queues_the_preparation_in_a_fixed_order(queued: Explorer) -> None:
    """Everything cheap first (fits, the map, the cheap methods' scores and leave-one-out runs),
    then per method that learns: its training, its map, its scores and run."""
    session = queued.session(None)
    kinds = [job.key[1:] for job in queued.jobs.jobs()]
    cheap = [name for name in list_rerankers() if not get_reranker_class(name).learns]
    learned = [name for name in list_rerankers() if get_reranker_class(name).learns]
    fits = [key[1] for key in kinds if key[0] == "fit"]
    assert fits == cheap + learned
    first_map = kinds.index(("map", "backbone"))
    assert all(kinds.index(key) < first_map for key in kinds if key[0] == "fit"
               and key[1] in cheap)
    first_learned = min(i for i, key in enumerate(kinds) if key[0] == "fit"
                        and key[1] in learned)
    assert all(i < first_learned for i, key in enumerate(kinds)
               if key[0] != "fit" and key[1] in (BASELINE, "backbone", *cheap))
    for name in learned:  # each learned method's own work follows its training
        fit = kinds.index(next(key for key in kinds if key[:2] == ("fit", name)))
        assert all(i > fit for i, key in enumerate(kinds) if key[0] != "fit"
                   and key[1] == name)
    scored = [key[1] for key in kinds if key[0] == "scores"]
    assert scored == [BASELINE, *cheap, *learned]
    assert {key[1] for key in kinds if key[0] == "leave-one-out"} == {BASELINE,
                                                                      *list_rerankers()}
    assert all(job.key[0] == session.key for job in queued.jobs.jobs())


def test_a_query_before_any_job_ran_gets_the_baseline_and_the_states(queued: Explorer
                                                                      ) -> None:
    session = queued.session(None)
    result = queued.query(None, UPLOAD, query_class="snowdrop")
    assert list(result.rankings) == [BASELINE]
    assert sorted(result.not_ready) == sorted(list_rerankers())
    assert all("not ready yet (waiting" in text for text in result.not_ready.values())
    assert result.rankings[BASELINE].ap is not None
    assert result.as_dict(session.gallery)["not_ready"] == result.not_ready
    # a gallery pick is ranked online while its leave-one-out run waits
    pick = queued.query(None, source_file=session.gallery.files[3])
    assert pick.rankings[BASELINE].how == "online"
    assert 3 not in pick.rankings[BASELINE].indices
    for method in list_rerankers():
        assert session.state_text(method).startswith(get_reranker_class(method).title)


def test_after_the_jobs_every_method_answers_as_without_a_queue(queued: Explorer,
                                                                explorer: Explorer) -> None:
    queued.jobs.run_pending()
    assert all(job.state == "done" for job in queued.jobs.jobs()), [
        (job.title, job.error) for job in queued.jobs.jobs() if job.state != "done"]
    session = queued.session(None)
    result = queued.query(None, UPLOAD, query_class="snowdrop")
    assert result.not_ready == {}
    expected = explorer.query(None, UPLOAD, query_class="snowdrop")
    assert list(result.rankings) == list(expected.rankings)
    for method, ranking in result.rankings.items():
        assert (ranking.indices == expected.rankings[method].indices).all(), method
    pick = queued.query(None, source_file=session.gallery.files[3])
    assert {ranking.how for ranking in pick.rankings.values()} == {"leave-one-out"}
    assert all(session.state_text(method) == "Ready." for method in list_rerankers())
    assert background_text(session).startswith("Background preparation done")


def test_a_failed_fit_shows_in_its_tab_and_the_others_work(
        queued: Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    learned = next(name for name in list_rerankers() if get_reranker_class(name).learns)

    def broken(self, context):
        raise RuntimeError("out of memory while training")

    monkeypatch.setattr(get_reranker_class(learned), "_fit", broken)
    queued.jobs.run_pending()
    session = queued.session(None)
    failed = [job for job in queued.jobs.jobs() if job.state == FAILED]
    assert [job.key[1:3] for job in failed] == [("fit", learned)]
    assert "out of memory while training" in session.state_text(learned)
    result = queued.query(None, UPLOAD, query_class="snowdrop")
    assert learned not in result.rankings and learned not in result.not_ready
    assert set(result.rankings) == {BASELINE, *list_rerankers()} - {learned}


def test_the_page_shows_each_tab_state_and_refreshes_only_on_change(queued: Explorer) -> None:
    handlers = PageHandlers(queued)
    build_app(queued, handlers=handlers)
    session = queued.session(None)
    ui = handlers.ui
    first = handlers.refresh_states(session.key, None, None, BASELINE, "backbone")
    for method in list_rerankers():
        assert "not ready yet" in first[handlers.ui.tabs[method].state]
    assert "Preparing in the background" in first[ui.background]
    assert handlers.refresh_states(session.key, first[ui.jobs_seen], None, BASELINE,
                                   "backbone") == {ui.jobs_seen: first[ui.jobs_seen]}
    view = handlers.search(session.key, str(UPLOAD), None, "snowdrop", True, 5, BASELINE,
                           "backbone", *[control.value for control in handlers.ui.all_controls()])
    method = list_rerankers()[0]
    assert "Not ready yet" in view[handlers.ui.tabs[method].metrics]
    queued.jobs.run_pending()
    after = handlers.refresh_states(session.key, first[ui.jobs_seen], None, BASELINE,
                                    "backbone")
    assert all(after[handlers.ui.tabs[name].state] == "Ready." for name in list_rerankers())
    assert len(after[ui.compare_table]) == 1 + len(list_rerankers())
    assert ui.map_plot in after  # the map became ready


def test_a_failed_scoring_job_shows_in_its_method_tab_only(
        queued: Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    session = queued.session(None)
    method = list_rerankers()[0]
    scores = type(session).scores

    def failing(self, name, params=None, cached_only=False, progress=None):
        if name == method and not cached_only:
            raise MemoryError("no memory left for the leave-one-out run")
        return scores(self, name, params, cached_only)

    monkeypatch.setattr(type(session), "scores", failing)
    queued.jobs.run_pending()
    assert "scores: failed: no memory left" in session.state_text(method)
    assert session.state_text(method).startswith("Ready.")
    assert all(session.state_text(other) == "Ready." for other in list_rerankers()[1:])
    result = queued.query(None, UPLOAD, query_class="snowdrop")
    assert set(result.rankings) == {BASELINE, *list_rerankers()}
