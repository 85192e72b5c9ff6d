"""The background job queue: order, one job per key, failures kept to their job, states,
cancelling and promoting."""

from __future__ import annotations

import contextlib
import logging
import threading

import pytest

from engine.core.jobs import CANCELLED, DONE, FAILED, RUNNING, WAITING, Job, JobQueue
from engine.core.plans import Plan, PlanStep
from engine.errors import EngineError, JobCancelled


def queue() -> JobQueue:
    return JobQueue(budget=contextlib.nullcontext)


def test_jobs_run_once_each_in_submission_order() -> None:
    jobs, ran = queue(), []
    for name in "abc":
        jobs.submit(name, name.upper(), lambda progress, name=name: ran.append(name) or name)
    again = jobs.submit("a", "A again", lambda progress: ran.append("a again"))
    assert again is jobs.get("a")  # a known key is not queued twice
    assert [jobs.position(name) for name in "abc"] == [1, 2, 3]
    jobs.run_pending()
    assert ran == ["a", "b", "c"]
    assert [(job.state, job.result) for job in jobs.jobs()] == [(DONE, name) for name in "abc"]
    assert jobs.idle and jobs.position("a") is None


def test_a_failed_job_keeps_its_error_and_the_next_one_runs() -> None:
    jobs = queue()

    def fail(progress):
        raise ValueError("no labels to learn from")

    jobs.submit("broken", "SSR", fail)
    jobs.submit("fine", "GNN", lambda progress: 1)
    jobs.run_pending()
    assert jobs.get("broken").state == FAILED
    assert jobs.describe("broken") == "SSR: failed: no labels to learn from"
    assert jobs.get("fine").state == DONE
    # retry queues a failed job again; a finished one is kept
    assert jobs.submit("broken", "SSR", lambda progress: 2, retry=True).state == WAITING
    assert jobs.submit("fine", "GNN", lambda progress: 3, retry=True).result == 1


def test_jobs_submitted_by_a_job_run_too() -> None:
    jobs, ran = queue(), []
    jobs.submit("outer", "outer", lambda progress: jobs.submit(
        "inner", "inner", lambda progress: ran.append("inner")))
    jobs.run_pending()
    assert ran == ["inner"]


def test_states_say_where_a_job_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = queue()
    jobs.submit("first", "Embedding map", lambda progress: None)
    jobs.submit("second", "SSR", lambda progress: None)
    assert jobs.describe("second") == "SSR: not ready yet (waiting, 2nd in line)"
    assert jobs.describe("missing") is None
    job = Job("k", "SSR", lambda progress: None, state=RUNNING, fraction=0.41,
              message="training episode 1230/3000", started=100.0)
    monkeypatch.setattr("engine.core.jobs.time.monotonic", lambda: 220.0)  # 120 s for 41 %
    assert job.describe() == ("SSR: training episode 1230/3000, 41%, about 3 min left")
    assert job.seconds_left == pytest.approx(120 * 0.59 / 0.41)


def test_the_worker_runs_jobs_in_the_background_under_the_budget() -> None:
    entered, release = [], threading.Event()

    @contextlib.contextmanager
    def budget():
        entered.append(threading.current_thread().name)
        yield

    jobs = JobQueue(budget=budget)
    versions = [jobs.version]
    jobs.submit("slow", "slow", lambda progress: (progress(0.5, "half"), release.wait(30)))
    assert jobs.version > versions[0]
    assert not jobs.wait_idle(timeout=0.05)  # queued, not started: nothing runs yet
    jobs.start()
    release.set()
    assert jobs.wait_idle(timeout=30)
    assert entered == ["background-jobs"]
    assert jobs.get("slow").state == DONE and jobs.get("slow").message == "half"


def test_dropped_jobs_never_run_and_a_running_one_is_named() -> None:
    jobs, ran, release = JobQueue(budget=contextlib.nullcontext), [], threading.Event()
    jobs.submit(("closed", "fit"), "busy", lambda progress: release.wait(30))
    jobs.submit(("closed", "map"), "map", lambda progress: ran.append("map"))
    jobs.submit(("open", "map"), "other map", lambda progress: ran.append("other"))
    jobs.start()
    closed = lambda key: key[0] == "closed"  # noqa: E731
    while jobs.running(closed) is None:
        release.wait(0.01)
    jobs.drop(closed)
    assert jobs.running(closed).title == "busy"  # it cannot be stopped
    jobs.submit("after", "right after the running one",
                lambda progress: ran.append("after"), first=True)
    release.set()
    assert jobs.wait_idle(timeout=30)
    assert ran == ["after", "other"]
    assert jobs.get(("closed", "map")) is None and jobs.running() is None


