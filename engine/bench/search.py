"""Search benchmark: every search backend this machine has, on one synthetic gallery.

    python -m engine.bench.search --gallery-size 100000 --dim 1280 --queries 1000
    python -m engine.bench.search --gallery-size 20000 --dim 1280 --queries 200 --device cpu

Prints one Markdown table. Rows: faiss-cpu flat (the exact fp32 reference); on a CUDA machine
faiss-gpu flat (or why it is not usable) and torch-cuda exact in each precision; without CUDA
torch-cpu exact in each precision (a check of the numerics; products of reduced-precision
inputs upcast on the CPU are slow). Columns: build s (index construction, the host to device
copy included; the faiss GPU probe runs once per process, before, and is timed apart); batch
ms/query (all queries in one call, after a warm-up); online ms/query (median of single-query
calls); recall@k against the reference; peak GPU MiB (torch's allocator for the torch backend;
device memory in use by cudaMemGetInfo for faiss-gpu, whose allocations torch does not see).
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.bench.measure import synthetic_collection
from engine.bench.tables import cell, markdown_table
from engine.core.device import resolve_device
from engine.core.logs import configure_logging
from engine.search.index import PRECISIONS, SearchIndex, faiss_gpu_probe

logger = logging.getLogger("engine.bench.search")


@dataclass
class SearchRow:
    backend: str
    precision: str
    build_seconds: float | None = None
    batch_ms: float | None = None
    online_ms: float | None = None
    recall: float | None = None
    gpu_mib: float | None = None
    note: str = ""


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact top-k list that `found` recovers."""
    return float(np.mean([len(np.intersect1d(f, e)) / exact.shape[1]
                          for f, e in zip(found, exact, strict=True)]))


def _device_used_mib(device: torch.device) -> float:
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**20


def measure(gallery: np.ndarray, queries: np.ndarray, k: int, online_queries: int,
            exact: np.ndarray | None, **options) -> tuple[SearchRow, np.ndarray]:
    """Build one SearchIndex with `options`, time it, and return its row and its batch
    indices."""
    device = resolve_device(options.get("device", "auto"))
    on_cuda = device.type == "cuda"
    if on_cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated, used = torch.cuda.memory_allocated(device), _device_used_mib(device)
    started = time.perf_counter()
    index = SearchIndex(gallery, **options)
    build_seconds = time.perf_counter() - started
    index.search(queries[:min(len(queries), 64)], k)  # warm-up: kernels, allocator, caches
    started = time.perf_counter()
    _, indices = index.search(queries, k)
    batch_ms = 1000 * (time.perf_counter() - started) / len(queries)
    timings = []
    for query in queries[:online_queries]:
        started = time.perf_counter()
        index.search(query[None, :], k)
        timings.append(time.perf_counter() - started)
    row = SearchRow(index.backend, index.precision, build_seconds, batch_ms,
                    1000 * statistics.median(timings),
                    None if exact is None else recall_at(indices, exact))
    if on_cuda:
        torch.cuda.synchronize(device)
        if index.backend.startswith("faiss-gpu"):
            row.gpu_mib = _device_used_mib(device) - used
            row.note = "device memory in use"
        else:
            row.gpu_mib = (torch.cuda.max_memory_allocated(device) - allocated) / 2**20
    del index
    return row, indices


def run(gallery: np.ndarray, queries: np.ndarray, k: int, device: torch.device,
        precisions: Sequence[str], online_queries: int) -> list[SearchRow]:
    """The benchmark's rows; the first (faiss-cpu flat) is the exact fp32 reference."""
    reference, exact = measure(gallery, queries, k, online_queries, None, device="cpu")
    reference.recall = 1.0
    rows = [reference]
    if device.type == "cuda":
        started = time.perf_counter()
        probe = faiss_gpu_probe("flat", (device.index,) if device.index is not None else None)
        probe_seconds = time.perf_counter() - started
        if probe.usable:
            row, _ = measure(gallery, queries, k, online_queries, exact, device=str(device),
                             backend="faiss")
            row.note = "; ".join(filter(None, [row.note, f"probe {probe_seconds:.1f} s"]))
            rows.append(row)
        else:
            rows.append(SearchRow("faiss-gpu", "fp32", note=f"not usable: {probe.reason}"))
    for precision in precisions:
        row, _ = measure(gallery, queries, k, online_queries, exact, device=str(device),
                         backend="torch", precision=precision)
        rows.append(row)
    return rows


def format_rows(rows: Sequence[SearchRow], title: str, k: int) -> str:
    headers = ("backend", "precision", "build s", "batch ms/query", "online ms/query",
               f"recall@{k} vs exact fp32", "peak GPU MiB", "note")
    return markdown_table(title, headers, [
        (row.backend, row.precision, cell(row.build_seconds, ".2f"), cell(row.batch_ms, ".3f"),
         cell(row.online_ms, ".2f"), cell(row.recall, ".4f"), cell(row.gpu_mib, ".0f"),
         row.note or "")
        for row in rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery-size", type=int, default=100000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--spread", type=float, default=0.6,
                        help="cluster noise of the synthetic features (engine.bench.rerankers)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS),
                        default=list(PRECISIONS), help="torch backend precisions to run")
    parser.add_argument("--online-queries", type=int, default=100,
                        help="single-query calls timed (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.gallery_size, args.dim, args.queries, args.k, args.online_queries) < 1:
        parser.error("sizes, k and --online-queries must be positive")
    if args.k > args.gallery_size:
        parser.error("--k must not exceed --gallery-size")
    configure_logging(fmt="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    features, _ = synthetic_collection(args.gallery_size + args.queries, args.dim,
                                       spread=args.spread, seed=args.seed)
    gallery, queries = features[:args.gallery_size], features[args.gallery_size:]
    rows = run(gallery, queries, args.k, device, args.precisions,
               min(args.online_queries, args.queries))
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    title = (f"search: gallery {args.gallery_size} x {args.dim} (synthetic, spread "
             f"{args.spread}), {args.queries} queries, k={args.k}, {where}")
    print(format_rows(rows, title, args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
