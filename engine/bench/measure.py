"""What the benchmarks measure with: peak memory of a block, a second CPU-bound process, and
clustered synthetic features."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0



def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False



@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory growth (MiB) of the block: process RSS ("rss"), and CUDA allocations ("gpu")
    when the device is a GPU.

    The RSS peak comes from the kernel's high-water mark, reset before the block; where that
    is not allowed a sampling thread watches the RSS instead.
    """
    result: dict[str, float] = {}
    on_gpu = device.startswith("cuda")
    if on_gpu:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_start = torch.cuda.memory_allocated()
    start = _rss_kib("VmRSS:")
    sampler = None
    if not _reset_rss_peak():
        peak = [start]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], _rss_kib("VmRSS:"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    try:
        yield result
    finally:
        if sampler is not None:
            stop.set()
            sampler.join()
            result["rss"] = max(0, peak[0] - start) / 1024
        else:
            result["rss"] = max(0, _rss_kib("VmHWM:") - start) / 1024
        if on_gpu:
            torch.cuda.synchronize()
            result["gpu"] = (torch.cuda.max_memory_allocated() - gpu_start) / 2**20



def synthetic_collection(n: int, dim: int, n_classes: int | None = None, spread: float = 0.6,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered random unit features: class centres plus Gaussian noise (labels = class).

    `spread` is the noise per dimension relative to the centres: 0.6 gives tight clusters (the
    kNN graph stays inside classes), 2 to 3 loose ones whose propagated GNN rows are 2 to 3.5
    times denser (and its sparse products that much slower).
    """
    rng = np.random.default_rng(seed)
    n_classes = n_classes or max(2, n // 20)
    centres = rng.standard_normal((n_classes, dim)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    features = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32), labels.astype(np.int64)


BUSY_LOOP = "while True: pass"
"""The second CPU-bound process of `--busy`: a pure-Python loop, one core, no thread pools."""



@contextlib.contextmanager
def busy_process() -> Iterator[str]:
    """Run a CPU-bound child process (`BUSY_LOOP`) for the block; yields its description."""
    child = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # scheduled and spinning before the first timing
        yield "a pure-Python busy loop in a second process"
    finally:
        child.kill()
        child.wait()
