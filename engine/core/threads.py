"""The process's thread budget: how many threads torch, BLAS, OpenMP (faiss) and numba may use,
for foreground work, for one background job, and for one online query.

Torch, OpenBLAS and numba each start their own pool, and OpenMP workers spin-wait after every
parallel region. On a small machine that runs queries beside background jobs (training,
scoring), the pools oversubscribe the cores. Measured on the 2-core development machine beside a
second CPU-bound process (a pure-Python loop) and other users' jobs (load 5 to 6): SGRR's fit on
the demo gallery (GCN training) took 288 and 410 s with torch's 2 threads, spending 188 and 147
CPU s (the workers spin), and 30 and 53 s (11 and 13 CPU s) with 1. An online query's small
steps crossed torch's intra-op threshold into a two-thread split, each waiting for the second
thread (with the online paths' other changes, k-reciprocal's demo query went from 33 to 4 ms).

What is per host thread and what is process-wide (measured in this environment: torch 2.14 with
its OpenMP runtime and MKL, numpy's OpenBLAS, faiss-cpu's OpenMP OpenBLAS, numba 0.68; counting
the OS threads that accumulated CPU time during an op):

- **torch intra-op** (`torch.set_num_threads`): per host thread. It sets the calling thread's
  OpenMP and MKL thread counts; another Python thread keeps its own. It also stores a
  process-wide default that a thread adopts the first time it calls into torch's thread
  settings or runs a parallel op (setting its count does not count as that first call): a
  thread whose first torch call falls while another thread has lowered the count keeps the
  lowered count. `configure_threads` makes that first call for the calling (main) thread; a
  worker thread that later runs foreground batch work may wrap it in
  `limit_threads(thread_budget().foreground)`.
- **faiss** (`faiss.omp_set_num_threads`): per host thread as well (an OpenMP ICV). When torch
  is imported first, as the engine does, faiss resolves to torch's OpenMP runtime, so torch's
  setting already covers it.
- **numba** (`numba.set_num_threads`): per host thread; a new thread starts at numba's default.
- **BLAS via threadpoolctl** (OpenBLAS, numpy's and faiss's): **process-wide**. A limit set in
  one thread holds for every thread until it is lifted.
- **torch inter-op** (`torch.set_num_interop_threads`): process-wide and settable only before
  any inter-op work; the engine does not use inter-op parallelism.

Hence the design:

- `configure_threads()` is called once at start. It gives the process's main thread (and the
  threads it later starts, through torch's default) all cores for foreground work, fixes
  torch's inter-op pool to one thread, and sets the process-wide BLAS pools to one job's share
  (`background` below) once and for all, since they cannot be confined per job.
- `background_threads()` runs a background job (training, scoring) on the calling thread with
  at most its share (half the cores, at least one: one of two cores), leaving a core to queries.
  It changes only the calling thread's torch / faiss / numba counts and restores them on exit.
- `limit_threads(n)` is the same per-thread limit for any block; the online re-rankers run a
  single query under `limit_threads(1)`: its steps are small, and splitting them over two
  threads only adds a wait per step on a busy machine.

A thread with one torch thread runs no OpenMP workers, so it cannot spin-wait either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per kind of work, decided once from the cores this process may run on.

    cores: CPUs in the process's affinity mask. foreground: torch threads of the main thread and
    of foreground batch work. background: torch / faiss / numba threads of one background job,
    and the process-wide BLAS limit. query: threads of one online query. interop: torch's
    inter-op pool. blas_limited: whether threadpoolctl was there to set the BLAS pools.
    """

    cores: int
    foreground: int
    background: int
    query: int
    interop: int
    blas_limited: bool

    def describe(self) -> str:
        blas = (f"BLAS {self.background} (process-wide)" if self.blas_limited
                else "BLAS left at its default (threadpoolctl not installed)")
        return (f"{self.cores} cores: foreground {self.foreground} torch threads, background jobs "
                f"{self.background} each, online queries {self.query}, inter-op "
                f"{self.interop}, {blas}")