def test_a_waiting_job_cancelled_never_runs_and_can_be_submitted_again() -> None:
    jobs, ran = queue(), []
    jobs.submit("a", "Indexing", lambda progress: ran.append("a"))
    jobs.submit("b", "SSR", lambda progress: ran.append("b"))
    assert jobs.cancel("a") and not jobs.cancel("missing")
    assert jobs.get("a").state == CANCELLED and jobs.describe("a") == "Indexing: cancelled"
    assert jobs.position("b") == 1
    jobs.run_pending()
    assert ran == ["b"] and not jobs.cancel("b")  # an ended job cannot be cancelled
    again = jobs.submit("a", "Indexing", lambda progress: ran.append("a again"))
    assert again.state == WAITING and jobs.get("a") is again
    jobs.run_pending()
    assert ran == ["b", "a again"] and again.state == DONE


def test_a_running_job_stops_at_its_next_report(caplog: pytest.LogCaptureFixture) -> None:
    jobs, started, reports = JobQueue(budget=contextlib.nullcontext), threading.Event(), []

    def long_work(progress):
        for step in range(10_000):
            progress(step / 10_000, f"step {step}")
            reports.append(step)
            started.set()
            threading.Event().wait(0.001)
        return "finished"

    jobs.submit("long", "Indexing", long_work)
    jobs.submit("next", "Map", lambda progress: "map")
    jobs.start()
    assert started.wait(30)
    with caplog.at_level(logging.INFO, logger="engine.core.jobs"):
        assert jobs.cancel("long")
        assert jobs.describe("long") in ("Indexing: cancelling", "Indexing: cancelled")
        assert jobs.wait_idle(timeout=30)
    job = jobs.get("long")
    assert job.state == CANCELLED and job.result is None and job.error == ""
    assert len(reports) < 10_000
    assert jobs.describe("long") == "Indexing: cancelled"
    assert jobs.get("next").state == DONE  # the queue goes on
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_job_cancelled_while_running_can_be_queued_again_at_once() -> None:
    jobs, release, ran = JobQueue(budget=contextlib.nullcontext), threading.Event(), []

    def work(progress):
        release.wait(30)
        progress(0.5, "half")  # raises: the job was cancelled meanwhile
        ran.append("first")

    jobs.submit("key", "Build", work)
    jobs.start()
    while jobs.running() is None:
        release.wait(0.01)
    jobs.cancel("key")
    second = jobs.submit("key", "Build", lambda progress: ran.append("second"))
    assert second is not None and second.state == WAITING
    release.set()
    assert jobs.wait_idle(timeout=30)
    assert ran == ["second"] and second.state == DONE


def test_job_cancelled_is_an_engine_error_with_a_message() -> None:
    error = JobCancelled("Indexing flowers was cancelled")
    assert isinstance(error, EngineError) and "cancelled" in str(error)


def test_promote_moves_a_waiting_job_to_the_head() -> None:
    jobs, ran = queue(), []
    for name in "abc":
        jobs.submit(name, name, lambda progress, name=name: ran.append(name))
    assert jobs.promote("c") and not jobs.promote("missing")
    assert [jobs.position(name) for name in "cab"] == [1, 2, 3]
    jobs.run_pending()
    assert ran == ["c", "a", "b"] and not jobs.promote("c")


def test_a_job_carries_its_plan_and_uses_it_before_progress(monkeypatch) -> None:
    plan = Plan([PlanStep("indexes the 60 images of flowers with lite2", 120.0)])
    jobs = queue()
    job = jobs.submit("k", "Query model lite2", lambda progress: None, plan=plan)
    assert job.plan is plan
    job.state, job.started = RUNNING, 100.0
    monkeypatch.setattr("engine.core.jobs.time.monotonic", lambda: 180.0)
    assert job.seconds_left == pytest.approx(40.0)
    assert job.describe() == "Query model lite2: running, about 40 s left"
