"""Slow work in the background: one job at a time, in the order submitted, each with a state.

The explorer serves its page as soon as a gallery's features and index are loaded; everything
slower (embedding maps, fitting and training the re-rankers, whole-gallery scores and
leave-one-out runs) is queued here and runs on one worker thread, under the background thread
budget (`engine.core.threads.background_threads`), so that it never starves a query. Whoever asks
for a result that a job has not made yet reads the job's state ("waiting, 2nd in line",
"training, 41 %, about 3 min left", "failed: ...") instead of waiting on a lock.

A job is keyed: submitting a key that is already known returns the existing job (queued,
running or finished), so each piece of work is done once. A job that raises is marked failed
with its message; the queue goes on with the next one.

A job can be cancelled (`cancel`): a waiting one leaves the queue; a running one is flagged and
its progress callback raises `JobCancelled` at its next report, so work that reports during its
long loops stops within one report's time, leaving what it saved so far (checkpoints are
written atomically) and nothing half-written. A cancelled key can be submitted again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.core.plans import Plan, duration_text
from engine.errors import JobCancelled

logger = logging.getLogger(__name__)

WAITING, RUNNING, DONE, FAILED, CANCELLED = "waiting", "running", "done", "failed", "cancelled"

JobProgress = Callable[[float, str], None]
"""What a job's work reports to: (fraction done in [0, 1], what it is doing)."""


@dataclass
class Job:
    """One piece of background work and where it stands (read by any thread, written by the
    worker under the queue's lock)."""

    key: Hashable
    title: str
    work: Callable[[JobProgress], Any] = field(repr=False)
    state: str = WAITING
    fraction: float = 0.0
    message: str = ""
    error: str = ""
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    result: Any = field(default=None, repr=False)
    plan: Plan | None = None
    """What the job will do and its estimate, said before it started (`Plan.text`)."""
    cancelling: bool = False
    """Cancel was asked while it ran: it stops at its next progress report."""

    @property
    def seconds_left(self) -> float | None:
        """A linear estimate from the progress so far; before 2 % or 2 s of progress, what is
        left of the plan's estimate (None without one)."""
        if self.state != RUNNING or self.started is None:
            return None
        elapsed = time.monotonic() - self.started
        if self.fraction < 0.02 or elapsed < 2.0:
            planned = None if self.plan is None else self.plan.seconds
            return None if not planned else max(1.0, planned - elapsed)
        return elapsed * (1.0 - self.fraction) / self.fraction

    def describe(self, position: int | None = None) -> str:
        """One line for a page: "SSR: training episode 1230/3000, 41 %, about 3 min left"."""
        if self.state == DONE:
            return f"{self.title}: ready"
        if self.state == FAILED:
            return f"{self.title}: failed: {self.error}"
        if self.state == CANCELLED:
            return f"{self.title}: cancelled"
        if self.state == WAITING:
            where = "" if position is None else f", {_ordinal(position)} in line"
            return f"{self.title}: not ready yet (waiting{where})"
        if self.cancelling:
            return f"{self.title}: cancelling"
        text = f"{self.title}: {self.message or 'running'}"
        if self.fraction > 0:
            text += f", {self.fraction:.0%}"
        left = self.seconds_left
        if left is not None:
            text += f", about {duration_text(left)} left"
        return text


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(
        number % 10, "th")
    return f"{number}{suffix}"