_lock = threading.Lock()
_budget: ThreadBudget | None = None


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan(cores: int) -> ThreadBudget:
    """The budget for `cores` CPUs, without applying it (see the module docstring)."""
    cores = max(1, int(cores))
    background = max(1, cores // 2)
    return ThreadBudget(cores=cores, foreground=cores, background=background, query=1,
                        interop=1, blas_limited=False)


def configure_threads(cores: int | None = None) -> ThreadBudget:
    """Apply the thread budget to this process once, log it, and return it.

    Call it at start, from the main thread, before starting worker threads. Later calls return
    the first budget unchanged.

    Args:
        cores: CPUs to plan for (default: the affinity mask, `available_cores()`).
    """
    global _budget
    with _lock:
        if _budget is not None:
            return _budget
        budget = plan(available_cores() if cores is None else cores)
        # numba reads its pool size at import; umap imports it lazily
        if "numba" not in sys.modules:
            os.environ.setdefault("NUMBA_NUM_THREADS", str(budget.foreground))
        torch.get_num_threads()  # this thread's own count is fixed from here on
        torch.set_num_threads(budget.foreground)
        interop = budget.interop
        try:
            torch.set_num_interop_threads(budget.interop)
        except RuntimeError:  # inter-op work already ran: the pool keeps its size
            interop = torch.get_num_interop_threads()
            logger.info("torch inter-op threads already started (%d); left as they are",
                        interop)
        blas_limited = _limit_blas(budget.background)
        budget = ThreadBudget(budget.cores, budget.foreground, budget.background, budget.query,
                              interop, blas_limited)
        _budget = budget
    logger.info("thread budget: %s", budget.describe())
    return budget


def thread_budget() -> ThreadBudget:
    """The configured budget, or the plan for this machine when `configure_threads` has not
    run (then nothing process-wide was set)."""
    return _budget if _budget is not None else plan(available_cores())


def _limit_blas(count: int) -> bool:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        logger.info("threadpoolctl is not installed (pip install threadpoolctl): BLAS pools "
                    "keep their default size")
        return False
    threadpool_limits(limits=count, user_api="blas")
    return True


def _imported(name: str) -> ModuleType | None:
    """The module `name` when its import has finished, else None.

    Another thread may be importing it right now (umap imports numba in a background job): the
    module is then already in `sys.modules` but half built, without `get_num_threads`.
    Importing it here instead would wait for that import (25 s for numba).
    """
    module = sys.modules.get(name)
    if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
        return None
    return module


@contextlib.contextmanager
def limit_threads(count: int) -> Iterator[None]:
    """Run the block with at most `count` torch, faiss (OpenMP) and numba threads on the
    calling thread, then restore that thread's counts. Other threads are not affected (BLAS is
    process-wide and left as `configure_threads` set it).

    faiss and numba are set only once their import has finished (importing them costs seconds;
    another thread may be importing them).
    """
    count = max(1, int(count))
    previous_torch = torch.get_num_threads()
    faiss = _imported("faiss")
    numba = _imported("numba")
    previous_faiss = faiss.omp_get_max_threads() if faiss is not None else None
    previous_numba = numba.get_num_threads() if numba is not None else None
    if previous_torch != count:
        torch.set_num_threads(count)
    if faiss is not None and previous_faiss != count:
        faiss.omp_set_num_threads(count)
    if numba is not None and previous_numba > count:
        numba.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous_torch:
            torch.set_num_threads(previous_torch)
        if faiss is not None and faiss.omp_get_max_threads() != previous_faiss:
            faiss.omp_set_num_threads(previous_faiss)
        if numba is not None and numba.get_num_threads() != previous_numba:
            numba.set_num_threads(previous_numba)


@contextlib.contextmanager
def background_threads() -> Iterator[ThreadBudget]:
    """Run a background job (training, scoring) on the calling thread within its share of the
    budget (half the cores, at least one), so that a query keeps a core. Yields the budget."""
    budget = thread_budget()
    with limit_threads(budget.background):
        yield budget


@contextlib.contextmanager
def query_threads() -> Iterator[None]:
    """Run one online query's work on the calling thread with the budget's query threads (1)."""
    with limit_threads(thread_budget().query):
        yield
