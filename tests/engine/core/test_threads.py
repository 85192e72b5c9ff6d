"""The thread budget: per-thread limits stay on their thread, the process-wide setup runs once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

from engine.core import threads


@pytest.mark.parametrize(("cores", "background"), [(1, 1), (2, 1), (3, 1), (8, 4)])
def test_a_background_job_gets_half_the_cores_and_a_query_one(cores, background):
    budget = threads.plan(cores)
    assert (budget.cores, budget.foreground, budget.background, budget.query) == (
        cores, cores, background, 1)


def test_a_limit_in_one_thread_leaves_the_others_and_is_restored():
    torch.set_num_threads(2)
    torch.get_num_threads()  # this thread's first torch call fixes its own count
    seen: dict[str, int] = {}
    inside, release = threading.Event(), threading.Event()

    def job() -> None:
        with threads.limit_threads(1):
            seen["job"] = torch.get_num_threads()
            inside.set()
            release.wait(10)
        seen["job after"] = torch.get_num_threads()

    worker = threading.Thread(target=job)
    worker.start()
    assert inside.wait(10)
    seen["main while the job runs"] = torch.get_num_threads()
    release.set()
    worker.join(10)
    assert seen == {"job": 1, "main while the job runs": 2, "job after": 2}


def test_background_threads_yields_the_budget_and_uses_its_share():
    with threads.background_threads() as budget:
        assert torch.get_num_threads() == budget.background


def test_configure_threads_sets_the_process_once():
    code = (
        "import json, logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from threadpoolctl import threadpool_info\n"
        "from engine.core import threads\n"
        "first = threads.configure_threads(cores=2)\n"
        "again = threads.configure_threads(cores=8)\n"
        "blas = sorted({p['num_threads'] for p in threadpool_info() "
        "if p['user_api'] == 'blas'})\n"
        "print(json.dumps({'same': first == again, 'torch': torch.get_num_threads(), "
        "'interop': torch.get_num_interop_threads(), 'blas': blas, "
        "'background': first.background}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"same": True, "torch": 2, "interop": 1, "blas": [1], "background": 1}
    assert done.stderr.count("thread budget:") == 1


def test_a_limit_while_another_thread_imports_numba_leaves_the_half_built_module_alone(
        tmp_path, monkeypatch):
    """CI failure: a query's `limit_threads` ran while a background job imported umap, found
    the half-built numba in `sys.modules` and called its missing `get_num_threads`."""
    (tmp_path / "numba.py").write_text(
        "import threading\n"
        "started = threading.Event()\n"
        "finish = threading.Event()\n"
        "import sys\n"
        "sys.modules[__name__].started_import = started\n"
        "sys.modules[__name__].finish_import = finish\n"
        "started.set()\n"
        "finish.wait(10)\n"
        "calls = [4]\n"
        "def get_num_threads():\n"
        "    return calls[-1]\n"
        "def set_num_threads(n):\n"
        "    calls.append(n)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "numba", raising=False)
    importer = threading.Thread(target=__import__, args=("numba",))
    importer.start()
    try:
        for _ in range(1000):
            half_built = sys.modules.get("numba")
            if half_built is not None and hasattr(half_built, "started_import"):
                break
            threading.Event().wait(0.01)
        assert half_built.started_import.wait(10)
        assert not hasattr(half_built, "get_num_threads")
        with threads.limit_threads(1):
            assert torch.get_num_threads() == 1
    finally:
        half_built.finish_import.set()
        importer.join(10)
    finished = sys.modules["numba"]
    assert finished.__file__ == str(tmp_path / "numba.py")
    with threads.limit_threads(1):
        pass
    assert finished.calls == [4, 1, 4]
