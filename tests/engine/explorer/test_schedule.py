"""A session's background preparation: everything cheap first, the methods that learn last and
on request (`train_now`), their fit time estimated, their training budget scaled to the
gallery, a cancelled training neither marks the method unavailable nor trains it after all."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from engine.core.jobs import CANCELLED, WAITING, JobQueue
from engine.explorer import BASELINE, Explorer, GallerySession
from engine.rerank import get_reranker_class, list_rerankers
from tests.galleries import PER_CLASS, make_gallery

CHEAP = [name for name in list_rerankers() if not get_reranker_class(name).learns]
LEARNED = [name for name in list_rerankers() if get_reranker_class(name).learns]


@pytest.fixture(scope="module")
def unscaled(app_root: Path) -> Path:
    """The tiny gallery's images without its SSR preset (SSR's default episodes scale)."""
    return make_gallery(app_root / "no-preset")


def queued_session(folder: Path, app_root: Path, extractor) -> GallerySession:
    jobs = JobQueue(budget=contextlib.nullcontext)
    explorer = Explorer(extractor, device="cpu", cache_root=app_root / "cache",
                        allowed_roots=[app_root], jobs=jobs)
    return explorer.open_folder(folder)


def test_the_methods_that_learn_come_after_everything_cheap(unscaled, app_root, extractor):
    session = queued_session(unscaled, app_root, extractor)
    kinds = [job.key[1:] for job in session.jobs.jobs()]
    projection = kinds.index(("map projection", "backbone"))
    cheap = kinds[:projection + 1]
    assert [kind[1] for kind in cheap if kind[0] == "fit"] == CHEAP
    assert cheap.index(("map", "backbone")) > max(
        position for position, kind in enumerate(cheap) if kind[0] == "fit")
    assert {kind[1] for kind in cheap if kind[0] in ("scores", "leave-one-out")} == {
        BASELINE, *CHEAP}
    learned = kinds[projection + 1:]
    for name in LEARNED:  # each: fit, its map, its scores, its leave-one-out run
        mine = [kind[0] for kind in learned if name in kind[1:2]]
        assert mine == ["fit", "map", "scores", "leave-one-out"]
    assert [kind[1] for kind in learned if kind[0] == "fit"] == LEARNED


def test_train_now_puts_a_method_at_the_head_of_the_queue(unscaled, app_root, extractor):
    session = queued_session(unscaled, app_root, extractor)
    job = session.train_now("ssr")
    assert job.key == (session.key, "fit", "ssr", session.setting("ssr").key[1])
    assert session.jobs.position(job.key) == 1 and job.state == WAITING
    assert session.train_now("ssr") is job
    with pytest.raises(Exception, match="not a method"):
        session.train_now("bogus")


def test_ssr_trains_with_episodes_scaled_to_the_gallery(unscaled, app_root, extractor,
                                                        tiny_gallery):
    session = queued_session(unscaled, app_root, extractor)
    size = 3 * PER_CLASS
    setting = session.setting("ssr")
    assert setting.params["episodes"] == 300 and setting.is_default
    assert setting.source == f"authors' defaults (episodes scaled to {size} images)"
    assert session.params_for("ssr") == (dict(setting.params), setting.source)
    # a user's value is not scaled; the preset of the tiny gallery is never scaled either
    assert session.setting("ssr", {"episodes": 3000}).params["episodes"] == 3000
    preset = queued_session(tiny_gallery, app_root, extractor).setting("ssr")
    assert preset.source == "preset" and preset.params["episodes"] == 40


def test_fit_estimates_are_measured_once_and_none_once_fitted(unscaled, app_root, extractor,
                                                              monkeypatch):
    session = queued_session(unscaled, app_root, extractor)
    estimate = session.fit_estimate("ssr")
    assert estimate is not None and 0 < estimate < 600
    ssr = get_reranker_class("ssr")
    monkeypatch.setattr(ssr, "estimate_fit_seconds", lambda self, context: pytest.fail(
        "measured again"))
    assert session.fit_estimate("ssr") == estimate
    assert session.fit_estimate("k_reciprocal") is None  # cannot say: quick anyway
    assert session.fit_estimate(BASELINE) is None
    session.reranker("k_reciprocal")
    assert session.fit_estimate("k_reciprocal") is None


def test_a_cancelled_training_is_not_a_failure_and_trains_again_on_request(
        unscaled, app_root, extractor):
    session = queued_session(unscaled, app_root, extractor)
    jobs = session.jobs
    fit = session.train_now("ssr")
    started = threading.Event()
    jobs.start()
    while not (fit.state != WAITING and fit.fraction > 0) and not started.wait(0.01):
        pass  # the training reports its first episodes
    assert jobs.cancel(fit.key)
    assert jobs.wait_idle(timeout=300)
    assert fit.state == CANCELLED and "ssr" not in session.unavailable
    assert session.fitted("ssr") is None  # nothing after it trained it
    dependent = [job for job in jobs.jobs() if job.key[0] == session.key
                 and job.key[1] in ("scores", "leave-one-out", "map") and "ssr" in job.key[2:3]]
    assert dependent and all(job.state == CANCELLED for job in dependent)
    assert session.not_ready("ssr") == "SSR (Shen et al. 2021): cancelled"
    again = session.train_now("ssr")
    assert again is not fit and again.state != CANCELLED
    assert all(jobs.get(job.key).state != CANCELLED for job in dependent)  # queued again
    jobs.cancel(again.key)  # no training left behind for the next tests
    assert jobs.wait_idle(timeout=300)