class JobQueue:
    """Keyed jobs run one at a time, in submission order, on one daemon worker thread.

    The worker starts with `start()` (a page starts it once it serves, so that no job imports
    a module while the page is still importing its own); until then jobs only queue up.
    `run_pending()` runs the queue in the calling thread instead (`launch.py --prepare-only`).

    Args:
        budget: a context manager factory every job runs under (default: the background thread
            budget of `engine.core.threads`).
    """

    def __init__(self, budget: Callable[[], contextlib.AbstractContextManager] | None = None
                 ) -> None:
        self._budget = budget
        self._jobs: dict[Hashable, Job] = {}
        self._queue: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._current: Job | None = None
        self._version = 0

    # -- submitting and reading ------------------------------------------------------------------
    def submit(self, key: Hashable, title: str, work: Callable[[JobProgress], Any],
               *, retry: bool = False, first: bool = False, plan: Plan | None = None) -> Job:
        """Queue `work` under `key` unless a job of that key exists (then return that one; with
        `retry`, a failed one is queued again; a cancelled one always is, a running one being
        cancelled too: the new job waits for the worker). `first` puts it at the head of the
        queue; `plan` is what the job will do, for the page to show."""
        with self._lock:
            job = self._jobs.get(key)
            again = job is not None and (job.state == CANCELLED or job.cancelling or (
                retry and job.state == FAILED))
            if job is not None and not again:
                return job
            job = Job(key, title, work, plan=plan)
            self._jobs[key] = job
            self._queue.insert(0, job) if first else self._queue.append(job)
            self._version += 1
            self._wake.notify()
            return job

    def cancel(self, key: Hashable) -> bool:
        """Cancel the job of `key`: a waiting one leaves the queue (state CANCELLED); a running
        one stops at its next progress report (`JobCancelled`) and ends CANCELLED. False when
        there is no such job or it has ended."""
        with self._wake:
            job = self._jobs.get(key)
            if job is None or job.state not in (WAITING, RUNNING):
                return False
            if job.state == WAITING:
                self._queue.remove(job)
                job.state, job.finished = CANCELLED, time.monotonic()
                self._wake.notify_all()
            else:
                job.cancelling = True
            self._version += 1
            logger.info("cancelled background job %s", job.title)
            return True

    def promote(self, key: Hashable) -> bool:
        """Move the waiting job of `key` to the head of the queue; False when it is not
        waiting."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.state != WAITING:
                return False
            self._queue.remove(job)
            self._queue.insert(0, job)
            self._version += 1
            return True

    def get(self, key: Hashable) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def position(self, key: Hashable) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None when not waiting."""
        with self._lock:
            for position, job in enumerate(self._queue, start=1):
                if job.key == key:
                    return position
            return None

    def describe(self, key: Hashable) -> str | None:
        """The job's one-line state, None when no such job was submitted."""
        job = self.get(key)
        return None if job is None else job.describe(self.position(key))

    def drop(self, belongs: Callable[[Hashable], bool]) -> None:
        """Forget the jobs whose key `belongs` (a closed gallery's): the waiting ones never
        run. One that is running is not stopped (see `cancel`): it finishes, and `running`
        names it."""
        with self._lock:
            self._queue = [job for job in self._queue if not belongs(job.key)]
            for job in [job for key, job in self._jobs.items() if belongs(key)]:
                if job.state != RUNNING:
                    del self._jobs[job.key]
            self._version += 1

    def running(self, belongs: Callable[[Hashable], bool] | None = None) -> Job | None:
        """The job running now (only if its key `belongs`), else None."""
        with self._lock:
            job = self._current
            return job if job is not None and (belongs is None or belongs(job.key)) else None

    def jobs(self) -> list[Job]:
        """Every job submitted so far, in submission order."""
        with self._lock:
            return list(self._jobs.values())

    @property
    def version(self) -> int:
        """Grows whenever a job is submitted, starts, reports progress or ends: a page redraws
        its states only when this changed."""
        return self._version

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        with self._lock:
            return not self._queue and self._current is None

    # -- running ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="background-jobs",
                                                daemon=True)
                self._worker.start()

    def run_pending(self) -> None:
        """Run every queued job in the calling thread (including jobs they submit)."""
        while (job := self._next(block=False)) is not None:
            self._run(job)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or running (tests, `--prepare-only`); False on
        timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:
            while self._queue or self._current is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def _serve(self) -> None:
        while True:
            job = self._next(block=True)
            if job is not None:
                self._run(job)

    def _next(self, block: bool) -> Job | None:
        with self._wake:
            while not self._queue:
                if not block:
                    return None
                self._wake.wait()
            job = self._queue.pop(0)
            job.state, job.started = RUNNING, time.monotonic()
            self._current = job
            self._version += 1
            return job

    def _run(self, job: Job) -> None:
        def report(fraction: float, message: str) -> None:
            if job.cancelling:
                raise JobCancelled(f"{job.title} was cancelled")
            job.fraction = min(max(float(fraction), 0.0), 1.0)
            job.message = message
            self._version += 1

        logger.debug("background job started: %s", job.title)
        state, result, error_text = DONE, None, ""
        try:
            if job.cancelling:  # cancelled between leaving the queue and starting
                raise JobCancelled(f"{job.title} was cancelled")
            with self._job_budget():
                result = job.work(report)
        except JobCancelled:
            state = CANCELLED
        except Exception as error:  # a failed job is reported in its own place; others go on
            logger.exception("background job %s failed", job.title)
            state, error_text = FAILED, str(error) or type(error).__name__
        with self._wake:
            job.state, job.error, job.finished = state, error_text, time.monotonic()
            if state == DONE:
                job.result, job.fraction = result, 1.0
            self._current = None
            self._version += 1
            self._wake.notify_all()
        if state == DONE:
            logger.info("background job done in %.1f s: %s", job.finished - job.started,
                        job.title)
        elif state == CANCELLED:
            logger.info("background job cancelled after %.1f s: %s",
                        job.finished - job.started, job.title)

    @contextlib.contextmanager
    def _job_budget(self) -> Iterator[None]:
        if self._budget is not None:
            with self._budget():
                yield
            return
        from engine.core.threads import background_threads

        with background_threads():
            yield
