"""The background job queue: order, one job per key, failures kept to their job, states."""

from __future__ import annotations

import contextlib
import threading

import pytest

from engine.core.jobs import DONE, FAILED, RUNNING, WAITING, Job, JobQueue


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
